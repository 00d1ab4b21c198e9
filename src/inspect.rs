//! `gradcast eval` and `gradcast predict`: using a checkpoint outside training.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use data::{Dataset, Split, CLASS_NAMES, IMAGE_BYTES, NUM_CLASSES};
use model::{Checkpoint, Device, Model};

/// Samples per forward pass.
const CHUNK: usize = 500;

fn load(checkpoint: &Path) -> Result<Model> {
    let ckpt = Checkpoint::load(checkpoint)?;
    let name = ckpt.model_kind()?;
    let model = ckpt.into_model(&Device::Cpu)?;
    tracing::info!(model = %name, "loaded {}", checkpoint.display());
    Ok(model)
}

/// Test loss, accuracy and per-class accuracy of a checkpoint, printed as a table.
pub fn eval(checkpoint: &Path, data: &Path, limit: Option<usize>) -> Result<()> {
    let model = load(checkpoint)?;
    let mut test = Dataset::load(data, Split::Test)?;
    if let Some(k) = limit {
        test.truncate(k);
    }
    if test.is_empty() {
        bail!("no test samples");
    }
    let mut correct = [0usize; NUM_CLASSES];
    let mut seen = [0usize; NUM_CLASSES];
    let mut loss = 0.0f64;
    for start in (0..test.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(test.len());
        let (images, labels) = test.slice(start..end);
        for (p, &label) in model.predict(&images)?.iter().zip(&labels) {
            let l = label as usize;
            seen[l] += 1;
            loss -= (p[l].max(1e-30) as f64).ln();
            if argmax(p) == l {
                correct[l] += 1;
            }
        }
    }
    let total: usize = seen.iter().sum();
    let right: usize = correct.iter().sum();
    println!("test samples: {total}");
    println!("test loss:     {:.4}", loss / total as f64);
    println!("test accuracy: {:.4}", right as f64 / total as f64);
    println!();
    println!("{:<12} {:>8} {:>9}", "class", "samples", "accuracy");
    for c in 0..NUM_CLASSES {
        let acc = if seen[c] > 0 {
            correct[c] as f64 / seen[c] as f64
        } else {
            f64::NAN
        };
        println!("{:<12} {:>8} {:>9.4}", CLASS_NAMES[c], seen[c], acc);
    }
    Ok(())
}

fn argmax(p: &[f32; NUM_CLASSES]) -> usize {
    (0..NUM_CLASSES)
        .max_by(|&a, &b| p[a].total_cmp(&p[b]))
        .unwrap_or(0)
}

/// Decodes a PNG or JPEG, resizes it to 32×32 if needed, and returns CHW bytes.
fn image_bytes(path: &Path) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()?
        .decode()
        .with_context(|| {
            format!(
                "{}: not a PNG or JPEG image this build can decode",
                path.display()
            )
        })?
        .to_rgb8();
    let img = if img.dimensions() == (32, 32) {
        img
    } else {
        image::imageops::resize(&img, 32, 32, image::imageops::FilterType::Triangle)
    };
    let mut chw = vec![0u8; IMAGE_BYTES];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * 1024 + y as usize * 32 + x as usize] = px[c];
        }
    }
    Ok(chw)
}

/// Prints the top-3 classes of each image.
pub fn predict(checkpoint: &Path, images: &[PathBuf]) -> Result<()> {
    if images.is_empty() {
        bail!("give at least one image");
    }
    let model = load(checkpoint)?;
    let mut batch = Vec::with_capacity(images.len() * IMAGE_BYTES);
    for path in images {
        batch.extend(image_bytes(path)?);
    }
    for (path, p) in images.iter().zip(model.predict(&batch)?) {
        let mut order: Vec<usize> = (0..NUM_CLASSES).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top: Vec<String> = order[..3]
            .iter()
            .map(|&c| format!("{} {:.3}", CLASS_NAMES[c], p[c]))
            .collect();
        println!("{}: {}", path.display(), top.join(", "));
    }
    Ok(())
}
