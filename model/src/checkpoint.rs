//! Checkpoints as safetensors files: one tensor per parameter or state tensor,
//! named as in the model (`stack1.block0.layer1.conv.weight`), with the model
//! name and the training configuration in the file's metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::{Model, ModelError, ModelKind, ModelSpec, TensorInfo};

/// Metadata key holding the model name (e.g. `resnet20-dropout`).
pub const MODEL_KEY: &str = "gradcast.model";

type Result<T> = std::result::Result<T, ModelError>;

fn error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes `weights` (laid out as `infos`, e.g. a model's params then buffers)
/// to `path` atomically (temporary file, then rename). `metadata` is stored
/// as is, plus [`MODEL_KEY`] = `model`.
pub fn save_checkpoint<'a>(
    path: &Path,
    model: &str,
    infos: impl Iterator<Item = &'a TensorInfo>,
    weights: &[f32],
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut bytes = Vec::with_capacity(weights.len() * 4);
    for w in weights {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let mut views = Vec::new();
    let mut offset = 0;
    for info in infos {
        let n = info.numel() * 4;
        let data = bytes
            .get(offset..offset + n)
            .ok_or_else(|| error(path, "weights shorter than the tensor layout"))?;
        views.push((
            info.name.clone(),
            TensorView::new(Dtype::F32, info.shape.clone(), data).map_err(|e| error(path, e))?,
        ));
        offset += n;
    }
    if offset != bytes.len() {
        return Err(error(path, "weights longer than the tensor layout"));
    }
    metadata.insert(MODEL_KEY.to_string(), model.to_string());
    let tmp: PathBuf = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| error(path, e))?;
    sort_header(&tmp).map_err(|e| error(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| error(path, e))
}

/// Rewrites a safetensors file's header in place with its keys in sorted
/// order. The crate writes the header from hash maps, whose order differs
/// from one process to the next: two runs that trained to the same bits
/// wrote different files. The same keys and values in another order are a
/// header of the same length (compact JSON, padded with spaces to a
/// multiple of 8 bytes as the format asks), so only the header is read and
/// written again; the tensors' bytes are not touched.
fn sort_header(path: &Path) -> std::result::Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let len = u64::from_le_bytes(len);
    if len > size.saturating_sub(8) {
        return Err(format!("a header of {len} bytes in a file of {size}"));
    }
    let len = len as usize;
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let sorted = sorted_header(&header)?;
    if sorted.len() != len {
        return Err(format!(
            "the sorted header is {} bytes, not {len}",
            sorted.len()
        ));
    }
    file.seek(SeekFrom::Start(8)).map_err(|e| e.to_string())?;
    file.write_all(&sorted).map_err(|e| e.to_string())
}

/// A header's JSON with its keys sorted, padded with spaces to a multiple
/// of 8 bytes.
fn sorted_header(header: &[u8]) -> std::result::Result<Vec<u8>, String> {
    type Header = BTreeMap<String, BTreeMap<String, serde_json::Value>>;
    let header: Header = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    Ok(json)
}

/// A checkpoint read back from disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// File metadata (model name, training configuration, epoch, …).
    pub metadata: HashMap<String, String>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    path: PathBuf,
}

