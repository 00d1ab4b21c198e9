//! The input gradient of a stride-2 convolution on the direct kernels.
//!
//! Input position `(iy, ix)` lies at padded row `r = iy + top` and column
//! `c = ix + left`; output `(oy, ox)` reaches it through tap `(ky, kx)` when
//! `2·oy + ky = r` and `2·ox + kx = c`, so only taps with `ky ≡ r` and `kx ≡ c`
//! (mod 2) reach it, from output `(⌊r/2⌋ − ⌊ky/2⌋, ⌊c/2⌋ − ⌊kx/2⌋)`. Each of
//! the four *phases* `(r mod 2, c mod 2)` of the input gradient is therefore
//! a stride-1 convolution of the output gradient with the taps of that
//! parity, flipped: four runs of [`direct::forward`] over one zero-padded
//! copy of `dy`, each stored into every other row and column of `dx`.

use super::Geom;
use crate::{direct, Slot};

/// One phase: the input rows `2a + rho − top` for `a` in `rows`, columns
/// `2b + sigma − left` for `b` in `cols`.
struct Phase {
    rho: usize,
    sigma: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    /// Where the phase's first tap reads in `dy`'s padded planes.
    base: usize,
    /// The sub-convolution: `dy`'s channels in, `dx`'s out.
    wide: direct::Wide,
    /// Its kernel, packed by [`direct::packed_index`].
    w: Vec<f32>,
}

/// The input gradient of one stride-2 convolution, image by image.
pub(super) struct InputGrad {
    phases: Vec<Phase>,
    /// `dy`'s shape, `(cout, oh, ow)`, and `dx`'s, `(cin, h, w)`.
    dy: (usize, usize, usize),
    dx: (usize, usize, usize),
    top: usize,
    left: usize,
    /// `dy`'s zero margins above and left of it, its padded row width and
    /// the distance between its padded planes.
    margin: (usize, usize),
    wp: usize,
    s: usize,
    planes_len: usize,
    out_len: usize,
}

/// The phase coordinates `[a0, a1)` whose padded index `2a + parity` falls
/// inside an image of `n` values after `pad` padding values.
fn span(n: usize, pad: usize, parity: usize) -> (usize, usize) {
    (
        pad.saturating_sub(parity).div_ceil(2),
        (n + pad + 1).saturating_sub(parity) / 2,
    )
}

