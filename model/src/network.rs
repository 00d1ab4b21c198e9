//! [`Model`]: a network plus its parameters as flat buffers, and the two
//! computations a node performs: a training step (gradients) and evaluation.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use data::{Rng, IMAGE_BYTES, NUM_CLASSES};
use kernels::Taken;

use crate::layers::{correct, Pass, BN_MOMENTUM};
use crate::nets::Net;
use crate::params::{Registry, TensorInfo};
use crate::{ModelError, ModelSpec};

type Result<T> = std::result::Result<T, ModelError>;

/// Samples per forward pass during evaluation (bounds memory).
const EVAL_CHUNK: usize = 500;

/// What a training step on one batch produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Gradient of the mean loss over the batch, one value per trainable parameter.
    pub gradients: Vec<f32>,
    /// Non-trainable state (BatchNorm running statistics) updated with this batch.
    pub state: Vec<f32>,
    /// Sum of the per-sample cross-entropy losses.
    pub loss_sum: f64,
    /// Correct predictions (training mode).
    pub correct: u32,
    /// Samples in the batch.
    pub samples: u32,
}

/// What evaluating a set of samples produces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalOutput {
    /// Sum of the per-sample cross-entropy losses.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: u32,
    /// Samples evaluated.
    pub samples: u32,
}

/// Which implementation of the layers' operations a [`Model`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The `kernels` crate's ops on the CPU (convolution on the path
    /// `kernels` picks per shape, convolution fused with BatchNorm, ReLU,
    /// max-pool or a residual sum, whole residual blocks); candle's own
    /// operations on other devices.
    #[default]
    Fast,
    /// candle's own operations everywhere (for comparison and testing).
    Reference,
}

/// A network with its parameters.
pub struct Model {
    spec: ModelSpec,
    device: Device,
    net: Net,
    fast: bool,
    params: Vec<(TensorInfo, candle_core::Var)>,
    buffers: Vec<(TensorInfo, candle_core::Var)>,
    /// Per parameter, the slot its layer's backward fills instead of the
    /// gradient store (see `kernels::dense_with_slot`).
    slots: Vec<Option<kernels::GradSlot>>,
    /// Held through every pass: a pass may bind its slots to the caller's
    /// memory ([`Model::train_step_in_place`]), which no other pass may see.
    pass: Mutex<()>,
}

