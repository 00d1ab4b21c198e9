//! The direct kernels in 256-bit vectors (AVX2 + FMA): for CPUs without
//! AVX-512 (and, forced, on any CPU that has AVX2). The layouts and the
//! arithmetic are those of [`super::avx512`]; only the register blocks are
//! smaller, as there are 16 registers of 8 floats instead of 32 of 16. A
//! "position vector" here is 8 positions (wide lengths are multiples of 16,
//! so of 8 too).

use std::arch::x86_64::*;

use super::Wide;

/// Sum of a register's 8 lanes (a fixed order: the bits are fixed too).
///
/// # Safety
///
/// AVX2 must be present.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_lanes(a: __m256) -> f32 {
    let four = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_shuffle_ps::<0b01>(two, two));
    _mm_cvtss_f32(one)
}

/// Output channels per register block of the forward kernel.
const CB: usize = 4;

/// # Safety
///
/// AVX2 and FMA must be present, and `xp`, `w` and `out` must be as long as `g` says (the safe `super::forward` checks them).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward(g: &Wide, xp: &[f32], w: &[f32], out: &mut [f32]) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        let (xp, w, out) = (xp.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let offs = g.offsets();
        let mut co = 0;
        while co < g.cout {
            let cb = (g.cout - co).min(CB);
            let mut q = 0;
            while q < g.l {
                let left = (g.l - q) / 8;
                // SAFETY (all calls): `q + 8·NV ≤ l` and `co + C ≤ cout`.
                q += 8 * match (cb, left) {
                    (CB, 2..) => block::<CB, 2>(g, &offs, xp, w, out, co, q),
                    (CB, _) => block::<CB, 1>(g, &offs, xp, w, out, co, q),
                    (_, 3..) => block::<1, 3>(g, &offs, xp, w, out, co, q),
                    (_, _) => block::<1, 1>(g, &offs, xp, w, out, co, q),
                };
            }
            co += if cb == CB { CB } else { 1 };
        }
    }
}

/// `NV` vectors of positions from `q`, output channels `co .. co + C`.
/// Returns `NV`.
///
/// # Safety
///
/// AVX2 and FMA must be present, and positions `q .. q + 8·NV` and channels `co .. co + C` must lie inside `g`'s planes, `w` and `out`.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const C: usize, const NV: usize>(
    g: &Wide,
    offs: &[usize],
    xp: *const f32,
    w: *const f32,
    out: *mut f32,
    co: usize,
    q: usize,
) -> usize {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; C];
        let taps = offs.len();
        // Weights of channels `co ..`: `[cin][taps][8]` from `packed_index`
        // (`co` need not start an 8-block: the index adds `co % 8`).
        let wb = w.add(super::packed_index(g.cin, taps, (0, 0, co)));
        for ci in 0..g.cin {
            let xc = xp.add(ci * g.s + q);
            let wc = wb.add(ci * taps * super::BLOCK);
            for (t, &off) in offs.iter().enumerate() {
                let xt = xc.add(off);
                let mut xv = [_mm256_setzero_ps(); NV];
                for (v, x) in xv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(xt.add(8 * v));
                }
                let wt = wc.add(t * super::BLOCK);
                for (c, row) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*wt.add(c));
                    for (a, x) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(wv, *x, *a);
                    }
                }
            }
        }
        for (c, row) in acc.iter().enumerate() {
            let o = out.add((co + c) * g.l + q);
            for (v, a) in row.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * v), *a);
            }
        }
        NV
    }
}

/// # Safety
///
/// AVX2 and FMA must be present, and the slices must be as long as `g` says (the safe `super::weight_grad` checks them).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad(
    g: &Wide,
    n: (usize, usize, usize, usize),
    xp: *const f32,
    dy: *const f32,
    dw: &mut [f32],
    lanes: usize,
) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        let dw = dw.as_mut_ptr();
        // As in the AVX-512 kernel: blocks of input channels whose planes
        // stay in L2, output channels outermost within them.
        let ci_block = ((64 << 10) / (n.0 * g.s).max(1)).clamp(1, g.cin);
        for ci0 in (0..g.cin).step_by(ci_block) {
            let mut co = 0;
            while co < g.cout {
                let cb = g.cout - co;
                let mut step = 1;
                for ci in ci0..(ci0 + ci_block).min(g.cin) {
                    for ky in 0..g.kh {
                        let x = xp.add(ci * g.s + g.row_offset(ky));
                        let d = (dw.add((ci * g.kh + ky) * g.kw * g.cout * lanes), lanes);
                        step = match (g.stride, cb, g.kw) {
                            (1, 4.., 3) => grad_row::<4, 3, 1>(g, n, x, dy, d, co),
                            (1, 2.., 3) => grad_row::<2, 3, 1>(g, n, x, dy, d, co),
                            (1, _, 3) => grad_row::<1, 3, 1>(g, n, x, dy, d, co),
                            (1, 6.., 2) => grad_row::<6, 2, 1>(g, n, x, dy, d, co),
                            (1, 2.., 2) => grad_row::<2, 2, 1>(g, n, x, dy, d, co),
                            (1, _, 2) => grad_row::<1, 2, 1>(g, n, x, dy, d, co),
                            (1, 8.., 1) => grad_row::<8, 1, 1>(g, n, x, dy, d, co),
                            (2, 4.., 3) => grad_row::<4, 3, 2>(g, n, x, dy, d, co),
                            (2, 4.., 2) => grad_row::<4, 2, 2>(g, n, x, dy, d, co),
                            (2, 8.., 1) => grad_row::<8, 1, 2>(g, n, x, dy, d, co),
                            _ => grad_row_any(g, n, x, dy, d, co),
                        };
                    }
                }
                co += step;
            }
        }
    }
}

