//! Optimizers (Adam with Keras' defaults and update rule, plain SGD) and L2
//! regularisation.

use std::fmt;
use std::str::FromStr;

use model::TensorInfo;
use rayon::prelude::*;

use crate::aggregate::BLOCK;

/// Which optimizer the coordinator applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Keras Adam (β 0.9 / 0.999, ε 1e-7).
    Adam,
    /// Plain SGD: `w -= lr · g`.
    Sgd,
}

impl FromStr for OptimizerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "adam" => Ok(OptimizerKind::Adam),
            "sgd" => Ok(OptimizerKind::Sgd),
            _ => Err(format!("unknown optimizer {s:?}; use adam or sgd")),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        })
    }
}

/// An optimizer with its state.
#[derive(Debug, Clone)]
pub enum Optimizer {
    /// See [`Adam`].
    Adam(Adam),
    /// Stateless SGD.
    Sgd,
}

impl Optimizer {
    /// A fresh optimizer of `kind` for `len` parameters.
    pub fn new(kind: OptimizerKind, len: usize) -> Self {
        match kind {
            OptimizerKind::Adam => Optimizer::Adam(Adam::new(len)),
            OptimizerKind::Sgd => Optimizer::Sgd,
        }
    }

    /// Adam's first and second moments (None for SGD).
    pub fn moments(&self) -> Option<(&[f32], &[f32])> {
        match self {
            Optimizer::Adam(a) => Some((&a.m, &a.v)),
            Optimizer::Sgd => None,
        }
    }

    /// Updates applied so far (0 for SGD, which does not count).
    pub fn iterations(&self) -> u64 {
        match self {
            Optimizer::Adam(a) => a.iterations,
            Optimizer::Sgd => 0,
        }
    }

    /// Restores saved Adam state; false if the lengths do not fit.
    pub fn restore(&mut self, m: Vec<f32>, v: Vec<f32>, iterations: u64) -> bool {
        match self {
            Optimizer::Adam(a) if m.len() == a.m.len() && v.len() == a.v.len() => {
                a.m = m;
                a.v = v;
                a.iterations = iterations;
                true
            }
            _ => false,
        }
    }

    /// One update of `weights` with `grads` at learning rate `lr`.
    pub fn step(&mut self, weights: &mut [f32], grads: &[f32], lr: f64) {
        assert_eq!(
            grads.len(),
            weights.len(),
            "gradients and weights differ in length"
        );
        self.step_with(weights, lr, None, from_buffer(grads))
    }

    /// One update whose gradient for the block of values starting at `start`
    /// is written by `gradient(start, block)` (copied from a buffer, or the
    /// weighted mean of the nodes' parts made right there, which saves two
    /// passes over memory); optionally also writes the new weights into
    /// `mirror` (e.g. the shared-memory segment) in the same pass. Blocks are
    /// fixed, so the bits do not depend on the threads. The caller must know
    /// the gradient is usable (finite, within the norm limit).
    pub fn step_with(
        &mut self,
        weights: &mut [f32],
        lr: f64,
        mirror: Option<&mut [f32]>,
        gradient: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        match self {
            Optimizer::Adam(adam) => adam.step_with(weights, lr, mirror, gradient),
            Optimizer::Sgd => {
                let lr = lr as f32;
                let blocks = weights.par_chunks_mut(BLOCK).enumerate();
                in_blocks(blocks, mirror, |(b, w)| {
                    let mut g = vec![0.0f32; w.len()];
                    gradient(b * BLOCK, &mut g);
                    for (w, g) in w.iter_mut().zip(&g) {
                        *w -= lr * g;
                    }
                    w
                });
            }
        }
    }
}

/// A gradient source for [`Optimizer::step_with`] that copies from `grads`.
pub fn from_buffer(grads: &[f32]) -> impl Fn(usize, &mut [f32]) + Sync + '_ {
    move |start, g| g.copy_from_slice(&grads[start..start + g.len()])
}

/// Runs `update` on every block (in parallel); it returns the block's new
/// weights, which are also copied into the same block of `mirror` if given.
fn in_blocks<'a, I>(
    blocks: I,
    mirror: Option<&mut [f32]>,
    update: impl Fn(I::Item) -> &'a mut [f32] + Sync + Send,
) where
    I: IndexedParallelIterator,
{
    match mirror {
        Some(mirror) => blocks
            .zip(mirror.par_chunks_mut(BLOCK))
            .for_each(|(block, out)| out.copy_from_slice(update(block))),
        None => blocks.for_each(|block| {
            update(block);
        }),
    }
}

