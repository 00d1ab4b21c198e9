//! `gradcast aggregator`: one slice of the weights buffer, its optimizer
//! state and its share of every step's averaging.
//!
//! The coordinator drives it over `Control` (setup, members, the plan of
//! each step, commit, dump); nodes send it their gradient slices and get the
//! new weight slices over `Exchange`. One task (the [`Actor`]) owns all the
//! state; the gRPC handlers only turn streams into [`Event`]s, so nothing is
//! shared but the member list the handlers check nodes against.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use proto::v1::aggregator_server::{Aggregator, AggregatorServer};
use proto::v1::control_message::Kind as Control;
use proto::v1::shard_upload::Kind as Upload;
use proto::v1::{AggregatorMessage, Chunk, ControlMessage, ShardUpload};
use proto::{Buffer, ChunkReceiver};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::service::TokenCheck;
use crate::{CoordinatorError, ServerTls};

mod actor;
mod members;
mod slice;

use actor::{Actor, Versions};
use members::Members;

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
