//! Hooks for showing training progress (a terminal progress bar lives in the
//! binary; the library only reports).

/// Receives progress reports from the training loop. All methods have empty
/// defaults.
pub trait Progress: Send + Sync {
    /// An epoch of `steps` steps begins (epochs count from 1).
    fn epoch_started(&self, _epoch: u32, _epochs: u32, _steps: usize) {}
    /// `done` steps of the epoch are finished; loss and accuracy are the
    /// epoch's running means.
    fn step(&self, _done: usize, _samples_per_second: f64, _loss: f64, _accuracy: f64) {}
    /// The epoch (training and evaluation) is over.
    fn epoch_finished(&self, _epoch: u32, _val_loss: f64, _val_accuracy: f64) {}
}
