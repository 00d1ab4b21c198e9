//! Multi-process tests: the real `gradcast` binary as coordinator and nodes on
//! 127.0.0.1, on small synthetic data in the CIFAR-10 binary layout.

use std::time::Duration;

mod common;

use common::{address, final_accuracy, gradcast, node, start, synthetic, text, wait};

#[test]
fn run_trains_a_two_node_cluster_and_writes_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 50);
    let history = dir.path().join("h.json");
    let out = gradcast(
        &[
            "run",
            "--nodes",
            "2",
            "--threads-per-node",
            "1",
            "--data",
            data.to_str().unwrap(),
            "--model",
            "simple-cnn",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--history",
            history.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "gradcast run failed:\n{stdout}\n{stderr}"
    );
    let h: serde_json::Value = serde_json::from_slice(&std::fs::read(&history).unwrap()).unwrap();
    for key in ["loss", "accuracy", "val_loss", "val_accuracy", "lr"] {
        assert_eq!(
            h[key].as_array().map(Vec::len),
            Some(2),
            "history {key}: {h}"
        );
    }
    let acc = final_accuracy(&stdout);
    assert_eq!(
        Some(acc),
        h["val_accuracy"][1]
            .as_f64()
            .map(|a| (a * 1e4).round() / 1e4)
    );
    // The synthetic classes are easy: two epochs must learn them.
    assert!(
        acc > 0.5,
        "val_accuracy {acc} after 2 epochs on synthetic data"
    );
    // Both nodes took part.
    assert!(
        stderr.contains("node0") && stderr.contains("node1"),
        "{stderr}"
    );
}

#[test]
fn separate_coordinator_and_node_processes_all_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 20, 30);
    let history = dir.path().join("h.json");
    let (mut coordinator, lines) = start(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--nodes",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--model",
            "resnet8",
            "--epochs",
            "1",
            "--batch-size",
            "25",
            "--history",
            history.to_str().unwrap(),
        ],
        &[],
    );
    let addr = address(&lines);
    let mut nodes = [node(&addr, &[]).0, node(&addr, &[]).0];
    let status = wait(&mut coordinator, Duration::from_secs(300), "coordinator");
    assert!(status.success(), "coordinator failed: {status}");
    for (i, n) in nodes.iter_mut().enumerate() {
        let s = wait(n, Duration::from_secs(30), "node");
        assert!(s.success(), "node {i} failed: {s}");
    }
    assert!(
        lines
            .all()
            .iter()
            .any(|l| l.starts_with("final val_accuracy: ")),
        "{}",
        lines.text()
    );
    assert!(history.exists());
}

#[test]
fn bad_inputs_fail_fast_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.tar.gz");
    let out = gradcast(
        &["coordinator", "--data", missing.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no such file or folder"),
        "{}",
        text(&out.stderr)
    );

    let root = data::write_synthetic(
        dir.path(),
        &data::SyntheticSpec {
            train_per_file: 3,
            test: 3,
            seed: 0,
        },
        false,
    )
    .unwrap();
    let f = root.join("data_batch_5.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let out = gradcast(
        &["coordinator", "--data", root.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("data_batch_5.bin") && err.contains("truncated"),
        "{err}"
    );

    let out = gradcast(
        &[
            "coordinator",
            "--data",
            root.to_str().unwrap(),
            "--model",
            "resnet21",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown model"),
        "{}",
        text(&out.stderr)
    );

    let out = gradcast(
        &[
            "node",
            "--coordinator",
            "http://127.0.0.1:1",
            "--device",
            "cuda:0",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("this build has no CUDA support; rebuild with --features cuda")
    );

    let out = gradcast(
        &[
            "node",
            "--coordinator",
            "http://127.0.0.1:1",
            "--connect-timeout",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot reach the coordinator"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn coordinator_gives_up_when_nodes_do_not_come() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 2, 2);
    let out = gradcast(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--nodes",
            "2",
            "--join-timeout",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("only 0 of 2 nodes joined"),
        "{}",
        text(&out.stderr)
    );
}
