//! Sharded aggregation: the flat weights buffer cut into contiguous slices,
//! each averaged and optimised by its own `gradcast aggregator` process
//! ([`aggregator`]), driven by the coordinator through [`link`].
//!
//! Every step, a node sends slice *k* of its answer (gradients, then state)
//! to aggregator *k* and gets slice *k* of the new weights from it, so each
//! link carries about one model's worth of bytes per step in each direction
//! whatever the number of nodes, instead of the coordinator's link carrying
//! N. The averaging and the optimizer are element-wise, so a sharded run
//! computes exactly the bits of an unsharded one (the norms behind
//! `--clip-norm` and the skip test are summed over slices, in another
//! order: only a step right at a limit could go the other way).

pub mod aggregator;
pub(crate) mod link;

use std::ops::Range;

/// Slices start at multiples of this many values (64 bytes).
const ALIGN: usize = 16;

/// Cuts `len` values into `k` contiguous slices of nearly equal size (each
/// starting at a multiple of 16 values; trailing ones may be empty when
/// `len` is small).
pub fn split(len: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.max(1);
    let units = len.div_ceil(ALIGN);
    (0..k)
        .map(|i| {
            let lo = (units * i / k * ALIGN).min(len);
            let hi = (units * (i + 1) / k * ALIGN).min(len);
            lo..hi
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_buffer_in_order_without_overlap() {
        for len in [0, 1, 15, 16, 17, 1000, 274_442] {
            for k in 1..=9 {
                let s = split(len, k);
                assert_eq!(s.len(), k);
                assert_eq!(s[0].start, 0);
                assert_eq!(s[k - 1].end, len);
                for w in s.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "len {len} k {k}");
                }
                for r in &s {
                    assert!(r.start % ALIGN == 0 || r.start == len);
                    assert!(r.start <= r.end);
                }
                if len >= 16 * k * 4 {
                    let sizes: Vec<usize> = s.iter().map(|r| r.len()).collect();
                    let (min, max) = (sizes.iter().min(), sizes.iter().max());
                    assert!(max.unwrap() - min.unwrap() <= ALIGN, "{sizes:?}");
                }
            }
        }
    }
}
