//! A per-epoch indicatif progress bar for terminals.

use coordinator::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

/// Draws one bar per epoch on stderr: steps, samples/s, running loss and
/// accuracy, ETA; the finished bar keeps the epoch's test results.
#[derive(Default)]
pub struct EpochBar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for EpochBar {
    fn epoch_started(&self, epoch: u32, epochs: u32, steps: usize) {
        let bar = ProgressBar::new(steps as u64);
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {pos}/{len} steps {msg} (ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn step(&self, done: usize, samples_per_second: f64, loss: f64, accuracy: f64) {
        if let Ok(slot) = self.bar.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.set_position(done as u64);
                bar.set_message(format!(
                    "{samples_per_second:.0} samples/s, loss {loss:.4}, accuracy {accuracy:.4}"
                ));
            }
        }
    }

    fn epoch_finished(&self, _epoch: u32, val_loss: f64, val_accuracy: f64) {
        if let Ok(mut slot) = self.bar.lock() {
            if let Some(bar) = slot.take() {
                let msg = bar.message();
                bar.finish_with_message(format!(
                    "{msg}; val_loss {val_loss:.4}, val_accuracy {val_accuracy:.4}"
                ));
            }
        }
    }
}

/// A bar for a download of `total` bytes (a spinner when the size is not
/// known), starting at `done`; hidden when stderr is not a terminal.
pub fn download(total: Option<u64>, done: u64) -> ProgressBar {
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} (ETA {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix("CIFAR-10");
    bar.set_position(done);
    bar
}
