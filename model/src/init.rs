//! Keras-compatible initialisers, driven by gradcast's portable [`Rng`].

use data::Rng;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros (biases, BatchNorm beta and running mean).
    Zeros,
    /// All ones (BatchNorm gamma and running variance).
    Ones,
    /// Keras `glorot_uniform`: U(-l, l), l = sqrt(6 / (fan_in + fan_out)).
    GlorotUniform { fan_in: usize, fan_out: usize },
    /// Keras `he_normal`: truncated normal (cut at 2 sd) with
    /// sd = sqrt(2 / fan_in) / 0.8796…, so the kept values have variance 2 / fan_in.
    HeNormal { fan_in: usize },
}

impl Init {
    /// `n` values drawn from this initialiser.
    pub fn sample(self, n: usize, rng: &mut Rng) -> Vec<f32> {
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::GlorotUniform { fan_in, fan_out } => {
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * limit) as f32)
                    .collect()
            }
            Init::HeNormal { fan_in } => {
                // Keras VarianceScaling(2.0, "fan_in", "truncated_normal").
                let sd = (2.0 / fan_in as f64).sqrt() / 0.879_625_661_034_239_8;
                (0..n)
                    .map(|_| loop {
                        let z = rng.normal();
                        if z.abs() <= 2.0 {
                            break (z * sd) as f32;
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
        (m, var)
    }

    #[test]
    fn glorot_uniform_bounds_and_variance() {
        let mut rng = Rng::new(1);
        let v = Init::GlorotUniform {
            fan_in: 27,
            fan_out: 288,
        }
        .sample(100_000, &mut rng);
        let limit = (6.0f64 / 315.0).sqrt() as f32;
        assert!(v.iter().all(|x| x.abs() <= limit));
        let (m, var) = moments(&v);
        assert!(m.abs() < 1e-3);
        let expected = 2.0 / 315.0;
        assert!(
            (var - expected).abs() / expected < 0.02,
            "{var} vs {expected}"
        );
    }

    #[test]
    fn he_normal_is_truncated_with_variance_two_over_fan_in() {
        let mut rng = Rng::new(2);
        let fan_in = 144;
        let v = Init::HeNormal { fan_in }.sample(200_000, &mut rng);
        let sd = (2.0 / fan_in as f64).sqrt() / 0.879_625_661_034_239_8;
        assert!(v.iter().all(|&x| (x as f64).abs() <= 2.0 * sd + 1e-6));
        let (m, var) = moments(&v);
        assert!(m.abs() < 1e-3);
        let expected = 2.0 / fan_in as f64;
        assert!(
            (var - expected).abs() / expected < 0.02,
            "{var} vs {expected}"
        );
    }
}
