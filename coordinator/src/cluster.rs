//! The cluster: who is connected, and running a set of tasks on them. Hand
//! it the parts of a step (or of an evaluation) with the nodes that should
//! compute them first, get the answers back in part order. Underneath it
//! sends the weights (through the shared segment for a node on this host,
//! else as chunks), puts a deadline on every send and on every answer, and
//! moves the part of a node that dies, stops reading, times out or answers
//! with garbage to another live node, with the same samples and the same
//! dropout seed, so a step's result does not depend on who computed which
//! part.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proto::shm::Segment;
use proto::v1::coordinator_message::Kind as Out;
use proto::v1::{
    BufferKind, CoordinatorMessage, EvalTask, Finish, Samples, SamplesAhead, TrainTask,
};
use proto::Chunker;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::optimizer::GRADIENT_NORM_LIMIT;
use crate::plane::SharedPlane;
use crate::service::{Event, NodeInfo, Outbox, EVENT_QUEUE};
use crate::shard::link::MemberNotice;
use crate::task::{check, Answer, Task};
use crate::telemetry;
use crate::CoordinatorError;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Answers in a row whose gradient norm is beyond [`GRADIENT_NORM_LIMIT`]
/// after which a node is evicted (each of those steps is skipped).
const HUGE_STREAK: u32 = 3;

/// How the cluster treats its members.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// How long a node may take to take its messages, and to answer a task.
    pub step_timeout: Duration,
    /// Nodes needed to go on after losing some.
    pub min_nodes: usize,
    /// How long to wait for nodes to come back below `min_nodes`.
    pub rejoin_timeout: Duration,
    /// Shares proportional to measured speed instead of equal ones.
    pub balance: bool,
    /// How weights travel to nodes on gRPC.
    pub wire: proto::Wire,
}

/// A connected node.
struct Member {
    outbox: Outbox,
    info: NodeInfo,
    /// Weights version this node holds (sent as chunks).
    held: Option<u64>,
    /// Measured speed (samples per compute second), smoothed.
    speed: Option<f64>,
    /// Its gradients segment, when it is on this host and uses the
    /// shared-memory plane (weights then come from the shared segment too).
    shared: Option<Arc<Segment>>,
    /// Its latest answers in a row with a gradient beyond the norm limit.
    huge: u32,
    /// The step and part whose samples it was sent ahead (the latest).
    ahead: Option<(u64, usize)>,
}

/// The weights as nodes on the bf16 wire hold them: rebuilt, version after
/// version, from the changes sent in bf16 (see [`proto::bf16_delta`]).
struct Held {
    version: u64,
    values: Vec<f32>,
    /// The change that made `version` from an earlier one, encoded once for
    /// every node that holds that one.
    delta: Option<(u64, Chunker)>,
    /// `values` in f32, for a node that holds no earlier version (encoded
    /// when first needed).
    full: Option<Chunker>,
}

impl Held {
    fn new(version: u64, weights: &[f32]) -> Self {
        Self {
            version,
            values: weights.to_vec(),
            delta: None,
            full: None,
        }
    }

    /// Brings the held copy to `version` of `weights`; returns what to send
    /// to a node that holds `node_holds`.
    fn chunks(&mut self, version: u64, weights: &[f32], node_holds: Option<u64>) -> Chunker {
        let size = proto::DEFAULT_CHUNK_BYTES;
        if self.version != version {
            let base = self.version;
            let bytes = proto::bf16_delta(weights, &mut self.values);
            let kind = BufferKind::WeightsDelta;
            let delta = Chunker::encoded(kind, version, proto::Wire::Bf16, bytes, size);
            self.delta = Some((base, delta.with_base(base)));
            self.version = version;
            self.full = None;
        }
        match &self.delta {
            Some((base, delta)) if node_holds == Some(*base) => delta.clone(),
            _ => {
                let (values, version) = (&self.values, self.version);
                self.full
                    .get_or_insert_with(|| Chunker::new(BufferKind::Weights, version, values, size))
                    .clone()
            }
        }
    }
}

/// The weights as they go to nodes over gRPC, encoded once per version for
/// every node that needs them.
enum Outgoing {
    /// Whole, in f32: the version encoded last.
    F32(Option<(u64, Chunker)>),
    /// As bf16 changes to a copy both ends hold.
    Bf16(Option<Held>),
}

