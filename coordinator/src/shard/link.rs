//! The coordinator's side of the shard aggregators: one control stream to
//! each, over which it sets them up, names the members, plans and commits
//! every step and gathers their slices for checkpoints.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use proto::v1::aggregator_client::AggregatorClient;
use proto::v1::aggregator_message::Kind as Report;
use proto::v1::control_message::Kind as Control;
use proto::v1::{
    AggregatorMessage, BufferKind, Commit, ControlMessage, Dump, L2Run, PlannedPart, ShardInfo,
    ShardMember, ShardSetup, StepPlan, StepQuery, StepReady,
};
use proto::{ChunkReceiver, Chunker};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing::{debug, info};

use super::split;
use crate::aggregate::L2Range;
use crate::{CoordinatorError, Optimizer};

type Result<T> = std::result::Result<T, CoordinatorError>;

/// How long aggregators that were asked what they lack may take to say.
const QUERY_WAIT: Duration = Duration::from_secs(10);

/// The aggregators' answers to one plan, put together.
#[derive(Debug)]
pub(crate) enum Readiness {
    /// Every slice is in and averaged.
    Ready {
        /// Σ g² of the whole averaged gradient (with L2).
        squares: f64,
        /// Σ l2·w² over all the weights.
        penalty: f64,
        /// Σ g² of each part's whole gradient, in plan order.
        part_squares: Vec<f64>,
    },
    /// Parts (part, node) whose slices did not come, or hold non-finite
    /// values.
    Problems {
        missing: Vec<(u32, u64)>,
        bad: Vec<(u32, u64)>,
    },
    /// An aggregator ended a node's exchange, saying why.
    CutOff {
        node: u64,
        aggregator: String,
        reason: String,
    },
}

/// Where the aggregators start from (see [`Aggregators::setup`]).
pub(crate) struct Start<'a> {
    /// The whole buffer (trainable values, then state) of `version`.
    pub weights: &'a [f32],
    pub num_trainable: usize,
    pub l2: &'a [L2Range],
    /// Its state is cut into the slices too.
    pub optimizer: &'a dyn Optimizer,
    pub version: u64,
    /// Most parts of one step a node may send slices of.
    pub max_parts: u32,
    /// How weight slices go to the nodes.
    pub wire: proto::Wire,
}

/// Tells the aggregators who the members are (cheap to clone; never waits).
#[derive(Clone)]
pub(crate) struct MemberNotice(Vec<mpsc::UnboundedSender<ControlMessage>>);

impl MemberNotice {
    pub(crate) fn send(&self, node: u64, secret: &[u8], present: bool) {
        for outbox in &self.0 {
            let msg = ControlMessage {
                kind: Some(Control::Member(ShardMember {
                    node_id: node,
                    session_secret: secret.to_vec().into(),
                    present,
                })),
            };
            // (Only fails once the aggregator is gone, which stops the run.)
            if outbox.send(msg).is_err() {
                debug!(node, "an aggregator's control stream is closed");
            }
        }
    }
}

/// The connected aggregators, in slice order.
pub(crate) struct Aggregators {
    urls: Vec<String>,
    ranges: Vec<Range<usize>>,
    /// What goes to each aggregator, in order. Unbounded: everything in it
    /// is the coordinator's own (setup chunks, plans, notices), and a member
    /// notice must never be dropped.
    outboxes: Vec<mpsc::UnboundedSender<ControlMessage>>,
    inbound: mpsc::Receiver<Inbound>,
    /// Messages read while watching for failures, not handled yet.
    stash: VecDeque<Inbound>,
    /// Cut-off notices read while waiting for something else (a dump), for
    /// the next [`Aggregators::ready`].
    cut_offs: VecDeque<Inbound>,
    /// The answers to plan (step, attempt) already in when a cut-off made
    /// [`Aggregators::ready`] return (an unchanged plan is not answered
    /// again).
    partial: Option<(u64, u32, Vec<Option<StepReady>>)>,
    readers: Vec<JoinHandle<()>>,
}

/// A message from aggregator `.0`, or why its stream ended.
type Inbound = (usize, std::result::Result<AggregatorMessage, String>);

