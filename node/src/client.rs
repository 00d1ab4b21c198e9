//! The node's life: connect (with retries), join, then serve the session.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::{Device, Model, ModelKind, ModelSpec, StepStats, TensorInfo};
use proto::shm::Segment;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::coordinator_message::Kind as In;
use proto::v1::node_message::Kind as Out;
use proto::v1::SharedMemory;
use proto::v1::{
    BufferKind, EvalResult, EvalTask, Hello, JoinReply, JoinRequest, NodeError as WireError,
    NodeMessage, Received, Samples, SamplesAhead, TensorSpec, TrainResult, TrainTask,
};
use proto::{apply_delta, Buffer, ChunkReceiver, Chunker, ErrorFeedback, Wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tracing::{debug, info, warn};

use crate::emulate::Emulated;
use crate::shards::ShardLinks;
use crate::{telemetry, NodeError};

type Result<T> = std::result::Result<T, NodeError>;

/// How long a task waits for its weights from the shard aggregators.
const SHARD_WAIT: Duration = Duration::from_secs(600);

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Coordinator URL, e.g. `http://10.0.0.5:50051`.
    pub coordinator: String,
    /// Compute threads (reported to the coordinator; the caller sets them up).
    pub threads: usize,
    /// Where to compute.
    pub device: Device,
    /// How long to keep retrying to reach the coordinator (at start and
    /// after losing it).
    pub connect_timeout: Duration,
    /// Cluster token, sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// TLS settings (for `https://` coordinator URLs).
    pub tls: Option<ClientTls>,
    /// Deliberate misbehaviour, for tests of the coordinator's defences.
    pub fault: Option<Fault>,
    /// Offer to use the coordinator's shared-memory segments (used only when
    /// this node can map them, i.e. it runs on the coordinator's host).
    pub shared_memory: bool,
    /// Benchmarks only: wait this long per training step instead of
    /// computing, and answer a pseudo-gradient (see [`Emulated`]).
    pub emulate_compute: Option<Duration>,
}

/// PEM material for talking TLS to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificate(s) that signed the coordinator's certificate (PEM).
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM), when the coordinator asks for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to expect in the coordinator's certificate (default: the URL's host).
    pub domain: Option<String>,
}

/// A deliberate fault a node can be told to commit (for tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Every gradient it sends holds a NaN.
    NanGradients,
    /// Sleeps this long before answering each training task.
    Slow(Duration),
    /// One gradient element of every answer is 1e20: finite, but far beyond
    /// anything that trains.
    HugeGradient,
    /// Claims more correct predictions than samples and a negative loss.
    LieAboutCounts,
    /// Answers every training task with the wrong step number.
    WrongStep,
    /// Never says it received the weights (`Received`).
    NoReceipt,
    /// Reports every training task done without sending its gradient
    /// slices to the shard aggregators.
    WithholdSlices,
    /// Sends each gradient slice to the shard aggregators 64 times.
    FloodSlices,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "nan-gradients" => return Ok(Fault::NanGradients),
            "huge-gradient" => return Ok(Fault::HugeGradient),
            "lie-about-counts" => return Ok(Fault::LieAboutCounts),
            "wrong-step" => return Ok(Fault::WrongStep),
            "no-receipt" => return Ok(Fault::NoReceipt),
            "withhold-slices" => return Ok(Fault::WithholdSlices),
            "flood-slices" => return Ok(Fault::FloodSlices),
            _ => {}
        }
        if let Some(ms) = s.strip_prefix("slow=").and_then(|ms| ms.parse().ok()) {
            return Ok(Fault::Slow(Duration::from_millis(ms)));
        }
        Err(format!(
            "unknown fault {s:?}; use nan-gradients, huge-gradient, lie-about-counts, wrong-step, no-receipt, withhold-slices, flood-slices or slow=MILLISECONDS"
        ))
    }
}

/// Adds the cluster token to every request.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

