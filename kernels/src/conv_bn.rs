//! A convolution followed by training-mode BatchNorm (and a ReLU when
//! asked) as one op.
//!
//! Separately, the convolution's output `y` is a tensor of its own: candle's
//! autograd then materialises its gradient (BatchNorm's input gradient),
//! zero-fills an accumulator for it and adds the gradient in, and the
//! convolution's backward copies it once more into its own layout — four
//! passes over a tensor as large as the activations. Fused, the backward
//! computes BatchNorm's input gradient image by image, as the convolution's
//! backward asks for it, while it is in cache; `y` never leaves the op.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bn_rows::{self, Gate};
use super::conv::{backward_values, forward_values, gradient_tensors, Dy, Epilogue, Geom, Input};
use super::{batch_norm_train, conv2d_act, cpu_slice, with_values};

/// What the forward pass keeps for the backward pass.
pub(super) struct Saved {
    /// The convolution's output, before normalisation.
    pub(super) y: Vec<f32>,
    /// Its shape, `(n, c, oh, ow)`.
    pub(super) shape: Shape,
    pub(super) mean: Vec<f32>,
    pub(super) var: Vec<f32>,
    invstd: Vec<f32>,
    /// The normalisation as `y · scale + shift` per channel.
    pub(super) scale: Vec<f32>,
    pub(super) shift: Vec<f32>,
}

impl Saved {
    /// The op's output (with its ReLU, then times the `dropout` mask if
    /// any) as an input that still needs normalising: for a next layer that
    /// normalises as it loads.
    pub(super) fn as_input<'a>(&'a self, dropout: Option<&'a [f32]>) -> Input<'a> {
        Input::Normalized {
            v: &self.y,
            scale: &self.scale,
            shift: &self.shift,
            mask: dropout,
        }
    }
}

/// The fused op of `(x, kernel, [bias; gamma; beta])`.
pub(super) struct ConvBnOp {
    pub(super) stride: usize,
    pub(super) pad: [usize; 4],
    pub(super) input_grad: bool,
    pub(super) eps: f64,
    pub(super) relu: bool,
    pub(super) saved: Arc<Mutex<Option<Saved>>>,
}

/// What [`ConvBnOp::forward`] writes after the convolution and its statistics.
pub(super) enum Output<'a> {
    /// Nothing: a later layer normalises [`Saved::y`] itself ([`Saved::as_input`]).
    None,
    /// The normalised output (after the op's ReLU, if any).
    Normalized,
    /// `ReLU(normalised + r)`: a residual sum.
    AddRelu(&'a [f32]),
}

/// Which of the output gradient's values pass back through a ReLU.
#[derive(Clone, Copy)]
pub(super) enum Mask<'a> {
    /// All: no ReLU.
    None,
    /// Where these values (a later ReLU's output) are positive.
    Values(&'a [f32]),
    /// Where the op's own ReLU passed, recomputed from its saved `y`.
    Own,
}

/// Per-channel mean and biased variance over all images, from each image's
/// `(mean, Σ (v − mean)²)` of its `p` values per channel (Chan et al.'s
/// pairwise combination, in `f64`).
fn combine(stats: &[[f64; 2]], (n, c, p): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let count = (n * p).max(1) as f64;
    (0..c)
        .map(|ch| {
            let per = || (0..n).map(|i| stats[i * c + ch]);
            let mean = per().map(|[m, _]| m * p as f64).sum::<f64>() / count;
            let m2: f64 = per()
                .map(|[m, q]| q + p as f64 * (m - mean) * (m - mean))
                .sum();
            (mean, m2 / count)
        })
        .unzip()
}

