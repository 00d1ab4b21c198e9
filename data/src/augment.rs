//! Training-time augmentation of CIFAR-10 images: a random crop of the image
//! padded with 4 zero pixels on every side (a shift of up to 4 pixels each
//! way, the uncovered border black) and a horizontal flip with probability
//! ½, the standard recipe of the ResNet papers.
//!
//! Each sample's draw comes from its own seed (see [`sample_seed`]), made
//! from the run's seed, the step and the sample's place in the global batch,
//! so an augmented run is reproducible and does not depend on how the batch
//! is split among nodes.

use crate::cifar::IMAGE_BYTES;
use crate::Rng;

/// Pixels of zero padding on each side before the crop.
pub const PAD: usize = 4;

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;

/// What one draw does to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Where the crop starts in the padded image, each in `0..=2·PAD`:
    /// the image moves by `PAD - dy` rows and `PAD - dx` columns.
    pub dy: usize,
    pub dx: usize,
    /// Mirror left and right (after the crop).
    pub flip: bool,
}

impl Augmentation {
    /// Leaves the image as it is.
    pub const IDENTITY: Augmentation = Augmentation {
        dy: PAD,
        dx: PAD,
        flip: false,
    };

    /// A draw from `rng`: both offsets uniform over `0..=2·PAD`, flip with
    /// probability ½.
    pub fn draw(rng: &mut Rng) -> Self {
        let span = 2 * PAD as u64 + 1;
        Self {
            dy: rng.below(span) as usize,
            dx: rng.below(span) as usize,
            flip: rng.below(2) == 1,
        }
    }

    /// Applies the draw to one image (`IMAGE_BYTES` bytes, channel-major
    /// 3×32×32), in place.
    ///
    /// # Panics
    /// If `image` is not `IMAGE_BYTES` long or an offset is beyond `2·PAD`.
    pub fn apply(&self, image: &mut [u8]) {
        assert_eq!(image.len(), IMAGE_BYTES, "one CIFAR-10 image");
        assert!(
            self.dy <= 2 * PAD && self.dx <= 2 * PAD,
            "offset beyond the padding"
        );
        if *self == Self::IDENTITY {
            return;
        }
        let mut out = [0u8; PLANE];
        for plane in image.chunks_exact_mut(PLANE) {
            out.fill(0);
            for y in 0..SIDE {
                // Row y of the crop is row y + dy - PAD of the image.
                let Some(sy) = (y + self.dy).checked_sub(PAD).filter(|&r| r < SIDE) else {
                    continue;
                };
                for x in 0..SIDE {
                    let Some(sx) = (x + self.dx).checked_sub(PAD).filter(|&c| c < SIDE) else {
                        continue;
                    };
                    let tx = if self.flip { SIDE - 1 - x } else { x };
                    out[y * SIDE + tx] = plane[sy * SIDE + sx];
                }
            }
            plane.copy_from_slice(&out);
        }
    }
}

/// The seed of the draw for the sample at `position` in the global batch of
/// `step`, in a run seeded with `seed`.
pub fn sample_seed(seed: u64, step: u64, position: u64) -> u64 {
    Rng::derive(seed, &[0xA6, step, position]).next_u64()
}

/// Augments a run of consecutive samples of one step's global batch
/// (`images` holds them back to back, the first at `first_position`).
pub fn augment_batch(images: &mut [u8], seed: u64, step: u64, first_position: u64) {
    for (i, image) in images.chunks_exact_mut(IMAGE_BYTES).enumerate() {
        let mut rng = Rng::new(sample_seed(seed, step, first_position + i as u64));
        Augmentation::draw(&mut rng).apply(image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose neighbouring pixels all differ, and no pixel is 0
    /// (so the black border is visible).
    fn marked() -> Vec<u8> {
        let mut img = vec![0u8; IMAGE_BYTES];
        for c in 0..3 {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    img[c * PLANE + y * SIDE + x] = (1 + (c * 7 + y * 13 + x * 29) % 255) as u8;
                }
            }
        }
        img
    }

    fn at(img: &[u8], c: usize, y: usize, x: usize) -> u8 {
        img[c * PLANE + y * SIDE + x]
    }

    #[test]
    fn the_identity_changes_nothing() {
        let mut img = marked();
        Augmentation::IDENTITY.apply(&mut img);
        assert_eq!(img, marked());
    }

    #[test]
    fn a_crop_moves_the_image_and_fills_black() {
        let orig = marked();
        let mut img = orig.clone();
        // Crop from (1, 7): the image moves 3 rows down and 3 columns left.
        Augmentation {
            dy: 1,
            dx: 7,
            flip: false,
        }
        .apply(&mut img);
        for c in 0..3 {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let want = if y < 3 || x >= SIDE - 3 {
                        0
                    } else {
                        at(&orig, c, y - 3, x + 3)
                    };
                    assert_eq!(at(&img, c, y, x), want, "c{c} y{y} x{x}");
                }
            }
        }
    }

    #[test]
    fn a_flip_mirrors_every_row_and_twice_is_nothing() {
        let orig = marked();
        let flip = Augmentation {
            flip: true,
            ..Augmentation::IDENTITY
        };
        let mut img = orig.clone();
        flip.apply(&mut img);
        for c in 0..3 {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    assert_eq!(at(&img, c, y, x), at(&orig, c, y, SIDE - 1 - x));
                }
            }
        }
        flip.apply(&mut img);
        assert_eq!(img, orig);
    }

    #[test]
    fn draws_cover_every_offset_and_both_flips() {
        let mut rng = Rng::new(3);
        let mut seen = [[0u32; 2 * PAD + 1]; 2];
        let mut flips = 0;
        for _ in 0..4000 {
            let a = Augmentation::draw(&mut rng);
            seen[0][a.dy] += 1;
            seen[1][a.dx] += 1;
            flips += a.flip as u32;
        }
        // 4000 / 9 ≈ 444 per offset; 2000 flips.
        assert!(seen.iter().flatten().all(|&n| n > 350), "{seen:?}");
        assert!((1800..2200).contains(&flips), "{flips}");
    }

    #[test]
    fn a_batch_is_augmented_alike_however_it_is_split() {
        let whole: Vec<u8> = (0..5).flat_map(|_| marked()).collect();
        let mut at_once = whole.clone();
        augment_batch(&mut at_once, 9, 12, 0);
        let mut in_parts = whole.clone();
        let (a, b) = in_parts.split_at_mut(2 * IMAGE_BYTES);
        augment_batch(a, 9, 12, 0);
        augment_batch(b, 9, 12, 2);
        assert_eq!(at_once, in_parts);
        assert_ne!(at_once, whole, "five draws all the identity");
        let mut other_step = whole.clone();
        augment_batch(&mut other_step, 9, 13, 0);
        assert_ne!(other_step, at_once);
    }
}
