//! `gradcast bench`: the engine's img/s on random data, one JSON line per
//! measurement.

use std::process::ExitCode;

use anyhow::Result;
use model::bench::{BenchOptions, Measurement};
use serde::Serialize;

use crate::flags::{BenchArgs, BenchMode};

/// One line of output.
#[derive(Serialize)]
struct Line {
    engine: &'static str,
    model: String,
    mode: &'static str,
    batch_size: usize,
    threads: usize,
    img_per_s: f64,
    reference: bool,
    device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backward_s: Option<f64>,
}

fn line(a: &BenchArgs, m: &Measurement) -> serde_json::Result<String> {
    serde_json::to_string(&Line {
        engine: "gradcast",
        model: a.model.to_string(),
        mode: m.mode,
        batch_size: a.batch_size,
        threads: a.threads,
        img_per_s: m.img_per_s,
        reference: a.reference,
        device: a.device.to_string(),
        forward_s: m.forward_s,
        backward_s: m.backward_s,
    })
}

/// Sizes the thread pools (before any candle work), measures, prints.
pub fn main(a: &BenchArgs) -> Result<ExitCode> {
    // SAFETY: `bench` runs on the main thread before anything else starts
    // a thread (no runtime, no pool yet).
    unsafe { model::use_threads(a.threads) };
    model::check_kernel_plan().map_err(anyhow::Error::msg)?;
    let options = BenchOptions {
        model: a.model,
        batch_size: a.batch_size,
        steps: a.steps,
        warmup: a.warmup,
        reference: a.reference,
        device: a.device,
        train: a.mode != BenchMode::Eval,
        eval: a.mode != BenchMode::Train,
    };
    for m in model::bench::run(&options)? {
        println!("{}", line(a, &m)?);
    }
    Ok(ExitCode::SUCCESS)
}