impl Outgoing {
    fn new(wire: proto::Wire) -> Self {
        match wire {
            proto::Wire::F32 => Outgoing::F32(None),
            proto::Wire::Bf16 => Outgoing::Bf16(None),
        }
    }

    /// What to send a node that holds `node_holds` so that it holds
    /// `version` of `weights`.
    fn chunks(&mut self, version: u64, weights: &[f32], node_holds: Option<u64>) -> Chunker {
        match self {
            Outgoing::F32(Some((v, chunker))) if *v == version => chunker.clone(),
            Outgoing::F32(cache) => {
                let size = proto::DEFAULT_CHUNK_BYTES;
                let chunker = Chunker::new(BufferKind::Weights, version, weights, size);
                *cache = Some((version, chunker.clone()));
                chunker
            }
            Outgoing::Bf16(held) => held
                .get_or_insert_with(|| Held::new(version, weights))
                .chunks(version, weights, node_holds),
        }
    }
}

/// What a set of tasks is part of, and the weights it needs.
pub(crate) struct Work<'a> {
    /// For logs: "step 12", "evaluation 3".
    pub phase: &'a str,
    /// The weights' version; a training task's step.
    pub version: u64,
    /// An evaluation's round (unused for training).
    pub round: u64,
    pub weights: &'a [f32],
    /// The parts' numbers as nodes see them, when the tasks are some parts
    /// of a step (run again elsewhere); None: task `i` is part `i`.
    pub parts: Option<&'a [usize]>,
}

impl Work<'_> {
    /// The number task `index` goes by.
    fn part(&self, index: usize) -> usize {
        self.parts.map_or(index, |p| p[index])
    }

    /// The task that goes by `part` (None if there is none).
    fn index(&self, part: usize, n: usize) -> Option<usize> {
        match self.parts {
            Some(p) => p.iter().position(|&q| q == part),
            None => (part < n).then_some(part),
        }
    }
}

/// The connected nodes and the events of the gRPC service.
pub(crate) struct Cluster {
    limits: Limits,
    members: BTreeMap<u64, Member>,
    events: mpsc::Receiver<Event>,
    /// Answers from members that came while waiting for nodes to join,
    /// handled before any new event (at most [`EVENT_QUEUE`]).
    deferred: VecDeque<Event>,
    /// The weights as they go to nodes on gRPC.
    outgoing: Outgoing,
    plane: Option<Arc<SharedPlane>>,
    /// Nodes admitted on the shared-memory plane so far.
    shared_memory_nodes: usize,
    /// How long a node takes to receive the weights, from the first chunk
    /// queued to its `Received` (smoothed; see [`Cluster::receive_wait`]).
    receive_time: Duration,
    /// Samples of the next step to send once this step's weights are out:
    /// (node, step, part, samples).
    ahead: Vec<(u64, u64, usize, Samples)>,
    /// With shard aggregators: tells them who the members are. Nodes then
    /// get their weights from the aggregators, never from here.
    shards: Option<MemberNotice>,
}

/// Parts whose nodes get their weights as chunks, waiting for the node
/// before them to have received its own: one node's weights at a time
/// cross the coordinator's link, so the first nodes compute (and send
/// their gradients on the link's other direction) while later ones still
/// receive, instead of all of them receiving at once and starting together.
#[derive(Default)]
struct Staggered {
    queue: VecDeque<usize>,
    /// The node receiving now, and since when.
    receiving: Option<(u64, Instant)>,
}

impl Cluster {
    pub(crate) fn new(
        limits: Limits,
        events: mpsc::Receiver<Event>,
        plane: Option<Arc<SharedPlane>>,
        shards: Option<MemberNotice>,
    ) -> Self {
        Self {
            shards,
            outgoing: Outgoing::new(limits.wire),
            limits,
            members: BTreeMap::new(),
            events,
            deferred: VecDeque::new(),
            plane,
            shared_memory_nodes: 0,
            receive_time: Duration::from_secs(1),
            ahead: Vec::new(),
        }
    }

    /// Has `parts` ((node, part, samples)) of step `step` sent to those
    /// nodes during the next [`Cluster::run`], once every node there has
    /// its weights, so that they cross the link while the nodes compute.
    /// The step's tasks then go without their samples to the nodes that
    /// have them (tasks built with `ahead`).
    pub(crate) fn queue_ahead(&mut self, step: u64, parts: Vec<(u64, usize, Samples)>) {
        self.ahead = parts
            .into_iter()
            .map(|(node, part, samples)| (node, step, part, samples))
            .collect();
    }

