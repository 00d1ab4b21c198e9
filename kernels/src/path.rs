//! Which convolution paths the kernels may take on this machine, and the
//! override that forces one, so that every path is tested on any machine
//! that can run it.
//!
//! `GRADCAST_KERNEL_PATH` (read once, at the first convolution):
//! - `auto` (default): the direct AVX-512 kernels where the CPU has
//!   AVX-512F, else the portable direct path (a gemm per tap) where it pays,
//!   and im2col + gemm for the rest;
//! - `portable`: as if the CPU had no AVX-512 (the portable direct path and
//!   im2col + gemm);
//! - `im2col`: im2col + gemm only.
//!
//! Each path gives the same results up to float rounding (the kernel tests
//! compare every one with candle's own ops); one path always gives the same
//! bits.

use std::sync::OnceLock;

/// The environment variable that forces a path.
pub const KERNEL_PATH_VAR: &str = "GRADCAST_KERNEL_PATH";

/// A choice of convolution paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// The fastest this CPU runs (AVX-512 direct kernels where present).
    Auto,
    /// No AVX-512 kernels.
    Portable,
    /// im2col + gemm only, no direct path.
    Im2col,
}

impl KernelPath {
    /// Reads a value of [`KERNEL_PATH_VAR`].
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Self::Auto),
            "portable" => Some(Self::Portable),
            "im2col" => Some(Self::Im2col),
            _ => None,
        }
    }
}

/// The path chosen for this process: [`KERNEL_PATH_VAR`], or `Auto`.
///
/// # Panics
///
/// On a value of [`KERNEL_PATH_VAR`] that is not a path: a silently ignored
/// override would make a test of one path pass on another.
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| match std::env::var(KERNEL_PATH_VAR) {
        Err(_) => KernelPath::Auto,
        Ok(v) => KernelPath::parse(&v).unwrap_or_else(|| {
            panic!("{KERNEL_PATH_VAR}={v:?}: expected auto, portable or im2col")
        }),
    })
}

/// Whether the AVX-512 kernels run: the CPU has AVX-512F and no override
/// turns them off.
pub(crate) fn avx512() -> bool {
    kernel_path() == KernelPath::Auto && cpu_has_avx512()
}

/// Whether a direct (im2col-free) path may be taken at all.
pub(crate) fn direct_allowed() -> bool {
    kernel_path() != KernelPath::Im2col
}

/// Whether this CPU has AVX-512F (the standard library caches the answer).
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_typos_are_refused() {
        assert_eq!(KernelPath::parse("auto"), Some(KernelPath::Auto));
        assert_eq!(KernelPath::parse(""), Some(KernelPath::Auto));
        assert_eq!(KernelPath::parse("Portable"), Some(KernelPath::Portable));
        assert_eq!(KernelPath::parse(" im2col "), Some(KernelPath::Im2col));
        assert_eq!(KernelPath::parse("im2co1"), None);
        assert_eq!(KernelPath::parse("avx2"), None);
    }

    #[test]
    fn the_forced_path_is_the_one_this_process_takes() {
        let wanted = std::env::var(KERNEL_PATH_VAR)
            .ok()
            .and_then(|v| KernelPath::parse(&v))
            .unwrap_or(KernelPath::Auto);
        assert_eq!(kernel_path(), wanted);
        assert_eq!(avx512(), wanted == KernelPath::Auto && cpu_has_avx512());
        assert_eq!(direct_allowed(), wanted != KernelPath::Im2col);
        eprintln!(
            "kernel path {:?} (AVX-512 kernels: {})",
            kernel_path(),
            avx512()
        );
    }
}
