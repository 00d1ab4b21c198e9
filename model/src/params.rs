//! The parameter registry: every trainable tensor and every state tensor of
//! a network, in the order of the flat buffers that travel between
//! coordinator and nodes, with their names, shapes and L2 factors.

use candle_core::{Device, Tensor, Var};
use data::Rng;

use crate::init::Init;
use crate::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Name and shape of one tensor of a flat buffer, and its L2 factor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Checkpoint-style name, e.g. `stack2.block0.layer1.conv.weight`.
    pub name: String,
    /// Shape (PyTorch layout: conv kernels are `(out, in, kh, kw)`, dense `(out, in)`).
    pub shape: Vec<usize>,
    /// L2 regularisation factor: the loss gains `l2 · Σ w²`.
    pub l2: f32,
}

impl TensorInfo {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Creates the parameters of a network in order, with names and initial
/// values drawn from one seeded stream.
pub(crate) struct Registry {
    pub device: Device,
    /// Whether layers use the fast CPU kernels (the `kernels` crate) or candle's own ops.
    pub fast: bool,
    pub rng: Rng,
    pub params: Vec<(TensorInfo, Var)>,
    pub buffers: Vec<(TensorInfo, Var)>,
    /// Per parameter, where its layer leaves its gradient when the layer
    /// bypasses candle's gradient store (`kernels::dense_with_slot`).
    pub slots: Vec<Option<kernels::GradSlot>>,
}

impl Registry {
    pub fn new(seed: u64, device: Device, fast: bool) -> Self {
        Self {
            device,
            fast,
            rng: Rng::derive(seed, &[0x1217]),
            params: Vec::new(),
            buffers: Vec::new(),
            slots: Vec::new(),
        }
    }

    fn make(&mut self, shape: &[usize], init: Init) -> Result<Var> {
        let n = shape.iter().product();
        let values = init.sample(n, &mut self.rng);
        Ok(Var::from_tensor(&Tensor::from_vec(
            values,
            shape,
            &self.device,
        )?)?)
    }

    /// A trainable parameter; `l2` is its L2 regularisation factor (0 for none).
    pub fn param(&mut self, name: String, shape: &[usize], init: Init, l2: f32) -> Result<Var> {
        let var = self.make(shape, init)?;
        self.params.push((
            TensorInfo {
                name,
                shape: shape.to_vec(),
                l2,
            },
            var.clone(),
        ));
        self.slots.push(None);
        Ok(var)
    }

    /// [`Registry::param`] whose gradient its layer leaves in the returned
    /// slot instead of candle's gradient store (see `slots`).
    pub fn param_with_slot(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        l2: f32,
    ) -> Result<(Var, kernels::GradSlot)> {
        let var = self.param(name, shape, init, l2)?;
        let slot = kernels::GradSlot::default();
        if let Some(s) = self.slots.last_mut() {
            *s = Some(slot.clone());
        }
        Ok((var, slot))
    }

    /// A non-trainable state tensor, and its index among the buffers.
    pub fn buffer(&mut self, name: String, shape: &[usize], init: Init) -> Result<(usize, Var)> {
        let var = self.make(shape, init)?;
        self.buffers.push((
            TensorInfo {
                name,
                shape: shape.to_vec(),
                l2: 0.0,
            },
            var.clone(),
        ));
        Ok((self.buffers.len() - 1, var))
    }
}