impl Drop for Aggregators {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// An aggregator the run cannot start with.
fn unusable(url: &str, why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Aggregator(format!(
        "cannot use aggregator {url}: {why} (is `gradcast aggregator` running there, with the same token, and free of other coordinators?)"
    ))
}

/// An aggregator lost mid-run.
fn lost(url: &str, why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Aggregator(format!(
        "aggregator {url}: {why}; the run cannot go on without its slice (restart it and rerun with --resume)"
    ))
}

impl Aggregators {
    /// Opens the control stream of every aggregator in `urls` (retrying for
    /// up to `wait`); aggregator *k* gets slice *k* of `len` values.
    /// `ca`: the CA that signed the aggregators' certificates, for https
    /// URLs.
    pub(crate) async fn connect(
        urls: &[String],
        token: Option<&str>,
        ca: Option<&[u8]>,
        len: usize,
        wait: Duration,
    ) -> Result<Self> {
        let auth: Option<MetadataValue<Ascii>> = match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                CoordinatorError::Config("the token must be printable ASCII".into())
            })?),
            None => None,
        };
        let started = Instant::now();
        let (tx, inbound) = mpsc::channel(64);
        let mut outboxes = Vec::new();
        let mut readers = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let endpoint = proto::endpoint(url).map_err(|e| {
                CoordinatorError::Config(format!("bad aggregator URL {url:?}: {e}"))
            })?;
            let endpoint = match (url.starts_with("https://"), ca) {
                (false, _) => endpoint,
                (true, Some(ca)) => endpoint
                    .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                    .map_err(|e| CoordinatorError::Config(format!("TLS for {url}: {e}")))?,
                (true, None) => {
                    return Err(CoordinatorError::Config(format!(
                        "aggregator {url} is https: give the CA that signed its certificate (--aggregator-ca)"
                    )))
                }
            };
            let mut delay = Duration::from_millis(100);
            let channel = loop {
                match endpoint.connect().await {
                    Ok(c) => break c,
                    Err(e) if started.elapsed() < wait => {
                        debug!("aggregator {url} not reachable yet ({e}); retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => return Err(unusable(url, format!("unreachable ({e})"))),
                }
            };
            let auth = auth.clone();
            let mut client =
                AggregatorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                    if let Some(v) = &auth {
                        req.metadata_mut().insert("authorization", v.clone());
                    }
                    Ok(req)
                })
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
            // An aggregator still held by a coordinator that just died frees
            // itself once that stream's keep-alive fails: retry meanwhile.
            let (otx, mut stream) = loop {
                let (otx, orx) = mpsc::unbounded_channel();
                match client.control(UnboundedReceiverStream::new(orx)).await {
                    Ok(r) => break (otx, r.into_inner()),
                    Err(s)
                        if s.code() == tonic::Code::FailedPrecondition
                            && started.elapsed() < wait =>
                    {
                        debug!("aggregator {url} is busy ({}); retrying", s.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(s) => return Err(unusable(url, s.message())),
                }
            };
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                loop {
                    let msg = match stream.message().await {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => Err("closed its control stream".to_string()),
                        Err(s) => Err(format!("control stream: {}", s.message())),
                    };
                    let end = msg.is_err();
                    if tx.send((i, msg)).await.is_err() || end {
                        return;
                    }
                }
            }));
            outboxes.push(otx);
            info!("aggregator {url} connected (slice {})", i);
        }
        Ok(Self {
            urls: urls.to_vec(),
            ranges: split(len, urls.len()),
            outboxes,
            inbound,
            stash: VecDeque::new(),
            cut_offs: VecDeque::new(),
            partial: None,
            readers,
        })
    }

    /// The next message (kept ones first); None once `deadline` passed.
    async fn next(&mut self, deadline: Instant) -> Result<Option<Inbound>> {
        if let Some(m) = self.stash.pop_front() {
            return Ok(Some(m));
        }
        match tokio::time::timeout_at(deadline, self.inbound.recv()).await {
            Ok(Some(m)) => Ok(Some(m)),
            Ok(None) => Err(CoordinatorError::Aggregator("every aggregator left".into())),
            Err(_) => Ok(None),
        }
    }

    /// Resolves only when an aggregator fails or leaves (with why); keeps
    /// every other message for later. Run it beside anything that waits
    /// on nodes, so a lost aggregator stops the run at once.
    pub(crate) async fn failed(&mut self) -> CoordinatorError {
        loop {
            match self.inbound.recv().await {
                Some((i, Err(why))) => return lost(&self.urls[i], why),
                Some((
                    i,
                    Ok(AggregatorMessage {
                        kind: Some(Report::Error(e)),
                    }),
                )) => return lost(&self.urls[i], e.message),
                Some(m) => self.stash.push_back(m),
                None => return CoordinatorError::Aggregator("every aggregator left".into()),
            }
        }
    }

    /// Where nodes find each slice.
    pub(crate) fn shards(&self) -> Vec<ShardInfo> {
        self.urls
            .iter()
            .zip(&self.ranges)
            .map(|(url, r)| ShardInfo {
                url: url.clone(),
                start: r.start as u64,
                end: r.end as u64,
            })
            .collect()
    }

    pub(crate) fn notice(&self) -> MemberNotice {
        MemberNotice(self.outboxes.clone())
    }

    async fn send(&self, i: usize, kind: Control) -> Result<()> {
        self.outboxes[i]
            .send(ControlMessage { kind: Some(kind) })
            .map_err(|_| lost(&self.urls[i], "its control stream is closed"))
    }

    async fn broadcast(&self, kind: Control) -> Result<()> {
        for i in 0..self.outboxes.len() {
            self.send(i, kind.clone()).await?;
        }
        Ok(())
    }

    /// Gives each aggregator its slice of the weights and of the
    /// optimizer's state.
    pub(crate) async fn setup(&self, start: Start<'_>) -> Result<()> {
        let Start {
            weights,
            num_trainable,
            l2,
            optimizer,
            version,
            max_parts,
            wire,
        } = start;
        let state = optimizer.state();
        let size = proto::DEFAULT_CHUNK_BYTES;
        for (i, r) in self.ranges.iter().enumerate() {
            let setup = ShardSetup {
                start: r.start as u64,
                end: r.end as u64,
                num_trainable: num_trainable as u64,
                l2: l2
                    .iter()
                    .map(|l| L2Run {
                        start: l.range.start as u64,
                        end: l.range.end as u64,
                        l2: l.l2,
                    })
                    .collect(),
                optimizer: optimizer.kind().to_string(),
                iterations: optimizer.iterations(),
                version,
                optimizer_state: !state.is_empty(),
                max_parts,
                wire: wire.dtype() as i32,
            };
            self.send(i, Control::Setup(setup)).await?;
            let chunker = Chunker::new(BufferKind::Weights, version, &weights[r.clone()], size);
            for c in chunker.chunks() {
                self.send(i, Control::Chunk(c)).await?;
            }
            if !state.is_empty() {
                let t = r.start.min(num_trainable)..r.end.min(num_trainable);
                let values: Vec<f32> = state
                    .iter()
                    .flat_map(|(_, v)| v[t.clone()].iter().copied())
                    .collect();
                let chunker = Chunker::new(BufferKind::Optimizer, version, &values, size);
                for c in chunker.chunks() {
                    self.send(i, Control::Chunk(c)).await?;
                }
            }
        }
        Ok(())
    }

    /// Names the parts of step `step` (attempt `attempt`) and who computed
    /// each.
    pub(crate) async fn plan(
        &self,
        step: u64,
        attempt: u32,
        parts: Vec<PlannedPart>,
    ) -> Result<()> {
        self.broadcast(Control::Plan(StepPlan {
            step,
            parts,
            attempt,
        }))
        .await
    }

    /// Waits for every aggregator's answer to the plan; after `wait`, asks
    /// those that have not answered which slices they lack.
    pub(crate) async fn ready(
        &mut self,
        step: u64,
        attempt: u32,
        parts: usize,
        wait: Duration,
    ) -> Result<Readiness> {
        let k = self.outboxes.len();
        // The answers a cut-off interrupted count for the same plan.
        let mut got: Vec<Option<StepReady>> = match self.partial.take() {
            Some((s, a, got)) if (s, a) == (step, attempt) => got,
            _ => vec![None; k],
        };
        let mut deadline = Instant::now() + wait;
        let mut queried = false;
        loop {
            if got.iter().all(Option::is_some) {
                return Ok(combine(got.into_iter().flatten().collect(), parts));
            }
            // Non-finite slices: their nodes go and their parts are planned
            // anew at once (the other aggregators may still be receiving
            // honest slices; they are not asked what they lack).
            let bad: Vec<(u32, u64)> = got
                .iter()
                .flatten()
                .flat_map(|r| r.bad.iter().map(|p| (p.part, p.node_id)))
                .collect();
            if !bad.is_empty() {
                return Ok(Readiness::Problems {
                    missing: Vec::new(),
                    bad,
                });
            }
            let next = match self.cut_offs.pop_front() {
                Some(m) => Some(m),
                None => self.next(deadline).await?,
            };
            match next {
                Some((i, Ok(AggregatorMessage { kind: Some(kind) }))) => match kind {
                    Report::Ready(r) if r.step == step && r.attempt == attempt => got[i] = Some(r),
                    Report::Error(e) => return Err(lost(&self.urls[i], e.message)),
                    Report::CutOff(c) => {
                        self.partial = Some((step, attempt, got));
                        return Ok(Readiness::CutOff {
                            node: c.node_id,
                            aggregator: self.urls[i].clone(),
                            reason: c.reason,
                        });
                    }
                    _ => debug!("ignoring a stale message from aggregator {i}"),
                },
                Some((_, Ok(_))) => {}
                Some((i, Err(why))) => return Err(lost(&self.urls[i], why)),
                None if !queried => {
                    self.query(step, attempt, &got).await?;
                    queried = true;
                    deadline = Instant::now() + QUERY_WAIT;
                }
                None => {
                    let silent = got.iter().position(Option::is_none).unwrap_or(0);
                    return Err(lost(&self.urls[silent], "does not answer"));
                }
            }
        }
    }

    async fn query(&self, step: u64, attempt: u32, got: &[Option<StepReady>]) -> Result<()> {
        for (i, g) in got.iter().enumerate() {
            if g.is_none() {
                self.send(i, Control::Query(StepQuery { step, attempt }))
                    .await?;
            }
        }
        Ok(())
    }

    /// Applies (or skips) step `step` on every slice.
    pub(crate) async fn commit(&self, commit: Commit) -> Result<()> {
        self.broadcast(Control::Commit(commit)).await
    }

    /// The whole weights buffer (`len` values) and optimizer state (`vectors`
    /// vectors of `num_trainable`) as of `version`, gathered from the slices.
    pub(crate) async fn dump(
        &mut self,
        version: u64,
        len: usize,
        num_trainable: usize,
        vectors: usize,
        wait: Duration,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        self.broadcast(Control::Dump(Dump { version })).await?;
        let k = self.outboxes.len();
        let mut weights = vec![0.0f32; len];
        let mut state = vec![vec![0.0f32; num_trainable]; vectors];
        let mut receivers: Vec<ChunkReceiver> = (0..k)
            .map(|_| ChunkReceiver::new((len * (vectors + 1)) as u64))
            .collect();
        let mut done = vec![(false, false); k];
        let deadline = Instant::now() + wait;
        while done.iter().any(|&(w, s)| !(w && s)) {
            let (i, msg) = match self.next(deadline).await? {
                Some(m) => m,
                None => {
                    let silent = done.iter().position(|&(w, s)| !(w && s)).unwrap_or(0);
                    return Err(lost(&self.urls[silent], "did not send its slice in time"));
                }
            };
            let chunk = match msg {
                Ok(AggregatorMessage {
                    kind: Some(Report::Chunk(c)),
                }) => c,
                Ok(AggregatorMessage {
                    kind: Some(Report::Error(e)),
                }) => return Err(lost(&self.urls[i], e.message)),
                Ok(
                    m @ AggregatorMessage {
                        kind: Some(Report::CutOff(_)),
                    },
                ) => {
                    self.cut_offs.push_back((i, Ok(m)));
                    continue;
                }
                Ok(_) => continue,
                Err(why) => return Err(lost(&self.urls[i], why)),
            };
            let Some(buffer) = receivers[i]
                .push(&chunk)
                .map_err(|e| lost(&self.urls[i], e))?
            else {
                continue;
            };
            let r = self.ranges[i].clone();
            let t = r.start.min(num_trainable)..r.end.min(num_trainable);
            match buffer.kind {
                BufferKind::Weights if buffer.values.len() == r.len() => {
                    weights[r].copy_from_slice(&buffer.values);
                    done[i].0 = true;
                }
                BufferKind::Optimizer if buffer.values.len() == vectors * t.len() => {
                    for (v, values) in state.iter_mut().zip(buffer.values.chunks(t.len().max(1))) {
                        v[t.clone()].copy_from_slice(values);
                    }
                    done[i].1 = true;
                }
                kind => {
                    return Err(lost(
                        &self.urls[i],
                        format!("sent a {kind:?} buffer of {} values", buffer.values.len()),
                    ))
                }
            }
        }
        Ok((weights, state))
    }
}

