//! A coordinator against broken and hostile clients, with real processes on
//! 127.0.0.1: nodes that lie, send huge gradients or answer the wrong step,
//! and a raw gRPC client that floods refused requests or tries to take over
//! another node's id. Each time the honest run must finish with its numbers.

mod common;

use std::time::Duration;

use common::*;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::node_message::Kind;
use proto::v1::{Hello, JoinRequest, NodeMessage};

fn history_is_sane(path: &std::path::Path) {
    let h: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for key in ["loss", "val_loss", "accuracy", "val_accuracy"] {
        for v in h[key].as_array().unwrap() {
            let v = v.as_f64().unwrap();
            assert!(v.is_finite() && v >= 0.0, "{key}: {h}");
            if key.ends_with("accuracy") {
                assert!(v <= 1.0, "{key}: {h}");
            }
        }
    }
}

/// One gradient element of 1e20 is finite, but Adam's g² of it is not: the
/// steps it joins are skipped (never applied), and a node that keeps sending
/// such gradients is evicted, so the honest node finishes the run.
#[test]
fn huge_gradients_are_never_applied_and_their_node_is_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let history = dir.path().join("h.json");
    let args = coordinator_args(
        data.to_str().unwrap(),
        "2",
        "2",
        &["--history", history.to_str().unwrap()],
    );
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (mut good, _) = node(&addr, &[]);
    let (mut bad, bad_lines) = node(&addr, &["--fault", "huge-gradient"]);
    assert!(
        wait(&mut coordinator, Duration::from_secs(180), "coordinator").success(),
        "{}",
        lines.text()
    );
    let text = lines.text();
    assert!(text.contains("skipping the update"), "{text}");
    assert!(
        text.contains("gradients in a row with a norm beyond"),
        "{text}"
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200]);
    history_is_sane(&history);
    assert!(!wait(&mut bad, Duration::from_secs(30), "bad node").success());
    assert!(bad_lines.text().contains("evicted"), "{}", bad_lines.text());
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}

