//! Plain SGD.

use rayon::prelude::*;

use super::{in_blocks, GradientSource, Optimizer, OptimizerKind};
use crate::aggregate::BLOCK;

/// Plain SGD, `w -= lr · g`: no state, and it does not count its updates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sgd;

impl Optimizer for Sgd {
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Sgd
    }

    fn iterations(&self) -> u64 {
        0
    }

    fn state(&self) -> Vec<(&'static str, &[f32])> {
        Vec::new()
    }

    fn restore(
        &mut self,
        _saved: &mut dyn FnMut(&str) -> Option<Vec<f32>>,
        _iterations: u64,
    ) -> Result<(), String> {
        Ok(())
    }

    fn step_with(
        &mut self,
        weights: &mut [f32],
        lr: f64,
        mirror: Option<&mut [f32]>,
        gradient: &GradientSource<'_>,
    ) {
        let lr = lr as f32;
        let blocks = weights.par_chunks_mut(BLOCK).map(|w| (w, ()));
        in_blocks(blocks, mirror, gradient, |w, (), g| {
            for (w, g) in w.iter_mut().zip(g) {
                *w -= lr * g;
            }
        });
    }
}
