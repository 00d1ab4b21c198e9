//! BatchNorm's loops over one channel's row of values, in vector registers.
//!
//! Around every convolution of a ResNet sit passes over rows of one channel
//! that do a few operations per value: the forward's statistics (`Σ v` and
//! `Σ (v − μ)²` of each image's rows), the backward's two sums `Σ d` and
//! `Σ d·(y − μ)` and BatchNorm's input gradient `k1·d + k2·(y − μ) + k3`
//! (`d` the output gradient where a ReLU let it through), and the bias
//! gradient's `Σ d`. Compiled for the baseline x86-64 target they ran four
//! values at a time or one. Here they run in AVX2 registers (a CPU with
//! AVX-512 has AVX2 too, and these loops are bound by memory and loads, not
//! by the vector width).
//!
//! Every form computes each value with the same operations in the same order
//! as the scalar one (no fused multiply-add; the sums in the same lane
//! accumulators, added up in the same order), so the vector and the scalar
//! forms give the same bits: which one runs never changes a result.

/// Which values of the output gradient pass back through a ReLU, for one
/// row.
#[derive(Clone, Copy)]
pub(crate) enum Gate<'a> {
    /// All of them: no ReLU.
    All,
    /// Where these values (a later ReLU's output) are positive.
    Values(&'a [f32]),
    /// Where `y · s + t > 0` (the op's own ReLU, recomputed from its input).
    Affine(f32, f32),
}

/// Whether the vector forms run here: on a CPU with AVX2 and FMA, unless a
/// kernel path without vectors is forced (`GRADCAST_KERNEL_PATH=portable`
/// or `im2col`, so that those runs keep testing the scalar forms).
fn vectors() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::path::direct_isa().is_some() && crate::path::cpu_has_avx2())
}

/// Panics unless the slices of one row have one length.
fn check(gate: Gate, dz: &[f32], y: &[f32]) {
    assert_eq!(
        dz.len(),
        y.len(),
        "a row's gradient and values differ in length"
    );
    if let Gate::Values(z) = gate {
        assert_eq!(z.len(), y.len(), "a row's gate differs in length");
    }
}

/// `(Σ d, Σ d·(y − mu))` over a row, `d` the gradient `dz` where `gate` lets
/// it through, else 0.
pub(crate) fn sums(gate: Gate, dz: &[f32], y: &[f32], mu: f32) -> (f64, f64) {
    check(gate, dz, y);
    #[cfg(target_arch = "x86_64")]
    if vectors() {
        // SAFETY: `vectors` saw AVX2; the row's slices have one length.
        return unsafe { avx2::sums(gate, dz, y, mu) };
    }
    scalar::sums(gate, dz, y, mu)
}

/// BatchNorm's input gradient of a row, `out = k1·d + k2·(y − mu) + k3`
/// with `d` as in [`sums`].
pub(crate) fn input_grad(gate: Gate, dz: &[f32], y: &[f32], mu: f32, k: [f32; 3], out: &mut [f32]) {
    check(gate, dz, y);
    assert_eq!(out.len(), y.len(), "a row's output differs in length");
    #[cfg(target_arch = "x86_64")]
    if vectors() {
        // SAFETY: as in `sums`, and `out` has the row's length.
        return unsafe { avx2::input_grad(gate, dz, y, mu, k, out) };
    }
    scalar::input_grad(gate, dz, y, mu, k, out)
}

/// `Σ v` over a row in eight lane accumulators (value `j` into lane `j mod
/// 8`), added up in lane order, then the values past the last whole 8.
pub(crate) fn sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vectors() {
        // SAFETY: `vectors` saw AVX2.
        return unsafe { avx2::sum(v) };
    }
    scalar::sum(v)
}

/// `Σ (v − mu)²` over a row, in the lanes and order of [`sum`] (the
/// variance's half of BatchNorm's statistics).
pub(crate) fn centered_squares(v: &[f32], mu: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vectors() {
        // SAFETY: `vectors` saw AVX2.
        return unsafe { avx2::centered_squares(v, mu) };
    }
    scalar::centered_squares(v, mu)
}

/// The gradient at position `j` through the gate.
#[inline(always)]
fn gated(gate: Gate, j: usize, dz: f32, y: f32) -> f32 {
    let open = match gate {
        Gate::All => true,
        Gate::Values(z) => z[j] > 0.0,
        Gate::Affine(s, t) => y * s + t > 0.0,
    };
    if open {
        dz
    } else {
        0.0
    }
}

/// Values per iteration of the sums (their lane accumulators).
const LANES: usize = 16;

