//! The slice an aggregator owns: its weights, optimizer and the averaging
//! of one step's slices.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::counter;
use proto::v1::{BufferKind, Chunk, Commit, PlannedPart, StepPlan, StepReady};
use proto::{Buffer, Chunker, Wire};

use crate::aggregate::{average_block, average_gradients, factors, sum_of_squares, L2Range};
use crate::optimizer::{clip_to_norm, from_buffer};
use crate::Optimizer;

/// A part's gradients and state, as far as they came.
type Halves = (Option<Vec<f32>>, Option<Vec<f32>>);

/// The slice this aggregator owns, once set up.
pub(super) struct Slice {
    /// Values of the slice that are trainable (the rest is state).
    pub(super) trainable: usize,
    /// L2 runs, in slice coordinates.
    pub(super) l2: Vec<L2Range>,
    pub(super) max_parts: usize,
    pub(super) version: u64,
    pub(super) weights: Vec<f32>,
    pub(super) optimizer: Box<dyn Optimizer>,
    /// The averaged gradient (with L2) of the planned step, once ready.
    pub(super) grads: Vec<f32>,
    /// The averaged state of the planned step, once ready.
    pub(super) state: Vec<f32>,
    /// bf16 wire: the f32 values the nodes hold (what the changes sent so
    /// far add up to), within half a bf16 step of `weights`.
    pub(super) held: Option<Vec<f32>>,
    /// The whole slice of `version` as nodes get it when they hold no
    /// earlier one (f32: `weights`; bf16: `held`), encoded once.
    pub(super) current: Arc<Vec<Chunk>>,
    /// bf16 wire: the change from the version before to `version`, for the
    /// nodes that hold that one.
    pub(super) delta: Option<Arc<Vec<Chunk>>>,
    /// Halves of slices received for this version's step, by (part, node):
    /// gradients and state come as two buffers.
    pub(super) partial: HashMap<(u32, u64), Halves>,
    /// Slices received for this version's step, by (part, node).
    pub(super) uploads: HashMap<(u32, u64), Vec<f32>>,
    /// Slices received per node this step.
    pub(super) per_node: HashMap<u64, usize>,
    pub(super) plan: Option<StepPlan>,
    /// The answer to the plan, once sent (a query gets it again).
    pub(super) answered: Option<StepReady>,
}

impl Slice {
    /// Encodes `version` for the nodes: whole, and on the bf16 wire also as
    /// the change from the version before (when `changed`).
    pub(super) fn encode(&mut self, changed: bool) {
        let size = proto::DEFAULT_CHUNK_BYTES;
        self.delta = None;
        if let Some(held) = &mut self.held {
            if changed {
                let bytes = proto::bf16_delta(&self.weights, held);
                let base = self.version - 1;
                let delta = Chunker::encoded(
                    BufferKind::WeightsDelta,
                    self.version,
                    Wire::Bf16,
                    bytes,
                    size,
                )
                .with_base(base);
                self.delta = Some(Arc::new(delta.chunks().collect()));
            }
        }
        let whole = self.held.as_deref().unwrap_or(&self.weights);
        let chunker = Chunker::new(BufferKind::Weights, self.version, whole, size);
        self.current = Arc::new(chunker.chunks().collect());
    }

    /// Takes one buffer of a node's answer to part `part`: the gradients of
    /// the slice's trainable values, or the state. Returns false if it
    /// does not fit the slice.
    pub(super) fn take(&mut self, node: u64, buffer: Buffer) -> bool {
        let t = self.trainable;
        let state_len = self.weights.len() - t;
        let key = (buffer.part, node);
        let entry = self.partial.entry(key).or_default();
        match buffer.kind {
            BufferKind::Gradients if buffer.values.len() == t && t > 0 => {
                entry.0 = Some(buffer.values)
            }
            BufferKind::State if buffer.values.len() == state_len && state_len > 0 => {
                entry.1 = Some(buffer.values)
            }
            _ => return false,
        }
        let complete = (t == 0 || entry.0.is_some()) && (state_len == 0 || entry.1.is_some());
        if complete {
            if let Some((g, st)) = self.partial.remove(&key) {
                let mut values = g.unwrap_or_default();
                values.extend(st.unwrap_or_default());
                self.uploads.insert(key, values);
            }
        }
        true
    }

