//! A node's links to the shard aggregators (when the coordinator runs with
//! them): each aggregator sends its slice of every new version of the
//! weights, and gets this node's slice of each answer (gradients, then
//! state). The coordinator still sends the tasks and gets the results.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::v1::aggregator_client::AggregatorClient;
use proto::v1::shard_upload::Kind as Upload;
use proto::v1::{BufferKind, ShardHello, ShardInfo, ShardUpload};
use proto::{ChunkReceiver, Chunker, Wire};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::debug;

use crate::client::{Auth, ClientTls};
use crate::{telemetry, NodeError};

type Result<T> = std::result::Result<T, NodeError>;

/// Chunks queued to one aggregator.
const UPLOAD_QUEUE: usize = 64;
/// How long to keep trying to reach an aggregator.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// What this node holds of one slice.
enum Slice {
    Waiting,
    Have(u64, Vec<f32>),
    Lost(String),
}

struct Held {
    slices: Mutex<Vec<Slice>>,
    changed: Notify,
}

impl Held {
    fn set(&self, i: usize, slice: Slice) {
        if let Ok(mut s) = self.slices.lock() {
            s[i] = slice;
        }
        self.changed.notify_waiters();
    }

    /// Adds a change (bf16 wire) to the slice held, making it its version.
    fn apply(&self, i: usize, delta: &proto::Buffer) -> std::result::Result<(), String> {
        {
            let mut s = self.slices.lock().map_err(|_| "slice lock poisoned")?;
            match &mut s[i] {
                Slice::Have(v, values) if *v == delta.base_version => {
                    proto::apply_delta(values, &delta.values);
                    *v = delta.version;
                }
                Slice::Have(v, _) => {
                    return Err(format!(
                        "sent a change to version {} while this node holds {v}",
                        delta.base_version
                    ))
                }
                _ => return Err("sent a change to a slice this node does not hold".into()),
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }
}

struct Link {
    url: String,
    range: Range<usize>,
    uploads: mpsc::Sender<ShardUpload>,
    reader: JoinHandle<()>,
}

/// The open exchanges with every aggregator.
pub(crate) struct ShardLinks {
    links: Vec<Link>,
    held: Arc<Held>,
    len: usize,
    /// Values of the buffer before the state begins.
    trainable: usize,
}

impl Drop for ShardLinks {
    fn drop(&mut self) {
        for l in &self.links {
            l.reader.abort();
        }
    }
}

/// Checks that `shards` cut `len` values into contiguous slices.
fn ranges(shards: &[ShardInfo], len: usize) -> Result<Vec<Range<usize>>> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(shards.len());
    for s in shards {
        let (start, end) = (s.start as usize, s.end as usize);
        if start != at || end < start || end > len {
            return Err(NodeError::Protocol(format!(
                "the coordinator's shards do not cut the {len} weights into slices ({}..{} after {at})",
                s.start, s.end
            )));
        }
        at = end;
        out.push(start..end);
    }
    if at != len {
        return Err(NodeError::Protocol(format!(
            "the coordinator's shards cover {at} of {len} weights"
        )));
    }
    Ok(out)
}

impl ShardLinks {
    /// Opens an exchange with every aggregator as node `node`.
    pub(crate) async fn connect(
        shards: &[ShardInfo],
        len: usize,
        trainable: usize,
        node: u64,
        secret: &[u8],
        auth: Auth,
        tls: Option<&ClientTls>,
    ) -> Result<Self> {
        let ranges = ranges(shards, len)?;
        let held = Arc::new(Held {
            slices: Mutex::new(shards.iter().map(|_| Slice::Waiting).collect()),
            changed: Notify::new(),
        });
        let mut links = Vec::with_capacity(shards.len());
        for (i, (shard, range)) in shards.iter().zip(ranges).enumerate() {
            let url = shard.url.clone();
            let endpoint = proto::endpoint(&url)
                .map_err(|e| NodeError::Protocol(format!("bad aggregator URL {url:?}: {e}")))?;
            let endpoint = match (url.starts_with("https://"), tls) {
                (false, _) => endpoint,
                (true, Some(tls)) => {
                    // The coordinator's CA and this node's client identity;
                    // the name checked is the URL's host.
                    let mut cfg = ClientTlsConfig::new();
                    if let Some(ca) = &tls.ca {
                        cfg = cfg.ca_certificate(Certificate::from_pem(ca));
                    }
                    if let Some((cert, key)) = &tls.identity {
                        cfg = cfg.identity(Identity::from_pem(cert, key));
                    }
                    endpoint
                        .tls_config(cfg)
                        .map_err(|e| NodeError::Protocol(format!("TLS for {url}: {e}")))?
                }
                (true, None) => {
                    return Err(NodeError::Protocol(format!(
                        "aggregator {url} is https, but this node has no TLS settings (--tls-ca)"
                    )))
                }
            };
            let started = Instant::now();
            let channel = loop {
                match endpoint.connect().await {
                    Ok(c) => break c,
                    Err(e) if started.elapsed() < CONNECT_WAIT => {
                        debug!("aggregator {url} not reachable yet ({e}); retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        return Err(NodeError::Shard(format!(
                            "cannot reach aggregator {url}: {e}"
                        )))
                    }
                }
            };
            let mut client = AggregatorClient::with_interceptor(channel, auth.clone())
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
            let (uploads, queued) = mpsc::channel(UPLOAD_QUEUE);
            let hello = ShardUpload {
                kind: Some(Upload::Hello(ShardHello {
                    node_id: node,
                    session_secret: secret.to_vec().into(),
                })),
            };
            uploads
                .send(hello)
                .await
                .map_err(|_| NodeError::Shard(format!("aggregator {url}: stream closed")))?;
            let mut inbound = client
                .exchange(ReceiverStream::new(queued))
                .await
                .map_err(|s| NodeError::Shard(format!("aggregator {url}: {}", s.message())))?
                .into_inner();
            let slice_len = range.len();
            let reader_held = held.clone();
            let reader_url = url.clone();
            let reader = tokio::spawn(async move {
                let mut chunks = ChunkReceiver::new(slice_len as u64);
                let lost = loop {
                    let chunk = match inbound.message().await {
                        Ok(Some(c)) => c,
                        Ok(None) => break "closed the exchange".to_string(),
                        Err(s) => break s.message().to_string(),
                    };
                    telemetry::received(chunk.data.len());
                    match chunks.push(&chunk) {
                        Ok(Some(b))
                            if b.kind == BufferKind::Weights && b.values.len() == slice_len =>
                        {
                            reader_held.set(i, Slice::Have(b.version, b.values));
                        }
                        Ok(Some(b))
                            if b.kind == BufferKind::WeightsDelta
                                && b.values.len() == slice_len =>
                        {
                            if let Err(why) = reader_held.apply(i, &b) {
                                break why;
                            }
                        }
                        Ok(Some(b)) => {
                            break format!(
                                "sent a {:?} buffer of {} values",
                                b.kind,
                                b.values.len()
                            )
                        }
                        Ok(None) => {}
                        Err(e) => break format!("bad chunk: {e}"),
                    }
                };
                debug!("aggregator {reader_url}: {lost}");
                reader_held.set(i, Slice::Lost(format!("aggregator {reader_url}: {lost}")));
            });
            links.push(Link {
                url,
                range,
                uploads,
                reader,
            });
        }
        Ok(Self {
            links,
            held,
            len,
            trainable,
        })
    }

    /// `f` of the slices of weights `version`, in order (the whole weights
    /// buffer in parts), once every aggregator has sent its slice of it
    /// (waiting at most `wait`); the slices stay where they are, locked,
    /// while `f` reads them.
    pub(crate) async fn with_weights<R>(
        &self,
        version: u64,
        wait: Duration,
        f: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<R> {
        let deadline = Instant::now() + wait;
        loop {
            let changed = self.held.changed.notified();
            {
                let slices = self
                    .held
                    .slices
                    .lock()
                    .map_err(|_| NodeError::Shard("slice lock poisoned".into()))?;
                let mut complete = true;
                for s in slices.iter() {
                    match s {
                        Slice::Lost(why) => return Err(NodeError::Shard(why.clone())),
                        Slice::Have(v, _) if *v > version => {
                            return Err(NodeError::Protocol(format!(
                                "a task needs weights version {version}, but the aggregators are at {v}"
                            )))
                        }
                        Slice::Have(v, _) if *v == version => {}
                        _ => complete = false,
                    }
                }
                if complete {
                    let parts: Vec<&[f32]> = slices
                        .iter()
                        .filter_map(|s| match s {
                            Slice::Have(_, values) => Some(values.as_slice()),
                            _ => None,
                        })
                        .collect();
                    return Ok(f(&parts));
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(NodeError::Shard(format!(
                    "weights version {version} did not come from every aggregator within {wait:?}"
                )));
            }
        }
    }

    /// Sends slice *k* of `answer` (gradients, then state, for part `part`
    /// of step `step`) to aggregator *k*: the slice's gradients (taken from
    /// `bf16`, the whole gradient already rounded with error feedback, when
    /// given) and its state values (f32), each as a buffer of its own.
    pub(crate) async fn push(
        &self,
        step: u64,
        part: u32,
        answer: &[f32],
        bf16: Option<&Bytes>,
    ) -> Result<()> {
        if answer.len() != self.len || bf16.is_some_and(|b| b.len() != 2 * self.trainable) {
            return Err(NodeError::Protocol(format!(
                "an answer of {} values for {} weights",
                answer.len(),
                self.len
            )));
        }
        let size = proto::DEFAULT_CHUNK_BYTES;
        let t = self.trainable;
        for link in &self.links {
            let r = &link.range;
            let grads = r.start.min(t)..r.end.min(t);
            let state = r.start.max(t)..r.end.max(t);
            let mut buffers = Vec::with_capacity(2);
            if !grads.is_empty() {
                buffers.push(match bf16 {
                    Some(b) => Chunker::encoded(
                        BufferKind::Gradients,
                        step,
                        Wire::Bf16,
                        b.slice(2 * grads.start..2 * grads.end),
                        size,
                    ),
                    None => Chunker::new(BufferKind::Gradients, step, &answer[grads], size),
                });
            }
            if !state.is_empty() {
                buffers.push(Chunker::new(BufferKind::State, step, &answer[state], size));
            }
            for chunker in buffers {
                for chunk in chunker.with_part(part).chunks() {
                    telemetry::sent(chunk.data.len());
                    let msg = ShardUpload {
                        kind: Some(Upload::Chunk(chunk)),
                    };
                    link.uploads.send(msg).await.map_err(|_| {
                        NodeError::Shard(format!("aggregator {}: exchange closed", link.url))
                    })?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(start: u64, end: u64) -> ShardInfo {
        ShardInfo {
            url: "http://127.0.0.1:1".into(),
            start,
            end,
        }
    }

    #[test]
    fn shards_must_cut_the_buffer_into_contiguous_slices() {
        assert_eq!(
            ranges(&[shard(0, 16), shard(16, 20)], 20).unwrap(),
            vec![0..16, 16..20]
        );
        assert!(ranges(&[shard(0, 16), shard(17, 20)], 20).is_err());
        assert!(ranges(&[shard(0, 16)], 20).is_err());
        assert!(ranges(&[shard(0, 24)], 20).is_err());
        assert!(ranges(&[shard(0, 16), shard(16, 8)], 20).is_err());
    }
}
