use std::time::Duration;

use thiserror::Error;
use tonic::Code;

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
    /// The coordinator removed this node for misbehaving.
    #[error("the coordinator evicted this node: {0}")]
    Evicted(String),
    /// A shard aggregator could not be reached or its link broke.
    #[error("shard aggregator: {0}")]
    Shard(String),
    /// The compute thread failed.
    #[error("compute thread failed: {0}")]
    Compute(String),
}

impl NodeError {
    /// Whether reconnecting may help: the coordinator went away or restarted,
    /// as opposed to refusing this node or the node failing by itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            NodeError::Disconnected | NodeError::Shard(_) => true,
            NodeError::Status(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::Internal
                    | Code::Aborted
                    | Code::NotFound
            ),
            _ => false,
        }
    }
}
