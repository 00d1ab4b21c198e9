//! Weighted averaging of node results in a fixed order.

/// Accumulates `Σ w_i x_i / Σ w_i` over flat buffers. Adding the same inputs
/// in the same order always gives bit-identical results; the coordinator adds
/// them in node order, never in arrival order.
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

    /// The weighted mean (zeros if nothing was added).
    pub fn mean(mut self) -> Vec<f32> {
        if self.weight > 0.0 {
            for (w, values) in &self.parts {
                let f = (*w / self.weight) as f32;
                for (s, v) in self.sum.iter_mut().zip(values) {
                    *s += f * v;
                }
            }
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
}