    /// Sends the queued samples ahead (nodes that left are skipped); only
    /// `node`'s if given.
    async fn send_ahead(&mut self, node: Option<u64>) {
        let queued = std::mem::take(&mut self.ahead);
        let (now, later): (Vec<_>, Vec<_>) = queued
            .into_iter()
            .partition(|(n, ..)| node.is_none_or(|only| *n == only));
        self.ahead = later;
        for (node, step, part, samples) in now {
            telemetry::bytes(samples.images.len() + samples.labels.len(), 0);
            let msg = Out::Ahead(SamplesAhead {
                step,
                part: part as u32,
                samples: Some(samples),
            });
            if self.send(node, msg).await {
                if let Some(m) = self.members.get_mut(&node) {
                    m.ahead = Some((step, part));
                }
            }
        }
    }

    /// Whether `node` gets the weights of `version` as chunks (it is on
    /// gRPC and does not hold them yet).
    fn needs_chunks(&self, node: u64, version: u64) -> bool {
        if self.shards.is_some() {
            return false;
        }
        match self.members.get(&node) {
            Some(m) => !(self.plane.is_some() && m.shared.is_some()) && m.held != Some(version),
            None => false,
        }
    }

    /// How long to wait for a node's `Received` before sending the next
    /// node its weights anyway: twice the usual time, at least 20 ms (a
    /// node that never says it received costs each step that much, no more).
    fn receive_wait(&self) -> Duration {
        (2 * self.receive_time).max(Duration::from_millis(20))
    }

