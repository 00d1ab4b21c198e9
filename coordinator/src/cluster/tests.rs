//! The cluster against fake nodes: tasks in, answers out, in virtual time
//! (tokio's paused clock), so deadlines are exact and nothing depends on
//! how busy the machine is.

use super::*;
use crate::task::{samples, Gradients};
use proto::v1::{EvalResult, TrainResult};
use tonic::Status;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Enough weights for three chunks.
const WEIGHTS: usize = 3 * proto::DEFAULT_CHUNK_BYTES / 4;

type Inbox = mpsc::Receiver<std::result::Result<CoordinatorMessage, Status>>;

fn cluster(min_nodes: usize) -> (Cluster, mpsc::Sender<Event>) {
    let (tx, rx) = mpsc::channel(crate::service::EVENT_QUEUE);
    let limits = Limits {
        step_timeout: TIMEOUT,
        min_nodes,
        rejoin_timeout: TIMEOUT,
        balance: false,
        wire: proto::Wire::F32,
    };
    (Cluster::new(limits, rx, None, None), tx)
}

/// A node's Joined event with an outbox of `capacity` messages.
async fn join(events: &mpsc::Sender<Event>, node: u64, capacity: usize) -> Inbox {
    let (outbox, inbox) = mpsc::channel(capacity);
    let info = NodeInfo {
        hostname: format!("fake-{node}"),
        device: "cpu".into(),
        threads: 1,
    };
    let joined = Event::Joined {
        node,
        outbox,
        info,
        shared: None,
        secret: [0; 16],
    };
    events.send(joined).await.unwrap();
    inbox
}

fn tasks(sizes: &[u32]) -> Vec<Task> {
    sizes
        .iter()
        .enumerate()
        .map(|(part, &n)| Task::Train {
            ahead: false,
            samples: samples(vec![part as u8; n as usize * 3072], vec![0; n as usize]),
            seed: part as u64,
        })
        .collect()
}

/// A correct answer: the gradient says who computed which part.
fn answer(node: u64, step: u64, part: u32, samples: u32) -> Event {
    Event::Train {
        node,
        result: TrainResult {
            step,
            part,
            samples,
            correct: samples / 2,
            loss_sum: 1.0,
            compute_seconds: 0.25,
            ..TrainResult::default()
        },
        gradients: Gradients::Owned(vec![node as f32, part as f32]),
        state: vec![],
    }
}

/// The weights' version if `c` is the last chunk of its buffer.
fn last_chunk(c: &proto::v1::Chunk) -> Option<u64> {
    (c.offset + c.data.len() as u64 / 4 == c.total_elements).then_some(c.version)
}

/// What each fake returned, in node order (once the cluster let them go).
async fn outcomes<T>(fakes: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut got = Vec::new();
    for f in fakes {
        got.push(f.await.unwrap());
    }
    got
}

/// How a fake node behaves once it has a task.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answers every task after `delay` (virtual time).
    Honest(Duration),
    /// Reads its tasks, never answers.
    Silent,
    /// Answers for another step.
    WrongStep,
    /// Leaves when it gets a task.
    Leaves,
}

/// Runs a fake node on its inbox until the cluster drops it; returns the
/// reason of the Finish it got, if any.
fn spawn(
    node: u64,
    mut inbox: Inbox,
    events: mpsc::Sender<Event>,
    behaviour: Behaviour,
) -> tokio::task::JoinHandle<Option<String>> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = inbox.recv().await {
            let task = match msg.kind {
                Some(Out::Train(t)) => t,
                Some(Out::Finish(f)) => return Some(f.reason),
                Some(Out::Chunk(c)) => {
                    if let Some(version) = last_chunk(&c) {
                        let _ = events.send(Event::Received { node, version }).await;
                    }
                    continue;
                }
                _ => continue,
            };
            let count = task.samples.map_or(0, |s| s.count);
            let event = match behaviour {
                Behaviour::Honest(delay) => {
                    tokio::time::sleep(delay).await;
                    answer(node, task.step, task.part, count)
                }
                Behaviour::Silent => continue,
                Behaviour::WrongStep => answer(node, task.step + 1000, task.part, count),
                Behaviour::Leaves => Event::Left {
                    node,
                    reason: "closed its stream".into(),
                },
            };
            if events.send(event).await.is_err() {
                break;
            }
        }
        None
    })
}

