//! 2-D convolution (NCHW, kernel `(out, in, kh, kw)`, explicit asymmetric
//! zero padding), forward and backward: by the direct kernels of
//! [`super::direct`] on AVX-512 CPUs for stride-1 and stride-2 kernels over
//! 3+ input channels (stride 2 through phase planes, its input gradient in
//! [`phases`]), by nine (kh·kw) shifted gemms for the stride-1 shapes
//! elsewhere, and by im2col + gemm for the rest.

mod phases;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, direct, gemm, parallelism, threads, with_values, Mat};

/// Fewest input channels for the direct path (below, im2col + one gemm):
/// with AVX-512 the images' three (measured: resnet20's 3-channel 3×3 stem
/// trains in 4.7 ms per step on one thread against 7.0 with im2col), for the gemm
/// fallback eight.
const DIRECT_MIN_CHANNELS: usize = 8;
const DIRECT_MIN_CHANNELS_AVX: usize = 3;
/// Most input and output channels for the direct path (measured on
/// resnet20's 16- and 32-channel layers; wider ones, where im2col's copies
/// are a smaller share of the gemm, keep im2col: unmeasured on a loaded machine).
const DIRECT_MAX_CHANNELS: usize = 32;

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) n: usize,
    cin: usize,
    h: usize,
    w: usize,
    pub(super) cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    top: usize,
    left: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl Geom {
    pub(super) fn new(x: &[usize], k: &[usize], stride: usize, pad: [usize; 4]) -> Result<Self> {
        let (&[n, cin, h, w], &[cout, kcin, kh, kw]) = (x, k) else {
            bail!("conv2d expects 4-D input and kernel, got {x:?} and {k:?}")
        };
        if kcin != cin {
            bail!("conv2d: input has {cin} channels, kernel expects {kcin}");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            bail!("conv2d: stride and kernel sizes must be positive");
        }
        let [top, bottom, left, right] = pad;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if ph < kh || pw < kw {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {ph}x{pw}");
        }
        let (oh, ow) = ((ph - kh) / stride + 1, (pw - kw) / stride + 1);
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            top,
            left,
            oh,
            ow,
        })
    }

    /// Rows of the column matrix: `cin · kh · kw`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output positions per image.
    pub(super) fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Values per input image.
    fn image(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// Whether the column matrix of an image is the image itself (1×1, stride 1, no padding).
    fn identity(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.oh == self.h && self.ow == self.w
    }

    /// Whether the direct (im2col-free) path applies: stride 1, a kernel
    /// wider than 1×1, paddings under the kernel size (so that the input
    /// gradient is again such a convolution) and enough input channels. With
    /// AVX-512 that is all; the gemm-per-tap fallback also needs few enough
    /// channels for the copies to matter and maps wide enough.
    fn direct(&self) -> bool {
        if !crate::path::direct_allowed() {
            return false;
        }
        let avx = direct::available();
        if self.stride == 2 {
            return avx && self.strided_direct();
        }
        let bottom = (self.oh + self.kh - 1).checked_sub(self.h + self.top);
        let right = (self.ow + self.kw - 1).checked_sub(self.w + self.left);
        self.stride == 1
            && !self.identity()
            && (self.kh > 1 || self.kw > 1)
            && self.cin
                >= if avx {
                    DIRECT_MIN_CHANNELS_AVX
                } else {
                    DIRECT_MIN_CHANNELS
                }
            && (avx || (self.cin <= DIRECT_MAX_CHANNELS && self.cout <= DIRECT_MAX_CHANNELS))
            && self.top < self.kh
            && self.left < self.kw
            && bottom.is_some_and(|b| b < self.kh)
            && right.is_some_and(|r| r < self.kw)
            && (avx || 8 * self.wide_len() <= 9 * self.p())
    }

    /// Whether a stride-2 convolution fits the direct path's phase planes
    /// (see [`Plan`]): enough input channels, and every input position
    /// inside the planes, which are as tall and wide as the output plus
    /// half the kernel. (1×1 kernels too: ResNet's projection shortcuts.)
    fn strided_direct(&self) -> bool {
        let (mh, mw) = ((self.kh - 1) / 2, (self.kw - 1) / 2);
        self.stride == 2
            && self.cin >= DIRECT_MIN_CHANNELS_AVX
            && (self.h + self.top - 1) / 2 < self.oh + mh
            && (self.w + self.left - 1) / 2 < self.ow + mw
    }

    /// Output length per channel of the direct path (see [`Plan`]): rows of
    /// the padded width, rounded up to whole vectors. On small maps the
    /// wrapped-around columns outweigh the copies it saves (8×8: 25 % extra).
    fn wide_len(&self) -> usize {
        ((self.oh - 1) * (self.ow + self.kw - 1) + self.ow).next_multiple_of(16)
    }

    /// Output columns `[lo, hi)` whose input column `ox·s + kx − left` lies inside the image.
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.left.saturating_sub(kx).div_ceil(s).min(self.ow);
        let hi = (self.w + self.left)
            .saturating_sub(kx)
            .div_ceil(s)
            .clamp(lo, self.ow);
        (lo, hi)
    }

    /// Input row of output row `oy` for kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.top)
            .filter(|&iy| iy < self.h)
    }
}

