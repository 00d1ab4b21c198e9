//! The forward convolution, on the path its [`Geom`] chose.

use std::mem::MaybeUninit;

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::im2col::im2col;
use super::plan::Plan;
use super::{ConvPath, Geom, Input};
use crate::{direct, gemm, parallelism, threads, Mat};

/// The convolution of `x` with `w` plus the bias `b`, then a ReLU when
/// `relu`, as a `(n, cout, oh, ow)` buffer; with `moments`, also the
/// `(mean, Σ (v − mean)²)` of every image's channel (`n · cout` pairs).
#[allow(clippy::type_complexity)]
pub(crate) fn forward_values(
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
        let path = g.path();
        let (direct, avx) = (path.is_direct(), path == ConvPath::Direct);
        // The output starts as the bias, written once, and the gemm adds onto
        // it; the direct-kernel path writes bias and activation with its result
        // into the unwritten buffer.
        let mut y = crate::uninit_buffer(g.n * cout * p);
        if y.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if !avx {
            for (row, v) in y.chunks_mut(p).enumerate() {
                let bias = b[row % cout];
                v.iter_mut().for_each(|v| {
                    v.write(bias);
                });
            }
        }
        let t = threads();
        let inner = if g.n < t {
            parallelism(t)
        } else {
            gemm::Parallelism::None
        };
        let plan = Plan::of(&g);
        let xp_len = plan.xp_len();
        let taps = g.kh * g.kw;
        // The kernel for the direct path: `[kh·kw][cout][cin]` for the gemm
        // crate, packed for the direct kernels (`direct::packed_index`).
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
        let wino = if avx {
            direct::winograd_kernel(&plan.wide(), wr)
        } else {
            None
        };
        let wino = wino.as_deref();
        let cols_len = if direct {
            xp_len + plan.l * cout
        } else if path == ConvPath::Identity {
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
        // Where the direct path's time goes, with GRADCAST_KERNEL_PROFILE.
        let laps = crate::Laps::new(["x-planes", "kernel", "store", "moments"]);
        // Per run of images: the column (or planes) buffer, and one for an
        // input that the im2col path must normalise first; and its clock.
        // Writes every value of image `i`'s output `yi`.
        let image = |(cols, xs): (&mut Vec<f32>, &mut Vec<f32>),
                     (i, yi): (usize, &mut [MaybeUninit<f32>]),
                     lap: &mut crate::Lap<4>| {
            let xi = x.image(i, g.image());
            if avx {
                let (xp, out) = cols.split_at_mut(xp_len);
                plan.load(xi, xp);
                lap.mark(0);
                direct::forward_with(&plan.wide(), xp, wr, wino, out);
                lap.mark(1);
                let r = residual.map(|r| &r[i * cout * p..][..cout * p]);
                plan.store_with(out, Some(b), (relu, r), yi);
                lap.mark(2);
                return;
            }
            // SAFETY: off the direct-kernel path the bias was written everywhere.
            let yi = unsafe { crate::assume_init_mut(yi) };
            if direct {
                let (xp, out) = cols.split_at_mut(xp_len);
                plan.load(xi, xp);
                plan.run(wr, xp, out, inner);
                plan.add_to(out, yi);
                finish(i, yi);
                return;
            }
            let xi = xi.materialize(xs);
            let cols: &[f32] = if path == ConvPath::Identity {
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
            let mut lap = laps.lap();
            for (i, yi) in y.chunks_mut(cout * p).enumerate() {
                image((&mut cols, &mut xs), (i, yi), &mut lap);
                // SAFETY: `image` wrote all of it.
                let yi = unsafe { crate::assume_init_mut(yi) };
                if moments {
                    measure(yi, &mut stats[i * cout..][..cout]);
                }
                lap.mark(3);
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
                    let mut lap = laps.lap();
                    for (j, yi) in yc.chunks_mut(cout * p).enumerate() {
                        image((&mut cols, &mut xs), (c * per_chunk + j, yi), &mut lap);
                        // SAFETY: `image` wrote all of it.
                        let yi = unsafe { crate::assume_init_mut(yi) };
                        if moments {
                            measure(yi, &mut sc[j * cout..][..cout]);
                        }
                        lap.mark(3);
                    }
                });
        }
        laps.print("conv-fwd", &g);
        // SAFETY: every image of `y` went through `image`, which writes all
        // of its values.
        Ok((unsafe { crate::assume_init(y) }, stats))
    }
}
/// `(mean, Σ (v − mean)²)` of one row, two passes (the row is in cache).
fn row_moments(row: &[f32]) -> [f64; 2] {
    if row.is_empty() {
        return [0.0; 2];
    }
    let mean = crate::bn_rows::sum(row) as f64 / row.len() as f64;
    let mu = mean as f32;
    [mean, crate::bn_rows::centered_squares(row, mu) as f64]
}
