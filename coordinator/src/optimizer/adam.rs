//! Adam with Keras' defaults and update rule.

use rayon::prelude::*;

use super::{in_blocks, take_state, GradientSource, Optimizer, OptimizerKind};
use crate::aggregate::BLOCK;
use crate::vector::{self, AdamStep};

/// Adam as Keras implements it: bias correction folded into the step size,
/// epsilon added to `sqrt(v)` uncorrected. State: `adam.m` and `adam.v`.
#[derive(Debug, Clone)]
pub struct Adam {
    /// β₁ (Keras: 0.9).
    pub beta1: f64,
    /// β₂ (Keras: 0.999).
    pub beta2: f64,
    /// ε (Keras: 1e-7).
    pub epsilon: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    iterations: u64,
}

impl Adam {
    /// Keras defaults for `len` parameters.
    pub fn new(len: usize) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
            m: vec![0.0; len],
            v: vec![0.0; len],
            iterations: 0,
        }
    }
}

impl Optimizer for Adam {
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Adam
    }

    fn iterations(&self) -> u64 {
        self.iterations
    }

    fn state(&self) -> Vec<(&'static str, &[f32])> {
        vec![("adam.m", &self.m), ("adam.v", &self.v)]
    }

    fn restore(
        &mut self,
        saved: &mut dyn FnMut(&str) -> Option<Vec<f32>>,
        iterations: u64,
    ) -> Result<(), String> {
        let m = take_state(saved, "adam.m", self.m.len())?;
        let v = take_state(saved, "adam.v", self.v.len())?;
        (self.m, self.v, self.iterations) = (m, v, iterations);
        Ok(())
    }

    fn step_with(
        &mut self,
        weights: &mut [f32],
        lr: f64,
        mirror: Option<&mut [f32]>,
        gradient: &GradientSource<'_>,
    ) {
        assert_eq!(
            weights.len(),
            self.m.len(),
            "Adam state and weights differ in length"
        );
        self.iterations += 1;
        let t = self.iterations as i32;
        let alpha = (lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t))) as f32;
        let step = AdamStep {
            alpha,
            b1: (1.0 - self.beta1) as f32,
            b2: (1.0 - self.beta2) as f32,
            epsilon: self.epsilon,
        };
        let level = vector::level();
        let blocks = weights.par_chunks_mut(BLOCK).zip(
            self.m
                .par_chunks_mut(BLOCK)
                .zip(self.v.par_chunks_mut(BLOCK)),
        );
        // Element-wise, so the blocks (and threads) cannot change a bit.
        in_blocks(blocks, mirror, gradient, |w, (m, v), g| {
            vector::adam(level, w, m, v, g, step)
        });
    }
}
