//! The FMA peak of one core, for judging the kernels against it: twelve
//! independent chains of fused multiply-adds (enough to hide the latency),
//! in 512-bit (AVX-512F) and 256-bit (AVX2 + FMA) vectors, where the CPU has
//! them. Prints GFLOP/s per width (an FMA counts as two flops).
//!
//!     cargo run --release -p kernels --example fma_peak

use std::time::Instant;

const CHAINS: usize = 12;
const ROUNDS: usize = 50_000_000;

#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use super::{CHAINS, ROUNDS};

    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn zmm() -> f32 {
        let mut a = [_mm512_set1_ps(1.0); CHAINS];
        let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..ROUNDS {
            for x in a.iter_mut() {
                *x = _mm512_fmadd_ps(*x, b, c);
            }
        }
        a.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ymm() -> f32 {
        let mut a = [_mm256_set1_ps(1.0); CHAINS];
        let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..ROUNDS {
            for x in a.iter_mut() {
                *x = _mm256_fmadd_ps(*x, b, c);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = 0.0;
        for x in a {
            _mm256_storeu_ps(lanes.as_mut_ptr(), x);
            sum += lanes.iter().sum::<f32>();
        }
        sum
    }
}

fn report(width: &str, lanes: usize, run: impl Fn() -> f32) {
    for _ in 0..2 {
        let started = Instant::now();
        let check = run();
        let secs = started.elapsed().as_secs_f64();
        let flops = (ROUNDS * CHAINS * lanes * 2) as f64;
        println!(
            "{width}: {:.1} GFLOP/s per core (checksum {check})",
            flops / secs / 1e9
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just now).
            report("512-bit", 16, || unsafe { wide::zmm() });
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked just now).
            report("256-bit", 8, || unsafe { wide::ymm() });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("no x86-64 vectors to measure");
}
