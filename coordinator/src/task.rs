//! What a node is asked to do ([`Task`]), what it answers ([`Answer`]) and
//! the checks an answer must pass before it is used.

use std::sync::Arc;

use proto::shm::Segment;
use proto::v1::{EvalResult, Samples, TrainResult};

/// One part of a step or of an evaluation, with its samples already cut
/// (cloning a task's samples shares their bytes, so reassigning a part
/// copies nothing).
#[derive(Clone)]
pub(crate) enum Task {
    /// Gradients for these training samples, with this dropout seed.
    /// `ahead`: the same samples went to the part's first node in a
    /// `SamplesAhead` during the step before (see `Cluster::queue_ahead`).
    Train {
        samples: Samples,
        seed: u64,
        ahead: bool,
    },
    /// Loss and accuracy on these test samples.
    Eval { samples: Samples },
}

impl Task {
    pub(crate) fn samples(&self) -> &Samples {
        match self {
            Task::Train { samples, .. } | Task::Eval { samples } => samples,
        }
    }

    pub(crate) fn is_train(&self) -> bool {
        matches!(self, Task::Train { .. })
    }
}

/// Samples as they travel: `count` images and labels.
pub(crate) fn samples(images: Vec<u8>, labels: Vec<u8>) -> Samples {
    Samples {
        count: labels.len() as u32,
        images: images.into(),
        labels: labels.into(),
    }
}

/// A node's answer to one task.
pub(crate) enum Answer {
    Train {
        result: TrainResult,
        gradients: Gradients,
        state: Vec<f32>,
        /// The gradient's norm, once checked.
        norm: f64,
    },
    Eval(EvalResult),
}

/// Where a node's gradients are.
pub(crate) enum Gradients {
    /// Received as chunks.
    Owned(Vec<f32>),
    /// In the node's shared-memory segment, as `version` (read in place by
    /// the averaging, and checked again after it).
    Shared { slot: Arc<Segment>, version: u64 },
    /// Sent in slices to the shard aggregators (which check them).
    Sharded,
}

impl Gradients {
    /// The Euclidean norm (not finite if any value is not, or if shared
    /// values changed while they were read).
    fn norm(&self) -> f64 {
        let norm = |v: &[f32]| crate::aggregate::sum_of_squares_par(v).sqrt();
        match self {
            Gradients::Owned(v) => norm(v),
            Gradients::Sharded => 0.0,
            Gradients::Shared { slot, version } => match slot.view(*version) {
                Ok(view) => {
                    let n = norm(view.values());
                    if view.finish().is_ok() {
                        n
                    } else {
                        f64::NAN
                    }
                }
                Err(_) => f64::NAN,
            },
        }
    }
}

/// Whether an answer is usable for its task; returns its gradient's norm
/// (0 for an evaluation).
pub(crate) fn check(task: &Task, answer: &Answer) -> Result<f64, String> {
    let (samples, correct, loss, seconds, norm) = match answer {
        Answer::Train {
            result,
            gradients,
            state,
            ..
        } => {
            let norm = gradients.norm();
            if !state.iter().all(|v| v.is_finite()) || !norm.is_finite() {
                return Err("non-finite gradient or state".into());
            }
            let r = result;
            (r.samples, r.correct, r.loss_sum, r.compute_seconds, norm)
        }
        Answer::Eval(r) => (r.samples, r.correct, r.loss_sum, r.compute_seconds, 0.0),
    };
    let given = task.samples().count;
    if samples != given {
        return Err(format!("answered for {samples} samples, was given {given}"));
    }
    if correct > samples {
        return Err(format!("claims {correct} correct of {samples} samples"));
    }
    // A sum of cross-entropies is never negative.
    if !loss.is_finite() || loss < 0.0 {
        return Err(format!("impossible loss sum {loss}"));
    }
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("impossible compute time {seconds} s"));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(count: u32) -> Task {
        Task::Train {
            ahead: false,
            samples: samples(vec![0; count as usize], vec![0; count as usize]),
            seed: 1,
        }
    }

    fn answer(samples: u32, correct: u32, loss_sum: f64, gradients: Vec<f32>) -> Answer {
        Answer::Train {
            result: TrainResult {
                samples,
                correct,
                loss_sum,
                compute_seconds: 0.5,
                ..TrainResult::default()
            },
            gradients: Gradients::Owned(gradients),
            state: vec![0.0],
            norm: f64::NAN,
        }
    }

    #[test]
    fn impossible_answers_are_refused_with_the_reason() {
        let task = train(4);
        assert_eq!(check(&task, &answer(4, 3, 2.0, vec![3.0, 4.0])), Ok(5.0));
        let refused = [
            (answer(5, 3, 2.0, vec![1.0]), "answered for 5 samples"),
            (answer(4, 5, 2.0, vec![1.0]), "claims 5 correct of 4"),
            (answer(4, 1, -1.0, vec![1.0]), "impossible loss sum"),
            (answer(4, 1, 1.0, vec![f32::NAN]), "non-finite"),
        ];
        for (a, why) in refused {
            let reason = check(&task, &a).unwrap_err();
            assert!(reason.contains(why), "{reason} / {why}");
        }
        // Finite in f64 although it overflows f32: accepted here with its
        // true norm (whether it is applied is the update's business).
        let huge = check(&task, &answer(4, 1, 1.0, vec![f32::MAX, f32::MAX])).unwrap();
        assert!((huge / (f32::MAX as f64 * 2f64.sqrt()) - 1.0).abs() < 1e-12);
    }
}
