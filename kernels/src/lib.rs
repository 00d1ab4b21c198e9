//! Fast CPU training kernels as candle custom ops with hand-written
//! backwards: convolution (on one of the paths of `conv::ConvPath`, chosen
//! per shape), convolution fused with training BatchNorm, with ReLU and 2×2
//! max-pool, or with a residual sum; whole runs of ResNet residual blocks;
//! BatchNorm (training and inference), k×k max-pooling, ReLU and dropout.
//!
//! Every op falls back to candle's own implementation on devices other than
//! the CPU. The unfused ops have `*_reference` twins (candle's path on every
//! device); the tests compare every op, fused ones included, with the same
//! computation composed of candle's ops, and the `model` crate's networks
//! can be built on either.

#![deny(unsafe_op_in_unsafe_fn)]

mod bn;
mod bn_rows;
mod conv;
mod conv_bn;
mod conv_pool;
mod dense;
mod direct;
mod dropout;
mod path;
mod pool;
mod relu;
mod residual;

#[cfg(test)]
mod tests;

pub use bn::{
    batch_norm_eval, batch_norm_eval_reference, batch_norm_train, batch_norm_train_reference,
};
#[cfg(test)]
use conv::conv2d;
pub use conv::{conv2d_act, conv2d_add_relu_inference, conv2d_reference};
pub use conv_bn::conv_bn_train;
pub use conv_pool::conv2d_relu_pool;
pub use dense::{dense, dense_reference, dense_with_slot, GradSlot, Taken};
pub use direct::choices::{check_plan as check_kernel_plan, KERNEL_PLAN_VAR};
pub use dropout::{dropout, dropout_reference};
pub use path::{cpu_has_avx512, kernel_path, KernelPath, KERNEL_PATH_VAR};
pub use pool::{max_pool2d, max_pool2d_reference};
pub use relu::{add_relu, relu};
pub use residual::{residual_blocks_train, BlockLayers, ConvBnLayer};

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Threads in rayon's global pool (sized by `RAYON_NUM_THREADS`, like candle).
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// The contiguous `f32` values a CPU storage holds under `layout`.
fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("kernel input must be contiguous"),
    }
}

/// Runs `f` on the contiguous `f32` values of a CPU tensor.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu_slice(cpu, layout)?),
        _ => bail!("kernel backward only runs on the CPU"),
    }
}

/// A new buffer of `len` values made in parallel, `chunk` values per task:
/// `fill(i, out)` writes chunk `i` (elements `i * chunk ..`) through
/// `MaybeUninit::write`, so no zero-filling pass comes first (see
/// [`uninit_buffer`] for what that pass costs) and no reference to an
/// unwritten `f32` ever exists (with debug assertions on, the buffer starts
/// as NaN: see [`uninit_buffer`]).
///
/// # Safety
///
/// `fill` must write every element of every chunk it is given.
unsafe fn par_fill(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v = uninit_buffer(len);
    v.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, out)| fill(i, out));
    // SAFETY: the caller's `fill` wrote every element.
    unsafe { assume_init(v) }
}

/// A place a kernel writes one output value into: an `f32`, or the
/// `MaybeUninit<f32>` of a buffer that starts unwritten ([`uninit_buffer`]).
/// Kernels that store every value of their output are generic over it, so
/// the same code fills initialised and unwritten buffers.
pub(crate) trait Slot {
    /// Writes `v` here.
    fn set(&mut self, v: f32);
}

impl Slot for f32 {
    #[inline(always)]
    fn set(&mut self, v: f32) {
        *self = v;
    }
}

impl Slot for MaybeUninit<f32> {
    #[inline(always)]
    fn set(&mut self, v: f32) {
        self.write(v);
    }
}

/// A buffer of `len` values for an output a kernel writes entirely before
/// anything reads it, without the zero-filling pass (measured: 5–6 % of a
/// resnet20 training step in `memset`); candle allocates its own outputs the
/// same way. The values are written through [`Slot`] and the buffer becomes
/// `f32` by [`assume_init`] once all are. With debug assertions on (the
/// kernel tests' debug run) it starts as NaN, so that a value a kernel
/// forgets shows up in the comparison with candle instead of a recycled
/// block's old data.
fn uninit_buffer(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Box::<[f32]>::new_uninit_slice(len).into_vec();
    if cfg!(debug_assertions) {
        v.iter_mut().for_each(|x| {
            x.write(f32::NAN);
        });
    }
    v
}

/// The values of a buffer every element of which has been written.
///
/// # Safety
///
/// Every element of `v` must be initialised.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, the allocation is
    // handed over whole (pointer, length, capacity), and the caller
    // guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<f32>(), len, cap) }
}

