//! Reading and validating CIFAR-10 in the official binary layout.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Bytes of one image: 3 channels of 32x32, channel-major (R plane, G, B).
pub const IMAGE_BYTES: usize = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2];
/// Shape of one image: channels, height, width.
pub const IMAGE_SHAPE: [usize; 3] = [3, 32, 32];
/// Bytes of one record: the label byte then the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Class names in label order.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILE: &str = "test_batch.bin";
const FOLDER: &str = "cifar-10-batches-bin";

/// What went wrong reading the data set. Each variant names the file.
#[derive(Debug, Error)]
pub enum DataError {
    /// The path given does not exist.
    #[error("{0}: no such file or folder; pass --data the cifar-10-binary.tar.gz archive or its extracted cifar-10-batches-bin folder")]
    NotFound(PathBuf),
    /// An I/O error while reading a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A batch file that the layout requires is absent.
    #[error("{location}: missing {file} (the official layout has data_batch_1.bin .. data_batch_5.bin and test_batch.bin)")]
    MissingFile { location: PathBuf, file: String },
    /// The file is not a whole number of records.
    #[error("{file}: {size} bytes is not a whole number of {RECORD_BYTES}-byte records ({records} records and {extra} stray bytes); the file is truncated or not a CIFAR-10 binary batch")]
    Truncated {
        file: PathBuf,
        size: u64,
        records: u64,
        extra: u64,
    },
    /// The file holds no record at all.
    #[error("{file}: empty file, expected records of {RECORD_BYTES} bytes")]
    Empty { file: PathBuf },
    /// A label byte outside 0..=9.
    #[error("{file}: record {record} has label {label}, labels must be 0..9; the file is corrupt or not CIFAR-10 (CIFAR-100 has two label bytes)")]
    BadLabel {
        file: PathBuf,
        record: u64,
        label: u8,
    },
    /// The archive could not be read.
    #[error(
        "{path}: cannot read the archive ({source}); is it a complete cifar-10-binary.tar.gz?"
    )]
    Archive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which part of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 5 training batches.
    Train,
    /// `test_batch.bin`.
    Test,
}

/// A validated set of samples held in memory: images are `len * IMAGE_BYTES`
/// bytes, labels `len` bytes (each `< 10`).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Dataset {
    /// Builds a data set from records, validating every label. `name` is used
    /// in error messages.
    pub fn from_records(name: &Path, bytes: &[u8]) -> Result<Self, DataError> {
        let mut ds = Dataset::default();
        ds.append_records(name, bytes)?;
        Ok(ds)
    }

    fn append_records(&mut self, name: &Path, bytes: &[u8]) -> Result<(), DataError> {
        let size = bytes.len() as u64;
        if size == 0 {
            return Err(DataError::Empty {
                file: name.to_path_buf(),
            });
        }
        if !size.is_multiple_of(RECORD_BYTES as u64) {
            return Err(DataError::Truncated {
                file: name.to_path_buf(),
                size,
                records: size / RECORD_BYTES as u64,
                extra: size % RECORD_BYTES as u64,
            });
        }
        let n = bytes.len() / RECORD_BYTES;
        self.images.reserve(n * IMAGE_BYTES);
        self.labels.reserve(n);
        for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            if rec[0] as usize >= NUM_CLASSES {
                return Err(DataError::BadLabel {
                    file: name.to_path_buf(),
                    record: i as u64,
                    label: rec[0],
                });
            }
            self.labels.push(rec[0]);
            self.images.extend_from_slice(&rec[1..]);
        }
        Ok(())
    }

    /// Loads one split from `path`: the `.tar.gz` archive, the extracted
    /// `cifar-10-batches-bin` folder, or a folder that contains it.
    pub fn load(path: &Path, split: Split) -> Result<Self, DataError> {
        let mut both = Self::load_splits(path, &[split])?;
        Ok(both.remove(0))
    }

    /// Loads the training and the test split (one pass over an archive).
    pub fn load_train_test(path: &Path) -> Result<(Self, Self), DataError> {
        let mut both = Self::load_splits(path, &[Split::Train, Split::Test])?;
        let test = both.remove(1);
        let train = both.remove(0);
        Ok((train, test))
    }

    fn load_splits(path: &Path, splits: &[Split]) -> Result<Vec<Self>, DataError> {
        if !path.exists() {
            return Err(DataError::NotFound(path.to_path_buf()));
        }
        let files: Vec<Vec<&str>> = splits.iter().map(|s| split_files(*s)).collect();
        let mut contents = if path.is_dir() {
            read_folder(path, &files)?
        } else {
            read_archive(path, &files)?
        };
        let mut out = Vec::new();
        for (split_files, split_contents) in files.iter().zip(contents.iter_mut()) {
            let mut ds = Dataset::default();
            for (name, bytes) in split_files.iter().zip(split_contents.iter()) {
                let (origin, bytes) = bytes.as_ref().ok_or_else(|| DataError::MissingFile {
                    location: path.to_path_buf(),
                    file: (*name).to_string(),
                })?;
                ds.append_records(origin, bytes)?;
            }
            out.push(ds);
        }
        Ok(out)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keeps only the first `k` samples (no-op if there are fewer).
    pub fn truncate(&mut self, k: usize) {
        if k < self.len() {
            self.labels.truncate(k);
            self.images.truncate(k * IMAGE_BYTES);
        }
    }

    /// Pixels of sample `i` (`IMAGE_BYTES` bytes, R plane then G then B).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Label of sample `i`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Copies the samples at `indices` into `(images, labels)` buffers.
    pub fn gather(&self, indices: &[u32]) -> (Vec<u8>, Vec<u8>) {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i as usize));
            labels.push(self.labels[i as usize]);
        }
        (images, labels)
    }

    /// Copies the contiguous samples `range` into `(images, labels)` buffers.
    pub fn slice(&self, range: std::ops::Range<usize>) -> (Vec<u8>, Vec<u8>) {
        (
            self.images[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES].to_vec(),
            self.labels[range].to_vec(),
        )
    }

    /// Samples per class.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut c = [0; NUM_CLASSES];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }
}

