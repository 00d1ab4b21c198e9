//! Property tests of decoding: whatever bytes arrive, decoding every message
//! type and reassembling chunks either succeeds or fails cleanly — never a
//! panic, never a buffer over the receiver's limit.

use bytes::Bytes;
use prost::Message;
use proto::v1::{
    node_message, BufferKind, Chunk, CoordinatorMessage, Dtype, EvalResult, Hello, JoinReply,
    JoinRequest, NodeMessage, TrainResult,
};
use proto::{ChunkReceiver, Chunker};

/// xorshift64*: enough randomness for input generation, no dependency.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn samples() -> Vec<Vec<u8>> {
    let chunk = Chunker::new(BufferKind::Gradients, 3, &[1.0, 2.0, 3.0], 8)
        .chunks()
        .next()
        .unwrap();
    vec![
        NodeMessage {
            kind: Some(node_message::Kind::Hello(Hello {
                node_id: 7,
                session_secret: vec![1u8; 16].into(),
                shared_memory_proof: vec![2u8; 16].into(),
            })),
        }
        .encode_to_vec(),
        NodeMessage {
            kind: Some(node_message::Kind::Chunk(chunk.clone())),
        }
        .encode_to_vec(),
        NodeMessage {
            kind: Some(node_message::Kind::Train(TrainResult {
                step: 3,
                samples: 4,
                loss_sum: 1.5,
                correct: 2,
                compute_seconds: 0.1,
                part: 1,
                shared_memory: true,
            })),
        }
        .encode_to_vec(),
        NodeMessage {
            kind: Some(node_message::Kind::Eval(EvalResult {
                round: 1,
                part: 0,
                samples: 9,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        JoinRequest {
            hostname: "h".into(),
            device: "cpu".into(),
            threads: 2,
            protocol_version: proto::PROTOCOL_VERSION,
            shared_memory: true,
        }
        .encode_to_vec(),
        JoinReply {
            node_id: 1,
            model: "resnet20".into(),
            shared_memory: Some(proto::v1::SharedMemory {
                weights_path: "/dev/shm/w".into(),
                gradients_path: "/dev/shm/g".into(),
            }),
            session_secret: vec![3u8; 16].into(),
            ..Default::default()
        }
        .encode_to_vec(),
        chunk.encode_to_vec(),
    ]
}

fn decode_all(bytes: &[u8]) {
    let _ = NodeMessage::decode(bytes);
    let _ = CoordinatorMessage::decode(bytes);
    let _ = JoinRequest::decode(bytes);
    let _ = JoinReply::decode(bytes);
    let _ = Chunk::decode(bytes);
}

#[test]
fn decoding_random_and_mutated_bytes_never_panics() {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let valid = samples();
    for _ in 0..20_000 {
        let n = g.below(64);
        decode_all(&g.bytes(n));
        let mut m = valid[g.below(valid.len())].clone();
        match g.below(3) {
            0 => {
                let cut = g.below(m.len() + 1);
                m.truncate(cut);
            }
            1 => {
                for _ in 0..=g.below(4) {
                    let i = g.below(m.len());
                    if let Some(b) = m.get_mut(i) {
                        *b ^= 1 << g.below(8);
                    }
                }
            }
            _ => {
                let len = g.below(16);
                let extra = g.bytes(len);
                let at = g.below(m.len() + 1);
                m.splice(at..at, extra);
            }
        }
        decode_all(&m);
    }
}

#[test]
fn chunk_receiver_survives_arbitrary_chunk_sequences() {
    let mut g = Gen(42);
    let limit = 64;
    for _ in 0..5_000 {
        let mut rx = ChunkReceiver::new(limit);
        for _ in 0..g.below(8) {
            let len = g.below(40);
            let data = g.bytes(len);
            let chunk = Chunk {
                kind: g.below(5) as i32 - 1,
                version: g.below(3) as u64,
                dtype: match g.below(4) {
                    0 => Dtype::U8 as i32,
                    1 => Dtype::Bf16 as i32,
                    _ => Dtype::F32 as i32,
                },
                total_elements: g.below(100) as u64,
                offset: g.below(12) as u64,
                data: Bytes::from(data),
                base_version: g.below(2) as u64,
            };
            if let Ok(Some(proto::Buffer { values, .. })) = rx.push(&chunk) {
                assert!(values.len() as u64 <= limit);
                assert_eq!(values.len() as u64, chunk.total_elements);
            }
        }
    }
}
