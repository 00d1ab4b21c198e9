//! One convolution layer's time, forward and forward + backward, on random
//! data: the fastest of `REPS` runs (on a machine shared with other work the
//! fastest run is the one least disturbed), so that a change to one kernel
//! can be judged without a whole model's noise.
//!
//!     cargo run --release -p kernels --example conv_layer -- CIN COUT HW [BATCH] [REPS] [K]
//!
//! e.g. `16 16 32` for resnet20's first stage (3×3, stride 1, padding 1).
//! Threads: rayon's default (one per core), or `RAYON_NUM_THREADS`.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn fastest(
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: conv_layer CIN COUT HW [BATCH=128] [REPS=20] [K=3]");
        std::process::exit(2);
    }
    let (cin, cout, hw) = (arg(&args, 0, 16), arg(&args, 1, 16), arg(&args, 2, 32));
    let (batch, reps, k) = (arg(&args, 3, 128), arg(&args, 4, 20), arg(&args, 5, 3));
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, cin, hw, hw), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, k, k), &dev)?)?;
    let b = Var::from_tensor(&Tensor::zeros(cout, candle_core::DType::F32, &dev)?)?;
    let (lo, hi) = ((k - 1) / 2, k / 2);
    let pad = [lo, hi, lo, hi];
    let forward = || kernels::conv2d_act(&x, &w, Some(&b), 1, pad, true, false);
    // Warm-up: the first use of a shape makes its plan.
    forward()?.sum_all()?.backward()?;
    let fwd = fastest(reps, || forward().map(drop))?;
    let both = fastest(reps, || forward()?.sum_all()?.backward().map(drop))?;
    let flops = 2.0 * (batch * cin * cout * hw * hw * k * k) as f64;
    println!(
        "conv {cin}->{cout} {hw}x{hw} k{k} batch {batch}: forward {:.2} ms ({:.0} GFLOP/s direct-equivalent), forward+backward {:.2} ms",
        fwd.as_secs_f64() * 1e3,
        flops / fwd.as_secs_f64() / 1e9,
        both.as_secs_f64() * 1e3
    );
    Ok(())
}
