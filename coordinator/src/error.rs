use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// What went wrong with a checkpoint file, beyond the safetensors file
/// itself (whose errors are `model`'s, path included:
/// [`CoordinatorError::Model`]).
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Creating its folder failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The training state in its metadata could not be written or read.
    #[error("training state: {0}")]
    State(#[from] serde_json::Error),
    /// Something it must hold is missing.
    #[error("{0}")]
    Content(&'static str),
}

impl CoordinatorError {
    /// A checkpoint error about the file at `path`.
    pub(crate) fn checkpoint(path: &std::path::Path, e: impl Into<CheckpointError>) -> Self {
        CoordinatorError::Checkpoint {
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// Why training stopped.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// A shard aggregator failed, left or broke the protocol.
    #[error("{0}")]
    Aggregator(String),
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
    /// A checkpoint or the resume state could not be written or read.
    #[error("checkpoint {}: {source}", path.display())]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Training was cancelled (shutdown signal).
    #[error("training cancelled")]
    Cancelled,
}
