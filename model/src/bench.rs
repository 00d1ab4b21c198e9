//! Training and inference throughput of one model on random data (what
//! `gradcast bench` measures and prints as JSON lines).

use std::time::{Duration, Instant};

use crate::{DeviceChoice, Engine, Model, ModelError, ModelKind, ModelSpec};
use data::{Rng, IMAGE_BYTES};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The network.
    pub model: ModelKind,
    /// Samples per step.
    pub batch_size: usize,
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// candle's own ops only (the engine the fast kernels are tested against).
    pub reference: bool,
    /// Where to run.
    pub device: DeviceChoice,
    /// Measure training steps.
    pub train: bool,
    /// Measure inference.
    pub eval: bool,
}

/// One measurement: the median over the timed steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// "train" or "eval".
    pub mode: &'static str,
    /// Samples per second of the median step.
    pub img_per_s: f64,
    /// Training only: the median forward and backward seconds.
    pub forward_s: Option<f64>,
    /// See `forward_s`.
    pub backward_s: Option<f64>,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

/// Runs the benchmark. Size the thread pools first ([`crate::use_threads`]).
pub fn run(o: &BenchOptions) -> Result<Vec<Measurement>, ModelError> {
    if o.batch_size == 0 || o.steps == 0 {
        return Err(ModelError::Config(
            "bench: the batch size and the number of steps must be positive".into(),
        ));
    }
    let engine = if o.reference {
        Engine::Reference
    } else {
        Engine::Fast
    };
    let device = o.device.open().map_err(ModelError::Config)?;
    let m = Model::with_engine(ModelSpec::new(o.model), 1, &device, engine)?;
    let mut rng = Rng::new(42);
    let images: Vec<u8> = (0..o.batch_size * IMAGE_BYTES)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u8> = (0..o.batch_size).map(|_| rng.below(10) as u8).collect();
    let mut out = Vec::new();
    if o.train {
        let (mut total, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
        for step in 0..o.warmup + o.steps {
            let start = Instant::now();
            let (_, f, b) = m.train_step_timed(&images, &labels, step as u64)?;
            if step >= o.warmup {
                total.push(start.elapsed());
                fwd.push(f);
                bwd.push(b);
            }
        }
        out.push(Measurement {
            mode: "train",
            img_per_s: o.batch_size as f64 / median(total),
            forward_s: Some(median(fwd)),
            backward_s: Some(median(bwd)),
        });
    }
    if o.eval {
        let mut total = Vec::new();
        for step in 0..o.warmup + o.steps {
            let start = Instant::now();
            m.evaluate(&images, &labels)?;
            if step >= o.warmup {
                total.push(start.elapsed());
            }
        }
        out.push(Measurement {
            mode: "eval",
            img_per_s: o.batch_size as f64 / median(total),
            forward_s: None,
            backward_s: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_what_it_is_asked() {
        let mut o = BenchOptions {
            model: ModelKind::SimpleCnn,
            batch_size: 4,
            steps: 1,
            warmup: 0,
            reference: false,
            device: DeviceChoice::Cpu,
            train: true,
            eval: false,
        };
        let got = run(&o).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].mode, "train");
        assert!(got[0].img_per_s > 0.0 && got[0].forward_s.unwrap() > 0.0);
        o.eval = true;
        let modes: Vec<_> = run(&o).unwrap().iter().map(|m| m.mode).collect();
        assert_eq!(modes, ["train", "eval"]);
        o.steps = 0;
        assert!(run(&o).is_err());
    }
}
