//! The layers the seed networks are made of, with Keras semantics, and the
//! registry that creates and names their parameters.

use candle_core::{DType, Module, Tensor, D};
use data::Rng;

use crate::init::Init;
use crate::params::Registry;
use crate::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Keras BatchNormalization defaults.
pub(crate) const BN_MOMENTUM: f64 = 0.99;
pub(crate) const BN_EPSILON: f64 = 1e-3;

/// Keras "same" padding of one spatial dimension: `(before, after)`.
///
/// The output has `ceil(input / stride)` positions; the padding needed for that
/// is split with the smaller half first, so a 2×2 kernel at stride 1, or a 3×3
/// kernel at stride 2 on an even input, pads only after (bottom/right).
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// One forward pass: mode switches, the dropout stream, and the batch
/// statistics BatchNorm layers saw (training only).
pub(crate) struct Pass {
    pub train: bool,
    pub dropout: bool,
    /// Whether to use the fast CPU kernels (the `kernels` crate).
    pub fast: bool,
    pub rng: Rng,
    /// `(where the layer's running statistics are, batch mean, batch variance)`.
    pub bn_stats: Vec<(RunningStats, Tensor, Tensor)>,
}

impl Pass {
    /// An inference pass: running statistics, no dropout.
    pub fn inference(fast: bool) -> Self {
        Self {
            train: false,
            dropout: false,
            fast,
            rng: Rng::new(0),
            bn_stats: Vec::new(),
        }
    }
}

/// How a convolution pads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Padding {
    Same,
    Valid,
}

/// Weight initialisation family of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Glorot,
    He,
}

impl Kernel {
    fn init(self, fan_in: usize, fan_out: usize) -> Init {
        match self {
            Kernel::Glorot => Init::GlorotUniform { fan_in, fan_out },
            Kernel::He => Init::HeNormal { fan_in },
        }
    }
}

/// 2-D convolution with bias, NCHW, kernel `(out, in, k, k)`.
///
/// When its input carries no gradient (the image, at a network's first layer)
/// the backward pass skips the input gradient.
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    padding: Padding,
    fast: bool,
}

/// Options of a convolution.
pub(crate) struct ConvCfg {
    pub k: usize,
    pub stride: usize,
    pub padding: Padding,
    pub kernel: Kernel,
    pub l2: f32,
}

impl Conv2d {
    pub fn new(
        reg: &mut Registry,
        name: &str,
        cin: usize,
        cout: usize,
        cfg: ConvCfg,
    ) -> Result<Self> {
        let (k, fan_in, fan_out) = (cfg.k, cin * cfg.k * cfg.k, cout * cfg.k * cfg.k);
        let weight = reg.param(
            format!("{name}.weight"),
            &[cout, cin, k, k],
            cfg.kernel.init(fan_in, fan_out),
            cfg.l2,
        )?;
        let bias = reg.param(format!("{name}.bias"), &[cout], Init::Zeros, 0.0)?;
        Ok(Self {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            k,
            stride: cfg.stride,
            padding: cfg.padding,
            fast: reg.fast,
        })
    }
}

impl Conv2d {
    /// Zero padding `[top, bottom, left, right]` for input `x`.
    fn pad(&self, x: &Tensor) -> candle_core::Result<[usize; 4]> {
        let (_, _, h, w) = x.dims4()?;
        Ok(self.pad_for(h, w))
    }

    /// The zero padding `[top, bottom, left, right]` of an `h × w` input.
    fn pad_for(&self, h: usize, w: usize) -> [usize; 4] {
        match self.padding {
            Padding::Valid => [0; 4],
            Padding::Same => {
                let (top, bottom) = same_padding(h, self.k, self.stride);
                let (left, right) = same_padding(w, self.k, self.stride);
                [top, bottom, left, right]
            }
        }
    }

