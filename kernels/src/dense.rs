//! The fully connected layer `y = x · Wᵀ + b` (`x`: `(n, in)`, `W`:
//! `(out, in)`, `b`: `(out)`) as one candle op.
//!
//! Written with candle's own operations (`x.matmul(&w.t())`), the weight's
//! gradient reaches the weight through the transpose's backward as a
//! transposed view, and candle's gradient store adds it to zeros with a
//! strided loop: for simple-cnn's 1.6 M-value dense layer that addition
//! alone took ~23 % of a batch-32 training step. Here the backward makes
//! `dW = dyᵀ · x` directly in `W`'s own `(out, in)` layout, and with a
//! [`GradSlot`] ([`dense_with_slot`]) keeps it out of candle's gradient
//! store altogether: the store adds every gradient it is handed to a fresh
//! tensor of zeros (a memset and an add over all 1.6 M values every step);
//! the slot just holds it for the model to read. Both together took
//! simple-cnn's batch-32 training step from ~1030 to ~1430 img/s.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use crate::{cpu_slice, gemm_store, threads, with_values, Mat};

/// Where [`dense_with_slot`]'s backward leaves the weight's gradient
/// (instead of handing it to candle's gradient store): held as a tensor, or
/// written straight into memory the caller bound for one step
/// ([`GradSlot::bind`]), which is also where the op then reads the weight
/// from. Binding lets a node train on the weights in a shared-memory segment
/// and write the gradient into its own segment without copying either
/// (simple-cnn's dense weight is 1.6 M values: two 6.4 MB copies per step).
#[derive(Clone, Default, Debug)]
pub struct GradSlot(Arc<Mutex<SlotState>>);

/// What a [`GradSlot`] has after a backward pass.
#[derive(Debug)]
pub enum Taken {
    /// No backward pass ran through the op since the last take.
    Empty,
    /// The weight's gradient.
    Held(Tensor),
    /// The gradient was written into the bound memory.
    Written,
}

#[derive(Default, Debug)]
struct SlotState {
    held: Option<Tensor>,
    bound: Option<Bound>,
    written: bool,
}

/// Memory bound to a slot for one step (see [`GradSlot::bind`]).
#[derive(Debug, Clone, Copy)]
struct Bound {
    weights: *const f32,
    grad: *mut f32,
    len: usize,
}

// SAFETY: `GradSlot::bind`'s caller keeps both regions valid and otherwise
// untouched until `unbind`; the op reads and writes them from whichever
// thread runs it, one step at a time (under the slot's lock).
unsafe impl Send for Bound {}

impl GradSlot {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, SlotState>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("dense: gradient slot poisoned".into()))
    }

    /// Empties the slot, returning what the last backward pass left.
    pub fn take(&self) -> Result<Taken> {
        let mut s = self.state()?;
        let written = std::mem::take(&mut s.written);
        Ok(match s.held.take() {
            Some(t) => Taken::Held(t),
            None if written => Taken::Written,
            None => Taken::Empty,
        })
    }

    /// Until [`GradSlot::unbind`], the op reads its weight's `len` values
    /// from `weights` (instead of the weight tensor, whose values it then
    /// ignores) and its backward writes the weight's gradient into `grad`
    /// (then [`GradSlot::take`] answers [`Taken::Written`]).
    ///
    /// # Safety
    ///
    /// `weights` must be valid for reads and `grad` for writes of `len`
    /// values, and nothing else may write `weights` or access `grad`, until
    /// `unbind` returns.
    pub unsafe fn bind(&self, weights: *const f32, grad: *mut f32, len: usize) -> Result<()> {
        let mut s = self.state()?;
        s.bound = Some(Bound { weights, grad, len });
        s.written = false;
        Ok(())
    }

    /// Forgets the memory given to [`GradSlot::bind`].
    pub fn unbind(&self) {
        // (A poisoned lock still gets its binding removed.)
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.bound = None;
    }
}

