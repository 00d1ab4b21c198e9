//! Register-blocked direct convolution over "wide" rows, in AVX-512.
//!
//! The direct path of [`super::conv`] lays each zero-padded input plane out
//! row after row at the padded width `wp`, and computes each output channel
//! as a "wide" plane of `l` positions `q = oy·wp + ox` (the columns past `ow`
//! wrap around and are thrown away). Kernel tap `(ky, kx)` then reads input
//! position `q + ky·wp + kx`: every tap is a contiguous, shifted run of the
//! plane, so the convolution needs no im2col copies.
//!
//! A stride-2 convolution reads its input from four *phase planes* per
//! channel instead (even rows and even columns, even rows and odd columns,
//! …, `sp` values apart, each `wp` wide): tap `(ky, kx)` of output position
//! `q = oy·wp + ox` reads phase `(ky mod 2, kx mod 2)` at `q + ⌊ky/2⌋·wp +
//! ⌊kx/2⌋`, again a contiguous run ([`Wide::offset`]).
//!
//! These kernels keep a block of outputs in registers over the whole
//! reduction (all input channels and taps), where a gemm per tap would load
//! and store its output once per tap with only `cin` products in between.
//! [`available`] says whether the CPU runs them; without AVX-512 the
//! convolution uses the gemm crate instead.

/// Output channels per block of a packed kernel.
const BLOCK: usize = 8;

/// Length of a kernel packed for [`forward`]: output channels rounded up to
/// whole blocks.
pub(crate) fn packed_len(cin: usize, taps: usize, cout: usize) -> usize {
    cout.next_multiple_of(BLOCK) * cin * taps
}

/// Where weight `(ci, tap, co)` goes in a packed kernel:
/// `[cout / 8][cin][kh·kw][8]`, so that a block of output channels reads its
/// weights in one contiguous run (wide layers' kernels are megabytes: strided
/// over all of it, each weight would be a cache miss).
pub(crate) fn packed_index(cin: usize, taps: usize, (ci, tap, co): (usize, usize, usize)) -> usize {
    (((co / BLOCK) * cin + ci) * taps + tap) * BLOCK + co % BLOCK
}

/// Whether these kernels run here: the CPU has AVX-512F and
/// `GRADCAST_KERNEL_PATH` does not turn them off (see [`crate::path`]).
pub(crate) fn available() -> bool {
    crate::path::avx512()
}

/// Shapes shared by both kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Wide {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Distance between two padded input planes.
    pub s: usize,
    /// Padded row width.
    pub wp: usize,
    /// Kernel size.
    pub kh: usize,
    pub kw: usize,
    /// Wide output positions per channel (a multiple of 16).
    pub l: usize,
    /// 1, or 2 for an input laid out in phase planes.
    pub stride: usize,
    /// Distance between the phase planes of one channel (stride 2).
    pub sp: usize,
}

impl Wide {
    fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// Where tap `(ky, kx)` reads in a channel's planes, relative to the
    /// wide output position.
    #[inline(always)]
    fn offset(&self, ky: usize, kx: usize) -> usize {
        self.row_offset(ky) + self.col_offset(kx)
    }

    /// The part of [`Wide::offset`] that depends on the kernel row.
    #[inline(always)]
    fn row_offset(&self, ky: usize) -> usize {
        if self.stride == 1 {
            ky * self.wp
        } else {
            (ky % 2) * 2 * self.sp + (ky / 2) * self.wp
        }
    }

    /// The part of [`Wide::offset`] that depends on the kernel column.
    #[inline(always)]
    fn col_offset(&self, kx: usize) -> usize {
        if self.stride == 1 {
            kx
        } else {
            (kx % 2) * self.sp + kx / 2
        }
    }

    /// [`Wide::offset`] of every tap, row by row.
    fn offsets(&self) -> Vec<usize> {
        (0..self.kh)
            .flat_map(|ky| (0..self.kw).map(move |kx| self.offset(ky, kx)))
            .collect()
    }

