//! The direct kernels in 512-bit vectors (AVX-512F): 16 positions per
//! register, 32 registers.

use std::arch::x86_64::*;

use super::Wide;

/// The mask of the first `n` (≤ 16) lanes.
#[inline]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// # Safety
///
/// AVX-512F must be present; `even` and `odd` must hold `src.len().div_ceil(2)` and `src.len() / 2` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn split_row(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        let n = src.len();
        let (s, e, o) = (src.as_ptr(), even.as_mut_ptr(), odd.as_mut_ptr());
        let idx_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let idx_odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let mut i = 0;
        while i + 32 <= n {
            let (a, b) = (_mm512_loadu_ps(s.add(i)), _mm512_loadu_ps(s.add(i + 16)));
            _mm512_storeu_ps(e.add(i / 2), _mm512_permutex2var_ps(a, idx_even, b));
            _mm512_storeu_ps(o.add(i / 2), _mm512_permutex2var_ps(a, idx_odd, b));
            i += 32;
        }
        if i < n {
            // The last (fewer than 32) values in two registers, then their
            // even and odd lanes gathered into one register each.
            let left = n - i;
            let a = _mm512_maskz_loadu_ps(lanes(left), s.add(i));
            // (`wrapping_add`: with 16 or fewer left this points past the
            // row, and the all-zero mask reads nothing there.)
            let b = _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), s.wrapping_add(i + 16));
            let at = i / 2;
            let (ne, no) = (left.div_ceil(2).min(16), (left / 2).min(16));
            _mm512_mask_storeu_ps(e.add(at), lanes(ne), _mm512_permutex2var_ps(a, idx_even, b));
            _mm512_mask_storeu_ps(o.add(at), lanes(no), _mm512_permutex2var_ps(a, idx_odd, b));
        }
    }
}

/// The 16 × 16 transpose of `r` (row `i` of the result is lane `i` of
/// every row of `r`), in registers: interleaving pairs of rows, then pairs
/// of pairs within 128-bit lanes, then 128-bit lanes twice.
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Lane k of u[4g + j]: value 4k + j of rows 4g .. 4g + 4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let b = 4 * g;
        u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm512_shuffle_ps::<0xEE>(t[b], t[b + 2]);
        u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
    }
    for j in 0..4 {
        t[j] = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        t[4 + j] = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
        t[8 + j] = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        t[12 + j] = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        out[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[8 + j]);
        out[4 + j] = _mm512_shuffle_f32x4::<0x88>(t[4 + j], t[12 + j]);
        out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(t[4 + j], t[12 + j]);
    }
    out
}

/// [`super::transpose_gradient`] 16 positions by 16 channels at a time,
/// through registers; the channels past `cout` of the last block are
/// written as zero (the padding columns of `t`).
///
/// # Safety
///
/// AVX-512F must be present; `l` a multiple of 16, `dy` holding `(cout −
/// 1)·dc + l` values and `t` `l·np` with `np ≥ cout` a multiple of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_gradient(
    (l, cout, np): (usize, usize, usize),
    dy: &[f32],
    dc: usize,
    t: &mut [f32],
) {
    debug_assert!(l.is_multiple_of(16) && np.is_multiple_of(16) && np >= cout);
    debug_assert!(dy.len() >= (cout - 1) * dc + l && t.len() >= l * np);
    // SAFETY: the caller upholds this function's contract: each row read
    // is `dy[co·dc + q0 .. + 16]` with `co < cout`, `q0 + 16 ≤ l`, and
    // each store `t[(q0 + j)·np + co0 .. + 16]` with `co0 + 16 ≤ np`.
    unsafe {
        let (d, out) = (dy.as_ptr(), t.as_mut_ptr());
        for q0 in (0..l).step_by(16) {
            for co0 in (0..cout).step_by(16) {
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, row) in rows.iter_mut().enumerate().take(cout - co0) {
                    *row = _mm512_loadu_ps(d.add((co0 + i) * dc + q0));
                }
                for (j, col) in transpose16(rows).into_iter().enumerate() {
                    _mm512_storeu_ps(out.add((q0 + j) * np + co0), col);
                }
            }
        }
    }
}

