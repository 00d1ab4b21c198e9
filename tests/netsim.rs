//! The cluster across simulated hosts (`deploy/netsim.sh`): the coordinator
//! and each node in a network namespace of its own, every link shaped with
//! `tc`. Needs root and iproute2; where namespaces cannot be made the tests
//! say SKIPPED with the reason and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{synthetic, text, BIN};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/netsim.sh")
}

/// A prefix no other test (or run) uses, so simulations can run side by side.
fn prefix(name: &str) -> String {
    format!("gct{}{name}", std::process::id() % 100_000)
}

fn netsim(prefix: &str, args: &[&str]) -> Command {
    let mut c = Command::new(script());
    c.args(args)
        .env("NETSIM_PREFIX", prefix)
        .env("GRADCAST_BIN", BIN)
        .env("RUST_LOG", "info");
    c
}

/// None when namespaces work here, else why not.
fn unavailable() -> Option<String> {
    let out = netsim(&prefix("chk"), &["check"]).output().ok()?;
    (!out.status.success()).then(|| text(&out.stdout).trim().to_string())
}

macro_rules! require_netsim {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// The namespaces a simulation with `prefix` left behind.
fn leftovers(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

fn run(prefix: &str, nodes: &str, node_args: &str, coordinator: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--nodes",
        nodes,
        "--rate",
        "1gbit",
        "--node-args",
        node_args,
        "--",
    ];
    args.extend_from_slice(coordinator);
    let out = netsim(prefix, &args).output().unwrap();
    assert!(
        out.status.success(),
        "netsim.sh {args:?} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// `(samples, seconds)` of the coordinator's epoch lines.
fn epochs(out: &Output) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .chain(text(&out.stderr).lines())
        .filter(|l| l.contains("val_accuracy") && l.contains(" samples in "))
        .map(str::to_string)
        .collect()
}

#[test]
fn two_nodes_on_their_own_hosts_train_with_real_compute_and_leave_nothing_behind() {
    require_netsim!();
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 32, 32);
    let p = prefix("real");
    let out = run(
        &p,
        "2",
        "--threads 1",
        &[
            "--data",
            data.to_str().unwrap(),
            "--nodes",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--shm-dir",
            "off",
        ],
    );
    let lines = epochs(&out);
    assert_eq!(lines.len(), 2, "{}", text(&out.stderr));
    // 5 files × 32 samples per epoch, all of them through the shaped links.
    assert!(
        lines.iter().all(|l| l.contains("(160 samples in ")),
        "{lines:?}"
    );
    assert!(leftovers(&p).is_empty(), "left behind: {:?}", leftovers(&p));
}

#[test]
fn emulated_nodes_answer_without_computing_and_the_run_completes() {
    require_netsim!();
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 32, 32);
    let p = prefix("emu");
    let started = Instant::now();
    let out = run(
        &p,
        "3",
        "--emulate-compute-ms 40",
        &[
            "--data",
            data.to_str().unwrap(),
            "--nodes",
            "3",
            "--model",
            "resnet20",
            "--batch-size",
            "48",
            "--shm-dir",
            "off",
        ],
    );
    let lines = epochs(&out);
    assert_eq!(lines.len(), 1, "{}", text(&out.stderr));
    assert!(lines[0].contains("(160 samples in "), "{lines:?}");
    // 4 steps of at least 40 ms each (160 samples, batch 48).
    assert!(started.elapsed() >= Duration::from_millis(160));
    // Emulated steps train nothing: a chance-level loss, nothing correct.
    assert!(lines[0].contains(" accuracy 0.0000 "), "{lines:?}");
    assert!(leftovers(&p).is_empty(), "left behind: {:?}", leftovers(&p));
}

#[test]
fn an_interrupted_simulation_removes_its_hosts() {
    require_netsim!();
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 32, 32);
    let p = prefix("int");
    // A coordinator that waits for a third node that never comes.
    let mut child = netsim(
        &p,
        &[
            "run",
            "--nodes",
            "2",
            "--",
            "--data",
            data.to_str().unwrap(),
            "--nodes",
            "3",
            "--shm-dir",
            "off",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while leftovers(&p).len() < 4 {
        assert!(Instant::now() < end, "the hosts never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = common::wait(&mut child, Duration::from_secs(30), "netsim.sh");
    assert!(!status.success());
    assert!(leftovers(&p).is_empty(), "left behind: {:?}", leftovers(&p));
}

#[test]
fn asking_for_an_impossible_link_is_a_clear_error() {
    require_netsim!();
    let out = netsim(&prefix("bad"), &["up", "--nodes", "1", "--rate", "fast"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot read rate"),
        "{}",
        text(&out.stderr)
    );
    assert!(leftovers(&prefix("bad")).is_empty());
}
