//! The synchronous training loop: one task that owns the weights, the
//! optimizer and the membership, and talks to nodes only through their
//! outboxes and the event channel.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use data::{epoch_order, split_counts, Dataset, Rng};
use model::{Device, Model, TensorInfo};
use proto::v1::coordinator_message::Kind as Out;
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::{
    BufferKind, CoordinatorMessage, Dtype, EvalTask, Finish, JoinReply, Samples, TensorSpec,
    TrainResult, TrainTask,
};
use proto::Chunker;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::service::{Event, NodeInfo, Outbox, Service};
use crate::telemetry;
use crate::{l2_penalty, CoordinatorError, History, Optimizer, TrainConfig, WeightedSum};

type Result<T> = std::result::Result<T, CoordinatorError>;

/// Test samples per evaluation task.
const EVAL_PART: usize = 1000;
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
}

impl TrainReport {
    /// Test accuracy after the last epoch.
    pub fn final_val_accuracy(&self) -> Option<f64> {
        self.history.val_accuracy.last().copied()
    }
}

struct Member {
    outbox: Outbox,
    info: NodeInfo,
    /// Weights version this node holds.
    held: Option<u64>,
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
/// resolves (then with [`CoordinatorError::Cancelled`]).
pub async fn serve(
    listener: TcpListener,
    config: TrainConfig,
    train: Dataset,
    test: Dataset,
    shutdown: impl Future<Output = ()>,
) -> Result<TrainReport> {
    if config.batch_size == 0 || config.nodes == 0 || train.is_empty() {
        return Err(CoordinatorError::Config(
            "batch size, node count and training set must all be non-empty".into(),
        ));
    }
    let model = Model::new(config.model, config.seed, &Device::Cpu)?;
    let params: Vec<TensorInfo> = model.params().cloned().collect();
    let layout: Vec<TensorInfo> = model.params().chain(model.buffers()).cloned().collect();
    let (num_trainable, num_state) = (model.num_trainable(), model.num_state());
    let reply = JoinReply {
        node_id: 0,
        model: config.model.kind.to_string(),
        params: specs(model.params().cloned()),
        buffers: specs(model.buffers().cloned()),
        max_message_bytes: proto::MAX_MESSAGE_BYTES as u64,
        dropout: config.model.dropout,
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let service = Service::new(events_tx, reply, num_trainable, num_state);
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .add_service(
                CoordinatorServer::new(service)
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = server_stopped.await;
                },
            ),
    );
    let mut trainer = Trainer {
        weights: model.weights()?,
        optimizer: Optimizer::new(config.optimizer, num_trainable),
        num_trainable,
        params,
        layout,
        config,
        train,
        test,
        events,
        members: BTreeMap::new(),
        step: 0,
        history: History::default(),
    };
    drop(model);
    let outcome = tokio::select! {
        r = trainer.run() => r,
        _ = shutdown => Err(CoordinatorError::Cancelled),
    };
    let reason = match &outcome {
        Ok(_) => "training complete".to_string(),
        Err(e) => format!("training stopped: {e}"),
    };
    trainer.dismiss_all(&reason).await;
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
    })
}

struct Trainer {
    config: TrainConfig,
    params: Vec<TensorInfo>,
    /// Names and shapes of the whole weights buffer (params, then state).
    layout: Vec<TensorInfo>,
    num_trainable: usize,
    /// Trainable parameters, then BatchNorm running statistics.
    weights: Vec<f32>,
    optimizer: Optimizer,
    train: Dataset,
    test: Dataset,
    events: mpsc::UnboundedReceiver<Event>,
    members: BTreeMap<u64, Member>,
    /// Optimizer steps taken; also the version of `weights`.
    step: u64,
    history: History,
}

