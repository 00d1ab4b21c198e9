use std::time::Duration;

use thiserror::Error;

/// Why a node stopped.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url} after {waited:?}: {reason}")]
    Unreachable {
        url: String,
        waited: Duration,
        reason: String,
    },
    /// The coordinator refused us or the stream failed.
    #[error("coordinator: {0}")]
    Status(#[from] tonic::Status),
    /// The coordinator asked for something this node cannot do.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Model construction or computation failed.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The coordinator went away without saying training ended.
    #[error("the coordinator closed the session without finishing training")]
    Disconnected,
    /// The compute thread failed.
    #[error("compute thread failed: {0}")]
    Compute(String),
}
