//! A convolution, its ReLU and a 2×2 max-pool as one op.
//!
//! Separately, the pool's gradient is a tensor as large as the convolution's
//! output, which candle's autograd zero-fills, adds into and hands to the
//! convolution's backward: for simple-cnn's second layer, 26 MB at batch 128,
//! four passes. Fused, the forward keeps one byte per pooled value, which of
//! its window's four positions the maximum came from (or none, where the
//! maximum is not positive and the ReLU stops the gradient), and the
//! convolution's backward makes its output gradient image by image from it.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{backward_values, forward_values, gradient_tensors, Dy, Geom, Input};
use super::pool::first_max_2x2;
use super::{conv2d_act, cpu_slice, max_pool2d, with_values};

/// The code of a window whose gradient goes nowhere.
const NONE: u8 = 4;

/// The fused op of `(x, kernel, bias)`.
struct ConvReluPoolOp {
    stride: usize,
    pad: [usize; 4],
    input_grad: bool,
    /// Per pooled value, the window position (row-major, 0–3) of its first
    /// maximum, or [`NONE`].
    codes: Mutex<Option<Vec<u8>>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("conv-relu-pool: poisoned".into())
}

/// 2×2 max-pool (floor) of one `h × w` plane of ReLU outputs into `out`
/// (`⌊h/2⌋ × ⌊w/2⌋`), with each window's code: the position of the maximum
/// that [`super::max_pool2d`] routes the gradient to ([`first_max_2x2`]).
fn pool_plane(y: &[f32], w: usize, out: &mut [f32], codes: &mut [u8]) {
    let pw = w / 2;
    if pw == 0 {
        return;
    }
    for (py, (orow, crow)) in out
        .chunks_exact_mut(pw)
        .zip(codes.chunks_exact_mut(pw))
        .enumerate()
    {
        let (r0, r1) = (&y[2 * py * w..][..2 * pw], &y[(2 * py + 1) * w..][..2 * pw]);
        for px in 0..pw {
            let window = [r0[2 * px], r0[2 * px + 1], r1[2 * px], r1[2 * px + 1]];
            let (best, at) = first_max_2x2(window);
            orow[px] = best;
            crow[px] = if best > 0.0 { at as u8 } else { NONE };
        }
    }
}

/// The inverse of [`pool_plane`] for gradients: `plane` (`h × w`, every
/// value written) gets each window's pooled gradient `dp` at the position
/// its code names and zero at the other three (all four for [`NONE`]), and
/// zero in the last row and column an odd size leaves outside the windows.
/// Window by window, row pair by row pair, with selects instead of
/// branches: one pass over the plane instead of a fill, then a scatter
/// with a division per pooled value to find its row and column.
fn unpool_plane(codes: &[u8], dp: &[f32], w: usize, plane: &mut [f32]) {
    let pw = w / 2;
    let ph = codes.len().checked_div(pw).unwrap_or(0);
    assert!(codes.len() == ph * pw && dp.len() == codes.len() && plane.len() >= 2 * ph * w);
    let pick = |code: u8, at: u8, v: f32| if code == at { v } else { 0.0 };
    for (py, rows) in plane.chunks_exact_mut(2 * w).take(ph).enumerate() {
        let (top, bottom) = rows.split_at_mut(w);
        let (c, d) = (&codes[py * pw..][..pw], &dp[py * pw..][..pw]);
        for (((t, b), &code), &v) in top
            .chunks_exact_mut(2)
            .zip(bottom.chunks_exact_mut(2))
            .zip(c)
            .zip(d)
        {
            t[0] = pick(code, 0, v);
            t[1] = pick(code, 1, v);
            b[0] = pick(code, 2, v);
            b[1] = pick(code, 3, v);
        }
        top[2 * pw..].fill(0.0);
        bottom[2 * pw..].fill(0.0);
    }
    plane[2 * ph * w..].fill(0.0);
}

