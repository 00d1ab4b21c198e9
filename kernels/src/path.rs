//! Which convolution paths the kernels may take on this machine, and the
//! override that forces one, so that every path is tested on any machine
//! that can run it.
//!
//! `GRADCAST_KERNEL_PATH` (read once, at the first convolution):
//! - `auto` (default): the direct kernels in AVX-512 where the CPU has
//!   AVX-512F, else in AVX2 where it has AVX2 and FMA, else the portable
//!   direct path (a gemm per tap) where it pays, and im2col + gemm for the
//!   rest;
//! - `avx2`: the direct kernels in AVX2 even where AVX-512 is present (as on
//!   a CPU without it; refused on a CPU without AVX2 and FMA);
//! - `measure`: as `auto`, but each convolution shape takes the faster of
//!   the paths open to it, timed once at its first use: on a CPU with both
//!   AVX-512 and AVX2 the vector width, and on any CPU with either the
//!   direct kernel or Winograd's transforms and the weight gradient's form
//!   (`GRADCAST_KERNEL_PROFILE=1` prints the timings and the choice). A
//!   choice always gives the same bits, but the choice itself can differ
//!   from run to run, so `measure` alone gives up bit-reproducible runs;
//!   with `GRADCAST_KERNEL_PLAN=FILE` the choices are kept in FILE and a
//!   rerun with it makes the same ones (`direct::choices`);
//! - `portable`: as if the CPU had neither (the portable direct path and
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
    /// The direct kernels in AVX2 vectors.
    Avx2,
    /// Per shape, the faster of the AVX-512 and AVX2 kernels.
    Measure,
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
            "avx2" => Some(Self::Avx2),
            "measure" => Some(Self::Measure),
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
            panic!("{KERNEL_PATH_VAR}={v:?}: expected auto, measure, avx2, portable or im2col")
        }),
    })
}

/// The vectors of the direct kernels (`crate::direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit, AVX-512F.
    Avx512,
    /// 256-bit, AVX2 and FMA.
    Avx2,
}

/// Which vectors the direct kernels use in this process (None: they do not
/// run: no AVX-512 nor AVX2, or a path without them is forced).
///
/// # Panics
///
/// When `avx2` is forced on a CPU without AVX2 and FMA.
pub fn direct_isa() -> Option<Isa> {
    match kernel_path() {
        KernelPath::Auto | KernelPath::Measure if cpu_has_avx512() => Some(Isa::Avx512),
        KernelPath::Auto | KernelPath::Measure if cpu_has_avx2() => Some(Isa::Avx2),
        KernelPath::Avx2 if cpu_has_avx2() => Some(Isa::Avx2),
        KernelPath::Avx2 => panic!("{KERNEL_PATH_VAR}=avx2, but this CPU has no AVX2 and FMA"),
        _ => None,
    }
}

/// Whether each shape's vectors are chosen by timing (`measure`, on a CPU
/// that has both).
pub(crate) fn measuring() -> bool {
    kernel_path() == KernelPath::Measure && cpu_has_avx512() && cpu_has_avx2()
}

/// Whether the choices within one vector width (Winograd or the direct
/// kernel, the weight gradient's form) are made by timing each shape:
/// `measure`, on any CPU the direct kernels run on.
pub(crate) fn measuring_shapes() -> bool {
    kernel_path() == KernelPath::Measure && direct_isa().is_some()
}

/// Whether a direct (im2col-free) path may be taken at all.
pub(crate) fn direct_allowed() -> bool {
    kernel_path() != KernelPath::Im2col
}

/// Whether this CPU has AVX2 and FMA (the standard library caches the answer).
pub fn cpu_has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
        assert_eq!(KernelPath::parse("AVX2"), Some(KernelPath::Avx2));
        assert_eq!(KernelPath::parse("measure"), Some(KernelPath::Measure));
        assert_eq!(KernelPath::parse("im2co1"), None);
        assert_eq!(KernelPath::parse("avx512"), None);
    }

    #[test]
    fn the_forced_path_is_the_one_this_process_takes() {
        let wanted = std::env::var(KERNEL_PATH_VAR)
            .ok()
            .and_then(|v| KernelPath::parse(&v))
            .unwrap_or(KernelPath::Auto);
        assert_eq!(kernel_path(), wanted);
        let isa = match wanted {
            KernelPath::Auto | KernelPath::Measure if cpu_has_avx512() => Some(Isa::Avx512),
            KernelPath::Auto | KernelPath::Measure | KernelPath::Avx2 if cpu_has_avx2() => {
                Some(Isa::Avx2)
            }
            _ => None,
        };
        assert_eq!(direct_isa(), isa);
        assert_eq!(direct_allowed(), wanted != KernelPath::Im2col);
        eprintln!(
            "kernel path {:?} (direct kernels: {:?})",
            kernel_path(),
            isa
        );
    }
}
