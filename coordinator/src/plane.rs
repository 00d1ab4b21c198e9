//! The shared-memory data plane on the coordinator's side: one segment with
//! the current weights, written once per step for every node on this host,
//! and one segment per such node for its gradients and state (see
//! [`proto::shm`] for the layout and the version protocol). Nodes elsewhere,
//! or that cannot map the segments, get everything over gRPC as before.

use std::path::{Path, PathBuf};

use proto::shm::{self, Segment, ShmError};
use tracing::info;

/// The segments of one coordinator process.
pub(crate) struct SharedPlane {
    dir: PathBuf,
    /// Random part of this run's segment names.
    tag: String,
    weights: Segment,
    /// Values in a node's segment (gradients, then state).
    slot_len: usize,
}

impl SharedPlane {
    /// Creates the weights segment in `dir` (a tmpfs), after removing the
    /// segments of gradcast processes that died without cleaning up.
    pub fn new(dir: &Path, weights_len: usize, slot_len: usize) -> Result<Self, ShmError> {
        let stale = shm::remove_stale(dir);
        if stale > 0 {
            info!(
                "removed {stale} shared-memory segment(s) left in {} by a process that died",
                dir.display()
            );
        }
        let tag = hex(&shm::random_bytes().map_err(|source| ShmError::Io {
            path: dir.to_path_buf(),
            source,
        })?[..4]);
        let weights = Segment::create(
            dir,
            &shm::segment_name(&tag, "weights"),
            weights_len,
            [0; 16],
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tag,
            weights,
            slot_len,
        })
    }

    /// The weights segment's file.
    pub fn weights_path(&self) -> &Path {
        self.weights.path()
    }

    /// A new gradients segment for `node`, with a fresh random proof. The
    /// file goes away when the segment is dropped.
    pub fn new_slot(&self, node: u64) -> Result<Segment, ShmError> {
        let proof = shm::random_bytes().map_err(|source| ShmError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Segment::create(
            &self.dir,
            &shm::segment_name(&self.tag, &format!("node{node}")),
            self.slot_len,
            proof,
        )
    }

    /// Lets `f` write the weights of `version` straight into the segment.
    pub fn publish_with<R>(&self, version: u64, f: impl FnOnce(&mut [f32]) -> R) -> R {
        self.weights.write_with(version, f)
    }

    /// Makes the weights segment hold `weights` as `version` (writing only
    /// if it does not already).
    pub fn publish(&self, version: u64, weights: &[f32]) -> Result<(), ShmError> {
        if self.weights.version() != version {
            self.weights.write(version, &[weights])?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