    /// Assigns the queued parts, in order, until one of them sends chunks
    /// (whose node then becomes the one receiving).
    async fn send_next(
        &mut self,
        staggered: &mut Staggered,
        (work, tasks): (&Work<'_>, &[Task]),
        owner: &mut [Option<u64>],
        since: &mut [Instant],
    ) {
        staggered.receiving = None;
        while let Some(part) = staggered.queue.pop_front() {
            // A part whose owner left meanwhile is given to another node
            // by `run`'s check of live owners.
            let Some(node) = owner[part].filter(|o| self.members.contains_key(o)) else {
                continue;
            };
            let chunks = self.needs_chunks(node, work.version);
            since[part] = Instant::now();
            if self.assign(node, part, &tasks[part], work).await {
                if chunks {
                    staggered.receiving = Some((node, Instant::now()));
                    return;
                }
            } else {
                owner[part] = None;
                self.remove(node, "its stream is closed");
            }
        }
        self.send_ahead(None).await;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// The shared-memory plane, if any member reads its weights from it.
    pub(crate) fn local_plane(&self) -> Option<&SharedPlane> {
        let local = self.members.values().any(|m| m.shared.is_some());
        self.plane.as_deref().filter(|_| local)
    }

    /// Nodes admitted on the shared-memory plane so far.
    pub(crate) fn shared_memory_nodes(&self) -> usize {
        self.shared_memory_nodes
    }

    fn admit(
        &mut self,
        node: u64,
        outbox: Outbox,
        info: NodeInfo,
        shared: Option<Arc<Segment>>,
        secret: [u8; 16],
    ) {
        if let Some(notice) = &self.shards {
            notice.send(node, &secret, true);
        }
        let shared = shared.filter(|_| self.plane.is_some());
        self.shared_memory_nodes += usize::from(shared.is_some());
        info!(
            node,
            host = %info.hostname,
            device = %info.device,
            threads = info.threads,
            data = if shared.is_some() { "shared memory" } else { "grpc" },
            "node joined ({} connected)",
            self.members.len() + 1
        );
        telemetry::node_info(node, &info.device, &info.hostname, true);
        let member = Member {
            outbox,
            info,
            held: None,
            speed: None,
            shared,
            huge: 0,
            ahead: None,
        };
        self.members.insert(node, member);
        telemetry::membership(self.members.len(), true);
    }

    /// Forgets a node (it left, or is being evicted).
    fn remove(&mut self, node: u64, reason: &str) {
        if let Some(m) = self.members.remove(&node) {
            if let Some(notice) = &self.shards {
                notice.send(node, &[], false);
            }
            warn!(node, host = %m.info.hostname, "node removed: {reason} ({} connected)", self.members.len());
            telemetry::node_info(node, &m.info.device, &m.info.hostname, false);
            telemetry::membership(self.members.len(), false);
        }
    }

    /// Removes a misbehaving node and tells it why and not to come back.
    pub(crate) fn evict(&mut self, node: u64, reason: &str) {
        if let Some(m) = self.members.get(&node) {
            let finish = Finish {
                reason: format!("evicted: {reason}"),
                evicted: true,
            };
            let _ = m.outbox.try_send(Ok(CoordinatorMessage {
                kind: Some(Out::Finish(finish)),
            }));
        }
        self.remove(node, reason);
    }

    /// An answer nobody asked for: from a member it is a broken or lying
    /// node (evicted at once); from a node already removed, whose part went
    /// to another node, it is a late answer and is ignored.
    fn unexpected(&mut self, node: u64, reason: &str) {
        if self.members.contains_key(&node) {
            warn!(node, "{reason}");
            self.evict(node, reason);
        } else {
            debug!(node, "ignoring an answer from a removed node: {reason}");
        }
    }

    /// Applies a membership event; hands back any other.
    fn membership(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Joined {
                node,
                outbox,
                info,
                shared,
                secret,
            } => self.admit(node, outbox, info, shared, secret),
            Event::Left { node, reason } => self.remove(node, &reason),
            Event::Invalid { node, reason } => self.evict(node, &reason),
            other => return Some(other),
        }
        None
    }

    /// The next event from the service; None once `deadline` has passed.
    async fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Event>> {
        let event = match deadline {
            Some(at) => match tokio::time::timeout_at(at, self.events.recv()).await {
                Ok(e) => e,
                Err(_) => return Ok(None),
            },
            None => self.events.recv().await,
        };
        event.map(Some).ok_or(CoordinatorError::Cancelled)
    }

    /// Keeps a member's answer that came while waiting for nodes, for the
    /// step it belongs to. Answers of nodes that are gone are late ones and
    /// are dropped; a member that sends more than the queue holds is
    /// flooding and is evicted.
    fn defer(&mut self, event: Event) {
        let node = event.node();
        if !self.members.contains_key(&node) {
            debug!(node, "ignoring an answer from a removed node");
        } else if self.deferred.len() >= EVENT_QUEUE {
            self.evict(node, "sent answers for work it was not given");
        } else {
            self.deferred.push_back(event);
        }
    }

    /// Waits until at least `wanted` nodes (set by `flag`) are connected,
    /// for at most `timeout` (None: forever). Answers from members that
    /// come meanwhile are kept for [`Cluster::run`].
    pub(crate) async fn wait_for(
        &mut self,
        wanted: usize,
        timeout: Option<Duration>,
        flag: &'static str,
    ) -> Result<()> {
        if self.members.len() >= wanted {
            return Ok(());
        }
        info!(
            "waiting for {wanted} node(s) ({} connected)",
            self.members.len()
        );
        let deadline = timeout.map(|t| Instant::now() + t);
        while self.members.len() < wanted {
            let Some(event) = self.recv(deadline).await? else {
                return Err(CoordinatorError::NotEnoughNodes {
                    joined: self.members.len(),
                    wanted,
                    timeout: timeout.unwrap_or_default(),
                    flag,
                });
            };
            if let Some(answer) = self.membership(event) {
                self.defer(answer);
            }
        }
        Ok(())
    }

    /// Waits (up to `--rejoin-timeout`) until at least `--min-nodes` are
    /// connected, if fewer are.
    pub(crate) async fn ensure_min(&mut self, phase: &str) -> Result<()> {
        let min = self.limits.min_nodes.max(1);
        if self.members.len() >= min {
            return Ok(());
        }
        warn!(
            "{phase}: {} node(s) left, fewer than --min-nodes {min}; waiting up to {:?} for more",
            self.members.len(),
            self.limits.rejoin_timeout
        );
        self.wait_for(min, Some(self.limits.rejoin_timeout), "--min-nodes")
            .await
    }

    /// Splits `total` samples over the connected nodes (in id order): equal
    /// shares, or shares proportional to measured speed with `--balance`
    /// (a node not measured yet counts as the mean of the others).
    /// Returns `(node, count)` with count > 0.
    pub(crate) fn shares(&self, total: usize) -> Vec<(u64, usize)> {
        let nodes: Vec<u64> = self.members.keys().copied().collect();
        let weights: Vec<f64> = if self.limits.balance {
            let known: Vec<f64> = self.members.values().filter_map(|m| m.speed).collect();
            let fallback = if known.is_empty() {
                1.0
            } else {
                known.iter().sum::<f64>() / known.len() as f64
            };
            self.members
                .values()
                .map(|m| m.speed.unwrap_or(fallback))
                .collect()
        } else {
            vec![1.0; nodes.len()]
        };
        // With --balance every node keeps at least one sample per step (when
        // there are enough), so the speed of a slow node is still measured
        // and it can win its share back.
        let floor = usize::from(self.limits.balance && total >= nodes.len());
        data::split_counts(total - floor * nodes.len(), &weights)
            .into_iter()
            .map(|c| c + floor)
            .zip(nodes)
            .filter(|(c, _)| *c > 0)
            .map(|(c, n)| (n, c))
            .collect()
    }

    /// Queues a message for a node. False if the node is gone, or did not
    /// take its messages within `--step-timeout` (then it is evicted: a node
    /// that stops reading must not hold up the step).
    async fn send(&mut self, node: u64, kind: Out) -> bool {
        let Some(member) = self.members.get(&node) else {
            return false;
        };
        let msg = Ok(CoordinatorMessage { kind: Some(kind) });
        let timeout = self.limits.step_timeout;
        match tokio::time::timeout(timeout, member.outbox.send(msg)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                let reason = format!("did not take its messages within {timeout:?}");
                self.evict(node, &reason);
                false
            }
        }
    }

