//! `gradcast aggregator`: one slice of the weights buffer, its optimizer
//! state and its share of every step's averaging.
//!
//! The coordinator drives it over `Control` (setup, members, the plan of
//! each step, commit, dump); nodes send it their gradient slices and get the
//! new weight slices over `Exchange`. One task (the [`Actor`]) owns all the
//! state; the gRPC handlers only turn streams into [`Event`]s, so nothing is
//! shared but the member list the handlers check nodes against.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::counter;
use proto::v1::aggregator_message::Kind as Report;
use proto::v1::aggregator_server::{Aggregator, AggregatorServer};
use proto::v1::control_message::Kind as Control;
use proto::v1::shard_upload::Kind as Upload;
use proto::v1::{
    AggregatorMessage, BufferKind, Chunk, Commit, ControlMessage, NodeError as WireError,
    PlannedPart, ShardSetup, ShardUpload, StepPlan, StepReady,
};
use proto::{Buffer, ChunkReceiver, Chunker, Wire};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::aggregate::{average_block, average_gradients, factors, sum_of_squares, L2Range};
use crate::optimizer::{clip_to_norm, from_buffer, new_optimizer};
use crate::service::TokenCheck;
use crate::{CoordinatorError, Optimizer, OptimizerKind, ServerTls};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// How long a node's `Exchange` may wait for the coordinator to name it a
/// member (its join and its first exchange race, and the coordinator takes
/// in new nodes between its waits: a checkpoint may come first).
const MEMBER_WAIT: Duration = Duration::from_secs(60);
/// How long a new stream may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Versions of the weights queued to one node; a node further behind is
/// disconnected (it would only ever compute with stale weights).
const VERSIONS_QUEUED: usize = 4;
/// Events queued for the actor (each upload holds one slice).
const EVENTS: usize = 64;

/// Prometheus metrics of an aggregator process.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "gradcast_aggregator_steps_total",
        "Steps this aggregator applied (or skipped as told)"
    );
    metrics::describe_counter!(
        "gradcast_aggregator_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes of gradient slices received (direction=in) and weight slices sent (direction=out)"
    );
    metrics::describe_counter!(
        "gradcast_aggregator_refused_total",
        "Node streams refused or cut (unknown node, wrong secret, flooding, too slow)"
    );
}

/// Serves an aggregator on `listener` until `shutdown` resolves. `token`:
/// the cluster token every call must carry; `tls`: serve TLS (and, with its
/// `client_ca`, require client certificates).
pub async fn serve(
    listener: TcpListener,
    token: Option<String>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let (events_tx, events) = mpsc::channel(EVENTS);
    let members = Arc::new(Members::default());
    let service = AggregatorService {
        events: events_tx,
        members: members.clone(),
        busy: Arc::new(AtomicBool::new(false)),
        next_conn: AtomicU64::new(0),
    };
    let actor = tokio::spawn(Actor::new(members).run(events));
    let token = TokenCheck::new(token.as_deref());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key));
        if let Some(ca) = tls.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg)?;
    }
    let served = builder
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AggregatorServer::new(service)
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            token,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    actor.abort();
    served.map_err(CoordinatorError::from)
}

/// The nodes the coordinator admitted, with their session secrets, and the
/// size of this aggregator's slice.
#[derive(Default)]
struct Members {
    known: Mutex<(HashMap<u64, Vec<u8>>, u64)>,
    changed: Notify,
}

impl Members {
    fn set(&self, node: u64, secret: Option<Vec<u8>>) {
        if let Ok(mut k) = self.known.lock() {
            match secret {
                Some(s) => k.0.insert(node, s),
                None => k.0.remove(&node),
            };
        }
        self.changed.notify_waiters();
    }

    fn reset(&self, slice_len: u64) {
        if let Ok(mut k) = self.known.lock() {
            k.0.clear();
            k.1 = slice_len;
        }
        self.changed.notify_waiters();
    }