    /// The output's height and width for an `h × w` input.
    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let [top, bottom, left, right] = self.pad_for(h, w);
        let out = |n: usize| n.saturating_sub(self.k) / self.stride + 1;
        (out(h + top + bottom), out(w + left + right))
    }

    /// The convolution, followed by a ReLU when `relu` (one fused op on the fast path).
    pub fn forward_act(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        let pad = self.pad(x)?;
        if self.fast {
            let b = Some(&self.bias);
            kernels::conv2d_act(x, &self.weight, b, self.stride, pad, x.track_op(), relu)
        } else {
            let y = kernels::conv2d_reference(x, &self.weight, Some(&self.bias), self.stride, pad)?;
            if relu {
                y.relu()
            } else {
                Ok(y)
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// k×k max-pooling with stride k.
pub(crate) struct MaxPool2d {
    k: usize,
    fast: bool,
}

impl MaxPool2d {
    pub fn new(reg: &Registry, k: usize) -> Self {
        Self { k, fast: reg.fast }
    }

    /// `conv`, its ReLU, then this pooling: one fused op on the fast path
    /// for 2×2 windows (see `kernels::conv2d_relu_pool`).
    pub fn after_conv_relu(&self, conv: &Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fast && conv.fast && self.k == 2 {
            let (w, b, pad) = (&conv.weight, &conv.bias, conv.pad(x)?);
            return kernels::conv2d_relu_pool(x, w, b, conv.stride, pad, x.track_op());
        }
        self.forward(&conv.forward_act(x, true)?)
    }
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fast {
            kernels::max_pool2d(x, self.k)
        } else {
            kernels::max_pool2d_reference(x, self.k)
        }
    }
}

/// Fully connected layer, weight `(out, in)`.
pub(crate) struct Dense {
    weight: Tensor,
    bias: Tensor,
    /// On the fast path, where the backward leaves the weight's gradient.
    slot: Option<kernels::GradSlot>,
}

impl Dense {
    pub fn new(
        reg: &mut Registry,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        let (name_w, shape, init) = (
            format!("{name}.weight"),
            [fan_out, fan_in],
            kernel.init(fan_in, fan_out),
        );
        // On the fast path the weight's gradient comes back through a slot.
        let (weight, slot) = if reg.fast {
            let (w, slot) = reg.param_with_slot(name_w, &shape, init, 0.0)?;
            (w, Some(slot))
        } else {
            (reg.param(name_w, &shape, init, 0.0)?, None)
        };
        let bias = reg.param(format!("{name}.bias"), &[fan_out], Init::Zeros, 0.0)?;
        Ok(Self {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            slot,
        })
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.slot {
            Some(slot) => kernels::dense_with_slot(x, &self.weight, &self.bias, slot),
            None => kernels::dense_reference(x, &self.weight, &self.bias),
        }
    }
}

/// Where a BatchNorm layer's running mean and variance are among the
/// network's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunningStats {
    pub mean: usize,
    pub var: usize,
}

/// Batch normalisation over the channel axis (dim 1) of NCHW or NC inputs,
/// Keras semantics: biased batch variance, running statistics updated as
/// `r = 0.99 r + 0.01 batch`.
pub(crate) struct BatchNorm {
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stats: RunningStats,
    fast: bool,
}

impl BatchNorm {
    pub fn new(reg: &mut Registry, name: &str, channels: usize) -> Result<Self> {
        let gamma = reg.param(format!("{name}.weight"), &[channels], Init::Ones, 0.0)?;
        let beta = reg.param(format!("{name}.bias"), &[channels], Init::Zeros, 0.0)?;
        let (mean, running_mean) =
            reg.buffer(format!("{name}.running_mean"), &[channels], Init::Zeros)?;
        let (var, running_var) =
            reg.buffer(format!("{name}.running_var"), &[channels], Init::Ones)?;
        Ok(Self {
            gamma: gamma.as_tensor().clone(),
            beta: beta.as_tensor().clone(),
            running_mean: running_mean.as_tensor().clone(),
            running_var: running_var.as_tensor().clone(),
            stats: RunningStats { mean, var },
            fast: reg.fast,
        })
    }

    /// `conv`, then this BatchNorm, then a ReLU when `relu`. On the fast
    /// path while training, one fused op (see `kernels::conv_bn_train`).
    pub fn after_conv(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        pass: &mut Pass,
        relu: bool,
    ) -> Result<Tensor> {
        if !pass.train && self.fast && conv.fast {
            let (w, b) = self.folded(conv)?;
            let pad = conv.pad(x)?;
            return Ok(kernels::conv2d_act(
                x,
                &w,
                Some(&b),
                conv.stride,
                pad,
                false,
                relu,
            )?);
        }
        if !(pass.train && self.fast && conv.fast) {
            return self.forward_act(&conv.forward(x)?, pass, relu);
        }
        let (y, mean, var) = kernels::conv_bn_train(
            x,
            &conv.weight,
            &conv.bias,
            (&self.gamma, &self.beta),
            conv.stride,
            conv.pad(x)?,
            x.track_op(),
            BN_EPSILON,
            relu,
        )?;
        pass.bn_stats.push((self.stats, mean, var));
        Ok(y)
    }

    /// Inference: this BatchNorm folded into `conv`'s kernel and bias, `w·s`
    /// and `(b − mean)·s + beta` with `s = gamma / √(var + ε)`, so that the
    /// convolution's output is written once.
    fn folded(&self, conv: &Conv2d) -> Result<(Tensor, Tensor)> {
        let scale = (&self.gamma / (&self.running_var + BN_EPSILON)?.sqrt()?)?;
        let c = scale.elem_count();
        let w = conv.weight.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let b = ((&conv.bias - &self.running_mean)? * &scale)?.add(&self.beta)?;
        Ok((w, b))
    }

    /// `ReLU(residual + BN(conv(x)))`, a residual block's end: in inference
    /// on the fast path one convolution with the BatchNorm folded in and the
    /// sum in its epilogue.
    pub fn after_conv_add_relu(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        residual: &Tensor,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        if !pass.train && self.fast && conv.fast {
            let (w, b) = self.folded(conv)?;
            let geometry = (conv.stride, conv.pad(x)?);
            return Ok(kernels::conv2d_add_relu_inference(
                x, &w, &b, geometry, residual,
            )?);
        }
        let y = self.after_conv(conv, x, pass, false)?;
        add_relu(residual, &y, pass)
    }

    /// BatchNorm followed by a ReLU when `relu`: one fused op on the fast path.
    pub fn forward_act(&self, x: &Tensor, pass: &mut Pass, relu: bool) -> Result<Tensor> {
        let eps = BN_EPSILON;
        if pass.train {
            let (y, mean, var) = if self.fast {
                kernels::batch_norm_train(x, &self.gamma, &self.beta, eps, relu)?
            } else {
                kernels::batch_norm_train_reference(x, &self.gamma, &self.beta, eps, relu)?
            };
            pass.bn_stats.push((self.stats, mean, var));
            return Ok(y);
        }
        // Inference: the running statistics.
        let (g, b, mean, var) = (
            &self.gamma,
            &self.beta,
            &self.running_mean,
            &self.running_var,
        );
        Ok(if self.fast {
            kernels::batch_norm_eval(x, g, b, mean, var, eps, relu)?
        } else {
            kernels::batch_norm_eval_reference(x, g, b, mean, var, eps, relu)?
        })
    }
}

/// One residual block's layers: `(conv₁, BN₁)`, `(conv₂, BN₂)` and the
/// projection shortcut, if any.
pub(crate) type ResidualLayers<'a> = (
    (&'a Conv2d, &'a BatchNorm),
    (&'a Conv2d, &'a BatchNorm),
    Option<&'a Conv2d>,
);

