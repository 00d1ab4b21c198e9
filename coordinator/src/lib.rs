//! The gradcast coordinator: admits nodes, runs the synchronous training loop
//! (weights out, gradients in, weighted average in a fixed order, optimizer),
//! keeps BatchNorm statistics consistent, evaluates after every epoch and
//! records a Keras-style history.
//!
//! The coordinator holds the only copy of the data set and of the optimizer
//! state. It never runs the network itself: every forward and backward pass
//! happens on a node. It knows the model only through [`model::Model`]'s flat
//! buffer layout (to initialise weights and apply L2) — nothing of layers.

mod aggregate;
mod cluster;
mod config;
mod error;
mod history;
mod optimizer;
mod plane;
mod progress;
mod resume;
mod service;
pub mod shard;
mod task;
mod telemetry;
mod trainer;
mod vector;

pub use aggregate::WeightedSum;
pub use config::{LrSchedule, Security, ServerTls, TrainConfig};
pub use error::{CheckpointError, CoordinatorError};
pub use history::History;
pub use optimizer::{l2_penalty, l2_value, new_optimizer, Adam, Optimizer, OptimizerKind, Sgd};
pub use progress::Progress;
pub use proto::Wire;
pub use resume::RESUME_FILE;
pub use telemetry::describe_metrics;
pub use trainer::{serve, TrainReport};
