//! The coordinator's per-value loops (averaging, norms, Adam) compiled for
//! the widest vectors the CPU has, chosen at run time.
//!
//! The release build targets baseline x86-64 (SSE2), where `sqrt` and `/`
//! work on four floats and the f64 sums of squares on two; these loops run
//! over every trainable value twice per step on the coordinator while the
//! nodes wait. Each one is compiled three times (AVX-512F, AVX2, baseline)
//! from the same body. The results are bit-identical whichever runs: the
//! operations are the same IEEE ones in the same order per value (Rust never
//! fuses a multiply and an add on its own, and `sqrt` and `/` are correctly
//! rounded at every width); the tests check that on random data.

use std::sync::OnceLock;

/// The vector extension a loop is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// What every x86-64 (or other) CPU has.
    Baseline,
    /// 256-bit vectors.
    Avx2,
    /// 512-bit vectors.
    Avx512,
}

impl Level {
    /// The levels this CPU can run, baseline first.
    pub fn available() -> Vec<Level> {
        let mut levels = vec![Level::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                levels.push(Level::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                levels.push(Level::Avx512);
            }
        }
        levels
    }
}

/// The widest level this CPU runs (detected once).
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        Level::available()
            .pop()
            .expect("the baseline is always available")
    })
}

/// Defines `fn $name(level: Level, args) -> ret` whose body is compiled for
/// every [`Level`]; `level` must be one of [`Level::available`] (anything
/// else runs the baseline).
macro_rules! per_level {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name(level: Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match level {
                    Level::Avx512 if std::is_x86_feature_detected!("avx512f") => {
                        // SAFETY: the CPU has AVX-512F (checked just now).
                        return unsafe { avx512($($arg),*) };
                    }
                    Level::Avx2 if std::is_x86_feature_detected!("avx2") => {
                        // SAFETY: the CPU has AVX2 (checked just now).
                        return unsafe { avx2($($arg),*) };
                    }
                    _ => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            body($($arg),*)
        }
    };
}

per_level! {
    /// `Σ x²` in f64 (so finite f32 values never overflow it), over eight
    /// independent accumulators in a fixed order, so the bits are fixed too.
    fn squares(values: &[f32]) -> f64 {
        let mut acc = [0.0f64; 8];
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                let x = c[i] as f64;
                acc[i] += x * x;
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for &x in rest {
            sum += (x as f64) * (x as f64);
        }
        sum
    }
}

per_level! {
    /// `Σ l2·x²` in f64, each term rounded to f32 first (`(l2·x·x) as f64`),
    /// over eight independent accumulators in a fixed order.
    fn l2_squares(values: &[f32], l2: f32) -> f64 {
        let mut acc = [0.0f64; 8];
        let chunks = values.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] += (l2 * c[i] * c[i]) as f64;
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for &x in rest {
            sum += (l2 * x * x) as f64;
        }
        sum
    }
}

per_level! {
    /// `g += 2·l2·w` (the gradient of `l2·w²`), value by value.
    fn add_l2_gradient(g: &mut [f32], w: &[f32], l2: f32) {
        for (g, &w) in g.iter_mut().zip(w) {
            *g += 2.0 * l2 * w;
        }
    }
}

per_level! {
    /// `out = Σ f·values[start..start + out.len()]` over `factors`, summed in
    /// their order from zero for every value.
    fn weighted_sum(out: &mut [f32], start: usize, factors: &[(f32, &[f32])]) {
        let end = start + out.len();
        out.fill(0.0);
        for (f, values) in factors {
            for (s, v) in out.iter_mut().zip(&values[start..end]) {
                *s += f * v;
            }
        }
    }
}

/// Adam's constants for one step (see `optimizer::adam`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    /// The step size with the bias corrections folded in.
    pub alpha: f32,
    /// `1 - β₁`.
    pub b1: f32,
    /// `1 - β₂`.
    pub b2: f32,
    pub epsilon: f32,
}

