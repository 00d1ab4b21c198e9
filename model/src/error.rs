use thiserror::Error;

/// Errors of model construction and computation.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The model name is not one gradcast knows.
    #[error("unknown model {0:?}; known: simple-cnn, complex-cnn, resnet20, resnet20-dropout, resnet50-dropout and generally resnet<6n+2>[-dropout] (resnet20, resnet32, resnet44, resnet56, ...)")]
    UnknownModel(String),
    /// A flat buffer does not have the length the model needs.
    #[error("{what}: expected {expected} values, got {got}")]
    BufferLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// Input samples are inconsistent.
    #[error("bad input: {0}")]
    BadInput(String),
    /// A checkpoint file could not be written, read or used.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A setting that cannot work (a device this build lacks, a zero size).
    #[error("{0}")]
    Config(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