/// Sums the slices' answers into the whole step's.
fn combine(answers: Vec<StepReady>, parts: usize) -> Readiness {
    let pairs =
        |v: &[PlannedPart]| -> Vec<(u32, u64)> { v.iter().map(|p| (p.part, p.node_id)).collect() };
    let mut missing: Vec<(u32, u64)> = answers.iter().flat_map(|r| pairs(&r.missing)).collect();
    let mut bad: Vec<(u32, u64)> = answers.iter().flat_map(|r| pairs(&r.bad)).collect();
    if !missing.is_empty() || !bad.is_empty() {
        missing.sort_unstable();
        missing.dedup();
        bad.sort_unstable();
        bad.dedup();
        return Readiness::Problems { missing, bad };
    }
    let mut part_squares = vec![0.0f64; parts];
    for r in &answers {
        for (sum, s) in part_squares.iter_mut().zip(&r.part_squares) {
            *sum += s;
        }
    }
    Readiness::Ready {
        squares: answers.iter().map(|r| r.squares).sum(),
        penalty: answers.iter().map(|r| r.penalty).sum(),
        part_squares,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::NodeCutOff;

    /// What the coordinator sends to the fake aggregators.
    type Sent = Vec<mpsc::UnboundedReceiver<ControlMessage>>;

    /// Aggregators whose messages the test writes itself.
    fn fake(k: usize) -> (Aggregators, mpsc::Sender<Inbound>, Sent) {
        let (tx, inbound) = mpsc::channel(16);
        let (outboxes, sent): (Vec<_>, Vec<_>) = (0..k).map(|_| mpsc::unbounded_channel()).unzip();
        let aggregators = Aggregators {
            urls: (0..k).map(|i| format!("http://aggregator{i}")).collect(),
            ranges: split(64, k),
            outboxes,
            inbound,
            stash: VecDeque::new(),
            cut_offs: VecDeque::new(),
            partial: None,
            readers: Vec::new(),
        };
        (aggregators, tx, sent)
    }

    fn ready(step: u64, squares: f64) -> Inbound {
        let r = StepReady {
            step,
            squares,
            part_squares: vec![squares],
            ..StepReady::default()
        };
        (
            0,
            Ok(AggregatorMessage {
                kind: Some(Report::Ready(r)),
            }),
        )
    }

    fn cut_off(node: u64) -> AggregatorMessage {
        AggregatorMessage {
            kind: Some(Report::CutOff(NodeCutOff {
                node_id: node,
                reason: "flooded".into(),
            })),
        }
    }

    /// A cut-off is handed up at once, and the answers to the same plan
    /// that were in before it still count when the wait resumes (an
    /// unchanged plan is not answered twice).
    #[tokio::test]
    async fn a_cut_off_interrupts_the_wait_without_losing_answers_in() {
        let (mut aggregators, tx, _sent) = fake(2);
        tx.send(ready(5, 1.0)).await.unwrap();
        tx.send((1, Ok(cut_off(9)))).await.unwrap();
        let wait = Duration::from_secs(5);
        match aggregators.ready(5, 0, 1, wait).await.unwrap() {
            Readiness::CutOff {
                node,
                aggregator,
                reason,
            } => {
                assert_eq!((node, aggregator.as_str()), (9, "http://aggregator1"));
                assert_eq!(reason, "flooded");
            }
            _ => panic!("the cut-off was not handed up"),
        }
        let mut second = ready(5, 2.0);
        second.0 = 1;
        tx.send(second).await.unwrap();
        match aggregators.ready(5, 0, 1, wait).await.unwrap() {
            Readiness::Ready { part_squares, .. } => assert_eq!(part_squares, vec![3.0]),
            _ => panic!("not ready with both answers"),
        }
    }

    /// A cut-off read while gathering a dump waits for the next step's
    /// readiness, ahead of anything else.
    #[tokio::test]
    async fn a_cut_off_during_a_dump_is_kept_for_the_next_wait() {
        let (mut aggregators, tx, _sent) = fake(1);
        tx.send((0, Ok(cut_off(4)))).await.unwrap();
        // Nothing else comes: the dump gives up, keeping the notice.
        let dumped = aggregators
            .dump(3, 64, 64, 0, Duration::from_millis(50))
            .await;
        assert!(dumped.is_err());
        match aggregators
            .ready(4, 0, 1, Duration::from_secs(5))
            .await
            .unwrap()
        {
            Readiness::CutOff { node, .. } => assert_eq!(node, 4),
            _ => panic!("the cut-off read during the dump was lost"),
        }
    }
}
