//! The seed networks of gradcast (simple CNN, complex CNN, ResNet v1 for
//! CIFAR-10) written with candle, with Keras semantics: "same"/"valid" padding,
//! Keras initialisers, BatchNorm momentum 0.99 / epsilon 1e-3.
//!
//! A [`Model`] owns its parameters and exposes them as one flat `f32` buffer
//! (trainable parameters, then BatchNorm running statistics) in a fixed order
//! described by [`TensorInfo`]s, so that the rest of gradcast can move and
//! average weights and gradients without knowing the network.
//!
//! This crate knows nothing of gRPC, of the coordinator or of nodes.

mod error;
mod init;
mod kernels;
mod layers;
mod nets;
mod network;
mod spec;

pub use error::ModelError;
pub use layers::same_padding;
pub use network::{Engine, EvalOutput, Model, StepOutput, TensorInfo};
pub use spec::{ModelKind, ModelSpec};

/// Re-exported so callers can name devices without depending on candle.
pub use candle_core::Device;