struct DenseOp {
    slot: Option<GradSlot>,
}

/// `(n, in, out)` of `x` `(n, in)` and `w` `(out, in)`, checked.
fn dims(x: &[usize], w: &[usize], b: usize) -> Result<(usize, usize, usize)> {
    let (&[n, fan_in], &[out, w_in]) = (x, w) else {
        bail!("dense: expected x (n, in) and weight (out, in), got {x:?} and {w:?}");
    };
    if fan_in != w_in || b != out {
        bail!("dense: x {x:?}, weight {w:?} and a bias of {b} values do not fit");
    }
    Ok((n, fan_in, out))
}

/// The `rows × len` product `lhs · rhs` as a new buffer (row-major), with
/// `lhs` (`rows × inner`) given as a [`Mat`] over its rows from the first
/// (`lhs_at(first_row)`: the view whose row 0 is that row) and `rhs`
/// `inner × len`; written straight into unwritten memory, one contiguous
/// run of rows per thread, each a single-threaded gemm (measured on
/// simple-cnn's 12544 → 128 layer: the gemm crate's own threads made the
/// forward slower than one thread; split by rows, the threads work on
/// independent outputs).
fn product_by_rows<'a>(
    dims: (usize, usize, usize),
    lhs_at: impl Fn(usize) -> Mat<'a> + Sync,
    rhs: Mat<'a>,
) -> Vec<f32> {
    let mut dst = crate::uninit_buffer(dims.0 * dims.1);
    product_into(dims, lhs_at, rhs, &mut dst);
    // SAFETY: `product_into` writes every value.
    unsafe { crate::assume_init(dst) }
}

/// [`product_by_rows`] into `dst` (`rows × len` values, every one written).
fn product_into<'a>(
    (rows, len, inner): (usize, usize, usize),
    lhs_at: impl Fn(usize) -> Mat<'a> + Sync,
    rhs: Mat<'a>,
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    debug_assert_eq!(dst.len(), rows * len);
    let run = |first: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
        let m = out.len() / len.max(1);
        gemm_store(
            (m, len, inner),
            out,
            lhs_at(first),
            rhs,
            gemm::Parallelism::None,
        );
    };
    let t = threads();
    // Below ~2^20 multiply-adds a second thread costs more than it saves.
    if t == 1 || rows < 2 || len == 0 || dst.len() * inner < 1 << 20 {
        run(0, dst);
    } else {
        let per = rows.div_ceil(t);
        dst.par_chunks_mut(per * len)
            .enumerate()
            .for_each(|(c, chunk)| run(c * per, chunk));
    }
}

impl DenseOp {
    /// The memory bound to the slot, if any.
    fn bound(&self) -> Result<Option<Bound>> {
        Ok(match &self.slot {
            Some(slot) => slot.state()?.bound,
            None => None,
        })
    }
}

