//! A run of ResNet v1 residual blocks in training mode as one op.
//!
//! Block `k` computes `z = ReLU(s(x) + BN₂(conv₂(Dropout(ReLU(BN₁(conv₁
//! x))))))` with `s` the identity, or a 1×1 strided convolution where the
//! block changes the map's size (a projection shortcut), and the dropout
//! only in the `-dropout` models.
//!
//! The first layer's normalised output is never written: the second
//! convolution loads the first's raw output and applies its BatchNorm, ReLU
//! and dropout mask on the way in, forward and backward (`Input::Normalized`),
//! and the first layer's ReLU mask is recomputed from that raw output. As
//! separate candle ops,
//! every tensor between them gets its gradient the way candle's autograd
//! accumulates gradients: a `zeros_like`, then an `add` of the contribution
//! into it, three passes over an activation-sized tensor per input of every
//! op. Inside one op the gradients pass from one layer's backward to the
//! next as they are: per block, the second layer reads the block's output
//! gradient through the sum's ReLU mask, the first layer's input gradient
//! gets the shortcut's gradient added in place, and that is the gradient of
//! the block before.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::conv::{backward_values, forward_values, Dy, Epilogue, Geom, Input};
use super::conv_bn::{ConvBnOp, Mask, Output, Saved};
use super::with_values;

/// A BatchNorm layer's batch mean and biased batch variance, `(C)` each.
pub(crate) type BatchStats = (Tensor, Tensor);

/// One conv + BN layer of a block: kernel, bias, gamma, beta, stride and
/// zero padding `[top, bottom, left, right]`.
pub(crate) struct ConvBnLayer<'a> {
    pub w: &'a Tensor,
    pub bias: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub stride: usize,
    pub pad: [usize; 4],
}

/// One residual block's tensors: its two layers, for a projection shortcut
/// that convolution's kernel, bias, stride and padding, and the dropout
/// between the two layers as `(rate, seed)` (the mask of
/// [`super::dropout::dropout_mask`]).
pub(crate) struct BlockLayers<'a> {
    pub first: ConvBnLayer<'a>,
    pub second: ConvBnLayer<'a>,
    pub shortcut: Option<(&'a Tensor, &'a Tensor, usize, [usize; 4])>,
    pub dropout: Option<(f32, u64)>,
}

/// A projection shortcut's convolution.
struct Shortcut {
    stride: usize,
    pad: [usize; 4],
    kernel: Shape,
}

/// One block of the op: where its tensors sit in the op's flat kernel and
/// parameter inputs, and its layers.
struct Block {
    first: ConvBnOp,
    second: ConvBnOp,
    shortcut: Option<Shortcut>,
    /// Kernel shapes of the two layers.
    kernels: [Shape; 2],
    /// Dropout between the layers: rate and seed.
    dropout: Option<(f32, u64)>,
    /// Output channels.
    c: usize,
}

impl Block {
    /// Values of this block in the flat kernel input.
    fn kernel_len(&self) -> usize {
        self.kernels[0].elem_count()
            + self.kernels[1].elem_count()
            + self.shortcut.as_ref().map_or(0, |s| s.kernel.elem_count())
    }

    /// Values of this block in the flat parameter input: the two layers'
    /// bias, gamma and beta, then the shortcut's bias.
    fn params_len(&self) -> usize {
        6 * self.c + self.shortcut.as_ref().map_or(0, |_| self.c)
    }
}

/// What one block keeps from its forward pass for its backward pass (the
/// first layer's output is not among it: the second layer normalises the
/// first's saved convolution output as it loads it, forward and backward).
struct Kept {
    /// The block's output (but the last block's, which is the op's output).
    z: Option<Tensor>,
    /// The dropout mask between the layers.
    mask: Option<Vec<f32>>,
    /// The layers' kernels and parameters, and the shortcut's kernel and bias.
    w: [Tensor; 2],
    p: [Tensor; 2],
    shortcut: Option<(Tensor, Tensor)>,
}

/// The op of `(x, kernels, params)`: every block's kernels flattened one
/// after the other (first, second, shortcut), and their parameters likewise.
struct StackOp {
    blocks: Vec<Block>,
    kept: Mutex<Vec<Kept>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("residual blocks: poisoned".into())
}

/// Locks a layer's saved forward state.
fn lock(saved: &Mutex<Option<Saved>>) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
    saved.lock().map_err(|_| poisoned())
}

