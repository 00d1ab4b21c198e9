//! The one task that owns an aggregator's state and handles its events.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::counter;
use proto::v1::aggregator_message::Kind as Report;
use proto::v1::control_message::Kind as Control;
use proto::v1::{
    AggregatorMessage, BufferKind, Chunk, ControlMessage, NodeCutOff, NodeError as WireError,
    ShardSetup, StepReady,
};
use proto::{Buffer, ChunkReceiver, Chunker, Wire};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::aggregate::L2Range;
use crate::optimizer::new_optimizer;
use crate::OptimizerKind;

use super::members::Members;
use super::slice::Slice;
use super::Event;

/// Where the versions of the slice go to one node's exchange (an error ends
/// it, saying why).
pub(super) type Versions = mpsc::Sender<Result<Arc<Vec<Chunk>>, Status>>;

/// One node's open exchange. Dropping it ends the exchange both ways.
struct NodeLink {
    conn: u64,
    versions: Versions,
    /// The task reading the node's uploads.
    reader: tokio::task::AbortHandle,
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A setup whose chunks are still arriving.
struct Pending {
    setup: ShardSetup,
    chunks: ChunkReceiver,
    weights: Option<Vec<f32>>,
}

/// Owns everything; handles one event at a time.
pub(super) struct Actor {
    members: Arc<Members>,
    control: Option<mpsc::Sender<Result<AggregatorMessage, Status>>>,
    /// Each node's exchange (one per node: a newer one replaces it).
    nodes: HashMap<u64, NodeLink>,
    pending: Option<Pending>,
    slice: Option<Slice>,
    /// Nodes cut off while handling the current event, for the coordinator.
    cut: Vec<NodeCutOff>,
}

impl Actor {
    pub(super) fn new(members: Arc<Members>) -> Self {
        Self {
            members,
            control: None,
            nodes: HashMap::new(),
            pending: None,
            slice: None,
            cut: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        while let Some(event) = events.recv().await {
            let handled = self.handle(event).await;
            for c in std::mem::take(&mut self.cut) {
                self.report(Report::CutOff(c)).await;
            }
            if let Err(e) = handled {
                warn!("control: {e}; dropping the coordinator's stream");
                self.report(Report::Error(WireError {
                    step: self.slice.as_ref().map_or(0, |s| s.version),
                    message: e,
                }))
                .await;
                self.reset();
            }
        }
    }

    /// Forgets the coordinator and everything it set up.
    fn reset(&mut self) {
        self.control = None;
        self.nodes.clear();
        self.pending = None;
        self.slice = None;
        self.members.reset(0);
    }

    async fn report(&mut self, kind: Report) {
        if let Some(c) = &self.control {
            let msg = AggregatorMessage { kind: Some(kind) };
            if c.send(Ok(msg)).await.is_err() {
                self.control = None;
            }
        }
    }

    /// Queues the current version to `node` (whole, or as the change from
    /// the version before when `follows`: it got that one); a node that
    /// does not keep up is cut off.
    fn offer(&mut self, node: u64, follows: bool) {
        let (Some(slice), Some(link)) = (&self.slice, self.nodes.get(&node)) else {
            return;
        };
        let chunks = match (&slice.delta, follows) {
            (Some(delta), true) => delta.clone(),
            _ => slice.current.clone(),
        };
        if link.versions.try_send(Ok(chunks)).is_err() {
            self.cut_off(node, "does not take its weight slices");
        }
    }

    /// Ends a node's exchange, telling it why (its reader stops too), and
    /// tells the coordinator once this event is handled.
    fn cut_off(&mut self, node: u64, why: &str) {
        warn!(node, "{why}; cutting it off");
        counter!("gradcast_aggregator_refused_total").increment(1);
        if let Some(link) = self.nodes.remove(&node) {
            let _ = link
                .versions
                .try_send(Err(Status::resource_exhausted(why.to_string())));
        }
        self.cut.push(NodeCutOff {
            node_id: node,
            reason: why.to_string(),
        });
    }

    /// Queues the current version to every node; `follows`: each got the
    /// version before.
    fn broadcast(&mut self, follows: bool) {
        let nodes: Vec<u64> = self.nodes.keys().copied().collect();
        for node in nodes {
            self.offer(node, follows);
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::ControlOpened(tx) => {
                self.reset();
                self.control = Some(tx);
                info!("a coordinator connected");
            }
            Event::ControlClosed(reason) => {
                info!("the coordinator left ({reason}); waiting for the next");
                self.reset();
            }
            Event::Control(m) => self.control(m).await?,
            Event::NodeOpened {
                node,
                conn,
                versions,
                reader,
            } => {
                let link = NodeLink {
                    conn,
                    versions,
                    reader,
                };
                if self.members.contains(node) {
                    // A newer exchange of the same node replaces the older
                    // one (whose reader stops).
                    self.nodes.insert(node, link);
                    self.offer(node, false);
                }
            }
            Event::NodeClosed { node, conn } => {
                if self.nodes.get(&node).is_some_and(|l| l.conn == conn) {
                    self.nodes.remove(&node);
                }
            }
            Event::Upload { node, buffer } => {
                let ready = self.upload(node, buffer);
                if let Some(r) = ready {
                    self.report(Report::Ready(r)).await;
                }
            }
        }
        Ok(())
    }

    /// Takes a node's slice of its answer to one part of the current step.
    fn upload(&mut self, node: u64, buffer: Buffer) -> Option<StepReady> {
        if !self.members.contains(node) {
            return None;
        }
        let slice = self.slice.as_mut()?;
        // Every buffer counts, whatever its step: two (gradients, state) per
        // part, each part at most twice (sent again under a new plan).
        let parts = slice
            .plan
            .as_ref()
            .map_or(slice.max_parts, |p| p.parts.len().max(1));
        let count = slice.per_node.entry(node).or_default();
        *count += 1;
        if *count > 4 * parts {
            let why = "sent more slices in one step than there are parts";
            self.cut_off(node, why);
            return None;
        }
        if buffer.version != slice.version {
            debug!(
                node,
                step = buffer.version,
                "dropping a slice of another step"
            );
            return None;
        }
        let (kind, len) = (buffer.kind, buffer.values.len());
        if !slice.take(node, buffer) {
            let why = format!(
                "sent a {kind:?} buffer of {len} values, which fits no part of a slice of {} ({} trainable)",
                slice.weights.len(),
                slice.trainable
            );
            self.cut_off(node, &why);
            return None;
        }
        slice.try_ready()
    }

    async fn control(&mut self, m: ControlMessage) -> Result<(), String> {
        match m.kind {
            Some(Control::Setup(s)) => {
                if s.start > s.end || s.end - s.start > u32::MAX as u64 {
                    return Err(format!(
                        "setup of an impossible slice {}..{}",
                        s.start, s.end
                    ));
                }
                let len = s.end - s.start;
                self.slice = None;
                self.nodes.clear();
                self.members.reset(len);
                self.pending = Some(Pending {
                    chunks: ChunkReceiver::new(len.saturating_mul(4)),
                    setup: s,
                    weights: None,
                });
            }
            Some(Control::Chunk(c)) => self.setup_chunk(&c)?,
            Some(Control::Member(m)) => {
                if m.present {
                    self.members.set(m.node_id, Some(m.session_secret.to_vec()));
                } else {
                    self.members.set(m.node_id, None);
                    self.nodes.remove(&m.node_id);
                    if let Some(slice) = &mut self.slice {
                        slice.uploads.retain(|&(_, n), _| n != m.node_id);
                    }
                }
            }
            Some(Control::Plan(p)) => {
                let slice = self.slice.as_mut().ok_or("a plan before the setup")?;
                if p.step != slice.version {
                    return Err(format!(
                        "plan for step {} while at version {}",
                        p.step, slice.version
                    ));
                }
                slice.plan = Some(p);
                slice.answered = None;
                if let Some(r) = slice.try_ready() {
                    self.report(Report::Ready(r)).await;
                }
            }
            Some(Control::Query(q)) => {
                let slice = self.slice.as_ref().ok_or("a query before the setup")?;
                let answer = match (&slice.answered, &slice.plan) {
                    (Some(r), _) => r.clone(),
                    (None, Some(plan)) => StepReady {
                        step: plan.step,
                        attempt: plan.attempt,
                        missing: slice.missing(plan),
                        ..StepReady::default()
                    },
                    (None, None) => return Err(format!("query of step {} without a plan", q.step)),
                };
                self.report(Report::Ready(answer)).await;
            }
            Some(Control::Commit(c)) => {
                let slice = self.slice.as_mut().ok_or("a commit before the setup")?;
                slice.commit(&c)?;
                self.broadcast(true);
            }
            Some(Control::Dump(d)) => {
                let slice = self.slice.as_ref().ok_or("a dump before the setup")?;
                if d.version != slice.version {
                    return Err(format!(
                        "dump of version {} while at version {}",
                        d.version, slice.version
                    ));
                }
                let state: Vec<f32> = slice
                    .optimizer
                    .state()
                    .iter()
                    .flat_map(|(_, v)| v.iter().copied())
                    .collect();
                let size = proto::DEFAULT_CHUNK_BYTES;
                let chunks: Vec<Chunk> =
                    Chunker::new(BufferKind::Weights, slice.version, &slice.weights, size)
                        .chunks()
                        .chain(
                            Chunker::new(BufferKind::Optimizer, slice.version, &state, size)
                                .chunks(),
                        )
                        .collect();
                for c in chunks {
                    self.report(Report::Chunk(c)).await;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// A chunk of the setup's weights or optimizer state; completes the
    /// setup with the last one.
    fn setup_chunk(&mut self, c: &Chunk) -> Result<(), String> {
        let pending = self.pending.as_mut().ok_or("a chunk outside a setup")?;
        let Some(buffer) = pending.chunks.push(c).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let s = &pending.setup;
        let len = (s.end - s.start) as usize;
        let trainable = (s.num_trainable.clamp(s.start, s.end) - s.start) as usize;
        let state = match buffer.kind {
            BufferKind::Weights if buffer.values.len() == len => {
                pending.weights = Some(buffer.values);
                if s.optimizer_state {
                    return Ok(());
                }
                None
            }
            BufferKind::Optimizer if pending.weights.is_some() => Some(buffer.values),
            kind => {
                return Err(format!(
                    "setup: a {kind:?} buffer of {} values for a slice of {len}",
                    buffer.values.len()
                ))
            }
        };
        let pending = self.pending.take().ok_or("no setup")?;
        let s = pending.setup;
        let weights = pending.weights.ok_or("no weights")?;
        let kind = match s.optimizer.as_str() {
            "adam" => OptimizerKind::Adam,
            "sgd" => OptimizerKind::Sgd,
            other => return Err(format!("unknown optimizer {other:?}")),
        };
        let mut optimizer = new_optimizer(kind, trainable);
        let names: Vec<&'static str> = optimizer.state().iter().map(|(n, _)| *n).collect();
        let vectors: Vec<Vec<f32>> = match state {
            Some(v) if v.len() == names.len() * trainable => {
                v.chunks(trainable.max(1)).map(|c| c.to_vec()).collect()
            }
            Some(v) => {
                return Err(format!(
                    "setup: {} optimizer values for {} vectors of {trainable}",
                    v.len(),
                    names.len()
                ))
            }
            None => vec![vec![0.0; trainable]; names.len()],
        };
        let mut vectors = vectors.into_iter();
        let mut by_name: HashMap<&str, Vec<f32>> = names
            .iter()
            .map(|n| (*n, vectors.next().unwrap_or_default()))
            .collect();
        optimizer.restore(&mut |name| by_name.remove(name), s.iterations)?;
        let l2 =
            s.l2.iter()
                .filter_map(|r| {
                    let lo = r.start.max(s.start).min(s.start + trainable as u64);
                    let hi = r.end.min(s.start + trainable as u64);
                    (lo < hi).then(|| L2Range {
                        range: (lo - s.start) as usize..(hi - s.start) as usize,
                        l2: r.l2,
                    })
                })
                .collect();
        let wire = Wire::from_dtype(s.wire).unwrap_or(Wire::F32);
        let mut slice = Slice {
            held: (wire == Wire::Bf16).then(|| weights.clone()),
            delta: None,
            partial: HashMap::new(),
            trainable,
            l2,
            max_parts: s.max_parts.max(1) as usize,
            version: s.version,
            weights,
            optimizer,
            grads: vec![0.0; trainable],
            state: vec![0.0; len - trainable],
            current: Arc::new(Vec::new()),
            uploads: HashMap::new(),
            per_node: HashMap::new(),
            plan: None,
            answered: None,
        };
        slice.encode(false);
        info!(
            start = s.start,
            end = s.end,
            version = s.version,
            "set up: {len} values ({trainable} trainable)"
        );
        self.slice = Some(slice);
        self.broadcast(false);
        Ok(())
    }
}
