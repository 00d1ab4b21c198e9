//! The seed networks of gradcast (simple CNN, complex CNN, ResNet v1 for
//! CIFAR-10) written with candle, with Keras semantics: "same"/"valid" padding,
//! Keras initialisers, BatchNorm momentum 0.99 / epsilon 1e-3.
//!
//! A [`Model`] owns its parameters and exposes them as one flat `f32` buffer
//! (trainable parameters, then BatchNorm running statistics) in a fixed order
//! described by [`TensorInfo`]s, so that the rest of gradcast can move and
//! average weights and gradients without knowing the network.
//!
//! This crate knows nothing of gRPC, of the coordinator or of nodes.

pub mod bench;
mod block_cache;
mod checkpoint;
mod device;
#[cfg(test)]
mod engine_tests;
mod error;
mod init;
mod layers;
mod nets;
mod network;
mod params;
mod spec;

pub use block_cache::BlockCache;
pub use checkpoint::{save_checkpoint, Checkpoint, MODEL_KEY};
pub use device::DeviceChoice;
pub use error::ModelError;
pub use kernels::check_kernel_plan;
pub use layers::same_padding;
pub use network::{Engine, EvalOutput, Model, StepOutput, StepStats};
pub use params::TensorInfo;
pub use spec::{ModelKind, ModelSpec};

/// Tunes the C allocator for training (see [`use_threads`]): no trimming of
/// the heap and no `mmap` for large blocks, so that freed memory stays in the
/// process. This alone did not stop large activation buffers from
/// page-faulting in again every step on the machines measured; the binaries'
/// [`BlockCache`] allocator does that, and this keeps what it passes on to
/// glibc (smaller blocks, and large ones once its cache is full) in the
/// process too. Does nothing off glibc.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Sizes the compute threads of this process: `threads` for rayon (the
/// fast kernels and candle's own CPU ops), and a short spin for the idle
/// workers of candle's barrier pool (`CANDLE_BARRIER_POOL_SPIN_LIMIT=1000`
/// unless the user set it; candle's default of 25 000 spins after every
/// elementwise op keeps a core busy that the next kernel needs). Measured,
/// resnet20 training at 2 threads, medians of 4 runs: 650 img/s with the
/// default spin, 714 with no barrier-pool workers at all, and, at a later
/// commit, 862 without workers against 882–889 with a 100–3000 spin.
/// Also tunes the allocator. Call once at start-up, before any candle or
/// rayon work.
///
/// # Safety
/// This writes the process environment (candle reads its settings from
/// there), which is undefined behaviour if another thread reads or writes
/// the environment at the same time. Call it while the process has only
/// one thread: before starting an async runtime, a thread pool or any
/// thread.
pub unsafe fn use_threads(threads: usize) {
    std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    tune_allocator();
}

/// Re-exported so callers can name devices without depending on candle.
pub use candle_core::{Device, DeviceLocation};
