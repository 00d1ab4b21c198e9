//! Training and inference throughput of one model on random data.
//!
//! ```text
//! bench --model resnet20 [--batch-size 128] [--threads 2] [--steps 10] [--warmup 2] [--reference]
//! ```
//!
//! Prints one JSON line per measurement (median over the steps):
//! `{"engine":"gradcast","model":...,"mode":"train"|"eval","batch_size":...,"threads":...,"img_per_s":...}`;
//! training lines also carry the median forward and backward seconds.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use data::{Rng, IMAGE_BYTES};
use model::{Device, Engine, Model, ModelKind, ModelSpec};

struct Args {
    model: String,
    batch: usize,
    threads: usize,
    steps: usize,
    warmup: usize,
    reference: bool,
}

const USAGE: &str =
    "usage: bench --model NAME [--batch-size N] [--threads N] [--steps N] [--warmup N] [--reference]";

fn parse() -> Result<Args, String> {
    let mut args = Args {
        model: String::new(),
        batch: 128,
        threads: 2,
        steps: 10,
        warmup: 2,
        reference: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--reference" {
            args.reference = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
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
    let m = Model::with_engine(ModelSpec::new(kind), 1, &Device::Cpu, engine)
        .map_err(|e| e.to_string())?;
    let mut rng = Rng::new(42);
    let images: Vec<u8> = (0..args.batch * IMAGE_BYTES)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u8> = (0..args.batch).map(|_| rng.below(10) as u8).collect();
    let line = |mode: &str, secs: f64, extra: String| {
        println!(
            "{{\"engine\":\"gradcast\",\"model\":\"{}\",\"mode\":\"{mode}\",\"batch_size\":{},\"threads\":{},\"img_per_s\":{:.2},\"reference\":{}{extra}}}",
            args.model,
            args.batch,
            args.threads,
            args.batch as f64 / secs,
            args.reference
        )
    };
    let (mut total, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..args.warmup + args.steps {
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
    let (f, b) = (median(fwd), median(bwd));
    line(
        "train",
        median(total),
        format!(",\"forward_s\":{f:.4},\"backward_s\":{b:.4}"),
    );
    let mut total = Vec::new();
    for step in 0..args.warmup + args.steps {
        let start = Instant::now();
        m.evaluate(&images, &labels).map_err(|e| e.to_string())?;
        if step >= args.warmup {
            total.push(start.elapsed());
        }
    }
    line("eval", median(total), String::new());
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Before any candle or rayon work: both size their pools from this.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    model::tune_allocator();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
