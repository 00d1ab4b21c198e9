//! Register-blocked direct convolution over "wide" rows, in AVX-512
//! ([`avx512`]) or AVX2 ([`avx2`]).
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
//! [`available`] says whether they run here, and [`isa`] in which vectors:
//! AVX-512 where the CPU has it, else AVX2 with FMA (`GRADCAST_KERNEL_PATH=avx2`
//! forces those on any CPU that has them); with neither, the convolution
//! uses the gemm crate instead. For a given vector width the results are
//! fixed to the bit; the two widths sum in different orders.

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

pub(crate) use crate::path::Isa;

/// The vectors these kernels use here, if they run at all (see
/// [`crate::path`]).
pub(crate) fn isa() -> Option<Isa> {
    crate::path::direct_isa()
}

/// The vectors for the kernels of shape `g`: this process's ([`isa`]), or
/// with `GRADCAST_KERNEL_PATH=measure` the faster of AVX-512 and AVX2 for
/// this shape, timed on its forward at its first use and kept for the
/// process (or read from the plan file: see [`choices`]).
fn isa_for(g: &Wide) -> Option<Isa> {
    if !crate::path::measuring() {
        return isa();
    }
    Some(choices::choose("isa", g, || time_isas(g)))
}

/// Times the forward of shape `g` in both widths on zeros (three runs each,
/// the best kept); returns the faster and the timings for the log.
#[cfg(target_arch = "x86_64")]
fn time_isas(g: &Wide) -> (Isa, String) {
    let xp = vec![0f32; g.cin * g.s];
    let w = vec![0f32; packed_len(g.cin, g.taps(), g.cout)];
    let mut out = vec![0f32; g.cout * g.l];
    g.check(xp.len());
    let mut best = |isa: Isa| {
        choices::best_of_three(|| {
            // SAFETY: `measuring` checked that the CPU has both widths, and
            // `check` bounds every access of the buffers made above.
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::forward(g, &xp, &w, &mut out),
                    Isa::Avx2 => avx2::forward(g, &xp, &w, &mut out),
                }
            }
        })
    };
    let (wide, narrow) = (best(Isa::Avx512), best(Isa::Avx2));
    let isa = if narrow < wide {
        Isa::Avx2
    } else {
        Isa::Avx512
    };
    (isa, format!("avx512 {wide:?}, avx2 {narrow:?}"))
}

#[cfg(not(target_arch = "x86_64"))]
fn time_isas(_: &Wide) -> (Isa, String) {
    unreachable!("measuring needs x86-64")
}