/// The forms without vectors: the definition of every result's bits.
mod scalar {
    use super::{gated, Gate, LANES};

    pub(super) fn sums(gate: Gate, dz: &[f32], y: &[f32], mu: f32) -> (f64, f64) {
        let p = dz.len();
        let mut acc = [[0f32; LANES]; 2];
        let mut j = 0;
        while j + LANES <= p {
            for l in 0..LANES {
                let d = gated(gate, j + l, dz[j + l], y[j + l]);
                acc[0][l] += d;
                acc[1][l] += d * (y[j + l] - mu);
            }
            j += LANES;
        }
        super::finish(acc, tail(gate, (dz, y, mu), j))
    }

    /// The sums of the values past the last whole iteration.
    pub(super) fn tail(gate: Gate, (dz, y, mu): (&[f32], &[f32], f32), from: usize) -> [f32; 2] {
        let (mut a, mut b) = (0f32, 0f32);
        for j in from..dz.len() {
            let d = gated(gate, j, dz[j], y[j]);
            a += d;
            b += d * (y[j] - mu);
        }
        [a, b]
    }

    pub(super) fn sum(v: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
    }

    pub(super) fn centered_squares(v: &[f32], mu: f32) -> f32 {
        crate::sum2(v, v, |x, _| (x - mu) * (x - mu))
    }

    pub(super) fn input_grad(
        gate: Gate,
        dz: &[f32],
        y: &[f32],
        mu: f32,
        k: [f32; 3],
        out: &mut [f32],
    ) {
        input_grad_from(gate, (dz, y, mu), k, out, 0);
    }

    /// [`input_grad`] from position `from` on.
    pub(super) fn input_grad_from(
        gate: Gate,
        (dz, y, mu): (&[f32], &[f32], f32),
        [k1, k2, k3]: [f32; 3],
        out: &mut [f32],
        from: usize,
    ) {
        for j in from..out.len() {
            out[j] = k1 * gated(gate, j, dz[j], y[j]) + k2 * (y[j] - mu) + k3;
        }
    }
}

/// The two sums' result from their lane accumulators and the tail's sums.
#[inline(always)]
fn finish(acc: [[f32; LANES]; 2], [a, b]: [f32; 2]) -> (f64, f64) {
    (
        (acc[0].iter().sum::<f32>() + a) as f64,
        (acc[1].iter().sum::<f32>() + b) as f64,
    )
}

