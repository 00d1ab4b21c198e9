//! Shard aggregators as real processes on 127.0.0.1: nodes killed, late,
//! lying or sending NaN; an aggregator killed (the run stops with a clear
//! message and resumes from its checkpoint to the very bits of a run that
//! never stopped); a coordinator with the wrong token refused.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Starts an aggregator on `listen`; returns it and its URL.
fn aggregator(listen: &str, env: &[(&str, &str)]) -> (std::process::Child, Lines, String) {
    let (child, lines) = start(&["aggregator", "--listen", listen], env);
    let addr = address(&lines);
    (child, lines, format!("http://{addr}"))
}

fn stop(children: impl IntoIterator<Item = std::process::Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_sharded_cluster_survives_a_killed_node_and_a_late_joiner() {
    killed_node_and_late_joiner("f32");
}

/// On the bf16 wire the late joiner first gets each slice whole (the values
/// the other nodes hold), then the changes to it.
#[test]
fn a_sharded_cluster_on_the_bf16_wire_survives_a_killed_node_and_a_late_joiner() {
    killed_node_and_late_joiner("bf16");
}

fn killed_node_and_late_joiner(wire: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 300, 20);
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[]);
    let (a1, _, u1) = aggregator("127.0.0.1:0", &[]);
    let urls = format!("{u0},{u1}");
    let extra = ["--aggregators", urls.as_str(), "--wire", wire];
    let (mut coordinator, lines) = start(
        &coordinator_args(data.to_str().unwrap(), "2", "3", &extra),
        &[],
    );
    let addr = address(&lines);
    let (mut survivor, survivor_lines) = node(&addr, &[]);
    let (mut victim, _) = node(&addr, &[]);
    lines.wait_for("training starts", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    victim.kill().unwrap();
    victim.wait().unwrap();
    lines.wait_for("node removed", Duration::from_secs(10));
    let (mut late, _) = node(&addr, &[]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    stop([a0, a1]);
    assert!(ok, "{}", lines.text());
    assert_eq!(
        epoch_samples(&lines),
        vec![1500, 1500, 1500],
        "{}",
        lines.text()
    );
    let last = node_samples(&lines, 3);
    assert_eq!(last.len(), 2, "{}", lines.text());
    assert!(last.iter().all(|&(_, s)| s > 0));
    assert!(wait(&mut survivor, Duration::from_secs(30), "survivor").success());
    assert!(wait(&mut late, Duration::from_secs(30), "late node").success());
    assert!(
        survivor_lines.text().contains("shard aggregators")
            && survivor_lines.text().contains(&format!("wire={wire}")),
        "{}",
        survivor_lines.text()
    );
}

/// A node whose slices hold NaN and a node that reports its tasks done
/// without sending its slices are both evicted; their parts are computed
/// again by the honest node, so every sample still counts once.
#[test]
fn nodes_that_send_nan_or_withhold_their_slices_are_evicted_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let history = dir.path().join("h.json");
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[]);
    let (a1, _, u1) = aggregator("127.0.0.1:0", &[]);
    let urls = format!("{u0},{u1}");
    let extra = [
        "--aggregators",
        urls.as_str(),
        "--history",
        history.to_str().unwrap(),
    ];
    let mut args = coordinator_args(data.to_str().unwrap(), "3", "2", &extra);
    // A withheld slice is asked for after the step timeout.
    let at = args.iter().position(|a| *a == "--step-timeout").unwrap();
    args[at + 1] = "10";
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (mut good, _) = node(&addr, &[]);
    let (mut nan, nan_lines) = node(&addr, &["--fault", "nan-gradients"]);
    let (mut liar, liar_lines) = node(&addr, &["--fault", "withhold-slices"]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    stop([a0, a1]);
    assert!(ok, "{}", lines.text());
    let text = lines.text();
    assert!(
        text.contains("sent non-finite values to a shard aggregator"),
        "{text}"
    );
    assert!(
        text.contains("did not deliver its answer to every shard aggregator"),
        "{text}"
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200], "{text}");
    let h: serde_json::Value = serde_json::from_slice(&std::fs::read(&history).unwrap()).unwrap();
    for key in ["loss", "val_loss"] {
        for v in h[key].as_array().unwrap() {
            assert!(v.as_f64().is_some_and(f64::is_finite), "{key}: {h}");
        }
    }
    assert!(!wait(&mut nan, Duration::from_secs(30), "nan node").success());
    assert!(nan_lines.text().contains("evicted"), "{}", nan_lines.text());
    assert!(!wait(&mut liar, Duration::from_secs(30), "lying node").success());
    assert!(
        liar_lines.text().contains("evicted"),
        "{}",
        liar_lines.text()
    );
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}

