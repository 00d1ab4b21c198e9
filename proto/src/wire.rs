//! How flat f32 buffers are written on the gRPC wire: as f32, or rounded to
//! bfloat16 (half the bytes; 8 bits of mantissa, the exponent range of f32).
//! Shared memory always carries f32.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use half::bf16;

use crate::chunking::ChunkError;
use crate::v1::Dtype;

/// The element type of buffers on the gRPC wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// Exact: 4 bytes per value.
    #[default]
    F32,
    /// Rounded to nearest (ties to even): 2 bytes per value.
    Bf16,
}

impl Wire {
    /// The protobuf dtype that names it.
    pub fn dtype(self) -> Dtype {
        match self {
            Wire::F32 => Dtype::F32,
            Wire::Bf16 => Dtype::Bf16,
        }
    }

    /// The wire a protobuf dtype names (unspecified: f32, as before bf16
    /// existed); None for a dtype that is not a wire format.
    pub fn from_dtype(dtype: i32) -> Option<Wire> {
        match Dtype::try_from(dtype).ok()? {
            Dtype::Unspecified | Dtype::F32 => Some(Wire::F32),
            Dtype::Bf16 => Some(Wire::Bf16),
            Dtype::U8 => None,
        }
    }

    /// Bytes per value.
    pub fn element_bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        }
    }

    /// Encodes values as little-endian bytes (rounding for bf16).
    pub fn encode(self, values: &[f32]) -> Bytes {
        match self {
            Wire::F32 => Bytes::copy_from_slice(bytemuck::cast_slice(values)),
            Wire::Bf16 => bf16_bytes(values.iter().map(|v| bf16::from_f32(*v))),
        }
    }

    /// Decodes little-endian bytes into f32 values, appending to `out`.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), ChunkError> {
        let size = self.element_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(ChunkError::Ragged {
                bytes: bytes.len(),
                element: size,
            });
        }
        // (An iterator, not zero-fill and copy: measured faster for 6.5 MB
        // gradients arriving in 2 MiB chunks.)
        match self {
            Wire::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Wire::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
            ),
        }
        Ok(())
    }
}

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wire::F32 => "f32",
            Wire::Bf16 => "bf16",
        })
    }
}

impl FromStr for Wire {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Wire::F32),
            "bf16" => Ok(Wire::Bf16),
            other => Err(format!("unknown wire format {other:?}; use f32 or bf16")),
        }
    }
}

// Encoding is a plain copy of the values' memory (bytemuck), which is the
// little-endian wire layout only on a little-endian machine.
#[cfg(not(target_endian = "little"))]
compile_error!("gradcast's wire encoding assumes a little-endian machine");

/// bf16 values as little-endian bytes.
fn bf16_bytes(values: impl Iterator<Item = bf16>) -> Bytes {
    let bits: Vec<u16> = values.map(bf16::to_bits).collect();
    Bytes::copy_from_slice(bytemuck::cast_slice(&bits))
}

/// Rounds successive buffers of one kind (a node's gradients, step after
/// step) to bf16 with error feedback: what rounding drops from a value is
/// added to the same value of the next buffer, so the error does not
/// accumulate: the sum of what was sent differs from the sum of the true
/// values by the last residual only (at most half a bf16 step per value).
#[derive(Debug, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Encodes `values` plus the carried residual, and keeps what rounding
    /// dropped. A buffer of another length starts from no residual.
    pub fn encode(&mut self, values: &[f32]) -> Bytes {
        if self.residual.len() != values.len() {
            self.residual = vec![0.0; values.len()];
        }
        bf16_bytes(values.iter().zip(&mut self.residual).map(|(v, r)| {
            let wanted = v + *r;
            let sent = bf16::from_f32(wanted);
            let dropped = wanted - sent.to_f32();
            // A non-finite value is sent as it is (and refused by the
            // coordinator); it must not poison the residual.
            *r = if dropped.is_finite() { dropped } else { 0.0 };
            sent
        }))
    }

    /// What rounding has dropped so far, not yet sent.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

/// Encodes the change from `held` to `target` in bf16 and moves `held` by
/// exactly what was sent (as [`apply_delta`] does at the other end), so both
/// sides hold the same f32 values. What rounding drops stays in
/// `target - held` and goes out with the next change: error feedback, with
/// `held` within half a bf16 step of the last change from `target`.
pub fn bf16_delta(target: &[f32], held: &mut [f32]) -> Bytes {
    assert_eq!(
        target.len(),
        held.len(),
        "delta between buffers of two sizes"
    );
    bf16_bytes(target.iter().zip(held.iter_mut()).map(|(t, h)| {
        let sent = bf16::from_f32(t - *h);
        *h += sent.to_f32();
        sent
    }))
}

