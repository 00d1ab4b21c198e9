//! Cutting flat f32 buffers into [`Chunk`]s and putting them back together,
//! in either [`Wire`] format.

use bytes::Bytes;
use thiserror::Error;

use crate::v1::{BufferKind, Chunk};
use crate::wire::Wire;

/// Why a sequence of chunks could not be reassembled.
#[derive(Debug, Error, PartialEq)]
pub enum ChunkError {
    /// A chunk's dtype is not a wire format (f32 or bf16).
    #[error("chunk has dtype {0}, expected f32 or bf16")]
    WrongDType(i32),
    /// Byte payload is not a whole number of values.
    #[error("chunk payload of {bytes} bytes is not a multiple of {element}")]
    Ragged { bytes: usize, element: usize },
    /// A chunk does not continue where the previous one stopped.
    #[error("chunk at offset {got} does not follow the previous one (expected offset {expected})")]
    OutOfOrder { expected: u64, got: u64 },
    /// A chunk belongs to a different buffer (version, kind, dtype or total
    /// changed).
    #[error("chunk for {kind:?} version {version} (total {total}) mixed into buffer {expected_kind:?} version {expected_version} (total {expected_total})")]
    Mixed {
        kind: i32,
        version: u64,
        total: u64,
        expected_kind: i32,
        expected_version: u64,
        expected_total: u64,
    },
    /// Chunks run past the announced total.
    #[error("chunks exceed the announced total of {total} elements")]
    Overflow { total: u64 },
    /// The announced buffer is larger than the receiver allows.
    #[error("buffer of {total} elements exceeds the limit of {limit}")]
    TooLarge { total: u64, limit: u64 },
}

/// Cuts one flat buffer into chunks. The bytes are encoded once and shared
/// (reference-counted) between all the chunks and all their receivers.
#[derive(Debug, Clone)]
pub struct Chunker {
    kind: BufferKind,
    version: u64,
    base_version: u64,
    part: u32,
    wire: Wire,
    total: u64,
    bytes: Bytes,
    chunk_bytes: usize,
}

impl Chunker {
    /// Prepares `values` to be sent as f32 `kind`/`version` in pieces of at
    /// most `chunk_bytes` bytes (rounded down to whole values, at least one).
    pub fn new(kind: BufferKind, version: u64, values: &[f32], chunk_bytes: usize) -> Self {
        Self::encoded(
            kind,
            version,
            Wire::F32,
            Wire::F32.encode(values),
            chunk_bytes,
        )
    }

    /// Prepares values already encoded in `wire` (e.g. by
    /// [`crate::ErrorFeedback`]) to be sent as `kind`/`version`.
    pub fn encoded(
        kind: BufferKind,
        version: u64,
        wire: Wire,
        bytes: Bytes,
        chunk_bytes: usize,
    ) -> Self {
        let size = wire.element_bytes();
        Self {
            kind,
            version,
            base_version: 0,
            part: 0,
            wire,
            total: (bytes.len() / size) as u64,
            bytes,
            chunk_bytes: (chunk_bytes / size).max(1) * size,
        }
    }

    /// Marks the buffer as a change to the weights of `base_version`.
    pub fn with_base(mut self, base_version: u64) -> Self {
        self.base_version = base_version;
        self
    }

    /// Marks the buffer as (a slice of) the answer to part `part` of a step.
    pub fn with_part(mut self, part: u32) -> Self {
        self.part = part;
        self
    }

    /// Bytes of payload the chunks carry in all.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The chunks, in order. An empty buffer still yields one (empty) chunk so
    /// the receiver learns its version.
    pub fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        let n = self.bytes.len().div_ceil(self.chunk_bytes).max(1);
        let size = self.wire.element_bytes();
        (0..n).map(move |i| {
            let start = i * self.chunk_bytes;
            let end = (start + self.chunk_bytes).min(self.bytes.len());
            Chunk {
                kind: self.kind as i32,
                version: self.version,
                dtype: self.wire.dtype() as i32,
                total_elements: self.total,
                offset: (start / size) as u64,
                data: self.bytes.slice(start..end),
                base_version: self.base_version,
                part: self.part,
            }
        })
    }
}

/// A reassembled buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub kind: BufferKind,
    pub version: u64,
    /// For a weights delta: the version it applies to.
    pub base_version: u64,
    /// For a gradient slice: the part of the step it answers.
    pub part: u32,
    pub values: Vec<f32>,
}

/// Reassembles chunks into a flat f32 buffer, checking that they are in
/// order, consistent (one kind, version, base, total and wire format per
/// buffer) and within bounds.
#[derive(Debug)]
pub struct ChunkReceiver {
    limit: u64,
    current: Option<(i32, u64, u64, i32, u64, u32)>,
    values: Vec<f32>,
}