impl CustomOp3 for StackOp {
    fn name(&self) -> &'static str {
        "gradcast-residual-blocks"
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
        let (w, params) = (super::cpu_slice(s2, l2)?, super::cpu_slice(s3, l3)?);
        let want: (usize, usize) = self
            .blocks
            .iter()
            .fold((0, 0), |(a, b), k| (a + k.kernel_len(), b + k.params_len()));
        if (w.len(), params.len()) != want {
            bail!(
                "residual blocks: expected {} kernel values and {} parameters, got {} and {}",
                want.0,
                want.1,
                w.len(),
                params.len()
            );
        }
        let cpu = &Device::Cpu;
        let mut kept: Vec<Kept> = Vec::with_capacity(self.blocks.len());
        let (mut wo, mut po) = (0, 0);
        let mut take = |len: usize, from_params: bool, shape: Shape| -> Result<Tensor> {
            let (src, at) = if from_params {
                (params, &mut po)
            } else {
                (w, &mut wo)
            };
            let t = Tensor::from_slice(&src[*at..*at + len], shape, cpu)?;
            *at += len;
            Ok(t)
        };
        let mut out = None;
        for (k, b) in self.blocks.iter().enumerate() {
            let w1 = take(b.kernels[0].elem_count(), false, b.kernels[0].clone())?;
            let w2 = take(b.kernels[1].elem_count(), false, b.kernels[1].clone())?;
            let ws = match &b.shortcut {
                Some(s) => Some(take(s.kernel.elem_count(), false, s.kernel.clone())?),
                None => None,
            };
            let p1 = take(3 * b.c, true, (3 * b.c).into())?;
            let p2 = take(3 * b.c, true, (3 * b.c).into())?;
            let bs = match &b.shortcut {
                Some(_) => Some(take(b.c, true, b.c.into())?),
                None => None,
            };
            let shortcut = match (&b.shortcut, ws, bs) {
                (Some(sc), Some(ws), Some(bs)) => Some((sc, ws, bs)),
                _ => None,
            };
            // The block's input: the op's, or the previous block's output.
            let run = |x: &[f32], xdims: &[usize]| -> Result<(Vec<f32>, Shape, Option<Vec<f32>>)> {
                let (wv, pv) = (w1.flatten_all()?, p1.flatten_all()?);
                let (_, hshape) = with_values(&wv, |wv| {
                    with_values(&pv, |pv| {
                        let k = (wv, b.kernels[0].dims());
                        b.first
                            .forward((Input::Plain(x), xdims), k, pv, Output::None)
                    })
                })?;
                let mask = b
                    .dropout
                    .map(|(p, seed)| super::dropout::dropout_mask(hshape.elem_count(), p, seed));
                // s(x): the shortcut's convolution, or x itself.
                let projected = match &shortcut {
                    Some((sc, ws, bs)) => {
                        let g = Geom::new(xdims, ws.dims(), sc.stride, sc.pad)?;
                        let (s, _) = with_values(ws, |wv| {
                            with_values(bs, |bv| {
                                forward_values(&g, Input::Plain(x), wv, bv, false, false)
                            })
                        })?;
                        Some(s)
                    }
                    None => None,
                };
                let s = projected.as_deref().unwrap_or(x);
                // z = ReLU(BN₂(conv₂ h) + s(x)), h normalised as it is loaded.
                let first = lock(&b.first.saved)?;
                let Some(h) = first.as_ref() else {
                    bail!("residual blocks: the first layer kept nothing")
                };
                let (z, shape) = with_values(&w2, |wv| {
                    with_values(&p2, |pv| {
                        let k = (wv, b.kernels[1].dims());
                        let h = (h.as_input(mask.as_deref()), hshape.dims());
                        b.second.forward(h, k, pv, Output::AddRelu(s))
                    })
                })?;
                let Some(z) = z else {
                    bail!("residual blocks: no output")
                };
                Ok((z, shape, mask))
            };
            let (z, shape, mask) = match kept.last() {
                Some(prev) => {
                    let Some(x) = &prev.z else {
                        bail!("residual blocks: the previous output is missing")
                    };
                    with_values(x, |v| run(v, x.dims()))?
                }
                None => run(super::cpu_slice(s1, l1)?, l1.dims())?,
            };
            let last = k + 1 == self.blocks.len();
            // The last output is the op's: candle keeps it (and hands it to `bwd`).
            let z = if last {
                out = Some((z, shape));
                None
            } else {
                Some(Tensor::from_vec(z, shape, cpu)?)
            };
            kept.push(Kept {
                z,
                mask,
                w: [w1, w2],
                p: [p1, p2],
                shortcut: shortcut.map(|(_, ws, bs)| (ws, bs)),
            });
        }
        *self.kept.lock().map_err(|_| poisoned())? = kept;
        let Some((z, shape)) = out else {
            bail!("residual blocks: no blocks")
        };
        Ok((CpuStorage::F32(z), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self.kept.lock().map_err(|_| poisoned())?;
        if kept.len() != self.blocks.len() {
            bail!("residual blocks: backward before forward");
        }
        let dev = x.device();
        // Per block, its kernel and parameter gradients (in forward order once reversed).
        let mut dws: Vec<Vec<f32>> = Vec::with_capacity(self.blocks.len());
        let mut dps: Vec<Vec<f32>> = Vec::with_capacity(self.blocks.len());
        let mut g = grad.clone();
        let mut dx_out = None;
        for (k, b) in self.blocks.iter().enumerate().rev() {
            let s = &kept[k];
            let missing =
                || candle_core::Error::Msg("residual blocks: an output is missing".into());
            let xk = if k == 0 {
                x
            } else {
                kept[k - 1].z.as_ref().ok_or_else(missing)?
            };
            let zk = s.z.as_ref().unwrap_or(res);
            // The second layer: its input is the first layer's output,
            // normalised from the first's saved state as it is loaded.
            let (dh, dw2, dp2, hshape) = {
                let first = lock(&b.first.saved)?;
                let Some(h) = first.as_ref() else {
                    bail!("residual blocks: backward before forward")
                };
                let hin = (h.as_input(s.mask.as_deref()), h.shape.dims());
                // The dropout's backward on each image of the second layer's
                // input gradient, as it is made.
                let len = h.shape.elem_count() / h.shape.dims()[0].max(1);
                let dropout = |i: usize, dhi: &mut [f32]| {
                    if let Some(m) = &s.mask {
                        dhi.iter_mut()
                            .zip(&m[i * len..][..len])
                            .for_each(|(d, m)| *d *= m);
                    }
                };
                let after = s.mask.as_ref().map(|_| &dropout as Epilogue);
                let (dh, dw2, dp2) = with_values(zk, |z| {
                    b.second
                        .gradients(hin, &s.w[1], &s.p[1], Mask::Values(z), &g, after)
                })?;
                (dh, dw2, dp2, h.shape.clone())
            };
            let Some(dh) = dh else {
                bail!("residual blocks: no gradient for the inner activation")
            };
            let dh = Tensor::from_vec(dh, hshape, dev)?;
            let input_grad = k > 0 || b.first.input_grad;
            // The shortcut's gradients first (a projection's backward), so
            // that the first layer adds the shortcut's share of the input
            // gradient to each image of its own as it makes it.
            let (dxs, shortcut_grads) = match (&b.shortcut, &s.shortcut) {
                (Some(sc), Some((ws, _))) => {
                    let geom = Geom::new(xk.dims(), ws.dims(), sc.stride, sc.pad)?;
                    let (dxs, dwsc, dbs) = with_values(xk, |xv| {
                        with_values(ws, |wv| {
                            with_values(zk, |z| {
                                with_values(&g, |gv| {
                                    let len = z.len() / geom.n.max(1);
                                    // The sum's gradient, through its ReLU mask.
                                    let masked = |i: usize, out: &mut [f32]| {
                                        let (z, gv) = (&z[i * len..][..len], &gv[i * len..][..len]);
                                        for ((o, &z), &g) in out.iter_mut().zip(z).zip(gv) {
                                            *o = if z > 0.0 { g } else { 0.0 };
                                        }
                                    };
                                    let (xv, dy) = (Input::Plain(xv), Dy::Make(&masked));
                                    backward_values(&geom, xv, wv, dy, input_grad, None)
                                })
                            })
                        })
                    })?;
                    (dxs, Some((dwsc, dbs)))
                }
                _ => (None, None),
            };
            let (dx, mut dw, mut dp) = with_values(xk, |xv| {
                with_values(zk, |z| {
                    with_values(&g, |gv| {
                        let len = xv.len() / xk.dims()[0].max(1);
                        // dx_i += s's gradient: the projection's, or the
                        // sum's gradient through its ReLU mask.
                        let add = |i: usize, dxi: &mut [f32]| {
                            let at = i * len..(i + 1) * len;
                            match &dxs {
                                Some(dxs) => {
                                    dxi.iter_mut().zip(&dxs[at]).for_each(|(d, s)| *d += s)
                                }
                                None => {
                                    let (z, g) = (&z[at.clone()], &gv[at]);
                                    for ((d, &z), &g) in dxi.iter_mut().zip(z).zip(g) {
                                        // (A select, not a branch: the mask is random.)
                                        *d += if z > 0.0 { g } else { 0.0 };
                                    }
                                }
                            }
                        };
                        if z.len() != xv.len() && dxs.is_none() {
                            bail!("residual blocks: the shortcut needs the output's shape");
                        }
                        let xin = (Input::Plain(xv), xk.dims());
                        b.first
                            .gradients(xin, &s.w[0], &s.p[0], Mask::Own, &dh, Some(&add))
                    })
                })
            })?;
            dw.extend_from_slice(&dw2);
            dp.extend_from_slice(&dp2);
            if let Some((dwsc, dbs)) = shortcut_grads {
                dw.extend_from_slice(&dwsc);
                dp.extend_from_slice(&dbs);
            }
            dws.push(dw);
            dps.push(dp);
            match dx {
                Some(dx) if k > 0 => g = Tensor::from_vec(dx, xk.shape(), dev)?,
                Some(dx) => dx_out = Some(Tensor::from_vec(dx, x.shape(), dev)?),
                None if k > 0 => bail!("residual blocks: no gradient between blocks"),
                None => {}
            }
        }
        let dw: Vec<f32> = dws.into_iter().rev().flatten().collect();
        let dp: Vec<f32> = dps.into_iter().rev().flatten().collect();
        Ok((
            dx_out,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(dp, params.shape(), dev)?),
        ))
    }
}

