//! The synchronous training loop: one task that owns the weights and the
//! optimizer, cuts each step into parts and hands them to the [`Cluster`]
//! (which owns the membership and gets the answers back), then averages
//! and updates.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use data::{epoch_order, Dataset, Rng};
use model::{Device, Model, TensorInfo};
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::{Commit, Dtype, JoinReply, PlannedPart, TensorSpec};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use std::sync::Arc;

use crate::aggregate::{
    add_l2_block, average_block, average_gradients, l2_gradient_norm_bound, l2_penalty, L2Range,
};
use crate::cluster::{Cluster, Limits, Work};
use crate::optimizer::GRADIENT_NORM_LIMIT;
use crate::optimizer::{from_buffer, new_optimizer};
use crate::plane::SharedPlane;
use crate::resume::{self, Position};
use crate::service::{Service, TokenCheck, EVENT_QUEUE};
use crate::shard::link::{Aggregators, Readiness, Start};
use crate::task::{samples, Answer, Gradients, Task};
use crate::telemetry;
use crate::{l2_value, CoordinatorError, History, Optimizer, Security, TrainConfig, WeightedSum};
use proto::v1::Samples;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Test samples per evaluation task.
const EVAL_PART: usize = 1000;
/// How long the shard aggregators may take to send their slices back.
const DUMP_WAIT: Duration = Duration::from_secs(300);
/// Seconds between progress lines within an epoch.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// What a finished training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// One entry per epoch.
    pub history: History,
    /// Final weights buffer (trainable parameters, then state).
    pub weights: Vec<f32>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Nodes (by id) that used the shared-memory data plane.
    pub shared_memory_nodes: usize,
}

impl TrainReport {
    /// Test accuracy after the last epoch.
    pub fn final_val_accuracy(&self) -> Option<f64> {
        self.history.val_accuracy.last().copied()
    }
}

/// Sums of one phase (a training epoch or an evaluation).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    loss_sum: f64,
    correct: u64,
    samples: u64,
}

impl Tally {
    fn add(&mut self, loss_sum: f64, correct: u32, samples: u32) {
        self.loss_sum += loss_sum;
        self.correct += correct as u64;
        self.samples += samples as u64;
    }
    fn merge(&mut self, other: &Tally) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.samples += other.samples;
    }
    fn loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }
}

fn specs(infos: impl Iterator<Item = TensorInfo>) -> Vec<TensorSpec> {
    infos
        .map(|i| TensorSpec {
            name: i.name,
            shape: i.shape.iter().map(|&d| d as u64).collect(),
            dtype: Dtype::F32 as i32,
        })
        .collect()
}

