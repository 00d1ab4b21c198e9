//! Weighted averaging of node results in a fixed order.

use rayon::prelude::*;

use crate::vector;

/// Values per block of the parallel passes. Blocks are fixed, so results do
/// not depend on the number of threads.
pub(crate) const BLOCK: usize = 1 << 14;

/// L2 regularisation of one run of parameters: `Σ l2·w²` is added to the loss.
#[derive(Debug, Clone)]
pub(crate) struct L2Range {
    pub range: std::ops::Range<usize>,
    pub l2: f32,
}

/// What [`average_gradients`] found besides the average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GradientSums {
    /// `Σ l2·w²` (what Keras adds to the reported loss).
    pub penalty: f64,
    /// `Σ g²` of the result (not finite if any value is not).
    pub squares: f64,
}

/// `Σ x²` in f64 (so finite f32 values never overflow it), over eight
/// independent accumulators; the order is fixed, so the bits are too.
pub(crate) fn sum_of_squares(values: &[f32]) -> f64 {
    vector::squares(vector::level(), values)
}

/// [`sum_of_squares`] over fixed blocks on all threads, the blocks' sums
/// added in block order (the bits do not depend on the number of threads):
/// the norm check of a node's whole gradient as it arrives.
pub(crate) fn sum_of_squares_par(values: &[f32]) -> f64 {
    let level = vector::level();
    values
        .par_chunks(BLOCK)
        .map(|b| vector::squares(level, b))
        .collect::<Vec<_>>()
        .iter()
        .sum()
}

/// The runs of `l2` within the block of values `start..start + len`, as
/// `(offset in the block, length, l2)`.
fn l2_in_block(
    start: usize,
    len: usize,
    l2: &[L2Range],
) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
    let end = start + len;
    l2.iter().filter_map(move |run| {
        let (lo, hi) = (run.range.start.max(start), run.range.end.min(end));
        (lo < hi).then(|| (lo - start, hi - lo, run.l2))
    })
}

/// `Σ l2·w²` over the `l2` runs within the block `w` of the weights (which
/// starts at value `start`).
pub(crate) fn l2_block_penalty(w: &[f32], start: usize, l2: &[L2Range]) -> f64 {
    let level = vector::level();
    l2_in_block(start, w.len(), l2)
        .map(|(at, len, l2)| vector::l2_squares(level, &w[at..at + len], l2))
        .fold(0.0, |a, b| a + b)
}

/// Adds the L2 penalty's gradient `2·l2·w` to the block `g` of the gradient
/// (values `start..`), `w` being the same block of the weights.
pub(crate) fn add_l2_block(g: &mut [f32], w: &[f32], start: usize, l2: &[L2Range]) {
    let level = vector::level();
    for (at, len, l2) in l2_in_block(start, g.len(), l2) {
        vector::add_l2_gradient(level, &mut g[at..at + len], &w[at..at + len], l2);
    }
}

/// `Σ l2·w²` over the `l2` runs of `weights` (what Keras adds to the
/// reported loss), by fixed blocks on all threads, the blocks' sums added in
/// block order: the same bits as [`average_gradients`]' penalty.
pub(crate) fn l2_penalty(weights: &[f32], l2: &[L2Range]) -> f64 {
    if l2.is_empty() {
        return 0.0;
    }
    weights
        .par_chunks(BLOCK)
        .enumerate()
        .map(|(b, w)| l2_block_penalty(w, b * BLOCK, l2))
        .collect::<Vec<_>>()
        .iter()
        .sum()
}

/// An upper bound of the norm of the L2 penalty's gradient `2·l2·w` over the
/// runs, from the penalty `Σ l2·w²`: `Σ 4·l2²·w² ≤ 4·max(l2)·Σ l2·w²`.
pub(crate) fn l2_gradient_norm_bound(penalty: f64, l2: &[L2Range]) -> f64 {
    let max = l2.iter().map(|r| r.l2 as f64).fold(0.0, f64::max);
    2.0 * (max * penalty).max(0.0).sqrt()
}

/// Each part's share of the total weight, as the factor its values are
/// multiplied by.
pub(crate) fn factors<'a>(parts: &[(f64, &'a [f32])]) -> Vec<(f32, &'a [f32])> {
    let total: f64 = parts.iter().map(|(w, _)| w).sum();
    parts
        .iter()
        .map(|(w, v)| {
            (
                if total > 0.0 {
                    (*w / total) as f32
                } else {
                    0.0
                },
                *v,
            )
        })
        .collect()
}

/// `out = Σ f·values[start..]` over `factors` in order: the arithmetic of
/// every weighted mean of gradients, whoever computes it.
pub(crate) fn average_block(out: &mut [f32], start: usize, factors: &[(f32, &[f32])]) {
    vector::weighted_sum(vector::level(), out, start, factors)
}

/// Writes into `out` the weighted mean of `parts` (`(weight, values)`,
/// summed in the given order for every value), plus the gradient `2·l2·w`
/// of the L2 penalty of `weights` over the `l2` runs; one pass over memory,
/// in fixed blocks on all threads (the bits never depend on the threads).
pub(crate) fn average_gradients(
    out: &mut [f32],
    parts: &[(f64, &[f32])],
    weights: &[f32],
    l2: &[L2Range],
) -> GradientSums {
    let factors = factors(parts);
    let sums: Vec<(f64, f64)> = out
        .par_chunks_mut(BLOCK)
        .enumerate()
        .map(|(b, out)| {
            let start = b * BLOCK;
            let end = start + out.len();
            average_block(out, start, &factors);
            let penalty = l2_block_penalty(&weights[start..end], start, l2);
            add_l2_block(out, &weights[start..end], start, l2);
            let squares = sum_of_squares(out);
            (penalty, squares)
        })
        .collect();
    GradientSums {
        penalty: sums.iter().map(|s| s.0).sum(),
        squares: sums.iter().map(|s| s.1).sum(),
    }
}