/// Whether these kernels run here: the CPU has AVX-512F, or AVX2 and FMA,
/// and `GRADCAST_KERNEL_PATH` does not turn them off.
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// Shapes shared by both kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// Valid output rows (0 where no caller needs them: then the Winograd
    /// path does not apply).
    pub oh: usize,
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
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa_for` only names vectors the CPU has, and `check` bounds every
    // access.
    unsafe {
        match isa_for(g) {
            Some(Isa::Avx512) => return avx512::forward(g, xp, w, out),
            Some(Isa::Avx2) => return avx2::forward(g, xp, w, out),
            None => {}
        }
    }
    panic!("direct::forward needs AVX-512F or AVX2")
}

/// The kernel [`forward_with`] needs besides the packed one: Winograd's
/// transform of it where that path applies to shape `g`
/// ([`winograd::applies`]) and, with `GRADCAST_KERNEL_PATH=measure`, timed
/// faster than the direct kernel on that shape ([`winograd::chosen`]),
/// made once per convolution.
pub(crate) fn winograd_kernel(g: &Wide, w: &[f32]) -> Option<Vec<f32>> {
    (winograd::applies(g) && winograd::chosen(g)).then(|| winograd::kernel(g, w))
}

/// [`forward`], or with `u` from [`winograd_kernel`] its Winograd form,
/// which writes only the valid output positions (the others are dropped
/// by every caller).
pub(crate) fn forward_with(g: &Wide, xp: &[f32], w: &[f32], u: Option<&[f32]>, out: &mut [f32]) {
    match u {
        Some(u) => winograd::forward(g, xp, u, out),
        None => forward(g, xp, w, out),
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
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `forward`, for each of the `images` (asserted above).
    unsafe {
        let (xp, dy) = (
            xp.as_ptr().sub((images - 1) * xs),
            dy.as_ptr().sub((images - 1) * ds),
        );
        let n = (images, xs, ds, dc);
        match isa_for(g) {
            Some(Isa::Avx512) => return avx512::weight_grad(g, n, xp, dy, dw, lanes),
            Some(Isa::Avx2) => return avx2::weight_grad(g, n, xp, dy, dw, lanes),
            None => {}
        }
    }
    panic!("direct::weight_grad needs AVX-512F or AVX2")
}

/// Whether [`weight_grad_gemm`] handles shape `g`: 3×3 and 2×2 kernels at
/// either stride, and 1×1 kernels at stride 1 (Winograd's products).
pub(crate) fn gemm_grad_handles(g: &Wide) -> bool {
    matches!((g.kh, g.kw), (3, 3) | (2, 2)) || (g.kh, g.kw, g.stride) == (1, 1, 1)
}

/// Whether the weight gradient of shape `g` takes [`weight_grad_gemm`]
/// rather than [`weight_grad`]: where it handles the kernel, with more than
/// one vector of output channels, in AVX-512; with
/// `GRADCAST_KERNEL_PATH=measure` where it was the faster of the two on
/// that shape, timed at its first use ([`time_weight_grads`], kept for the
/// process or in the plan file, see [`choices`]). With a single vector of
/// output channels the gemm form is bound by its broadcasts (resnet20
/// trained at 893 img/s with the row kernel for its 16-channel layers
/// against 842 with the gemm, Zen 5); in AVX2 the transposed gradient it
/// needs costs more than it saves (on an AMD EPYC of family 23, resnet20's
/// 64-channel 8×8 layers: 24.6 ms of gemm + 3.9 of transpose against 21.0
/// of row kernel, and training 224 → 234 img/s).
pub(crate) fn gemm_grad_pays(g: &Wide) -> bool {
    // (A layer's own 1×1 convolutions keep the row kernel: the gemm's 1×1
    // blocks were made and measured for Winograd's products.)
    if !(gemm_grad_handles(g) && g.kh > 1 && g.cout > 16) {
        return false;
    }
    if !crate::path::measuring_shapes() {
        return isa() == Some(Isa::Avx512);
    }
    choices::choose("gemm-grad", g, || time_weight_grads(g))
}

/// Times the weight gradient of shape `g` both ways on zeros, over a group
/// of images as the backward runs it ([`GradTiming`]): the gradients
/// transposed and [`weight_grad_gemm`], and [`weight_grad`] with as many
/// partial sums as the backward gives it. Returns whether the gemm was
/// faster, and the timings for the log.
fn time_weight_grads(g: &Wide) -> (bool, String) {
    let mut timing = GradTiming::new(g);
    let (gemm, rows) = (timing.gemm(), timing.rows());
    (
        gemm < rows,
        format!(
            "{} images: gemm {gemm:?} (transposes included), rows {rows:?}",
            timing.images
        ),
    )
}

/// Zeros laid out as the backward hands a group of images of shape `g` to
/// the weight-gradient kernels (~1,024 wide positions, [`weight_grad_group`]),
/// for `measure`'s timings of their forms (best of three each).
struct GradTiming<'a> {
    g: &'a Wide,
    images: usize,
    /// Padded inputs, wide gradients and transposed gradients: `images`
    /// of each, `xs`, `ds` and `ts` apart.
    xs: usize,
    ds: usize,
    ts: usize,
    xp: Vec<f32>,
    dy: Vec<f32>,
    t: Vec<f32>,
    /// Room for any form's weight gradient (16 partial sums per weight).
    dw: Vec<f32>,
}

impl<'a> GradTiming<'a> {
    fn new(g: &'a Wide) -> Self {
        let images = weight_grad_group(g.l);
        let (xs, ds, ts) = (g.cin * g.s, g.cout * g.l, g.l * transposed_width(g.cout));
        GradTiming {
            g,
            images,
            xs,
            ds,
            ts,
            xp: vec![0f32; images * xs],
            dy: vec![0f32; images * ds],
            t: vec![0f32; images * ts],
            dw: vec![0f32; 16 * g.cin * g.taps() * g.cout],
        }
    }

    /// The gradients transposed for the gemm-shaped forms.
    fn transpose(&mut self) {
        for (dy, t) in self
            .dy
            .chunks_exact(self.ds)
            .zip(self.t.chunks_exact_mut(self.ts))
        {
            transpose_gradient(self.g, dy, self.g.l, t);
        }
    }

    /// [`weight_grad_gemm`], the transposes included.
    fn gemm(&mut self) -> std::time::Duration {
        choices::best_of_three(|| {
            self.transpose();
            let n = (self.images, self.xs, self.ts);
            weight_grad_gemm(self.g, n, &self.xp, &self.t, &mut self.dw);
        })
    }

    /// [`weight_grad`] with the backward's partial sums.
    fn rows(&mut self) -> std::time::Duration {
        let lanes = weight_grad_lanes(self.g.l);
        choices::best_of_three(|| {
            let n = (self.images, self.xs, self.ds, self.g.l);
            weight_grad(self.g, n, &self.xp, &self.dy, &mut self.dw, lanes);
        })
    }

    /// The form the backward takes without Winograd ([`gemm_grad_pays`]).
    fn direct(&mut self) -> std::time::Duration {
        if gemm_grad_pays(self.g) {
            self.gemm()
        } else {
            self.rows()
        }
    }
}

/// Images per call of the weight-gradient kernels, for wide planes of `l`
/// positions: ~1,024 positions, one flush of the sums per group (8×8 maps
/// have only 80 wide positions per image).
pub(crate) fn weight_grad_group(l: usize) -> usize {
    (1024 / l).max(1)
}

/// Partial sums per weight for [`weight_grad`] on wide planes of `l`
/// positions: 16 on large maps, where the 16-fold `dw` stays in cache, else
/// 1 (see [`weight_grad`]).
pub(crate) fn weight_grad_lanes(l: usize) -> usize {
    if l >= 512 {
        16
    } else {
        1
    }
}

/// Columns of a transposed gradient (output channels rounded up to whole vectors).
pub(crate) fn transposed_width(cout: usize) -> usize {
    cout.next_multiple_of(16)
}

/// `t[q][co] = dy[co·dc + q]` for the `l` wide positions: the wide gradient
/// transposed for [`weight_grad_gemm`] (`t` is `l × transposed_width(cout)`,
/// its padding columns zero: left as they are, or written as zero). In
/// the registers of the direct kernels' vectors ([`isa`]: 16 × 16 blocks
/// in AVX-512, 8 × 8 in AVX2), else value by value; the same values every
/// way.
pub(crate) fn transpose_gradient(g: &Wide, dy: &[f32], dc: usize, t: &mut [f32]) {
    let np = transposed_width(g.cout);
    assert!(t.len() >= g.l * np && dy.len() >= (g.cout - 1) * dc + g.l);
    assert!(g.l.is_multiple_of(16), "wide length must be whole vectors");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` only names vectors the CPU has, and the asserts above
    // are the kernels' bounds (`np` is a multiple of 16, so of 8, at least
    // `cout`).
    unsafe {
        let shape = (g.l, g.cout, np);
        match isa() {
            Some(Isa::Avx512) => return avx512::transpose_gradient(shape, dy, dc, t),
            Some(Isa::Avx2) => return avx2::transpose_gradient(shape, dy, dc, t),
            None => {}
        }
    }
    transpose_gradient_scalar(g, dy, dc, t);
}

