//! The coordinator's own state on disk, so a killed coordinator can continue
//! exactly where it was: weights, optimizer moments, step, position in the
//! epoch, the epoch's running sums and the history. Everything else (epoch
//! order, dropout seeds) is derived from the seed and the step, so a resumed
//! run with the same node count is bit-identical to an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use model::{save_checkpoint, Checkpoint, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::error::CheckpointError;
use crate::{CoordinatorError, History, TrainConfig};

const STATE_KEY: &str = "gradcast.resume";
/// File name of the resume state inside the checkpoint folder.
pub const RESUME_FILE: &str = "resume.safetensors";

/// Where training stands, besides the tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Position {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u32,
    /// Batches of that epoch already done.
    pub batch: usize,
    /// Running sums of the epoch so far.
    pub loss_sum: f64,
    pub correct: u64,
    pub samples: u64,
    pub penalty: f64,
    /// The optimizer's update count (Adam's bias correction needs it).
    pub iterations: u64,
    pub history: History,
    /// What must match to resume: model, batch size, seed, training samples.
    pub fingerprint: String,
}

pub(crate) fn fingerprint(config: &TrainConfig, train_len: usize) -> String {
    format!(
        "model={} batch_size={} seed={} optimizer={} train={}",
        config.model.kind, config.batch_size, config.seed, config.optimizer, train_len
    )
}

fn flat(name: &str, len: usize) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        shape: vec![len],
        l2: 0.0,
    }
}

/// Writes the state atomically to `dir/resume.safetensors`.
pub(crate) fn save(
    dir: &Path,
    position: &Position,
    weights: &[f32],
    optimizer: &[(&'static str, &[f32])],
) -> Result<(), CoordinatorError> {
    let path = dir.join(RESUME_FILE);
    let json =
        serde_json::to_string(position).map_err(|e| CoordinatorError::checkpoint(&path, e))?;
    let mut infos = vec![flat("weights", weights.len())];
    let mut all = weights.to_vec();
    for (name, values) in optimizer {
        infos.push(flat(name, values.len()));
        all.extend_from_slice(values);
    }
    std::fs::create_dir_all(dir).map_err(|e| CoordinatorError::checkpoint(dir, e))?;
    save_checkpoint(
        &path,
        "resume",
        infos.iter(),
        &all,
        HashMap::from([(STATE_KEY.to_string(), json)]),
    )
    .map_err(CoordinatorError::Model)
}

/// What [`load`] found.
pub(crate) struct Saved {
    pub position: Position,
    pub weights: Vec<f32>,
    /// The file, for the optimizer's named state ([`Saved::optimizer_state`]).
    file: Checkpoint,
    pub path: PathBuf,
}

impl Saved {
    /// Takes the optimizer's state vector called `name` out of the file, if
    /// it has it.
    pub fn optimizer_state(&mut self, name: &str) -> Option<Vec<f32>> {
        self.file.take(name)
    }
}

/// Reads `dir/resume.safetensors` if it exists.
pub(crate) fn load(dir: &Path) -> Result<Option<Saved>, CoordinatorError> {
    let path = dir.join(RESUME_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bad = |e: CheckpointError| CoordinatorError::checkpoint(&path, e);
    let mut ckpt = Checkpoint::load(&path)?;
    let json = ckpt.metadata.get(STATE_KEY).ok_or_else(|| {
        bad(CheckpointError::Content(
            "no training state in the metadata",
        ))
    })?;
    let position: Position = serde_json::from_str(json).map_err(|e| bad(e.into()))?;
    let weights = ckpt
        .take("weights")
        .ok_or_else(|| bad(CheckpointError::Content("no weights")))?;
    Ok(Some(Saved {
        position,
        weights,
        file: ckpt,
        path,
    }))
}