impl Checkpoint {
    /// Reads and checks a safetensors checkpoint.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| error(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| error(path, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| error(path, e))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(error(
                    path,
                    format!("tensor {name} is {:?}, expected F32", view.dtype()),
                ));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Ok(Self {
            metadata,
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// The model the checkpoint was written for.
    pub fn model_kind(&self) -> Result<ModelKind> {
        let name = self.metadata.get(MODEL_KEY).ok_or_else(|| {
            error(
                &self.path,
                format!("no {MODEL_KEY} in the metadata; not a gradcast checkpoint"),
            )
        })?;
        if name == "resume" {
            return Err(error(
                &self.path,
                "this is the coordinator's resume state (weights, optimizer state and \
                 position, for --resume), not a model checkpoint; pass epoch-NNNN.safetensors \
                 or final.safetensors from the same folder",
            ));
        }
        name.parse()
    }

    /// Values of one tensor and its shape.
    pub fn tensor(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.tensors
            .get(name)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
    }

    /// Takes the values of one tensor out of the checkpoint (no copy).
    pub fn take(&mut self, name: &str) -> Option<Vec<f32>> {
        self.tensors.remove(name).map(|(_, v)| v)
    }

    /// Builds the checkpoint's model (dropout active as in training) on `device`
    /// with the stored weights.
    pub fn into_model(self, device: &crate::Device) -> Result<Model> {
        let model = Model::new(ModelSpec::new(self.model_kind()?), 0, device)?;
        let mut weights = Vec::with_capacity(model.num_trainable() + model.num_state());
        for info in model.params().chain(model.buffers()) {
            let (shape, values) = self
                .tensors
                .get(&info.name)
                .ok_or_else(|| error(&self.path, format!("missing tensor {}", info.name)))?;
            if *shape != info.shape {
                return Err(error(
                    &self.path,
                    format!(
                        "tensor {} has shape {shape:?}, the model needs {:?}",
                        info.name, info.shape
                    ),
                ));
            }
            weights.extend_from_slice(values);
        }
        model.set_weights(&weights)?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// Saves `model`'s parameters and buffers (`weights`) as `kind`.
    fn save(
        path: &Path,
        kind: ModelKind,
        model: &Model,
        weights: &[f32],
        meta: HashMap<String, String>,
    ) {
        save_checkpoint(
            path,
            &kind.to_string(),
            model.params().chain(model.buffers()),
            weights,
            meta,
        )
        .unwrap();
    }

    #[test]
    fn round_trip_keeps_names_shapes_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let kind = ModelKind::Resnet {
            n: 1,
            dropout: true,
        };
        let model = Model::new(ModelSpec::new(kind), 3, &Device::Cpu).unwrap();
        let weights = model.weights().unwrap();
        let meta = HashMap::from([("epoch".to_string(), "4".to_string())]);
        save(&path, kind, &model, &weights, meta);
        let ckpt = Checkpoint::load(&path).unwrap();
        assert_eq!(ckpt.metadata["epoch"], "4");
        assert_eq!(ckpt.model_kind().unwrap(), kind);
        let (shape, values) = ckpt.tensor("stem.conv.weight").unwrap();
        assert_eq!(shape, &[16, 3, 3, 3]);
        assert_eq!(values, &weights[..16 * 27]);
        let restored = ckpt.into_model(&Device::Cpu).unwrap();
        assert_eq!(restored.weights().unwrap(), weights);
        assert!(!dir.path().join("m.safetensors.tmp").exists());
    }

    #[test]
    fn wrong_layout_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a checkpoint").unwrap();
        assert!(matches!(
            Checkpoint::load(&path),
            Err(ModelError::Checkpoint { .. })
        ));
        let info = TensorInfo {
            name: "x".into(),
            shape: vec![2],
            l2: 0.0,
        };
        assert!(save_checkpoint(
            &path,
            "simple-cnn",
            [&info].into_iter(),
            &[1.0],
            HashMap::new()
        )
        .is_err());
        save_checkpoint(
            &path,
            "simple-cnn",
            [&info].into_iter(),
            &[1.0, 2.0],
            HashMap::new(),
        )
        .unwrap();
        let Err(err) = Checkpoint::load(&path).unwrap().into_model(&Device::Cpu) else {
            panic!("a checkpoint without the model's tensors was accepted");
        };
        assert!(
            err.to_string().contains("missing tensor conv1.weight"),
            "{err}"
        );
    }

    /// The same weights and metadata give the same file, byte for byte,
    /// however the hash maps behind the header happen to be ordered (each
    /// map gets its own random order, so a header written from them differs
    /// between saves with many keys).
    #[test]
    fn the_same_checkpoint_is_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let kind = ModelKind::Resnet {
            n: 1,
            dropout: false,
        };
        let model = Model::new(ModelSpec::new(kind), 5, &Device::Cpu).unwrap();
        let weights = model.weights().unwrap();
        let files: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let meta: HashMap<String, String> = (0..12)
                    .map(|k| (format!("key{k}"), format!("v{k}")))
                    .collect();
                let path = dir.path().join(format!("m{i}.safetensors"));
                save(&path, kind, &model, &weights, meta);
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert!(files.iter().all(|f| f == &files[0]));
        let header = u64::from_le_bytes(files[0][..8].try_into().unwrap());
        assert_eq!(header % 8, 0, "the header is padded to 8 bytes");
        let ckpt = Checkpoint::load(&dir.path().join("m0.safetensors")).unwrap();
        assert_eq!(ckpt.metadata["key11"], "v11");
        assert_eq!(
            ckpt.into_model(&Device::Cpu).unwrap().weights().unwrap(),
            weights
        );
        assert!(sorted_header(b"not json").is_err());
        let short = dir.path().join("short.safetensors");
        std::fs::write(
            &short,
            [u64::MAX.to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
        )
        .unwrap();
        assert!(sort_header(&short).is_err());
    }
}
