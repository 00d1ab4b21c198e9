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
    /// Not enough nodes joined in time (`flag` set how many were wanted:
    /// `--nodes` at the start, `--min-nodes` after losing some).
    #[error("only {joined} of {wanted} nodes joined within {timeout:?}; start more nodes or lower {flag}")]
    NotEnoughNodes {
        joined: usize,
        wanted: usize,
        timeout: Duration,
        flag: &'static str,
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
