//! The gRPC face of the coordinator: `Join` and the `Session` stream. It turns
//! what nodes send into [`Event`]s for the training loop and owns nothing of
//! the training state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::shm::Segment;
use proto::v1::coordinator_server::Coordinator;
use proto::v1::node_message::Kind;
use proto::v1::SharedMemory;
use proto::v1::{
    BufferKind, CoordinatorMessage, EvalResult, JoinReply, JoinRequest, NodeMessage, TrainResult,
};
use proto::ChunkReceiver;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::plane::SharedPlane;
use crate::task::Gradients;

/// Messages queued to one node before its stream applies back-pressure.
const OUTBOX: usize = 64;
/// Events queued for the training loop, at most. When the queue is full a
/// node's reader waits, and HTTP/2 flow control pushes back on that node's
/// stream: a node that floods results costs queue slots, not memory.
pub(crate) const EVENT_QUEUE: usize = 64;
/// Joins that have not opened their session yet, at most.
const MAX_PENDING: usize = 1024;
/// Joins waiting for their sessions that hold a shared-memory segment, at
/// most (each reserves a model's worth of tmpfs); later ones get gRPC.
const MAX_PENDING_SEGMENTS: usize = 16;
/// How long a join may wait for its session before it is forgotten.
const PENDING_TTL: Duration = Duration::from_secs(120);
/// Longest host or device name kept from a node (longer ones are cut).
const MAX_NAME: usize = 128;

/// Where the training loop sends messages for one node.
pub(crate) type Outbox = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// What a node told us when it joined.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub hostname: String,
    pub device: String,
    pub threads: u32,
}

/// What the service reports to the training loop.
pub(crate) enum Event {
    /// A node opened its session and can be given work. `shared` is its
    /// gradients segment when it proved it maps the shared-memory plane.
    Joined {
        node: u64,
        outbox: Outbox,
        info: NodeInfo,
        shared: Option<Arc<Segment>>,
        /// Its session secret (shard aggregators check it too).
        secret: [u8; 16],
    },
    /// A node's complete answer to a training step.
    Train {
        node: u64,
        result: TrainResult,
        gradients: Gradients,
        state: Vec<f32>,
    },
    /// A node's answer to one evaluation part.
    Eval { node: u64, result: EvalResult },
    /// A node has all the chunks of weights `version`.
    Received { node: u64, version: u64 },
    /// A node broke the protocol; it should not be trusted any more.
    Invalid { node: u64, reason: String },
    /// A node's stream ended.
    Left { node: u64, reason: String },
}

impl Event {
    /// The node the event is about.
    pub(crate) fn node(&self) -> u64 {
        match self {
            Event::Joined { node, .. }
            | Event::Train { node, .. }
            | Event::Eval { node, .. }
            | Event::Received { node, .. }
            | Event::Invalid { node, .. }
            | Event::Left { node, .. } => *node,
        }
    }
}

/// A node that joined and has not opened its session yet.
struct Pending {
    info: NodeInfo,
    secret: [u8; 16],
    /// Its gradients segment, when it asked for shared memory.
    slot: Option<Segment>,
    since: Instant,
}

pub(crate) struct Service {
    events: mpsc::Sender<Event>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    reply: JoinReply,
    num_trainable: usize,
    num_state: usize,
    plane: Option<Arc<SharedPlane>>,
    /// How long a join may wait for its session ([`PENDING_TTL`]).
    pending_ttl: Duration,
    /// Nodes send their gradients to shard aggregators.
    sharded: bool,
}

impl Service {
    pub fn new(
        events: mpsc::Sender<Event>,
        reply: JoinReply,
        num_trainable: usize,
        num_state: usize,
        plane: Option<Arc<SharedPlane>>,
    ) -> Self {
        Self {
            events,
            next_id: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            reply: reply.clone(),
            num_trainable,
            num_state,
            plane,
            pending_ttl: PENDING_TTL,
            sharded: !reply.shards.is_empty(),
        }
    }
}

/// Checks the cluster token from a request's headers, before its body is
/// read: installed as the server's interceptor, so an unauthenticated
/// request costs no decoding and no memory.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    /// Expected `authorization` metadata value, if a token is required.
    expected: Option<Arc<[u8]>>,
}