/// One kernel row (`K = kw` taps) of one input channel, output channels
/// `co .. co + C`, summed over all `l` positions, for stride `S`. Returns `C`.
///
/// # Safety
///
/// AVX2 and FMA must be present, and `x`, `dy` and the `C·K` weights from `dw` must lie inside the buffers their caller checked.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_row<const C: usize, const K: usize, const S: usize>(
    g: &Wide,
    (images, xs, ds, dc): (usize, usize, usize, usize),
    x: *const f32,
    dy: *const f32,
    (d, lanes): (*mut f32, usize),
    co: usize,
) -> usize {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        debug_assert_eq!(S, g.stride);
        let col = |kx: usize| if S == 1 { kx } else { g.col_offset(kx) };
        let mut acc = [[_mm256_setzero_ps(); K]; C];
        for i in 0..images {
            let x = x.add(i * xs);
            let dy = dy.add(i * ds);
            let mut q = 0;
            while q < g.l {
                let mut xv = [_mm256_setzero_ps(); K];
                for (kx, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(x.add(q + col(kx)));
                }
                for (c, row) in acc.iter_mut().enumerate() {
                    let dv = _mm256_loadu_ps(dy.add((co + c) * dc + q));
                    for (a, v) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(dv, *v, *a);
                    }
                }
                q += 8;
            }
        }
        for (c, row) in acc.iter().enumerate() {
            for (kx, a) in row.iter().enumerate() {
                flush(d.add((kx * g.cout + co + c) * lanes), lanes, *a);
            }
        }
        C
    }
}

/// Adds a register of partial sums to one weight: into the first 8 of its
/// 16 partial sums when `lanes` is 16 (`super::lane_sums` adds all 16),
/// reduced when 1.
///
/// # Safety
///
/// AVX2 must be present, and `p .. p + lanes` must be valid for writes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn flush(p: *mut f32, lanes: usize, a: __m256) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        if lanes == 16 {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a));
        } else {
            *p += sum_lanes(a);
        }
    }
}

/// [`grad_row`] for any kernel width, one output channel at a time.
///
/// # Safety
///
/// AVX2 and FMA must be present, and `x`, `dy` and the weights from `dw` must lie inside the buffers their caller checked.
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_row_any(
    g: &Wide,
    (images, xs, ds, dc): (usize, usize, usize, usize),
    x: *const f32,
    dy: *const f32,
    (d, lanes): (*mut f32, usize),
    co: usize,
) -> usize {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        for kx in 0..g.kw {
            let mut acc = _mm256_setzero_ps();
            for i in 0..images {
                let x = x.add(i * xs);
                let dyc = dy.add(i * ds + co * dc);
                let mut q = 0;
                while q < g.l {
                    acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(dyc.add(q)),
                        _mm256_loadu_ps(x.add(q + g.col_offset(kx))),
                        acc,
                    );
                    q += 8;
                }
            }
            flush(d.add((kx * g.cout + co) * lanes), lanes, acc);
        }
        1
    }
}

/// # Safety
///
/// AVX2 and FMA must be present, and the slices must be as long as `g` says (the safe `super::weight_grad_gemm` checks them).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad_gemm(
    g: &Wide,
    n: (usize, usize, usize),
    xp: *const f32,
    t: *const f32,
    dw: &mut [f32],
) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        let dw = dw.as_mut_ptr();
        let np = super::transposed_width(g.cout);
        let mut co = 0;
        while co < g.cout {
            let mut ci = 0;
            while ci < g.cin {
                let left = g.cin - ci;
                let a = (g, n, xp, t, np, dw, ci, co);
                ci += match (g.stride, g.kh, left) {
                    // 1×1: Winograd's products.
                    (1, 1, 12..) => gemm_block::<1, 1, 12, 12, 1>(a),
                    (1, 1, 4..) => gemm_block::<1, 1, 4, 4, 1>(a),
                    (1, 1, _) => gemm_block::<1, 1, 1, 1, 1>(a),
                    (1, 3, _) => gemm_block::<3, 3, 1, 9, 1>(a),
                    (1, _, 3..) => gemm_block::<2, 2, 3, 12, 1>(a),
                    (1, _, _) => gemm_block::<2, 2, 1, 4, 1>(a),
                    (_, 3, _) => gemm_block::<3, 3, 1, 9, 2>(a),
                    (_, _, _) => gemm_block::<2, 2, 1, 4, 2>(a),
                };
            }
            co += 8;
        }
    }
}