fn split_files(split: Split) -> Vec<&'static str> {
    match split {
        Split::Train => TRAIN_FILES.to_vec(),
        Split::Test => vec![TEST_FILE],
    }
}

type Found = Vec<Vec<Option<(PathBuf, Vec<u8>)>>>;

fn read_folder(path: &Path, files: &[Vec<&str>]) -> Result<Found, DataError> {
    let base = if path.join(FOLDER).is_dir() {
        path.join(FOLDER)
    } else {
        path.to_path_buf()
    };
    let mut out = Vec::new();
    for split in files {
        let mut found = Vec::new();
        for name in split {
            let file = base.join(name);
            if !file.exists() {
                found.push(None);
                continue;
            }
            let bytes = std::fs::read(&file).map_err(|source| DataError::Io {
                path: file.clone(),
                source,
            })?;
            found.push(Some((file, bytes)));
        }
        out.push(found);
    }
    Ok(out)
}

fn read_archive(path: &Path, files: &[Vec<&str>]) -> Result<Found, DataError> {
    let archive_err = |source: io::Error| DataError::Archive {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out: Found = files.iter().map(|s| vec![None; s.len()]).collect();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    for entry in archive.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let entry_path = entry.path().map_err(archive_err)?.into_owned();
        let Some(name) = entry_path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        for (si, split) in files.iter().enumerate() {
            if let Some(fi) = split.iter().position(|f| *f == name) {
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut bytes).map_err(archive_err)?;
                out[si][fi] = Some((path.join(&entry_path), bytes));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{write_synthetic, SyntheticSpec};

    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            train_per_file: 20,
            test: 30,
            seed: 3,
        }
    }

    #[test]
    fn loads_folder_parent_folder_and_archive_alike() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), true).unwrap();
        let (train, test) = Dataset::load_train_test(&root).unwrap();
        assert_eq!((train.len(), test.len()), (100, 30));
        let (train2, _) = Dataset::load_train_test(dir.path()).unwrap();
        assert_eq!(train2.labels(), train.labels());
        let archive = dir.path().join("cifar-10-binary.tar.gz");
        let (train3, test3) = Dataset::load_train_test(&archive).unwrap();
        assert_eq!(train3.labels(), train.labels());
        assert_eq!(train3.image(57), train.image(57));
        assert_eq!(test3.image(29), test.image(29));
        assert_eq!(Dataset::load(&archive, Split::Test).unwrap().len(), 30);
    }

    #[test]
    fn truncated_file_is_named_with_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), false).unwrap();
        let f = root.join("data_batch_3.bin");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
        let err = Dataset::load(&root, Split::Train).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Truncated {
                    records: 19,
                    extra: 3063,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("data_batch_3.bin") && msg.contains("truncated"),
            "{msg}"
        );
        // The test split is unaffected.
        assert_eq!(Dataset::load(&root, Split::Test).unwrap().len(), 30);
    }

    #[test]
    fn empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), false).unwrap();
        std::fs::write(root.join("test_batch.bin"), b"").unwrap();
        let err = Dataset::load(&root, Split::Test).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("test_batch.bin"));
    }

    #[test]
    fn bad_label_names_file_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), false).unwrap();
        let f = root.join("data_batch_2.bin");
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[5 * RECORD_BYTES] = 10;
        std::fs::write(&f, &bytes).unwrap();
        let err = Dataset::load(&root, Split::Train).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadLabel {
                    record: 5,
                    label: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("data_batch_2.bin"));
    }

    #[test]
    fn missing_batch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), true).unwrap();
        std::fs::remove_file(root.join("data_batch_4.bin")).unwrap();
        let err = Dataset::load(&root, Split::Train).unwrap_err();
        assert!(matches!(&err, DataError::MissingFile { file, .. } if file == "data_batch_4.bin"));
        // The archive still has it.
        let archive = dir.path().join("cifar-10-binary.tar.gz");
        assert_eq!(Dataset::load(&archive, Split::Train).unwrap().len(), 100);
    }

    #[test]
    fn missing_path_and_corrupt_archive() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::load(&dir.path().join("nope.tar.gz"), Split::Train).unwrap_err();
        assert!(matches!(err, DataError::NotFound(_)));
        write_synthetic(dir.path(), &spec(), true).unwrap();
        let archive = dir.path().join("cifar-10-binary.tar.gz");
        let bytes = std::fs::read(&archive).unwrap();
        let cut = dir.path().join("cut.tar.gz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = Dataset::load(&cut, Split::Test).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Archive { .. }
                    | DataError::MissingFile { .. }
                    | DataError::Truncated { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn gather_truncate_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let root = write_synthetic(dir.path(), &spec(), false).unwrap();
        let mut train = Dataset::load(&root, Split::Train).unwrap();
        let (imgs, labels) = train.gather(&[3, 0]);
        assert_eq!(&imgs[..IMAGE_BYTES], train.image(3));
        assert_eq!(labels, vec![train.label(3), train.label(0)]);
        assert_eq!(train.class_counts().iter().sum::<usize>(), 100);
        train.truncate(7);
        assert_eq!(train.len(), 7);
        assert_eq!(train.slice(0..7).0.len(), 7 * IMAGE_BYTES);
    }
}