impl Model {
    /// Builds the network, initialising its parameters from `seed` exactly as
    /// Keras would in distribution (the same seed gives the same weights).
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        Self::with_engine(spec, seed, device, Engine::Fast)
    }

    /// [`Model::new`] running the layers with the given [`Engine`]; both
    /// engines give the same initial weights for the same seed.
    pub fn with_engine(
        spec: ModelSpec,
        seed: u64,
        device: &Device,
        engine: Engine,
    ) -> Result<Self> {
        let mut reg = Registry::new(seed, device.clone(), engine == Engine::Fast);
        let net = Net::new(spec.kind, &mut reg)?;
        Ok(Self {
            spec,
            device: device.clone(),
            net,
            fast: reg.fast,
            params: reg.params,
            buffers: reg.buffers,
            slots: reg.slots,
            pass: Mutex::new(()),
        })
    }

    /// Serialises passes (see `pass`); a poisoned lock only means a pass
    /// panicked, which left nothing bound (the bindings' guard unbinds).
    fn lock_pass(&self) -> MutexGuard<'_, ()> {
        self.pass.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model's name and switches.
    pub fn spec(&self) -> ModelSpec {
        self.spec
    }

    /// Trainable parameters, in buffer order.
    pub fn params(&self) -> impl Iterator<Item = &TensorInfo> {
        self.params.iter().map(|(i, _)| i)
    }

    /// Non-trainable state tensors, in buffer order.
    pub fn buffers(&self) -> impl Iterator<Item = &TensorInfo> {
        self.buffers.iter().map(|(i, _)| i)
    }

    /// Number of trainable values.
    pub fn num_trainable(&self) -> usize {
        self.params().map(TensorInfo::numel).sum()
    }

    /// Number of non-trainable values.
    pub fn num_state(&self) -> usize {
        self.buffers().map(TensorInfo::numel).sum()
    }

    /// The weights buffer: trainable parameters then state.
    pub fn weights(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.num_trainable() + self.num_state());
        for (_, v) in self.params.iter().chain(&self.buffers) {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// The state part of [`Model::weights`] (e.g. BatchNorm running statistics).
    pub fn state(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.num_state());
        for (_, v) in &self.buffers {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Loads a weights buffer as produced by [`Model::weights`].
    pub fn set_weights(&self, weights: &[f32]) -> Result<()> {
        let expected = self.num_trainable() + self.num_state();
        if weights.len() != expected {
            return Err(ModelError::BufferLength {
                what: "weights",
                expected,
                got: weights.len(),
            });
        }
        self.load(&[weights], false)
    }

    /// [`Model::set_weights`] from the weights buffer given as consecutive
    /// parts (the slices of several shard aggregators), without joining them
    /// first: only a tensor that lies across two parts is copied twice.
    pub fn set_weights_parts(&self, parts: &[&[f32]]) -> Result<()> {
        let expected = self.num_trainable() + self.num_state();
        let got = parts.iter().map(|p| p.len()).sum();
        if got != expected {
            return Err(ModelError::BufferLength {
                what: "weights",
                expected,
                got,
            });
        }
        self.load(parts, false)
    }

    /// Copies the weights buffer, given as consecutive `parts` (checked to
    /// be whole), into the variables, leaving out the parameters with a
    /// gradient slot when `skip_slotted`.
    fn load(&self, parts: &[&[f32]], skip_slotted: bool) -> Result<()> {
        let slotted = self.slots.iter().map(Option::is_some);
        let skip = slotted.chain(std::iter::repeat(false));
        let mut rest = parts.iter().copied().filter(|p| !p.is_empty());
        let mut part: &[f32] = &[];
        // A tensor's values when they lie across parts.
        let mut joined = Vec::new();
        for ((info, v), slotted) in self.params.iter().chain(&self.buffers).zip(skip) {
            let n = info.numel();
            if part.is_empty() {
                part = rest.next().unwrap_or_default();
            }
            let values = if part.len() >= n {
                let (values, after) = part.split_at(n);
                part = after;
                values
            } else {
                joined.clear();
                while joined.len() < n {
                    if part.is_empty() {
                        part = rest.next().unwrap_or_default();
                        if part.is_empty() {
                            break;
                        }
                    }
                    let take = (n - joined.len()).min(part.len());
                    joined.extend_from_slice(&part[..take]);
                    part = &part[take..];
                }
                &joined[..]
            };
            if slotted && skip_slotted {
                continue;
            }
            if self.device.is_cpu() {
                // One copy, straight into the variable's storage.
                v.as_tensor().inplace_op1(&CopyInto(values))?;
            } else {
                v.set(&Tensor::from_slice(
                    values,
                    info.shape.as_slice(),
                    &self.device,
                )?)?;
            }
        }
        Ok(())
    }

    fn input(&self, images: &[u8], labels: &[u8]) -> Result<(Tensor, Tensor)> {
        if images.len() != labels.len() * IMAGE_BYTES {
            return Err(ModelError::BadInput(format!(
                "{} image bytes for {} labels (expected {} bytes per image)",
                images.len(),
                labels.len(),
                IMAGE_BYTES
            )));
        }
        if let Some(l) = labels.iter().find(|&&l| l as usize >= NUM_CLASSES) {
            return Err(ModelError::BadInput(format!("label {l} out of range 0..9")));
        }
        let n = labels.len();
        let pixels: Vec<f32> = images.iter().map(|&p| p as f32 / 255.0).collect();
        let x = Tensor::from_vec(pixels, (n, 3, 32, 32), &self.device)?;
        let y = Tensor::from_vec(
            labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            n,
            &self.device,
        )?;
        Ok((x, y))
    }

    /// One forward + backward pass in training mode on a batch. `seed` drives
    /// the dropout masks. The gradient is that of the *mean* loss over the batch
    /// (without regularisation, which the optimizer side adds).
    pub fn train_step(&self, images: &[u8], labels: &[u8], seed: u64) -> Result<StepOutput> {
        Ok(self.train_step_timed(images, labels, seed)?.0)
    }

    /// [`Model::train_step`] that also reports how long the forward pass
    /// (with the loss) and the backward pass (with reading the gradients back)
    /// took. For benchmarks.
    #[doc(hidden)]
    pub fn train_step_timed(
        &self,
        images: &[u8],
        labels: &[u8],
        seed: u64,
    ) -> Result<(StepOutput, Duration, Duration)> {
        let _pass = self.lock_pass();
        let mut gradients = Vec::with_capacity(self.num_trainable());
        let mut state = Vec::with_capacity(self.num_state());
        let (stats, forward, backward) =
            self.step(images, labels, seed, &mut (&mut gradients, &mut state))?;
        let out = StepOutput {
            gradients,
            state,
            loss_sum: stats.loss_sum,
            correct: stats.correct,
            samples: stats.samples,
        };
        Ok((out, forward, backward))
    }

    /// [`Model::train_step`] that writes the gradients and then the state
    /// into `out` (of `num_trainable() + num_state()` values, e.g. a
    /// shared-memory segment) instead of new vectors.
    pub fn train_step_into(
        &self,
        images: &[u8],
        labels: &[u8],
        seed: u64,
        out: &mut [f32],
    ) -> Result<StepStats> {
        let _pass = self.lock_pass();
        let expected = self.num_trainable() + self.num_state();
        if out.len() != expected {
            return Err(ModelError::BufferLength {
                what: "gradients and state",
                expected,
                got: out.len(),
            });
        }
        let mut sink = SliceSink { out, at: 0 };
        Ok(self.step(images, labels, seed, &mut sink)?.0)
    }

    /// [`Model::train_step_into`] on the weights in `weights` (as from
    /// [`Model::weights`]) instead of those loaded: the layers with a
    /// gradient slot (the dense layers, on the CPU) read their weight from
    /// `weights` and write its gradient straight into `out`, without a copy
    /// of either; the other parameters and the state are loaded from
    /// `weights` first. Afterwards the model's own values of the slotted
    /// weights are not `weights`'s: load them ([`Model::set_weights`])
    /// before any other pass that must see them. Made for a node training
    /// on the weights in a shared-memory segment.
    pub fn train_step_in_place(
        &self,
        weights: &[f32],
        images: &[u8],
        labels: &[u8],
        seed: u64,
        out: &mut [f32],
    ) -> Result<StepStats> {
        let expected = self.num_trainable() + self.num_state();
        for (what, got) in [
            ("weights", weights.len()),
            ("gradients and state", out.len()),
        ] {
            if got != expected {
                return Err(ModelError::BufferLength {
                    what,
                    expected,
                    got,
                });
            }
        }
        let _pass = self.lock_pass();
        // Off the CPU the dense layers are candle's, which read the
        // variables: there all of `weights` is loaded and nothing bound.
        let cpu = self.device.is_cpu();
        self.load(&[weights], cpu)?;
        let mut sink = SliceSink { out, at: 0 };
        // (One pointer for every slot's range, taken before the pass: the
        // sink writes through its slice only after the backward pass.)
        let base = sink.base();
        let mut bound = Bindings(Vec::new());
        let mut off = 0;
        for ((info, _), slot) in self.params.iter().zip(&self.slots) {
            let n = info.numel();
            if let (true, Some(slot)) = (cpu, slot) {
                // SAFETY: `off + n ≤ num_trainable() ≤ out.len()` (checked
                // above), so both ranges are in bounds; `weights` is borrowed
                // for this whole call and only read; the sink writes `out`
                // only after the backward pass and passes over this range
                // (`step` skips it when the slot says `Written`); `bound`
                // unbinds both before this returns, and the pass lock keeps
                // other passes from seeing them.
                unsafe { slot.bind(weights[off..].as_ptr(), base.add(off), n)? };
                bound.0.push(slot.clone());
            }
            off += n;
        }
        let stats = self.step(images, labels, seed, &mut sink)?.0;
        drop(bound);
        Ok(stats)
    }

    fn step(
        &self,
        images: &[u8],
        labels: &[u8],
        seed: u64,
        sink: &mut dyn Sink,
    ) -> Result<(StepStats, Duration, Duration)> {
        let start = Instant::now();
        let n = labels.len();
        if n == 0 {
            return Err(ModelError::BadInput("empty batch".into()));
        }
        let (x, y) = self.input(images, labels)?;
        let mut pass = Pass {
            train: true,
            dropout: self.spec.dropout,
            fast: self.fast,
            rng: Rng::new(seed),
            bn_stats: Vec::new(),
        };
        // A slot holds only this step's gradient.
        for slot in self.slots.iter().flatten() {
            slot.take()?;
        }
        let logits = self.net.forward(&x, &mut pass)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let forward = start.elapsed();
        let grads = loss.backward()?;
        for ((info, v), slot) in self.params.iter().zip(&self.slots) {
            let taken = match slot {
                Some(slot) => slot.take()?,
                None => Taken::Empty,
            };
            match (taken, grads.get(v.as_tensor())) {
                (Taken::Held(g), _) => sink.gradient(&g)?,
                (Taken::Written, _) => sink.skip(info.numel())?,
                (Taken::Empty, Some(g)) => sink.gradient(g)?,
                (Taken::Empty, None) => sink.zeros(info.numel()),
            }
        }
        // Running statistics: r = momentum * r + (1 - momentum) * batch.
        let mut batch_stats = vec![None; self.buffers.len()];
        for (at, mean, var) in pass.bn_stats {
            batch_stats[at.mean] = Some(mean);
            batch_stats[at.var] = Some(var);
        }
        for ((_, v), batch) in self.buffers.iter().zip(batch_stats) {
            let old = v.as_tensor();
            let new = match batch {
                Some(b) => ((old * BN_MOMENTUM)? + (b * (1.0 - BN_MOMENTUM))?)?,
                None => old.clone(),
            };
            sink.state(&new)?;
        }
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let stats = StepStats {
            loss_sum: loss_value * n as f64,
            correct: correct(&logits, &y)?,
            samples: n as u32,
        };
        Ok((stats, forward, start.elapsed() - forward))
    }

    /// Loss and accuracy in inference mode (running statistics, no dropout).
    pub fn evaluate(&self, images: &[u8], labels: &[u8]) -> Result<EvalOutput> {
        let _pass = self.lock_pass();
        let mut out = EvalOutput::default();
        for start in (0..labels.len()).step_by(EVAL_CHUNK) {
            let end = (start + EVAL_CHUNK).min(labels.len());
            let (x, y) = self.input(
                &images[start * IMAGE_BYTES..end * IMAGE_BYTES],
                &labels[start..end],
            )?;
            let mut pass = Pass::inference(self.fast);
            let logits = self.net.forward(&x, &mut pass)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            out.loss_sum += loss * (end - start) as f64;
            out.correct += correct(&logits, &y)?;
            out.samples += (end - start) as u32;
        }
        Ok(out)
    }

    /// Class probabilities (N, 10) for images in inference mode.
    pub fn predict(&self, images: &[u8]) -> Result<Vec<[f32; NUM_CLASSES]>> {
        let _pass = self.lock_pass();
        let n = images.len() / IMAGE_BYTES;
        let (x, _) = self.input(images, &vec![0; n])?;
        let mut pass = Pass::inference(self.fast);
        let probs = candle_nn::ops::softmax_last_dim(&self.net.forward(&x, &mut pass)?)?;
        Ok(probs
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| {
                let mut p = [0.0; NUM_CLASSES];
                p.copy_from_slice(&row[..NUM_CLASSES]);
                p
            })
            .collect())
    }
}