/// The Finish a node's inbox held when the cluster let go of it.
async fn finish_of(mut inbox: Inbox) -> Option<proto::v1::Finish> {
    let mut last = None;
    while let Some(Ok(m)) = inbox.recv().await {
        if let Some(Out::Finish(f)) = m.kind {
            last = Some(f);
        }
    }
    last
}

/// A fake node that joins with a roomy outbox and behaves so.
async fn fake(
    events: &mpsc::Sender<Event>,
    node: u64,
    behaviour: Behaviour,
) -> tokio::task::JoinHandle<Option<String>> {
    spawn(
        node,
        join(events, node, 64).await,
        events.clone(),
        behaviour,
    )
}

fn work(version: u64, weights: &[f32]) -> Work<'_> {
    Work {
        phase: "step",
        version,
        round: 0,
        weights,
        parts: None,
    }
}

/// (node that computed it, part the gradient says) per answer.
fn who(answers: &[(u64, Answer)]) -> Vec<(u64, f32)> {
    answers
        .iter()
        .map(|(node, a)| match a {
            Answer::Train {
                gradients: Gradients::Owned(g),
                ..
            } => {
                assert_eq!(g[0], *node as f32, "answer credited to the wrong node");
                (*node, g[1])
            }
            _ => panic!("not a training answer"),
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn answers_come_back_in_part_order_whatever_order_they_arrive_in() {
    let (mut cluster, events) = cluster(1);
    let delays = [300, 100, 200];
    let mut fakes = Vec::new();
    for (node, ms) in delays.into_iter().enumerate() {
        let inbox = join(&events, node as u64, 64).await;
        let b = Behaviour::Honest(Duration::from_millis(ms));
        fakes.push(spawn(node as u64, inbox, events.clone(), b));
    }
    cluster.wait_for(3, Some(TIMEOUT), "--nodes").await.unwrap();
    assert_eq!(cluster.shares(10), vec![(0, 4), (1, 3), (2, 3)]);
    let weights = vec![0.5f32; WEIGHTS];
    let started = Instant::now();
    let (answers, _) = cluster
        .run(&work(7, &weights), &tasks(&[4, 3, 3]), &[0, 1, 2])
        .await
        .unwrap();
    assert_eq!(who(&answers), vec![(0, 0.0), (1, 1.0), (2, 2.0)]);
    // The slowest node sets the pace; nobody waited for a timeout.
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(cluster.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_is_evicted_at_the_step_timeout_and_its_part_recomputed() {
    let (mut cluster, events) = cluster(1);
    let honest = fake(&events, 0, Behaviour::Honest(Duration::ZERO)).await;
    let silent = fake(&events, 1, Behaviour::Silent).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    let weights = vec![0.5f32; WEIGHTS];
    let started = Instant::now();
    let (answers, _) = cluster
        .run(&work(3, &weights), &tasks(&[2, 2]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(started.elapsed(), TIMEOUT);
    assert_eq!(who(&answers), vec![(0, 0.0), (0, 1.0)]);
    assert_eq!(cluster.len(), 1);
    let reason = silent.await.unwrap().expect("the silent node was told");
    assert!(
        reason.contains("evicted: no answer to step within 30s"),
        "{reason}"
    );
    cluster.dismiss("done").await;
    assert_eq!(honest.await.unwrap().as_deref(), Some("done"));
}

/// The attack of a client that answers without reading: its answers are
/// right, but its outbox fills up. The send to it has a deadline, so it is
/// evicted, its part goes to the honest node, and its later answers are
/// ignored as those of a removed node.
#[tokio::test(start_paused = true)]
async fn a_node_that_stops_reading_is_evicted_by_the_send_deadline_even_if_it_answers() {
    let (mut cluster, events) = cluster(1);
    let honest = fake(&events, 0, Behaviour::Honest(Duration::from_millis(10))).await;
    // Room for one step's weights (3 chunks) and task; never read.
    let _deaf = join(&events, 1, 4).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    let blind = |step: u64| {
        let events = events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            events.send(answer(1, step, 1, 2)).await.unwrap();
        })
    };
    let weights = vec![0.5f32; WEIGHTS];
    blind(0);
    let (answers, _) = cluster
        .run(&work(0, &weights), &tasks(&[2, 2]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(who(&answers), vec![(0, 0.0), (1, 1.0)]);
    // Step 1: its outbox is full.
    blind(1);
    let started = Instant::now();
    let (answers, _) = cluster
        .run(&work(1, &weights), &tasks(&[2, 2]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(started.elapsed(), TIMEOUT + Duration::from_millis(10));
    assert_eq!(who(&answers), vec![(0, 0.0), (0, 1.0)]);
    assert_eq!(cluster.len(), 1);
    cluster.dismiss("done").await;
    assert_eq!(honest.await.unwrap().as_deref(), Some("done"));
}

#[tokio::test(start_paused = true)]
async fn a_wrong_step_answer_evicts_at_once() {
    let (mut cluster, events) = cluster(1);
    let _honest = fake(&events, 0, Behaviour::Honest(Duration::from_millis(50))).await;
    let liar = fake(&events, 1, Behaviour::WrongStep).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    let weights = vec![0.5f32; 8];
    let started = Instant::now();
    let (answers, _) = cluster
        .run(&work(5, &weights), &tasks(&[1, 1]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(who(&answers), vec![(0, 0.0), (0, 1.0)]);
    let reason = liar.await.unwrap().unwrap();
    assert!(reason.contains("training result for step 1005"), "{reason}");
}

/// Answers for parts a node was not given, or evaluation results during a
/// training step, evict their sender; the same from a node already removed
/// is a late answer and changes nothing.
#[tokio::test(start_paused = true)]
async fn answers_nobody_asked_for_evict_members_and_are_ignored_from_others() {
    let (mut cluster, events) = cluster(1);
    let _honest = fake(&events, 0, Behaviour::Honest(Duration::from_millis(50))).await;
    let other = join(&events, 1, 64).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    // From a node that is not a member (never was, or removed): ignored.
    events.send(answer(9, 0, 0, 1)).await.unwrap();
    // From a member: part 0 belongs to node 0.
    events.send(answer(1, 0, 0, 1)).await.unwrap();
    let weights = vec![0.5f32; 8];
    let (answers, _) = cluster
        .run(&work(0, &weights), &tasks(&[1]), &[0])
        .await
        .unwrap();
    assert_eq!(who(&answers), vec![(0, 0.0)]);
    assert_eq!(cluster.len(), 1);
    let finish = finish_of(other).await.expect("told it was evicted");
    assert!(finish.evicted);
    assert!(
        finish.reason.contains("answered part 0"),
        "{}",
        finish.reason
    );
    // An evaluation result in a training step.
    let third = join(&events, 2, 64).await;
    events
        .send(Event::Eval {
            node: 2,
            result: EvalResult::default(),
        })
        .await
        .unwrap();
    cluster
        .run(&work(1, &weights), &tasks(&[1]), &[0])
        .await
        .unwrap();
    assert_eq!(cluster.len(), 1);
    let reason = finish_of(third).await.expect("told it was evicted").reason;
    assert!(reason.contains("evaluation result"), "{reason}");
}

/// A node that leaves gives its part to the node with the least open work.
#[tokio::test(start_paused = true)]
async fn a_lost_part_goes_to_the_least_loaded_node() {
    let (mut cluster, events) = cluster(1);
    let slow = Behaviour::Honest(Duration::from_secs(5));
    let _a = fake(&events, 0, slow).await;
    let _b = fake(&events, 1, slow).await;
    let _c = fake(&events, 2, Behaviour::Leaves).await;
    cluster.wait_for(3, None, "--nodes").await.unwrap();
    let weights = vec![0.5f32; 8];
    // Node 0 holds two parts, node 1 one: node 2's part goes to node 1.
    let (answers, _) = cluster
        .run(&work(0, &weights), &tasks(&[1, 1, 1, 1]), &[0, 0, 1, 2])
        .await
        .unwrap();
    assert_eq!(who(&answers), vec![(0, 0.0), (0, 1.0), (1, 2.0), (1, 3.0)]);
    assert_eq!(cluster.len(), 2);
}

/// Below `--min-nodes` a lost part waits for a node to join, and goes to
/// it; the answers of the others that come meanwhile are kept.
#[tokio::test(start_paused = true)]
async fn below_min_nodes_a_lost_part_waits_for_a_newcomer() {
    let (mut cluster, events) = cluster(2);
    let honest = Behaviour::Honest(Duration::from_millis(10));
    let _a = fake(&events, 0, honest).await;
    let _b = fake(&events, 1, Behaviour::Leaves).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    let newcomer = {
        let events = events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let inbox = join(&events, 2, 64).await;
            spawn(2, inbox, events, honest).await
        })
    };
    let weights = vec![0.5f32; 8];
    let started = Instant::now();
    let (answers, _) = cluster
        .run(&work(0, &weights), &tasks(&[1, 1]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(who(&answers), vec![(0, 0.0), (2, 1.0)]);
    assert_eq!(started.elapsed(), Duration::from_millis(20_010));
    drop(newcomer);
}

/// ... and with nobody joining, the run ends after `--rejoin-timeout` with
/// a clear error.
#[tokio::test(start_paused = true)]
async fn below_min_nodes_with_nobody_joining_the_run_ends_after_the_rejoin_timeout() {
    let (mut cluster, events) = cluster(2);
    let honest = Behaviour::Honest(Duration::from_millis(10));
    let _a = fake(&events, 0, honest).await;
    let _b = fake(&events, 1, Behaviour::Leaves).await;
    cluster.wait_for(2, None, "--nodes").await.unwrap();
    let weights = vec![0.5f32; 8];
    let started = Instant::now();
    let err = cluster
        .run(&work(0, &weights), &tasks(&[1, 1]), &[0, 1])
        .await
        .err()
        .expect("not enough nodes");
    assert!(
        matches!(
            err,
            CoordinatorError::NotEnoughNodes {
                joined: 1,
                wanted: 2,
                flag: "--min-nodes",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("lower --min-nodes"), "{err}");
    assert_eq!(started.elapsed(), TIMEOUT);
}

/// Nodes on gRPC get their weights one at a time: the next node's chunks
/// go out when the one before says it has all of its own; a node that never
/// says so holds the next one up only for the receive wait.
#[tokio::test(start_paused = true)]
async fn weights_go_to_one_node_at_a_time() {
    // A fake that takes `receive` to acknowledge the last chunk (never, if
    // None) and answers at once; returns when it got its tasks.
    fn receiver(
        node: u64,
        mut inbox: Inbox,
        events: mpsc::Sender<Event>,
        receive: Option<Duration>,
    ) -> tokio::task::JoinHandle<Vec<Duration>> {
        let start = Instant::now();
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Ok(msg)) = inbox.recv().await {
                match msg.kind {
                    Some(Out::Chunk(c)) => {
                        if let (Some(version), Some(delay)) = (last_chunk(&c), receive) {
                            let events = events.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = events.send(Event::Received { node, version }).await;
                            });
                        }
                    }
                    Some(Out::Train(t)) => {
                        got.push(start.elapsed());
                        let count = t.samples.map_or(0, |s| s.count);
                        let _ = events.send(answer(node, t.step, t.part, count)).await;
                    }
                    _ => {}
                }
            }
            got
        })
    }
    let ms = Duration::from_millis;
    let weights = vec![0.5f32; WEIGHTS];
    for (receives, want) in [
        // Each node takes 10 ms to receive: tasks at 0, 10 and 20 ms.
        ([Some(ms(10)); 3], [ms(0), ms(10), ms(20)]),
        // Node 0 never acknowledges: node 1 waits out the receive wait
        // (2 × the first guess of 1 s), node 2 follows node 1's 10 ms.
        (
            [None, Some(ms(10)), Some(ms(10))],
            [ms(0), ms(2000), ms(2010)],
        ),
    ] {
        let (mut cluster, events) = cluster(1);
        let mut fakes = Vec::new();
        for (node, receive) in receives.into_iter().enumerate() {
            let inbox = join(&events, node as u64, 64).await;
            fakes.push(receiver(node as u64, inbox, events.clone(), receive));
        }
        cluster.wait_for(3, Some(TIMEOUT), "--nodes").await.unwrap();
        let (answers, _) = cluster
            .run(&work(1, &weights), &tasks(&[2, 2, 2]), &[0, 1, 2])
            .await
            .unwrap();
        assert_eq!(answers.len(), 3);
        // The next step's weights again go one node at a time.
        cluster
            .run(&work(2, &weights), &tasks(&[2, 2, 2]), &[0, 1, 2])
            .await
            .unwrap();
        drop(cluster);
        let got = outcomes(fakes).await;
        assert_eq!(got.iter().map(|g| g[0]).collect::<Vec<_>>(), want);
        assert!(got.iter().all(|g| g.len() == 2));
    }
}

/// Samples queued ahead go out during the step before, once the weights
/// are out; the step's tasks then leave them out for the nodes that have
/// them, and carry them again when nothing was sent ahead.
#[tokio::test(start_paused = true)]
async fn samples_sent_ahead_are_not_sent_again() {
    // A fake that keeps what came ahead and answers for it; returns, per
    // task, (step, part, samples_ahead, samples in the task).
    fn keeper(
        node: u64,
        mut inbox: Inbox,
        events: mpsc::Sender<Event>,
    ) -> tokio::task::JoinHandle<Vec<(u64, u32, bool, bool)>> {
        tokio::spawn(async move {
            let (mut got, mut ahead) = (Vec::new(), None);
            while let Some(Ok(msg)) = inbox.recv().await {
                match msg.kind {
                    Some(Out::Chunk(c)) => {
                        if let Some(version) = last_chunk(&c) {
                            let _ = events.send(Event::Received { node, version }).await;
                        }
                    }
                    Some(Out::Ahead(a)) => ahead = Some(a),
                    Some(Out::Train(t)) => {
                        got.push((t.step, t.part, t.samples_ahead, t.samples.is_some()));
                        let samples = match t.samples {
                            Some(s) => s,
                            None => match ahead.take() {
                                Some(a) if a.step == t.step && a.part == t.part => {
                                    a.samples.expect("samples")
                                }
                                _ => panic!("no samples for step {} part {}", t.step, t.part),
                            },
                        };
                        let _ = events
                            .send(answer(node, t.step, t.part, samples.count))
                            .await;
                    }
                    _ => {}
                }
            }
            got
        })
    }
    let (mut cluster, events) = cluster(1);
    let mut fakes = Vec::new();
    for node in 0..2 {
        let inbox = join(&events, node, 64).await;
        fakes.push(keeper(node, inbox, events.clone()));
    }
    cluster.wait_for(2, Some(TIMEOUT), "--nodes").await.unwrap();
    let weights = vec![0.5f32; WEIGHTS];
    let with_ahead = |ahead: bool| {
        let mut t = tasks(&[3, 2]);
        for task in &mut t {
            if let Task::Train { ahead: a, .. } = task {
                *a = ahead;
            }
        }
        t
    };
    let next = tasks(&[3, 2]);
    cluster.queue_ahead(
        2,
        vec![
            (0, 0, next[0].samples().clone()),
            (1, 1, next[1].samples().clone()),
        ],
    );
    cluster
        .run(&work(1, &weights), &with_ahead(false), &[0, 1])
        .await
        .unwrap();
    let (answers, _) = cluster
        .run(&work(2, &weights), &with_ahead(true), &[0, 1])
        .await
        .unwrap();
    assert_eq!(answers.len(), 2, "both answered for the samples they had");
    // Nothing was sent ahead for step 3: its samples travel with the tasks.
    cluster
        .run(&work(3, &weights), &with_ahead(true), &[0, 1])
        .await
        .unwrap();
    drop(cluster);
    assert_eq!(
        outcomes(fakes).await,
        vec![
            vec![
                (1, 0, false, true),
                (2, 0, true, false),
                (3, 0, false, true)
            ],
            vec![
                (1, 1, false, true),
                (2, 1, true, false),
                (3, 1, false, true)
            ],
        ]
    );
}

/// A part waiting for its turn whose node leaves is given to another node
/// once, not again when its turn comes.
#[tokio::test(start_paused = true)]
async fn a_queued_part_whose_node_leaves_is_computed_once() {
    let (mut cluster, events) = cluster(1);
    // Node 0 takes 50 ms to acknowledge its weights and answers every task
    // it gets 100 ms later; node 1 leaves as soon as it has joined.
    let mut inbox = join(&events, 0, 64).await;
    let _gone = join(&events, 1, 64).await;
    let tx = events.clone();
    let fake = tokio::spawn(async move {
        let mut parts = Vec::new();
        while let Some(Ok(msg)) = inbox.recv().await {
            match msg.kind {
                Some(Out::Chunk(c)) => {
                    if let Some(version) = last_chunk(&c) {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = tx.send(Event::Received { node: 0, version }).await;
                        });
                    }
                }
                Some(Out::Train(t)) => {
                    parts.push((t.step, t.part));
                    let count = t.samples.map_or(0, |s| s.count);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = tx.send(answer(0, t.step, t.part, count)).await;
                    });
                }
                _ => {}
            }
        }
        parts
    });
    cluster.wait_for(2, Some(TIMEOUT), "--nodes").await.unwrap();
    let weights = vec![0.5f32; WEIGHTS];
    // Node 1 leaves while its part waits behind node 0's weights.
    let leave = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = leave
            .send(Event::Left {
                node: 1,
                reason: "gone".into(),
            })
            .await;
    });
    let (answers, _) = cluster
        .run(&work(1, &weights), &tasks(&[2, 2]), &[0, 1])
        .await
        .unwrap();
    assert_eq!(answers.len(), 2);
    // The next step runs without a late, repeated answer for step 1.
    cluster
        .run(&work(2, &weights), &tasks(&[4]), &[0])
        .await
        .unwrap();
    assert_eq!(cluster.len(), 1, "node 0 must still be a member");
    drop(cluster);
    assert_eq!(fake.await.unwrap(), vec![(1, 0), (1, 1), (2, 0)]);
}

/// While the shard aggregators are asked for a step, the cluster still
/// notices at once a planned node that leaves (and admits one that joins).
#[tokio::test(start_paused = true)]
async fn a_departure_is_noticed_and_joins_are_admitted_meanwhile() {
    let (mut cluster, events) = cluster(1);
    let _a = join(&events, 1, 8).await;
    let _b = join(&events, 2, 8).await;
    cluster.wait_for(2, Some(TIMEOUT), "--nodes").await.unwrap();
    let sender = events.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _c = join(&sender, 3, 8).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        sender
            .send(Event::Left {
                node: 2,
                reason: "killed".into(),
            })
            .await
            .unwrap();
        // Keeps node 3's outbox open until the test is done.
        tokio::time::sleep(TIMEOUT).await;
    });
    let started = Instant::now();
    assert_eq!(cluster.departure(&[1, 2]).await.unwrap(), 2);
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(cluster.members(), vec![1, 3]);
}