impl Trainer {
    async fn run(&mut self) -> Result<()> {
        self.wait_for_nodes().await?;
        let n = self.train.len();
        let bs = self.config.batch_size;
        let steps_per_epoch = n.div_ceil(bs);
        info!(
            model = %self.config.model.kind,
            train = n,
            test = self.test.len(),
            batch = bs,
            steps_per_epoch,
            "training starts"
        );
        for epoch in 0..self.config.epochs {
            let lr = self.config.lr_schedule.lr(self.config.lr, epoch);
            telemetry::epoch(epoch + 1, lr);
            let order = epoch_order(n, self.config.seed, epoch as u64);
            let started = Instant::now();
            let mut last_progress = Instant::now();
            if let Some(p) = &self.config.progress {
                p.epoch_started(epoch + 1, self.config.epochs, steps_per_epoch);
            }
            let mut tally = Tally::default();
            let mut penalty = 0.0;
            for (i, batch) in order.chunks(bs).enumerate() {
                let (step_tally, step_penalty) = self.train_step(batch, lr).await?;
                tally.add(
                    step_tally.loss_sum,
                    step_tally.correct as u32,
                    step_tally.samples as u32,
                );
                penalty += step_penalty;
                let running_loss = tally.loss() + penalty / (i + 1) as f64;
                telemetry::step_done(step_tally.samples, running_loss, tally.accuracy());
                let rate = tally.samples as f64 / started.elapsed().as_secs_f64();
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
            }
            let train_secs = started.elapsed().as_secs_f64();
            let val = self.evaluate(epoch as u64).await?;
            let reg = l2_penalty(
                self.params.iter(),
                &self.weights[..self.num_trainable],
                &mut vec![0.0; self.num_trainable],
            );
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
                "epoch {}/{}: loss {:.4} accuracy {:.4} val_loss {:.4} val_accuracy {:.4} lr {:.2e} ({:.1} s, {:.0} samples/s)",
                epoch + 1,
                self.config.epochs,
                h.loss[epoch as usize],
                h.accuracy[epoch as usize],
                h.val_loss[epoch as usize],
                h.val_accuracy[epoch as usize],
                lr,
                train_secs,
                n as f64 / train_secs
            );
            if let Some(path) = &self.config.history {
                self.history
                    .write(path)
                    .map_err(|source| CoordinatorError::History {
                        path: path.clone(),
                        source,
                    })?;
            }
            self.checkpoint(&format!("epoch-{:04}", epoch + 1), epoch + 1)?;
        }
        if self.config.epochs > 0 {
            self.checkpoint("final", self.config.epochs)?;
        }
        Ok(())
    }

    /// Writes `DIR/{name}.safetensors` if a checkpoint folder is configured.
    fn checkpoint(&self, name: &str, epoch: u32) -> Result<()> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| CoordinatorError::Checkpoint(format!("{}: {e}", dir.display())))?;
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
        .map_err(|e| CoordinatorError::Checkpoint(e.to_string()))?;
        debug!("wrote {}", path.display());
        Ok(())
    }

    fn admit(&mut self, node: u64, outbox: Outbox, info: NodeInfo) {
        info!(
            node,
            host = %info.hostname,
            device = %info.device,
            threads = info.threads,
            "node joined ({} connected)",
            self.members.len() + 1
        );
        self.members.insert(
            node,
            Member {
                outbox,
                info,
                held: None,
            },
        );
        telemetry::membership(self.members.len(), true);
    }

    fn remove(&mut self, node: u64, reason: &str) {
        if let Some(m) = self.members.remove(&node) {
            warn!(node, host = %m.info.hostname, "node left: {reason} ({} connected)", self.members.len());
            telemetry::membership(self.members.len(), false);
        }
    }

    async fn wait_for_nodes(&mut self) -> Result<()> {
        let wanted = self.config.nodes;
        let deadline = self
            .config
            .join_timeout
            .map(|t| (tokio::time::Instant::now() + t, t));
        info!("waiting for {wanted} node(s) to join");
        while self.members.len() < wanted {
            let event = match deadline {
                Some((at, timeout)) => {
                    match tokio::time::timeout_at(at, self.events.recv()).await {
                        Ok(e) => e,
                        Err(_) => {
                            return Err(CoordinatorError::NotEnoughNodes {
                                joined: self.members.len(),
                                wanted,
                                timeout,
                            })
                        }
                    }
                }
                None => self.events.recv().await,
            };
            match event {
                Some(Event::Joined { node, outbox, info }) => self.admit(node, outbox, info),
                Some(Event::Left { node, reason }) | Some(Event::Invalid { node, reason }) => {
                    self.remove(node, &reason)
                }
                Some(_) => {}
                None => return Err(CoordinatorError::Cancelled),
            }
        }
        Ok(())
    }

    async fn send(&mut self, node: u64, kind: Out, phase: &str) -> Result<()> {
        let member = self
            .members
            .get(&node)
            .ok_or_else(|| CoordinatorError::NodeLost {
                node,
                phase: phase.to_string(),
                reason: "not connected".into(),
            })?;
        member
            .outbox
            .send(Ok(CoordinatorMessage { kind: Some(kind) }))
            .await
            .map_err(|_| CoordinatorError::NodeLost {
                node,
                phase: phase.to_string(),
                reason: "its stream is closed".into(),
            })
    }

    /// Sends the current weights to `node` unless it already holds them.
    async fn send_weights(&mut self, node: u64, chunker: &Chunker, phase: &str) -> Result<()> {
        if self.members.get(&node).and_then(|m| m.held) == Some(self.step) {
            return Ok(());
        }
        telemetry::bytes(chunker.byte_len(), 0);
        for chunk in chunker.chunks() {
            self.send(node, Out::Chunk(chunk), phase).await?;
        }
        if let Some(m) = self.members.get_mut(&node) {
            m.held = Some(self.step);
        }
        Ok(())
    }

    /// Handles an event that is not the one being waited for. Fails if it
    /// means a node whose answer is outstanding is gone.
    fn side_event(&mut self, event: Event, waiting_for: &[u64], phase: &str) -> Result<()> {
        match event {
            Event::Joined { node, outbox, info } => self.admit(node, outbox, info),
            Event::Left { node, reason } | Event::Invalid { node, reason } => {
                self.remove(node, &reason);
                if waiting_for.contains(&node) {
                    return Err(CoordinatorError::NodeLost {
                        node,
                        phase: phase.to_string(),
                        reason,
                    });
                }
            }
            Event::Train { node, result, .. } => {
                debug!(node, step = result.step, "dropping a late training result")
            }
            Event::Eval { node, result } => debug!(
                node,
                round = result.round,
                "dropping a late evaluation result"
            ),
        }
        Ok(())
    }

    async fn next_event(
        &mut self,
        deadline: tokio::time::Instant,
        waiting_for: &[u64],
        phase: &str,
    ) -> Result<Event> {
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(CoordinatorError::Cancelled),
            Err(_) => Err(CoordinatorError::Timeout {
                node: waiting_for.first().copied().unwrap_or_default(),
                phase: phase.to_string(),
                timeout: self.config.step_timeout,
            }),
        }
    }

    /// One synchronous step over the samples `batch`. Returns the step's
    /// tally and its L2 penalty.
    async fn train_step(&mut self, batch: &[u32], lr: f64) -> Result<(Tally, f64)> {
        let phase = format!("step {}", self.step);
        let nodes: Vec<u64> = self.members.keys().copied().collect();
        if nodes.is_empty() {
            return Err(CoordinatorError::NodeLost {
                node: 0,
                phase,
                reason: "no node left".into(),
            });
        }
        let counts = split_counts(batch.len(), &vec![1.0; nodes.len()]);
        let chunker = Chunker::new(
            BufferKind::Weights,
            self.step,
            &self.weights,
            proto::DEFAULT_CHUNK_BYTES,
        );
        // (node, samples) of each part, in node order: the order of averaging.
        let started = Instant::now();
        let mut parts: Vec<(u64, u32)> = Vec::new();
        let mut offset = 0;
        for (&node, &count) in nodes.iter().zip(&counts) {
            if count == 0 {
                continue;
            }
            let (images, labels) = self.train.gather(&batch[offset..offset + count]);
            offset += count;
            self.send_weights(node, &chunker, &phase).await?;
            let task = TrainTask {
                step: self.step,
                version: self.step,
                samples: Some(Samples {
                    count: count as u32,
                    images: images.into(),
                    labels: labels.into(),
                }),
                seed: Rng::derive(self.config.seed, &[0xD0, self.step, parts.len() as u64])
                    .next_u64(),
            };
            telemetry::bytes(count * (data::IMAGE_BYTES + 1), 0);
            self.send(node, Out::Train(task), &phase).await?;
            parts.push((node, count as u32));
        }
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.step_timeout;
        let mut results: BTreeMap<usize, (TrainResult, Vec<f32>, Vec<f32>)> = BTreeMap::new();
        while results.len() < parts.len() {
            let waiting: Vec<u64> = parts
                .iter()
                .enumerate()
                .filter(|(i, _)| !results.contains_key(i))
                .map(|(_, (n, _))| *n)
                .collect();
            let event = self.next_event(deadline, &waiting, &phase).await?;
            let Event::Train {
                node,
                result,
                gradients,
                state,
            } = event
            else {
                self.side_event(event, &waiting, &phase)?;
                continue;
            };
            if result.step != self.step {
                debug!(
                    node,
                    step = result.step,
                    "dropping a result for another step"
                );
                continue;
            }
            let Some(part) = parts.iter().position(|(n, _)| *n == node) else {
                debug!(node, "dropping a result from a node not in this step");
                continue;
            };
            if results.contains_key(&part) {
                debug!(node, "dropping a duplicate result");
                continue;
            }
            let bad = |reason: String| CoordinatorError::BadResult {
                node,
                phase: phase.clone(),
                reason,
            };
            if result.samples != parts[part].1 {
                return Err(bad(format!(
                    "{} samples, sent {}",
                    result.samples, parts[part].1
                )));
            }
            if !result.loss_sum.is_finite()
                || gradients.iter().chain(&state).any(|v| !v.is_finite())
            {
                return Err(bad("non-finite loss, gradient or state".into()));
            }
            results.insert(part, (result, gradients, state));
        }
        let gathered = Instant::now();
        let mut tally = Tally::default();
        let mut slowest = 0.0f64;
        let num_state = self.weights.len() - self.num_trainable;
        let mut grads = WeightedSum::new(self.num_trainable);
        let mut state = WeightedSum::new(num_state);
        for (part, (result, g, s)) in results {
            telemetry::node_work(parts[part].0, result.samples, result.compute_seconds);
            telemetry::bytes(0, 4 * (g.len() + s.len()));
            slowest = slowest.max(result.compute_seconds);
            tally.add(result.loss_sum, result.correct, result.samples);
            grads.add(result.samples as f64, g);
            state.add(result.samples as f64, s);
        }
        let mut grads = grads.mean();
        let (trainable, buffers) = self.weights.split_at_mut(self.num_trainable);
        let penalty = l2_penalty(self.params.iter(), trainable, &mut grads);
        self.optimizer.step(trainable, &grads, lr);
        buffers.copy_from_slice(&state.mean());
        self.step += 1;
        telemetry::step_phases(sent - started, slowest, gathered - sent, gathered.elapsed());
        Ok((tally, penalty))
    }

    /// Evaluates the current weights on the test set, split across the nodes.
    async fn evaluate(&mut self, round: u64) -> Result<Tally> {
        let phase = format!("evaluation {round}");
        let nodes: Vec<u64> = self.members.keys().copied().collect();
        let counts = split_counts(self.test.len(), &vec![1.0; nodes.len()]);
        let chunker = Chunker::new(
            BufferKind::Weights,
            self.step,
            &self.weights,
            proto::DEFAULT_CHUNK_BYTES,
        );
        let mut parts: Vec<(u64, u32)> = Vec::new();
        let mut start = 0;
        for (&node, &count) in nodes.iter().zip(&counts) {
            let end = start + count;
            for part_start in (start..end).step_by(EVAL_PART) {
                let part_end = (part_start + EVAL_PART).min(end);
                let (images, labels) = self.test.slice(part_start..part_end);
                self.send_weights(node, &chunker, &phase).await?;
                let task = EvalTask {
                    round,
                    version: self.step,
                    part: parts.len() as u64,
                    samples: Some(Samples {
                        count: (part_end - part_start) as u32,
                        images: images.into(),
                        labels: labels.into(),
                    }),
                };
                self.send(node, Out::Eval(task), &phase).await?;
                parts.push((node, (part_end - part_start) as u32));
            }
            start = end;
        }
        let per_node = parts.len().div_ceil(nodes.len().max(1)).max(1) as u32;
        let deadline = tokio::time::Instant::now() + self.config.step_timeout * per_node;
        let mut results = BTreeMap::new();
        while results.len() < parts.len() {
            let waiting: Vec<u64> = parts
                .iter()
                .enumerate()
                .filter(|(i, _)| !results.contains_key(&(*i as u64)))
                .map(|(_, (n, _))| *n)
                .collect();
            let event = self.next_event(deadline, &waiting, &phase).await?;
            let Event::Eval { node, result } = event else {
                self.side_event(event, &waiting, &phase)?;
                continue;
            };
            let expected = parts.get(result.part as usize);
            if result.round != round
                || expected.map(|p| p.0) != Some(node)
                || results.contains_key(&result.part)
            {
                debug!(
                    node,
                    round = result.round,
                    part = result.part,
                    "dropping an unexpected evaluation result"
                );
                continue;
            }
            if Some(result.samples) != expected.map(|p| p.1) || !result.loss_sum.is_finite() {
                return Err(CoordinatorError::BadResult {
                    node,
                    phase,
                    reason: format!(
                        "evaluation part {} came back with {} samples or a non-finite loss",
                        result.part, result.samples
                    ),
                });
            }
            results.insert(result.part, result);
        }
        let mut tally = Tally::default();
        for r in results.values() {
            tally.add(r.loss_sum, r.correct, r.samples);
        }
        Ok(tally)
    }

    /// Tells every node that training is over and forgets them.
    async fn dismiss_all(&mut self, reason: &str) {
        let members = std::mem::take(&mut self.members);
        for (node, m) in members {
            let msg = CoordinatorMessage {
                kind: Some(Out::Finish(Finish {
                    reason: reason.to_string(),
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
