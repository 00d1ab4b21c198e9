use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why training stopped.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A node left while training needed it.
    #[error("node {node} left during {phase}: {reason}")]
    NodeLost {
        node: u64,
        phase: String,
        reason: String,
    },
    /// A node did not answer in time.
    #[error("node {node} did not answer {phase} within {timeout:?}; raise --step-timeout if the nodes are just slow")]
    Timeout {
        node: u64,
        phase: String,
        timeout: Duration,
    },
    /// Not enough nodes joined in time.
    #[error("only {joined} of {wanted} nodes joined within {timeout:?}; start more nodes or lower --nodes")]
    NotEnoughNodes {
        joined: usize,
        wanted: usize,
        timeout: Duration,
    },
    /// A node sent something that cannot be used.
    #[error("node {node} sent an unusable result for {phase}: {reason}")]
    BadResult {
        node: u64,
        phase: String,
        reason: String,
    },
    /// Writing the history failed.
    #[error("cannot write history to {path}: {source}")]
    History {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a checkpoint failed.
    #[error("cannot write a checkpoint: {0}")]
    Checkpoint(String),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Training was cancelled (shutdown signal).
    #[error("training cancelled")]
    Cancelled,
}
