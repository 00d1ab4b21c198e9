//! Batch normalisation in training mode (batch statistics over every axis but
//! the channel axis 1) as one fused op, forward and backward.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, sum2, with_values};

/// `(images, channels, values per channel per image)` of an `(N, C, ...)` shape.
fn split(dims: &[usize]) -> Result<(usize, usize, usize)> {
    if dims.len() < 2 {
        bail!("batch norm expects (N, C, ...), got {dims:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Per-channel `Σ f(x, y)` over the rows of channel `ch` of two `(n, c, inner)` arrays.
fn channel_sum(
    a: &[f32],
    b: &[f32],
    (n, c, inner): (usize, usize, usize),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n)
                .map(|i| {
                    let off = (i * c + ch) * inner;
                    sum2(&a[off..off + inner], &b[off..off + inner], &f) as f64
                })
                .sum()
        })
        .collect()
}

/// The fused op of `(x, gamma, beta)`; it carries the statistics it
/// normalises with: the batch's (training), or fixed running ones (inference).
struct BatchNormOp {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// The statistics are constants (inference), not functions of `x`.
    fixed: bool,
    /// A ReLU follows the normalisation (fused: one pass, one gradient).
    relu: bool,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "gradcast-batch-norm"
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
        let (x, gamma, beta) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (_, c, inner) = split(l1.dims())?;
        if gamma.len() != c || beta.len() != c || self.mean.len() != c {
            bail!("batch norm: parameters do not have {c} channels");
        }
        let scale: Vec<f32> = gamma.iter().zip(&self.invstd).map(|(g, s)| g * s).collect();
        let shift: Vec<f32> = (0..c)
            .map(|ch| beta[ch] - self.mean[ch] * scale[ch])
            .collect();
        let image = c * inner;
        // SAFETY: each chunk is one image, and the loop writes each of its
        // channel rows whole.
        let y = unsafe {
            super::par_fill(x.len(), image, |i, yi| {
                let xi = &x[i * image..][..image];
                for ch in 0..c {
                    let (s, t) = (scale[ch], shift[ch]);
                    let rows = yi[ch * inner..][..inner]
                        .iter_mut()
                        .zip(&xi[ch * inner..][..inner]);
                    if self.relu {
                        rows.for_each(|(y, x)| {
                            y.write((x * s + t).max(0.0));
                        });
                    } else {
                        rows.for_each(|(y, x)| {
                            y.write(x * s + t);
                        });
                    }
                }
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = super::Prof::new("bn-bwd", &x.dims());
        // Through the fused ReLU first: the gradient passes where the output is positive.
        let grad = if self.relu {
            let masked = with_values(res, |y| {
                with_values(grad, |dy| {
                    let mut out = vec![0f32; y.len()];
                    out.par_chunks_mut(1 << 16)
                        .zip(y.par_chunks(1 << 16).zip(dy.par_chunks(1 << 16)))
                        .for_each(|(o, (y, dy))| {
                            for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                                *o = if y > 0.0 { g } else { 0.0 };
                            }
                        });
                    Ok(out)
                })
            })?;
            Tensor::from_vec(masked, grad.shape(), grad.device())?
        } else {
            grad.clone()
        };
        let grad = &grad;
        let dims = split(x.dims())?;
        let (n, c, inner) = dims;
        let m = (n * inner) as f64;
        let (dx, dgamma, dbeta) = with_values(x, |x| {
            with_values(gamma, |gamma| {
                with_values(grad, |dy| {
                    let sdy = channel_sum(dy, dy, dims, |d, _| d);
                    let mean = &self.mean;
                    let sdyxc: Vec<f64> = {
                        // Σ dy·(x − mean), channel by channel.
                        (0..c)
                            .into_par_iter()
                            .map(|ch| {
                                let mu = mean[ch];
                                (0..n)
                                    .map(|i| {
                                        let off = (i * c + ch) * inner;
                                        sum2(&dy[off..off + inner], &x[off..off + inner], |d, v| {
                                            d * (v - mu)
                                        }) as f64
                                    })
                                    .sum()
                            })
                            .collect()
                    };
                    let mut k1 = vec![0f32; c];
                    let mut k2 = vec![0f32; c];
                    let mut k3 = vec![0f32; c];
                    let mut dgamma = vec![0f32; c];
                    for ch in 0..c {
                        let s = self.invstd[ch] as f64;
                        let g = gamma[ch] as f64;
                        k1[ch] = (g * s) as f32;
                        if !self.fixed {
                            k2[ch] = (-g * s * s * s * sdyxc[ch] / m) as f32;
                            k3[ch] = (-g * s * sdy[ch] / m) as f32;
                        }
                        dgamma[ch] = (sdyxc[ch] * s) as f32;
                    }
                    // dx = k1·dy + k2·(x − mean) + k3.
                    let mut dx = vec![0f32; x.len()];
                    if c * inner > 0 {
                        dx.par_chunks_mut(c * inner)
                            .zip(dy.par_chunks(c * inner))
                            .zip(x.par_chunks(c * inner))
                            .for_each(|((dxi, dyi), xi)| {
                                for ch in 0..c {
                                    let (a, b, d, mu) = (k1[ch], k2[ch], k3[ch], mean[ch]);
                                    let r = ch * inner..(ch + 1) * inner;
                                    for ((o, g), v) in
                                        dxi[r.clone()].iter_mut().zip(&dyi[r.clone()]).zip(&xi[r])
                                    {
                                        *o = a * g + b * (v - mu) + d;
                                    }
                                }
                            });
                    }
                    let dbeta: Vec<f32> = sdy.iter().map(|&v| v as f32).collect();
                    Ok((dx, dgamma, dbeta))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), dev)?),
            Some(Tensor::from_vec(dbeta, beta.shape(), dev)?),
        ))
    }
}

/// Training-mode batch normalisation of `x (N, C, ...)` with per-channel
/// `gamma` and `beta` `(C)`: returns the output, the batch mean and the biased
/// batch variance (both `(C)`, detached).
///
/// On the CPU this is one fused op with a closed-form backward; elsewhere it
/// is [`batch_norm_train_reference`].
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return batch_norm_train_reference(x, gamma, beta, eps, relu);
    }
    let x = x.contiguous()?;
    let dims = split(x.dims())?;
    let (n, c, inner) = dims;
    let count = (n * inner).max(1) as f64;
    let (mean, var) = with_values(&x, |v| {
        let mean: Vec<f64> = channel_sum(v, v, dims, |a, _| a)
            .into_iter()
            .map(|s| s / count)
            .collect();
        let var: Vec<f64> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mu = mean[ch] as f32;
                (0..n)
                    .map(|i| {
                        let row = &v[(i * c + ch) * inner..][..inner];
                        sum2(row, row, |x, _| (x - mu) * (x - mu)) as f64
                    })
                    .sum::<f64>()
                    / count
            })
            .collect();
        Ok((mean, var))
    })?;
    let invstd = var
        .iter()
        .map(|v| (1.0 / (v + eps).sqrt()) as f32)
        .collect();
    let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let var32: Vec<f32> = var.iter().map(|&v| v as f32).collect();
    let op = BatchNormOp {
        mean: mean32.clone(),
        invstd,
        fixed: false,
        relu,
    };
    let y = x.apply_op3(
        &gamma.flatten_all()?.contiguous()?,
        &beta.flatten_all()?.contiguous()?,
        op,
    )?;
    let dev = x.device();
    Ok((
        y,
        Tensor::from_vec(mean32, c, dev)?,
        Tensor::from_vec(var32, c, dev)?,
    ))
}