/// A run of ResNet v1 residual blocks in training mode, as one op on the
/// CPU. Returns the last block's output and every BatchNorm layer's batch
/// statistics, two per block in order. `None` where the fused op does not
/// apply (not on the CPU, not f32), for the caller to compose the layers.
pub(crate) fn residual_blocks_train(
    x: &Tensor,
    blocks: &[BlockLayers],
    eps: f64,
) -> Result<Option<(Tensor, Vec<BatchStats>)>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || blocks.is_empty() {
        return Ok(None);
    }
    let op = |l: &ConvBnLayer, relu: bool, input_grad: bool| ConvBnOp {
        stride: l.stride,
        pad: l.pad,
        input_grad,
        eps,
        relu,
        saved: Arc::new(Mutex::new(None)),
    };
    let mut ops = Vec::with_capacity(blocks.len());
    let (mut kernels, mut params) = (Vec::new(), Vec::new());
    for (k, b) in blocks.iter().enumerate() {
        let input_grad = k > 0 || x.track_op();
        ops.push(Block {
            first: op(&b.first, true, input_grad),
            second: op(&b.second, false, true),
            shortcut: b.shortcut.map(|(w, _, stride, pad)| Shortcut {
                stride,
                pad,
                kernel: w.shape().clone(),
            }),
            kernels: [b.first.w.shape().clone(), b.second.w.shape().clone()],
            dropout: b.dropout,
            c: b.second.gamma.elem_count(),
        });
        kernels.extend([b.first.w.flatten_all()?, b.second.w.flatten_all()?]);
        for l in [&b.first, &b.second] {
            params.extend([
                l.bias.flatten_all()?,
                l.gamma.flatten_all()?,
                l.beta.flatten_all()?,
            ]);
        }
        if let Some((w, bias, _, _)) = b.shortcut {
            kernels.push(w.flatten_all()?);
            params.push(bias.flatten_all()?);
        }
    }
    let saved: Vec<Arc<Mutex<Option<Saved>>>> = ops
        .iter()
        .flat_map(|b| [b.first.saved.clone(), b.second.saved.clone()])
        .collect();
    let op = StackOp {
        blocks: ops,
        kept: Mutex::new(Vec::new()),
    };
    let z = x
        .contiguous()?
        .apply_op3(&Tensor::cat(&kernels, 0)?, &Tensor::cat(&params, 0)?, op)?;
    let stats = saved
        .iter()
        .map(|s| {
            let s = s.lock().map_err(|_| poisoned())?;
            let Some(s) = s.as_ref() else {
                bail!("residual blocks: the forward pass kept no statistics")
            };
            let c = s.mean.len();
            Ok((
                Tensor::from_slice(&s.mean, c, x.device())?,
                Tensor::from_slice(&s.var, c, x.device())?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((z, stats)))
}