/// 2 epochs on 2 nodes from `dir/ckpt`, with `aggregators` (URLs, empty:
/// none); returns the coordinator's arguments.
fn run_args(dir: &Path, data: &Path, listen: &str, aggregators: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "coordinator",
        "--listen",
        listen,
        "--data",
        data.to_str().unwrap(),
        "--nodes",
        "2",
        "--model",
        "resnet8",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--checkpoint-dir",
        dir.join("ckpt").to_str().unwrap(),
        "--checkpoint-every",
        "5",
        "--resume",
        "--shm-dir",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !aggregators.is_empty() {
        args.extend(["--aggregators".to_string(), aggregators.to_string()]);
    }
    args
}

/// Killing an aggregator stops the run with a message that says what to do;
/// with the aggregator back and the coordinator restarted with --resume, the
/// run ends with the same bits as a run without aggregators that never
/// stopped. The model is a ResNet for its L2 penalty and BatchNorm state:
/// without aggregators the coordinator adds the L2 gradient inside Adam's
/// pass, the aggregators add it to their averaged slice before theirs.
#[test]
fn a_killed_aggregator_stops_the_run_clearly_and_resume_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 100, 20);

    // The reference: no aggregators, no interruption.
    let straight = dir.path().join("straight");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = run_args(&straight, &data, &listen, "");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (mut a, _) = node(&addr, &[]);
    let (mut b, _) = node(&addr, &[]);
    assert!(
        wait(&mut coordinator, Duration::from_secs(180), "coordinator").success(),
        "{}",
        lines.text()
    );
    assert!(wait(&mut a, Duration::from_secs(30), "node").success());
    assert!(wait(&mut b, Duration::from_secs(30), "node").success());

    // Sharded, with aggregator 1 killed mid-epoch.
    let sharded = dir.path().join("sharded");
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[]);
    let port1 = free_port();
    let listen1 = format!("127.0.0.1:{port1}");
    let (mut a1, _, u1) = aggregator(&listen1, &[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = run_args(&sharded, &data, &listen, &format!("{u0},{u1}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let (a, _) = node(&addr, &[]);
    let (b, _) = node(&addr, &[]);
    let resume = sharded.join("ckpt").join(coordinator::RESUME_FILE);
    let end = Instant::now() + Duration::from_secs(120);
    while !resume.exists() {
        assert!(Instant::now() < end, "no resume state:\n{}", lines.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    a1.kill().unwrap();
    a1.wait().unwrap();
    let status = wait(&mut coordinator, Duration::from_secs(60), "coordinator");
    assert!(!status.success(), "{}", lines.text());
    let text = lines.text();
    assert!(
        text.contains(&format!("aggregator {u1}")) && text.contains("--resume"),
        "the error should name the aggregator and say how to go on:\n{text}"
    );
    // Whether they were told the run is over or still try to reach it, the
    // first nodes are not what this test is about.
    stop([a, b]);
    let (a1, _, _) = aggregator(&listen1, &[]);
    let (mut coordinator, lines) = start(&args, &[]);
    lines.wait_for("resuming from", Duration::from_secs(30));
    let (mut c, _) = node(&addr, &[]);
    let (mut d, _) = node(&addr, &[]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    stop([a0, a1]);
    assert!(ok, "{}", lines.text());
    assert!(wait(&mut c, Duration::from_secs(30), "node c").success());
    assert!(wait(&mut d, Duration::from_secs(30), "node d").success());

    let want = final_weights(&straight.join("ckpt"));
    let got = final_weights(&sharded.join("ckpt"));
    if let Some(name) = first_difference(&want, &got) {
        panic!("{name} differs from the unsharded, uninterrupted run");
    }
}

#[test]
fn a_coordinator_with_the_wrong_token_is_refused_by_the_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 10, 10);
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[("GRADCAST_TOKEN", "open-sesame")]);
    let extra = ["--aggregators", u0.as_str(), "--join-timeout", "5"];
    let args = coordinator_args(data.to_str().unwrap(), "1", "1", &extra);
    let out = gradcast(&args, Duration::from_secs(60));
    stop([a0]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("aggregator {u0}")) && err.contains("token"),
        "{err}"
    );
}

/// A member that sends an aggregator more slices in one step than there are
/// parts is cut off by it, and the aggregator tells the coordinator, which
/// evicts the node at once (it does not wait for slices that cannot come);
/// its parts are computed again by the honest node and the run ends with
/// every sample counted once.
#[test]
fn an_aggregator_cuts_off_a_node_that_floods_it_with_slices() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let (a0, a0_lines, u0) = aggregator("127.0.0.1:0", &[]);
    let extra = ["--aggregators", u0.as_str()];
    let (mut coordinator, lines) = start(
        &coordinator_args(data.to_str().unwrap(), "2", "2", &extra),
        &[],
    );
    let addr = address(&lines);
    let (mut good, _) = node(&addr, &[]);
    let (flood, _) = node(&addr, &["--fault", "flood-slices"]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    let aggregator_text = a0_lines.text();
    stop([a0, flood]);
    assert!(ok, "{}", lines.text());
    assert!(
        aggregator_text.contains("sent more slices in one step than there are parts"),
        "{aggregator_text}"
    );
    let coordinator_text = lines.text();
    assert!(
        coordinator_text.contains(&format!(
            "aggregator {u0} cut the node off: sent more slices in one step than there are parts"
        )),
        "{coordinator_text}"
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200], "{}", lines.text());
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}

/// Aggregators serve TLS too: the coordinator checks their certificates
/// with --aggregator-ca, nodes with the CA they trust for the coordinator;
/// an https aggregator without a CA to check it is refused with a message
/// that names the flag.
#[test]
fn tls_aggregators_train_and_need_a_ca_to_be_trusted() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let data = synthetic(dir.path(), 10, 10);
    let pem = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let (cert, key, ca) = (pem("server.pem"), pem("server.key"), pem("ca.pem"));
    let (a0, a0_lines) = start(
        &[
            "aggregator",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    let port = address(&a0_lines).rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}");
    let untrusted = coordinator_args(
        data.to_str().unwrap(),
        "1",
        "1",
        &[
            "--aggregators",
            &url,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let out = gradcast(&untrusted, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--aggregator-ca"),
        "{}",
        text(&out.stderr)
    );
    let args = coordinator_args(
        data.to_str().unwrap(),
        "1",
        "1",
        &[
            "--aggregators",
            &url,
            "--aggregator-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let (mut coordinator, lines) = start(&args, &[]);
    let cport = address(&lines).rsplit(':').next().unwrap().to_string();
    let curl = format!("https://localhost:{cport}");
    let (mut secure, secure_lines) = start(
        &[
            "node",
            "--coordinator",
            &curl,
            "--threads",
            "1",
            "--tls-ca",
            &ca,
        ],
        &[],
    );
    let ok = wait(&mut coordinator, Duration::from_secs(120), "coordinator").success();
    stop([a0]);
    assert!(ok, "{}", lines.text());
    assert!(
        wait(&mut secure, Duration::from_secs(30), "TLS node").success(),
        "{}",
        secure_lines.text()
    );
    assert!(
        secure_lines.text().contains("shard aggregators"),
        "{}",
        secure_lines.text()
    );
}

/// `--balance` works through the aggregators too: the plan carries each
/// part's samples, so shares that follow the nodes' speeds average right.
#[test]
fn balance_gives_a_straggler_a_smaller_share_through_the_aggregators() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[]);
    let (a1, _, u1) = aggregator("127.0.0.1:0", &[]);
    let urls = format!("{u0},{u1}");
    let extra = ["--aggregators", urls.as_str(), "--balance"];
    let (mut coordinator, lines) = start(
        &coordinator_args(data.to_str().unwrap(), "2", "2", &extra),
        &[],
    );
    let addr = address(&lines);
    let (mut fast, _) = node(&addr, &[]);
    let (mut slow, _) = node(&addr, &["--fault", "slow=150"]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    stop([a0, a1]);
    assert!(ok, "{}", lines.text());
    let shares = node_samples(&lines, 2);
    assert_eq!(shares.len(), 2, "{}", lines.text());
    assert_eq!(shares.iter().map(|s| s.1).sum::<u64>(), 200);
    let (more, less) = (shares[0].1.max(shares[1].1), shares[0].1.min(shares[1].1));
    assert!(
        (less as f64) < 0.7 * more as f64,
        "shares {shares:?} did not follow speed"
    );
    assert!(wait(&mut fast, Duration::from_secs(30), "fast node").success());
    assert!(wait(&mut slow, Duration::from_secs(30), "slow node").success());
}

/// A node whose gradients are finite but huge makes its steps skipped, and
/// after three in a row it is evicted, as without aggregators.
#[test]
fn a_node_sending_huge_gradients_through_the_aggregators_is_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let (a0, _, u0) = aggregator("127.0.0.1:0", &[]);
    let (a1, _, u1) = aggregator("127.0.0.1:0", &[]);
    let urls = format!("{u0},{u1}");
    let extra = ["--aggregators", urls.as_str()];
    let (mut coordinator, lines) = start(
        &coordinator_args(data.to_str().unwrap(), "2", "2", &extra),
        &[],
    );
    let addr = address(&lines);
    let (mut good, _) = node(&addr, &[]);
    let (mut huge, huge_lines) = node(&addr, &["--fault", "huge-gradient"]);
    let ok = wait(&mut coordinator, Duration::from_secs(180), "coordinator").success();
    stop([a0, a1]);
    assert!(ok, "{}", lines.text());
    let text = lines.text();
    assert!(text.contains("skipping the update"), "{text}");
    assert!(
        text.contains("gradients in a row with a norm beyond"),
        "{text}"
    );
    assert_eq!(epoch_samples(&lines), vec![200, 200], "{text}");
    assert!(!wait(&mut huge, Duration::from_secs(30), "huge node").success());
    assert!(
        huge_lines.text().contains("evicted"),
        "{}",
        huge_lines.text()
    );
    assert!(wait(&mut good, Duration::from_secs(30), "good node").success());
}