/// Output channels per register block of the forward kernel.
const CB: usize = 8;

/// # Safety
///
/// AVX-512F must be present, and `xp`, `w` and `out` must be as long as `g` says (the safe `super::forward` checks them).
#[target_feature(enable = "avx512f")]
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
                let left = (g.l - q) / 16;
                // SAFETY (all calls): `q + 16·NV ≤ l` and `co + CB' ≤ cout`.
                q += 16
                    * match (cb, left) {
                        (CB, 3..) => block::<CB, 3>(g, &offs, xp, w, out, co, q),
                        (CB, 2) => block::<CB, 2>(g, &offs, xp, w, out, co, q),
                        (CB, _) => block::<CB, 1>(g, &offs, xp, w, out, co, q),
                        (4..=7, 3..) => block::<4, 3>(g, &offs, xp, w, out, co, q),
                        (4..=7, _) => block::<4, 1>(g, &offs, xp, w, out, co, q),
                        (_, 3..) => block::<1, 3>(g, &offs, xp, w, out, co, q),
                        (_, _) => block::<1, 1>(g, &offs, xp, w, out, co, q),
                    };
            }
            co += match cb {
                CB => CB,
                4..=7 => 4,
                _ => 1,
            };
        }
    }
}

/// `NV` vectors of positions from `q`, output channels `co .. co + C`.
/// Returns `NV`.
///
/// # Safety
///
/// AVX-512F must be present, and positions `q .. q + 16·NV` and channels `co .. co + C` must lie inside `g`'s planes, `w` and `out`.
#[inline]
#[target_feature(enable = "avx512f")]
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
        let mut acc = [[_mm512_setzero_ps(); NV]; C];
        let taps = offs.len();
        // This block's weights: `[cin][taps][8]` from `packed_index`.
        let wb = w.add(super::packed_index(g.cin, taps, (0, 0, co)));
        for ci in 0..g.cin {
            let xc = xp.add(ci * g.s + q);
            let wc = wb.add(ci * taps * super::BLOCK);
            for (t, &off) in offs.iter().enumerate() {
                let xt = xc.add(off);
                let mut xv = [_mm512_setzero_ps(); NV];
                for (v, x) in xv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(xt.add(16 * v));
                }
                let wt = wc.add(t * super::BLOCK);
                for (c, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*wt.add(c));
                    for (a, x) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, *x, *a);
                    }
                }
            }
        }
        for (c, row) in acc.iter().enumerate() {
            let o = out.add((co + c) * g.l + q);
            for (v, a) in row.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * v), *a);
            }
        }
        NV
    }
}

/// Output channels per register block of the weight-gradient kernel
/// (times `kw` taps of one kernel row: 24 accumulators for 3×3).
const GB: usize = 8;