/// Column matrix `[cin·kh·kw, oh·ow]` of one image.
fn im2col(x: &[f32], g: &Geom, cols: &mut [f32]) {
    if g.stride == 1 && g.ow == g.w {
        return im2col_rows(x, g, cols);
    }
    let (p, s) = (g.p(), g.stride);
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..][..g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut cols[((ci * g.kh + ky) * g.kw + kx) * p..][..p];
                let (lo, hi) = g.valid_cols(kx);
                for oy in 0..g.oh {
                    let out = &mut row[oy * g.ow..][..g.ow];
                    let Some(iy) = g.input_row(oy, ky) else {
                        out.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * g.w..][..g.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if lo < hi {
                        let start = lo * s + kx - g.left;
                        if s == 1 {
                            out[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (o, v) in out[lo..hi].iter_mut().zip(src[start..].iter().step_by(s))
                            {
                                *o = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] at stride 1 with output rows as wide as input rows: each row
/// of the column matrix is then the input plane shifted by one offset, copied
/// in one piece, with the few positions that fall in the padding zeroed after.
fn im2col_rows(x: &[f32], g: &Geom, cols: &mut [f32]) {
    let (p, w, hw) = (g.p(), g.w, g.h * g.w);
    for ci in 0..g.cin {
        let plane = &x[ci * hw..][..hw];
        for ky in 0..g.kh {
            // Output rows whose input row `oy + ky − top` lies inside the image.
            let oy0 = g.top.saturating_sub(ky).min(g.oh);
            let oy1 = (g.h + g.top).saturating_sub(ky).clamp(oy0, g.oh);
            for kx in 0..g.kw {
                let row = &mut cols[((ci * g.kh + ky) * g.kw + kx) * p..][..p];
                row[..oy0 * w].fill(0.0);
                row[oy1 * w..].fill(0.0);
                if oy0 == oy1 {
                    continue;
                }
                let dst = &mut row[oy0 * w..oy1 * w];
                let start = ((oy0 + ky - g.top) * w) as isize + kx as isize - g.left as isize;
                let end = start + dst.len() as isize;
                let (s0, s1) = (start.max(0), end.min(hw as isize));
                // (Clamped for paddings wider than the image.)
                let off = ((s0 - start) as usize).min(dst.len());
                let len = ((s1 - s0).max(0) as usize).min(dst.len() - off);
                dst[..off].fill(0.0);
                if len > 0 {
                    dst[off..off + len].copy_from_slice(&plane[s0 as usize..][..len]);
                }
                dst[off + len..].fill(0.0);
                let (lo, hi) = g.valid_cols(kx);
                if lo > 0 || hi < w {
                    for r in dst.chunks_exact_mut(w) {
                        for v in &mut r[..lo] {
                            *v = 0.0;
                        }
                        for v in &mut r[hi..] {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Adds a column matrix back onto the image it came from (adjoint of [`im2col`]).
fn col2im(cols: &[f32], g: &Geom, x: &mut [f32]) {
    let (p, s) = (g.p(), g.stride);
    for ci in 0..g.cin {
        let plane = &mut x[ci * g.h * g.w..][..g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &cols[((ci * g.kh + ky) * g.kw + kx) * p..][..p];
                let (lo, hi) = g.valid_cols(kx);
                if lo >= hi {
                    continue;
                }
                for oy in 0..g.oh {
                    let Some(iy) = g.input_row(oy, ky) else {
                        continue;
                    };
                    let src = &row[oy * g.ow..][lo..hi];
                    let dst = &mut plane[iy * g.w..][..g.w];
                    let start = lo * s + kx - g.left;
                    if s == 1 {
                        for (d, v) in dst[start..start + hi - lo].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (d, v) in dst[start..].iter_mut().step_by(s).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// One direct (im2col-free) stride-1 convolution of an image `(c, h, w)` into
/// `(cout, oh, ow)`. The input is copied once into zero-padded planes of row
/// width `wp = ow + kw − 1`; in that layout every kernel tap `(ky, kx)` reads
/// the planes shifted by `ky·wp + kx`, so the output in rows of the padded
/// width, `out (cout × l)`, is the sum over taps of `W_tap (cout × c) ·
/// xp[:, shift..shift + l]`: one gemm per tap, each operand read in place
/// (the gemm crate packs neither at these shapes). The columns past `ow` in
/// each output row are wrapped-around garbage and dropped.
///
/// With stride 2 each channel is copied into four phase planes instead (the
/// image's even and odd rows and columns, `sp` apart, of row width `wp = ow +
/// ⌊(kw − 1)/2⌋`): see [`direct`]'s module documentation.
#[derive(Debug, Clone, Copy)]
struct Plan {
    c: usize,
    h: usize,
    w: usize,
    top: usize,
    left: usize,
    kh: usize,
    kw: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    wp: usize,
    /// Output length per channel, rounded up to a multiple of 16 (the gemm
    /// crate reads an unpacked operand only in whole vectors).
    l: usize,
    /// Stride between the padded input planes (of one channel's four phase
    /// planes with stride 2).
    s: usize,
    /// 1 or 2.
    stride: usize,
    /// Stride between phase planes (stride 2).
    sp: usize,
}

impl Plan {
    fn new(
        (c, h, w): (usize, usize, usize),
        (top, left): (usize, usize),
        (kh, kw): (usize, usize),
        (cout, oh, ow): (usize, usize, usize),
        stride: usize,
    ) -> Self {
        // Stride 2: taps reach ⌊(k − 1)/2⌋ rows and columns into a phase plane.
        let (reach_h, reach_w) = if stride == 2 {
            ((kh - 1) / 2, (kw - 1) / 2)
        } else {
            (kh - 1, kw - 1)
        };
        let wp = ow + reach_w;
        // (As `Geom::wide_len`, for stride 1.)
        let l = ((oh - 1) * wp + ow).next_multiple_of(16);
        let plane = ((oh + reach_h) * wp).max(reach_h * wp + reach_w + l);
        let (s, sp) = if stride == 2 {
            (4 * plane, plane)
        } else {
            (plane, 0)
        };
        Self {
            c,
            h,
            w,
            top,
            left,
            kh,
            kw,
            cout,
            oh,
            ow,
            wp,
            l,
            s,
            stride,
            sp,
        }
    }

    /// The shapes as the AVX-512 kernels of [`direct`] see them.
    fn wide(&self) -> direct::Wide {
        direct::Wide {
            cin: self.c,
            cout: self.cout,
            s: self.s,
            wp: self.wp,
            kh: self.kh,
            kw: self.kw,
            l: self.l,
            stride: self.stride,
            sp: self.sp,
        }
    }

    /// Length of the padded input buffer (allocate zeroed: [`Plan::load`]
    /// writes only the image's own positions).
    fn xp_len(&self) -> usize {
        self.c * self.s
    }

    /// Copies image `x` into the interior of the padded planes `xp`
    /// (normalising it on the way if it is [`Input::Normalized`]).
    fn load(&self, x: Input, xp: &mut [f32]) {
        if self.stride == 2 {
            return self.load_phases(x, xp);
        }
        let hw = self.h * self.w;
        for ci in 0..self.c {
            let plane = &mut xp[ci * self.s..][..self.s];
            let rows = x.values()[ci * hw..][..hw].chunks_exact(self.w);
            for (iy, row) in rows.enumerate() {
                let dst = &mut plane[(iy + self.top) * self.wp + self.left..][..self.w];
                x.row_into(ci, ci * hw + iy * self.w, row, dst);
            }
        }
    }

    /// [`Plan::load`] into phase planes: padded row `r` and column `c` go to
    /// phase `(r mod 2, c mod 2)` at row `⌊r/2⌋`, column `⌊c/2⌋`.
    fn load_phases(&self, x: Input, xp: &mut [f32]) {
        let hw = self.h * self.w;
        let mut normalized = Vec::new();
        for ci in 0..self.c {
            let planes = &mut xp[ci * self.s..][..self.s];
            for (iy, row) in x.values()[ci * hw..][..hw].chunks_exact(self.w).enumerate() {
                let row = match x {
                    Input::Plain(_) => row,
                    Input::Normalized { .. } => {
                        normalized.resize(row.len(), 0.0);
                        x.row_into(ci, ci * hw + iy * self.w, row, &mut normalized);
                        &normalized
                    }
                };
                let r = iy + self.top;
                let at = (r % 2) * 2 * self.sp + (r / 2) * self.wp;
                // Even padded columns to phase 0, odd ones to phase 1: the
                // row's even values are the even columns when `left` is even.
                let (p0, p1) = planes[at..].split_at_mut(self.sp);
                let half = self.left / 2;
                if self.left.is_multiple_of(2) {
                    direct::split_row(row, &mut p0[half..], &mut p1[half..]);
                } else {
                    direct::split_row(row, &mut p1[half..], &mut p0[half + 1..]);
                }
            }
        }
    }

    /// Input rows `(c × l)` seen by tap `tap` (shifted planes of `xp`).
    fn shifted<'a>(&self, xp: &'a [f32], tap: usize) -> &'a [f32] {
        let (ky, kx) = (tap / self.kw, tap % self.kw);
        &xp[ky * self.wp + kx..]
    }

    /// `out (cout × l) = Σ_tap wr[tap] (cout × c) · shifted(xp, tap)`, with
    /// the kernel as `wr [kh·kw][cout][c]`.
    fn run(&self, wr: &[f32], xp: &[f32], out: &mut [f32], par: gemm::Parallelism) {
        let (c, cout) = (self.c, self.cout);
        for tap in 0..self.kh * self.kw {
            gemm(
                cout,
                self.l,
                c,
                &mut out[..cout * self.l],
                tap > 0,
                Mat {
                    data: &wr[tap * cout * c..][..cout * c],
                    rs: c,
                    cs: 1,
                },
                Mat {
                    data: self.shifted(xp, tap),
                    rs: self.s,
                    cs: 1,
                },
                par,
            );
        }
    }

    /// `y (cout, oh, ow) = act(out + bias)` over the valid part of `out (cout × l)`.
    fn store(&self, out: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        self.store_with(out, bias, (relu, None), y);
    }

    /// [`Plan::store`], with `residual` (an image like `y`) added before the
    /// ReLU when given (then the ReLU applies regardless of `relu`).
    fn store_with(
        &self,
        out: &[f32],
        bias: Option<&[f32]>,
        (relu, residual): (bool, Option<&[f32]>),
        y: &mut [f32],
    ) {
        let p = self.oh * self.ow;
        for (co, plane) in y[..self.cout * p].chunks_exact_mut(p).enumerate() {
            let src = &out[co * self.l..];
            let b = bias.map_or(0.0, |b| b[co]);
            for (oy, row) in plane.chunks_exact_mut(self.ow).enumerate() {
                let from = &src[oy * self.wp..][..self.ow];
                if let Some(r) = residual {
                    let r = &r[co * p + oy * self.ow..][..self.ow];
                    for ((v, s), r) in row.iter_mut().zip(from).zip(r) {
                        *v = (s + b + r).max(0.0);
                    }
                } else if relu {
                    for (v, s) in row.iter_mut().zip(from) {
                        *v = (s + b).max(0.0);
                    }
                } else {
                    for (v, s) in row.iter_mut().zip(from) {
                        *v = s + b;
                    }
                }
            }
        }
    }

    /// Adds the valid part of `out (cout × l)` onto `y (cout, oh, ow)`.
    fn add_to(&self, out: &[f32], y: &mut [f32]) {
        let p = self.oh * self.ow;
        for (co, plane) in y[..self.cout * p].chunks_exact_mut(p).enumerate() {
            let src = &out[co * self.l..];
            for (oy, row) in plane.chunks_exact_mut(self.ow).enumerate() {
                for (v, s) in row.iter_mut().zip(&src[oy * self.wp..][..self.ow]) {
                    *v += s;
                }
            }
        }
    }
}

/// `dst (cols×rows) = srcᵀ` for a row-major `src (rows×cols)`, in tiles.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 16;
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// The convolution as a candle op of `(x, kernel, bias)`.
struct Conv2dOp {
    stride: usize,
    pad: [usize; 4],
    /// Whether backward computes the gradient of the input (not for the image).
    input_grad: bool,
    /// A ReLU follows (fused: applied while the output is in cache).
    relu: bool,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "gradcast-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let _t = super::Prof::new("conv-fwd", &g);
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (y, _) = forward_values(&g, Input::Plain(x), w, b, self.relu, false)?;
        Ok((
            CpuStorage::F32(y),
            Shape::from_dims(&[g.n, g.cout, g.oh, g.ow]),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
        let _t = super::Prof::new("conv-bwd", &g);
        // Through the fused ReLU: the gradient passes where the output is positive.
        let masked;
        let grad = if self.relu {
            masked = super::relu::masked(res, grad)?;
            &masked
        } else {
            grad
        };
        let (dx, dw, db) = with_values(x, |xv| {
            with_values(w, |wv| {
                with_values(grad, |dy| {
                    let x = Input::Plain(xv);
                    backward_values(&g, x, wv, Dy::Slice(dy), self.input_grad, None)
                })
            })
        })?;
        gradient_tensors((x, dx), (w, dw), (db, g.cout.into()))
    }
}

/// A custom op's three gradients as tensors on `x`'s device: `dx` (if any)
/// in `x`'s shape, `dw` in `w`'s, the third in the given shape.
#[allow(clippy::type_complexity)]
pub(super) fn gradient_tensors(
    (x, dx): (&Tensor, Option<Vec<f32>>),
    (w, dw): (&Tensor, Vec<f32>),
    (third, shape): (Vec<f32>, Shape),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dev = x.device();
    let dx = match dx {
        Some(dx) => Some(Tensor::from_vec(dx, x.shape(), dev)?),
        None => None,
    };
    Ok((
        dx,
        Some(Tensor::from_vec(dw, w.shape(), dev)?),
        Some(Tensor::from_vec(third, shape, dev)?),
    ))
}

/// The gradient of a convolution's output, image by image: a slice, or
/// computed on demand (by a fused op whose own backward produces it).
pub(super) enum Dy<'a> {
    Slice(&'a [f32]),
    Make(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

impl Dy<'_> {
    /// The `len` values of image `i`, made in `scratch` if need be.
    fn image<'s>(&'s self, i: usize, len: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            Dy::Slice(dy) => &dy[i * len..][..len],
            Dy::Make(f) => {
                scratch.resize(len, 0.0);
                f(i, scratch);
                scratch
            }
        }
    }
}

/// A convolution's input: its values, or values that a BatchNorm and ReLU
/// (and a dropout mask) still have to be applied to, `max(v · scale[c] +
/// shift[c], 0) · mask` in channel `c`. The second form lets a layer consume
/// the previous layer's un-normalised output as it loads it, so that the
/// normalised tensor is never written to memory and read back.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    Plain(&'a [f32]),
    Normalized {
        v: &'a [f32],
        scale: &'a [f32],
        shift: &'a [f32],
        /// Factors of each value after the ReLU (inverted dropout), if any.
        mask: Option<&'a [f32]>,
    },
}

impl<'a> Input<'a> {
    /// All the values, before normalisation.
    pub(super) fn values(&self) -> &'a [f32] {
        match *self {
            Input::Plain(v) | Input::Normalized { v, .. } => v,
        }
    }

    /// Image `i` of `len` values.
    fn image(&self, i: usize, len: usize) -> Input<'a> {
        match *self {
            Input::Plain(v) => Input::Plain(&v[i * len..][..len]),
            Input::Normalized {
                v,
                scale,
                shift,
                mask,
            } => Input::Normalized {
                v: &v[i * len..][..len],
                scale,
                shift,
                mask: mask.map(|m| &m[i * len..][..len]),
            },
        }
    }

    /// `dst` = the input's values of channel `c` at `row` (which starts at
    /// value `at`), normalised if need be.
    #[inline]
    fn row_into(&self, c: usize, at: usize, row: &[f32], dst: &mut [f32]) {
        match *self {
            Input::Plain(_) => dst.copy_from_slice(row),
            Input::Normalized {
                scale, shift, mask, ..
            } => {
                let (s, t) = (scale[c], shift[c]);
                match mask {
                    None => {
                        for (d, &v) in dst.iter_mut().zip(row) {
                            *d = (v * s + t).max(0.0);
                        }
                    }
                    Some(m) => {
                        let m = &m[at..][..row.len()];
                        for ((d, &v), &m) in dst.iter_mut().zip(row).zip(m) {
                            *d = (v * s + t).max(0.0) * m;
                        }
                    }
                }
            }
        }
    }

    /// The (normalised) values, in `scratch` if they need making.
    fn materialize<'s>(&self, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match *self {
            Input::Plain(v) => v,
            Input::Normalized { v, scale, .. } => {
                let plane = v.len() / scale.len().max(1);
                scratch.resize(v.len(), 0.0);
                for (c, (row, dst)) in v
                    .chunks(plane.max(1))
                    .zip(scratch.chunks_mut(plane.max(1)))
                    .enumerate()
                {
                    self.row_into(c, c * plane, row, dst);
                }
                scratch
            }
        }
    }
}

/// The convolution of `x` with `w` plus the bias `b`, then a ReLU when
/// `relu`, as a `(n, cout, oh, ow)` buffer; with `moments`, also the
/// `(mean, Σ (v − mean)²)` of every image's channel (`n · cout` pairs).
#[allow(clippy::type_complexity)]
pub(super) fn forward_values(
    g: &Geom,
    x: Input,
    w: &[f32],
    b: &[f32],
    relu: bool,
    moments: bool,
) -> Result<(Vec<f32>, Vec<[f64; 2]>)> {
    forward_residual(g, x, w, b, (relu, None), moments)
}

/// [`forward_values`], with `residual` (shaped like the output) added
/// before the ReLU when given (the ReLU then applies regardless of `relu`):
/// `max(conv(x) + b + residual, 0)`, a residual block's sum in the
/// convolution's epilogue.
pub(super) fn forward_residual(
    g: &Geom,
    x: Input,
    w: &[f32],
    b: &[f32],
    (relu, residual): (bool, Option<&[f32]>),
    moments: bool,
) -> Result<(Vec<f32>, Vec<[f64; 2]>)> {
    let g = *g;
    {
        if b.len() != g.cout {
            bail!(
                "conv2d: bias has {} values for {} channels",
                b.len(),
                g.cout
            );
        }
        let (k, p, cout) = (g.k(), g.p(), g.cout);
        let direct = g.direct();
        let avx = direct && direct::available();
        // The output starts as the bias, written once, and the gemm adds onto
        // it; the AVX-512 path writes bias and activation with its result.
        let mut y = if avx {
            // SAFETY: the direct path's `store` writes every output value.
            unsafe { super::output_buffer(g.n * cout * p) }
        } else {
            let mut y = Vec::with_capacity(g.n * cout * p);
            for _ in 0..g.n {
                for &bias in b {
                    y.extend(std::iter::repeat_n(bias, p));
                }
            }
            y
        };
        if y.is_empty() {
            return Ok((y, Vec::new()));
        }
        let t = threads();
        let inner = if g.n < t {
            parallelism(t)
        } else {
            gemm::Parallelism::None
        };
        let plan = Plan::new(
            (g.cin, g.h, g.w),
            (g.top, g.left),
            (g.kh, g.kw),
            (cout, g.oh, g.ow),
            g.stride,
        );
        let xp_len = plan.xp_len();
        let taps = g.kh * g.kw;
        // The kernel for the direct path: `[kh·kw][cout][cin]` for the gemm
        // crate, packed for the AVX-512 kernel (`direct::packed_index`).
        let mut wr = vec![
            0f32;
            match (direct, avx) {
                (false, _) => 0,
                (true, false) => k * cout,
                (true, true) => direct::packed_len(g.cin, taps, cout),
            }
        ];
        if direct {
            for co in 0..cout {
                for ci in 0..g.cin {
                    for tap in 0..taps {
                        let at = if avx {
                            direct::packed_index(g.cin, taps, (ci, tap, co))
                        } else {
                            (tap * cout + co) * g.cin + ci
                        };
                        wr[at] = w[(co * g.cin + ci) * taps + tap];
                    }
                }
            }
        }
        let wr = &wr;
        let cols_len = if direct {
            xp_len + plan.l * cout
        } else if g.identity() {
            0
        } else {
            k * p
        };
        if residual.is_some_and(|r| r.len() != g.n * cout * p) {
            bail!("conv2d: a residual of the wrong size");
        }
        // The epilogue of the paths that add into `y`.
        let finish = |i: usize, yi: &mut [f32]| {
            if let Some(r) = residual {
                let r = &r[i * cout * p..][..cout * p];
                yi.iter_mut()
                    .zip(r)
                    .for_each(|(v, r)| *v = (*v + r).max(0.0));
            } else if relu {
                yi.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        };
        // Per run of images: the column (or planes) buffer, and one for an
        // input that the im2col path must normalise first.
        let image = |(cols, xs): (&mut Vec<f32>, &mut Vec<f32>), (i, yi): (usize, &mut [f32])| {
            let xi = x.image(i, g.image());
            if direct {
                let (xp, out) = cols.split_at_mut(xp_len);
                plan.load(xi, xp);
                if avx {
                    direct::forward(&plan.wide(), xp, wr, out);
                    let r = residual.map(|r| &r[i * cout * p..][..cout * p]);
                    plan.store_with(out, Some(b), (relu, r), yi);
                    return;
                }
                plan.run(wr, xp, out, inner);
                plan.add_to(out, yi);
                finish(i, yi);
                return;
            }
            let xi = xi.materialize(xs);
            let cols: &[f32] = if g.identity() {
                xi
            } else {
                im2col(xi, &g, cols);
                cols
            };
            gemm(
                cout,
                p,
                k,
                yi,
                true,
                Mat {
                    data: w,
                    rs: k,
                    cs: 1,
                },
                Mat {
                    data: cols,
                    rs: p,
                    cs: 1,
                },
                inner,
            );
            finish(i, yi);
        };
        // Per image and channel `(mean, Σ (v − mean)²)` of the output, taken
        // while the image is in cache, when asked for.
        let mut stats = vec![[0f64; 2]; if moments { g.n * cout } else { 0 }];
        let measure = |yi: &[f32], si: &mut [[f64; 2]]| {
            for (row, s) in yi.chunks_exact(p).zip(si) {
                *s = row_moments(row);
            }
        };
        if g.n < t {
            let (mut cols, mut xs) = (vec![0f32; cols_len], Vec::new());
            for (i, yi) in y.chunks_mut(cout * p).enumerate() {
                image((&mut cols, &mut xs), (i, yi));
                if moments {
                    measure(yi, &mut stats[i * cout..][..cout]);
                }
            }
        } else {
            // A few runs of images per thread, each with one column buffer
            // (`for_each_init` would allocate one per rayon split).
            let per_chunk = g.n.div_ceil(4 * t).max(1);
            let stat_chunks: Vec<&mut [[f64; 2]]> = if moments {
                stats.chunks_mut(per_chunk * cout).collect()
            } else {
                (0..g.n.div_ceil(per_chunk))
                    .map(|_| Default::default())
                    .collect()
            };
            y.par_chunks_mut(per_chunk * cout * p)
                .zip(stat_chunks)
                .enumerate()
                .for_each(|(c, (yc, sc))| {
                    let (mut cols, mut xs) = (vec![0f32; cols_len], Vec::new());
                    for (j, yi) in yc.chunks_mut(cout * p).enumerate() {
                        image((&mut cols, &mut xs), (c * per_chunk + j, yi));
                        if moments {
                            measure(yi, &mut sc[j * cout..][..cout]);
                        }
                    }
                });
        }
        Ok((y, stats))
    }
}

/// `(mean, Σ (v − mean)²)` of one row, two passes (the row is in cache).
fn row_moments(row: &[f32]) -> [f64; 2] {
    if row.is_empty() {
        return [0.0; 2];
    }
    let mean = super::sum(row) as f64 / row.len() as f64;
    let mu = mean as f32;
    [
        mean,
        super::sum2(row, row, |v, _| (v - mu) * (v - mu)) as f64,
    ]
}

/// Work on one image's input gradient `(i, dx_i)` as soon as it is made,
/// while it is in cache (a fused op adding a residual gradient to it).
pub(super) type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// The gradients of [`forward_values`] (without its ReLU: `dy` is the
/// gradient of the convolution's own output): `(dx, dw, db)`, `dx` only when
/// `input_grad`, each image of it passed through `after` once made.
#[allow(clippy::type_complexity)]
pub(super) fn backward_values(
    g: &Geom,
    x: Input,
    w: &[f32],
    dy: Dy,
    input_grad: bool,
    after: Option<Epilogue>,
) -> Result<(Option<Vec<f32>>, Vec<f32>, Vec<f32>)> {
    let g = *g;
    {
        let dy = &dy;
        let (k, p, cout) = (g.k(), g.p(), g.cout);
        let t = threads();
        // A few chunks per thread, so that work stealing evens out a busy core.
        let chunks = (4 * t).min(g.n).max(1);
        let per_chunk = g.n.div_ceil(chunks).max(1);
        let inner = if g.n < t {
            parallelism(t)
        } else {
            gemm::Parallelism::None
        };
        let direct = g.direct();
        let avx = direct && direct::available();
        let mut dx = if input_grad && avx {
            // SAFETY: the AVX-512 direct path stores every input-gradient value.
            unsafe { super::output_buffer(g.n * g.image()) }
        } else if input_grad {
            vec![0f32; g.n * g.image()]
        } else {
            Vec::new()
        };
        let partials: Result<_> = {
            {
                // Wᵀ (k×cout), row-major, for the input gradient.
                let mut wt = vec![0f32; if input_grad { k * cout } else { 0 }];
                if input_grad {
                    transpose(w, cout, k, &mut wt);
                }
                let wt = &wt;
                let taps = g.kh * g.kw;
                let plan = Plan::new(
                    (g.cin, g.h, g.w),
                    (g.top, g.left),
                    (g.kh, g.kw),
                    (cout, g.oh, g.ow),
                    g.stride,
                );
                // The input gradient is the direct convolution of dy with the
                // kernel flipped (taps reversed), in/out channels swapped, as
                // `[kh·kw][cin][cout]`.
                let tplan = Plan::new(
                    (cout, g.oh, g.ow),
                    (
                        g.kh - 1 - g.top.min(g.kh - 1),
                        g.kw - 1 - g.left.min(g.kw - 1),
                    ),
                    (g.kh, g.kw),
                    (g.cin, g.h, g.w),
                    1,
                );
                // With stride 2, the input gradient's four phases instead.
                let strided =
                    (direct && input_grad && g.stride == 2).then(|| phases::InputGrad::new(&g, w));
                let flipped = direct && input_grad && strided.is_none();
                let mut wf = vec![
                    0f32;
                    match (flipped, avx) {
                        (false, _) => 0,
                        (true, false) => k * cout,
                        (true, true) => direct::packed_len(cout, taps, g.cin),
                    }
                ];
                // (Packed with cout as the input channels for the AVX-512 kernel.)
                if flipped {
                    for co in 0..cout {
                        for ci in 0..g.cin {
                            for tap in 0..taps {
                                let flipped = taps - 1 - tap;
                                let at = if avx {
                                    direct::packed_index(cout, taps, (co, flipped, ci))
                                } else {
                                    (flipped * g.cin + ci) * cout + co
                                };
                                wf[at] = w[(co * g.cin + ci) * taps + tap];
                            }
                        }
                    }
                }
                let wf = &wf;
                {
                    let targets: Vec<(usize, Option<&mut [f32]>)> = if input_grad {
                        dx.chunks_mut((per_chunk * g.image()).max(1))
                            .map(Some)
                            .enumerate()
                            .collect()
                    } else {
                        (0..g.n.div_ceil(per_chunk)).map(|c| (c, None)).collect()
                    };
                    let work_direct = |(c, mut dxc): (usize, Option<&mut [f32]>)| {
                        // dW as `[kh·kw][cout][cin]` (the gemm crate's), or
                        // as lane sums `[cin][kh·kw][cout][16]` (AVX-512).
                        // The gemm-shaped weight gradient where it applies,
                        // else lane sums on large maps only (see
                        // `direct::weight_grad`).
                        // (With a single vector of output channels the gemm
                        // form is bound by its broadcasts: resnet20 trains at
                        // 893 img/s with the row kernel for its 16-channel
                        // layers against 842 with the gemm, medians of 4.)
                        let gemm_grad = avx && direct::gemm_grad_supported(g.kh, g.kw) && cout > 16;
                        let lanes = if avx && !gemm_grad && plan.l >= 512 {
                            16
                        } else {
                            1
                        };
                        let ts = plan.l * direct::transposed_width(cout) + 16;
                        let mut dwk = vec![0f32; lanes * k * cout];
                        let mut db = vec![0f32; cout];
                        let mut scratch = Vec::new();
                        // The AVX-512 weight gradient runs over a group of
                        // images at a time (one flush of its sums per group:
                        // 8×8 maps have only 80 wide positions per image).
                        let group = if avx { (1024 / plan.l).max(1) } else { 1 };
                        // When dy's padded planes for the input gradient
                        // have the wide layout's row width, its wide rows are
                        // a view into them (the padding supplies the zeros
                        // past each row): one copy of dy serves both.
                        let (ttop, tleft) = (tplan.top, tplan.left);
                        let shared = avx
                            && strided.is_none()
                            && dxc.is_some()
                            && tplan.wp == plan.wp
                            && ttop * tplan.wp + tleft + plan.l <= tplan.s;
                        // Per-image strides, a cache line over the sizes so
                        // that the images of a group do not share cache sets.
                        let xs = plan.xp_len() + 16;
                        let (ds, dc) = if shared {
                            (tplan.xp_len() + 16, tplan.s)
                        } else {
                            (cout * plan.l + 16, plan.l)
                        };
                        let mut xp = vec![0f32; group * xs];
                        let mut dyt = vec![0f32; if gemm_grad { group * ts } else { 0 }];
                        // dy in rows of the padded width, zero past each row
                        // (or dy's padded planes, when shared).
                        let mut dyw = vec![0f32; group * ds];
                        let (mut dyp, mut out) = if let (Some(ph), Some(_)) = (&strided, &dxc) {
                            (vec![0f32; ph.planes_len()], vec![0f32; ph.out_len()])
                        } else if dxc.is_some() {
                            let planes = if shared { 0 } else { tplan.xp_len() };
                            (vec![0f32; planes], vec![0f32; g.cin * tplan.l])
                        } else {
                            (Vec::new(), Vec::new())
                        };
                        let view = if shared { ttop * tplan.wp + tleft } else { 0 };
                        let first = c * per_chunk;
                        let last = (first + per_chunk).min(g.n);
                        for i in first..last {
                            let dyi = dy.image(i, cout * p, &mut scratch);
                            for (d, row) in db.iter_mut().zip(dyi.chunks(p)) {
                                *d += super::sum(row);
                            }
                            let xi = x.image(i, g.image());
                            let slot = (i - first) % group;
                            plan.load(xi, &mut xp[slot * xs..][..plan.xp_len()]);
                            if shared {
                                tplan.load(
                                    Input::Plain(dyi),
                                    &mut dyw[slot * ds..][..tplan.xp_len()],
                                );
                            } else {
                                for (dst, src) in dyw[slot * ds..][..cout * plan.l]
                                    .chunks_exact_mut(plan.l)
                                    .zip(dyi.chunks_exact(p))
                                {
                                    for (oy, row) in src.chunks_exact(g.ow).enumerate() {
                                        dst[oy * plan.wp..][..g.ow].copy_from_slice(row);
                                    }
                                }
                            }
                            if gemm_grad {
                                direct::transpose_gradient(
                                    &plan.wide(),
                                    &dyw[slot * ds + view..],
                                    dc,
                                    &mut dyt[slot * ts..][..ts],
                                );
                            }
                            if gemm_grad && (slot + 1 == group || i + 1 == last) {
                                direct::weight_grad_gemm(
                                    &plan.wide(),
                                    (slot + 1, xs, ts),
                                    &xp,
                                    &dyt,
                                    &mut dwk,
                                );
                            } else if avx && (slot + 1 == group || i + 1 == last) {
                                let n = slot + 1;
                                direct::weight_grad(
                                    &plan.wide(),
                                    (n, xs, ds, dc),
                                    &xp,
                                    &dyw[view..],
                                    &mut dwk,
                                    lanes,
                                );
                            }
                            for tap in (0..taps).filter(|_| !avx) {
                                // dW_tap (cout × cin) += dy_wide (cout × l) · shiftedᵀ (l × cin)
                                gemm(
                                    cout,
                                    g.cin,
                                    plan.l,
                                    &mut dwk[tap * cout * g.cin..][..cout * g.cin],
                                    true,
                                    Mat {
                                        data: &dyw,
                                        rs: plan.l,
                                        cs: 1,
                                    },
                                    Mat {
                                        data: plan.shifted(&xp, tap),
                                        rs: 1,
                                        cs: plan.s,
                                    },
                                    inner,
                                );
                            }
                            if let Some(dxc) = dxc.as_deref_mut() {
                                let dxi = &mut dxc[(i - first) * g.image()..][..g.image()];
                                if let Some(ph) = &strided {
                                    ph.load(dyi, &mut dyp);
                                    ph.run(&dyp, &mut out, dxi);
                                } else if shared {
                                    let dyp = &dyw[slot * ds..][..tplan.xp_len()];
                                    direct::forward(&tplan.wide(), dyp, wf, &mut out);
                                    tplan.store(&out, None, false, dxi);
                                } else if avx {
                                    tplan.load(Input::Plain(dyi), &mut dyp);
                                    direct::forward(&tplan.wide(), &dyp, wf, &mut out);
                                    tplan.store(&out, None, false, dxi);
                                } else {
                                    tplan.load(Input::Plain(dyi), &mut dyp);
                                    tplan.run(wf, &dyp, &mut out, inner);
                                    tplan.add_to(&out, dxi);
                                }
                                if let Some(after) = after {
                                    after(i, dxi);
                                }
                            }
                        }
                        // Into the im2col path's `[cin·kh·kw][cout]`.
                        let mut dwt = vec![0f32; k * cout];
                        if avx {
                            if lanes == 1 {
                                return (dwk, db);
                            }
                            direct::lane_sums(&dwk, &mut dwt);
                            return (dwt, db);
                        }
                        for tap in 0..taps {
                            for co in 0..cout {
                                for ci in 0..g.cin {
                                    dwt[(ci * taps + tap) * cout + co] =
                                        dwk[(tap * cout + co) * g.cin + ci];
                                }
                            }
                        }
                        (dwt, db)
                    };
                    let work = |(c, mut dxc): (usize, Option<&mut [f32]>)| {
                        if direct {
                            return work_direct((c, dxc));
                        }
                        let mut dwt = vec![0f32; k * cout];
                        let mut scratch = Vec::new();
                        let mut dyt = vec![0f32; p * cout];
                        let mut db = vec![0f32; cout];
                        let mut cols = vec![0f32; if g.identity() { 0 } else { k * p }];
                        let mut xscratch = Vec::new();
                        let mut dcols = vec![
                            0f32;
                            if g.identity() || !input_grad {
                                0
                            } else {
                                k * p
                            }
                        ];
                        let first = c * per_chunk;
                        for i in first..(first + per_chunk).min(g.n) {
                            let dyi = dy.image(i, cout * p, &mut scratch);
                            for (d, row) in db.iter_mut().zip(dyi.chunks(p)) {
                                *d += super::sum(row);
                            }
                            let xi = x.image(i, g.image()).materialize(&mut xscratch);
                            let colsref: &[f32] = if g.identity() {
                                xi
                            } else {
                                im2col(xi, &g, &mut cols);
                                &cols
                            };
                            let lhs = Mat {
                                data: dyi,
                                rs: p,
                                cs: 1,
                            };
                            // dWᵀ (k×cout) += cols (k×p) · dy_iᵀ (p×cout), with dy_i
                            // transposed first: the gemm crate runs row-major
                            // operands at up to twice the speed of a transposed one
                            // (and ten times for thin shapes such as 16×144).
                            transpose(dyi, cout, p, &mut dyt);
                            gemm(
                                k,
                                cout,
                                p,
                                &mut dwt,
                                true,
                                Mat {
                                    data: colsref,
                                    rs: p,
                                    cs: 1,
                                },
                                Mat {
                                    data: &dyt,
                                    rs: cout,
                                    cs: 1,
                                },
                                inner,
                            );
                            if let Some(dxc) = dxc.as_deref_mut() {
                                let dxi = &mut dxc[(i - first) * g.image()..][..g.image()];
                                // dcols (k×p) = Wᵀ (k×cout) · dy_i (cout×p)
                                let wt = Mat {
                                    data: wt,
                                    rs: cout,
                                    cs: 1,
                                };
                                if g.identity() {
                                    gemm(k, p, cout, dxi, false, wt, lhs, inner);
                                } else {
                                    gemm(k, p, cout, &mut dcols, false, wt, lhs, inner);
                                    col2im(&dcols, &g, dxi);
                                }
                                if let Some(after) = after {
                                    after(i, dxi);
                                }
                            }
                        }
                        (dwt, db)
                    };
                    Ok(if g.n < t {
                        targets.into_iter().map(work).collect::<Vec<_>>()
                    } else {
                        targets.into_par_iter().map(work).collect::<Vec<_>>()
                    })
                }
            }
        };
        let partials = partials?;
        let mut parts = partials.into_iter();
        let (mut dwt, mut db) = parts
            .next()
            .unwrap_or_else(|| (vec![0f32; k * cout], vec![0f32; cout]));
        for (pw, pb) in parts {
            dwt.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        }
        let mut dw = vec![0f32; cout * k];
        for (r, row) in dwt.chunks_exact(cout.max(1)).enumerate() {
            for (co, &v) in row.iter().enumerate() {
                dw[co * k + r] = v;
            }
        }
        Ok((input_grad.then_some(dx), dw, db))
    }
}

/// `max(conv(x, w) + bias + residual, 0)` for inference: on the CPU the
/// residual sum and ReLU in the convolution's epilogue, computed outside
/// autograd (the result has no gradient); elsewhere candle's ops.
pub fn conv2d_add_relu_inference(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    (stride, pad): (usize, [usize; 4]),
    residual: &Tensor,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let y = conv2d_reference(x, w, Some(bias), stride, pad)?;
        return (y + residual)?.relu();
    }
    let g = Geom::new(x.dims(), w.dims(), stride, pad)?;
    let (y, _) = with_values(x, |xv| {
        with_values(w, |wv| {
            with_values(bias, |bv| {
                with_values(residual, |r| {
                    forward_residual(&g, Input::Plain(xv), wv, bv, (true, Some(r)), false)
                })
            })
        })
    })?;
    Tensor::from_vec(y, (g.n, g.cout, g.oh, g.ow), x.device())
}

/// Convolution of `x (N, Cin, H, W)` with `w (Cout, Cin, kh, kw)` plus an
/// optional bias `(Cout)`, zero padding `[top, bottom, left, right]`.
///
/// On the CPU this is the fast convolution op (direct AVX-512 kernels, or
/// gemm-based where they do not apply); `input_grad: false` makes its
/// backward skip the gradient of `x` (for a network's first layer). Elsewhere
/// it is candle's convolution. (The layers call [`conv2d_act`].)
#[cfg(test)]
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
    input_grad: bool,
) -> Result<Tensor> {
    conv2d_act(x, w, b, stride, pad, input_grad, false)
}

/// [`conv2d`] followed by a ReLU when `relu`: one op on the CPU.
pub fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
    input_grad: bool,
    relu: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let y = conv2d_reference(x, w, b, stride, pad)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let cout = w.dim(0)?;
    let b = match b {
        Some(b) => b.flatten_all()?,
        None => Tensor::zeros(cout, x.dtype(), x.device())?,
    };
    let op = Conv2dOp {
        stride,
        pad,
        input_grad,
        relu,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// [`conv2d`] with candle's own operations (pad, convolve, add the bias).
///
/// Rows and columns of the padded input that no output reads are cropped
/// first: candle's convolution backward gets the input-gradient shape wrong
/// when the stride does not evenly cover the padded input.
pub fn conv2d_reference(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> Result<Tensor> {
    let g = Geom::new(x.dims(), w.dims(), stride, pad)?;
    let [top, bottom, left, right] = pad;
    let (used_h, used_w) = ((g.oh - 1) * stride + g.kh, (g.ow - 1) * stride + g.kw);
    let y = if top == bottom
        && left == right
        && top == left
        && used_h == g.h + 2 * top
        && used_w == g.w + 2 * left
    {
        x.conv2d(w, top, stride, 1, 1)?
    } else {
        x.pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?
            .narrow(2, 0, used_h)?
            .narrow(3, 0, used_w)?
            .conv2d(w, 0, stride, 1, 1)?
    };
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}