/// [`transpose_gradient`] value by value.
fn transpose_gradient_scalar(g: &Wide, dy: &[f32], dc: usize, t: &mut [f32]) {
    let np = transposed_width(g.cout);
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
/// `dw` is plain `[cin][kh·kw][cout]`. Only for the shapes
/// [`gemm_grad_handles`]; call only when [`available`].
pub(crate) fn weight_grad_gemm(
    g: &Wide,
    (images, xs, ts): (usize, usize, usize),
    xp: &[f32],
    t: &[f32],
    dw: &mut [f32],
) {
    assert!(gemm_grad_handles(g) && images > 0);
    let np = transposed_width(g.cout);
    assert!(xs >= g.cin * g.s && ts >= g.l * np);
    assert!(xp.len() >= (images - 1) * xs + g.cin * g.s);
    assert!(t.len() >= (images - 1) * ts + g.l * np);
    assert!(dw.len() >= g.cin * g.taps() * g.cout);
    g.check(g.cin * g.s);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa_for` only names vectors the CPU has, and the asserts bound
    // every access: each image's planes and transposed gradient, and `dw`
    // (tails masked).
    unsafe {
        let (n, xp, t) = ((images, xs, ts), xp.as_ptr(), t.as_ptr());
        match isa_for(g) {
            Some(Isa::Avx512) => return avx512::weight_grad_gemm(g, n, xp, t, dw),
            Some(Isa::Avx2) => return avx2::weight_grad_gemm(g, n, xp, t, dw),
            None => {}
        }
    }
    panic!("direct::weight_grad_gemm needs AVX-512F or AVX2")
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
    if isa() == Some(Isa::Avx512) {
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod choices;
pub(crate) mod winograd;

#[cfg(test)]
mod tests {
    use super::*;

    /// The register transposes (each this CPU runs) give the scalar one's
    /// values, including zero padding columns, for channel counts that
    /// leave partial blocks.
    #[test]
    fn transpose_gradient_in_registers_matches_the_scalar_one() {
        for (cout, l, dc) in [
            (16, 16, 16),
            (20, 48, 50),
            (3, 32, 33),
            (64, 80, 96),
            (33, 16, 17),
        ] {
            let g = Wide {
                cin: 1,
                cout,
                s: l + 2,
                wp: l,
                kh: 1,
                kw: 1,
                l,
                stride: 1,
                sp: 0,
                oh: 0,
            };
            let dy: Vec<f32> = (0..(cout - 1) * dc + l)
                .map(|i| i as f32 * 0.25 - 7.0)
                .collect();
            let np = transposed_width(cout);
            let mut slow = vec![0f32; l * np];
            transpose_gradient_scalar(&g, &dy, dc, &mut slow);
            assert_eq!(slow[(l - 1) * np + cout - 1], dy[(cout - 1) * dc + l - 1]);
            assert_eq!(slow[np + 2], if cout > 2 { dy[2 * dc + 1] } else { 0.0 });
            #[cfg(target_arch = "x86_64")]
            {
                let shape = (l, cout, np);
                let mut fast = vec![0f32; l * np];
                if crate::path::cpu_has_avx512() {
                    // SAFETY: AVX-512F is present; the shapes are the kernel's.
                    unsafe { avx512::transpose_gradient(shape, &dy, dc, &mut fast) };
                    assert_eq!(fast, slow, "AVX-512: cout {cout} l {l} dc {dc}");
                }
                if crate::path::cpu_has_avx2() {
                    fast.fill(0.0);
                    // SAFETY: AVX2 is present; the shapes are the kernel's.
                    unsafe { avx2::transpose_gradient(shape, &dy, dc, &mut fast) };
                    assert_eq!(fast, slow, "AVX2: cout {cout} l {l} dc {dc}");
                }
            }
        }
    }
}