/// The sums of a training step (what [`Model::train_step_into`] returns
/// besides the values it writes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Sum of the per-sample cross-entropy losses.
    pub loss_sum: f64,
    /// Correct predictions (training mode).
    pub correct: u32,
    /// Samples in the batch.
    pub samples: u32,
}

/// Where a step's gradients (in parameter order), then its state, go.
trait Sink {
    fn gradient(&mut self, t: &Tensor) -> Result<()>;
    fn zeros(&mut self, n: usize);
    /// Passes over `n` values already written in place (a bound slot's).
    fn skip(&mut self, n: usize) -> Result<()>;
    fn state(&mut self, t: &Tensor) -> Result<()>;
}

/// Two vectors: gradients and state.
impl Sink for (&mut Vec<f32>, &mut Vec<f32>) {
    fn gradient(&mut self, t: &Tensor) -> Result<()> {
        append_values(t, self.0)
    }
    fn zeros(&mut self, n: usize) {
        self.0.extend(std::iter::repeat_n(0.0, n));
    }
    fn skip(&mut self, _: usize) -> Result<()> {
        Err(ModelError::BadInput(
            "a gradient was written in place for a pass that bound no memory".into(),
        ))
    }
    fn state(&mut self, t: &Tensor) -> Result<()> {
        append_values(t, self.1)
    }
}

