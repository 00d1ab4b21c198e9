//! ReLU with a one-pass backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, with_values};

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// `max(x, 0)` as a candle op; its backward passes the gradient where the output is positive.
struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "gradcast-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                y.iter_mut().zip(x).for_each(|(y, &x)| *y = x.max(0.0));
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = super::Prof::new("relu-bwd", &arg.dims());
        let dx = with_values(res, |y| {
            with_values(grad, |dy| {
                let mut dx = vec![0f32; y.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(y.par_chunks(CHUNK))
                    .zip(dy.par_chunks(CHUNK))
                    .for_each(|((dx, y), dy)| {
                        for ((d, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                            *d = if y > 0.0 { g } else { 0.0 };
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `max(x, 0)`: one fused op on the CPU, candle's `relu` elsewhere.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.relu();
    }
    x.contiguous()?.apply_op1(ReluOp)
}
