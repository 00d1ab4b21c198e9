//! Training configuration and learning-rate schedules.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use model::{ModelKind, ModelSpec};

use crate::{OptimizerKind, Progress};

/// How the learning rate changes with the epoch (0-based, as Keras'
/// `LearningRateScheduler` counts).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// The complex CNN's `step_decay`: ×½ from epoch 20, another ×¼ from 30,
    /// another ×⅕ from 50.
    StepDecay,
    /// Keras' CIFAR-10 ResNet example: ×0.1 after epochs 80, 120, 160 and
    /// ×0.5 after 180 (meant for 200-epoch runs).
    ResnetKeras,
}

impl LrSchedule {
    /// The default for a model: `step-decay` for complex-cnn, constant otherwise.
    pub fn default_for(kind: ModelKind) -> Self {
        match kind {
            ModelKind::ComplexCnn => LrSchedule::StepDecay,
            _ => LrSchedule::Constant,
        }
    }

    /// Learning rate in `epoch` for base rate `lr`.
    pub fn lr(self, lr: f64, epoch: u32) -> f64 {
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::StepDecay => {
                let mut r = lr;
                if epoch >= 20 {
                    r *= 0.5;
                }
                if epoch >= 30 {
                    r *= 0.25;
                }
                if epoch >= 50 {
                    r *= 0.2;
                }
                r
            }
            LrSchedule::ResnetKeras => {
                let mut r = lr;
                if epoch > 180 {
                    r *= 0.5e-3;
                } else if epoch > 160 {
                    r *= 1e-3;
                } else if epoch > 120 {
                    r *= 1e-2;
                } else if epoch > 80 {
                    r *= 1e-1;
                }
                r
            }
        }
    }
}

impl FromStr for LrSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "step-decay" => Ok(LrSchedule::StepDecay),
            "resnet-keras" => Ok(LrSchedule::ResnetKeras),
            _ => Err(format!(
                "unknown schedule {s:?}; use constant, step-decay or resnet-keras"
            )),
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LrSchedule::Constant => "constant",
            LrSchedule::StepDecay => "step-decay",
            LrSchedule::ResnetKeras => "resnet-keras",
        })
    }
}

/// Everything the coordinator needs to know to train.
#[derive(Clone)]
pub struct TrainConfig {
    /// The network.
    pub model: ModelSpec,
    /// Epochs to train.
    pub epochs: u32,
    /// Global batch size (split across the nodes of each step).
    pub batch_size: usize,
    /// Nodes to wait for before training starts.
    pub nodes: usize,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Seed of weight initialisation, epoch order and dropout masks.
    pub seed: u64,
    /// Where to write the Keras-style history JSON after every epoch.
    pub history: Option<PathBuf>,
    /// Folder for safetensors checkpoints (`epoch-NNNN.safetensors` after
    /// every epoch, `final.safetensors` at the end).
    pub checkpoint_dir: Option<PathBuf>,
    /// Longest wait for one node's answer to one step or evaluation part.
    pub step_timeout: Duration,
    /// Longest wait for `nodes` nodes to join (None: wait forever).
    pub join_timeout: Option<Duration>,
    /// Nodes below which training waits for replacements (and fails after
    /// `rejoin_timeout`).
    pub min_nodes: usize,
    /// How long to wait for replacements when fewer than `min_nodes` remain.
    pub rejoin_timeout: Duration,
    /// Share each batch in proportion to measured node speed.
    pub balance: bool,
    /// Also write the resume state every this many steps (0: only per epoch).
    pub checkpoint_every: u64,
    /// Continue from `checkpoint_dir/resume.safetensors` if it exists.
    pub resume: bool,
    /// Where to report progress (None: a log line every 10 seconds).
    pub progress: Option<Arc<dyn Progress>>,
    /// Folder on a tmpfs for the shared-memory data plane with nodes on this
    /// host (None: every node uses gRPC).
    pub shared_memory: Option<PathBuf>,
    /// Scale the averaged gradient down to this norm when it is larger.
    pub clip_norm: Option<f64>,
    /// How weights and gradients travel to and from nodes on gRPC (nodes on
    /// shared memory always use f32).
    pub wire: proto::Wire,
    /// Augment the training samples (random crop of the 4-pixel padded image
    /// and horizontal flip, drawn per sample from the seed, the step and the
    /// sample's place in the batch; see `data::augment`).
    pub augment: bool,
    /// Shard aggregators (`gradcast aggregator` URLs, reachable from the
    /// coordinator and from every node): aggregator *k* averages and
    /// optimises slice *k* of the weights, and nodes exchange gradients and
    /// weights with them instead of with the coordinator. Empty: the
    /// coordinator does it all.
    pub aggregators: Vec<String>,
}