/// One slice, filled from the start.
struct SliceSink<'a> {
    out: &'a mut [f32],
    at: usize,
}

impl SliceSink<'_> {
    fn put(&mut self, t: &Tensor) -> Result<()> {
        let end = self.at + t.elem_count();
        if end > self.out.len() {
            return Err(ModelError::BufferLength {
                what: "gradients and state",
                expected: self.out.len(),
                got: end,
            });
        }
        let dst = &mut self.out[self.at..end];
        with_values(t, |v| dst.copy_from_slice(v))?;
        self.at = end;
        Ok(())
    }

    /// The start of the slice, for layers that write their own ranges of
    /// it before the sink writes anything else (see `train_step_in_place`).
    fn base(&mut self) -> *mut f32 {
        self.out.as_mut_ptr()
    }
}

impl Sink for SliceSink<'_> {
    fn gradient(&mut self, t: &Tensor) -> Result<()> {
        self.put(t)
    }
    fn zeros(&mut self, n: usize) {
        let end = (self.at + n).min(self.out.len());
        self.out[self.at..end].fill(0.0);
        self.at = end;
    }
    fn skip(&mut self, n: usize) -> Result<()> {
        self.at += n;
        Ok(())
    }
    fn state(&mut self, t: &Tensor) -> Result<()> {
        self.put(t)
    }
}