/// The weight's values: the memory bound to the slot, if any (checked to be
/// as long as `own`), else `own`.
fn weights(bound: Option<Bound>, own: &[f32]) -> Result<&[f32]> {
    match bound {
        Some(b) if b.len != own.len() => bail!(
            "dense: {} weights bound for a weight of {}",
            b.len,
            own.len()
        ),
        // SAFETY: `GradSlot::bind`'s caller keeps `b.weights` valid for
        // `b.len` reads and unwritten until it unbinds, which is after the
        // step that runs this op (and so after `own`'s borrow here ends).
        Some(b) => Ok(unsafe { std::slice::from_raw_parts(b.weights, b.len) }),
        None => Ok(own),
    }
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        "gradcast-dense"
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
        let (n, fan_in, out) = dims(l1.dims(), l2.dims(), l3.shape().elem_count())?;
        let _t = crate::Prof::new("dense-fwd", &(n, fan_in, out));
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let x_at = |first: usize| Mat {
            data: &x[first * fan_in..],
            rs: fan_in,
            cs: 1,
        };
        // Wᵀ: element (i, o) of the (in, out) matrix is w[o·in + i].
        let wt = Mat {
            data: weights(self.bound()?, w)?,
            rs: 1,
            cs: fan_in,
        };
        let mut y = product_by_rows((n, out, fan_in), x_at, wt);
        for row in y.chunks_exact_mut(out.max(1)) {
            row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
        Ok((CpuStorage::F32(y), Shape::from_dims(&[n, out])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, fan_in, out) = dims(x.dims(), w.dims(), b.elem_count())?;
        let _t = crate::Prof::new("dense-bwd", &(n, fan_in, out));
        // With memory bound to the slot, W comes from there and dW goes
        // straight there.
        let bound = self.bound()?;
        let (dx, dw, db) = with_values(x, |xv| {
            with_values(w, |own| {
                let wv = weights(bound, own)?;
                with_values(grad, |dy| {
                    if dy.len() != n * out {
                        bail!(
                            "dense backward: gradient of {} values for {}",
                            dy.len(),
                            n * out
                        );
                    }
                    // dx (n, in) = dy (n, out) · W (out, in).
                    let dy_at = |first: usize| Mat {
                        data: &dy[first * out..],
                        rs: out,
                        cs: 1,
                    };
                    let w = Mat {
                        data: wv,
                        rs: fan_in,
                        cs: 1,
                    };
                    let dx = product_by_rows((n, fan_in, out), dy_at, w);
                    // dW (out, in) = dyᵀ (out, n) · x (n, in).
                    let dyt_at = |first: usize| Mat {
                        data: &dy[first..],
                        rs: 1,
                        cs: out,
                    };
                    let x = Mat {
                        data: xv,
                        rs: fan_in,
                        cs: 1,
                    };
                    let dims = (out, fan_in, n);
                    let dw = match bound {
                        Some(b) => {
                            // SAFETY: `GradSlot::bind`'s caller keeps
                            // `b.grad` valid for the weight's `out·in`
                            // values (`weights` checked the bound length)
                            // and untouched by others until it unbinds.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    b.grad.cast::<std::mem::MaybeUninit<f32>>(),
                                    out * fan_in,
                                )
                            };
                            product_into(dims, dyt_at, x, dst);
                            None
                        }
                        None => Some(product_by_rows(dims, dyt_at, x)),
                    };
                    // db = Σ over the batch of dy, row after row.
                    let mut db = vec![0f32; out];
                    for row in dy.chunks_exact(out) {
                        db.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
                    }
                    Ok((dx, dw, db))
                })
            })
        })?;
        let dev = x.device();
        // (`dw` is `None` exactly when it was written to bound memory,
        // which only a slot can have.)
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, w.shape(), dev))
            .transpose()?;
        let dw = match &self.slot {
            Some(slot) => {
                let mut s = slot.state()?;
                s.written = dw.is_none();
                s.held = dw;
                None
            }
            None => dw,
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            dw,
            Some(Tensor::from_vec(db, out, dev)?),
        ))
    }
}

/// `x · wᵀ + b` for `x` `(n, in)`, `w` `(out, in)`, `b` `(out)`: one op
/// on the CPU (see the module's note), candle's `matmul` elsewhere.
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    dense_op(x, w, b, None)
}

/// [`dense`] whose backward puts the weight's gradient in `slot` (the
/// gradient store then has none for `w`); candle's `matmul` off the CPU,
/// where the slot stays empty and the store has the gradient.
pub fn dense_with_slot(x: &Tensor, w: &Tensor, b: &Tensor, slot: &GradSlot) -> Result<Tensor> {
    dense_op(x, w, b, Some(slot.clone()))
}

fn dense_op(x: &Tensor, w: &Tensor, b: &Tensor, slot: Option<GradSlot>) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return dense_reference(x, w, b);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, DenseOp { slot })
}

/// [`dense`] with candle's own operations.
pub fn dense_reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}