    fn contains(&self, node: u64) -> bool {
        self.known.lock().is_ok_and(|k| k.0.contains_key(&node))
    }

    /// Waits until the coordinator names `node` a member; returns the
    /// slice's length. Refuses a wrong secret at once.
    async fn admit(&self, node: u64, secret: &[u8]) -> Result<u64, Status> {
        let deadline = Instant::now() + MEMBER_WAIT;
        loop {
            let changed = self.changed.notified();
            {
                let k = self
                    .known
                    .lock()
                    .map_err(|_| Status::internal("member lock poisoned"))?;
                match k.0.get(&node) {
                    Some(s) if bool::from(s.ct_eq(secret)) => return Ok(k.1),
                    Some(_) => {
                        counter!("gradcast_aggregator_refused_total").increment(1);
                        return Err(Status::permission_denied(format!(
                            "wrong session secret for node {node}"
                        )));
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                counter!("gradcast_aggregator_refused_total").increment(1);
                return Err(Status::not_found(format!(
                    "node {node} is not a member of the coordinator's cluster"
                )));
            }
        }
    }
}

/// What the gRPC handlers tell the actor.
enum Event {
    ControlOpened(mpsc::Sender<Result<AggregatorMessage, Status>>),
    Control(ControlMessage),
    ControlClosed(String),
    NodeOpened {
        node: u64,
        conn: u64,
        versions: Versions,
        reader: tokio::task::AbortHandle,
    },
    Upload {
        node: u64,
        buffer: Buffer,
    },
    NodeClosed {
        node: u64,
        conn: u64,
    },
}

struct AggregatorService {
    events: mpsc::Sender<Event>,
    members: Arc<Members>,
    /// A coordinator's control stream is open.
    busy: Arc<AtomicBool>,
    next_conn: AtomicU64,
}

#[tonic::async_trait]
impl Aggregator for AggregatorService {
    type ControlStream = ReceiverStream<Result<AggregatorMessage, Status>>;

    async fn control(
        &self,
        request: Request<Streaming<ControlMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition(
                "another coordinator is driving this aggregator",
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        if self.events.send(Event::ControlOpened(tx)).await.is_err() {
            self.busy.store(false, Ordering::SeqCst);
            return Err(Status::unavailable("the aggregator is stopping"));
        }
        let mut inbound = request.into_inner();
        let events = self.events.clone();
        let busy = self.busy.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if let Some(Control::Chunk(c)) = &m.kind {
                            counter!("gradcast_aggregator_bytes_total", "direction" => "in")
                                .increment(c.data.len() as u64);
                        }
                        if events.send(Event::Control(m)).await.is_err() {
                            break "the aggregator is stopping".to_string();
                        }
                    }
                    Ok(None) => break "the coordinator closed its stream".to_string(),
                    Err(s) => break format!("control stream error: {}", s.message()),
                }
            };
            let _ = events.send(Event::ControlClosed(reason)).await;
            busy.store(false, Ordering::SeqCst);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ExchangeStream = ReceiverStream<Result<Chunk, Status>>;

    async fn exchange(
        &self,
        request: Request<Streaming<ShardUpload>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no ShardHello within 10 s"))??;
        let Some(ShardUpload {
            kind: Some(Upload::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of an exchange must be ShardHello",
            ));
        };
        let node = hello.node_id;
        let limit = self.members.admit(node, &hello.session_secret).await?;
        let (tx, rx) = mpsc::channel::<Result<Chunk, Status>>(16);
        let (versions, mut queued) = mpsc::channel(VERSIONS_QUEUED);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            while let Some(version) = queued.recv().await {
                let version: Arc<Vec<Chunk>> = match version {
                    Ok(v) => v,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                for c in version.iter() {
                    counter!("gradcast_aggregator_bytes_total", "direction" => "out")
                        .increment(c.data.len() as u64);
                    if tx.send(Ok(c.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        let events = self.events.clone();
        let reader = tokio::spawn(async move {
            let mut chunks = ChunkReceiver::new(limit);
            let reason = loop {
                let chunk = match inbound.message().await {
                    Ok(Some(ShardUpload {
                        kind: Some(Upload::Chunk(c)),
                    })) => c,
                    Ok(Some(_)) => break "sent something other than a chunk".to_string(),
                    Ok(None) => break "closed its stream".to_string(),
                    Err(s) => break format!("stream error: {}", s.message()),
                };
                counter!("gradcast_aggregator_bytes_total", "direction" => "in")
                    .increment(chunk.data.len() as u64);
                match chunks.push(&chunk) {
                    Ok(Some(buffer)) => {
                        if events.send(Event::Upload { node, buffer }).await.is_err() {
                            break "the aggregator is stopping".to_string();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break format!("bad chunk: {e}"),
                }
            };
            debug!(node, "exchange ended: {reason}");
            let _ = events.send(Event::NodeClosed { node, conn }).await;
        });
        let opened = Event::NodeOpened {
            node,
            conn,
            versions,
            reader: reader.abort_handle(),
        };
        if self.events.send(opened).await.is_err() {
            reader.abort();
            return Err(Status::unavailable("the aggregator is stopping"));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A part's gradients and state, as far as they came.
type Halves = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Where the versions of the slice go to one node's exchange (an error ends
/// it, saying why).
type Versions = mpsc::Sender<Result<Arc<Vec<Chunk>>, Status>>;

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

/// The slice this aggregator owns, once set up.
struct Slice {
    /// Values of the slice that are trainable (the rest is state).
    trainable: usize,
    /// L2 runs, in slice coordinates.
    l2: Vec<L2Range>,
    max_parts: usize,
    version: u64,
    weights: Vec<f32>,
    optimizer: Box<dyn Optimizer>,
    /// The averaged gradient (with L2) of the planned step, once ready.
    grads: Vec<f32>,
    /// The averaged state of the planned step, once ready.
    state: Vec<f32>,
    /// bf16 wire: the f32 values the nodes hold (what the changes sent so
    /// far add up to), within half a bf16 step of `weights`.
    held: Option<Vec<f32>>,
    /// The whole slice of `version` as nodes get it when they hold no
    /// earlier one (f32: `weights`; bf16: `held`), encoded once.
    current: Arc<Vec<Chunk>>,
    /// bf16 wire: the change from the version before to `version`, for the
    /// nodes that hold that one.
    delta: Option<Arc<Vec<Chunk>>>,
    /// Halves of slices received for this version's step, by (part, node):
    /// gradients and state come as two buffers.
    partial: HashMap<(u32, u64), Halves>,
    /// Slices received for this version's step, by (part, node).
    uploads: HashMap<(u32, u64), Vec<f32>>,
    /// Slices received per node this step.
    per_node: HashMap<u64, usize>,
    plan: Option<StepPlan>,
    /// The answer to the plan, once sent (a query gets it again).
    answered: Option<StepReady>,
}

impl Slice {
    /// Encodes `version` for the nodes: whole, and on the bf16 wire also as
    /// the change from the version before (when `changed`).
    fn encode(&mut self, changed: bool) {
        let size = proto::DEFAULT_CHUNK_BYTES;
        self.delta = None;
        if let Some(held) = &mut self.held {
            if changed {
                let bytes = proto::bf16_delta(&self.weights, held);
                let base = self.version - 1;
                let delta = Chunker::encoded(
                    BufferKind::WeightsDelta,
                    self.version,
                    Wire::Bf16,
                    bytes,
                    size,
                )
                .with_base(base);
                self.delta = Some(Arc::new(delta.chunks().collect()));
            }
        }
        let whole = self.held.as_deref().unwrap_or(&self.weights);
        let chunker = Chunker::new(BufferKind::Weights, self.version, whole, size);
        self.current = Arc::new(chunker.chunks().collect());
    }

    /// Takes one buffer of a node's answer to part `part`: the gradients of
    /// the slice's trainable values, or the state. Returns false if it
    /// does not fit the slice.
    fn take(&mut self, node: u64, buffer: Buffer) -> bool {
        let t = self.trainable;
        let state_len = self.weights.len() - t;
        let key = (buffer.part, node);
        let entry = self.partial.entry(key).or_default();
        match buffer.kind {
            BufferKind::Gradients if buffer.values.len() == t && t > 0 => {
                entry.0 = Some(buffer.values)
            }
            BufferKind::State if buffer.values.len() == state_len && state_len > 0 => {
                entry.1 = Some(buffer.values)
            }
            _ => return false,
        }
        let complete = (t == 0 || entry.0.is_some()) && (state_len == 0 || entry.1.is_some());
        if complete {
            if let Some((g, st)) = self.partial.remove(&key) {
                let mut values = g.unwrap_or_default();
                values.extend(st.unwrap_or_default());
                self.uploads.insert(key, values);
            }
        }
        true
    }

    fn missing(&self, plan: &StepPlan) -> Vec<PlannedPart> {
        plan.parts
            .iter()
            .filter(|_| !self.weights.is_empty())
            .filter(|p| !self.uploads.contains_key(&(p.part, p.node_id)))
            .copied()
            .collect()
    }

    /// The answer to the plan once every planned slice is in: the averages
    /// are made then (None while slices are missing, or after answering).
    fn try_ready(&mut self) -> Option<StepReady> {
        let plan = self.plan.as_ref()?;
        if self.answered.is_some() || !self.missing(plan).is_empty() {
            return None;
        }
        let slices: Vec<&[f32]> = plan
            .parts
            .iter()
            // (An empty slice gets nothing: every part is empty there.)
            .map(|p| {
                self.uploads
                    .get(&(p.part, p.node_id))
                    .map_or(&[][..], |v| v.as_slice())
            })
            .collect();
        let bad: Vec<PlannedPart> = plan
            .parts
            .iter()
            .zip(&slices)
            .filter(|(_, v)| !v.iter().all(|x| x.is_finite()))
            .map(|(p, _)| *p)
            .collect();
        let (step, attempt) = (plan.step, plan.attempt);
        let ready = if bad.is_empty() {
            let t = self.trainable;
            let grads: Vec<(f64, &[f32])> = plan
                .parts
                .iter()
                .zip(&slices)
                .map(|(p, v)| (p.samples as f64, &v[..t]))
                .collect();
            let part_squares = grads.iter().map(|(_, g)| sum_of_squares(g)).collect();
            let sums = average_gradients(&mut self.grads, &grads, &self.weights[..t], &self.l2);
            let states: Vec<(f64, &[f32])> = plan
                .parts
                .iter()
                .zip(&slices)
                .map(|(p, v)| (p.samples as f64, &v[t..]))
                .collect();
            average_block(&mut self.state, 0, &factors(&states));
            StepReady {
                step,
                attempt,
                squares: sums.squares,
                penalty: sums.penalty,
                part_squares,
                ..StepReady::default()
            }
        } else {
            StepReady {
                step,
                attempt,
                bad,
                ..StepReady::default()
            }
        };
        self.answered = Some(ready.clone());
        Some(ready)
    }

    /// Applies (or skips, as told) the planned step; the slice becomes the
    /// next version.
    fn commit(&mut self, c: &Commit) -> Result<(), String> {
        let ready = self.answered.as_ref().filter(|r| r.bad.is_empty());
        if c.step != self.version || ready.is_none() {
            return Err(format!(
                "commit of step {} while at version {} {}",
                c.step,
                self.version,
                if ready.is_none() {
                    "without every slice of the step"
                } else {
                    ""
                }
            ));
        }
        if c.apply {
            let t = self.trainable;
            if c.clip_norm > 0.0 {
                clip_to_norm(&mut self.grads, c.norm, c.clip_norm);
            }
            let (trainable, state) = self.weights.split_at_mut(t);
            self.optimizer
                .step_with(trainable, c.lr, None, &from_buffer(&self.grads));
            state.copy_from_slice(&self.state);
        }
        self.version += 1;
        self.uploads.clear();
        self.partial.clear();
        self.per_node.clear();
        self.plan = None;
        self.answered = None;
        self.encode(true);
        counter!("gradcast_aggregator_steps_total").increment(1);
        Ok(())
    }
}

/// Owns everything; handles one event at a time.
struct Actor {
    members: Arc<Members>,
    control: Option<mpsc::Sender<Result<AggregatorMessage, Status>>>,
    /// Each node's exchange (one per node: a newer one replaces it).
    nodes: HashMap<u64, NodeLink>,
    pending: Option<Pending>,
    slice: Option<Slice>,
}

impl Actor {
    fn new(members: Arc<Members>) -> Self {
        Self {
            members,
            control: None,
            nodes: HashMap::new(),
            pending: None,
            slice: None,
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        while let Some(event) = events.recv().await {
            if let Err(e) = self.handle(event).await {
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

    /// Ends a node's exchange, telling it why (its reader stops too).
    fn cut_off(&mut self, node: u64, why: &str) {
        warn!(node, "{why}; cutting it off");
        counter!("gradcast_aggregator_refused_total").increment(1);
        if let Some(link) = self.nodes.remove(&node) {
            let _ = link
                .versions
                .try_send(Err(Status::resource_exhausted(why.to_string())));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn members_are_checked_by_id_and_secret_and_strangers_wait_then_go() {
        let m = Arc::new(Members::default());
        m.reset(48);
        m.set(3, Some(vec![7u8; 16]));
        assert_eq!(m.admit(3, &[7u8; 16]).await.unwrap(), 48);
        let wrong = m.admit(3, &[8u8; 16]).await.unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
        let empty = m.admit(3, &[]).await.unwrap_err();
        assert_eq!(empty.code(), tonic::Code::PermissionDenied);
        // A node the coordinator names while it waits gets in...
        let late = {
            let m = m.clone();
            tokio::spawn(async move { m.admit(5, &[1u8; 16]).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.set(5, Some(vec![1u8; 16]));
        assert_eq!(late.await.unwrap().unwrap(), 48);
        // ...one it never names is refused after MEMBER_WAIT, and one it
        // removed is a stranger again.
        let started = Instant::now();
        let stranger = m.admit(9, &[1u8; 16]).await.unwrap_err();
        assert_eq!(stranger.code(), tonic::Code::NotFound);
        assert!(started.elapsed() >= MEMBER_WAIT);
        m.set(5, None);
        assert!(!m.contains(5));
    }

    fn plan(parts: &[(u32, u64, u32)]) -> StepPlan {
        StepPlan {
            step: 0,
            attempt: 0,
            parts: parts
                .iter()
                .map(|&(part, node_id, samples)| PlannedPart {
                    part,
                    node_id,
                    samples,
                })
                .collect(),
        }
    }

    fn slice(len: usize, trainable: usize) -> Slice {
        let mut s = Slice {
            trainable,
            l2: Vec::new(),
            max_parts: 2,
            version: 0,
            weights: vec![1.0; len],
            optimizer: new_optimizer(OptimizerKind::Sgd, trainable),
            grads: vec![0.0; trainable],
            state: vec![0.0; len - trainable],
            held: None,
            current: Arc::new(Vec::new()),
            delta: None,
            partial: HashMap::new(),
            uploads: HashMap::new(),
            per_node: HashMap::new(),
            plan: None,
            answered: None,
        };
        s.encode(false);
        s
    }

    /// The slice averages only what the plan names, weighted by samples and
    /// in plan order; a NaN slice is reported as bad, not averaged; a commit
    /// applies the optimizer to the trainable values and the mean to the
    /// state, and moves to the next version.
    #[test]
    fn a_slice_averages_what_the_plan_names_and_commits_it() {
        let mut s = slice(4, 3);
        s.uploads.insert((0, 10), vec![1.0, 2.0, 3.0, 10.0]);
        s.uploads.insert((1, 11), vec![3.0, 2.0, 1.0, 20.0]);
        // An upload from a node the plan does not name is ignored.
        s.uploads.insert((1, 12), vec![f32::NAN; 4]);
        s.plan = Some(plan(&[(0, 10, 3), (1, 11, 1)]));
        let ready = s.try_ready().expect("every planned slice is in");
        assert!(ready.bad.is_empty() && ready.missing.is_empty());
        assert_eq!(s.grads, vec![1.5, 2.0, 2.5]);
        assert_eq!(s.state, vec![12.5]);
        assert_eq!(ready.part_squares, vec![14.0, 14.0]);
        assert!((ready.squares - (1.5f64 * 1.5 + 4.0 + 2.5 * 2.5)).abs() < 1e-9);
        assert!(s.try_ready().is_none(), "answered once");
        let commit = Commit {
            step: 0,
            lr: 0.5,
            apply: true,
            norm: 0.0,
            clip_norm: 0.0,
        };
        s.commit(&commit).unwrap();
        assert_eq!(s.weights, vec![0.25, 0.0, -0.25, 12.5]);
        assert_eq!(s.version, 1);
        assert!(s.uploads.is_empty() && s.plan.is_none());
        assert!(s.commit(&commit).is_err(), "step 0 is done");

        let mut s = slice(4, 3);
        s.uploads.insert((0, 10), vec![f32::NAN, 0.0, 0.0, 0.0]);
        s.plan = Some(plan(&[(0, 10, 1), (1, 11, 1)]));
        assert!(s.try_ready().is_none(), "part 1 is missing");
        assert_eq!(
            s.missing(s.plan.as_ref().unwrap()),
            plan(&[(1, 11, 1)]).parts
        );
        s.uploads.insert((1, 11), vec![0.0; 4]);
        let ready = s.try_ready().unwrap();
        assert_eq!(ready.bad, plan(&[(0, 10, 1)]).parts);
        assert!(s.commit(&commit).is_err(), "a bad step is not committed");

        // An empty slice (more aggregators than a small model fills) gets
        // nothing from the nodes and is ready at once.
        let mut s = slice(0, 0);
        s.plan = Some(plan(&[(0, 10, 1), (1, 11, 1)]));
        let ready = s.try_ready().expect("nothing to wait for");
        assert!(ready.missing.is_empty() && ready.bad.is_empty());
        s.commit(&commit).unwrap();
        assert_eq!(s.version, 1);
    }

    /// Gradients and state come as two buffers; a slice is in once both
    /// are, and a buffer that fits neither half is refused.
    #[test]
    fn a_part_is_in_once_its_gradients_and_state_are() {
        let mut s = slice(4, 3);
        let buffer = |kind, values: Vec<f32>| Buffer {
            kind,
            version: 0,
            base_version: 0,
            part: 2,
            values,
        };
        assert!(s.take(7, buffer(BufferKind::Gradients, vec![1.0, 2.0, 3.0])));
        assert!(s.uploads.is_empty());
        assert!(s.take(7, buffer(BufferKind::State, vec![4.0])));
        assert_eq!(s.uploads[&(2, 7)], vec![1.0, 2.0, 3.0, 4.0]);
        assert!(!s.take(7, buffer(BufferKind::Gradients, vec![1.0; 4])));
        assert!(!s.take(7, buffer(BufferKind::Weights, vec![1.0; 3])));
    }
}