    /// Panics unless the shapes are consistent and one image's padded input
    /// (`xp` values) covers every tap of every wide position, which keeps
    /// every input pointer the kernels form in bounds.
    fn check(&self, xp: usize) {
        assert!(
            self.l.is_multiple_of(16),
            "wide length must be whole vectors"
        );
        assert!(self.stride == 1 || self.stride == 2, "stride 1 or 2");
        let reach = (0..self.kh)
            .flat_map(|ky| (0..self.kw).map(move |kx| self.offset(ky, kx)))
            .max()
            .unwrap_or(0);
        assert!(self.s >= reach + self.l, "planes too short for the taps");
        assert!(xp >= self.cin * self.s, "padded input too short");
    }
}

/// `out[co][q] = Σ_ci Σ_tap w[ci][tap][co] · xp[ci·s + offset(ky, kx) + q]` for
/// every output channel `co` and wide position `q < l`.
///
/// `w` is the kernel packed by [`packed_index`]. Call only when [`available`].
pub(crate) fn forward(g: &Wide, xp: &[f32], w: &[f32], out: &mut [f32]) {
    g.check(xp.len());
    assert!(
        w.len() >= packed_len(g.cin, g.taps(), g.cout),
        "kernel too short"
    );
    assert!(out.len() >= g.cout * g.l, "output too short");
    assert!(available(), "direct::forward needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted) and `check` bounds every access.
    unsafe {
        avx512::forward(g, xp, w, out)
    }
}

/// `dw[ci][tap][co] += Σ_q dy[co][q] · xp[ci·s + offset(ky, kx) + q]`: the
/// weight gradient of [`forward`], with `dy` in wide rows whose wrapped
/// columns are zero.
///
/// `dw` holds `lanes` partial sums per weight (`[cin][kh·kw][cout][lanes]`):
/// with 16, one per vector lane, the kernel adds its registers to memory
/// without reducing them ([`lane_sums`] does that once at the end), cheaper
/// on large maps where `dw` stays in cache; with 1 it reduces each register
/// (small maps, where the 16-fold `dw` of wide layers would not fit in L2).
/// `xp` and `dy` hold `images` images, the padded inputs `xs` values apart
/// and the wide gradients `ds` apart, their channels `dc` apart: their sums
/// add up. Call only when [`available`].
pub(crate) fn weight_grad(
    g: &Wide,
    (images, xs, ds, dc): (usize, usize, usize, usize),
    xp: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    lanes: usize,
) {
    assert!(lanes == 1 || lanes == 16, "1 or 16 partial sums per weight");
    assert!(images > 0 && g.cout > 0 && xs >= g.cin * g.s && dc >= g.l && ds >= g.cout * dc);
    let (xp, dy) = (&xp[(images - 1) * xs..], &dy[(images - 1) * ds..]);
    assert!(dy.len() >= (g.cout - 1) * dc + g.l, "gradient too short");
    assert!(
        dw.len() >= lanes * g.cin * g.taps() * g.cout,
        "weight gradient too short"
    );
    g.check(xp.len());
    assert!(available(), "direct::weight_grad needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `forward`, for each of the `images` (asserted above).
    unsafe {
        let (xp, dy) = (
            xp.as_ptr().sub((images - 1) * xs),
            dy.as_ptr().sub((images - 1) * ds),
        );
        avx512::weight_grad(g, (images, xs, ds, dc), xp, dy, dw, lanes)
    }
}

/// Whether [`weight_grad_gemm`] handles a `kh×kw` kernel.
pub(crate) fn gemm_grad_supported(kh: usize, kw: usize) -> bool {
    matches!((kh, kw), (3, 3) | (2, 2))
}

/// Columns of a transposed gradient (output channels rounded up to whole vectors).
pub(crate) fn transposed_width(cout: usize) -> usize {
    cout.next_multiple_of(16)
}

/// `t[q][co] = dy[co·dc + q]` for the `l` wide positions: the wide gradient
/// transposed for [`weight_grad_gemm`] (`t` is `l × transposed_width(cout)`,
/// its padding columns left as they are: zero).
pub(crate) fn transpose_gradient(g: &Wide, dy: &[f32], dc: usize, t: &mut [f32]) {
    let np = transposed_width(g.cout);
    assert!(t.len() >= g.l * np && dy.len() >= (g.cout - 1) * dc + g.l);
    const B: usize = 16;
    for q0 in (0..g.l).step_by(B) {
        for co in 0..g.cout {
            let row = &dy[co * dc + q0..][..B.min(g.l - q0)];
            for (j, &v) in row.iter().enumerate() {
                t[(q0 + j) * np + co] = v;
            }
        }
    }
}

/// `dw[ci][tap][co] += Σ_q dy[co][q] · xp[ci·s + offset(ky, kx) + q]` as a
/// gemm: output channels along the vector lanes (from the transposed
/// gradient `t`, see [`transpose_gradient`]), one broadcast input value
/// per kernel tap, and the positions as the reduction, so that nothing is
/// reduced across lanes and the sums stay in registers over all the
/// positions of all `images` (inputs `xs` apart, gradients `ts` apart).
/// `dw` is plain `[cin][kh·kw][cout]`. Only for [`gemm_grad_supported`]
/// kernels; call only when [`available`].
pub(crate) fn weight_grad_gemm(
    g: &Wide,
    (images, xs, ts): (usize, usize, usize),
    xp: &[f32],
    t: &[f32],
    dw: &mut [f32],
) {
    assert!(gemm_grad_supported(g.kh, g.kw) && images > 0);
    let np = transposed_width(g.cout);
    assert!(xs >= g.cin * g.s && ts >= g.l * np);
    assert!(xp.len() >= (images - 1) * xs + g.cin * g.s);
    assert!(t.len() >= (images - 1) * ts + g.l * np);
    assert!(dw.len() >= g.cin * g.taps() * g.cout);
    g.check(g.cin * g.s);
    assert!(available(), "direct::weight_grad_gemm needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present and the asserts bound every access: each
    // image's planes and transposed gradient, and `dw` (tails masked).
    unsafe {
        avx512::weight_grad_gemm(g, (images, xs, ts), xp.as_ptr(), t.as_ptr(), dw)
    }
}

/// `dw[i] = Σ lanes[16·i .. 16·i + 16]`: the gradient from [`weight_grad`]'s partial sums.
pub(crate) fn lane_sums(lanes: &[f32], dw: &mut [f32]) {
    for (d, l) in dw.iter_mut().zip(lanes.chunks_exact(16)) {
        *d = l.iter().sum();
    }
}

/// `even[i] = src[2i]` and `odd[i] = src[2i + 1]`: a row split into its
/// even and odd columns (phase planes).
#[inline]
pub(crate) fn split_row(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let (even, odd) = (
        &mut even[..src.len().div_ceil(2)],
        &mut odd[..src.len() / 2],
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present; `even` and `odd` hold the halves of `src`.
        unsafe { avx512::split_row(src, even, odd) };
        return;
    }
    for (i, pair) in src.chunks(2).enumerate() {
        even[i] = pair[0];
        if let Some(&v) = pair.get(1) {
            odd[i] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
            let idx_even =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let idx_odd =
                _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
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
                let b =
                    _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), s.wrapping_add(i + 16));
                let at = i / 2;
                let (ne, no) = (left.div_ceil(2).min(16), (left / 2).min(16));
                _mm512_mask_storeu_ps(e.add(at), lanes(ne), _mm512_permutex2var_ps(a, idx_even, b));
                _mm512_mask_storeu_ps(o.add(at), lanes(no), _mm512_permutex2var_ps(a, idx_odd, b));
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
}
