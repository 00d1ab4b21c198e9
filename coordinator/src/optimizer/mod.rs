//! Optimizers (Adam with Keras' defaults and update rule, plain SGD) behind
//! one trait, gradient clipping and L2 regularisation.

mod adam;
mod sgd;

use std::fmt;
use std::str::FromStr;

use model::TensorInfo;
use rayon::prelude::*;

use crate::aggregate::BLOCK;

pub use adam::Adam;
pub use sgd::Sgd;

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

/// Writes the gradient of the block of values starting at `start` into
/// `g`, given that block's weights before the update: `(start, weights, g)`.
pub type GradientSource<'a> = dyn Fn(usize, &[f32], &mut [f32]) + Sync + 'a;

/// An optimizer with its state: what the coordinator applies after each
/// step's average. Its state is a set of named vectors as long as the
/// trainable weights (Adam's `adam.m`, `adam.v`), saved and restored by name,
/// so the resume state needs no knowledge of any one optimizer; a new one is
/// a file beside [`adam`] and a line in [`OptimizerKind`].
pub trait Optimizer: fmt::Debug + Send {
    /// Which optimizer this is.
    fn kind(&self) -> OptimizerKind;

    /// Updates applied so far.
    fn iterations(&self) -> u64;

    /// The state to save, by name, in a fixed order.
    fn state(&self) -> Vec<(&'static str, &[f32])>;

    /// Restores the state saved by [`state`](Optimizer::state): `saved(name)`
    /// gives each named vector. Fails, saying what is missing or of the
    /// wrong length, and then leaves `self` as it was.
    fn restore(
        &mut self,
        saved: &mut dyn FnMut(&str) -> Option<Vec<f32>>,
        iterations: u64,
    ) -> Result<(), String>;

    /// One update whose gradient for the block of values starting at `start`
    /// is written by `gradient(start, weights, block)`, `weights` being that
    /// block's weights before the update (copied from a buffer, or the
    /// weighted mean of the nodes' parts made right there, with the L2
    /// penalty's gradient added, which saves two passes over memory);
    /// optionally also writes the new weights into
    /// `mirror` (e.g. the shared-memory segment) in the same pass. Blocks are
    /// fixed ([`BLOCK`]), so the bits do not depend on the threads. The
    /// caller must know the gradient is usable (finite, within the norm
    /// limit).
    fn step_with(
        &mut self,
        weights: &mut [f32],
        lr: f64,
        mirror: Option<&mut [f32]>,
        gradient: &GradientSource<'_>,
    );

    /// One update of `weights` with `grads` at learning rate `lr`.
    fn step(&mut self, weights: &mut [f32], grads: &[f32], lr: f64) {
        assert_eq!(
            grads.len(),
            weights.len(),
            "gradients and weights differ in length"
        );
        self.step_with(weights, lr, None, &from_buffer(grads))
    }
}

/// A fresh optimizer of `kind` for `len` trainable values.
pub fn new_optimizer(kind: OptimizerKind, len: usize) -> Box<dyn Optimizer> {
    match kind {
        OptimizerKind::Adam => Box::new(Adam::new(len)),
        OptimizerKind::Sgd => Box::new(Sgd),
    }
}

/// Takes the vector named `name` from `saved`, checking its length.
pub(crate) fn take_state(
    saved: &mut dyn FnMut(&str) -> Option<Vec<f32>>,
    name: &str,
    len: usize,
) -> Result<Vec<f32>, String> {
    let v = saved(name).ok_or_else(|| format!("no optimizer state {name:?}"))?;
    if v.len() != len {
        return Err(format!(
            "optimizer state {name:?} holds {} values, the model has {len} trainable values",
            v.len()
        ));
    }
    Ok(v)
}

/// A gradient source for [`Optimizer::step_with`] that copies from `grads`.
pub fn from_buffer(grads: &[f32]) -> impl Fn(usize, &[f32], &mut [f32]) + Sync + '_ {
    move |start, _, g| g.copy_from_slice(&grads[start..start + g.len()])
}