/// Adds a decoded change to the held copy (the receiving half of
/// [`bf16_delta`]).
pub fn apply_delta(held: &mut [f32], delta: &[f32]) {
    for (h, d) in held.iter_mut().zip(delta) {
        *h += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: Wire, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        wire.decode(bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn f32_is_exact_and_bf16_keeps_eight_bits() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
        assert_eq!(decode(Wire::F32, &Wire::F32.encode(&values)), values);
        let bytes = Wire::Bf16.encode(&values);
        assert_eq!(bytes.len(), 2 * values.len());
        for (back, v) in decode(Wire::Bf16, &bytes).iter().zip(&values) {
            // Round to nearest: within half a step of 2^-7 relative.
            assert!((back - v).abs() <= v.abs() * 2f32.powi(-8), "{v} -> {back}");
        }
        // Ties go to even; values with 8 significant bits are exact.
        assert_eq!(
            decode(Wire::Bf16, &Wire::Bf16.encode(&[1.0 + 2f32.powi(-8)])),
            [1.0]
        );
        assert_eq!(
            decode(Wire::Bf16, &Wire::Bf16.encode(&[1.5, -3.0])),
            [1.5, -3.0]
        );
        let err = Wire::Bf16.decode(&[0, 0, 0], &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            ChunkError::Ragged {
                bytes: 3,
                element: 2
            }
        );
    }

    #[test]
    fn names_and_dtypes_round_trip() {
        for wire in [Wire::F32, Wire::Bf16] {
            assert_eq!(wire.to_string().parse::<Wire>(), Ok(wire));
            assert_eq!(Wire::from_dtype(wire.dtype() as i32), Some(wire));
        }
        assert_eq!(Wire::from_dtype(Dtype::Unspecified as i32), Some(Wire::F32));
        assert_eq!(Wire::from_dtype(Dtype::U8 as i32), None);
        assert!("fp8".parse::<Wire>().is_err());
    }

    /// Weights that move by small steps: sending each new version as bf16
    /// would be off by half a step of the weight (2^-9 relative); sending
    /// the change with the held copy moved by what was sent keeps both ends
    /// bit-identical and within half a step of the change.
    #[test]
    fn deltas_keep_both_copies_identical_and_close_to_the_weights() {
        let mut weights: Vec<f32> = (0..500)
            .map(|i| 0.05 + (i as f32 * 0.7).cos() * 0.1)
            .collect();
        let mut sender = weights.clone();
        let mut receiver = weights.clone();
        let mut worst = 0f32;
        for step in 0..200 {
            for (i, w) in weights.iter_mut().enumerate() {
                *w -= 1e-3 * ((i + step) as f32 * 0.3).sin();
            }
            let bytes = bf16_delta(&weights, &mut sender);
            apply_delta(&mut receiver, &decode(Wire::Bf16, &bytes));
            assert_eq!(sender, receiver, "the two copies drifted apart");
            for (w, h) in weights.iter().zip(&sender) {
                worst = worst.max((w - h).abs());
            }
        }
        // The change per step is at most 2e-3 (with the carried residual):
        // half a bf16 step of it is below 1e-5, far below the 2e-4 that
        // rounding a weight of 0.15 itself would cost.
        assert!(worst < 1e-5, "held copy off by {worst}");
    }

    /// Rounding alone loses a small gradient for good, step after step;
    /// with error feedback the running sum of what was sent tracks the true
    /// sum within half a bf16 step, however many steps.
    #[test]
    fn error_feedback_keeps_the_running_sum() {
        let big = 1.0f32;
        let small = 1e-3f32; // far below half a step of bf16 at 1.0
        let mut feedback = ErrorFeedback::default();
        let (mut plain, mut fed, mut truth) = (0f64, 0f64, 0f64);
        for step in 0..1000 {
            let g = [big + small, small * (step % 3) as f32];
            truth += (g[0] + g[1]) as f64;
            plain += decode(Wire::Bf16, &Wire::Bf16.encode(&g))
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
            fed += decode(Wire::Bf16, &feedback.encode(&g))
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        let half_step = 2f64.powi(-8);
        assert!((fed - truth).abs() <= 2.0 * half_step, "{fed} vs {truth}");
        assert!((plain - truth).abs() > 0.5, "{plain} vs {truth}");
        let left: f64 = feedback.residual().iter().map(|&r| r as f64).sum();
        assert!(
            (fed + left - truth).abs() < 1e-3,
            "{fed} + {left} vs {truth}"
        );
        // A non-finite value does not poison what follows.
        feedback.encode(&[f32::INFINITY, 1.0]);
        assert!(feedback.residual().iter().all(|r| r.is_finite()));
    }
}