impl TokenCheck {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if bool::from(given.ct_eq(expected)) {
            return Ok(request);
        }
        crate::telemetry::refused();
        let from = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        warn!(%from, "refused a request with a missing or wrong cluster token");
        Err(Status::unauthenticated(
            "missing or wrong cluster token (--token / GRADCAST_TOKEN)",
        ))
    }
}

/// A name from the network made safe for logs: control characters escaped,
/// at most [`MAX_NAME`] characters.
pub(crate) fn printable(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(MAX_NAME)
        .flat_map(char::escape_debug)
        .collect();
    if name.chars().count() > MAX_NAME {
        out.push('…');
    }
    out
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = request.into_inner();
        if req.protocol_version != proto::PROTOCOL_VERSION {
            crate::telemetry::refused();
            return Err(Status::failed_precondition(format!(
                "node speaks protocol {} but this coordinator speaks {}; run the same gradcast version everywhere",
                req.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| Status::internal("membership lock poisoned"))?;
        pending.retain(|_, p| p.since.elapsed() < self.pending_ttl);
        if pending.len() >= MAX_PENDING {
            crate::telemetry::refused();
            return Err(Status::resource_exhausted(format!(
                "{MAX_PENDING} joins are waiting for their sessions; try again later"
            )));
        }
        let node = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = NodeInfo {
            hostname: printable(&req.hostname),
            device: printable(&req.device),
            threads: req.threads,
        };
        let secret = proto::shm::random_bytes()
            .map_err(|e| Status::internal(format!("no random source: {e}")))?;
        let mut reply = self.reply.clone();
        reply.node_id = node;
        reply.session_secret = secret.to_vec().into();
        let segments = pending.values().filter(|p| p.slot.is_some()).count();
        let slot = match (&self.plane, req.shared_memory) {
            (Some(_), true) if segments >= MAX_PENDING_SEGMENTS => {
                debug!(
                    node,
                    "{segments} joins hold segments already; this one gets gRPC"
                );
                None
            }
            (Some(plane), true) => match plane.new_slot(node) {
                Ok(slot) => {
                    reply.shared_memory = Some(SharedMemory {
                        weights_path: plane.weights_path().display().to_string(),
                        gradients_path: slot.path().display().to_string(),
                    });
                    Some(slot)
                }
                Err(e) => {
                    debug!(node, "no shared-memory segment for this node: {e}");
                    None
                }
            },
            _ => None,
        };
        pending.insert(
            node,
            Pending {
                info,
                secret,
                slot,
                since: Instant::now(),
            },
        );
        Ok(Response::new(reply))
    }

    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let hello = match first {
            Some(NodeMessage {
                kind: Some(Kind::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ))
            }
        };
        let node = hello.node_id;
        let unknown = || {
            crate::telemetry::refused();
            Status::not_found(format!(
                "unknown node id {node} or wrong session secret: call Join first (ids are single-use)"
            ))
        };
        let pending = {
            let mut all = self
                .pending
                .lock()
                .map_err(|_| Status::internal("membership lock poisoned"))?;
            // A wrong secret leaves the join in place for its rightful node.
            match all.get(&node) {
                Some(p) if bool::from(p.secret.ct_eq(&hello.session_secret[..])) => {
                    all.remove(&node)
                }
                _ => None,
            }
        }
        .ok_or_else(unknown)?;
        let shared = pending.slot.and_then(|slot| {
            let proved = bool::from(slot.proof().ct_eq(&hello.shared_memory_proof[..]));
            if !proved && !hello.shared_memory_proof.is_empty() {
                warn!(node, "wrong shared-memory proof; using gRPC for this node");
            }
            proved.then(|| Arc::new(slot))
        });
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let events = self.events.clone();
        let member = outbox.downgrade();
        let joined = Event::Joined {
            node,
            outbox,
            info: pending.info,
            shared: shared.clone(),
            secret: pending.secret,
        };
        if events.send(joined).await.is_err() {
            return Err(Status::unavailable("training has ended"));
        }
        let limit = self.num_trainable.max(self.num_state) as u64;
        let reader = Reader {
            node,
            events: events.clone(),
            member,
            limit,
            num_trainable: self.num_trainable,
            num_state: self.num_state,
            shared,
            sharded: self.sharded,
        };
        tokio::spawn(async move {
            let ended = reader.read(&mut inbound).await;
            if ended.invalid {
                warn!(node, reason = %ended.reason, "invalid message from node");
                let reason = ended.reason.clone();
                let _ = events.send(Event::Invalid { node, reason }).await;
            }
            let reason = ended.reason;
            let _ = events.send(Event::Left { node, reason }).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// How long a new session may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node's stream stopped being read.
struct Ended {
    reason: String,
    /// The node broke the protocol.
    invalid: bool,
}

impl Ended {
    fn left(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            invalid: false,
        }
    }
    fn invalid(reason: String) -> Self {
        Self {
            reason,
            invalid: true,
        }
    }
}

/// Reads one node's stream.
struct Reader {
    node: u64,
    events: mpsc::Sender<Event>,
    /// The node's outbox: gone once the training loop has removed the node,
    /// which ends the reading too.
    member: mpsc::WeakSender<Result<CoordinatorMessage, Status>>,
    limit: u64,
    num_trainable: usize,
    num_state: usize,
    /// The node's gradients segment, if it uses shared memory.
    shared: Option<Arc<Segment>>,
    /// Answers go to shard aggregators, not over this stream.
    sharded: bool,
}

impl Reader {
    /// Reads the stream until it ends, the node breaks the protocol or is
    /// removed; says why it stopped.
    async fn read(&self, inbound: &mut Streaming<NodeMessage>) -> Ended {
        let (node, events, limit) = (self.node, &self.events, self.limit);
        let (num_trainable, num_state) = (self.num_trainable, self.num_state);
        let mut rx = ChunkReceiver::new(limit);
        let mut gradients: Option<(u64, Vec<f32>)> = None;
        let mut state: Option<(u64, Vec<f32>)> = None;
        let invalid = Ended::invalid;
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ended::left("closed its stream"),
                Err(status) => return Ended::left(format!("stream error: {}", status.message())),
            };
            if self.member.upgrade().is_none() {
                return Ended::left("removed from the cluster");
            }
            match msg.kind {
                Some(Kind::Chunk(chunk)) => {
                    crate::telemetry::bytes(0, chunk.data.len());
                    match rx.push(&chunk) {
                        Ok(Some(b)) if b.kind == BufferKind::Gradients => {
                            gradients = Some((b.version, b.values))
                        }
                        Ok(Some(b)) if b.kind == BufferKind::State => {
                            state = Some((b.version, b.values))
                        }
                        Ok(Some(b)) => {
                            return invalid(format!("unexpected buffer kind {:?}", b.kind))
                        }
                        Ok(None) => {}
                        Err(e) => return invalid(format!("bad chunk: {e}")),
                    }
                }
                Some(Kind::Train(result)) => {
                    let step = result.step;
                    if result.sharded != self.sharded {
                        return invalid(format!(
                            "step {step}: result {} shard aggregators, but this run has {}",
                            if result.sharded {
                                "sent to"
                            } else {
                                "not sent to"
                            },
                            if self.sharded { "them" } else { "none" }
                        ));
                    }
                    let (gradients, state) = if result.sharded {
                        (Gradients::Sharded, Vec::new())
                    } else if result.shared_memory {
                        let Some(slot) = &self.shared else {
                            return invalid(format!(
                                "step {step}: result in shared memory, but this node has none"
                            ));
                        };
                        // The gradients stay in place for the averaging; the
                        // (small) state is copied out now.
                        let state = slot.view(step).and_then(|v| {
                            let s = v.values()[num_trainable..num_trainable + num_state].to_vec();
                            v.finish().map(|()| s)
                        });
                        match state {
                            Ok(s) => (
                                Gradients::Shared {
                                    slot: slot.clone(),
                                    version: step,
                                },
                                s,
                            ),
                            Err(e) => return invalid(format!("step {step}: {e}")),
                        }
                    } else {
                        match (gradients.take(), state.take()) {
                            (Some((gv, g)), Some((sv, s))) if gv == step && sv == step => {
                                if g.len() != num_trainable || s.len() != num_state {
                                    return invalid(format!(
                                    "step {step}: {} gradients and {} state values, expected {num_trainable} and {num_state}",
                                    g.len(),
                                    s.len()
                                ));
                                }
                                (Gradients::Owned(g), s)
                            }
                            _ => {
                                return invalid(format!(
                                    "result for step {step} without its gradient and state buffers"
                                ))
                            }
                        }
                    };
                    let train = Event::Train {
                        node,
                        result,
                        gradients,
                        state,
                    };
                    if events.send(train).await.is_err() {
                        return Ended::left("training has ended");
                    }
                }
                Some(Kind::Eval(result)) => {
                    if events.send(Event::Eval { node, result }).await.is_err() {
                        return Ended::left("training has ended");
                    }
                }
                Some(Kind::Received(r)) => {
                    let received = Event::Received {
                        node,
                        version: r.version,
                    };
                    if events.send(received).await.is_err() {
                        return Ended::left("training has ended");
                    }
                }
                Some(Kind::Error(e)) => {
                    return Ended::left(format!(
                        "reported an error at step {}: {}",
                        e.step,
                        printable(&e.message)
                    ))
                }
                Some(Kind::Hello(_)) | None => {
                    debug!(node, "ignoring a repeated Hello or empty message");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_check_compares_the_whole_header() {
        let mut check = TokenCheck::new(Some("abc"));
        assert!(check.call(with_auth(Some("Bearer abc"))).is_ok());
        for wrong in [Some("Bearer abd"), Some("Bearer ab"), Some("abc"), None] {
            let err = check.call(with_auth(wrong)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        assert!(TokenCheck::new(None).call(with_auth(None)).is_ok());
    }

    fn service(plane: Option<Arc<SharedPlane>>) -> (Service, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (Service::new(tx, JoinReply::default(), 4, 2, plane), rx)
    }

    fn join_request(shared_memory: bool, name_bytes: usize) -> Request<JoinRequest> {
        Request::new(JoinRequest {
            hostname: "h".repeat(name_bytes),
            device: "cpu".into(),
            threads: 1,
            protocol_version: proto::PROTOCOL_VERSION,
            shared_memory,
        })
    }

    /// Joins that never open a session are bounded in number and forgotten
    /// after `PENDING_TTL`, and only a few of them hold shared-memory
    /// segments; their long host names are cut at once.
    #[tokio::test]
    async fn abandoned_joins_are_bounded_and_expire() {
        let shm = tempfile::tempdir().unwrap();
        let plane = Arc::new(SharedPlane::new(shm.path(), 6, 6).unwrap());
        let (mut service, _events) = service(Some(plane));
        service.pending_ttl = Duration::from_secs(3);
        let files = || std::fs::read_dir(shm.path()).unwrap().count();
        for _ in 0..MAX_PENDING_SEGMENTS + 4 {
            let reply = service
                .join(join_request(true, 1 << 20))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.session_secret.len(), 16);
        }
        // The weights segment and one per join, up to the cap.
        assert_eq!(files(), 1 + MAX_PENDING_SEGMENTS);
        let held: usize = service
            .pending
            .lock()
            .unwrap()
            .values()
            .map(|p| p.info.hostname.len())
            .sum();
        assert!(
            held < 200 * (MAX_PENDING_SEGMENTS + 4),
            "{held} bytes of names kept"
        );
        for _ in MAX_PENDING_SEGMENTS + 4..MAX_PENDING {
            service.join(join_request(false, 64)).await.unwrap();
        }
        let err = service.join(join_request(false, 64)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // After the time to live, the next join finds them all forgotten,
        // their segments removed.
        tokio::time::sleep(service.pending_ttl).await;
        service.join(join_request(true, 64)).await.unwrap();
        assert_eq!(service.pending.lock().unwrap().len(), 1);
        assert_eq!(files(), 2);
    }

    #[test]
    fn names_from_the_network_are_escaped_and_cut() {
        assert_eq!(printable("node-1"), "node-1");
        assert_eq!(printable("a\nINFO forged"), "a\\nINFO forged");
        let long = "x".repeat(1000);
        assert_eq!(printable(&long).chars().count(), MAX_NAME + 1);
    }
}
