//! CIFAR-10 in the official binary layout: finding it (tarball or extracted
//! folder), validating it, and handing out samples in a seeded per-epoch order.
//! Also the training-time augmentation (`augment`: random crop of the padded
//! image and horizontal flip, seeded per sample) and a generator of small synthetic data sets in the same layout, for tests.
//!
//! This crate knows nothing of candle, of models or of the network: samples are
//! raw `u8` pixels (channel-major, 3x32x32) and `u8` labels.

pub mod augment;
mod cifar;
mod order;
mod rng;
mod synthetic;

pub use cifar::{
    DataError, Dataset, Split, CLASS_NAMES, IMAGE_BYTES, IMAGE_SHAPE, NUM_CLASSES, RECORD_BYTES,
};
pub use order::{epoch_order, split_counts};
pub use rng::Rng;
pub use synthetic::{write_synthetic, SyntheticSpec};