/// Adam as Keras implements it: bias correction folded into the step size,
/// epsilon added to `sqrt(v)` uncorrected.
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

    /// Updates applied so far.
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// One update of `weights` with `grads` at learning rate `lr`.
    pub fn step(&mut self, weights: &mut [f32], grads: &[f32], lr: f64) {
        assert_eq!(
            grads.len(),
            self.m.len(),
            "Adam state and gradients differ in length"
        );
        self.step_with(weights, lr, None, from_buffer(grads))
    }

    /// One update whose gradient for the block of values starting at
    /// `start` is written by `gradient(start, block)`; optionally also
    /// writes the new weights into `mirror`.
    pub fn step_with(
        &mut self,
        weights: &mut [f32],
        lr: f64,
        mirror: Option<&mut [f32]>,
        gradient: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        assert_eq!(
            weights.len(),
            self.m.len(),
            "Adam state and weights differ in length"
        );
        self.iterations += 1;
        let t = self.iterations as i32;
        let alpha = (lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t))) as f32;
        let (b1, b2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        let epsilon = self.epsilon;
        // Element-wise, so the blocks (and threads) cannot change a bit.
        let update = |b: usize, w: &mut [f32], m: &mut [f32], v: &mut [f32]| {
            let mut g = vec![0.0f32; w.len()];
            gradient(b * BLOCK, &mut g);
            for i in 0..w.len() {
                let g = g[i];
                m[i] += (g - m[i]) * b1;
                v[i] += (g * g - v[i]) * b2;
                w[i] -= m[i] * alpha / (v[i].sqrt() + epsilon);
            }
        };
        let blocks = weights
            .par_chunks_mut(BLOCK)
            .zip(self.m.par_chunks_mut(BLOCK))
            .zip(self.v.par_chunks_mut(BLOCK))
            .enumerate();
        in_blocks(blocks, mirror, |(b, ((w, m), v))| {
            update(b, w, m, v);
            w
        });
    }
}

/// Largest gradient norm the coordinator applies. Far beyond anything that
/// trains, and small enough that Adam's `g²` stays finite in f32 (every
/// element is at most the norm).
pub const GRADIENT_NORM_LIMIT: f64 = 1e15;

/// Scales `values` down to norm `max` if their norm `current` is above it.
pub fn clip_to_norm(values: &mut [f32], current: f64, max: f64) {
    if current > max {
        let f = (max / current) as f32;
        values.par_chunks_mut(BLOCK).for_each(|c| {
            for x in c {
                *x *= f;
            }
        });
    }
}

/// The L2 penalty `Σ l2·w²` over every tensor with `l2 > 0` (what Keras adds
/// to the reported loss).
pub fn l2_value<'a>(params: impl Iterator<Item = &'a TensorInfo>, weights: &[f32]) -> f64 {
    let mut off = 0;
    let mut penalty = 0.0f64;
    for info in params {
        let n = info.numel();
        if info.l2 > 0.0 {
            penalty += weights[off..off + n]
                .iter()
                .map(|&w| (info.l2 * w * w) as f64)
                .sum::<f64>();
        }
        off += n;
    }
    penalty
}