/// Runs `update(weights, state, g)` on every block of [`BLOCK`] weights (in
/// parallel), with the block's optimizer state (`blocks` yields each block of
/// weights with its state) and its gradient `g` as `gradient(start,
/// weights, g)` writes it;
/// the block's new weights are also copied into the same block of `mirror`
/// if given.
pub(crate) fn in_blocks<'a, S, I>(
    blocks: I,
    mirror: Option<&mut [f32]>,
    gradient: &GradientSource<'_>,
    update: impl Fn(&mut [f32], S, &[f32]) + Sync + Send,
) where
    I: IndexedParallelIterator<Item = (&'a mut [f32], S)>,
{
    thread_local! {
        /// Each thread's gradient block, reused from step to step.
        static BLOCK_GRADIENT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let run = |b: usize, (w, state): (&'a mut [f32], S)| {
        BLOCK_GRADIENT.with_borrow_mut(|g| {
            g.resize(w.len(), 0.0);
            gradient(b * BLOCK, w, g);
            update(&mut *w, state, g);
        });
        w
    };
    let blocks = blocks.enumerate();
    match mirror {
        Some(mirror) => blocks
            .zip(mirror.par_chunks_mut(BLOCK))
            .for_each(|((b, block), out)| out.copy_from_slice(run(b, block))),
        None => blocks.for_each(|(b, block)| {
            run(b, block);
        }),
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
        assert_eq!(adam.iterations(), 2);
        // Adam's first step moves each weight by lr against its gradient's
        // sign, whatever the gradient's size (to 0.1 %, while ε ≪ |g|·√(1-β₂)).
        let mut first = Adam::new(3);
        let mut w = vec![0.0f32; 3];
        first.step(&mut w, &[0.5, -0.01, 40.0], 1e-3);
        for (got, want) in w.iter().zip([-1e-3f32, 1e-3, -1e-3]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
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
        let state = adam.state();
        assert_eq!(state.len(), 2);
        assert!(state.iter().all(|(_, s)| s.iter().all(|x| x.is_finite())));
    }

    #[test]
    fn named_state_restores_the_same_updates() {
        let n = BLOCK + 5;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let mut a = new_optimizer(kind, n);
            let mut w = vec![0.1f32; n];
            a.step(&mut w, &g, 1e-2);
            let saved: std::collections::HashMap<String, Vec<f32>> = a
                .state()
                .into_iter()
                .map(|(name, v)| (name.to_string(), v.to_vec()))
                .collect();
            let mut b = new_optimizer(kind, n);
            b.restore(&mut |name| saved.get(name).cloned(), a.iterations())
                .expect("restores its own state");
            let mut w2 = w.clone();
            a.step(&mut w, &g, 1e-2);
            b.step(&mut w2, &g, 1e-2);
            assert_eq!(
                w, w2,
                "{kind}: the restored optimizer continues bit for bit"
            );
            assert_eq!(a.kind(), kind);
        }
        // Adam refuses state that is missing or of another model.
        let mut adam = new_optimizer(OptimizerKind::Adam, 4);
        let err = adam.restore(&mut |_| None, 1).unwrap_err();
        assert!(err.contains("adam.m"), "{err}");
        let err = adam.restore(&mut |_| Some(vec![0.0; 3]), 1).unwrap_err();
        assert!(
            err.contains("3 values") && err.contains("4 trainable"),
            "{err}"
        );
        assert_eq!(adam.iterations(), 0, "a failed restore changes nothing");
    }

    #[test]
    fn the_mirror_gets_the_same_weights() {
        let n = BLOCK + 9;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let (mut a, mut b) = (new_optimizer(kind, n), new_optimizer(kind, n));
            let (mut wa, mut wb) = (vec![0.25f32; n], vec![0.25f32; n]);
            let mut mirror = vec![0.0f32; n];
            for _ in 0..2 {
                a.step(&mut wa, &g, 1e-2);
                b.step_with(&mut wb, 1e-2, Some(&mut mirror), &from_buffer(&g));
            }
            assert_eq!(wa, wb);
            assert_eq!(wb, mirror);
        }
    }

    #[test]
    fn averaging_inside_the_update_gives_the_same_bits() {
        use crate::aggregate::{
            add_l2_block, average_block, average_gradients, factors, l2_penalty, L2Range,
        };
        let n = 2 * BLOCK + 11;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
        let parts: Vec<(f64, &[f32])> = vec![(14.0, &a), (13.0, &b)];
        // Without L2, and with two runs of it, one across a block boundary.
        let runs = [
            L2Range {
                range: 3..40,
                l2: 1e-4,
            },
            L2Range {
                range: BLOCK - 5..BLOCK + 7,
                l2: 0.5,
            },
        ];
        for l2 in [&[][..], &runs[..]] {
            for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
                let (mut two, mut one) = (new_optimizer(kind, n), new_optimizer(kind, n));
                let w0: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32 * 0.01).sin()).collect();
                let (mut w2, mut w1) = (w0.clone(), w0);
                let (mut m2, mut m1) = (vec![0.0f32; n], vec![0.0f32; n]);
                let mut grads = vec![0.0f32; n];
                for _ in 0..3 {
                    let sums = average_gradients(&mut grads, &parts, &w2, l2);
                    assert_eq!(sums.penalty.to_bits(), l2_penalty(&w1, l2).to_bits());
                    two.step_with(&mut w2, 1e-2, Some(&mut m2), &from_buffer(&grads));
                    let f = factors(&parts);
                    one.step_with(&mut w1, 1e-2, Some(&mut m1), &|s, w, g| {
                        average_block(g, s, &f);
                        add_l2_block(g, w, s, l2);
                    });
                }
                assert_eq!(w1, w2);
                assert_eq!(m1, m2);
                assert_eq!(m1, w1);
            }
        }
    }

    #[test]
    fn the_l2_penalty_and_its_gradient_bound() {
        use crate::aggregate::{l2_gradient_norm_bound, l2_penalty, L2Range};
        let n = 3 * BLOCK + 2;
        let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).cos() * 2.0).collect();
        let runs = [
            L2Range {
                range: 10..BLOCK + 10,
                l2: 1e-4,
            },
            L2Range {
                range: 2 * BLOCK..n,
                l2: 3e-4,
            },
        ];
        let (mut exact, mut grad2) = (0.0f64, 0.0f64);
        for r in &runs {
            for &x in &w[r.range.clone()] {
                exact += r.l2 as f64 * (x as f64).powi(2);
                grad2 += (2.0 * r.l2 as f64 * x as f64).powi(2);
            }
        }
        let penalty = l2_penalty(&w, &runs);
        assert!(
            (penalty - exact).abs() < 1e-6 * exact,
            "{penalty} vs {exact}"
        );
        let bound = l2_gradient_norm_bound(penalty, &runs);
        assert!(
            bound >= grad2.sqrt() * (1.0 - 1e-6),
            "{bound} < {}",
            grad2.sqrt()
        );
        assert!(bound < 2.0 * grad2.sqrt(), "a loose bound: {bound}");
        assert_eq!(l2_penalty(&w, &[]), 0.0);
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
