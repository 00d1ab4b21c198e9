//! The gradcast wire protocol: `gradcast.proto` and the tonic/prost code
//! generated from it, plus the few helpers both ends need to move flat f32
//! buffers as raw little-endian bytes in chunks, or through shared memory
//! between processes on one host ([`shm`]).
//!
//! This crate knows nothing of candle, of CIFAR-10 or of training: it only
//! says what travels on the wire.

#![allow(clippy::doc_lazy_continuation)]

mod chunking;
pub mod shm;
mod wire;

/// Generated protobuf messages and gRPC client/server stubs.
pub mod v1 {
    tonic::include_proto!("gradcast.v1");
}

pub use chunking::{Buffer, ChunkError, ChunkReceiver, Chunker};
pub use wire::{apply_delta, bf16_delta, ErrorFeedback, Wire};

/// Version of the protocol spoken by this build; a node with another version
/// is refused at `Join`.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest gRPC message either side accepts or sends (16 MiB). Buffers are
/// chunked well below it (see [`DEFAULT_CHUNK_BYTES`]).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Size of the pieces flat buffers are cut into on the wire (2 MiB).
pub const DEFAULT_CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// A client endpoint for `url` as every gradcast connection wants it: a
/// 5 s connect timeout, no Nagle delay, HTTP/2 windows sized for
/// multi-MB buffers (8 MiB per stream, 16 MiB per connection), keep-alive
/// pings every 10 s (20 s to answer).
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    use std::time::Duration;
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}
