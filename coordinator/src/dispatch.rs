//! Handing the parts of a step (or of an evaluation) to nodes and collecting
//! the answers, surviving the loss of nodes: a part whose node dies, times out
//! or answers with garbage is given to another live node, with the same
//! samples and the same dropout seed, so the step's result does not depend on
//! who computed which part.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use proto::v1::coordinator_message::Kind as Out;
use proto::v1::{
    BufferKind, CoordinatorMessage, EvalResult, EvalTask, Finish, Samples, TrainResult, TrainTask,
};
use proto::Chunker;
use tracing::{debug, info, warn};

use proto::shm::Segment;
use std::sync::Arc;

use crate::optimizer::GRADIENT_NORM_LIMIT;
use crate::service::{Event, NodeInfo, Outbox};
use crate::telemetry;
use crate::trainer::Trainer;
use crate::CoordinatorError;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// A connected node.
pub(crate) struct Member {
    pub outbox: Outbox,
    pub info: NodeInfo,
    /// Weights version this node holds.
    pub held: Option<u64>,
    /// Measured speed (samples per compute second), smoothed.
    pub speed: Option<f64>,
    /// Its gradients segment, when it is on this host and uses the
    /// shared-memory plane (weights then come from the shared segment too).
    pub shared: Option<Arc<Segment>>,
    /// Its latest answers in a row with a gradient beyond the norm limit.
    pub huge: u32,
}

/// One part of a step or of an evaluation.
pub(crate) enum Task {
    /// Gradients for these training samples, with this dropout seed.
    Train { indices: Vec<u32>, seed: u64 },
    /// Loss and accuracy on this range of the test set.
    Eval { range: Range<usize> },
}

impl Task {
    fn samples(&self) -> u32 {
        match self {
            Task::Train { indices, .. } => indices.len() as u32,
            Task::Eval { range } => range.len() as u32,
        }
    }
}

/// A node's answer to one task.
pub(crate) enum Answer {
    Train {
        result: TrainResult,
        gradients: Gradients,
        state: Vec<f32>,
        /// The gradient's norm, once checked.
        norm: f64,
    },
    Eval(EvalResult),
}

/// Where a node's gradients are.
pub(crate) enum Gradients {
    /// Received as chunks.
    Owned(Vec<f32>),
    /// In the node's shared-memory segment, as `version` (read in place by
    /// the averaging, and checked again after it).
    Shared { slot: Arc<Segment>, version: u64 },
}

impl Gradients {
    /// The Euclidean norm (not finite if any value is not, or if shared
    /// values changed while they were read).
    fn norm(&self) -> f64 {
        let norm = |v: &[f32]| crate::aggregate::sum_of_squares(v).sqrt();
        match self {
            Gradients::Owned(v) => norm(v),
            Gradients::Shared { slot, version } => match slot.view(*version) {
                Ok(view) => {
                    let n = norm(view.values());
                    if view.finish().is_ok() {
                        n
                    } else {
                        f64::NAN
                    }
                }
                Err(_) => f64::NAN,
            },
        }
    }
}

/// Answers in a row whose gradient norm is beyond [`GRADIENT_NORM_LIMIT`]
/// after which a node is evicted (each of those steps is skipped).
const HUGE_STREAK: u32 = 3;