/// Serves the coordinator on `listener` and trains until done. Returns when
/// training has finished and every node was told so, or when `shutdown`
/// resolves (then with [`CoordinatorError::Cancelled`]). `security` sets the
/// cluster token and TLS.
pub async fn serve(
    listener: TcpListener,
    config: TrainConfig,
    train: Dataset,
    test: Dataset,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> Result<TrainReport> {
    if config.batch_size == 0 || config.nodes == 0 || train.is_empty() || test.is_empty() {
        return Err(CoordinatorError::Config(
            "batch size, node count, training and test set must all be non-empty".into(),
        ));
    }
    let model = Model::new(config.model, config.seed, &Device::Cpu)?;
    let params: Vec<TensorInfo> = model.params().cloned().collect();
    let layout: Vec<TensorInfo> = model.params().chain(model.buffers()).cloned().collect();
    let (num_trainable, num_state) = (model.num_trainable(), model.num_state());
    let mut reply = JoinReply {
        node_id: 0,
        model: config.model.kind.to_string(),
        params: specs(model.params().cloned()),
        buffers: specs(model.buffers().cloned()),
        max_message_bytes: proto::MAX_MESSAGE_BYTES as u64,
        dropout: config.model.dropout,
        wire: config.wire.dtype() as i32,
        sample_shape: data::IMAGE_SHAPE.iter().map(|&d| d as u32).collect(),
        ..JoinReply::default()
    };
    let weights = model.weights()?;
    let aggregators = if config.aggregators.is_empty() {
        None
    } else {
        let wait = config.join_timeout.unwrap_or(Duration::from_secs(120));
        let aggregators = Aggregators::connect(
            &config.aggregators,
            security.token.as_deref(),
            security.aggregator_ca.as_deref(),
            weights.len(),
            wait,
        )
        .await?;
        reply.shards = aggregators.shards();
        Some(aggregators)
    };
    let plane = match &config.shared_memory {
        // Nodes exchange their weights and gradients with the aggregators.
        Some(_) if aggregators.is_some() => None,
        Some(dir) => match SharedPlane::new(dir, weights.len(), num_trainable + num_state) {
            Ok(plane) => Some(Arc::new(plane)),
            Err(e) => {
                warn!("no shared-memory data plane ({e}); every node will use gRPC");
                None
            }
        },
        None => None,
    };
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let limits = Limits {
        step_timeout: config.step_timeout,
        min_nodes: config.min_nodes,
        rejoin_timeout: config.rejoin_timeout,
        balance: config.balance,
        wire: config.wire,
    };
    let mut trainer = Trainer {
        weights,
        cluster: Cluster::new(
            limits,
            events,
            plane.clone(),
            aggregators.as_ref().map(Aggregators::notice),
        ),
        aggregators,
        shard_iterations: 0,
        optimizer: new_optimizer(config.optimizer, num_trainable),
        num_trainable,
        params,
        layout,
        // Only clipping needs the averaged gradient whole (the update
        // makes it block by block otherwise).
        grads: vec![
            0.0;
            if config.clip_norm.is_some() {
                num_trainable
            } else {
                0
            }
        ],
        config,
        train,
        test,
        step: 0,
        history: History::default(),
        epoch_work: BTreeMap::new(),
        epoch_phases: telemetry::StepPhases::default(),
        l2: Vec::new(),
        ahead: None,
    };
    let mut at = 0;
    for p in &trainer.params {
        if p.l2 > 0.0 {
            trainer.l2.push(L2Range {
                range: at..at + p.numel(),
                l2: p.l2,
            });
        }
        at += p.numel();
    }
    drop(model);
    let position = trainer.restore()?;
    if let Some(aggregators) = &trainer.aggregators {
        trainer.shard_iterations = trainer.optimizer.iterations();
        // A node may be given every part of a step (when the others are lost).
        let max_parts = trainer.config.nodes.clamp(1, 1 << 16) as u32;
        aggregators
            .setup(Start {
                weights: &trainer.weights,
                num_trainable: trainer.num_trainable,
                l2: &trainer.l2,
                optimizer: trainer.optimizer.as_ref(),
                version: trainer.step,
                max_parts,
                wire: trainer.config.wire,
            })
            .await?;
    }
    let token = TokenCheck::new(security.token.as_deref());
    let service = Service::new(events_tx, reply, num_trainable, num_state, plane);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key));
        if let Some(ca) = tls.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg)?;
    }
    // Standard gRPC health (`grpc.health.v1`, no token needed, for
    // Kubernetes probes and `gradcast healthcheck --grpc`): SERVING while
    // nodes can join and train, NOT_SERVING before and after.
    let (health, health_service) = tonic_health::server::health_reporter();
    let coordinator_name = <CoordinatorServer<Service> as tonic::server::NamedService>::NAME;
    let set_health = |status| {
        let health = health.clone();
        async move {
            for name in ["", coordinator_name] {
                health.set_service_status(name, status).await;
            }
        }
    };
    set_health(ServingStatus::NotServing).await;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                CoordinatorServer::new(service)
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
                token,
            ))
            .serve_with_incoming_shutdown(
                // The builder's `tcp_nodelay` only reaches sockets it accepts
                // itself: without it here, Nagle's algorithm holds back the
                // tail of each task until the node's delayed ACK (~40 ms).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = server_stopped.await;
                },
            ),
    );
    set_health(ServingStatus::Serving).await;
    let outcome = tokio::select! {
        r = trainer.run(position) => r,
        _ = shutdown => Err(CoordinatorError::Cancelled),
    };
    set_health(ServingStatus::NotServing).await;
    let reason = match &outcome {
        Ok(_) => "training complete".to_string(),
        Err(e) => format!("training stopped: {e}"),
    };
    trainer.cluster.dismiss(&reason).await;
    let _ = stop_server.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!("gRPC server ended with an error: {e}"),
        Err(_) => warn!("gRPC server did not stop within 5 s; leaving it"),
        _ => {}
    }
    outcome?;
    Ok(TrainReport {
        history: trainer.history,
        weights: trainer.weights,
        steps: trainer.step,
        shared_memory_nodes: trainer.cluster.shared_memory_nodes(),
    })
}

/// `wait`, stopped at once (with why) if a shard aggregator fails
/// meanwhile: a lost aggregator must not leave the run waiting for nodes.
async fn watched<T>(
    aggregators: Option<&mut Aggregators>,
    wait: impl Future<Output = Result<T>>,
) -> Result<T> {
    match aggregators {
        Some(aggregators) => tokio::select! {
            r = wait => r,
            e = aggregators.failed() => Err(e),
        },
        None => wait.await,
    }
}