impl fmt::Debug for TrainConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TrainConfig");
        for (k, v) in self.describe() {
            d.field(k, &v);
        }
        d.finish_non_exhaustive()
    }
}

impl TrainConfig {
    /// Defaults for `model`: Keras' Adam rate 1e-3, batch 32, the model's
    /// default schedule, one epoch, one node.
    pub fn new(model: ModelSpec) -> Self {
        Self {
            model,
            epochs: 1,
            batch_size: 32,
            nodes: 1,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            lr_schedule: LrSchedule::default_for(model.kind),
            seed: 0,
            history: None,
            checkpoint_dir: None,
            step_timeout: Duration::from_secs(300),
            join_timeout: None,
            progress: None,
            min_nodes: 1,
            rejoin_timeout: Duration::from_secs(60),
            balance: false,
            checkpoint_every: 0,
            resume: false,
            shared_memory: Some(PathBuf::from("/dev/shm")),
            clip_norm: None,
            wire: proto::Wire::F32,
            augment: false,
            aggregators: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// The configuration as string pairs, for checkpoint metadata.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("model", self.model.kind.to_string()),
            ("dropout", self.model.dropout.to_string()),
            ("epochs", self.epochs.to_string()),
            ("batch_size", self.batch_size.to_string()),
            ("nodes", self.nodes.to_string()),
            ("optimizer", self.optimizer.to_string()),
            ("lr", self.lr.to_string()),
            ("lr_schedule", self.lr_schedule.to_string()),
            ("seed", self.seed.to_string()),
            ("balance", self.balance.to_string()),
            ("wire", self.wire.to_string()),
            ("augment", self.augment.to_string()),
            ("aggregators", self.aggregators.len().to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_decay_follows_the_seed() {
        let s = LrSchedule::StepDecay;
        assert_eq!(s.lr(1e-3, 0), 1e-3);
        assert_eq!(s.lr(1e-3, 19), 1e-3);
        assert!((s.lr(1e-3, 20) - 5e-4).abs() < 1e-12);
        assert!((s.lr(1e-3, 30) - 1.25e-4).abs() < 1e-12);
        assert!((s.lr(1e-3, 50) - 2.5e-5).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.lr(1e-3, 70), 1e-3);
        assert!((LrSchedule::ResnetKeras.lr(1e-3, 81) - 1e-4).abs() < 1e-12);
        assert_eq!("step-decay".parse::<LrSchedule>().unwrap(), s);
        assert!("nope".parse::<LrSchedule>().is_err());
    }
}

/// Who may join, and how the channel is protected.
#[derive(Clone, Default)]
pub struct Security {
    /// Cluster token nodes must present (`authorization: Bearer <token>`).
    pub token: Option<String>,
    /// Serve gRPC over TLS with this certificate chain and key (PEM).
    pub tls: Option<ServerTls>,
    /// CA (PEM) that signed the shard aggregators' certificates (for
    /// `https://` aggregator URLs).
    pub aggregator_ca: Option<Vec<u8>>,
}

/// PEM material for serving TLS.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Private key (PEM).
    pub key: Vec<u8>,
    /// If set, nodes must present a client certificate signed by this CA (mutual TLS).
    pub client_ca: Option<Vec<u8>>,
}