/// # Safety
///
/// AVX-512F must be present, and the slices must be as long as `g` says (the safe `super::weight_grad` checks them).
#[target_feature(enable = "avx512f")]
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
        // Blocks of input channels whose planes (of every image) stay in L2,
        // and within them output channels outermost: their rows of `dy` stay
        // in L1 while the input planes stream past.
        let ci_block = ((64 << 10) / (n.0 * g.s).max(1)).clamp(1, g.cin);
        for ci0 in (0..g.cin).step_by(ci_block) {
            let mut co = 0;
            while co < g.cout {
                let cb = g.cout - co;
                let mut step = 1;
                for ci in ci0..(ci0 + ci_block).min(g.cin) {
                    for ky in 0..g.kh {
                        let x = xp.add(ci * g.s + g.row_offset(ky));
                        // dw[ci][ky·kw + kx][co][lane]
                        let d = (dw.add((ci * g.kh + ky) * g.kw * g.cout * lanes), lanes);
                        step = match (g.stride, cb, g.kw) {
                            (1, GB.., 3) => grad_row::<GB, 3, 1>(g, n, x, dy, d, co),
                            (1, 4.., 3) => grad_row::<4, 3, 1>(g, n, x, dy, d, co),
                            (1, _, 3) => grad_row::<1, 3, 1>(g, n, x, dy, d, co),
                            (1, 12.., 2) => grad_row::<12, 2, 1>(g, n, x, dy, d, co),
                            (1, GB.., 2) => grad_row::<GB, 2, 1>(g, n, x, dy, d, co),
                            (1, 4.., 2) => grad_row::<4, 2, 1>(g, n, x, dy, d, co),
                            (1, _, 2) => grad_row::<1, 2, 1>(g, n, x, dy, d, co),
                            (1, 4.., 1) => grad_row::<4, 1, 1>(g, n, x, dy, d, co),
                            (2, GB.., 3) => grad_row::<GB, 3, 2>(g, n, x, dy, d, co),
                            (2, 4.., 3) => grad_row::<4, 3, 2>(g, n, x, dy, d, co),
                            (2, 4.., 2) => grad_row::<4, 2, 2>(g, n, x, dy, d, co),
                            (2, GB.., 1) => grad_row::<GB, 1, 2>(g, n, x, dy, d, co),
                            (2, 4.., 1) => grad_row::<4, 1, 2>(g, n, x, dy, d, co),
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
/// `co .. co + C`, summed over all `l` positions, for stride `S` (`x`
/// points at the row's planes: [`Wide::col_offset`] from there). Returns `C`.
///
/// # Safety
///
/// AVX-512F must be present, and `x`, `dy` and the `C·K` weights from `dw` must lie inside the buffers their caller checked.
#[inline]
#[target_feature(enable = "avx512f")]
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
        // (With `S` a constant, stride 1's offsets are the constants `kx`.)
        let col = |kx: usize| if S == 1 { kx } else { g.col_offset(kx) };
        let mut acc = [[_mm512_setzero_ps(); K]; C];
        for i in 0..images {
            let x = x.add(i * xs);
            let dy = dy.add(i * ds);
            let mut q = 0;
            while q < g.l {
                let mut xv = [_mm512_setzero_ps(); K];
                for (kx, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(x.add(q + col(kx)));
                }
                for (c, row) in acc.iter_mut().enumerate() {
                    let dv = _mm512_loadu_ps(dy.add((co + c) * dc + q));
                    for (a, v) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(dv, *v, *a);
                    }
                }
                q += 16;
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

/// # Safety
///
/// AVX-512F must be present, and the slices must be as long as `g` says (the safe `super::weight_grad_gemm` checks them).
#[target_feature(enable = "avx512f")]
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
            let nv = if g.cout - co > 16 { 2 } else { 1 };
            let mut ci = 0;
            while ci < g.cin {
                let left = g.cin - ci;
                let a = (g, n, xp, t, np, dw, ci, co);
                ci += match (g.stride, g.kh, nv, left) {
                    // 1×1: Winograd's products.
                    (1, 1, 2, 12..) => gemm_block::<1, 1, 12, 12, 2, 1>(a),
                    (1, 1, 2, 4..) => gemm_block::<1, 1, 4, 4, 2, 1>(a),
                    (1, 1, 2, _) => gemm_block::<1, 1, 1, 1, 2, 1>(a),
                    (1, 1, 1, 24..) => gemm_block::<1, 1, 24, 24, 1, 1>(a),
                    (1, 1, 1, 16..) => gemm_block::<1, 1, 16, 16, 1, 1>(a),
                    (1, 1, 1, 4..) => gemm_block::<1, 1, 4, 4, 1, 1>(a),
                    (1, 1, 1, _) => gemm_block::<1, 1, 1, 1, 1, 1>(a),
                    (1, 3, 2, _) => gemm_block::<3, 3, 1, 9, 2, 1>(a),
                    (1, 3, 1, 2..) => gemm_block::<3, 3, 2, 18, 1, 1>(a),
                    (1, 3, 1, _) => gemm_block::<3, 3, 1, 9, 1, 1>(a),
                    (1, _, 2, 3..) => gemm_block::<2, 2, 3, 12, 2, 1>(a),
                    (1, _, 2, _) => gemm_block::<2, 2, 1, 4, 2, 1>(a),
                    (1, _, _, 6..) => gemm_block::<2, 2, 6, 24, 1, 1>(a),
                    (1, _, _, _) => gemm_block::<2, 2, 1, 4, 1, 1>(a),
                    (_, 3, 2, _) => gemm_block::<3, 3, 1, 9, 2, 2>(a),
                    (_, 3, 1, _) => gemm_block::<3, 3, 1, 9, 1, 2>(a),
                    (_, _, 2, _) => gemm_block::<2, 2, 1, 4, 2, 2>(a),
                    (_, _, _, _) => gemm_block::<2, 2, 1, 4, 1, 2>(a),
                };
            }
            co += 16 * nv;
        }
    }
}

/// Input channels `ci .. ci + CI` (`M = CI·KH·KW` rows of taps) against
/// output channels `co .. co + 16·NV`, for stride `S`; returns `CI`.
///
/// # Safety
///
/// AVX-512F must be present, and the rows and channels of the block must lie inside the buffers their caller checked.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::type_complexity)]
unsafe fn gemm_block<
    const KH: usize,
    const KW: usize,
    const CI: usize,
    const M: usize,
    const NV: usize,
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
        // (With `S` a constant, stride 1's offsets are `ky·wp` and the constants `kx`.)
        let row_off = |ky: usize| if S == 1 { ky * g.wp } else { g.row_offset(ky) };
        let col_off = |kx: usize| if S == 1 { kx } else { g.col_offset(kx) };
        let mut acc = [[_mm512_setzero_ps(); NV]; M];
        for i in 0..images {
            let x = xp.add(i * xs + ci * g.s);
            let ti = t.add(i * ts + co);
            for q in 0..g.l {
                let mut dv = [_mm512_setzero_ps(); NV];
                for (v, d) in dv.iter_mut().enumerate() {
                    *d = _mm512_loadu_ps(ti.add(q * np + 16 * v));
                }
                for c in 0..CI {
                    for ky in 0..KH {
                        let row = x.add(c * g.s + row_off(ky) + q);
                        for kx in 0..KW {
                            let sv = _mm512_set1_ps(*row.add(col_off(kx)));
                            for (a, d) in acc[(c * KH + ky) * KW + kx].iter_mut().zip(&dv) {
                                *a = _mm512_fmadd_ps(sv, *d, *a);
                            }
                        }
                    }
                }
            }
        }
        let taps = KH * KW;
        for (r, row) in acc.iter().enumerate() {
            let (c, tap) = (r / taps, r % taps);
            let d = dw.add(((ci + c) * taps + tap) * g.cout + co);
            for (v, a) in row.iter().enumerate() {
                let valid = g.cout.saturating_sub(co + 16 * v).min(16);
                let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
                let p = d.add(16 * v);
                let old = _mm512_maskz_loadu_ps(mask, p);
                _mm512_mask_storeu_ps(p, mask, _mm512_add_ps(old, *a));
            }
        }
        CI
    }
}

/// Adds a register of partial sums to one weight: lane by lane when
/// `lanes` is 16, reduced when 1.
///
/// # Safety
///
/// AVX-512F must be present, and `p .. p + lanes` must be valid for writes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn flush(p: *mut f32, lanes: usize, a: __m512) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        if lanes == 16 {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), a));
        } else {
            *p += _mm512_reduce_add_ps(a);
        }
    }
}

/// [`grad_row`] for any kernel width, one output channel at a time.
///
/// # Safety
///
/// AVX-512F must be present, and `x`, `dy` and the weights from `dw` must lie inside the buffers their caller checked.
#[target_feature(enable = "avx512f")]
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
            let mut acc = _mm512_setzero_ps();
            for i in 0..images {
                let x = x.add(i * xs);
                let dyc = dy.add(i * ds + co * dc);
                let mut q = 0;
                while q < g.l {
                    acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(dyc.add(q)),
                        _mm512_loadu_ps(x.add(q + g.col_offset(kx))),
                        acc,
                    );
                    q += 16;
                }
            }
            flush(d.add((kx * g.cout + co) * lanes), lanes, acc);
        }
        1
    }
}