/// [`Cluster::run`], [`watched`].
async fn run_watched(
    cluster: &mut Cluster,
    aggregators: Option<&mut Aggregators>,
    work: &Work<'_>,
    tasks: &[Task],
    owners: &[u64],
) -> Result<(Vec<(u64, Answer)>, tokio::time::Instant)> {
    watched(aggregators, cluster.run(work, tasks, owners)).await
}

struct Trainer {
    config: TrainConfig,
    params: Vec<TensorInfo>,
    /// Names and shapes of the whole weights buffer (params, then state).
    layout: Vec<TensorInfo>,
    num_trainable: usize,
    /// Trainable parameters, then BatchNorm running statistics.
    weights: Vec<f32>,
    /// The nodes, and how work is run on them.
    cluster: Cluster,
    optimizer: Box<dyn Optimizer>,
    train: Dataset,
    test: Dataset,
    /// Optimizer steps taken; also the version of `weights`.
    step: u64,
    history: History,
    /// Samples and compute seconds of each node in the current epoch.
    epoch_work: BTreeMap<u64, (u64, f64)>,
    /// Where the current epoch's step time went.
    epoch_phases: telemetry::StepPhases,
    /// The averaged gradient of the current step, with clipping (empty
    /// without: the update makes it block by block).
    grads: Vec<f32>,
    /// The runs of trainable parameters with L2 regularisation.
    l2: Vec<L2Range>,
    /// The next step's samples, cut and sent to the nodes during the
    /// current step.
    ahead: Option<Ahead>,
    /// Shard aggregators, when they hold the weights and the optimizer
    /// (`weights` and `optimizer` here are then brought up to date only for
    /// checkpoints and the end: see [`Trainer::sync_shards`]).
    aggregators: Option<Aggregators>,
    /// Updates the aggregators applied.
    shard_iterations: u64,
}

/// A step's samples as they were cut (and sent) a step ahead: if the step's
/// shares are still these, its tasks reuse them and go without samples.
struct Ahead {
    step: u64,
    shares: Vec<(u64, usize)>,
    /// One per share, in part order.
    samples: Vec<Samples>,
}

impl Trainer {
    /// Loads the resume state if asked to and one exists.
    fn restore(&mut self) -> Result<Position> {
        let fingerprint = resume::fingerprint(&self.config, self.train.len());
        let fresh = Position {
            fingerprint: fingerprint.clone(),
            ..Position::default()
        };
        let (true, Some(dir)) = (self.config.resume, &self.config.checkpoint_dir) else {
            return Ok(fresh);
        };
        let Some(mut saved) = resume::load(dir)? else {
            info!(
                "--resume: no state in {} yet; starting from scratch",
                dir.display()
            );
            return Ok(fresh);
        };
        let path = saved.path.clone();
        if saved.position.fingerprint != fingerprint {
            return Err(CoordinatorError::Config(format!(
                "{} was written for {}, this run is {}",
                path.display(),
                saved.position.fingerprint,
                fingerprint
            )));
        }
        if saved.weights.len() != self.weights.len() {
            return Err(CoordinatorError::Config(format!(
                "{}: weights of the wrong size",
                path.display()
            )));
        }
        let iterations = saved.position.iterations;
        self.optimizer
            .restore(&mut |name| saved.optimizer_state(name), iterations)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?;
        let p = saved.position;
        self.weights = saved.weights;
        self.step = p.step;
        self.history = p.history.clone();
        info!(
            step = p.step,
            epoch = p.epoch + 1,
            batch = p.batch,
            "resuming from {}",
            path.display()
        );
        Ok(p)
    }

