//! Training and inference throughput of one model on random data (the
//! `bench` binary and `gradcast bench`).
//!
//! ```text
//! bench --model resnet20 [--batch-size 128] [--threads 2] [--steps 10] [--warmup 2] [--mode train|eval|both] [--reference]
//! ```
//!
//! Prints one JSON line per measurement (median over the steps):
//! `{"engine":"gradcast","model":...,"mode":"train"|"eval","batch_size":...,"threads":...,"img_per_s":...}`;
//! training lines also carry the median forward and backward seconds.

use std::time::{Duration, Instant};

use crate::{Device, Engine, Model, ModelKind, ModelSpec};
use data::{Rng, IMAGE_BYTES};

struct Args {
    model: String,
    batch: usize,
    threads: usize,
    steps: usize,
    warmup: usize,
    reference: bool,
    device: String,
    /// Measure training, inference or both (profiling one of them).
    train: bool,
    eval: bool,
}

const USAGE: &str =
    "usage: bench --model NAME [--batch-size N] [--threads N] [--steps N] [--warmup N] [--mode train|eval|both] [--reference] [--device cpu|cuda[:N]]";

fn parse(argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        model: String::new(),
        batch: 128,
        threads: 2,
        steps: 10,
        warmup: 2,
        reference: false,
        device: "cpu".into(),
        train: true,
        eval: true,
    };
    let mut it = argv;
    while let Some(flag) = it.next() {
        if flag == "--reference" {
            args.reference = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--model" => args.model = value.clone(),
            "--device" => args.device = value.clone(),
            "--mode" => {
                (args.train, args.eval) = match value.as_str() {
                    "train" => (true, false),
                    "eval" => (false, true),
                    "both" => (true, true),
                    _ => return Err(format!("--mode: train, eval or both, not {value}")),
                }
            }
            "--batch-size" => args.batch = number()?,
            "--threads" => args.threads = number()?,
            "--steps" => args.steps = number()?,
            "--warmup" => args.warmup = number()?,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if args.model.is_empty() {
        return Err(USAGE.into());
    }
    if args.batch == 0 || args.threads == 0 || args.steps == 0 {
        return Err("--batch-size, --threads and --steps must be positive".into());
    }
    Ok(args)
}

fn device(name: &str) -> Result<Device, String> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| format!("unknown device {name}"))?,
        None => return Err(format!("unknown device {name}; use cpu or cuda[:N]")),
    };
    Device::new_cuda(ordinal).map_err(|e| format!("--device {name}: {e}"))
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn run(args: &Args) -> Result<(), String> {
    let kind: ModelKind = args.model.parse().map_err(|e| format!("{e}"))?;
    let engine = if args.reference {
        Engine::Reference
    } else {
        Engine::Fast
    };
    let m = Model::with_engine(ModelSpec::new(kind), 1, &device(&args.device)?, engine)
        .map_err(|e| e.to_string())?;
    let mut rng = Rng::new(42);
    let images: Vec<u8> = (0..args.batch * IMAGE_BYTES)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u8> = (0..args.batch).map(|_| rng.below(10) as u8).collect();
    let line = |mode: &str, secs: f64, extra: String| {
        println!(
            "{{\"engine\":\"gradcast\",\"model\":\"{}\",\"mode\":\"{mode}\",\"batch_size\":{},\"threads\":{},\"img_per_s\":{:.2},\"reference\":{},\"device\":\"{}\"{extra}}}",
            args.model,
            args.batch,
            args.threads,
            args.batch as f64 / secs,
            args.reference,
            args.device
        )
    };
    let (mut total, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    for step in (0..args.warmup + args.steps).filter(|_| args.train) {
        let start = Instant::now();
        let (_, f, b) = m
            .train_step_timed(&images, &labels, step as u64)
            .map_err(|e| e.to_string())?;
        if step >= args.warmup {
            total.push(start.elapsed());
            fwd.push(f);
            bwd.push(b);
        }
    }
    if args.train {
        let (f, b) = (median(fwd), median(bwd));
        line(
            "train",
            median(total),
            format!(",\"forward_s\":{f:.4},\"backward_s\":{b:.4}"),
        );
    }
    let mut total = Vec::new();
    for step in (0..args.warmup + args.steps).filter(|_| args.eval) {
        let start = Instant::now();
        m.evaluate(&images, &labels).map_err(|e| e.to_string())?;
        if step >= args.warmup {
            total.push(start.elapsed());
        }
    }
    if args.eval {
        line("eval", median(total), String::new());
    }
    Ok(())
}

/// Runs the benchmark with command-line style arguments (without the program
/// name) and prints its JSON lines. Sizes the thread pools and tunes the
/// allocator first ([`crate::use_threads`]), so call it before any other
/// candle work.
pub fn main_with_args(argv: impl Iterator<Item = String>) -> Result<(), String> {
    let argv: Vec<String> = argv.collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let args = parse(argv.into_iter())?;
    // Before any candle or rayon work: both size their pools from this.
    crate::use_threads(args.threads);
    run(&args)
}