impl ChunkReceiver {
    /// A receiver that refuses buffers of more than `limit` elements.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            current: None,
            values: Vec::new(),
        }
    }

    /// Adds one chunk. Returns the completed buffer, with its kind and version,
    /// when this chunk was the last one. A chunk at offset 0 starts a new buffer
    /// and discards an unfinished one.
    pub fn push(&mut self, chunk: &Chunk) -> Result<Option<Buffer>, ChunkError> {
        let wire = Wire::from_dtype(chunk.dtype).ok_or(ChunkError::WrongDType(chunk.dtype))?;
        if chunk.total_elements > self.limit {
            return Err(ChunkError::TooLarge {
                total: chunk.total_elements,
                limit: self.limit,
            });
        }
        let key = (
            chunk.kind,
            chunk.version,
            chunk.total_elements,
            wire.dtype() as i32,
            chunk.base_version,
            chunk.part,
        );
        if chunk.offset == 0 {
            self.current = Some(key);
            self.values.clear();
            self.values.reserve(chunk.total_elements as usize);
        }
        let Some(expected) = self.current else {
            return Err(ChunkError::OutOfOrder {
                expected: 0,
                got: chunk.offset,
            });
        };
        if expected != key {
            return Err(ChunkError::Mixed {
                kind: chunk.kind,
                version: chunk.version,
                total: chunk.total_elements,
                expected_kind: expected.0,
                expected_version: expected.1,
                expected_total: expected.2,
            });
        }
        if chunk.offset != self.values.len() as u64 {
            return Err(ChunkError::OutOfOrder {
                expected: self.values.len() as u64,
                got: chunk.offset,
            });
        }
        if (chunk.data.len() / wire.element_bytes()) as u64 + chunk.offset > chunk.total_elements {
            return Err(ChunkError::Overflow {
                total: chunk.total_elements,
            });
        }
        wire.decode(&chunk.data, &mut self.values)?;
        if self.values.len() as u64 == chunk.total_elements {
            self.current = None;
            let kind = BufferKind::try_from(chunk.kind).unwrap_or(BufferKind::Unspecified);
            return Ok(Some(Buffer {
                kind,
                version: chunk.version,
                base_version: chunk.base_version,
                part: chunk.part,
                values: std::mem::take(&mut self.values),
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_over_many_chunks() {
        let values: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 - 3.0).collect();
        let chunker = Chunker::new(BufferKind::Weights, 7, &values, 64);
        let chunks: Vec<_> = chunker.chunks().collect();
        assert_eq!(chunks.len(), 1001usize.div_ceil(16));
        let mut rx = ChunkReceiver::new(10_000);
        let mut done = None;
        for c in &chunks {
            assert!(done.is_none(), "buffer completed before the last chunk");
            done = rx.push(c).unwrap();
        }
        let got = done.expect("buffer completes on the last chunk");
        assert_eq!(got.kind, BufferKind::Weights);
        assert_eq!(got.version, 7);
        assert_eq!(got.values, values);
    }

    #[test]
    fn bf16_buffers_travel_in_half_the_bytes_and_do_not_mix_with_f32() {
        let values: Vec<f32> = (0..1001).map(|i| (i % 200) as f32 * 0.25 - 3.0).collect();
        let bytes = Wire::Bf16.encode(&values);
        let chunker = Chunker::encoded(BufferKind::Gradients, 4, Wire::Bf16, bytes, 64);
        assert_eq!(chunker.byte_len(), 2 * values.len());
        let chunks: Vec<_> = chunker.chunks().collect();
        assert_eq!(chunks.len(), 1001usize.div_ceil(32));
        assert_eq!(chunks[1].offset, 32);
        let mut rx = ChunkReceiver::new(10_000);
        let mut done = None;
        for c in &chunks {
            done = rx.push(c).unwrap();
        }
        // Quarters below 64 have at most 8 significant bits: exact.
        assert_eq!(done.unwrap().values, values);
        let f32s: Vec<_> = Chunker::new(BufferKind::Gradients, 4, &values, 64)
            .chunks()
            .collect();
        let mut rx = ChunkReceiver::new(10_000);
        rx.push(&chunks[0]).unwrap();
        assert!(matches!(rx.push(&f32s[1]), Err(ChunkError::Mixed { .. })));
        let mut u8s = chunks[0].clone();
        u8s.dtype = crate::v1::Dtype::U8 as i32;
        assert_eq!(rx.push(&u8s), Err(ChunkError::WrongDType(u8s.dtype)));
    }

    #[test]
    fn empty_buffer_is_one_chunk() {
        let chunker = Chunker::new(BufferKind::State, 3, &[], 64);
        let chunks: Vec<_> = chunker.chunks().collect();
        assert_eq!(chunks.len(), 1);
        let mut rx = ChunkReceiver::new(10);
        let got = rx.push(&chunks[0]).unwrap().unwrap();
        assert_eq!((got.version, got.values.len()), (3, 0));
    }

    #[test]
    fn rejects_gaps_mixes_overflow_and_oversize() {
        let values = vec![1.0f32; 100];
        let chunks: Vec<_> = Chunker::new(BufferKind::Gradients, 1, &values, 40)
            .chunks()
            .collect();
        let mut rx = ChunkReceiver::new(1000);
        rx.push(&chunks[0]).unwrap();
        assert!(matches!(
            rx.push(&chunks[2]),
            Err(ChunkError::OutOfOrder { .. })
        ));

        let mut rx = ChunkReceiver::new(1000);
        rx.push(&chunks[0]).unwrap();
        let mut other = chunks[1].clone();
        other.version = 2;
        assert!(matches!(rx.push(&other), Err(ChunkError::Mixed { .. })));

        let mut rx = ChunkReceiver::new(1000);
        let mut big = chunks[0].clone();
        big.total_elements = 5;
        assert!(matches!(rx.push(&big), Err(ChunkError::Overflow { .. })));

        let mut rx = ChunkReceiver::new(50);
        assert!(matches!(
            rx.push(&chunks[0]),
            Err(ChunkError::TooLarge { .. })
        ));

        let mut rx = ChunkReceiver::new(1000);
        let mut ragged = chunks[0].clone();
        ragged.data = ragged.data.slice(0..3);
        assert_eq!(
            rx.push(&ragged),
            Err(ChunkError::Ragged {
                bytes: 3,
                element: 4
            })
        );

        let mut rx = ChunkReceiver::new(1000);
        assert!(matches!(
            rx.push(&chunks[1]),
            Err(ChunkError::OutOfOrder { .. })
        ));
    }
}
