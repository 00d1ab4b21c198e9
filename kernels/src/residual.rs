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
use super::conv_bn::{batch_stats, ConvBnOp, Mask, Output, Saved};
use super::with_values;

/// A BatchNorm layer's batch mean and biased batch variance, `(C)` each.
pub(crate) type BatchStats = (Tensor, Tensor);

/// One conv + BN layer of a block: kernel, bias, gamma, beta, stride and
/// zero padding `[top, bottom, left, right]`.
pub struct ConvBnLayer<'a> {
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
pub struct BlockLayers<'a> {
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

/// One block of the op: its layers, and where its tensors sit in the op's
/// flat kernel and parameter inputs.
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
    /// Offsets of the block's first kernel value and first parameter.
    at: (usize, usize),
}

/// One block's kernels and parameters, slices of the op's flat inputs.
struct Parts<'a> {
    w: [&'a [f32]; 2],
    p: [&'a [f32]; 2],
    /// The shortcut's kernel and bias.
    shortcut: Option<(&'a [f32], &'a [f32])>,
}

impl Block {
    /// Values of this block in the flat kernel input: the two layers'
    /// kernels, then the shortcut's.
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

    /// This block's slices of the op's inputs (whose lengths the op checks).
    fn parts<'a>(&self, w: &'a [f32], p: &'a [f32]) -> Parts<'a> {
        let (w, p) = (&w[self.at.0..], &p[self.at.1..]);
        let (n1, n2) = (self.kernels[0].elem_count(), self.kernels[1].elem_count());
        let c3 = 3 * self.c;
        Parts {
            w: [&w[..n1], &w[n1..n1 + n2]],
            p: [&p[..c3], &p[c3..2 * c3]],
            shortcut: self.shortcut.as_ref().map(|s| {
                let ns = s.kernel.elem_count();
                (&w[n1 + n2..n1 + n2 + ns], &p[2 * c3..2 * c3 + self.c])
            }),
        }
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
}

/// The op of `(x, kernels, params)`: every block's kernels flattened one
/// after the other (first, second, shortcut), and their parameters likewise.
struct StackOp {
    blocks: Vec<Block>,
    kept: Mutex<Vec<Kept>>,
}

impl StackOp {
    /// Refuses flat inputs of other lengths than the blocks' (so that
    /// [`Block::parts`] stays in bounds).
    fn check_lengths(&self, w: &[f32], params: &[f32]) -> Result<()> {
        let want = self.blocks.last().map_or((0, 0), |b| {
            (b.at.0 + b.kernel_len(), b.at.1 + b.params_len())
        });
        if (w.len(), params.len()) != want {
            bail!(
                "residual blocks: expected {} kernel values and {} parameters, got {} and {}",
                want.0,
                want.1,
                w.len(),
                params.len()
            );
        }
        Ok(())
    }
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
        self.check_lengths(w, params)?;
        let cpu = &Device::Cpu;
        let mut kept: Vec<Kept> = Vec::with_capacity(self.blocks.len());
        let mut out = None;
        for (k, b) in self.blocks.iter().enumerate() {
            let parts = b.parts(w, params);
            // The block's input: the op's, or the previous block's output.
            let run = |x: &[f32], xdims: &[usize]| -> Result<(Vec<f32>, Shape, Option<Vec<f32>>)> {
                let k = (parts.w[0], b.kernels[0].dims());
                let x_in = (Input::Plain(x), xdims);
                let (_, hshape) = b.first.forward(x_in, k, parts.p[0], Output::None)?;
                let mask = b
                    .dropout
                    .map(|(p, seed)| super::dropout::dropout_mask(hshape.elem_count(), p, seed));
                // s(x): the shortcut's convolution, or x itself.
                let projected = match (&b.shortcut, parts.shortcut) {
                    (Some(sc), Some((ws, bs))) => {
                        let g = Geom::new(xdims, sc.kernel.dims(), sc.stride, sc.pad)?;
                        Some(forward_values(&g, Input::Plain(x), ws, bs, false, false)?.0)
                    }
                    _ => None,
                };
                let s = projected.as_deref().unwrap_or(x);
                // z = ReLU(BN₂(conv₂ h) + s(x)), h normalised as it is loaded.
                let first = lock(&b.first.saved)?;
                let Some(h) = first.as_ref() else {
                    bail!("residual blocks: the first layer kept nothing")
                };
                let k = (parts.w[1], b.kernels[1].dims());
                let h = (h.as_input(mask.as_deref()), hshape.dims());
                let (z, shape) = b.second.forward(h, k, parts.p[1], Output::AddRelu(s))?;
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
            kept.push(Kept { z, mask });
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
        let (wt, pt) = (w, params);
        with_values(wt, |w| {
            with_values(pt, |params| {
                self.check_lengths(w, params)?;
                for (k, b) in self.blocks.iter().enumerate().rev() {
                    let s = &kept[k];
                    let parts = b.parts(w, params);
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
                        let dropout = s.mask.as_deref().map(|m| {
                            move |i: usize, dhi: &mut [f32]| {
                                let m = &m[i * len..][..len];
                                dhi.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
                            }
                        });
                        let after = dropout.as_ref().map(|f| f as Epilogue);
                        let (dh, dw2, dp2) = with_values(zk, |z| {
                            let k2 = (parts.w[1], b.kernels[1].dims());
                            b.second
                                .gradients(hin, k2, parts.p[1], Mask::Values(z), &g, after)
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
                    let (dxs, shortcut_grads) = match (&b.shortcut, parts.shortcut) {
                        (Some(sc), Some((wv, _))) => {
                            let geom = Geom::new(xk.dims(), sc.kernel.dims(), sc.stride, sc.pad)?;
                            let (dxs, dwsc, dbs) = with_values(xk, |xv| {
                                with_values(zk, |z| {
                                    with_values(&g, |gv| {
                                        let len = z.len() / geom.n.max(1);
                                        // The sum's gradient, through its ReLU mask.
                                        let masked = |i: usize, out: &mut [f32]| {
                                            let (z, gv) =
                                                (&z[i * len..][..len], &gv[i * len..][..len]);
                                            for ((o, &z), &g) in out.iter_mut().zip(z).zip(gv) {
                                                *o = if z > 0.0 { g } else { 0.0 };
                                            }
                                        };
                                        let (xv, dy) = (Input::Plain(xv), Dy::Make(&masked));
                                        backward_values(&geom, xv, wv, dy, input_grad, None)
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
                                let k1 = (parts.w[0], b.kernels[0].dims());
                                b.first
                                    .gradients(xin, k1, parts.p[0], Mask::Own, &dh, Some(&add))
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
                Ok(())
            })
        })?;
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
pub fn residual_blocks_train(
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
    let mut ops: Vec<Block> = Vec::with_capacity(blocks.len());
    let (mut kernels, mut params) = (Vec::new(), Vec::new());
    for (k, b) in blocks.iter().enumerate() {
        let input_grad = k > 0 || x.track_op();
        // (In the flat inputs, this block follows the previous one.)
        let at = ops.last().map_or((0, 0), |p: &Block| {
            (p.at.0 + p.kernel_len(), p.at.1 + p.params_len())
        });
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
            at,
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
        .map(|s| batch_stats(s, x.device()))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((z, stats)))
}
