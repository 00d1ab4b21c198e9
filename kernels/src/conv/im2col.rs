//! The im2col path's copies: an image into its column matrix, and the
//! column matrix's gradient back onto the image.

use super::Geom;

/// Column matrix `[cin·kh·kw, oh·ow]` of one image.
pub(super) fn im2col(x: &[f32], g: &Geom, cols: &mut [f32]) {
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
pub(super) fn im2col_rows(x: &[f32], g: &Geom, cols: &mut [f32]) {
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
pub(super) fn col2im(cols: &[f32], g: &Geom, x: &mut [f32]) {
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