    pub(super) fn missing(&self, plan: &StepPlan) -> Vec<PlannedPart> {
        plan.parts
            .iter()
            .filter(|_| !self.weights.is_empty())
            .filter(|p| !self.uploads.contains_key(&(p.part, p.node_id)))
            .copied()
            .collect()
    }

    /// The answer to the plan once every planned slice is in: the averages
    /// are made then (None while slices are missing, or after answering).
    pub(super) fn try_ready(&mut self) -> Option<StepReady> {
        let plan = self.plan.as_ref()?;
        if self.answered.is_some() || !self.missing(plan).is_empty() {
            return None;
        }
        let slices: Vec<&[f32]> = plan
            .parts
            .iter()
            // (An empty slice gets nothing: every part is empty there.)
            .map(|p| {
                self.uploads
                    .get(&(p.part, p.node_id))
                    .map_or(&[][..], |v| v.as_slice())
            })
            .collect();
        let bad: Vec<PlannedPart> = plan
            .parts
            .iter()
            .zip(&slices)
            .filter(|(_, v)| !v.iter().all(|x| x.is_finite()))
            .map(|(p, _)| *p)
            .collect();
        let (step, attempt) = (plan.step, plan.attempt);
        let ready = if bad.is_empty() {
            let t = self.trainable;
            let grads: Vec<(f64, &[f32])> = plan
                .parts
                .iter()
                .zip(&slices)
                .map(|(p, v)| (p.samples as f64, &v[..t]))
                .collect();
            let part_squares = grads.iter().map(|(_, g)| sum_of_squares(g)).collect();
            let sums = average_gradients(&mut self.grads, &grads, &self.weights[..t], &self.l2);
            let states: Vec<(f64, &[f32])> = plan
                .parts
                .iter()
                .zip(&slices)
                .map(|(p, v)| (p.samples as f64, &v[t..]))
                .collect();
            average_block(&mut self.state, 0, &factors(&states));
            StepReady {
                step,
                attempt,
                squares: sums.squares,
                penalty: sums.penalty,
                part_squares,
                ..StepReady::default()
            }
        } else {
            StepReady {
                step,
                attempt,
                bad,
                ..StepReady::default()
            }
        };
        self.answered = Some(ready.clone());
        Some(ready)
    }