/// Inference-mode batch normalisation of `x (N, C, ...)` with fixed running
/// statistics `mean` and `var` `(C)`: one fused pass on the CPU, candle's
/// broadcast operations elsewhere.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return batch_norm_eval_reference(x, gamma, beta, mean, var, eps, relu);
    }
    let mean = with_values(mean, |m| Ok(m.to_vec()))?;
    let invstd = with_values(var, |v| {
        Ok(v.iter()
            .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
            .collect())
    })?;
    let op = BatchNormOp {
        mean,
        invstd,
        fixed: true,
        relu,
    };
    x.contiguous()?.apply_op3(
        &gamma.flatten_all()?.contiguous()?,
        &beta.flatten_all()?.contiguous()?,
        op,
    )
}

/// [`batch_norm_eval`] with candle's broadcast operations: one scale and
/// shift per channel.
pub fn batch_norm_eval_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let shape: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
    let shape = shape.as_slice();
    let scale = (gamma.reshape(shape)? / (var.reshape(shape)? + eps)?.sqrt()?)?;
    let shift = (beta.reshape(shape)? - mean.reshape(shape)?.mul(&scale)?)?;
    let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// [`batch_norm_train`] with candle's broadcast operations.
pub fn batch_norm_train_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rank = x.rank();
    let c = x.dim(1)?;
    let shape: Vec<usize> = (0..rank).map(|d| if d == 1 { c } else { 1 }).collect();
    let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
    let mean = x.mean_keepdim(dims.as_slice())?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(dims.as_slice())?;
    let xhat = centered.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = xhat
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}