/// `Σ_i f(i, ch)` for every channel `ch < c` over the images `i < n`,
/// each channel's terms added from zero and in image order: the sums (and
/// the bits of everything made from them) do not depend on the number of
/// threads or on how rayon split the work. Each thread takes a run of
/// channels and walks the images in memory order (one image's rows of
/// those channels are contiguous), so the rows of a tensor are read as one
/// stream rather than a row from every image in turn.
fn image_order_sums(
    (n, c): (usize, usize),
    f: impl Fn(usize, usize) -> (f64, f64) + Sync,
) -> Vec<[f64; 2]> {
    let mut sums = vec![[0f64; 2]; c];
    let run = c.div_ceil(super::threads()).max(1);
    sums.par_chunks_mut(run).enumerate().for_each(|(r, block)| {
        for i in 0..n {
            for (j, acc) in block.iter_mut().enumerate() {
                let (s, t) = f(i, r * run + j);
                *acc = [acc[0] + s, acc[1] + t];
            }
        }
    });
    sums
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("conv-bn: poisoned".into())
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "gradcast-conv-bn"
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
        let (x, w, params) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let x = (Input::Plain(x), l1.dims());
        let (z, shape) = self.forward(x, (w, l2.dims()), params, Output::Normalized)?;
        let Some(z) = z else {
            bail!("conv-bn: no output")
        };
        Ok((CpuStorage::F32(z), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mask = if self.relu { Mask::Own } else { Mask::None };
        let (dx, dw, dparams) = with_values(x, |xv| {
            with_values(w, |wv| {
                with_values(params, |pv| {
                    let (x, w) = ((Input::Plain(xv), x.dims()), (wv, w.dims()));
                    self.gradients(x, w, pv, mask, grad, None)
                })
            })
        })?;
        gradient_tensors((x, dx), (w, dw), (dparams, params.shape().clone()))
    }
}

impl ConvBnOp {
    /// The convolution of `x` (values and dims) with the kernel `w` (values
    /// and dims) and the bias in `params` (`[bias; gamma; beta]`), its batch
    /// statistics kept for the backward pass and the batch mean and
    /// variance, and then what `out` asks for. Returns that output (if any)
    /// and the output's shape.
    pub(super) fn forward(
        &self,
        (x, xdims): (Input, &[usize]),
        (w, wdims): (&[f32], &[usize]),
        params: &[f32],
        out: Output,
    ) -> Result<(Option<Vec<f32>>, Shape)> {
        let g = Geom::new(xdims, wdims, self.stride, self.pad)?;
        let _t = super::Prof::new("conv-bn-fwd", &g);
        let (c, p) = (g.cout, g.p());
        if params.len() != 3 * c {
            bail!("conv-bn: expected bias, gamma and beta of {c} channels");
        }
        let (bias, gamma, beta) = (&params[..c], &params[c..2 * c], &params[2 * c..]);
        let (y, stats) = forward_values(&g, x, w, bias, false, true)?;
        let (mean, var) = combine(&stats, (g.n, c, p));
        let invstd: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (v + self.eps).sqrt()) as f32)
            .collect();
        let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let scale: Vec<f32> = gamma.iter().zip(&invstd).map(|(g, s)| g * s).collect();
        let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
        if let Output::AddRelu(r) = out {
            if r.len() != y.len() {
                bail!("conv-bn: a residual of {} values for {}", r.len(), y.len());
            }
        }
        let z = match out {
            Output::None => None,
            Output::Normalized | Output::AddRelu(_) if c * p == 0 => Some(Vec::new()),
            Output::Normalized | Output::AddRelu(_) => {
                // SAFETY: each chunk is one image, and the loop writes each
                // of its channel rows whole.
                let z = unsafe {
                    super::par_fill(y.len(), c * p, |i, zi| {
                        let yi = &y[i * c * p..][..c * p];
                        for ch in 0..c {
                            let (s, t) = (scale[ch], shift[ch]);
                            let rows = zi[ch * p..][..p].iter_mut().zip(&yi[ch * p..][..p]);
                            match out {
                                Output::AddRelu(r) => {
                                    let r = &r[(i * c + ch) * p..][..p];
                                    rows.zip(r).for_each(|((z, y), r)| {
                                        z.write((y * s + t + r).max(0.0));
                                    });
                                }
                                _ if self.relu => rows.for_each(|(z, y)| {
                                    z.write((y * s + t).max(0.0));
                                }),
                                _ => rows.for_each(|(z, y)| {
                                    z.write(y * s + t);
                                }),
                            }
                        }
                    })
                };
                Some(z)
            }
        };
        let var = var.iter().map(|&v| v as f32).collect();
        let shape = Shape::from_dims(&[g.n, c, g.oh, g.ow]);
        *self.saved.lock().map_err(|_| poisoned())? = Some(Saved {
            y,
            shape: shape.clone(),
            mean,
            var,
            invstd,
            scale,
            shift,
        });
        Ok((z, shape))
    }

    /// The gradients of `(x, kernel, params)` given the gradient of the
    /// output, `grad`, through `mask`; `x` is the forward's input (values
    /// and dims). Each image of the input gradient goes through `after`
    /// as it is made.
    #[allow(clippy::type_complexity)]
    pub(super) fn gradients(
        &self,
        (x, xdims): (Input, &[usize]),
        (wv, wdims): (&[f32], &[usize]),
        pv: &[f32],
        mask: Mask,
        grad: &Tensor,
        after: Option<Epilogue>,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>, Vec<f32>)> {
        let g = Geom::new(xdims, wdims, self.stride, self.pad)?;
        let _t = super::Prof::new("conv-bn-bwd", &g);
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = saved.as_ref() else {
            bail!("conv-bn: backward before forward")
        };
        let (n, c, p) = (g.n, g.cout, g.p());
        let m = (n * p) as f64;
        if pv.len() != 3 * g.cout {
            bail!(
                "conv-bn: expected bias, gamma and beta of {} channels",
                g.cout
            );
        }
        with_values(grad, |dz| {
            let (y, mean) = (&saved.y, &saved.mean);
            let masked_len = match mask {
                Mask::Values(z) => z.len(),
                _ => y.len(),
            };
            if dz.len() != y.len() || masked_len != y.len() {
                bail!(
                    "conv-bn backward: gradient of {} values for {}",
                    dz.len(),
                    y.len()
                );
            }
            // The gate of the row at `off` in channel `ch`.
            let gate = |off: usize, ch: usize| match mask {
                Mask::None => Gate::All,
                Mask::Values(z) => Gate::Values(&z[off..][..p]),
                Mask::Own => Gate::Affine(saved.scale[ch], saved.shift[ch]),
            };
            // Σ dz and Σ dz·(y − mean) per channel (after the
            // ReLU's mask), image by image in memory order.
            let row = |off: usize, ch: usize| {
                bn_rows::sums(gate(off, ch), &dz[off..][..p], &y[off..][..p], mean[ch])
            };
            let sums_timer = super::Prof::new("conv-bn-sums", &g);
            let sums = image_order_sums((n, c), |i, ch| row((i * c + ch) * p, ch));
            drop(sums_timer);
            let sdz: Vec<f64> = sums.iter().map(|s| s[0]).collect();
            let sdzy: Vec<f64> = sums.iter().map(|s| s[1]).collect();
            let gamma = &pv[c..2 * c];
            let mut k = vec![[0f32; 3]; c];
            let mut dgamma = vec![0f32; c];
            for ch in 0..c {
                let s = saved.invstd[ch] as f64;
                let gm = gamma[ch] as f64;
                k[ch] = [
                    (gm * s) as f32,
                    (-gm * s * s * s * sdzy[ch] / m) as f32,
                    (-gm * s * sdz[ch] / m) as f32,
                ];
                dgamma[ch] = (sdzy[ch] * s) as f32;
            }
            // BatchNorm's input gradient of image i:
            // k1·dz + k2·(y − mean) + k3.
            let make = |i: usize, out: &mut [f32]| {
                for ch in 0..c {
                    let off = (i * c + ch) * p;
                    bn_rows::input_grad(
                        gate(off, ch),
                        &dz[off..][..p],
                        &y[off..][..p],
                        mean[ch],
                        k[ch],
                        &mut out[ch * p..][..p],
                    );
                }
            };
            let (dx, dw, db) = backward_values(&g, x, wv, Dy::Make(&make), self.input_grad, after)?;
            let mut dparams = db;
            dparams.extend_from_slice(&dgamma);
            dparams.extend(sdz.iter().map(|&v| v as f32));
            Ok((dx, dw, dparams))
        })
    }
}

