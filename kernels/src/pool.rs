//! k×k max-pooling with stride k (floor), forward and backward.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, with_values};

/// `(planes, h, w, oh, ow)` of a pooling.
fn geom(dims: &[usize], k: usize) -> Result<(usize, usize, usize, usize, usize)> {
    let &[n, c, h, w] = dims else {
        bail!("max-pool expects (N, C, H, W), got {dims:?}")
    };
    if k == 0 {
        bail!("max-pool: kernel size must be positive");
    }
    Ok((n * c, h, w, h / k, w / k))
}

/// Index inside a plane of the first maximum of output position `(oy, ox)`.
#[inline]
fn argmax(plane: &[f32], w: usize, k: usize, oy: usize, ox: usize) -> usize {
    let mut best = oy * k * w + ox * k;
    let mut bv = plane[best];
    for dy in 0..k {
        let row = (oy * k + dy) * w + ox * k;
        for (dx, &v) in plane[row..row + k].iter().enumerate() {
            if v > bv {
                bv = v;
                best = row + dx;
            }
        }
    }
    best
}

/// The maximum of a 2×2 window `[a, b, c, d]` (row-major) and the position
/// of its first occurrence (the same choice as [`argmax`]).
#[inline(always)]
pub(super) fn first_max_2x2(v: [f32; 4]) -> (f32, usize) {
    let (mut best, mut at) = (v[0], 0);
    for (i, &x) in v.iter().enumerate().skip(1) {
        if x > best {
            (best, at) = (x, i);
        }
    }
    (best, at)
}

/// Backward of 2×2 pooling on one plane: each window's gradient goes to its
/// first maximum ([`first_max_2x2`]).
fn pool2_backward(xp: &[f32], dyp: &[f32], dxp: &mut [f32], w: usize, oh: usize, ow: usize) {
    for oy in 0..oh {
        let (r0, r1) = (2 * oy * w, (2 * oy + 1) * w);
        let (x0, x1) = (&xp[r0..r0 + 2 * ow], &xp[r1..r1 + 2 * ow]);
        let g = &dyp[oy * ow..][..ow];
        let (top, rest) = dxp[r0..].split_at_mut(w);
        let (d0, d1) = (&mut top[..2 * ow], &mut rest[..2 * ow]);
        for ox in 0..ow {
            let window = [x0[2 * ox], x0[2 * ox + 1], x1[2 * ox], x1[2 * ox + 1]];
            let (_, at) = first_max_2x2(window);
            let gv = g[ox];
            d0[2 * ox] = if at == 0 { gv } else { 0.0 };
            d0[2 * ox + 1] = if at == 1 { gv } else { 0.0 };
            d1[2 * ox] = if at == 2 { gv } else { 0.0 };
            d1[2 * ox + 1] = if at == 3 { gv } else { 0.0 };
        }
    }
}

/// The pooling as a candle op.
struct MaxPoolOp {
    k: usize,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "gradcast-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout)?;
        let (planes, h, w, oh, ow) = geom(layout.dims(), self.k)?;
        let k = self.k;
        let mut y = vec![0f32; planes * oh * ow];
        if oh * ow > 0 {
            y.par_chunks_mut(oh * ow)
                .zip(x.par_chunks(h * w))
                .for_each(|(yp, xp)| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            yp[oy * ow + ox] = xp[argmax(xp, w, k, oy, ox)];
                        }
                    }
                });
        }
        let dims = layout.dims();
        Ok((
            CpuStorage::F32(y),
            Shape::from_dims(&[dims[0], dims[1], oh, ow]),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = super::Prof::new("pool-bwd", &arg.dims());
        let (_, h, w, oh, ow) = geom(arg.dims(), self.k)?;
        let k = self.k;
        let dx = with_values(arg, |x| {
            with_values(grad, |dy| {
                let mut dx = vec![0f32; x.len()];
                if oh * ow > 0 {
                    dx.par_chunks_mut(h * w)
                        .zip(x.par_chunks(h * w))
                        .zip(dy.par_chunks(oh * ow))
                        .for_each(|((dxp, xp), dyp)| {
                            if k == 2 {
                                pool2_backward(xp, dyp, dxp, w, oh, ow);
                                return;
                            }
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    dxp[argmax(xp, w, k, oy, ox)] += dyp[oy * ow + ox];
                                }
                            }
                        });
                }
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// k×k max-pooling with stride k of `x (N, C, H, W)`. On the CPU, backward
/// routes each gradient to the first maximum of its window; elsewhere this is
/// candle's `max_pool2d`.
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.max_pool2d(k);
    }
    x.contiguous()?.apply_op1(MaxPoolOp { k })
}

/// k×k max-pooling with stride k from candle's reshape and max reductions.
///
/// candle 0.11.1's own `max_pool2d` backward scales the gradient by `1/k²`
/// (it multiplies by the fraction of maxima in the window instead of dividing
/// by their count), so the reference path does not use it.
pub fn max_pool2d_reference(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k, w / k);
    x.narrow(2, 0, oh * k)?
        .narrow(3, 0, ow * k)?
        .reshape((n, c, oh, k, ow, k))?
        .max(5)?
        .max(3)
}
