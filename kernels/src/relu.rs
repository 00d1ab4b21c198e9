//! ReLU, and the residual `ReLU(a + b)`, with one-pass backwards.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

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
        // SAFETY: chunk `i` of `y` is as long as the same chunk of `x`, and
        // the zip writes all of it.
        let y = unsafe {
            super::par_fill(x.len(), CHUNK, |i, y| {
                y.iter_mut().zip(&x[i * CHUNK..]).for_each(|(y, &x)| {
                    y.write(x.max(0.0));
                });
            })
        };
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _t = super::Prof::new("relu-bwd", &res.dims());
        Ok(Some(masked(res, grad)?))
    }
}

/// `max(x, 0)`: one fused op on the CPU, candle's `relu` elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.relu();
    }
    x.contiguous()?.apply_op1(ReluOp)
}

/// `max(a + b, 0)` as one candle op (a residual connection); its backward
/// passes the gradient, where the output is positive, to both inputs.
struct AddReluOp;

/// `dy` where `y > 0`, else 0.
pub(super) fn masked(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let dx = with_values(y, |y| {
        with_values(grad, |dy| {
            if dy.len() != y.len() {
                bail!(
                    "relu backward: gradient of {} values for {}",
                    dy.len(),
                    y.len()
                );
            }
            // SAFETY: `y` and `dy` have the same length (checked above), so
            // the zip writes every value of each chunk.
            let dx = unsafe {
                super::par_fill(y.len(), CHUNK, |i, dx| {
                    let (y, dy) = (&y[i * CHUNK..], &dy[i * CHUNK..]);
                    for ((d, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                        d.write(if y > 0.0 { g } else { 0.0 });
                    }
                })
            };
            Ok(dx)
        })
    })?;
    Tensor::from_vec(dx, y.shape(), y.device())
}

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "gradcast-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "add-relu: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let (a, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        // SAFETY: same shapes (checked above): the zip writes every value
        // of each chunk.
        let y = unsafe {
            super::par_fill(a.len(), CHUNK, |i, y| {
                let (a, b) = (&a[i * CHUNK..], &b[i * CHUNK..]);
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    y.write((a + b).max(0.0));
                }
            })
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = masked(res, grad)?;
        Ok((Some(d.clone()), Some(d)))
    }
}

/// `max(a + b, 0)`: one fused op on the CPU, candle's add and `relu` elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != candle_core::DType::F32 || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}