/// The batch mean and biased batch variance a conv + BN op's forward kept,
/// as `(C)` tensors on `dev`.
pub(super) fn batch_stats(saved: &Mutex<Option<Saved>>, dev: &Device) -> Result<(Tensor, Tensor)> {
    let s = saved.lock().map_err(|_| poisoned())?;
    let Some(s) = s.as_ref() else {
        bail!("conv-bn: the forward pass kept no statistics")
    };
    let c = s.mean.len();
    Ok((
        Tensor::from_slice(&s.mean, c, dev)?,
        Tensor::from_slice(&s.var, c, dev)?,
    ))
}

/// Convolution of `x` with `w` plus `bias`, then training-mode batch
/// normalisation with `gamma` and `beta` (then a ReLU when `relu`): returns
/// the output, the batch mean and the biased batch variance of the
/// convolution's output (both `(C)`, detached).
///
/// On the CPU this is one fused op; elsewhere [`conv2d_act`] then
/// [`batch_norm_train`]. `input_grad: false` skips the gradient of `x`.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    stride: usize,
    pad: [usize; 4],
    input_grad: bool,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        let y = conv2d_act(x, w, Some(bias), stride, pad, input_grad, false)?;
        return batch_norm_train(&y, gamma, beta, eps, relu);
    }
    let params = Tensor::cat(
        &[
            bias.flatten_all()?,
            gamma.flatten_all()?,
            beta.flatten_all()?,
        ],
        0,
    )?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnOp {
        stride,
        pad,
        input_grad,
        eps,
        relu,
        saved: saved.clone(),
    };
    let z = x.contiguous()?.apply_op3(&w.contiguous()?, &params, op)?;
    let (mean, var) = batch_stats(&saved, x.device())?;
    Ok((z, mean, var))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums are the plain image-order sums on any number of threads,
    /// with terms whose order matters (1e17 + 1 − 1e17 is 0 one way, 1
    /// another): the result does not depend on how the work was split.
    #[test]
    fn channel_sums_add_the_images_in_order_on_any_number_of_threads() {
        let (n, c) = (97, 3);
        let term = |i: usize, ch: usize| -> (f64, f64) {
            let big = if i.is_multiple_of(2) { 1e17 } else { -1e17 };
            (
                big + (i * c + ch) as f64,
                (i as f64 + 0.1).sqrt() * (ch as f64 + 1.0),
            )
        };
        let mut expected = vec![[0f64; 2]; c];
        for i in 0..n {
            for (ch, e) in expected.iter_mut().enumerate() {
                let (a, b) = term(i, ch);
                e[0] += a;
                e[1] += b;
            }
        }
        let bits = |s: &[[f64; 2]]| s.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let sums = pool.install(|| image_order_sums((n, c), term));
            assert_eq!(bits(&sums), bits(&expected), "{threads} threads");
        }
        assert!(image_order_sums((4, 0), term).is_empty());
    }
}
