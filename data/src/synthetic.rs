//! Small synthetic data sets in the CIFAR-10 binary layout, for tests and
//! demos. Each class has its own colour pattern plus noise, so a network can
//! learn them in a few steps.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{Rng, IMAGE_BYTES, NUM_CLASSES};

/// Size and seed of a synthetic data set.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Records in each of `data_batch_1.bin` .. `data_batch_5.bin`.
    pub train_per_file: usize,
    /// Records in `test_batch.bin`.
    pub test: usize,
    /// Seed of the patterns, labels and noise.
    pub seed: u64,
}

fn class_patterns(seed: u64) -> Vec<[u8; 12]> {
    let mut rng = Rng::derive(seed, &[0xC1A5]);
    (0..NUM_CLASSES)
        .map(|_| {
            let mut p = [0u8; 12];
            for v in p.iter_mut() {
                *v = (rng.below(6) * 50) as u8;
            }
            p
        })
        .collect()
}

fn records(n: usize, patterns: &[[u8; 12]], rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * (1 + IMAGE_BYTES));
    for _ in 0..n {
        let label = rng.below(NUM_CLASSES as u64) as usize;
        out.push(label as u8);
        for ch in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let quadrant = (y / 16) * 2 + x / 16;
                    let base = patterns[label][ch * 4 + quadrant] as i32;
                    let noise = rng.below(81) as i32 - 40;
                    out.push((base + noise).clamp(0, 255) as u8);
                }
            }
        }
    }
    out
}

/// Writes a synthetic data set as `dir/cifar-10-batches-bin/*.bin` (and, with
/// `archive`, also `dir/cifar-10-binary.tar.gz` holding the same folder).
/// Returns the path of the `cifar-10-batches-bin` folder.
pub fn write_synthetic(dir: &Path, spec: &SyntheticSpec, archive: bool) -> io::Result<PathBuf> {
    let root = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&root)?;
    let patterns = class_patterns(spec.seed);
    let mut rng = Rng::derive(spec.seed, &[0xDA7A]);
    let mut files = Vec::new();
    for i in 1..=5 {
        files.push((
            format!("data_batch_{i}.bin"),
            records(spec.train_per_file, &patterns, &mut rng),
        ));
    }
    files.push((
        "test_batch.bin".into(),
        records(spec.test, &patterns, &mut rng),
    ));
    let meta = crate::CLASS_NAMES.join("\n") + "\n";
    files.push(("batches.meta.txt".into(), meta.into_bytes()));
    for (name, bytes) in &files {
        std::fs::write(root.join(name), bytes)?;
    }
    if archive {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(dir.join("cifar-10-binary.tar.gz"))?,
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        for (name, bytes) in &files {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(
                &mut header,
                format!("cifar-10-batches-bin/{name}"),
                bytes.as_slice(),
            )?;
        }
        tar.into_inner()?.finish()?.flush()?;
    }
    Ok(root)
}