/// Input channels `ci .. ci + CI` (`M = CI·KH·KW` rows of taps) against
/// output channels `co .. co + 8`, for stride `S`; returns `CI`.
///
/// # Safety
///
/// AVX2 and FMA must be present, and the rows and channels of the block must lie inside the buffers their caller checked.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::type_complexity)]
unsafe fn gemm_block<
    const KH: usize,
    const KW: usize,
    const CI: usize,
    const M: usize,
    const S: usize,
>(
    (g, (images, xs, ts), xp, t, np, dw, ci, co): (
        &Wide,
        (usize, usize, usize),
        *const f32,
        *const f32,
        usize,
        *mut f32,
        usize,
        usize,
    ),
) -> usize {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        debug_assert_eq!(M, CI * KH * KW);
        debug_assert_eq!(S, g.stride);
        let row_off = |ky: usize| if S == 1 { ky * g.wp } else { g.row_offset(ky) };
        let col_off = |kx: usize| if S == 1 { kx } else { g.col_offset(kx) };
        let mut acc = [_mm256_setzero_ps(); M];
        for i in 0..images {
            let x = xp.add(i * xs + ci * g.s);
            let ti = t.add(i * ts + co);
            for q in 0..g.l {
                // (`co + 8 ≤ np`: the transposed rows are whole 16s.)
                let dv = _mm256_loadu_ps(ti.add(q * np));
                for c in 0..CI {
                    for ky in 0..KH {
                        let row = x.add(c * g.s + row_off(ky) + q);
                        for kx in 0..KW {
                            let sv = _mm256_broadcast_ss(&*row.add(col_off(kx)));
                            let a = &mut acc[(c * KH + ky) * KW + kx];
                            *a = _mm256_fmadd_ps(sv, dv, *a);
                        }
                    }
                }
            }
        }
        let taps = KH * KW;
        let valid = (g.cout - co).min(8);
        for (r, a) in acc.iter().enumerate() {
            let (c, tap) = (r / taps, r % taps);
            let d = dw.add(((ci + c) * taps + tap) * g.cout + co);
            if valid == 8 {
                _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), *a));
            } else {
                let mut sums = [0f32; 8];
                _mm256_storeu_ps(sums.as_mut_ptr(), *a);
                for (j, s) in sums.iter().enumerate().take(valid) {
                    *d.add(j) += s;
                }
            }
        }
        CI
    }
}

/// The 8 × 8 transpose of `r` (row `i` of the result is lane `i` of every
/// row of `r`), in registers: interleaving pairs of rows, pairs of pairs
/// within 128-bit halves, then the halves.
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let mut t = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Half k of u[4g + j]: value 4k + j of rows 4g .. 4g + 4.
    let mut u = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let b = 4 * g;
        u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm256_shuffle_ps::<0xEE>(t[b], t[b + 2]);
        u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm256_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for j in 0..4 {
        out[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
        out[4 + j] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
    }
    out
}

/// [`super::transpose_gradient`] 8 positions by 8 channels at a time,
/// through registers; the channels past `cout` of the last block are
/// written as zero (the padding columns of `t`).
///
/// # Safety
///
/// AVX2 must be present; `l` a multiple of 8, `dy` holding `(cout − 1)·dc
/// + l` values and `t` `l·np` with `np ≥ cout` a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transpose_gradient(
    (l, cout, np): (usize, usize, usize),
    dy: &[f32],
    dc: usize,
    t: &mut [f32],
) {
    debug_assert!(l.is_multiple_of(8) && np.is_multiple_of(8) && np >= cout);
    debug_assert!(dy.len() >= (cout - 1) * dc + l && t.len() >= l * np);
    // SAFETY: the caller upholds this function's contract: each row read
    // is `dy[co·dc + q0 .. + 8]` with `co < cout`, `q0 + 8 ≤ l`, and each
    // store `t[(q0 + j)·np + co0 .. + 8]` with `co0 + 8 ≤ np`.
    unsafe {
        let (d, out) = (dy.as_ptr(), t.as_mut_ptr());
        for q0 in (0..l).step_by(8) {
            for co0 in (0..cout).step_by(8) {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (i, row) in rows.iter_mut().enumerate().take(cout - co0) {
                    *row = _mm256_loadu_ps(d.add((co0 + i) * dc + q0));
                }
                for (j, col) in transpose8(rows).into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((q0 + j) * np + co0), col);
                }
            }
        }
    }
}