/// Slots bound to a caller's memory for one pass; unbound when dropped,
/// whatever way the pass ends.
struct Bindings(Vec<kernels::GradSlot>);

impl Drop for Bindings {
    fn drop(&mut self) {
        for slot in &self.0 {
            slot.unbind();
        }
    }
}

/// Appends the values of an f32 tensor to `out`.
fn append_values(t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
    with_values(t, |v| out.extend_from_slice(v))
}

/// Runs `f` on the values of an f32 tensor: straight from its storage when
/// it is a contiguous CPU tensor (no copy), else on a copy made by candle.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// Copies values into a contiguous f32 CPU tensor in place (the one-copy
/// path of [`Model::set_weights`]).
struct CopyInto<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for CopyInto<'_> {
    fn name(&self) -> &'static str {
        "copy-into"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) if b - a == self.0.len() => {
                v[a..b].copy_from_slice(self.0);
                Ok(())
            }
            _ => candle_core::bail!(
                "copy-into needs a contiguous f32 tensor of {} values",
                self.0.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;

    fn counts(name: &str) -> (usize, usize) {
        let m = Model::new(
            ModelSpec::new(name.parse::<ModelKind>().unwrap()),
            0,
            &Device::Cpu,
        )
        .unwrap();
        (m.num_trainable(), m.num_trainable() + m.num_state())
    }

    #[test]
    fn parameter_counts_match_keras() {
        assert_eq!(counts("simple-cnn"), (1_626_442, 1_626_442));
        assert_eq!(counts("resnet20"), (273_066, 274_442));
        assert_eq!(counts("resnet20-dropout"), (273_066, 274_442));
        assert_eq!(counts("resnet50-dropout"), (760_266, 763_882));
        assert_eq!(counts("complex-cnn"), (11_909_514, 11_916_810));
    }

    #[test]
    fn names_are_unique_and_l2_only_on_resnet_conv_kernels() {
        let m = Model::new(ModelSpec::new("resnet20".parse().unwrap()), 0, &Device::Cpu).unwrap();
        let mut names: Vec<_> = m
            .params()
            .chain(m.buffers())
            .map(|i| i.name.clone())
            .collect();
        assert!(names.contains(&"stack2.block0.shortcut.weight".to_string()));
        assert!(names.contains(&"stack3.block2.layer2.bn.running_var".to_string()));
        for p in m.params() {
            let expect = p.name.ends_with(".weight") && p.shape.len() == 4;
            assert_eq!(p.l2 > 0.0, expect, "{}", p.name);
        }
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn weights_round_trip_and_seed_determines_init() {
        let spec = ModelSpec::new(ModelKind::Resnet {
            n: 1,
            dropout: false,
        });
        let a = Model::new(spec, 5, &Device::Cpu).unwrap();
        let b = Model::new(spec, 5, &Device::Cpu).unwrap();
        let c = Model::new(spec, 6, &Device::Cpu).unwrap();
        assert_eq!(a.weights().unwrap(), b.weights().unwrap());
        assert_ne!(a.weights().unwrap(), c.weights().unwrap());
        c.set_weights(&a.weights().unwrap()).unwrap();
        assert_eq!(a.weights().unwrap(), c.weights().unwrap());
        assert!(matches!(
            c.set_weights(&[1.0]),
            Err(ModelError::BufferLength { .. })
        ));
    }

    /// Weights handed over in parts cut anywhere (inside tensors, empty
    /// parts, one value) load as the whole buffer does.
    #[test]
    fn weights_load_from_parts_cut_anywhere() {
        let spec = ModelSpec::new(ModelKind::Resnet {
            n: 1,
            dropout: false,
        });
        let a = Model::new(spec, 5, &Device::Cpu).unwrap();
        let w = a.weights().unwrap();
        let n = w.len();
        let cuts = [
            vec![0, n],
            vec![0, 0, 1, 1, 7, n / 3, n / 3 + 1, n - 1, n, n],
            vec![0, 433, 434, 2 * n / 3, n],
        ];
        for cut in cuts {
            let b = Model::new(spec, 6, &Device::Cpu).unwrap();
            assert_ne!(b.weights().unwrap(), w);
            let parts: Vec<&[f32]> = cut.windows(2).map(|c| &w[c[0]..c[1]]).collect();
            b.set_weights_parts(&parts).unwrap();
            assert_eq!(b.weights().unwrap(), w, "cut at {cut:?}");
        }
        let b = Model::new(spec, 6, &Device::Cpu).unwrap();
        let short = [&w[..10], &w[11..]];
        assert!(matches!(
            b.set_weights_parts(&short),
            Err(ModelError::BufferLength { .. })
        ));
    }

    /// The values of tensor `name` in a buffer laid out as `infos`.
    fn slice_of<'a>(
        infos: impl Iterator<Item = &'a TensorInfo>,
        buffer: &'a [f32],
        name: &str,
    ) -> &'a [f32] {
        let mut at = 0;
        for info in infos {
            if info.name == name {
                return &buffer[at..at + info.numel()];
            }
            at += info.numel();
        }
        panic!("no tensor {name}");
    }

    fn batch(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut rng = Rng::new(seed);
        let images = (0..n * IMAGE_BYTES).map(|_| rng.below(256) as u8).collect();
        let labels = (0..n).map(|_| rng.below(10) as u8).collect();
        (images, labels)
    }

    #[test]
    fn train_step_outputs_have_the_right_sizes_and_update_bn_state() {
        let spec = ModelSpec::new(ModelKind::Resnet {
            n: 1,
            dropout: true,
        });
        let m = Model::new(spec, 1, &Device::Cpu).unwrap();
        let (images, labels) = batch(6, 3);
        let out = m.train_step(&images, &labels, 11).unwrap();
        assert_eq!(out.gradients.len(), m.num_trainable());
        assert_eq!(out.state.len(), m.num_state());
        assert_eq!(out.samples, 6);
        assert!(out.loss_sum.is_finite() && out.loss_sum > 0.0);
        assert!(out.gradients.iter().all(|g| g.is_finite()));
        assert!(out.gradients.iter().any(|&g| g != 0.0));
        // The stem's running statistics moved by exactly 1 % of its batch
        // statistics (momentum 0.99 from the initial 0 and 1), computed
        // here independently with candle's own convolution.
        let w = m.weights().unwrap();
        let (conv_w, conv_b) = (
            slice_of(m.params(), &w, "stem.conv.weight"),
            slice_of(m.params(), &w, "stem.conv.bias"),
        );
        let pixels: Vec<f32> = images.iter().map(|&p| p as f32 / 255.0).collect();
        let x = Tensor::from_vec(pixels, (6, 3, 32, 32), &Device::Cpu).unwrap();
        let k = Tensor::from_vec(conv_w.to_vec(), (16, 3, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(conv_b.to_vec(), (1, 16, 1, 1), &Device::Cpu).unwrap();
        let y = x
            .conv2d(&k, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let y = y.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let y = y.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let (mean, var) = (
            slice_of(m.buffers(), &out.state, "stem.bn.running_mean"),
            slice_of(m.buffers(), &out.state, "stem.bn.running_var"),
        );
        for (c, values) in y.iter().enumerate() {
            let mu = values.iter().sum::<f64>() / values.len() as f64;
            let sigma2 =
                values.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / values.len() as f64;
            let (want_mean, want_var) = (0.01 * mu, 0.99 + 0.01 * sigma2);
            assert!(
                (mean[c] as f64 - want_mean).abs() < 1e-6,
                "channel {c}: mean {} vs {want_mean}",
                mean[c]
            );
            assert!(
                (var[c] as f64 - want_var).abs() < 1e-5,
                "channel {c}: var {} vs {want_var}",
                var[c]
            );
        }
        // Same seed, same dropout masks, same gradients; other seed differs.
        let again = m.train_step(&images, &labels, 11).unwrap();
        assert_eq!(again.gradients, out.gradients);
        let other = m.train_step(&images, &labels, 12).unwrap();
        assert_ne!(other.gradients, out.gradients);
        assert!(m.train_step(&images[1..], &labels, 1).is_err());
        assert!(m.train_step(&images, &[10, 0, 0, 0, 0, 0], 1).is_err());
        // Into one caller's buffer: the same values and sums.
        let mut buf = vec![f32::NAN; m.num_trainable() + m.num_state()];
        let stats = m.train_step_into(&images, &labels, 11, &mut buf).unwrap();
        assert_eq!(&buf[..m.num_trainable()], out.gradients.as_slice());
        assert_eq!(&buf[m.num_trainable()..], out.state.as_slice());
        assert_eq!(
            (stats.loss_sum, stats.correct, stats.samples),
            (out.loss_sum, out.correct, out.samples)
        );
        assert!(m
            .train_step_into(&images, &labels, 11, &mut buf[1..])
            .is_err());
    }

    /// Training on a caller's weights in place gives the bits of loading
    /// them first, for a network whose dense layers have gradient slots
    /// and one with BatchNorm state.
    #[test]
    fn train_step_in_place_matches_loading_the_weights() {
        for kind in [
            ModelKind::SimpleCnn,
            ModelKind::Resnet {
                n: 1,
                dropout: true,
            },
        ] {
            let spec = ModelSpec {
                kind,
                dropout: true,
            };
            let (images, labels) = batch(5, 21);
            let theirs = Model::new(spec, 5, &Device::Cpu)
                .unwrap()
                .weights()
                .unwrap();
            let len = theirs.len();
            let loaded = Model::new(spec, 4, &Device::Cpu).unwrap();
            loaded.set_weights(&theirs).unwrap();
            let mut want = vec![f32::NAN; len];
            let want_stats = loaded
                .train_step_into(&images, &labels, 3, &mut want)
                .unwrap();
            let m = Model::new(spec, 4, &Device::Cpu).unwrap();
            let mut got = vec![f32::NAN; len];
            let stats = m
                .train_step_in_place(&theirs, &images, &labels, 3, &mut got)
                .unwrap();
            assert_eq!(stats, want_stats, "{kind:?}");
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{kind:?}: gradients or state differ");
            // Twice in a row (the slots unbound and emptied in between).
            let again = m
                .train_step_in_place(&theirs, &images, &labels, 3, &mut got)
                .unwrap();
            assert_eq!(again, want_stats);
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // The dense weights were read in place, not loaded; a full load
            // makes the model whole again, and its ordinary step agrees.
            assert_ne!(m.weights().unwrap(), theirs, "{kind:?}");
            m.set_weights(&theirs).unwrap();
            let mut plain = vec![f32::NAN; len];
            m.train_step_into(&images, &labels, 3, &mut plain).unwrap();
            assert!(plain
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // Wrong lengths are errors.
            assert!(m
                .train_step_in_place(&theirs[1..], &images, &labels, 3, &mut got)
                .is_err());
            assert!(m
                .train_step_in_place(&theirs, &images, &labels, 3, &mut got[1..])
                .is_err());
        }
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let spec = ModelSpec {
            kind: ModelKind::Resnet {
                n: 1,
                dropout: false,
            },
            dropout: false,
        };
        let m = Model::new(spec, 4, &Device::Cpu).unwrap();
        let (images, labels) = batch(4, 8);
        let g = m.train_step(&images, &labels, 0).unwrap().gradients;
        let w0 = m.weights().unwrap();
        // The dense bias (last trainable tensor) has a smooth loss surface.
        let idx = m.num_trainable() - 3;
        let eps = 1e-2f32;
        let loss_at = |delta: f32| {
            let mut w = w0.clone();
            w[idx] += delta;
            m.set_weights(&w).unwrap();
            m.train_step(&images, &labels, 0).unwrap().loss_sum / 4.0
        };
        let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        assert!(
            (numeric - g[idx] as f64).abs() < 1e-3,
            "{numeric} vs {}",
            g[idx]
        );
    }

    #[test]
    fn evaluate_and_predict_agree() {
        let m = Model::new(ModelSpec::new(ModelKind::SimpleCnn), 2, &Device::Cpu).unwrap();
        let (images, labels) = batch(7, 5);
        let e = m.evaluate(&images, &labels).unwrap();
        assert_eq!(e.samples, 7);
        let probs = m.predict(&images).unwrap();
        let hits = probs
            .iter()
            .zip(&labels)
            .filter(|(p, &l)| {
                let best = (0..10).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
                best == l as usize
            })
            .count();
        assert_eq!(hits as u32, e.correct);
        let loss: f64 = probs
            .iter()
            .zip(&labels)
            .map(|(p, &l)| -(p[l as usize] as f64).ln())
            .sum();
        assert!((loss - e.loss_sum).abs() < 1e-3 * loss.max(1.0));
    }
}
