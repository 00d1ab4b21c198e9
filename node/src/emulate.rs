//! Emulated compute, for benchmarks of the communication alone: a step waits
//! a fixed time instead of running the forward and backward passes, then
//! answers with a deterministic pseudo-gradient of the model's real size and
//! the model's state as loaded. Everything else (joining, receiving and
//! loading the weights, sending the answer) is what a real node does, so
//! 8–16 such nodes fit on a few cores and only the transport is measured.

use std::time::Duration;

use model::{Model, StepStats};

use crate::NodeError;

/// `ln 10`: the cross-entropy of a uniform guess over the ten classes.
const CHANCE_LOSS: f64 = std::f64::consts::LN_10;

/// A node's stand-in for forward + backward.
#[derive(Debug)]
pub struct Emulated {
    delay: Duration,
    gradients: Vec<f32>,
}

impl Emulated {
    /// Waits `delay` per step and answers `trainable` pseudo-gradient values.
    pub fn new(delay: Duration, trainable: usize) -> Self {
        Self {
            delay,
            gradients: (0..trainable).map(pseudo_gradient).collect(),
        }
    }

    /// The gradient every emulated step answers.
    pub fn gradients(&self) -> &[f32] {
        &self.gradients
    }

    /// One training step of `samples` samples: waits, then returns the
    /// step's counts (a chance-level loss, nothing correct).
    pub fn train(&self, samples: u32) -> StepStats {
        std::thread::sleep(self.delay);
        StepStats {
            loss_sum: CHANCE_LOSS * f64::from(samples),
            correct: 0,
            samples,
        }
    }

    /// [`Emulated::train`] that writes the pseudo-gradient and `model`'s
    /// state into `out` (laid out as [`Model::train_step_into`] writes it).
    pub fn train_into(
        &self,
        model: &Model,
        samples: u32,
        out: &mut [f32],
    ) -> Result<StepStats, NodeError> {
        let stats = self.train(samples);
        let state = model.state()?;
        let n = self.gradients.len();
        if out.len() != n + state.len() {
            return Err(NodeError::Protocol(format!(
                "the gradients segment holds {} values, the model {}",
                out.len(),
                n + state.len()
            )));
        }
        out[..n].copy_from_slice(&self.gradients);
        out[n..].copy_from_slice(&state);
        Ok(stats)
    }
}

/// Value `i` of the pseudo-gradient: a fixed spread in ±1e-3, so the
/// gradient's norm stays far below the coordinator's limit for any model.
fn pseudo_gradient(i: usize) -> f32 {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 53; // 0..2048
    (h as f32 - 1024.0) * 1e-6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pseudo_gradient_is_deterministic_bounded_and_not_constant() {
        let a = Emulated::new(Duration::ZERO, 10_000);
        let b = Emulated::new(Duration::ZERO, 10_000);
        assert_eq!(a.gradients(), b.gradients());
        assert!(a.gradients().iter().all(|g| g.abs() <= 1.1e-3));
        let distinct: std::collections::BTreeSet<u32> =
            a.gradients().iter().map(|g| g.to_bits()).collect();
        assert!(distinct.len() > 1000, "{} distinct values", distinct.len());
    }

    #[test]
    fn a_step_waits_and_reports_chance_level_counts() {
        let e = Emulated::new(Duration::from_millis(20), 3);
        let started = std::time::Instant::now();
        let stats = e.train(8);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!((stats.samples, stats.correct), (8, 0));
        assert!((stats.loss_sum - 8.0 * CHANCE_LOSS).abs() < 1e-12);
    }
}