/// A convolution and its BatchNorm as the fused kernels take them, for an
/// `h × w` input, and the output's size.
fn conv_bn_layer<'a>(
    conv: &'a Conv2d,
    bn: &'a BatchNorm,
    (h, w): (usize, usize),
) -> (kernels::ConvBnLayer<'a>, (usize, usize)) {
    let layer = kernels::ConvBnLayer {
        w: &conv.weight,
        bias: &conv.bias,
        gamma: &bn.gamma,
        beta: &bn.beta,
        stride: conv.stride,
        pad: conv.pad_for(h, w),
    };
    (layer, conv.output_size(h, w))
}

/// A run of ResNet v1 residual blocks while training, each `ReLU(s(x) +
/// BN₂(conv₂(Dropout(ReLU(BN₁(conv₁ x))))))` with dropout at rate
/// `dropout` (if any), as one fused op on the fast path; `None` where that
/// does not apply (reference engine, inference, not on the CPU), and the
/// caller composes the layers instead. Draws the dropout seeds from the pass
/// in the same order as [`dropout`] would, block by block.
pub(crate) fn residual_blocks(
    x: &Tensor,
    blocks: &[ResidualLayers],
    dropout: Option<f32>,
    pass: &mut Pass,
) -> Result<Option<Tensor>> {
    let fast = blocks.iter().all(|((c1, b1), (c2, b2), s)| {
        c1.fast && b1.fast && c2.fast && b2.fast && s.is_none_or(|s| s.fast)
    });
    // (The fused op runs on the CPU in f32; checked before any seed is drawn.)
    if !(pass.train && fast && x.device().is_cpu() && x.dtype() == DType::F32) {
        return Ok(None);
    }
    let (_, _, mut h, mut w) = x.dims4()?;
    let mut layers = Vec::with_capacity(blocks.len());
    for &((conv1, bn1), (conv2, bn2), shortcut) in blocks {
        let (first, mid) = conv_bn_layer(conv1, bn1, (h, w));
        let (second, out) = conv_bn_layer(conv2, bn2, mid);
        let shortcut = shortcut.map(|s| (&s.weight, &s.bias, s.stride, s.pad_for(h, w)));
        let dropout = dropout
            .filter(|&p| pass.dropout && p > 0.0)
            .map(|p| (p, pass.rng.next_u64()));
        layers.push(kernels::BlockLayers {
            first,
            second,
            shortcut,
            dropout,
        });
        (h, w) = out;
    }
    let Some((z, stats)) = kernels::residual_blocks_train(x, &layers, BN_EPSILON)? else {
        return Ok(None);
    };
    let bns = blocks.iter().flat_map(|((_, b1), (_, b2), _)| [b1, b2]);
    for (bn, (mean, var)) in bns.zip(stats) {
        pass.bn_stats.push((bn.stats, mean, var));
    }
    Ok(Some(z))
}