/// A gate as a comparison `src·s + t > 0` (`Values(z)` is `z·1 + 0`, the
/// same comparison bit for bit), or `None` for [`Gate::All`].
fn as_affine<'a>(gate: Gate<'a>, y: &'a [f32]) -> Option<(&'a [f32], f32, f32)> {
    match gate {
        Gate::All => None,
        Gate::Values(z) => Some((z, 1.0, 0.0)),
        Gate::Affine(s, t) => Some((y, s, t)),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{as_affine, finish, scalar, Gate, LANES};

    /// The 8 values of `dz` at `at` where `src·s + t > 0` there, else 0
    /// (all of them without a comparison, [`Gate::All`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn gated(dz: __m256, gate: Option<(*const f32, __m256, __m256)>, at: usize) -> __m256 {
        let Some((src, s, t)) = gate else { return dz };
        // SAFETY: the caller reads `src` where it reads `dz`.
        let v = unsafe { _mm256_loadu_ps(src.add(at)) };
        let open =
            _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_add_ps(_mm256_mul_ps(v, s), t), _mm256_setzero_ps());
        _mm256_and_ps(open, dz)
    }

    /// The gate as [`gated`] takes it.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn comparison(gate: Gate, y: &[f32]) -> Option<(*const f32, __m256, __m256)> {
        as_affine(gate, y).map(|(src, s, t)| (src.as_ptr(), _mm256_set1_ps(s), _mm256_set1_ps(t)))
    }

    /// See [`super::sums`]. AVX2 must be present and the slices of one
    /// length (with the gate's).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sums(gate: Gate, dz: &[f32], y: &[f32], mu: f32) -> (f64, f64) {
        let p = dz.len();
        let whole = p - p % LANES;
        let (d, yp, m) = (dz.as_ptr(), y.as_ptr(), _mm256_set1_ps(mu));
        // `acc[h]`: the two sums of lanes 8h .. 8h + 8.
        let mut acc = [[_mm256_setzero_ps(); 2]; 2];
        // SAFETY: every read is below `whole ≤ p`, the length of each slice.
        unsafe {
            let open = comparison(gate, y);
            for j in (0..whole).step_by(LANES) {
                for (h, [a, b]) in acc.iter_mut().enumerate() {
                    let at = j + 8 * h;
                    let g = gated(_mm256_loadu_ps(d.add(at)), open, at);
                    let v = _mm256_loadu_ps(yp.add(at));
                    *a = _mm256_add_ps(*a, g);
                    *b = _mm256_add_ps(*b, _mm256_mul_ps(g, _mm256_sub_ps(v, m)));
                }
            }
        }
        let mut lanes = [[0f32; LANES]; 2];
        for (h, halves) in acc.iter().enumerate() {
            for (sum, &v) in lanes.iter_mut().zip(halves) {
                // SAFETY: lanes 8h .. 8h + 8 of the 16 of `sum`.
                unsafe { _mm256_storeu_ps(sum.as_mut_ptr().add(8 * h), v) };
            }
        }
        finish(lanes, scalar::tail(gate, (dz, y, mu), whole))
    }

    /// The eight lanes of `acc` added in lane order, plus `rest`'s sum.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn finish8(acc: __m256, rest: f32) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: 8 values into 8.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + rest
    }

    /// See [`super::sum`]. AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum(v: &[f32]) -> f32 {
        let whole = v.len() - v.len() % 8;
        let mut acc = _mm256_setzero_ps();
        for at in (0..whole).step_by(8) {
            // SAFETY: `at + 8 ≤ whole ≤ v.len()`.
            acc = _mm256_add_ps(acc, unsafe { _mm256_loadu_ps(v.as_ptr().add(at)) });
        }
        finish8(acc, v[whole..].iter().sum::<f32>())
    }

    /// See [`super::centered_squares`]. AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn centered_squares(v: &[f32], mu: f32) -> f32 {
        let whole = v.len() - v.len() % 8;
        let (mut acc, m) = (_mm256_setzero_ps(), _mm256_set1_ps(mu));
        for at in (0..whole).step_by(8) {
            // SAFETY: `at + 8 ≤ whole ≤ v.len()`.
            let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(v.as_ptr().add(at)) }, m);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
        }
        let rest = v[whole..].iter().map(|x| (x - mu) * (x - mu)).sum::<f32>();
        finish8(acc, rest)
    }

    /// See [`super::input_grad`]. AVX2 must be present and the slices of
    /// one length (with the gate's).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn input_grad(
        gate: Gate,
        dz: &[f32],
        y: &[f32],
        mu: f32,
        k: [f32; 3],
        out: &mut [f32],
    ) {
        let p = out.len();
        let whole = p - p % 8;
        let (d, yp, o) = (dz.as_ptr(), y.as_ptr(), out.as_mut_ptr());
        let (m, k1, k2, k3) = (
            _mm256_set1_ps(mu),
            _mm256_set1_ps(k[0]),
            _mm256_set1_ps(k[1]),
            _mm256_set1_ps(k[2]),
        );
        // `(k1·g + k2·(y − mu)) + k3`, the scalar form's order.
        let value = |g: __m256, v: __m256| {
            _mm256_add_ps(
                _mm256_add_ps(_mm256_mul_ps(k1, g), _mm256_mul_ps(k2, _mm256_sub_ps(v, m))),
                k3,
            )
        };
        // SAFETY: every access is below `whole ≤ p`, the length of each slice.
        unsafe {
            let open = comparison(gate, y);
            for at in (0..whole).step_by(8) {
                let g = gated(_mm256_loadu_ps(d.add(at)), open, at);
                let v = _mm256_loadu_ps(yp.add(at));
                _mm256_storeu_ps(o.add(at), value(g, v));
            }
        }
        scalar::input_grad_from(gate, (dz, y, mu), k, out, whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values with negatives, zeros of both signs, a NaN where `nan`, and
    /// subnormals, deterministic in `seed`.
    fn row(len: usize, seed: u32, nan: bool) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                match h % 23 {
                    0 => -0.0,
                    1 => 0.0,
                    2 => 1e-40,
                    3 if nan && i % 5 == 3 => f32::NAN,
                    _ => ((h >> 8) % 2001) as f32 / 1000.0 - 1.0,
                }
            })
            .collect()
    }

    const LENGTHS: [usize; 9] = [0, 1, 7, 8, 15, 16, 17, 64, 1030];

    fn gates<'a>(z: &'a [f32]) -> [Gate<'a>; 4] {
        [
            Gate::All,
            Gate::Values(z),
            Gate::Affine(0.7, -0.1),
            Gate::Affine(-1.3, 0.0),
        ]
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The scalar forms compute what their formulas say.
    #[test]
    fn the_scalar_forms_are_the_formulas() {
        for len in LENGTHS {
            let v = row(len, 11, false);
            let exact: f64 = v.iter().map(|&x| x as f64).sum();
            let sq: f64 = v.iter().map(|&x| (x as f64 - 0.5).powi(2)).sum();
            assert!((scalar::sum(&v) as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()));
            assert!((scalar::centered_squares(&v, 0.5) as f64 - sq).abs() < 1e-4 * (1.0 + sq));
        }
        let (dz, y, z) = (
            row(1030, 1, false),
            row(1030, 2, false),
            row(1030, 3, false),
        );
        let (mu, k) = (0.125f32, [1.5f32, -0.25, 0.0625]);
        for gate in gates(&z) {
            let d: Vec<f64> = (0..dz.len())
                .map(|j| {
                    let open = match gate {
                        Gate::All => true,
                        Gate::Values(z) => z[j] > 0.0,
                        Gate::Affine(s, t) => y[j] * s + t > 0.0,
                    };
                    if open {
                        dz[j] as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let a: f64 = d.iter().sum();
            let b: f64 = d.iter().zip(&y).map(|(d, &y)| d * (y - mu) as f64).sum();
            let (sa, sb) = scalar::sums(gate, &dz, &y, mu);
            assert!((sa - a).abs() < 1e-4 * (1.0 + a.abs()), "{sa} vs {a}");
            assert!((sb - b).abs() < 1e-4 * (1.0 + b.abs()), "{sb} vs {b}");
            let mut out = vec![0f32; dz.len()];
            scalar::input_grad(gate, &dz, &y, mu, k, &mut out);
            for j in 0..out.len() {
                let want = k[0] as f64 * d[j] + k[1] as f64 * (y[j] - mu) as f64 + k[2] as f64;
                assert!(
                    (out[j] as f64 - want).abs() < 1e-5,
                    "{j}: {} vs {want}",
                    out[j]
                );
            }
        }
    }

    /// The vector forms give the scalar forms' bits, NaN, ±0 and tails
    /// included.
    #[test]
    fn the_vector_forms_give_the_scalar_bits() {
        #[cfg(target_arch = "x86_64")]
        if crate::path::cpu_has_avx2() {
            for len in LENGTHS {
                for nan in [false, true] {
                    let (dz, y, z) = (row(len, 4, nan), row(len, 5, nan), row(len, 6, nan));
                    let (mu, k) = (-0.3f32, [0.9f32, 0.011, -0.02]);
                    for gate in gates(&z) {
                        let (a, b) = scalar::sums(gate, &dz, &y, mu);
                        // SAFETY: the CPU has AVX2; the slices have one length.
                        let (va, vb) = unsafe { avx2::sums(gate, &dz, &y, mu) };
                        assert_eq!(
                            (va.to_bits(), vb.to_bits()),
                            (a.to_bits(), b.to_bits()),
                            "{len}"
                        );
                        let (mut want, mut got) = (vec![1f32; len], vec![2f32; len]);
                        scalar::input_grad(gate, &dz, &y, mu, k, &mut want);
                        // SAFETY: as above.
                        unsafe { avx2::input_grad(gate, &dz, &y, mu, k, &mut got) };
                        assert_eq!(bits(&got), bits(&want), "{len}");
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::path::cpu_has_avx2() {
            for len in LENGTHS {
                let v = row(len, 10, len % 2 == 1);
                // SAFETY: the CPU has AVX2.
                let (s, c) = unsafe { (avx2::sum(&v), avx2::centered_squares(&v, 0.25)) };
                assert_eq!(s.to_bits(), scalar::sum(&v).to_bits(), "{len}");
                assert_eq!(
                    c.to_bits(),
                    scalar::centered_squares(&v, 0.25).to_bits(),
                    "{len}"
                );
            }
        }
        // Whatever form runs here, the public functions give the scalar bits.
        let (dz, y, z) = (row(100, 7, true), row(100, 8, true), row(100, 9, false));
        let (a, b) = sums(Gate::Values(&z), &dz, &y, 0.5);
        let (sa, sb) = scalar::sums(Gate::Values(&z), &dz, &y, 0.5);
        assert_eq!((a.to_bits(), b.to_bits()), (sa.to_bits(), sb.to_bits()));
    }

    #[test]
    #[should_panic(expected = "differs in length")]
    fn a_short_gate_is_refused() {
        let v = [1f32; 16];
        sums(Gate::Values(&v[..15]), &v, &v, 0.0);
    }
}