impl InputGrad {
    /// The phases of `g` (stride 2) for the kernel `w`
    /// `(cout, cin, kh, kw)`.
    pub(super) fn new(g: &Geom, w: &[f32]) -> Self {
        debug_assert!(g.stride == 2);
        let (mh, mw) = ((g.kh - 1) / 2, (g.kw - 1) / 2);
        let rows = [span(g.h, g.top, 0), span(g.h, g.top, 1)];
        let cols = [span(g.w, g.left, 0), span(g.w, g.left, 1)];
        let last_row = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let last_col = cols.iter().map(|c| c.1).max().unwrap_or(0);
        // Zero margins: `mh` rows above, `mw` columns left, and below and
        // right at least up to what the phases' last positions read.
        let wp = mw + g.ow.max(last_col);
        let height = mh + g.oh.max(last_row) + 1;
        let mut phases = Vec::new();
        for (rho, &(a0, a1)) in rows.iter().enumerate() {
            for (sigma, &(b0, b1)) in cols.iter().enumerate() {
                if a1 <= a0 || b1 <= b0 {
                    continue;
                }
                // Taps of this parity (none for the odd phases of a 1×1
                // kernel, whose input gradient is zero there).
                let (th, tw) = ((g.kh - rho).div_ceil(2), (g.kw - sigma).div_ceil(2));
                let taps = th * tw;
                let mut packed = vec![0f32; direct::packed_len(g.cout, taps, g.cin)];
                for co in 0..g.cout {
                    for ci in 0..g.cin {
                        for j in 0..th {
                            for i in 0..tw {
                                // Flipped: sub-kernel tap (j, i) is kernel tap
                                // (rho + 2(th − 1 − j), sigma + 2(tw − 1 − i)).
                                let (ky, kx) = (rho + 2 * (th - 1 - j), sigma + 2 * (tw - 1 - i));
                                packed[direct::packed_index(g.cout, taps, (co, j * tw + i, ci))] =
                                    w[((co * g.cin + ci) * g.kh + ky) * g.kw + kx];
                            }
                        }
                    }
                }
                let l = if taps > 0 {
                    ((a1 - a0 - 1) * wp + (b1 - b0)).next_multiple_of(16)
                } else {
                    0
                };
                phases.push(Phase {
                    rho,
                    sigma,
                    rows: (a0, a1),
                    cols: (b0, b1),
                    base: (a0 + mh + 1).saturating_sub(th) * wp + (b0 + mw + 1).saturating_sub(tw),
                    wide: direct::Wide {
                        cin: g.cout,
                        cout: g.cin,
                        s: 0,
                        wp,
                        kh: th,
                        kw: tw,
                        l,
                        stride: 1,
                        sp: 0,
                        oh: 0,
                    },
                    w: packed,
                });
            }
        }
        // Each plane holds `dy` with its margins and whatever the wrapped
        // positions of every phase read past it.
        let reach = phases
            .iter()
            .filter(|p| !p.w.is_empty())
            .map(|p| p.base + (p.wide.kh - 1) * wp + p.wide.kw - 1 + p.wide.l)
            .max()
            .unwrap_or(0);
        let s = (height * wp).max(reach);
        for p in &mut phases {
            p.wide.s = s;
        }
        let base = phases.iter().map(|p| p.base).max().unwrap_or(0);
        let out_len = g.cin * phases.iter().map(|p| p.wide.l).max().unwrap_or(0);
        Self {
            phases,
            dy: (g.cout, g.oh, g.ow),
            dx: (g.cin, g.h, g.w),
            top: g.top,
            left: g.left,
            margin: (mh, mw),
            wp,
            s,
            planes_len: g.cout * s + base,
            out_len,
        }
    }

    /// Length of the buffer for `dy`'s padded planes (allocate zeroed:
    /// [`InputGrad::load`] writes only `dy`'s own positions).
    pub(super) fn planes_len(&self) -> usize {
        self.planes_len
    }

    /// Length of the scratch buffer for one phase's wide output.
    pub(super) fn out_len(&self) -> usize {
        self.out_len
    }

    /// Copies one image's output gradient `(cout, oh, ow)` into the
    /// interior of the padded planes.
    pub(super) fn load(&self, dy: &[f32], planes: &mut [f32]) {
        let (cout, oh, ow) = self.dy;
        let (mh, mw) = self.margin;
        for co in 0..cout {
            for oy in 0..oh {
                let src = &dy[(co * oh + oy) * ow..][..ow];
                planes[co * self.s + (oy + mh) * self.wp + mw..][..ow].copy_from_slice(src);
            }
        }
    }

    /// One image's input gradient `dx (cin, h, w)` from `dy`'s padded planes
    /// (see [`InputGrad::load`]), with `out` as scratch: writes every value.
    pub(super) fn run<T: Slot>(&self, planes: &[f32], out: &mut [f32], dx: &mut [T]) {
        let (cin, h, w) = self.dx;
        for p in &self.phases {
            let taps = !p.w.is_empty();
            if taps {
                direct::forward(&p.wide, &planes[p.base..], &p.w, out);
            }
            let (a0, a1) = p.rows;
            let (b0, b1) = p.cols;
            for ci in 0..cin {
                let plane = &mut dx[ci * h * w..][..h * w];
                let src = &out[ci * p.wide.l..][..p.wide.l];
                for a in a0..a1 {
                    let iy = 2 * a + p.rho - self.top;
                    let first = 2 * b0 + p.sigma - self.left;
                    let dst = plane[iy * w..][..w].iter_mut().skip(first).step_by(2);
                    if !taps {
                        dst.take(b1 - b0).for_each(|d| d.set(0.0));
                        continue;
                    }
                    let row = &src[(a - a0) * self.wp..][..b1 - b0];
                    for (d, &v) in dst.zip(row) {
                        d.set(v);
                    }
                }
            }
        }
    }
}