fn auth(config: &NodeConfig) -> Result<Auth> {
    Ok(Auth(match &config.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| NodeError::Protocol("the token must be printable ASCII".into()))?,
        ),
        None => None,
    }))
}

async fn connect(config: &NodeConfig) -> Result<Client> {
    let started = Instant::now();
    let auth = auth(config)?.0;
    let endpoint = proto::endpoint(&config.coordinator).map_err(|e| {
        NodeError::Protocol(format!("bad coordinator URL {:?}: {e}", config.coordinator))
    })?;
    let endpoint = match &config.tls {
        None => endpoint,
        Some(tls) => {
            let mut cfg = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca {
                cfg = cfg.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                cfg = cfg.domain_name(domain.clone());
            }
            endpoint
                .tls_config(cfg)
                .map_err(|e| NodeError::Protocol(format!("TLS settings: {e}")))?
        }
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(
                    CoordinatorClient::with_interceptor(channel, Auth(auth.clone()))
                        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
                )
            }
            Err(e) if started.elapsed() < config.connect_timeout => {
                debug!("coordinator not reachable yet ({e}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(NodeError::Unreachable {
                    url: config.coordinator.clone(),
                    waited: started.elapsed(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

fn check_layout(
    what: &str,
    ours: impl Iterator<Item = TensorInfo>,
    theirs: &[TensorSpec],
) -> Result<()> {
    let ours: Vec<(String, Vec<u64>)> = ours
        .map(|i| (i.name, i.shape.iter().map(|&d| d as u64).collect()))
        .collect();
    let theirs: Vec<(String, Vec<u64>)> = theirs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    if ours != theirs {
        return Err(NodeError::Protocol(format!(
            "the coordinator's {what} layout differs from this node's model ({} vs {} tensors); run the same gradcast version everywhere",
            theirs.len(),
            ours.len()
        )));
    }
    Ok(())
}

fn build_model(reply: &JoinReply, device: &Device) -> Result<Model> {
    let shape: Vec<usize> = reply.sample_shape.iter().map(|&d| d as usize).collect();
    if shape != data::IMAGE_SHAPE {
        return Err(NodeError::Protocol(format!(
            "the coordinator sends samples of shape {shape:?}; this node's models take {:?}",
            data::IMAGE_SHAPE
        )));
    }
    let kind: ModelKind = reply.model.parse()?;
    let model = Model::new(
        ModelSpec {
            kind,
            dropout: reply.dropout,
        },
        0,
        device,
    )?;
    check_layout("parameter", model.params().cloned(), &reply.params)?;
    check_layout("state", model.buffers().cloned(), &reply.buffers)?;
    Ok(model)
}

/// Joins the coordinator and works until it says training is over. If the
/// coordinator goes away mid-run, reconnects (retrying for
/// `connect_timeout`) and joins again as a new node.
pub async fn run(config: NodeConfig) -> Result<()> {
    // When this node last joined (or started): retries stop `connect_timeout` after it.
    let mut joined_at = Instant::now();
    loop {
        match serve_once(&config, &mut joined_at).await {
            Err(e) if e.is_retryable() && joined_at.elapsed() < config.connect_timeout => {
                warn!("lost the coordinator ({e}); reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// The device as users write it: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        model::DeviceLocation::Cpu => "cpu".into(),
        model::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        model::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

async fn serve_once(config: &NodeConfig, joined_at: &mut Instant) -> Result<()> {
    let mut client = connect(config).await?;
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let reply = client
        .join(JoinRequest {
            hostname,
            device: device_name(&config.device),
            threads: config.threads as u32,
            protocol_version: proto::PROTOCOL_VERSION,
            shared_memory: config.shared_memory,
        })
        .await?
        .into_inner();
    let node_id = reply.node_id;
    *joined_at = Instant::now();
    let wire = Wire::from_dtype(reply.wire).ok_or_else(|| {
        NodeError::Protocol(format!(
            "the coordinator asks for gradients in dtype {}, which this node cannot write",
            reply.wire
        ))
    })?;
    let device = config.device.clone();
    let model = {
        let reply = reply.clone();
        tokio::task::spawn_blocking(move || build_model(&reply, &device))
            .await
            .map_err(|e| NodeError::Compute(e.to_string()))??
    };
    let model = Arc::new(model);
    let len = model.num_trainable() + model.num_state();
    let shared = reply
        .shared_memory
        .as_ref()
        .and_then(|offer| match Shared::open(offer, len) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                debug!("cannot map the coordinator's shared memory ({e}); using gRPC");
                None
            }
        });
    info!(
        node_id,
        model = %reply.model,
        data = if !reply.shards.is_empty() {
            "shard aggregators"
        } else if shared.is_some() {
            "shared memory"
        } else {
            "grpc"
        },
        %wire,
        "joined the coordinator"
    );

    let (tx, rx) = mpsc::channel::<NodeMessage>(64);
    tx.send(NodeMessage {
        kind: Some(Out::Hello(Hello {
            node_id,
            session_secret: reply.session_secret.clone(),
            shared_memory_proof: shared
                .as_ref()
                .map(|s| s.gradients.proof().to_vec().into())
                .unwrap_or_default(),
        })),
    })
    .await
    .map_err(|_| NodeError::Disconnected)?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    // The aggregators know this node once its session is open.
    let shards = if reply.shards.is_empty() {
        None
    } else {
        let links = ShardLinks::connect(
            &reply.shards,
            len,
            model.num_trainable(),
            node_id,
            &reply.session_secret,
            auth(config)?,
            config.tls.as_ref(),
        )
        .await?;
        Some(Arc::new(links))
    };

    let limit = (model.num_trainable() + model.num_state()) as u64;
    let mut chunks = ChunkReceiver::new(limit);
    // The weights received over gRPC (full, or rebuilt from changes), and
    // the version loaded into the model.
    let mut copy: Option<(u64, Vec<f32>)> = None;
    let mut held: Option<u64> = None;
    let session = Session {
        tx: tx.clone(),
        model: model.clone(),
        fault: config.fault,
        shared,
        shards,
        slot_step: AtomicU64::new(0),
        feedback: (wire == Wire::Bf16).then(|| Arc::new(Mutex::new(ErrorFeedback::default()))),
        emulated: config
            .emulate_compute
            .map(|delay| Arc::new(Emulated::new(delay, model.num_trainable()))),
    };
    if let Some(delay) = config.emulate_compute {
        warn!(
            ?delay,
            "emulating compute: every step waits instead of training (benchmarks only)"
        );
    }
    // The samples of a coming step's part, sent during the current one.
    let mut ahead: Option<SamplesAhead> = None;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(NodeError::Disconnected),
            Err(status) => return Err(status.into()),
        };
        match msg.kind {
            Some(In::Chunk(chunk)) => {
                telemetry::received(chunk.data.len());
                let complete = chunks
                    .push(&chunk)
                    .map_err(|e| NodeError::Protocol(e.to_string()))?;
                if let Some(buffer) = complete {
                    let version = buffer.version;
                    receive(buffer, &mut copy)?;
                    // Lets the coordinator start on the next node's weights.
                    if session.fault != Some(Fault::NoReceipt) {
                        session.send(Out::Received(Received { version })).await?;
                    }
                }
            }
            Some(In::Ahead(a)) => {
                telemetry::received(
                    a.samples
                        .as_ref()
                        .map_or(0, |s| s.images.len() + s.labels.len()),
                );
                ahead = Some(a);
            }
            Some(In::Train(mut task)) => {
                telemetry::received(
                    task.samples
                        .as_ref()
                        .map_or(0, |s| s.images.len() + s.labels.len()),
                );
                if task.samples_ahead {
                    task.samples = match ahead.take() {
                        Some(a) if a.step == task.step && a.part == task.part => a.samples,
                        _ => {
                            return Err(NodeError::Protocol(format!(
                                "step {} part {}: the samples were to come ahead, and did not",
                                task.step, task.part
                            )))
                        }
                    };
                }
                let step = task.step;
                let outcome = async {
                    if session.in_place(&task) {
                        // The step reads the shared weights where they are;
                        // the model's own dense weights are left stale.
                        held = None;
                    } else {
                        let shared = task.shared_memory;
                        session
                            .load(task.version, shared, &mut copy, &mut held)
                            .await?;
                    }
                    session.train(task).await
                }
                .await;
                session.report(step, outcome).await?;
            }
            Some(In::Eval(task)) => {
                telemetry::received(
                    task.samples
                        .as_ref()
                        .map_or(0, |s| s.images.len() + s.labels.len()),
                );
                let round = task.round;
                let outcome = async {
                    let shared = task.shared_memory;
                    session
                        .load(task.version, shared, &mut copy, &mut held)
                        .await?;
                    session.eval(task).await
                }
                .await;
                session.report(round, outcome).await?;
            }
            Some(In::Finish(f)) if f.evicted => return Err(NodeError::Evicted(f.reason)),
            Some(In::Finish(f)) => {
                info!(node_id, "coordinator finished: {}", f.reason);
                return Ok(());
            }
            None => debug!("ignoring an empty message"),
        }
    }
}

/// Takes a weights buffer from the coordinator: a whole version, or the
/// change from the version held to the next.
fn receive(buffer: Buffer, copy: &mut Option<(u64, Vec<f32>)>) -> Result<()> {
    match buffer.kind {
        BufferKind::Weights => *copy = Some((buffer.version, buffer.values)),
        BufferKind::WeightsDelta => match copy {
            Some((version, values))
                if *version == buffer.base_version && values.len() == buffer.values.len() =>
            {
                apply_delta(values, &buffer.values);
                *version = buffer.version;
            }
            _ => {
                return Err(NodeError::Protocol(format!(
                    "a change to weights version {} arrived, but this node holds {:?}",
                    buffer.base_version,
                    copy.as_ref().map(|c| c.0)
                )))
            }
        },
        kind => {
            return Err(NodeError::Protocol(format!(
                "unexpected buffer {kind:?} from the coordinator"
            )))
        }
    }
    Ok(())
}

/// The coordinator's segments, mapped by a node on its host.
struct Shared {
    weights: Segment,
    gradients: Segment,
}

impl Shared {
    fn open(offer: &SharedMemory, len: usize) -> std::result::Result<Self, proto::shm::ShmError> {
        Ok(Self {
            weights: Segment::open(std::path::Path::new(&offer.weights_path), len)?,
            gradients: Segment::open(std::path::Path::new(&offer.gradients_path), len)?,
        })
    }
}

/// The result of a training task (where its gradients went is for the
/// caller to say).
fn train_result(step: u64, part: u32, stats: &StepStats, seconds: f64) -> TrainResult {
    TrainResult {
        step,
        samples: stats.samples,
        loss_sum: stats.loss_sum,
        correct: stats.correct,
        compute_seconds: seconds,
        part,
        ..TrainResult::default()
    }
}

/// The step a node's answer names (the wrong one with `Fault::WrongStep`).
fn answered_step(fault: Option<Fault>, step: u64) -> u64 {
    match fault {
        Some(Fault::WrongStep) => step + 1000,
        _ => step,
    }
}

/// The faults that act once a training step is computed: waiting, or lying
/// about its counts.
async fn after_step(fault: Option<Fault>, stats: &mut StepStats) {
    match fault {
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::LieAboutCounts) => {
            stats.correct = 1000 * stats.samples;
            stats.loss_sum = -1e6;
        }
        _ => {}
    }
}

/// The faults that change the gradients a node sends.
fn corrupt(fault: Option<Fault>, gradients: &mut [f32]) {
    match (fault, gradients.first_mut()) {
        (Some(Fault::NanGradients), Some(g)) => *g = f32::NAN,
        (Some(Fault::HugeGradient), Some(g)) => *g = 1e20,
        _ => {}
    }
}

struct Session {
    tx: mpsc::Sender<NodeMessage>,
    model: Arc<Model>,
    fault: Option<Fault>,
    shared: Option<Arc<Shared>>,
    /// Links to the shard aggregators, when the coordinator has them.
    shards: Option<Arc<ShardLinks>>,
    /// 1 + the step whose answer is in the gradients segment (0: none).
    slot_step: AtomicU64,
    /// Rounds gradients sent over gRPC to bf16, carrying what rounding
    /// drops to the next step (None: they go as f32).
    feedback: Option<Arc<Mutex<ErrorFeedback>>>,
    /// Benchmarks only: steps wait and answer a pseudo-gradient.
    emulated: Option<Arc<Emulated>>,
}

fn samples(s: Option<Samples>) -> Result<Samples> {
    let s = s.ok_or_else(|| NodeError::Protocol("task without samples".into()))?;
    if s.labels.len() != s.count as usize || s.images.len() != s.count as usize * data::IMAGE_BYTES
    {
        return Err(NodeError::Protocol(format!(
            "task says {} samples but carries {} labels and {} image bytes",
            s.count,
            s.labels.len(),
            s.images.len()
        )));
    }
    Ok(s)
}

impl Session {
    async fn send(&self, kind: Out) -> Result<()> {
        self.tx
            .send(NodeMessage { kind: Some(kind) })
            .await
            .map_err(|_| NodeError::Disconnected)
    }

    fn shared(&self) -> Result<&Arc<Shared>> {
        self.shared.as_ref().ok_or_else(|| {
            NodeError::Protocol("task names shared memory, but this node has none mapped".into())
        })
    }

    /// Makes sure the model holds weights `version` (from the shared weights
    /// segment if `shared`, else from the copy received over gRPC).
    async fn load(
        &self,
        version: u64,
        shared: bool,
        copy: &mut Option<(u64, Vec<f32>)>,
        held: &mut Option<u64>,
    ) -> Result<()> {
        if *held == Some(version) {
            return Ok(());
        }
        let started = Instant::now();
        if let Some(links) = &self.shards {
            // Straight from the slices into the model: one copy of the
            // weights, not a joined buffer first.
            let model = &self.model;
            links
                .with_weights(version, SHARD_WAIT, |parts| model.set_weights_parts(parts))
                .await??;
            *held = Some(version);
            debug!(
                version,
                "loaded the shards' weights in {:?}",
                started.elapsed()
            );
            // The coordinator sends the next step's samples now, so that
            // they do not share this node's link with the weights.
            if self.fault != Some(Fault::NoReceipt) {
                self.send(Out::Received(Received { version })).await?;
            }
            return Ok(());
        }
        if shared {
            let segments = self.shared()?.clone();
            let model = self.model.clone();
            tokio::task::spawn_blocking(move || {
                segments
                    .weights
                    .with_values(version, |w| model.set_weights(w))
                    .map_err(|e| NodeError::Protocol(format!("shared weights: {e}")))?
                    .map_err(NodeError::from)
            })
            .await
            .map_err(|e| NodeError::Compute(e.to_string()))??;
            *held = Some(version);
            debug!(version, "loaded shared weights in {:?}", started.elapsed());
            return Ok(());
        }
        match copy.take() {
            Some((v, weights)) if v == version => {
                // The copy stays: the next version may come as a change to it.
                let model = self.model.clone();
                let weights = tokio::task::spawn_blocking(move || {
                    model.set_weights(&weights).map(|()| weights)
                })
                .await
                .map_err(|e| NodeError::Compute(e.to_string()))??;
                *copy = Some((v, weights));
                *held = Some(version);
                Ok(())
            }
            other => Err(NodeError::Protocol(format!(
                "task needs weights version {version} but this node has {:?}",
                other.map(|(v, _)| v).or(*held)
            ))),
        }
    }

    /// Whether training task `task` runs on the shared weights segment in
    /// place (`Model::train_step_in_place`: the dense layers read their
    /// weights there and write their gradients straight into this node's
    /// segment) instead of loading the weights into the model first:
    /// exactly the tasks whose answer `train` writes into the segment,
    /// unless the compute is emulated (which loads them).
    fn in_place(&self, task: &TrainTask) -> bool {
        let step = answered_step(self.fault, task.step);
        task.shared_memory
            && self.shared.is_some()
            && self.shards.is_none()
            && self.emulated.is_none()
            && self.slot_step.load(Ordering::Relaxed) != step + 1
    }

    async fn train(&self, task: TrainTask) -> Result<()> {
        if let Some(links) = &self.shards {
            return self.train_sharded(task, links.clone()).await;
        }
        let s = samples(task.samples)?;
        let model = self.model.clone();
        let started = Instant::now();
        let fault = self.fault;
        let step = answered_step(fault, task.step);
        // Gradients and state go straight into the shared segment when the
        // task says so, else into vectors sent as chunks. The segment holds
        // one answer per step: the coordinator reads it in place until the
        // step's update, so a second part of the same step (a lost node's,
        // reassigned here) travels as chunks.
        let slot_free = self.slot_step.load(Ordering::Relaxed) != step + 1;
        let shared = if task.shared_memory && slot_free {
            self.slot_step.store(step + 1, Ordering::Relaxed);
            Some(self.shared()?.clone())
        } else {
            None
        };
        let in_segment = shared.is_some();
        let feedback = self.feedback.clone();
        let emulated = self.emulated.clone();
        let version = task.version;
        let computed = tokio::task::spawn_blocking(move || -> Result<_> {
            let (images, labels, seed) = (&s.images[..], &s.labels[..], task.seed);
            match shared {
                Some(segments) => {
                    let stats = segments.gradients.write_with(step, |out| {
                        // (Here the task is `in_place`: the serve loop did
                        // not load the weights, the step reads them.)
                        let stats = match &emulated {
                            Some(e) => e.train_into(&model, s.count, out)?,
                            None => segments
                                .weights
                                .with_values(version, |w| {
                                    model.train_step_in_place(w, images, labels, seed, out)
                                })
                                .map_err(|e| {
                                    NodeError::Protocol(format!("shared weights: {e}"))
                                })??,
                        };
                        corrupt(fault, out);
                        Ok::<_, NodeError>(stats)
                    })?;
                    Ok((stats, None, Duration::ZERO))
                }
                None => {
                    // An emulated step answers its fixed gradient without a copy.
                    let (stats, mut gradients, state) = match &emulated {
                        Some(e) => (
                            e.train(s.count),
                            Cow::Borrowed(e.gradients()),
                            model.state()?,
                        ),
                        None => {
                            let out = model.train_step(images, labels, seed)?;
                            let stats = StepStats {
                                loss_sum: out.loss_sum,
                                correct: out.correct,
                                samples: out.samples,
                            };
                            (stats, Cow::Owned(out.gradients), out.state)
                        }
                    };
                    if fault.is_some() {
                        corrupt(fault, gradients.to_mut());
                    }
                    // Encoding is part of the transfer, not of the compute
                    // time reported (it runs here to stay off the runtime).
                    let encoding = Instant::now();
                    let kind = BufferKind::Gradients;
                    let size = proto::DEFAULT_CHUNK_BYTES;
                    let gradients = match feedback {
                        Some(f) => {
                            let mut f = f.lock().map_err(|_| {
                                NodeError::Compute("error feedback poisoned".into())
                            })?;
                            Chunker::encoded(kind, step, Wire::Bf16, f.encode(&gradients), size)
                        }
                        None => Chunker::new(kind, step, &gradients, size),
                    };
                    let state = Chunker::new(BufferKind::State, step, &state, size);
                    Ok((stats, Some([gradients, state]), encoding.elapsed()))
                }
            }
        })
        .await
        .map_err(|e| NodeError::Compute(e.to_string()))??;
        let (mut stats, buffers, encoding) = computed;
        after_step(fault, &mut stats).await;
        let seconds = started.elapsed().saturating_sub(encoding).as_secs_f64();
        telemetry::task("train", stats.samples, seconds);
        for chunker in buffers.iter().flatten() {
            for chunk in chunker.chunks() {
                telemetry::sent(chunk.data.len());
                self.send(Out::Chunk(chunk)).await?;
            }
        }
        self.send(Out::Train(TrainResult {
            shared_memory: in_segment,
            ..train_result(step, task.part, &stats, seconds)
        }))
        .await
    }

    /// A training task whose answer goes to the shard aggregators.
    async fn train_sharded(&self, task: TrainTask, links: Arc<ShardLinks>) -> Result<()> {
        let s = samples(task.samples)?;
        let model = self.model.clone();
        let started = Instant::now();
        let fault = self.fault;
        let step = answered_step(fault, task.step);
        let emulated = self.emulated.clone();
        let feedback = self.feedback.clone();
        let (mut stats, answer, bf16) = tokio::task::spawn_blocking(move || -> Result<_> {
            let trainable = model.num_trainable();
            let mut answer = vec![0.0f32; trainable + model.num_state()];
            let stats = match &emulated {
                Some(e) => e.train_into(&model, s.count, &mut answer)?,
                None => model.train_step_into(&s.images, &s.labels, task.seed, &mut answer)?,
            };
            corrupt(fault, &mut answer);
            // On the bf16 wire the gradients are rounded once, with error
            // feedback, and each aggregator gets its slice of them.
            let bf16 = match feedback {
                Some(f) => {
                    let mut f = f
                        .lock()
                        .map_err(|_| NodeError::Compute("error feedback poisoned".into()))?;
                    Some(f.encode(&answer[..trainable]))
                }
                None => None,
            };
            Ok((stats, answer, bf16))
        })
        .await
        .map_err(|e| NodeError::Compute(e.to_string()))??;
        after_step(fault, &mut stats).await;
        let seconds = started.elapsed().as_secs_f64();
        telemetry::task("train", stats.samples, seconds);
        let copies = match fault {
            Some(Fault::WithholdSlices) => 0,
            Some(Fault::FloodSlices) => 64,
            _ => 1,
        };
        for _ in 0..copies {
            links.push(step, task.part, &answer, bf16.as_ref()).await?;
        }
        self.send(Out::Train(TrainResult {
            sharded: true,
            ..train_result(step, task.part, &stats, seconds)
        }))
        .await
    }

    async fn eval(&self, task: EvalTask) -> Result<()> {
        let s = samples(task.samples)?;
        let model = self.model.clone();
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || model.evaluate(&s.images, &s.labels))
            .await
            .map_err(|e| NodeError::Compute(e.to_string()))??;
        let seconds = started.elapsed().as_secs_f64();
        telemetry::task("eval", out.samples, seconds);
        self.send(Out::Eval(EvalResult {
            round: task.round,
            part: task.part,
            samples: out.samples,
            loss_sum: out.loss_sum,
            correct: out.correct,
            compute_seconds: seconds,
        }))
        .await
    }

    /// Passes a task's failure on to the coordinator before giving up.
    async fn report(&self, step: u64, outcome: Result<()>) -> Result<()> {
        if let Err(e) = &outcome {
            warn!(step, "task failed: {e}");
            let _ = self
                .send(Out::Error(WireError {
                    step,
                    message: e.to_string(),
                }))
                .await;
        }
        outcome
    }
}
