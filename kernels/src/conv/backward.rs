//! The convolution's gradients, on the path its [`Geom`] chose.

use std::mem::MaybeUninit;

use candle_core::Result;
use rayon::prelude::*;

use super::im2col::{col2im, im2col};
use super::phases;
use super::plan::{transpose, Plan};
use super::{ConvPath, Dy, Geom, Input};
use crate::{direct, gemm, parallelism, threads, Mat};

/// Work on one image's input gradient `(i, dx_i)` as soon as it is made,
/// while it is in cache (a fused op adding a residual gradient to it).
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// The gradients of [`forward_values`] (without its ReLU: `dy` is the
/// gradient of the convolution's own output): `(dx, dw, db)`, `dx` only when
/// `input_grad`, each image of it passed through `after` once made.
#[allow(clippy::type_complexity)]
pub(crate) fn backward_values(
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
        // Where the direct path's time goes, with GRADCAST_KERNEL_PROFILE.
        let laps = crate::Laps::new([
            "dy",
            "x-planes",
            "dy-planes",
            "transpose",
            "weight-grad",
            "input-grad",
            "epilogue",
        ]);
        let inner = if g.n < t {
            parallelism(t)
        } else {
            gemm::Parallelism::None
        };
        let path = g.path();
        let (direct, avx) = (path.is_direct(), path == ConvPath::Direct);
        let identity = path == ConvPath::Identity;
        // The direct-kernel path stores every input-gradient value into the
        // unwritten buffer; the others add into zeros.
        let mut dx = crate::uninit_buffer(if input_grad { g.n * g.image() } else { 0 });
        if !avx {
            dx.iter_mut().for_each(|v| {
                v.write(0.0);
            });
        }
        let partials: Result<_> = {
            {
                // Wᵀ (k×cout), row-major, for the input gradient.
                let mut wt = vec![0f32; if input_grad { k * cout } else { 0 }];
                if input_grad {
                    transpose(w, cout, k, &mut wt);
                }
                let wt = &wt;
                let taps = g.kh * g.kw;
                let plan = Plan::of(&g);
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
                // (Packed with cout as the input channels for the direct kernels.)
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
                let wino = if flipped && avx {
                    direct::winograd_kernel(&tplan.wide(), wf)
                } else {
                    None
                };
                let wino = wino.as_deref();
                {
                    let targets: Vec<(usize, Option<&mut [MaybeUninit<f32>]>)> = if input_grad {
                        dx.chunks_mut((per_chunk * g.image()).max(1))
                            .map(Some)
                            .enumerate()
                            .collect()
                    } else {
                        (0..g.n.div_ceil(per_chunk)).map(|c| (c, None)).collect()
                    };
                    let work_direct = |(c, mut dxc): (usize, Option<&mut [MaybeUninit<f32>]>)| {
                        // dW as `[kh·kw][cout][cin]` (the gemm crate's), or
                        // as lane sums `[cin][kh·kw][cout][16]` (direct kernels).
                        // The gemm-shaped weight gradient where it pays,
                        // else lane sums on large maps only (see
                        // `direct::weight_grad`).
                        // Or through Winograd's transforms, where the
                        // forward takes them.
                        let wino_grad = avx && direct::winograd::weight_grad_applies(&plan.wide());
                        let gemm_grad = avx && !wino_grad && direct::gemm_grad_pays(&plan.wide());
                        let transposed = gemm_grad || wino_grad;
                        let lanes = if avx && !transposed {
                            direct::weight_grad_lanes(plan.l)
                        } else {
                            1
                        };
                        let ts = plan.l * direct::transposed_width(cout) + 16;
                        let mut dwk = vec![0f32; lanes * k * cout];
                        let mut db = vec![0f32; cout];
                        let mut scratch = Vec::new();
                        // The direct kernels' weight gradient runs over a group of
                        // images at a time.
                        let group = if avx {
                            direct::weight_grad_group(plan.l)
                        } else {
                            1
                        };
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
                        let mut dyt = vec![0f32; if transposed { group * ts } else { 0 }];
                        let mut du = vec![
                            0f32;
                            if wino_grad {
                                direct::winograd::grad_len(&plan.wide())
                            } else {
                                0
                            }
                        ];
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
                        let mut lap = laps.lap();
                        for i in first..last {
                            let dyi = dy.image(i, cout * p, &mut scratch);
                            for (d, row) in db.iter_mut().zip(dyi.chunks(p)) {
                                *d += crate::bn_rows::sum(row);
                            }
                            lap.mark(0);
                            let xi = x.image(i, g.image());
                            let slot = (i - first) % group;
                            plan.load(xi, &mut xp[slot * xs..][..plan.xp_len()]);
                            lap.mark(1);
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
                            lap.mark(2);
                            if transposed {
                                direct::transpose_gradient(
                                    &plan.wide(),
                                    &dyw[slot * ds + view..],
                                    dc,
                                    &mut dyt[slot * ts..][..ts],
                                );
                            }
                            lap.mark(3);
                            if wino_grad && (slot + 1 == group || i + 1 == last) {
                                direct::winograd::weight_grad(
                                    &plan.wide(),
                                    (slot + 1, xs, ts),
                                    &xp,
                                    &dyt,
                                    &mut du,
                                );
                            } else if gemm_grad && (slot + 1 == group || i + 1 == last) {
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
                            lap.mark(4);
                            if let Some(dxc) = dxc.as_deref_mut() {
                                let dxi = &mut dxc[(i - first) * g.image()..][..g.image()];
                                if let Some(ph) = &strided {
                                    ph.load(dyi, &mut dyp);
                                    ph.run(&dyp, &mut out, dxi);
                                } else if shared {
                                    let dyp = &dyw[slot * ds..][..tplan.xp_len()];
                                    direct::forward_with(&tplan.wide(), dyp, wf, wino, &mut out);
                                    tplan.store(&out, None, false, dxi);
                                } else if avx {
                                    tplan.load(Input::Plain(dyi), &mut dyp);
                                    direct::forward_with(&tplan.wide(), &dyp, wf, wino, &mut out);
                                    tplan.store(&out, None, false, dxi);
                                } else {
                                    tplan.load(Input::Plain(dyi), &mut dyp);
                                    tplan.run(wf, &dyp, &mut out, inner);
                                    // SAFETY: off the direct-kernel path `dx` starts as zeros.
                                    tplan.add_to(&out, unsafe { crate::assume_init_mut(dxi) });
                                }
                                // SAFETY: each branch above stored (or added to) every value.
                                let dxi = unsafe { crate::assume_init_mut(dxi) };
                                lap.mark(5);
                                if let Some(after) = after {
                                    after(i, dxi);
                                }
                                lap.mark(6);
                            }
                        }
                        drop(lap);
                        // Into the im2col path's `[cin·kh·kw][cout]`.
                        let mut dwt = vec![0f32; k * cout];
                        if avx {
                            if wino_grad {
                                direct::winograd::kernel_grad(&plan.wide(), &du, &mut dwk);
                            }
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
                    let work = |(c, dxc): (usize, Option<&mut [MaybeUninit<f32>]>)| {
                        if direct {
                            return work_direct((c, dxc));
                        }
                        // SAFETY: off the direct-kernel path `dx` starts as zeros.
                        let mut dxc = dxc.map(|d| unsafe { crate::assume_init_mut(d) });
                        let mut dwt = vec![0f32; k * cout];
                        let mut scratch = Vec::new();
                        let mut dyt = vec![0f32; p * cout];
                        let mut db = vec![0f32; cout];
                        let mut cols = vec![0f32; if identity { 0 } else { k * p }];
                        let mut xscratch = Vec::new();
                        let mut dcols = vec![0f32; if identity || !input_grad { 0 } else { k * p }];
                        let first = c * per_chunk;
                        for i in first..(first + per_chunk).min(g.n) {
                            let dyi = dy.image(i, cout * p, &mut scratch);
                            for (d, row) in db.iter_mut().zip(dyi.chunks(p)) {
                                *d += crate::bn_rows::sum(row);
                            }
                            let xi = x.image(i, g.image()).materialize(&mut xscratch);
                            let colsref: &[f32] = if identity {
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
                                if identity {
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
        laps.print("conv-bwd", &g);
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
        // SAFETY: on the direct-kernel path every image of `dx` was stored above;
        // elsewhere it started as zeros; without `input_grad` it is empty.
        let dx = unsafe { crate::assume_init(dx) };
        Ok((input_grad.then_some(dx), dw, db))
    }
}
