//! Property tests (proptest) of decoding: whatever bytes arrive, decoding
//! every message type and reassembling chunks either succeeds or fails
//! cleanly — never a panic, never a buffer over the receiver's limit — and
//! what decodes re-encodes to a message that decodes the same; chunks cut
//! from any buffer reassemble to exactly its values.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use proto::v1::{
    aggregator_message, control_message, node_message, shard_upload, AggregatorMessage, BufferKind,
    Chunk, ControlMessage, CoordinatorMessage, Dtype, EvalResult, Hello, JoinReply, JoinRequest,
    NodeMessage, PlannedPart, ShardHello, ShardUpload, StepPlan, StepReady, TrainResult,
};
use proto::{ChunkReceiver, Chunker, Wire};

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
                sharded: false,
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
        ControlMessage {
            kind: Some(control_message::Kind::Plan(StepPlan {
                step: 4,
                parts: vec![PlannedPart {
                    part: 1,
                    node_id: 2,
                    samples: 16,
                }],
                attempt: 1,
            })),
        }
        .encode_to_vec(),
        AggregatorMessage {
            kind: Some(aggregator_message::Kind::Ready(StepReady {
                step: 4,
                squares: 2.5,
                part_squares: vec![1.0, 1.5],
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        ShardUpload {
            kind: Some(shard_upload::Kind::Hello(ShardHello {
                node_id: 2,
                session_secret: vec![4u8; 16].into(),
            })),
        }
        .encode_to_vec(),
    ]
}

/// Decodes `bytes` as every message type; whatever decodes must survive a
/// second round (encode, decode) unchanged. Compared as encodings: a
/// damaged float can be NaN, which equals nothing, itself included.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    fn round<M: Message + Default>(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(m) = M::decode(bytes) {
            let encoded = m.encode_to_vec();
            let again = M::decode(encoded.as_slice());
            prop_assert!(
                again.is_ok(),
                "a decoded message's encoding does not decode"
            );
            let reencoded = again.map(|a| a.encode_to_vec()).unwrap_or_default();
            prop_assert_eq!(reencoded, encoded);
        }
        Ok(())
    }
    round::<NodeMessage>(bytes)?;
    round::<CoordinatorMessage>(bytes)?;
    round::<JoinRequest>(bytes)?;
    round::<JoinReply>(bytes)?;
    round::<ControlMessage>(bytes)?;
    round::<AggregatorMessage>(bytes)?;
    round::<ShardUpload>(bytes)?;
    round::<Chunk>(bytes)
}

/// One way of damaging a valid message.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(prop::sample::Index),
    FlipBits(Vec<(prop::sample::Index, u8)>),
    Insert(prop::sample::Index, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..5)
            .prop_map(Damage::FlipBits),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Damage::Insert(at, bytes)),
    ]
}

fn apply(mut m: Vec<u8>, d: &Damage) -> Vec<u8> {
    match d {
        Damage::Truncate(at) => m.truncate(at.index(m.len() + 1)),
        Damage::FlipBits(flips) => {
            for (at, bit) in flips {
                let i = at.index(m.len());
                m[i] ^= 1 << bit;
            }
        }
        Damage::Insert(at, bytes) => {
            let i = at.index(m.len() + 1);
            m.splice(i..i, bytes.iter().copied());
        }
    }
    m
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        -1i32..4,
        0u64..3,
        prop_oneof![
            Just(Dtype::U8 as i32),
            Just(Dtype::Bf16 as i32),
            Just(Dtype::F32 as i32)
        ],
        0u64..100,
        0u64..12,
        prop::collection::vec(any::<u8>(), 0..40),
        0u64..2,
    )
        .prop_map(
            |(kind, version, dtype, total_elements, offset, data, base_version)| Chunk {
                kind,
                version,
                dtype,
                total_elements,
                offset,
                data: Bytes::from(data),
                base_version,
                part: 0,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn random_bytes_decode_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes)?;
    }

    #[test]
    fn damaged_messages_decode_cleanly(which in any::<prop::sample::Index>(), d in damage()) {
        let valid = samples();
        let m = apply(valid[which.index(valid.len())].clone(), &d);
        decode_all(&m)?;
    }

    #[test]
    fn arbitrary_chunk_sequences_never_exceed_the_limit(chunks in prop::collection::vec(chunk(), 0..8)) {
        let limit = 64;
        let mut rx = ChunkReceiver::new(limit);
        for c in &chunks {
            if let Ok(Some(proto::Buffer { values, .. })) = rx.push(c) {
                prop_assert!(values.len() as u64 <= limit);
                prop_assert_eq!(values.len() as u64, c.total_elements);
            }
        }
    }

    #[test]
    fn any_buffer_cut_into_chunks_comes_back_whole(
        values in prop::collection::vec(-1e6f32..1e6, 0..300),
        chunk_bytes in 4usize..256,
        version in any::<u64>(),
    ) {
        let mut rx = ChunkReceiver::new(1000);
        let mut whole = None;
        for c in Chunker::new(BufferKind::Gradients, version, &values, chunk_bytes).chunks() {
            prop_assert!(whole.is_none(), "a buffer completed before its last chunk");
            whole = rx.push(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let whole = whole.ok_or_else(|| TestCaseError::fail("never completed"))?;
        prop_assert_eq!(whole.version, version);
        prop_assert_eq!(whole.kind, BufferKind::Gradients);
        prop_assert_eq!(whole.values, values);
    }

    #[test]
    fn bf16_chunks_come_back_as_the_rounded_values(
        values in prop::collection::vec(-1e6f32..1e6, 1..300),
        chunk_bytes in 2usize..256,
    ) {
        let encoded = Wire::Bf16.encode(&values);
        let mut rx = ChunkReceiver::new(1000);
        let mut whole = None;
        for c in Chunker::encoded(BufferKind::Gradients, 1, Wire::Bf16, encoded, chunk_bytes).chunks() {
            whole = rx.push(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let whole = whole.ok_or_else(|| TestCaseError::fail("never completed"))?;
        let rounded: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        prop_assert_eq!(whole.values, rounded);
    }
}
