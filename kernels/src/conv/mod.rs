//! 2-D convolution (NCHW, kernel `(out, in, kh, kw)`, explicit asymmetric
//! zero padding), forward and backward: by the direct kernels of
//! [`super::direct`] on AVX-512 or AVX2 CPUs for stride-1 and stride-2 kernels over
//! 3+ input channels (stride 2 through phase planes, its input gradient in
//! [`phases`]), by nine (kh·kw) shifted gemms for the stride-1 shapes
//! elsewhere, and by im2col + gemm for the rest.

mod backward;
mod forward;
mod geom;
mod im2col;
mod phases;
mod plan;

pub(crate) use backward::{backward_values, Epilogue};
use forward::forward_residual;
pub(crate) use forward::forward_values;
pub(crate) use geom::{ConvPath, Geom};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_slice, with_values};

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
/// On the CPU this is the fast convolution op (direct AVX-512 or AVX2 kernels, or
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