impl CustomOp3 for ConvReluPoolOp {
    fn name(&self) -> &'static str {
        "gradcast-conv-relu-pool"
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
        let _t = super::Prof::new("conv-relu-pool-fwd", &g);
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (y, _) = forward_values(&g, Input::Plain(x), w, b, true, false)?;
        let (ph, pw) = (g.oh / 2, g.ow / 2);
        let planes = g.n * g.cout;
        let mut pooled = vec![0f32; planes * ph * pw];
        let mut codes = vec![NONE; planes * ph * pw];
        if ph * pw > 0 {
            pooled
                .par_chunks_mut(ph * pw)
                .zip(codes.par_chunks_mut(ph * pw))
                .zip(y.par_chunks(g.p()))
                .for_each(|((out, codes), y)| pool_plane(y, g.ow, out, codes));
        }
        *self.codes.lock().map_err(|_| poisoned())? = Some(codes);
        let shape = Shape::from_dims(&[g.n, g.cout, ph, pw]);
        Ok((CpuStorage::F32(pooled), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
        let _t = super::Prof::new("conv-relu-pool-bwd", &g);
        let codes = self.codes.lock().map_err(|_| poisoned())?;
        let Some(codes) = codes.as_ref() else {
            bail!("conv-relu-pool: backward before forward")
        };
        let (ph, pw, ow, p) = (g.oh / 2, g.ow / 2, g.ow, g.p());
        let (dx, dw, db) = with_values(x, |xv| {
            with_values(w, |wv| {
                with_values(grad, |dp| {
                    if dp.len() != codes.len() {
                        bail!(
                            "conv-relu-pool backward: gradient of {} values for {}",
                            dp.len(),
                            codes.len()
                        );
                    }
                    // The convolution's output gradient of image i: each
                    // pooled gradient at its window's maximum, zero elsewhere.
                    let make = |i: usize, out: &mut [f32]| {
                        for ch in 0..g.cout {
                            let at = (i * g.cout + ch) * ph * pw;
                            let (codes, dp) = (&codes[at..][..ph * pw], &dp[at..][..ph * pw]);
                            unpool_plane(codes, dp, ow, &mut out[ch * p..][..p]);
                        }
                    };
                    let x = Input::Plain(xv);
                    backward_values(&g, x, wv, Dy::Make(&make), self.input_grad, None)
                })
            })
        })?;
        gradient_tensors((x, dx), (w, dw), (db, b.shape().clone()))
    }
}

/// `MaxPool2(ReLU(conv(x, w) + bias))` (2×2 windows, floor): on the CPU one
/// fused op, elsewhere the convolution then candle's pooling.
/// `input_grad: false` skips the gradient of `x`.
pub fn conv2d_relu_pool(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: [usize; 4],
    input_grad: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        let y = conv2d_act(x, w, Some(bias), stride, pad, input_grad, true)?;
        return max_pool2d(&y, 2);
    }
    let op = ConvReluPoolOp {
        stride,
        pad,
        input_grad,
        codes: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &bias.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of the plane is written (it starts as NaN): the pooled
    /// gradient at its code's position, zero elsewhere, zero in an odd
    /// size's last row and column; as the plain scatter would.
    #[test]
    fn unpool_plane_writes_every_value_where_the_codes_say() {
        for (h, w) in [(4, 4), (5, 7), (2, 3), (3, 2), (1, 1)] {
            let (ph, pw) = (h / 2, w / 2);
            let codes: Vec<u8> = (0..ph * pw).map(|i| (i * 3 % 5) as u8).collect();
            let dp: Vec<f32> = (0..ph * pw).map(|i| i as f32 + 0.5).collect();
            let mut plane = vec![f32::NAN; h * w];
            unpool_plane(&codes, &dp, w, &mut plane);
            let mut expected = vec![0f32; h * w];
            for (o, (&c, &d)) in codes.iter().zip(&dp).enumerate() {
                if c != NONE {
                    let (py, px) = (o / pw, o % pw);
                    let (dy, dx) = (usize::from(c / 2), usize::from(c % 2));
                    expected[(2 * py + dy) * w + 2 * px + dx] = d;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plane), bits(&expected), "{h}x{w}");
        }
    }
}
