//! Which sample goes where: the seeded per-epoch order of the training set and
//! the split of a global batch between nodes.

use crate::Rng;

/// The order in which the `n` training samples are visited in `epoch`: a
/// permutation of `0..n` that depends only on `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    Rng::derive(seed, &[0x5348_5546, epoch]).shuffle(&mut order);
    order
}

/// Splits `total` samples into parts proportional to `weights` (all parts get
/// their share rounded down, the remainder goes one by one to the parts with the
/// largest fractional share, ties to the lower index). The parts sum to `total`.
/// With equal weights the parts differ by at most one.
pub fn split_counts(total: usize, weights: &[f64]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    let weights: Vec<f64> = if sum > 0.0 && sum.is_finite() {
        weights.iter().map(|w| w.max(0.0) / sum).collect()
    } else {
        vec![1.0 / weights.len() as f64; weights.len()]
    };
    let exact: Vec<f64> = weights.iter().map(|w| w * total as f64).collect();
    let mut parts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = total - parts.iter().sum::<usize>().min(total);
    let mut by_fraction: Vec<usize> = (0..parts.len()).collect();
    by_fraction.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in by_fraction.iter().cycle() {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(1000, 7, 0));
        assert_ne!(a, epoch_order(1000, 7, 1));
        assert_ne!(a, epoch_order(1000, 8, 0));
    }

    #[test]
    fn split_counts_sums_and_balances() {
        assert_eq!(split_counts(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(split_counts(7, &[1.0, 1.0]), vec![4, 3]);
        assert_eq!(split_counts(2, &[1.0, 1.0, 1.0]), vec![1, 1, 0]);
        assert_eq!(split_counts(100, &[3.0, 1.0]), vec![75, 25]);
        assert_eq!(split_counts(5, &[0.0, 0.0]), vec![3, 2]);
        assert_eq!(split_counts(5, &[]), Vec::<usize>::new());
        for total in 0..50 {
            let parts = split_counts(total, &[0.3, 2.0, 1.1, 0.7]);
            assert_eq!(parts.iter().sum::<usize>(), total);
        }
    }
}
