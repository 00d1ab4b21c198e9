//! The direct path's layout of an image (zero-padded planes, or phase planes
//! for stride 2) and its gemm-per-tap fallback.

use crate::{direct, gemm, Mat, Slot};

use super::{Geom, Input};

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
pub(super) struct Plan {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) top: usize,
    pub(super) left: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) cout: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) wp: usize,
    /// Output length per channel, rounded up to a multiple of 16 (the gemm
    /// crate reads an unpacked operand only in whole vectors).
    pub(super) l: usize,
    /// Stride between the padded input planes (of one channel's four phase
    /// planes with stride 2).
    pub(super) s: usize,
    /// 1 or 2.
    pub(super) stride: usize,
    /// Stride between phase planes (stride 2).
    pub(super) sp: usize,
}

impl Plan {
    /// The plan of the convolution `g` (its forward's layout).
    pub(super) fn of(g: &Geom) -> Self {
        Plan::new(
            (g.cin, g.h, g.w),
            (g.top, g.left),
            (g.kh, g.kw),
            (g.cout, g.oh, g.ow),
            g.stride,
        )
    }

    pub(super) fn new(
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

    /// The shapes as the direct kernels of [`direct`] see them.
    pub(super) fn wide(&self) -> direct::Wide {
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
            oh: self.oh,
        }
    }

    /// Length of the padded input buffer (allocate zeroed: [`Plan::load`]
    /// writes only the image's own positions).
    pub(super) fn xp_len(&self) -> usize {
        self.c * self.s
    }

    /// Copies image `x` into the interior of the padded planes `xp`
    /// (normalising it on the way if it is [`Input::Normalized`]).
    pub(super) fn load(&self, x: Input, xp: &mut [f32]) {
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
    pub(super) fn load_phases(&self, x: Input, xp: &mut [f32]) {
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
    pub(super) fn shifted<'a>(&self, xp: &'a [f32], tap: usize) -> &'a [f32] {
        let (ky, kx) = (tap / self.kw, tap % self.kw);
        &xp[ky * self.wp + kx..]
    }

    /// `out (cout × l) = Σ_tap wr[tap] (cout × c) · shifted(xp, tap)`, with
    /// the kernel as `wr [kh·kw][cout][c]`.
    pub(super) fn run(&self, wr: &[f32], xp: &[f32], out: &mut [f32], par: gemm::Parallelism) {
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
    pub(super) fn store<T: Slot>(
        &self,
        out: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [T],
    ) {
        self.store_with(out, bias, (relu, None), y);
    }

    /// [`Plan::store`], with `residual` (an image like `y`) added before the
    /// ReLU when given (then the ReLU applies regardless of `relu`).
    pub(super) fn store_with<T: Slot>(
        &self,
        out: &[f32],
        bias: Option<&[f32]>,
        (relu, residual): (bool, Option<&[f32]>),
        y: &mut [T],
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
                        v.set((s + b + r).max(0.0));
                    }
                } else if relu {
                    for (v, s) in row.iter_mut().zip(from) {
                        v.set((s + b).max(0.0));
                    }
                } else {
                    for (v, s) in row.iter_mut().zip(from) {
                        v.set(s + b);
                    }
                }
            }
        }
    }

    /// Adds the valid part of `out (cout × l)` onto `y (cout, oh, ow)`.
    pub(super) fn add_to(&self, out: &[f32], y: &mut [f32]) {
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
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
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