    fn save_state(&self, position: Position) -> Result<()> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        resume::save(dir, &position, &self.weights, &self.optimizer.state())
    }

    async fn run(&mut self, start: Position) -> Result<()> {
        let nodes = self.config.nodes;
        let wait = self
            .cluster
            .wait_for(nodes, self.config.join_timeout, "--nodes");
        watched(self.aggregators.as_mut(), wait).await?;
        let n = self.train.len();
        let bs = self.config.batch_size;
        let steps_per_epoch = n.div_ceil(bs);
        info!(
            model = %self.config.model.kind,
            train = n,
            test = self.test.len(),
            batch = bs,
            steps_per_epoch,
            trainable = self.num_trainable,
            state = self.weights.len() - self.num_trainable,
            augment = self.config.augment,
            "training starts"
        );
        for epoch in start.epoch..self.config.epochs {
            let lr = self.config.lr_schedule.lr(self.config.lr, epoch);
            telemetry::epoch(epoch + 1, lr);
            let order = epoch_order(n, self.config.seed, epoch as u64);
            let started = Instant::now();
            let mut last_progress = Instant::now();
            if let Some(p) = &self.config.progress {
                p.epoch_started(epoch + 1, self.config.epochs, steps_per_epoch);
            }
            let first = if epoch == start.epoch { start.batch } else { 0 };
            self.epoch_work.clear();
            self.epoch_phases = telemetry::StepPhases::default();
            let mut tally = Tally::default();
            let mut penalty = 0.0;
            if first > 0 {
                tally = Tally {
                    loss_sum: start.loss_sum,
                    correct: start.correct,
                    samples: start.samples,
                };
                penalty = start.penalty;
            }
            let resumed_samples = tally.samples;
            let mut batches = order.chunks(bs).enumerate().skip(first).peekable();
            while let Some((i, batch)) = batches.next() {
                let next = batches.peek().map(|&(_, b)| b);
                let (step_tally, step_penalty) = self.train_step(batch, next, lr).await?;
                tally.merge(&step_tally);
                penalty += step_penalty;
                let running_loss = tally.loss() + penalty / (i + 1) as f64;
                telemetry::step_done(step_tally.samples, running_loss, tally.accuracy());
                let rate =
                    (tally.samples - resumed_samples) as f64 / started.elapsed().as_secs_f64();
                if let Some(p) = &self.config.progress {
                    p.step(i + 1, rate, running_loss, tally.accuracy());
                } else if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    info!(
                        "epoch {}/{} step {}/{} loss {:.4} accuracy {:.4} ({:.0} samples/s)",
                        epoch + 1,
                        self.config.epochs,
                        i + 1,
                        steps_per_epoch,
                        running_loss,
                        tally.accuracy(),
                        rate
                    );
                }
                let every = self.config.checkpoint_every;
                if every > 0 && self.step.is_multiple_of(every) && i + 1 < steps_per_epoch {
                    if self.config.checkpoint_dir.is_some() {
                        self.sync_shards().await?;
                    }
                    self.save_state(Position {
                        step: self.step,
                        epoch,
                        batch: i + 1,
                        loss_sum: tally.loss_sum,
                        correct: tally.correct,
                        samples: tally.samples,
                        penalty,
                        iterations: self.optimizer.iterations(),
                        history: self.history.clone(),
                        fingerprint: start.fingerprint.clone(),
                    })?;
                }
            }
            let train_secs = started.elapsed().as_secs_f64();
            let val = self.evaluate(epoch as u64).await?;
            self.sync_shards().await?;
            let reg = l2_value(self.params.iter(), &self.weights[..self.num_trainable]);
            let h = &mut self.history;
            h.loss.push(tally.loss() + penalty / steps_per_epoch as f64);
            h.accuracy.push(tally.accuracy());
            h.val_loss.push(val.loss() + reg);
            h.val_accuracy.push(val.accuracy());
            h.lr.push(lr);
            telemetry::validation(val.loss() + reg, val.accuracy());
            if let Some(p) = &self.config.progress {
                p.epoch_finished(epoch + 1, val.loss() + reg, val.accuracy());
            }
            info!(
                "epoch {}/{}: loss {:.4} accuracy {:.4} val_loss {:.4} val_accuracy {:.4} lr {:.2e} ({} samples in {:.1} s, {:.0} samples/s)",
                epoch + 1,
                self.config.epochs,
                h.loss[epoch as usize],
                h.accuracy[epoch as usize],
                h.val_loss[epoch as usize],
                h.val_accuracy[epoch as usize],
                lr,
                tally.samples,
                train_secs,
                tally.samples as f64 / train_secs
            );
            info!(
                "epoch {}/{} step time: {}",
                epoch + 1,
                self.config.epochs,
                self.epoch_phases
            );
            for (node, (samples, secs)) in &self.epoch_work {
                info!(
                    "epoch {}/{} node {node}: {samples} samples, {secs:.1} s compute ({:.0} samples/s)",
                    epoch + 1,
                    self.config.epochs,
                    *samples as f64 / secs.max(1e-9)
                );
            }
            if let Some(path) = &self.config.history {
                self.history
                    .write(path)
                    .map_err(|source| CoordinatorError::History {
                        path: path.clone(),
                        source,
                    })?;
            }
            self.checkpoint(&format!("epoch-{:04}", epoch + 1), epoch + 1)?;
            self.save_state(Position {
                step: self.step,
                epoch: epoch + 1,
                iterations: self.optimizer.iterations(),
                history: self.history.clone(),
                fingerprint: start.fingerprint.clone(),
                ..Position::default()
            })?;
        }
        if self.config.epochs > 0 {
            self.checkpoint("final", self.config.epochs)?;
        }
        Ok(())
    }

    /// Brings `weights` and the optimizer's state up to date from the shard
    /// aggregators (a no-op without them).
    async fn sync_shards(&mut self) -> Result<()> {
        let Some(aggregators) = &mut self.aggregators else {
            return Ok(());
        };
        let names: Vec<&'static str> = self.optimizer.state().iter().map(|(n, _)| *n).collect();
        let (weights, state) = aggregators
            .dump(
                self.step,
                self.weights.len(),
                self.num_trainable,
                names.len(),
                DUMP_WAIT.max(self.config.step_timeout),
            )
            .await?;
        self.weights = weights;
        let mut by_name: HashMap<&str, Vec<f32>> = names.into_iter().zip(state).collect();
        self.optimizer
            .restore(&mut |name| by_name.remove(name), self.shard_iterations)
            .map_err(|e| CoordinatorError::Aggregator(format!("optimizer state: {e}")))
    }

    /// The update of a step whose answers went to the shard aggregators:
    /// names the parts to them, waits until every slice is in and averaged
    /// (computing again the parts whose nodes did not deliver, or delivered
    /// non-finite values, on other nodes: `answers` then holds the new
    /// ones), decides whether the step is usable and commits it. `planned`:
    /// the plan sent with the tasks (attempt 0). Returns the step's L2
    /// penalty.
    async fn sharded_update(
        &mut self,
        answers: &mut [(u64, Answer)],
        tasks: &[Task],
        lr: f64,
        phase: &str,
        mut planned: Vec<PlannedPart>,
    ) -> Result<f64> {
        let step = self.step;
        // As long as a node may take to answer: a slice that is merely slow
        // on its link is not a missing one.
        let wait = self.config.step_timeout;
        let mut attempt = 0u32;
        // Set when the aggregators named nodes to drop: those must be gone.
        let mut dropped = false;
        loop {
            // Parts of nodes that left (or were evicted) after answering are
            // computed again: the aggregators dropped their slices.
            let members = self.cluster.members();
            let redo: Vec<usize> = answers
                .iter()
                .enumerate()
                .filter(|(_, (node, _))| !members.contains(node))
                .map(|(i, _)| i)
                .collect();
            if redo.is_empty() && dropped {
                return Err(CoordinatorError::Aggregator(format!(
                    "{phase}: the aggregators lack slices of nodes that are still members"
                )));
            }
            dropped = false;
            if !redo.is_empty() {
                info!("{phase}: computing parts {redo:?} again on other nodes");
                watched(self.aggregators.as_mut(), self.cluster.ensure_min(phase)).await?;
                let members = self.cluster.members();
                let owners: Vec<u64> = (0..redo.len())
                    .map(|i| members[i % members.len().max(1)])
                    .collect();
                // As they were: samples went ahead only to the part's first
                // node, and the cluster sends them to any other.
                let again: Vec<Task> = redo.iter().map(|&p| tasks[p].clone()).collect();
                let work = Work {
                    phase,
                    version: step,
                    round: 0,
                    weights: &[],
                    parts: Some(&redo),
                };
                let (answered, _) = run_watched(
                    &mut self.cluster,
                    self.aggregators.as_mut(),
                    &work,
                    &again,
                    &owners,
                )
                .await?;
                for (&p, a) in redo.iter().zip(answered) {
                    answers[p] = a;
                }
                // A new plan, whoever computed the parts this time.
                planned.clear();
                continue;
            }
            let parts: Vec<PlannedPart> = answers
                .iter()
                .enumerate()
                .map(|(i, (node, a))| PlannedPart {
                    part: i as u32,
                    node_id: *node,
                    samples: match a {
                        Answer::Train { result, .. } => result.samples,
                        Answer::Eval(_) => 0,
                    },
                })
                .collect();
            let Some(aggregators) = self.aggregators.as_mut() else {
                return Ok(0.0);
            };
            if parts != planned {
                attempt += 1;
                aggregators.plan(step, attempt, parts.clone()).await?;
            }
            // A planned node that leaves now takes its slices with it: its
            // parts are computed again at once, not after the wait.
            let nodes: Vec<u64> = parts.iter().map(|p| p.node_id).collect();
            let readiness = tokio::select! {
                r = aggregators.ready(step, attempt, parts.len(), wait) => r?,
                gone = self.cluster.departure(&nodes) => {
                    let node = gone?;
                    info!(step, node, "{phase}: a node left before every slice was in");
                    continue;
                }
            };
            let (missing, bad) = match readiness {
                Readiness::Ready {
                    squares,
                    penalty,
                    part_squares,
                } => {
                    // A node that keeps sending huge gradients is evicted,
                    // as without aggregators (its answer still counts).
                    for (p, sq) in parts.iter().zip(&part_squares) {
                        self.cluster.note_norm(phase, p.node_id, sq.sqrt());
                    }
                    // The same test as without aggregators: the bound on the
                    // mean's norm from the parts' norms, or the mean's own.
                    let fused = self.l2.is_empty() && self.config.clip_norm.is_none();
                    let norm = if fused {
                        let total: f64 = parts.iter().map(|p| p.samples as f64).sum();
                        parts
                            .iter()
                            .zip(&part_squares)
                            .map(|(p, s)| p.samples as f64 / total.max(1e-300) * s.sqrt())
                            .sum()
                    } else {
                        squares.sqrt()
                    };
                    let usable = norm <= GRADIENT_NORM_LIMIT;
                    if usable {
                        self.shard_iterations += 1;
                    } else {
                        warn!(
                            step,
                            "skipping the update: the averaged gradient's norm is {norm:e} (limit {GRADIENT_NORM_LIMIT:e})"
                        );
                        telemetry::step_skipped();
                    }
                    let commit = Commit {
                        step,
                        lr,
                        apply: usable,
                        norm,
                        clip_norm: self.config.clip_norm.unwrap_or(0.0),
                    };
                    let Some(aggregators) = self.aggregators.as_mut() else {
                        return Ok(penalty);
                    };
                    aggregators.commit(commit).await?;
                    return Ok(penalty);
                }
                Readiness::Problems { missing, bad } => (missing, bad),
                Readiness::CutOff {
                    node,
                    aggregator,
                    reason,
                } => {
                    // The node can neither deliver nor receive slices now:
                    // out at once, its parts (if planned) computed again.
                    warn!(
                        step,
                        node, "aggregator {aggregator} cut the node off: {reason}"
                    );
                    self.cluster.evict(
                        node,
                        &format!("cut off by shard aggregator {aggregator}: {reason}"),
                    );
                    continue;
                }
            };
            for &(part, node) in &bad {
                warn!(step, part, node, "non-finite values in a gradient slice");
                self.cluster
                    .evict(node, "sent non-finite values to a shard aggregator");
            }
            for &(part, node) in &missing {
                warn!(
                    step,
                    part,
                    node,
                    "a gradient slice did not reach its aggregator within --step-timeout"
                );
                self.cluster
                    .evict(node, "did not deliver its answer to every shard aggregator");
            }
            dropped = true;
        }
    }

    /// Writes `DIR/{name}.safetensors` if a checkpoint folder is configured.
    fn checkpoint(&self, name: &str, epoch: u32) -> Result<()> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| CoordinatorError::checkpoint(dir, e))?;
        let mut metadata: HashMap<String, String> = self
            .config
            .describe()
            .into_iter()
            .map(|(k, v)| (format!("gradcast.config.{k}"), v))
            .collect();
        metadata.insert("gradcast.epoch".into(), epoch.to_string());
        metadata.insert("gradcast.step".into(), self.step.to_string());
        if let Some(acc) = self.history.val_accuracy.last() {
            metadata.insert("gradcast.val_accuracy".into(), acc.to_string());
        }
        let path = dir.join(format!("{name}.safetensors"));
        model::save_checkpoint(
            &path,
            &self.config.model.kind.to_string(),
            self.layout.iter(),
            &self.weights,
            metadata,
        )
        .map_err(CoordinatorError::Model)?;
        debug!("wrote {}", path.display());
        Ok(())
    }

    /// The samples of each share of `batch` in step `step` (augmented if
    /// asked), in part order.
    fn cut(&self, step: u64, batch: &[u32], shares: &[(u64, usize)]) -> Vec<Samples> {
        let mut offset = 0;
        shares
            .iter()
            .map(|&(_, count)| {
                let (mut images, labels) = self.train.gather(&batch[offset..offset + count]);
                if self.config.augment {
                    // Drawn per sample where the batch is cut into shares,
                    // so every node gets the same pixels for a sample
                    // whatever the split, and nodes stay unaware of
                    // augmentation.
                    data::augment::augment_batch(
                        &mut images,
                        self.config.seed,
                        step,
                        offset as u64,
                    );
                }
                offset += count;
                samples(images, labels)
            })
            .collect()
    }

    /// One synchronous step over the samples `batch`; the samples of
    /// `next`, the batch of the following step, are sent during it. Returns
    /// the step's tally and its L2 penalty.
    async fn train_step(
        &mut self,
        batch: &[u32],
        next: Option<&[u32]>,
        lr: f64,
    ) -> Result<(Tally, f64)> {
        let phase = format!("step {}", self.step);
        watched(self.aggregators.as_mut(), self.cluster.ensure_min(&phase)).await?;
        let started = Instant::now();
        let shares = self.cluster.shares(batch.len());
        // The samples cut a step ahead, if they were cut by these shares.
        let kept = self
            .ahead
            .take()
            .filter(|a| a.step == self.step && a.shares == shares);
        let ahead = kept.is_some();
        let cut = match kept {
            Some(a) => a.samples,
            None => self.cut(self.step, batch, &shares),
        };
        let mut tasks = Vec::with_capacity(shares.len());
        let mut owners = Vec::with_capacity(shares.len());
        for (part, (&(node, _), samples)) in shares.iter().zip(cut).enumerate() {
            let seed = Rng::derive(self.config.seed, &[0xD0, self.step, part as u64]).next_u64();
            tasks.push(Task::Train {
                samples,
                seed,
                ahead,
            });
            owners.push(node);
        }
        if let Some(next) = next {
            // Cut as this step's shares would cut it; if the next step's
            // shares differ (a node came or went, --balance moved them),
            // it cuts again and its tasks carry their samples.
            let shares = self.cluster.shares(next.len());
            let samples = self.cut(self.step + 1, next, &shares);
            let parts = shares
                .iter()
                .zip(&samples)
                .enumerate()
                .map(|(part, (&(node, _), s))| (node, part, s.clone()))
                .collect();
            self.cluster.queue_ahead(self.step + 1, parts);
            self.ahead = Some(Ahead {
                step: self.step + 1,
                shares,
                samples,
            });
        }
        let work = Work {
            phase: &phase,
            version: self.step,
            round: 0,
            weights: &self.weights,
            parts: None,
        };
        // The aggregators learn the step's parts now, so each averages its
        // slices as soon as they are in (a part that moves to another node
        // makes a new plan).
        let planned = match &self.aggregators {
            Some(aggregators) => {
                let parts: Vec<PlannedPart> = shares
                    .iter()
                    .enumerate()
                    .map(|(i, &(node, count))| PlannedPart {
                        part: i as u32,
                        node_id: node,
                        samples: count as u32,
                    })
                    .collect();
                aggregators.plan(self.step, 0, parts.clone()).await?;
                Some(parts)
            }
            None => None,
        };
        let (mut answers, sent) = run_watched(
            &mut self.cluster,
            self.aggregators.as_mut(),
            &work,
            &tasks,
            &owners,
        )
        .await?;
        let sent = sent.into_std();
        let gathered = Instant::now();
        let sharded_penalty = match planned {
            Some(planned) => Some(
                self.sharded_update(&mut answers, &tasks, lr, &phase, planned)
                    .await?,
            ),
            None => None,
        };
        let mut tally = Tally::default();
        let mut slowest = 0.0f64;
        let num_state = self.weights.len() - self.num_trainable;
        let mut state = WeightedSum::new(num_state);
        let mut sources = Vec::with_capacity(answers.len());
        for (node, answer) in answers {
            let Answer::Train {
                result,
                gradients,
                state: s,
                norm,
            } = answer
            else {
                continue;
            };
            telemetry::node_work(node, result.samples, result.compute_seconds);
            let work = self.epoch_work.entry(node).or_default();
            work.0 += result.samples as u64;
            work.1 += result.compute_seconds;
            slowest = slowest.max(result.compute_seconds);
            tally.add(result.loss_sum, result.correct, result.samples);
            state.add(result.samples as f64, s);
            sources.push((node, result.samples as f64, gradients, norm));
        }
        let phases = |done: Instant| {
            telemetry::StepPhases::new(sent - started, slowest, gathered - sent, done - gathered)
        };
        if let Some(penalty) = sharded_penalty {
            self.finish_step(phases(Instant::now()));
            return Ok((tally, penalty));
        }
        // Shared gradients are read in place; a view that did not hold
        // still (a node writing its segment while it should not) voids the
        // step.
        let mut views = Vec::with_capacity(sources.len());
        let mut torn = None;
        for (node, _, g, _) in &sources {
            if let Gradients::Shared { slot, version } = g {
                match slot.view(*version) {
                    Ok(v) => views.push((*node, Some(v))),
                    Err(_) => torn = Some(*node),
                }
            } else {
                views.push((*node, None));
            }
        }
        let parts: Vec<(f64, &[f32])> = sources
            .iter()
            .zip(&views)
            .filter_map(|((_, w, g, _), (_, v))| match (g, v) {
                (Gradients::Owned(g), _) => Some((*w, g.as_slice())),
                (Gradients::Shared { .. }, Some(v)) => Some((*w, v.values())),
                _ => None,
            })
            .collect();
        let (trainable, buffers) = self.weights.split_at_mut(self.num_trainable);
        // Without clipping the mean is only needed inside Adam's pass, and
        // the norm of a weighted mean is at most the weighted mean of the
        // (checked) norms, plus at most the L2 gradient's bound: average
        // (and add the L2 gradient) in that pass, two fewer passes over
        // memory.
        let total: f64 = sources.iter().map(|s| s.1).sum();
        let bound: f64 = sources.iter().map(|s| s.1 / total.max(1e-300) * s.3).sum();
        let fused = self.config.clip_norm.is_none();
        let l2 = &self.l2;
        let (penalty, norm) = if fused {
            let penalty = l2_penalty(trainable, l2);
            (penalty, bound + l2_gradient_norm_bound(penalty, l2))
        } else {
            let sums = average_gradients(&mut self.grads, &parts, trainable, &self.l2);
            (sums.penalty, sums.squares.sqrt())
        };
        let usable = torn.is_none() && norm <= GRADIENT_NORM_LIMIT;
        if usable {
            buffers.copy_from_slice(&state.mean());
            let optimizer = &mut self.optimizer;
            let grads = &mut self.grads;
            let clip = self.config.clip_norm;
            let factors = crate::aggregate::factors(&parts);
            let mut update = |trainable: &mut [f32], mirror: Option<&mut [f32]>| {
                if fused {
                    optimizer.step_with(trainable, lr, mirror, &|start, w, g| {
                        average_block(g, start, &factors);
                        add_l2_block(g, w, start, l2);
                    });
                } else {
                    if let Some(max) = clip {
                        crate::optimizer::clip_to_norm(grads, norm, max);
                    }
                    optimizer.step_with(trainable, lr, mirror, &from_buffer(grads));
                }
            };
            match self.cluster.local_plane() {
                // Nodes on this host read the new weights from the shared
                // segment: write them there in the optimizer's own pass.
                Some(plane) => plane.publish_with(self.step + 1, |shared| {
                    let (t, s) = shared.split_at_mut(trainable.len());
                    update(trainable, Some(t));
                    s.copy_from_slice(buffers);
                }),
                None => update(trainable, None),
            }
        }
        drop(parts);
        let mut changed = None;
        for (node, view) in views {
            if let Some(v) = view {
                if v.finish().is_err() {
                    changed = Some(node);
                }
            }
        }
        if let Some(node) = changed {
            // Only a broken local process does this (local processes of the
            // coordinator's user are trusted, see ARCHITECTURE.md).
            warn!(
                step = self.step,
                node, "a node changed its shared gradients while they were read"
            );
            self.cluster.evict(
                node,
                "changed its shared-memory gradients while they were read",
            );
        }
        if let Some(node) = torn {
            warn!(
                step = self.step,
                node, "skipping the update: a node's shared gradients were not of this step"
            );
            telemetry::step_skipped();
            self.cluster
                .evict(node, "its shared-memory gradients were not of this step");
        } else if !usable {
            // Finite per node but not usable together (or huge): applying it
            // would make the weights or Adam's state non-finite for good.
            let what = if fused { "norm may reach" } else { "norm is" };
            warn!(
                step = self.step,
                "skipping the update: the averaged gradient's {what} {norm:e} (limit {GRADIENT_NORM_LIMIT:e})"
            );
            telemetry::step_skipped();
        }
        self.finish_step(phases(Instant::now()));
        Ok((tally, penalty))
    }

    /// Moves to the next step, recording where this one's time went.
    fn finish_step(&mut self, phases: telemetry::StepPhases) {
        self.step += 1;
        phases.record();
        self.epoch_phases.add(&phases);
    }

    /// Evaluates the current weights on the test set, split across the nodes.
    async fn evaluate(&mut self, round: u64) -> Result<Tally> {
        let phase = format!("evaluation {round}");
        watched(self.aggregators.as_mut(), self.cluster.ensure_min(&phase)).await?;
        let mut tasks = Vec::new();
        let mut owners = Vec::new();
        let mut start = 0;
        for (node, count) in self.cluster.shares(self.test.len()) {
            let end = start + count;
            for part_start in (start..end).step_by(EVAL_PART) {
                let (images, labels) = self
                    .test
                    .slice(part_start..(part_start + EVAL_PART).min(end));
                tasks.push(Task::Eval {
                    samples: samples(images, labels),
                });
                owners.push(node);
            }
            start = end;
        }
        let work = Work {
            phase: &phase,
            version: self.step,
            round,
            weights: &self.weights,
            parts: None,
        };
        let mut tally = Tally::default();
        let (answers, _) = run_watched(
            &mut self.cluster,
            self.aggregators.as_mut(),
            &work,
            &tasks,
            &owners,
        )
        .await?;
        for answer in answers {
            if let (_, Answer::Eval(r)) = answer {
                tally.add(r.loss_sum, r.correct, r.samples);
            }
        }
        Ok(tally)
    }
}