/// `max(x, 0)`.
pub(crate) fn relu(x: &Tensor, pass: &Pass) -> Result<Tensor> {
    Ok(if pass.fast {
        kernels::relu(x)?
    } else {
        x.relu()?
    })
}

/// `max(a + b, 0)` (a residual connection): one fused op on the fast path.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor, pass: &Pass) -> Result<Tensor> {
    Ok(if pass.fast {
        kernels::add_relu(a, b)?
    } else {
        (a + b)?.relu()?
    })
}

/// Inverted dropout with a mask drawn from the pass's seeded stream (one
/// 64-bit draw per layer seeds the layer's mask; both engines use the same mask).
pub(crate) fn dropout(x: &Tensor, p: f32, pass: &mut Pass) -> Result<Tensor> {
    if !pass.train || !pass.dropout || p <= 0.0 {
        return Ok(x.clone());
    }
    let seed = pass.rng.next_u64();
    Ok(if pass.fast {
        kernels::dropout(x, p, seed)?
    } else {
        kernels::dropout_reference(x, p, seed)?
    })
}

/// Number of correct predictions of `logits` (N, classes) against `labels`.
pub(crate) fn correct(logits: &Tensor, labels: &Tensor) -> Result<u32> {
    let pred = logits.argmax(D::Minus1)?;
    let hits = pred
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keras_same_padding() {
        // 3x3 stride 1: symmetric.
        assert_eq!(same_padding(32, 3, 1), (1, 1));
        // 2x2 stride 1: one extra row/column after.
        assert_eq!(same_padding(16, 2, 1), (0, 1));
        // 3x3 stride 2 on an even size: Keras pads only after.
        assert_eq!(same_padding(32, 3, 2), (0, 1));
        // 3x3 stride 2 on an odd size: symmetric.
        assert_eq!(same_padding(33, 3, 2), (1, 1));
        // 1x1 stride 2: none.
        assert_eq!(same_padding(32, 1, 2), (0, 0));
        assert_eq!(same_padding(7, 4, 1), (1, 2));
    }

    /// Direct convolution with explicit (top, left) padding, for reference.
    fn naive_conv(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        k: &[f32],
        (o, kk): (usize, usize),
        stride: usize,
        pad: (usize, usize),
        out: (usize, usize),
    ) -> Vec<f32> {
        let mut y = vec![0.0; o * out.0 * out.1];
        for oc in 0..o {
            for oy in 0..out.0 {
                for ox in 0..out.1 {
                    let mut s = 0.0;
                    for ic in 0..c {
                        for ky in 0..kk {
                            for kx in 0..kk {
                                let iy = (oy * stride + ky) as isize - pad.0 as isize;
                                let ix = (ox * stride + kx) as isize - pad.1 as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x[(ic * h + iy as usize) * w + ix as usize]
                                        * k[((oc * c + ic) * kk + ky) * kk + kx];
                                }
                            }
                        }
                    }
                    y[(oc * out.0 + oy) * out.1 + ox] = s;
                }
            }
        }
        y
    }

    #[test]
    fn same_convolution_matches_keras_reference() {
        let dev = Device::Cpu;
        for &(k, stride, h, w) in &[
            (2, 1, 5, 6),
            (3, 2, 8, 8),
            (3, 2, 7, 9),
            (3, 1, 6, 5),
            (1, 2, 8, 8),
        ] {
            let mut reg = Registry::new(k as u64 * 31 + h as u64, dev.clone(), true);
            let conv = Conv2d::new(
                &mut reg,
                "c",
                2,
                3,
                ConvCfg {
                    k,
                    stride,
                    padding: Padding::Same,
                    kernel: Kernel::Glorot,
                    l2: 0.0,
                },
            )
            .unwrap();
            let mut rng = Rng::new(9);
            let x: Vec<f32> = (0..2 * h * w).map(|_| rng.next_f32() - 0.5).collect();
            let xt = Tensor::from_vec(x.clone(), (1, 2, h, w), &dev).unwrap();
            let y = conv.forward(&xt).unwrap();
            let out = (h.div_ceil(stride), w.div_ceil(stride));
            assert_eq!(y.dims4().unwrap(), (1, 3, out.0, out.1));
            let kv = reg.params[0]
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let pad = (same_padding(h, k, stride).0, same_padding(w, k, stride).0);
            let expected = naive_conv(&x, (2, h, w), &kv, (3, k), stride, pad, out);
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "k={k} s={stride} {h}x{w}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn batchnorm_train_normalises_and_reports_biased_stats() {
        let dev = Device::Cpu;
        let mut reg = Registry::new(1, dev.clone(), true);
        let bn = BatchNorm::new(&mut reg, "bn", 2).unwrap();
        let x = Tensor::from_vec(
            vec![1f32, 2., 3., 4., 10., 20., 30., 40.],
            (2, 2, 2, 1),
            &dev,
        )
        .unwrap();
        let mut pass = Pass {
            train: true,
            dropout: false,
            fast: true,
            rng: Rng::new(0),
            bn_stats: vec![],
        };
        let y = bn.forward_act(&x, &mut pass, false).unwrap();
        let (_, mean, var) = &pass.bn_stats[0];
        // channel 0 holds 1,2,10,20; channel 1 holds 3,4,30,40.
        assert_eq!(mean.to_vec1::<f32>().unwrap(), vec![8.25, 19.25]);
        let v0 = [1f32, 2., 10., 20.]
            .iter()
            .map(|v| (v - 8.25).powi(2))
            .sum::<f32>()
            / 4.0;
        assert!((var.to_vec1::<f32>().unwrap()[0] - v0).abs() < 1e-3);
        let y0 = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((y0 - (1.0 - 8.25) / (v0 + 1e-3).sqrt()).abs() < 1e-4);
    }
}