impl Trainer {
    pub(crate) fn admit(
        &mut self,
        node: u64,
        outbox: Outbox,
        info: NodeInfo,
        shared: Option<Arc<Segment>>,
    ) {
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
        };
        self.members.insert(node, member);
        telemetry::membership(self.members.len(), true);
    }

    /// Forgets a node (it left, or is being evicted).
    pub(crate) fn remove(&mut self, node: u64, reason: &str) {
        if let Some(m) = self.members.remove(&node) {
            warn!(node, host = %m.info.hostname, "node removed: {reason} ({} connected)", self.members.len());
            telemetry::node_info(node, &m.info.device, &m.info.hostname, false);
            telemetry::membership(self.members.len(), false);
        }
    }

    /// Removes a misbehaving node and tells it not to come back.
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

    /// Waits until at least `wanted` nodes are connected, for at most `timeout`
    /// (None: forever).
    pub(crate) async fn wait_for_members(
        &mut self,
        wanted: usize,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if self.members.len() >= wanted {
            return Ok(());
        }
        info!(
            "waiting for {wanted} node(s) ({} connected)",
            self.members.len()
        );
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        while self.members.len() < wanted {
            let event = match deadline {
                Some(at) => match tokio::time::timeout_at(at, self.events.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        return Err(CoordinatorError::NotEnoughNodes {
                            joined: self.members.len(),
                            wanted,
                            timeout: timeout.unwrap_or_default(),
                        })
                    }
                },
                None => self.events.recv().await,
            };
            match event {
                Some(Event::Joined {
                    node,
                    outbox,
                    info,
                    shared,
                }) => self.admit(node, outbox, info, shared),
                Some(Event::Left { node, reason }) | Some(Event::Invalid { node, reason }) => {
                    self.remove(node, &reason)
                }
                Some(_) => {}
                None => return Err(CoordinatorError::Cancelled),
            }
        }
        Ok(())
    }

    /// Splits `total` samples over the connected nodes (in id order): equal
    /// shares, or shares proportional to measured speed with `--balance`
    /// (a node not measured yet counts as the mean of the others).
    /// Returns `(node, count)` with count > 0.
    pub(crate) fn shares(&self, total: usize) -> Vec<(u64, usize)> {
        let nodes: Vec<u64> = self.members.keys().copied().collect();
        let weights: Vec<f64> = if self.config.balance {
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
        let floor = usize::from(self.config.balance && total >= nodes.len());
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
        match tokio::time::timeout(self.config.step_timeout, member.outbox.send(msg)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                let reason = format!(
                    "did not take its messages within {:?}",
                    self.config.step_timeout
                );
                self.evict(node, &reason);
                false
            }
        }
    }

    /// Makes the current weights available to the node (in the shared
    /// segment for a node on this host, else as chunks, encoded at most once
    /// per step into `chunks`) and sends it the task. False if the node is
    /// gone.
    async fn assign(
        &mut self,
        node: u64,
        part: usize,
        task: &Task,
        chunks: &mut Option<Chunker>,
        round: u64,
    ) -> bool {
        let shared = match (&self.plane, self.members.get(&node)) {
            (Some(plane), Some(m)) if m.shared.is_some() => {
                match plane.publish(self.step, &self.weights) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(node, "cannot publish the weights in shared memory: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        if !shared && self.members.get(&node).and_then(|m| m.held) != Some(self.step) {
            let chunker = chunks.get_or_insert_with(|| {
                Chunker::new(
                    BufferKind::Weights,
                    self.step,
                    &self.weights,
                    proto::DEFAULT_CHUNK_BYTES,
                )
            });
            telemetry::bytes(chunker.byte_len(), 0);
            let all: Vec<_> = chunker.chunks().collect();
            for chunk in all {
                if !self.send(node, Out::Chunk(chunk)).await {
                    return false;
                }
            }
            if let Some(m) = self.members.get_mut(&node) {
                m.held = Some(self.step);
            }
        }
        let msg = match task {
            Task::Train { indices, seed } => {
                let (images, labels) = self.train.gather(indices);
                telemetry::bytes(images.len() + labels.len(), 0);
                Out::Train(TrainTask {
                    step: self.step,
                    version: self.step,
                    samples: Some(Samples {
                        count: indices.len() as u32,
                        images: images.into(),
                        labels: labels.into(),
                    }),
                    seed: *seed,
                    part: part as u32,
                    shared_memory: shared,
                })
            }
            Task::Eval { range } => {
                let (images, labels) = self.test.slice(range.clone());
                telemetry::bytes(images.len() + labels.len(), 0);
                Out::Eval(EvalTask {
                    round,
                    version: self.step,
                    part: part as u64,
                    samples: Some(Samples {
                        count: range.len() as u32,
                        images: images.into(),
                        labels: labels.into(),
                    }),
                    shared_memory: shared,
                })
            }
        };
        self.send(node, msg).await
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
    pub(crate) async fn dispatch(
        &mut self,
        phase: &str,
        round: u64,
        tasks: &[Task],
        initial: &[u64],
    ) -> Result<(Vec<(u64, Answer)>, Instant)> {
        let mut weights: Option<Chunker> = None;
        let n = tasks.len();
        let mut owner: Vec<Option<u64>> = vec![None; n];
        let mut since: Vec<Instant> = vec![Instant::now(); n];
        let mut answers: Vec<Option<(u64, Answer)>> = (0..n).map(|_| None).collect();
        let mut done = vec![false; n];
        for (part, task) in tasks.iter().enumerate() {
            let node = initial[part];
            if self.assign(node, part, task, &mut weights, round).await {
                owner[part] = Some(node);
                since[part] = Instant::now();
            } else {
                self.remove(node, "its stream is closed");
            }
        }
        let sent = Instant::now();
        while done.iter().any(|d| !d) {
            // Every open part must have a live owner.
            for part in 0..n {
                let alive = owner[part].is_some_and(|o| self.members.contains_key(&o));
                if done[part] || alive {
                    continue;
                }
                if self.members.len() < self.config.min_nodes.max(1) {
                    warn!(
                        "{phase}: {} node(s) left, fewer than --min-nodes {}; waiting up to {:?} for more",
                        self.members.len(),
                        self.config.min_nodes.max(1),
                        self.config.rejoin_timeout
                    );
                    self.wait_for_members(
                        self.config.min_nodes.max(1),
                        Some(self.config.rejoin_timeout),
                    )
                    .await?;
                }
                let Some(node) = self.least_loaded(&owner, &done) else {
                    continue;
                };
                info!(part, node, "{phase}: giving part {part} to node {node}");
                telemetry::reassigned();
                if self
                    .assign(node, part, &tasks[part], &mut weights, round)
                    .await
                {
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
            let deadline = tokio::time::Instant::from_std(oldest + self.config.step_timeout);
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => return Err(CoordinatorError::Cancelled),
                Err(_) => {
                    let late: Vec<u64> = open
                        .iter()
                        .filter(|&&p| since[p].elapsed() >= self.config.step_timeout)
                        .filter_map(|&p| owner[p])
                        .collect();
                    for node in late {
                        let reason =
                            format!("no answer to {phase} within {:?}", self.config.step_timeout);
                        self.evict(node, &reason);
                    }
                    continue;
                }
            };
            let (node, part, answer) = match event {
                Event::Joined {
                    node,
                    outbox,
                    info,
                    shared,
                } => {
                    self.admit(node, outbox, info, shared);
                    continue;
                }
                Event::Left { node, reason } => {
                    self.remove(node, &reason);
                    continue;
                }
                Event::Invalid { node, reason } => {
                    self.evict(node, &reason);
                    continue;
                }
                Event::Train {
                    node,
                    result,
                    gradients,
                    state,
                } => {
                    if result.step != self.step
                        || !matches!(tasks.first(), Some(Task::Train { .. }))
                    {
                        let reason = format!(
                            "sent a training result for step {} during {phase}",
                            result.step
                        );
                        self.unexpected(node, &reason);
                        continue;
                    }
                    (
                        node,
                        result.part as usize,
                        Answer::Train {
                            result,
                            gradients,
                            state,
                            norm: f64::NAN,
                        },
                    )
                }
                Event::Eval { node, result } => {
                    if result.round != round || !matches!(tasks.first(), Some(Task::Eval { .. })) {
                        let reason = format!(
                            "sent an evaluation result for round {} during {phase}",
                            result.round
                        );
                        self.unexpected(node, &reason);
                        continue;
                    }
                    (node, result.part as usize, Answer::Eval(result))
                }
            };
            if part >= n || done[part] || owner[part] != Some(node) {
                let reason = format!("answered part {part} of {phase}, which it was not given");
                self.unexpected(node, &reason);
                continue;
            }
            let norm = match check(&tasks[part], &answer) {
                Ok(norm) => norm,
                Err(reason) => {
                    warn!(node, part, "{phase}: {reason}");
                    self.evict(node, &reason);
                    continue;
                }
            };
            // A finite but huge gradient: its step will be skipped; a node
            // that keeps sending them is broken.
            let huge = norm > GRADIENT_NORM_LIMIT;
            if let Some(m) = self.members.get_mut(&node) {
                m.huge = if huge { m.huge + 1 } else { 0 };
                if m.huge >= HUGE_STREAK {
                    let reason = format!(
                        "{HUGE_STREAK} gradients in a row with a norm beyond {GRADIENT_NORM_LIMIT:e} (last {norm:e})"
                    );
                    warn!(node, "{phase}: {reason}");
                    self.evict(node, &reason);
                }
            }
            if let Answer::Train { result, .. } = &answer {
                if result.compute_seconds > 0.0 {
                    let speed = result.samples as f64 / result.compute_seconds;
                    if let Some(m) = self.members.get_mut(&node) {
                        m.speed = Some(m.speed.map_or(speed, |s| 0.8 * s + 0.2 * speed));
                    }
                }
            }
            let mut answer = answer;
            if let Answer::Train { norm: n, .. } = &mut answer {
                *n = norm;
            }
            answers[part] = Some((node, answer));
            done[part] = true;
        }
        Ok((answers.into_iter().flatten().collect(), sent))
    }
}

/// Whether an answer is usable for its task; returns its gradient's norm
/// (0 for an evaluation).
fn check(task: &Task, answer: &Answer) -> std::result::Result<f64, String> {
    let (samples, correct, loss, seconds, norm) = match answer {
        Answer::Train {
            result,
            gradients,
            state,
            ..
        } => {
            let norm = gradients.norm();
            if !state.iter().all(|v| v.is_finite()) || !norm.is_finite() {
                return Err("non-finite gradient or state".into());
            }
            let r = result;
            (r.samples, r.correct, r.loss_sum, r.compute_seconds, norm)
        }
        Answer::Eval(r) => (r.samples, r.correct, r.loss_sum, r.compute_seconds, 0.0),
    };
    if samples != task.samples() {
        return Err(format!(
            "answered for {samples} samples, was given {}",
            task.samples()
        ));
    }
    if correct > samples {
        return Err(format!("claims {correct} correct of {samples} samples"));
    }
    // A sum of cross-entropies is never negative.
    if !loss.is_finite() || loss < 0.0 {
        return Err(format!("impossible loss sum {loss}"));
    }
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("impossible compute time {seconds} s"));
    }
    Ok(norm)
}

/// Sends Finish to every member and forgets them.
pub(crate) async fn dismiss(members: BTreeMap<u64, Member>, reason: &str) {
    for (node, m) in members {
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
