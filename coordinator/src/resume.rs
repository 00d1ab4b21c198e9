//! The coordinator's own state on disk, so a killed coordinator can continue
//! exactly where it was: weights, optimizer moments, step, position in the
//! epoch, the epoch's running sums and the history. Everything else (epoch
//! order, dropout seeds) is derived from the seed and the step, so a resumed
//! run with the same node count is bit-identical to an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use model::{save_checkpoint, Checkpoint, TensorInfo};
use serde::{Deserialize, Serialize};

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
    /// Adam iterations.
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
    moments: Option<(&[f32], &[f32])>,
) -> Result<(), CoordinatorError> {
    let json =
        serde_json::to_string(position).map_err(|e| CoordinatorError::Checkpoint(e.to_string()))?;
    let mut infos = vec![flat("weights", weights.len())];
    let mut all = weights.to_vec();
    if let Some((m, v)) = moments {
        infos.push(flat("adam.m", m.len()));
        infos.push(flat("adam.v", v.len()));
        all.extend_from_slice(m);
        all.extend_from_slice(v);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CoordinatorError::Checkpoint(format!("{}: {e}", dir.display())))?;
    save_checkpoint(
        &dir.join(RESUME_FILE),
        "resume",
        infos.iter(),
        &all,
        HashMap::from([(STATE_KEY.to_string(), json)]),
    )
    .map_err(|e| CoordinatorError::Checkpoint(e.to_string()))
}

/// What [`load`] found.
pub(crate) struct Saved {
    pub position: Position,
    pub weights: Vec<f32>,
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    pub path: PathBuf,
}

/// Reads `dir/resume.safetensors` if it exists.
pub(crate) fn load(dir: &Path) -> Result<Option<Saved>, CoordinatorError> {
    let path = dir.join(RESUME_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bad =
        |reason: String| CoordinatorError::Checkpoint(format!("{}: {reason}", path.display()));
    let ckpt = Checkpoint::load(&path).map_err(|e| bad(e.to_string()))?;
    let json = ckpt
        .metadata
        .get(STATE_KEY)
        .ok_or_else(|| bad("no training state in the metadata".into()))?;
    let position: Position = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let weights = ckpt
        .tensor("weights")
        .ok_or_else(|| bad("no weights".into()))?
        .1
        .to_vec();
    let moments = match (ckpt.tensor("adam.m"), ckpt.tensor("adam.v")) {
        (Some((_, m)), Some((_, v))) => Some((m.to_vec(), v.to_vec())),
        _ => None,
    };
    Ok(Some(Saved {
        position,
        weights,
        moments,
        path,
    }))
}
