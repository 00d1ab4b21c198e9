//! The coordinator's standard gRPC health service, as orchestrators probe
//! it: no token needed, SERVING while nodes can join and train, and a clear
//! failure where nothing serves.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_coordinator_reports_grpc_health_without_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 20, 10);
    let args = coordinator_args(data.to_str().unwrap(), "1", "1", &["--token", "s3cret"]);
    let (mut coordinator, lines) = start(&args, &[]);
    let addr = address(&lines);
    let check = |service: &str| {
        gradcast(
            &["healthcheck", "--grpc", &addr, "--service", service],
            Duration::from_secs(30),
        )
    };
    // NOT_SERVING until its state is loaded and it takes nodes (a moment
    // after it listens), then SERVING while it waits for its node, to anyone.
    let ready = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = check("");
        if out.status.success() {
            break;
        }
        let err = text(&out.stderr);
        assert!(err.contains("NOT_SERVING"), "{err}");
        assert!(std::time::Instant::now() < ready, "never SERVING: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for service in ["", "gradcast.v1.Coordinator"] {
        let out = check(service);
        assert!(out.status.success(), "{service:?}: {}", text(&out.stderr));
    }
    let unknown = check("no.such.Service");
    assert!(!unknown.status.success());
    let (mut node, _) = node(&addr, &["--token", "s3cret"]);
    assert!(wait(&mut coordinator, Duration::from_secs(120), "coordinator").success());
    assert!(wait(&mut node, Duration::from_secs(30), "node").success());
    // Gone: a failure that says so.
    let out = check("");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing serves gRPC"),
        "{}",
        text(&out.stderr)
    );
}