per_level! {
    /// One Adam update of a block of weights `w` with moments `m`, `v` and
    /// gradient `g` (all of one length), Keras' rule, with moments below the
    /// smallest normal f32 stored as zero.
    ///
    /// Without that flush, the first moment of a weight whose gradient stays
    /// zero (a dead ReLU unit) decays by β₁ every step into subnormal values
    /// and then stays at the smallest one forever (0.9 × 2⁻¹⁴⁹ rounds back
    /// to 2⁻¹⁴⁹): after 20 epochs of simple-cnn 45 % of its first moments
    /// were subnormal, and arithmetic on them takes microcode assists on
    /// Intel CPUs (the update's time grew through every epoch there). A
    /// flushed moment changes the weight by at most `α · 2⁻¹²⁶ / ε`, ~1e-34.
    fn adam(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: AdamStep) {
        let AdamStep { alpha, b1, b2, epsilon } = k;
        let n = w.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            let mn = *m + (g - *m) * b1;
            let vn = *v + (g * g - *v) * b2;
            *m = if mn.abs() < f32::MIN_POSITIVE { 0.0 } else { mn };
            *v = if vn < f32::MIN_POSITIVE { 0.0 } else { vn };
            *w -= *m * alpha / (v.sqrt() + epsilon);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use data::Rng;

    fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() as i64 as f64 / i64::MAX as f64) as f32 * scale)
            .collect()
    }

    /// Every available level gives the baseline's bits (the lengths leave a
    /// remainder after the vector loops).
    #[test]
    fn every_level_gives_the_same_bits() {
        let levels = Level::available();
        let mut rng = Rng::new(7);
        let n = 4099;
        let parts: Vec<Vec<f32>> = (0..3).map(|_| random(&mut rng, n, 3.0)).collect();
        let factors: Vec<(f32, &[f32])> = [0.25f32, 0.5, 0.25]
            .iter()
            .zip(&parts)
            .map(|(&f, p)| (f, p.as_slice()))
            .collect();
        let w0 = random(&mut rng, n, 1.0);
        let m0 = random(&mut rng, n, 0.1);
        let v0: Vec<f32> = random(&mut rng, n, 0.01).iter().map(|x| x.abs()).collect();
        let step = AdamStep {
            alpha: 1e-3,
            b1: 0.1,
            b2: 0.001,
            epsilon: 1e-7,
        };
        let run = |level: Level| {
            let mut g = vec![f32::NAN; n - 5];
            weighted_sum(level, &mut g, 5, &factors);
            let norm = squares(level, &g);
            let penalty = l2_squares(level, &g, 1e-2);
            add_l2_gradient(level, &mut g, &w0[5..], 1e-2);
            let (mut w, mut m, mut v) = (w0[5..].to_vec(), m0[5..].to_vec(), v0[5..].to_vec());
            adam(level, &mut w, &mut m, &mut v, &g, step);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            (
                bits(&g),
                [norm.to_bits(), penalty.to_bits()],
                bits(&w),
                bits(&m),
                bits(&v),
            )
        };
        let baseline = run(Level::Baseline);
        // The loops did something.
        assert_ne!(
            baseline.2,
            w0[5..].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(f64::from_bits(baseline.1[0]) > 0.0);
        assert!(f64::from_bits(baseline.1[1]) > 0.0);
        for &level in &levels[1..] {
            assert_eq!(run(level), baseline, "{level:?} differs from the baseline");
        }
    }

    #[test]
    fn weighted_sum_and_squares_are_what_they_say() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [3.0f32, 2.0, 1.0];
        for level in Level::available() {
            let mut out = [9.0f32; 2];
            weighted_sum(level, &mut out, 1, &[(0.5, &a), (0.25, &b)]);
            assert_eq!(out, [1.5, 1.75]);
            let x: Vec<f32> = (1..=11).map(|i| i as f32).collect();
            assert_eq!(squares(level, &x), 506.0);
        }
    }

    /// Moments that decay towards zero reach it instead of lingering as
    /// subnormals, on every level alike; moments of normal size are as
    /// Keras' rule makes them.
    #[test]
    fn decaying_moments_reach_zero_instead_of_subnormals() {
        let step = AdamStep {
            alpha: 1e-3,
            b1: 0.1,
            b2: 0.001,
            epsilon: 1e-7,
        };
        for level in Level::available() {
            let n = 37;
            let (mut w, mut m, mut v) = (vec![0.5f32; n], vec![1e-30f32; n], vec![1e-37f32; n]);
            let zero = vec![0f32; n];
            for _ in 0..3000 {
                adam(level, &mut w, &mut m, &mut v, &zero, step);
                for x in m.iter().chain(&v) {
                    assert!(
                        *x == 0.0 || x.is_normal(),
                        "{level:?}: subnormal moment {x:e}"
                    );
                }
            }
            assert!(m.iter().chain(&v).all(|&x| x == 0.0), "{level:?}");
            // A normal-sized moment follows the rule exactly.
            let (mut w1, mut m1, mut v1) = (vec![0.5f32], vec![0.2f32], vec![0.04f32]);
            adam(level, &mut w1, &mut m1, &mut v1, &[0.1], step);
            let mn = 0.2f32 + (0.1 - 0.2) * 0.1;
            let vn = 0.04f32 + (0.1 * 0.1 - 0.04) * 0.001;
            assert_eq!((m1[0], v1[0]), (mn, vn));
            assert_eq!(w1[0], 0.5 - mn * 1e-3 / (vn.sqrt() + 1e-7));
        }
    }
}