    /// Makes the work's weights available to the node (in the shared
    /// segment for a node on this host, else as chunks, encoded once per
    /// version) and sends it the task. False if the node is gone.
    async fn assign(&mut self, node: u64, part: usize, task: &Task, work: &Work<'_>) -> bool {
        let shared = match (&self.plane, self.members.get(&node)) {
            (Some(plane), Some(m)) if m.shared.is_some() => {
                match plane.publish(work.version, work.weights) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(node, "cannot publish the weights in shared memory: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        let holds = self.members.get(&node).and_then(|m| m.held);
        if !shared && self.shards.is_none() && holds != Some(work.version) {
            let chunker = self.outgoing.chunks(work.version, work.weights, holds);
            telemetry::bytes(chunker.byte_len(), 0);
            for chunk in chunker.chunks() {
                if !self.send(node, Out::Chunk(chunk)).await {
                    return false;
                }
            }
            if let Some(m) = self.members.get_mut(&node) {
                m.held = Some(work.version);
            }
        }
        let part = work.part(part);
        // Samples the node got ahead are not sent again.
        let member_ahead = self.members.get_mut(&node).and_then(|m| m.ahead.take());
        let ahead = matches!(task, Task::Train { ahead: true, .. })
            && member_ahead == Some((work.version, part));
        let samples = (!ahead).then(|| task.samples().clone());
        if let Some(s) = &samples {
            telemetry::bytes(s.images.len() + s.labels.len(), 0);
        }
        let msg = match task {
            Task::Train { seed, .. } => Out::Train(TrainTask {
                step: work.version,
                version: work.version,
                samples,
                seed: *seed,
                part: part as u32,
                shared_memory: shared,
                samples_ahead: ahead,
            }),
            Task::Eval { .. } => Out::Eval(EvalTask {
                round: work.round,
                version: work.version,
                part: part as u64,
                samples,
                shared_memory: shared,
            }),
        };
        self.send(node, msg).await
    }

    /// Waits until one of `nodes` is no longer a member (it left or broke
    /// the protocol) and returns it; admits nodes that join meanwhile and
    /// keeps answers for later, as [`Cluster::wait_for`] does. Cancel-safe.
    pub(crate) async fn departure(&mut self, nodes: &[u64]) -> Result<u64> {
        loop {
            if let Some(&gone) = nodes.iter().find(|n| !self.members.contains_key(n)) {
                return Ok(gone);
            }
            if let Some(event) = self.recv(None).await? {
                if let Some(answer) = self.membership(event) {
                    self.defer(answer);
                }
            }
        }
    }

    /// The connected nodes, in id order.
    pub(crate) fn members(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// The live node with the least outstanding work (lowest id on ties).
    fn least_loaded(&self, owner: &[Option<u64>], done: &[bool]) -> Option<u64> {
        self.members.keys().copied().min_by_key(|n| {
            owner
                .iter()
                .zip(done)
                .filter(|(o, d)| **o == Some(*n) && !**d)
                .count()
        })
    }

    /// Runs `tasks` (first given to `initial[i]`) until every one has an
    /// answer, moving the tasks of lost, slow or misbehaving nodes to others.
    /// Answers come back in task order, each with the node that computed it.
    /// Also returns when the first round of sending was done.
    pub(crate) async fn run(
        &mut self,
        work: &Work<'_>,
        tasks: &[Task],
        initial: &[u64],
    ) -> Result<(Vec<(u64, Answer)>, Instant)> {
        let phase = work.phase;
        let timeout = self.limits.step_timeout;
        let training = tasks.first().is_some_and(Task::is_train);
        let n = tasks.len();
        let mut owner: Vec<Option<u64>> = vec![None; n];
        let mut since: Vec<Instant> = vec![Instant::now(); n];
        let mut answers: Vec<Option<(u64, Answer)>> = (0..n).map(|_| None).collect();
        let mut done = vec![false; n];
        let mut staggered = Staggered::default();
        for (part, task) in tasks.iter().enumerate() {
            let node = initial[part];
            let chunks = self.needs_chunks(node, work.version);
            if chunks && staggered.receiving.is_some() {
                owner[part] = Some(node);
                staggered.queue.push_back(part);
                continue;
            }
            if self.assign(node, part, task, work).await {
                owner[part] = Some(node);
                since[part] = Instant::now();
                if chunks {
                    staggered.receiving = Some((node, Instant::now()));
                }
            } else {
                self.remove(node, "its stream is closed");
            }
        }
        // With shard aggregators, each node's samples go once it says it
        // has its weights (they would share its link with them).
        if staggered.receiving.is_none() && self.shards.is_none() {
            self.send_ahead(None).await;
        }
        let sent = Instant::now();
        while done.iter().any(|d| !d) {
            // The node receiving left: on to the next one.
            if staggered
                .receiving
                .is_some_and(|(node, _)| !self.members.contains_key(&node))
            {
                self.send_next(&mut staggered, (work, tasks), &mut owner, &mut since)
                    .await;
            }
            // Every open part must have a live owner.
            for part in 0..n {
                let alive = owner[part].is_some_and(|o| self.members.contains_key(&o));
                if done[part] || alive {
                    continue;
                }
                self.ensure_min(phase).await?;
                let Some(node) = self.least_loaded(&owner, &done) else {
                    continue;
                };
                info!(part, node, "{phase}: giving part {part} to node {node}");
                telemetry::reassigned();
                // A part still waiting for its turn goes now, and only now.
                staggered.queue.retain(|&p| p != part);
                if self.assign(node, part, &tasks[part], work).await {
                    owner[part] = Some(node);
                    since[part] = Instant::now();
                } else {
                    self.remove(node, "its stream is closed");
                }
            }
            let open: Vec<usize> = (0..n).filter(|&p| !done[p] && owner[p].is_some()).collect();
            let Some(oldest) = open.iter().map(|&p| since[p]).min() else {
                continue;
            };
            let next_send = staggered
                .receiving
                .map(|(_, started)| started + self.receive_wait());
            let deadline = next_send.map_or(oldest + timeout, |at| at.min(oldest + timeout));
            let event = match self.deferred.pop_front() {
                Some(e) => Some(e),
                None => self.recv(Some(deadline)).await?,
            };
            let event = match event {
                Some(Event::Received { node, version }) => {
                    if self.shards.is_some() && version == work.version {
                        self.send_ahead(Some(node)).await;
                    }
                    if let Some((receiving, started)) = staggered.receiving {
                        if receiving == node && version == work.version {
                            // Smoothed, so one slow transfer does not make
                            // the next wait long.
                            self.receive_time = (3 * self.receive_time + started.elapsed()) / 4;
                            self.send_next(&mut staggered, (work, tasks), &mut owner, &mut since)
                                .await;
                        }
                    }
                    continue;
                }
                Some(e) => e,
                None if next_send.is_some_and(|at| Instant::now() >= at) => {
                    let node = staggered.receiving.map(|(n, _)| n);
                    debug!(
                        ?node,
                        "{phase}: no Received in time; sending the next node its weights"
                    );
                    self.send_next(&mut staggered, (work, tasks), &mut owner, &mut since)
                        .await;
                    continue;
                }
                None => {
                    let late: Vec<u64> = open
                        .iter()
                        .filter(|&&p| since[p].elapsed() >= timeout)
                        .filter_map(|&p| owner[p])
                        .collect();
                    for node in late {
                        let reason = format!(
                            "no answer to {phase} within {timeout:?} (raise --step-timeout if the nodes are just slow)"
                        );
                        self.evict(node, &reason);
                    }
                    continue;
                }
            };
            let (node, part, answer) = match self.membership(event) {
                None => continue,
                Some(Event::Train {
                    node,
                    result,
                    gradients,
                    state,
                }) => {
                    if result.step != work.version || !training {
                        let reason = format!(
                            "sent a training result for step {} during {phase}",
                            result.step
                        );
                        self.unexpected(node, &reason);
                        continue;
                    }
                    let part = work.index(result.part as usize, n).unwrap_or(n);
                    let answer = Answer::Train {
                        result,
                        gradients,
                        state,
                        norm: f64::NAN,
                    };
                    (node, part, answer)
                }
                Some(Event::Eval { node, result }) => {
                    if result.round != work.round || training {
                        let reason = format!(
                            "sent an evaluation result for round {} during {phase}",
                            result.round
                        );
                        self.unexpected(node, &reason);
                        continue;
                    }
                    let part = work.index(result.part as usize, n).unwrap_or(n);
                    (node, part, Answer::Eval(result))
                }
                Some(_) => continue,
            };
            if part >= n || done[part] || owner[part] != Some(node) {
                let reason = format!("answered part {part} of {phase}, which it was not given");
                self.unexpected(node, &reason);
                continue;
            }
            if let Some(answer) = self.accept(phase, node, part, &tasks[part], answer) {
                answers[part] = Some((node, answer));
                done[part] = true;
            }
        }
        // Samples not sent ahead go with their tasks.
        self.ahead.clear();
        Ok((answers.into_iter().flatten().collect(), sent))
    }

    /// Checks an answer from the node that owns its part: evicts the node
    /// and returns None if it cannot be used.
    fn accept(
        &mut self,
        phase: &str,
        node: u64,
        part: usize,
        task: &Task,
        mut answer: Answer,
    ) -> Option<Answer> {
        let norm = match check(task, &answer) {
            Ok(norm) => norm,
            Err(reason) => {
                warn!(node, part, "{phase}: {reason}");
                self.evict(node, &reason);
                return None;
            }
        };
        if !matches!(
            answer,
            Answer::Train {
                gradients: crate::task::Gradients::Sharded,
                ..
            }
        ) {
            self.note_norm(phase, node, norm);
        }
        let m = self.members.get_mut(&node)?;
        if let Answer::Train {
            result, norm: n, ..
        } = &mut answer
        {
            *n = norm;
            if result.compute_seconds > 0.0 {
                let speed = result.samples as f64 / result.compute_seconds;
                m.speed = Some(m.speed.map_or(speed, |s| 0.8 * s + 0.2 * speed));
            }
        }
        Some(answer)
    }

    /// Counts a node's gradient norm: a finite but huge gradient makes its
    /// step skipped; a node that keeps sending them is broken and evicted
    /// (its last answer still counts). With shard aggregators the norm is
    /// known only once the slices are in.
    pub(crate) fn note_norm(&mut self, phase: &str, node: u64, norm: f64) {
        let Some(m) = self.members.get_mut(&node) else {
            return;
        };
        m.huge = if norm > GRADIENT_NORM_LIMIT {
            m.huge + 1
        } else {
            0
        };
        if m.huge >= HUGE_STREAK {
            let reason = format!(
                "{HUGE_STREAK} gradients in a row with a norm beyond {GRADIENT_NORM_LIMIT:e} (last {norm:e})"
            );
            warn!(node, "{phase}: {reason}");
            self.evict(node, &reason);
        }
    }

    /// Sends Finish to every member and forgets them.
    pub(crate) async fn dismiss(&mut self, reason: &str) {
        for (node, m) in std::mem::take(&mut self.members) {
            let msg = CoordinatorMessage {
                kind: Some(Out::Finish(Finish {
                    reason: reason.to_string(),
                    evicted: false,
                })),
            };
            if tokio::time::timeout(Duration::from_secs(2), m.outbox.send(Ok(msg)))
                .await
                .is_err()
            {
                debug!(node, "could not tell the node to finish");
            }
        }
    }
}

#[cfg(test)]
mod tests;