    /// Applies (or skips, as told) the planned step; the slice becomes the
    /// next version.
    pub(super) fn commit(&mut self, c: &Commit) -> Result<(), String> {
        let ready = self.answered.as_ref().filter(|r| r.bad.is_empty());
        if c.step != self.version || ready.is_none() {
            return Err(format!(
                "commit of step {} while at version {} {}",
                c.step,
                self.version,
                if ready.is_none() {
                    "without every slice of the step"
                } else {
                    ""
                }
            ));
        }
        if c.apply {
            let t = self.trainable;
            if c.clip_norm > 0.0 {
                clip_to_norm(&mut self.grads, c.norm, c.clip_norm);
            }
            let (trainable, state) = self.weights.split_at_mut(t);
            self.optimizer
                .step_with(trainable, c.lr, None, &from_buffer(&self.grads));
            state.copy_from_slice(&self.state);
        }
        self.version += 1;
        self.uploads.clear();
        self.partial.clear();
        self.per_node.clear();
        self.plan = None;
        self.answered = None;
        self.encode(true);
        counter!("gradcast_aggregator_steps_total").increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::new_optimizer;
    use crate::OptimizerKind;

    fn plan(parts: &[(u32, u64, u32)]) -> StepPlan {
        StepPlan {
            step: 0,
            attempt: 0,
            parts: parts
                .iter()
                .map(|&(part, node_id, samples)| PlannedPart {
                    part,
                    node_id,
                    samples,
                })
                .collect(),
        }
    }

    fn slice(len: usize, trainable: usize) -> Slice {
        let mut s = Slice {
            trainable,
            l2: Vec::new(),
            max_parts: 2,
            version: 0,
            weights: vec![1.0; len],
            optimizer: new_optimizer(OptimizerKind::Sgd, trainable),
            grads: vec![0.0; trainable],
            state: vec![0.0; len - trainable],
            held: None,
            current: Arc::new(Vec::new()),
            delta: None,
            partial: HashMap::new(),
            uploads: HashMap::new(),
            per_node: HashMap::new(),
            plan: None,
            answered: None,
        };
        s.encode(false);
        s
    }

    /// The slice averages only what the plan names, weighted by samples and
    /// in plan order; a NaN slice is reported as bad, not averaged; a commit
    /// applies the optimizer to the trainable values and the mean to the
    /// state, and moves to the next version.
    #[test]
    fn a_slice_averages_what_the_plan_names_and_commits_it() {
        let mut s = slice(4, 3);
        s.uploads.insert((0, 10), vec![1.0, 2.0, 3.0, 10.0]);
        s.uploads.insert((1, 11), vec![3.0, 2.0, 1.0, 20.0]);
        // An upload from a node the plan does not name is ignored.
        s.uploads.insert((1, 12), vec![f32::NAN; 4]);
        s.plan = Some(plan(&[(0, 10, 3), (1, 11, 1)]));
        let ready = s.try_ready().expect("every planned slice is in");
        assert!(ready.bad.is_empty() && ready.missing.is_empty());
        assert_eq!(s.grads, vec![1.5, 2.0, 2.5]);
        assert_eq!(s.state, vec![12.5]);
        assert_eq!(ready.part_squares, vec![14.0, 14.0]);
        assert!((ready.squares - (1.5f64 * 1.5 + 4.0 + 2.5 * 2.5)).abs() < 1e-9);
        assert!(s.try_ready().is_none(), "answered once");
        let commit = Commit {
            step: 0,
            lr: 0.5,
            apply: true,
            norm: 0.0,
            clip_norm: 0.0,
        };
        s.commit(&commit).unwrap();
        assert_eq!(s.weights, vec![0.25, 0.0, -0.25, 12.5]);
        assert_eq!(s.version, 1);
        assert!(s.uploads.is_empty() && s.plan.is_none());
        assert!(s.commit(&commit).is_err(), "step 0 is done");

        let mut s = slice(4, 3);
        s.uploads.insert((0, 10), vec![f32::NAN, 0.0, 0.0, 0.0]);
        s.plan = Some(plan(&[(0, 10, 1), (1, 11, 1)]));
        assert!(s.try_ready().is_none(), "part 1 is missing");
        assert_eq!(
            s.missing(s.plan.as_ref().unwrap()),
            plan(&[(1, 11, 1)]).parts
        );
        s.uploads.insert((1, 11), vec![0.0; 4]);
        let ready = s.try_ready().unwrap();
        assert_eq!(ready.bad, plan(&[(0, 10, 1)]).parts);
        assert!(s.commit(&commit).is_err(), "a bad step is not committed");

        // An empty slice (more aggregators than a small model fills) gets
        // nothing from the nodes and is ready at once.
        let mut s = slice(0, 0);
        s.plan = Some(plan(&[(0, 10, 1), (1, 11, 1)]));
        let ready = s.try_ready().expect("nothing to wait for");
        assert!(ready.missing.is_empty() && ready.bad.is_empty());
        s.commit(&commit).unwrap();
        assert_eq!(s.version, 1);
    }

    /// Gradients and state come as two buffers; a slice is in once both
    /// are, and a buffer that fits neither half is refused.
    #[test]
    fn a_part_is_in_once_its_gradients_and_state_are() {
        let mut s = slice(4, 3);
        let buffer = |kind, values: Vec<f32>| Buffer {
            kind,
            version: 0,
            base_version: 0,
            part: 2,
            values,
        };
        assert!(s.take(7, buffer(BufferKind::Gradients, vec![1.0, 2.0, 3.0])));
        assert!(s.uploads.is_empty());
        assert!(s.take(7, buffer(BufferKind::State, vec![4.0])));
        assert_eq!(s.uploads[&(2, 7)], vec![1.0, 2.0, 3.0, 4.0]);
        assert!(!s.take(7, buffer(BufferKind::Gradients, vec![1.0; 4])));
        assert!(!s.take(7, buffer(BufferKind::Weights, vec![1.0; 3])));
    }
}
