//! Keras-style training history, one entry per epoch.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// `{"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Mean training loss of each epoch (including L2 penalty, as Keras reports it).
    pub loss: Vec<f64>,
    /// Training accuracy of each epoch.
    pub accuracy: Vec<f64>,
    /// Test loss after each epoch.
    pub val_loss: Vec<f64>,
    /// Test accuracy after each epoch.
    pub val_accuracy: Vec<f64>,
    /// Learning rate used in each epoch.
    pub lr: Vec<f64>,
}

impl History {
    /// Writes the history as JSON atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }
}