/// [`assume_init`] for a part of a buffer.
///
/// # Safety
///
/// Every element of `s` must be initialised.
unsafe fn assume_init_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees every element is initialised.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
}

/// `Σ f(a_i, b_i)` over two slices with eight independent accumulators.
fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum::<f32>()
}

/// Row-major matrix view: `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst (m×n, row-major, row stride n) = [dst +] lhs (m×k) · rhs (k×n)`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: `dst` holds `m·n` initialised values.
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr(), accumulate, lhs, rhs, par) }
}

/// [`gemm`] storing into a buffer not written yet, `dst = lhs · rhs`:
/// afterwards its first `m·n` values are written.
fn gemm_store(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    lhs: Mat,
    rhs: Mat,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, `dst` has room for
    // `m·n` values, and without `accumulate` nothing is read from it.
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr().cast(), false, lhs, rhs, par) }
}

/// The body of [`gemm`] and [`gemm_store`]: writes all `m·n` values of
/// `dst` (row stride `n`), reading them first only when `accumulate`.
///
/// # Safety
///
/// `dst` must be valid for writes of `m·n` values, and initialised when
/// `accumulate`.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    par: gemm::Parallelism,
) {
    assert!(m == 0 || k == 0 || lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs);
    assert!(k == 0 || n == 0 || rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m * n {
                // SAFETY: `dst` is valid for `m·n` writes (the caller's contract).
                unsafe { dst.add(i).write(0.0) };
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the strides reach in bounds,
    // and the caller's contract covers `dst`; the gemm crate reads `dst` only
    // when asked to (`accumulate`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Gemm parallelism for `threads` threads.
fn parallelism(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// Per-op timing on stderr when `GRADCAST_KERNEL_PROFILE` is set: one
/// `PROF <op> <ms> <shape>` line per kernel call (a profiling aid).
pub(crate) struct Prof(&'static str, String, std::time::Instant);

/// Whether `GRADCAST_KERNEL_PROFILE` asks for timing lines (read once).
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("GRADCAST_KERNEL_PROFILE").is_some())
}

impl Prof {
    pub(crate) fn new(what: &'static str, shape: &impl std::fmt::Debug) -> Option<Self> {
        profiling().then(|| Prof(what, format!("{shape:?}"), std::time::Instant::now()))
    }
}

/// The time inside one op split into its parts, summed over the threads
/// that run them (a profiling aid: inert unless `GRADCAST_KERNEL_PROFILE`
/// is set). Each task keeps a [`Lap`]; [`Laps::print`] writes one `PROF
/// <op>-parts` line of CPU milliseconds per part.
pub(crate) struct Laps<const N: usize> {
    names: [&'static str; N],
    ms: std::sync::Mutex<[f64; N]>,
}

impl<const N: usize> Laps<N> {
    pub(crate) fn new(names: [&'static str; N]) -> Self {
        Self {
            names,
            ms: std::sync::Mutex::new([0.0; N]),
        }
    }

    /// A task's clock (stopped unless profiling).
    pub(crate) fn lap(&self) -> Lap<'_, N> {
        Lap {
            laps: self,
            at: profiling().then(std::time::Instant::now),
            ms: [0.0; N],
        }
    }

    /// Writes the line, if profiling.
    pub(crate) fn print(&self, what: &str, shape: &impl std::fmt::Debug) {
        if !profiling() {
            return;
        }
        let Ok(ms) = self.ms.lock() else { return };
        let parts: Vec<String> = self
            .names
            .iter()
            .zip(ms.iter())
            .map(|(n, v)| format!("{n} {v:.2}"))
            .collect();
        eprintln!("PROF {what}-parts ms (CPU): {} {shape:?}", parts.join(", "));
    }
}

/// One task's share of [`Laps`], added to them when dropped.
pub(crate) struct Lap<'a, const N: usize> {
    laps: &'a Laps<N>,
    at: Option<std::time::Instant>,
    ms: [f64; N],
}

impl<const N: usize> Lap<'_, N> {
    /// Charges the time since the previous mark to part `i`.
    pub(crate) fn mark(&mut self, i: usize) {
        if let Some(at) = self.at {
            let now = std::time::Instant::now();
            self.ms[i] += (now - at).as_secs_f64() * 1e3;
            self.at = Some(now);
        }
    }
}

impl<const N: usize> Drop for Lap<'_, N> {
    fn drop(&mut self) {
        if self.at.is_some() {
            if let Ok(mut ms) = self.laps.ms.lock() {
                ms.iter_mut().zip(self.ms).for_each(|(a, b)| *a += b);
            }
        }
    }
}

impl Drop for Prof {
    fn drop(&mut self) {
        let ms = self.2.elapsed().as_secs_f64() * 1e3;
        eprintln!("PROF {} {ms:.2}ms {}", self.0, self.1);
    }
}
