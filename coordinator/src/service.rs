//! The gRPC face of the coordinator: `Join` and the `Session` stream. It turns
//! what nodes send into [`Event`]s for the training loop and owns nothing of
//! the training state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use proto::v1::coordinator_server::Coordinator;
use proto::v1::node_message::Kind;
use proto::v1::{
    BufferKind, CoordinatorMessage, EvalResult, JoinReply, JoinRequest, NodeMessage, TrainResult,
};
use proto::ChunkReceiver;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// Messages queued to one node before its stream applies back-pressure.
const OUTBOX: usize = 64;

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
    /// A node opened its session and can be given work.
    Joined {
        node: u64,
        outbox: Outbox,
        info: NodeInfo,
    },
    /// A node's complete answer to a training step.
    Train {
        node: u64,
        result: TrainResult,
        gradients: Vec<f32>,
        state: Vec<f32>,
    },
    /// A node's answer to one evaluation part.
    Eval { node: u64, result: EvalResult },
    /// A node broke the protocol; it should not be trusted any more.
    Invalid { node: u64, reason: String },
    /// A node's stream ended.
    Left { node: u64, reason: String },
}

pub(crate) struct Service {
    events: mpsc::UnboundedSender<Event>,
    /// Expected `authorization` metadata value, if a token is required.
    expected: Option<Vec<u8>>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, NodeInfo>>,
    reply: JoinReply,
    num_trainable: usize,
    num_state: usize,
}

impl Service {
    pub fn new(
        events: mpsc::UnboundedSender<Event>,
        reply: JoinReply,
        num_trainable: usize,
        num_state: usize,
        token: Option<String>,
    ) -> Self {
        Self {
            events,
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
            next_id: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            reply,
            num_trainable,
            num_state,
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Service {
    /// Checks the cluster token of a request, if one is required.
    #[allow(clippy::result_large_err)]
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected) {
            return Ok(());
        }
        crate::telemetry::refused();
        let from = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        warn!(%from, "refused a node with a missing or wrong cluster token");
        Err(Status::unauthenticated(
            "missing or wrong cluster token (--token / GRADCAST_TOKEN)",
        ))
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        if req.protocol_version != proto::PROTOCOL_VERSION {
            crate::telemetry::refused();
            return Err(Status::failed_precondition(format!(
                "node speaks protocol {} but this coordinator speaks {}; run the same gradcast version everywhere",
                req.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        let node = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = NodeInfo {
            hostname: req.hostname,
            device: req.device,
            threads: req.threads,
        };
        self.pending
            .lock()
            .map_err(|_| Status::internal("membership lock poisoned"))?
            .insert(node, info);
        let mut reply = self.reply.clone();
        reply.node_id = node;
        Ok(Response::new(reply))
    }

    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.authorize(&request)?;
        let mut inbound = request.into_inner();
        let node = match inbound.message().await? {
            Some(NodeMessage {
                kind: Some(Kind::Hello(h)),
            }) => h.node_id,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ))
            }
        };
        let info = self
            .pending
            .lock()
            .map_err(|_| Status::internal("membership lock poisoned"))?
            .remove(&node)
            .ok_or_else(|| {
                crate::telemetry::refused();
                Status::not_found(format!(
                    "unknown node id {node}: call Join first (ids are single-use)"
                ))
            })?;
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let events = self.events.clone();
        if events.send(Event::Joined { node, outbox, info }).is_err() {
            return Err(Status::unavailable("training has ended"));
        }
        let limit = self.num_trainable.max(self.num_state) as u64;
        let (num_trainable, num_state) = (self.num_trainable, self.num_state);
        tokio::spawn(async move {
            let reason =
                read_session(node, &mut inbound, &events, limit, num_trainable, num_state).await;
            let _ = events.send(Event::Left { node, reason });
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads one node's stream until it ends; returns why it ended.
async fn read_session(
    node: u64,
    inbound: &mut Streaming<NodeMessage>,
    events: &mpsc::UnboundedSender<Event>,
    limit: u64,
    num_trainable: usize,
    num_state: usize,
) -> String {
    let mut rx = ChunkReceiver::new(limit);
    let mut gradients: Option<(u64, Vec<f32>)> = None;
    let mut state: Option<(u64, Vec<f32>)> = None;
    let invalid = |reason: String| {
        warn!(node, %reason, "invalid message from node");
        let _ = events.send(Event::Invalid {
            node,
            reason: reason.clone(),
        });
        reason
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return "closed its stream".into(),
            Err(status) => return format!("stream error: {}", status.message()),
        };
        match msg.kind {
            Some(Kind::Chunk(chunk)) => match rx.push(&chunk) {
                Ok(Some((BufferKind::Gradients, version, values))) => {
                    gradients = Some((version, values))
                }
                Ok(Some((BufferKind::State, version, values))) => state = Some((version, values)),
                Ok(Some((kind, ..))) => return invalid(format!("unexpected buffer kind {kind:?}")),
                Ok(None) => {}
                Err(e) => return invalid(format!("bad chunk: {e}")),
            },
            Some(Kind::Train(result)) => {
                let step = result.step;
                let (g, s) = match (gradients.take(), state.take()) {
                    (Some((gv, g)), Some((sv, s))) if gv == step && sv == step => (g, s),
                    _ => {
                        return invalid(format!(
                            "result for step {step} without its gradient and state buffers"
                        ))
                    }
                };
                if g.len() != num_trainable || s.len() != num_state {
                    return invalid(format!(
                        "step {step}: {} gradients and {} state values, expected {num_trainable} and {num_state}",
                        g.len(),
                        s.len()
                    ));
                }
                let _ = events.send(Event::Train {
                    node,
                    result,
                    gradients: g,
                    state: s,
                });
            }
            Some(Kind::Eval(result)) => {
                let _ = events.send(Event::Eval { node, result });
            }
            Some(Kind::Error(e)) => {
                return format!("reported an error at step {}: {}", e.step, e.message)
            }
            Some(Kind::Hello(_)) | None => {
                debug!(node, "ignoring a repeated Hello or empty message");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(super::constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!super::constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!super::constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!super::constant_time_eq(b"", b"Bearer abc"));
    }
}