/// Accumulates `Σ w_i x_i / Σ w_i` over flat buffers. Adding the same inputs
/// in the same order always gives bit-identical results; the coordinator adds
/// them in part order, never in arrival order.
#[derive(Debug, Clone)]
pub struct WeightedSum {
    sum: Vec<f32>,
    weight: f64,
    parts: Vec<(f64, Vec<f32>)>,
}

impl WeightedSum {
    /// An empty sum over buffers of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![0.0; len],
            weight: 0.0,
            parts: Vec::new(),
        }
    }

    /// Adds `values` with weight `w` (e.g. the samples behind a node's mean).
    /// Returns false, adding nothing, if the length is wrong.
    pub fn add(&mut self, w: f64, values: Vec<f32>) -> bool {
        if values.len() != self.sum.len() {
            return false;
        }
        self.weight += w;
        self.parts.push((w, values));
        true
    }

    /// Total weight added.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// The weighted mean (zeros if nothing was added). Each value is summed
    /// over the parts in the order they were added, whatever the threads.
    pub fn mean(mut self) -> Vec<f32> {
        if self.weight > 0.0 {
            let parts: Vec<(f32, &[f32])> = self
                .parts
                .iter()
                .map(|(w, v)| ((*w / self.weight) as f32, v.as_slice()))
                .collect();
            self.sum
                .par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(b, out)| {
                    let start = b * BLOCK;
                    for (f, values) in &parts {
                        let values = &values[start..start + out.len()];
                        for (s, v) in out.iter_mut().zip(values) {
                            *s += f * v;
                        }
                    }
                });
        }
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_of_means_is_the_global_mean() {
        // Node 0 saw 3 samples with mean 2, node 1 saw 1 sample with mean 6.
        let mut s = WeightedSum::new(2);
        assert!(s.add(3.0, vec![2.0, -1.0]));
        assert!(s.add(1.0, vec![6.0, 3.0]));
        assert!(!s.add(1.0, vec![1.0]));
        assert_eq!(s.weight(), 4.0);
        assert_eq!(s.mean(), vec![3.0, 0.0]);
        assert_eq!(WeightedSum::new(3).mean(), vec![0.0; 3]);
    }

    #[test]
    fn same_order_same_bits() {
        let a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..100).map(|i| (i as f32 * 0.11).cos()).collect();
        let run = || {
            let mut s = WeightedSum::new(100);
            s.add(17.0, a.clone());
            s.add(15.0, b.clone());
            s.mean()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn average_gradients_matches_the_plain_sum_with_l2() {
        let n = 2 * BLOCK + 5;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let w: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        // One L2 run that crosses a block boundary.
        let l2 = [L2Range {
            range: BLOCK - 3..BLOCK + 4,
            l2: 1e-2,
        }];
        let mut out = vec![f32::NAN; n];
        let sums = average_gradients(&mut out, &[(3.0, &a), (1.0, &b)], &w, &l2);
        let mut plain = WeightedSum::new(n);
        plain.add(3.0, a.clone());
        plain.add(1.0, b.clone());
        let mut expected = plain.mean();
        let mut penalty = 0.0f64;
        for i in l2[0].range.clone() {
            penalty += (1e-2f32 * w[i] * w[i]) as f64;
            expected[i] += 2.0 * 1e-2 * w[i];
        }
        assert_eq!(out, expected);
        assert!((sums.penalty - penalty).abs() < 1e-9);
        let squares: f64 = expected.iter().map(|&g| (g as f64).powi(2)).sum();
        assert!((sums.squares - squares).abs() < 1e-9 * squares);
        let mut bad = b.clone();
        bad[BLOCK + 1] = f32::INFINITY;
        let sums = average_gradients(&mut out, &[(1.0, &a), (1.0, &bad)], &w, &[]);
        assert!(!sums.squares.is_finite());
    }

    #[test]
    fn parallel_blocks_sum_like_one_loop() {
        let n = 3 * BLOCK + 17;
        let parts: Vec<(f64, Vec<f32>)> = (0..3)
            .map(|p| {
                let v = (0..n)
                    .map(|i| ((i * (p + 3)) as f32 * 0.013).sin())
                    .collect();
                (p as f64 + 1.5, v)
            })
            .collect();
        let mut s = WeightedSum::new(n);
        for (w, v) in &parts {
            s.add(*w, v.clone());
        }
        let total: f64 = parts.iter().map(|(w, _)| w).sum();
        let mut expected = vec![0.0f32; n];
        for (w, v) in &parts {
            let f = (*w / total) as f32;
            for (e, x) in expected.iter_mut().zip(v) {
                *e += f * x;
            }
        }
        assert_eq!(s.mean(), expected);
    }

    #[test]
    fn the_parallel_norm_is_the_blocks_in_order_and_sees_a_nan() {
        let n = 5 * BLOCK + 3;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
        let by_blocks: f64 = v.chunks(BLOCK).map(sum_of_squares).sum();
        assert_eq!(sum_of_squares_par(&v).to_bits(), by_blocks.to_bits());
        let exact: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((sum_of_squares_par(&v) - exact).abs() < 1e-9 * exact);
        let mut bad = v;
        bad[4 * BLOCK + 1] = f32::NAN;
        assert!(!sum_of_squares_par(&bad).is_finite());
        assert_eq!(sum_of_squares_par(&[]), 0.0);
    }
}
