//! Inverted dropout: a mask drawn in parallel from one seed, applied and
//! differentiated as one op.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use data::Rng;
use rayon::prelude::*;

use super::{cpu_slice, with_values};

/// Mask values per random stream (and per parallel task).
const CHUNK: usize = 1 << 14;

/// The mask of `n` values: `1 / (1 − p)` (kept) or 0 (dropped, with
/// probability `p`). Chunk `j` of [`CHUNK`] values draws from
/// `Rng::derive(seed, [j])`, two 24-bit uniforms per 64-bit draw, so the mask
/// depends on `seed` and `n` alone, not on the thread count.
pub(crate) fn dropout_mask(n: usize, p: f32, seed: u64) -> Vec<f32> {
    let scale = 1.0 / (1.0 - p);
    let unit = 1.0 / (1u32 << 24) as f32;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(j, chunk)| {
            let mut rng = Rng::derive(seed, &[j as u64]);
            for pair in chunk.chunks_mut(2) {
                let bits = rng.next_u64();
                let u = [
                    (bits >> 40) as f32 * unit,
                    ((bits >> 8) & 0xFF_FFFF) as f32 * unit,
                ];
                for (m, u) in pair.iter_mut().zip(u) {
                    *m = if u >= p { scale } else { 0.0 };
                }
            }
        });
    mask
}

/// `x · mask` as a candle op; its backward is `dy · mask`.
struct DropoutOp {
    mask: Vec<f32>,
}

fn times_mask(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16).zip(mask.par_chunks(1 << 16)))
        .for_each(|(y, (x, m))| {
            for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
                *y = x * m;
            }
        });
    y
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "gradcast-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout)?;
        if x.len() != self.mask.len() {
            candle_core::bail!(
                "dropout: {} values for a mask of {}",
                x.len(),
                self.mask.len()
            );
        }
        Ok((
            CpuStorage::F32(times_mask(x, &self.mask)),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(grad, |dy| Ok(times_mask(dy, &self.mask)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Inverted dropout of `x` with the mask [`dropout_mask`] draws from `seed`:
/// one op on the CPU, a multiplication by the same mask elsewhere.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return dropout_reference(x, p, seed);
    }
    let mask = dropout_mask(x.elem_count(), p, seed);
    x.contiguous()?.apply_op1(DropoutOp { mask })
}

/// [`dropout`] as candle's multiplication by the mask.
pub fn dropout_reference(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mask = dropout_mask(x.elem_count(), p, seed);
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}