/// Adds the gradient of `Σ l2·w²` to `grads` for every tensor with `l2 > 0`
/// and returns the penalty itself (what Keras adds to the reported loss).
pub fn l2_penalty<'a>(
    params: impl Iterator<Item = &'a TensorInfo>,
    weights: &[f32],
    grads: &mut [f32],
) -> f64 {
    let mut off = 0;
    let mut penalty = 0.0f64;
    for info in params {
        let n = info.numel();
        if info.l2 > 0.0 {
            let l2 = info.l2;
            for i in off..off + n {
                let w = weights[i];
                penalty += (l2 * w * w) as f64;
                grads[i] += 2.0 * l2 * w;
            }
        }
        off += n;
    }
    penalty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_a_hand_computed_reference() {
        // Reference: Keras Adam(1e-3) on w=[1, -2] with grads [0.5, -0.1] then [0.2, 0.3].
        let mut adam = Adam::new(2);
        let mut w = vec![1.0f32, -2.0];
        let mut m = [0.0f64; 2];
        let mut v = [0.0f64; 2];
        let mut wr = [1.0f64, -2.0];
        for (t, g) in [[0.5f64, -0.1], [0.2, 0.3]].iter().enumerate() {
            adam.step(&mut w, &[g[0] as f32, g[1] as f32], 1e-3);
            let t = t as i32 + 1;
            let alpha = 1e-3 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                wr[i] -= alpha * m[i] / (v[i].sqrt() + 1e-7);
            }
        }
        for i in 0..2 {
            assert!((w[i] as f64 - wr[i]).abs() < 1e-6, "{} vs {}", w[i], wr[i]);
        }
        // First Adam step moves each weight by about lr against its gradient sign.
        assert!((1.0 - 1e-3 - 1.0f64).abs() < 1.0);
        assert_eq!(adam.iterations(), 2);
    }

    #[test]
    fn l2_only_where_asked() {
        let params = [
            TensorInfo {
                name: "a".into(),
                shape: vec![2],
                l2: 1e-4,
            },
            TensorInfo {
                name: "b".into(),
                shape: vec![1],
                l2: 0.0,
            },
        ];
        let w = [3.0f32, -1.0, 5.0];
        let mut g = [0.0f32; 3];
        let p = l2_penalty(params.iter(), &w, &mut g);
        assert_eq!(l2_value(params.iter(), &w), p);
        assert!((p - 1e-4 * 10.0).abs() < 1e-9);
        assert!((g[0] - 6e-4).abs() < 1e-9 && (g[1] + 2e-4).abs() < 1e-9);
        assert_eq!(g[2], 0.0);
    }

    #[test]
    fn adam_stays_finite_at_the_norm_limit() {
        let n = 2 * BLOCK + 3;
        let mut adam = Adam::new(n);
        let mut w = vec![0.5f32; n];
        let mut g = vec![0.0f32; n];
        g[7] = GRADIENT_NORM_LIMIT as f32;
        for _ in 0..3 {
            adam.step(&mut w, &g, 1e-3);
        }
        assert!(w.iter().all(|x| x.is_finite()));
        let (m, v) = Optimizer::Adam(adam)
            .moments()
            .map(|(m, v)| (m.to_vec(), v.to_vec()))
            .unwrap();
        assert!(m.iter().chain(&v).all(|x| x.is_finite()));
    }

    #[test]
    fn the_mirror_gets_the_same_weights() {
        let n = BLOCK + 9;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let (mut a, mut b) = (Optimizer::new(kind, n), Optimizer::new(kind, n));
            let (mut wa, mut wb) = (vec![0.25f32; n], vec![0.25f32; n]);
            let mut mirror = vec![0.0f32; n];
            for _ in 0..2 {
                a.step(&mut wa, &g, 1e-2);
                b.step_with(&mut wb, 1e-2, Some(&mut mirror), from_buffer(&g));
            }
            assert_eq!(wa, wb);
            assert_eq!(wb, mirror);
        }
    }

    #[test]
    fn averaging_inside_the_update_gives_the_same_bits() {
        use crate::aggregate::{average_gradients, factors};
        let n = 2 * BLOCK + 11;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
        let parts: Vec<(f64, &[f32])> = vec![(14.0, &a), (13.0, &b)];
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let (mut two, mut one) = (Optimizer::new(kind, n), Optimizer::new(kind, n));
            let (mut w2, mut w1) = (vec![0.5f32; n], vec![0.5f32; n]);
            let (mut m2, mut m1) = (vec![0.0f32; n], vec![0.0f32; n]);
            let mut grads = vec![0.0f32; n];
            for _ in 0..3 {
                average_gradients(&mut grads, &parts, &w2, &[]);
                two.step_with(&mut w2, 1e-2, Some(&mut m2), from_buffer(&grads));
                let f = factors(&parts);
                one.step_with(&mut w1, 1e-2, Some(&mut m1), |s, g| {
                    crate::aggregate::average_block(g, s, &f)
                });
            }
            assert_eq!(w1, w2);
            assert_eq!(m1, m2);
            assert_eq!(m1, w1);
        }
    }

    #[test]
    fn clipping_scales_down_only() {
        let norm = |g: &[f32]| g.iter().map(|&x| x * x).sum::<f32>().sqrt();
        let mut g = vec![3.0f32, 4.0];
        clip_to_norm(&mut g, 5.0, 1.0);
        assert!((norm(&g) - 1.0).abs() < 1e-6);
        clip_to_norm(&mut g, 1.0, 2.0);
        assert!((norm(&g) - 1.0).abs() < 1e-6, "never scaled up");
    }
}