/// A node claiming more correct answers than samples (and a negative loss)
/// and one answering for another step are evicted at once, told why, and
/// exit non-zero; their parts are recomputed by the honest node, so the
/// history holds only possible numbers.
#[test]
fn lying_nodes_are_evicted_with_the_reason_and_their_parts_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let history = dir.path().join("h.json");
    let args = coordinator_args(
        data.to_str().unwrap(),
        "3",
        "2",
        &["--history", history.to_str().unwrap()],
    );
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (mut good, _) = node(&addr, &[]);
    let (mut liar, liar_lines) = node(&addr, &["--fault", "lie-about-counts"]);
    let (mut stepper, stepper_lines) = node(&addr, &["--fault", "wrong-step"]);
    assert!(
        wait(&mut coordinator, Duration::from_secs(180), "coordinator").success(),
        "{}",
        lines.text()
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200]);
    history_is_sane(&history);
    assert!(!wait(&mut liar, Duration::from_secs(30), "liar").success());
    assert!(!wait(&mut stepper, Duration::from_secs(30), "stepper").success());
    let liar_text = liar_lines.text();
    assert!(
        liar_text.contains("evicted") && liar_text.contains("correct of"),
        "{liar_text}"
    );
    let stepper_text = stepper_lines.text();
    assert!(
        stepper_text.contains("evicted") && stepper_text.contains("for step 10"),
        "{stepper_text}"
    );
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn join_request(hostname: String) -> JoinRequest {
    JoinRequest {
        hostname,
        device: "cpu".into(),
        threads: 1,
        protocol_version: proto::PROTOCOL_VERSION,
        shared_memory: false,
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// The token is checked before a request's body is read: 100 refused 15 MiB
/// Joins leave the coordinator's memory where it was. A client with the token
/// cannot open a session under another node's id without that node's secret.
#[test]
fn refused_floods_cost_no_memory_and_node_ids_cannot_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 20, 10);
    let args = coordinator_args(data.to_str().unwrap(), "1", "2", &["--token", "s3cret"]);
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let pid = coordinator.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_encoding_message_size(32 << 20)
            .max_decoding_message_size(32 << 20);
        let baseline = rss_kib(pid);
        let big = "x".repeat(15 << 20);
        for _ in 0..100 {
            let err = client
                .join(with_token(join_request(big.clone()), "wrong"))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        }
        let after = rss_kib(pid);
        eprintln!(
            "coordinator RSS {baseline} KiB before, {after} KiB after 100 refused 15 MiB Joins"
        );
        assert!(
            after < baseline + 50 * 1024,
            "RSS grew from {baseline} to {after} KiB"
        );

        // Two joins with the token; the second tries to open a session with
        // the first one's id.
        let first = client
            .join(with_token(join_request("victim".into()), "s3cret"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.session_secret.len(), 16);
        let hello = |secret: Vec<u8>| {
            let msg = NodeMessage {
                kind: Some(Kind::Hello(Hello {
                    node_id: first.node_id,
                    session_secret: secret.into(),
                    shared_memory_proof: Default::default(),
                })),
            };
            with_token(tokio_stream::iter(vec![msg]), "s3cret")
        };
        let err = client.session(hello(vec![0u8; 16])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        let err = client.session(hello(Vec::new())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        // The rightful node still gets in with its secret.
        let ok = client.session(hello(first.session_secret.to_vec())).await;
        assert!(ok.is_ok(), "{:?}", ok.err());
    });
    lines.wait_for("node joined (1 connected)", Duration::from_secs(10));
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}

/// A member that stops reading its stream (and never answers) holds up no
/// step for longer than `--step-timeout`: it is evicted, its part goes to the
/// honest node, and the run finishes with every sample.
#[test]
fn a_member_that_stops_reading_is_evicted_within_the_step_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let mut args = coordinator_args(data.to_str().unwrap(), "2", "2", &["--shm-dir", "off"]);
    let at = args.iter().position(|a| *a == "--step-timeout").unwrap();
    args[at + 1] = "3";
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Joins, says Hello, then neither reads nor writes again.
    let (_keep_open, stream) = rt.block_on(async {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let joined = client
            .join(join_request("stalled".into()))
            .await
            .unwrap()
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(NodeMessage {
            kind: Some(Kind::Hello(Hello {
                node_id: joined.node_id,
                session_secret: joined.session_secret,
                shared_memory_proof: Default::default(),
            })),
        })
        .await
        .unwrap();
        let stream = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    });
    lines.wait_for("node joined (1 connected)", Duration::from_secs(10));
    let started = std::time::Instant::now();
    let (mut honest, _) = node(&addr, &[]);
    assert!(
        wait(&mut coordinator, Duration::from_secs(120), "coordinator").success(),
        "{}",
        lines.text()
    );
    let text = lines.text();
    assert!(
        text.contains("evicted") || text.contains("no answer"),
        "{text}"
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200]);
    eprintln!("run with a stalled member took {:?}", started.elapsed());
    assert!(wait(&mut honest, Duration::from_secs(30), "honest node").success());
    drop(stream);
}

/// A node on gRPC that never says it received its weights holds the next
/// node's weights up only for the receive wait: the run trains every sample
/// of every epoch, both nodes stay members, and both finish cleanly.
#[test]
fn a_node_that_never_acknowledges_its_weights_delays_nothing_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let history = dir.path().join("h.json");
    let args = coordinator_args(
        data.to_str().unwrap(),
        "2",
        "2",
        &["--history", history.to_str().unwrap(), "--shm-dir", "off"],
    );
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (mut mute, mute_lines) = node(&addr, &["--fault", "no-receipt"]);
    let (mut good, _) = node(&addr, &[]);
    assert!(
        wait(&mut coordinator, Duration::from_secs(180), "coordinator").success(),
        "{}",
        lines.text()
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200]);
    history_is_sane(&history);
    assert!(!lines.text().contains("evicted"), "{}", lines.text());
    assert!(
        wait(&mut mute, Duration::from_secs(30), "mute node").success(),
        "{}",
        mute_lines.text()
    );
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}
