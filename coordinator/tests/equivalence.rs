//! The core invariant of synchronous data parallelism: for a model without
//! dropout or BatchNorm, one step on N nodes with global batch B gives the same
//! weights as one step on 1 node with batch B. Coordinator and nodes talk real
//! gRPC over 127.0.0.1, inside one process.

use std::time::Duration;

use coordinator::{serve, OptimizerKind, TrainConfig, TrainReport, Wire};
use data::{write_synthetic, Dataset, SyntheticSpec};
use model::{Device, ModelKind, ModelSpec};

fn datasets(dir: &std::path::Path) -> (Dataset, Dataset) {
    let spec = SyntheticSpec {
        train_per_file: 8,
        test: 12,
        seed: 4,
    };
    let root = write_synthetic(dir, &spec, false).unwrap();
    Dataset::load_train_test(&root).unwrap()
}

/// How coordinator and nodes move weights and gradients.
#[derive(Clone, Copy)]
enum Plane<'a> {
    /// Everything over gRPC.
    Grpc,
    /// Everything over gRPC, in bf16.
    Bf16,
    /// Shared-memory segments in this folder for every node that maps them;
    /// `remote` nodes (the first ones) decline and use gRPC.
    Shared {
        dir: &'a std::path::Path,
        remote: usize,
    },
    /// Weights and gradients through this many shard aggregators.
    Sharded(usize),
}

async fn train(
    nodes: usize,
    steps: usize,
    optimizer: OptimizerKind,
    train: Dataset,
    test: Dataset,
) -> TrainReport {
    train_on(nodes, steps, optimizer, train, test, Plane::Grpc).await
}

async fn train_on(
    nodes: usize,
    steps: usize,
    optimizer: OptimizerKind,
    train: Dataset,
    test: Dataset,
    plane: Plane<'_>,
) -> TrainReport {
    train_with(nodes, steps, optimizer, train, test, plane, |_| {}).await
}

async fn train_with(
    nodes: usize,
    steps: usize,
    optimizer: OptimizerKind,
    train: Dataset,
    test: Dataset,
    plane: Plane<'_>,
    tweak: impl FnOnce(&mut TrainConfig),
) -> TrainReport {
    let mut config = TrainConfig::new(ModelSpec {
        kind: ModelKind::SimpleCnn,
        dropout: false,
    });
    config.optimizer = optimizer;
    config.lr = match optimizer {
        OptimizerKind::Adam => 1e-3,
        OptimizerKind::Sgd => 0.05,
    };
    config.nodes = nodes;
    config.batch_size = train.len() / steps;
    config.seed = 17;
    config.join_timeout = Some(Duration::from_secs(60));
    let mut aggregators = Vec::new();
    let remote = match plane {
        Plane::Grpc => {
            config.shared_memory = None;
            nodes
        }
        Plane::Bf16 => {
            config.shared_memory = None;
            config.wire = Wire::Bf16;
            nodes
        }
        Plane::Shared { dir, remote } => {
            config.shared_memory = Some(dir.to_path_buf());
            remote
        }
        Plane::Sharded(k) => {
            for _ in 0..k {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                config
                    .aggregators
                    .push(format!("http://{}", listener.local_addr().unwrap()));
                aggregators.push(tokio::spawn(coordinator::shard::aggregator::serve(
                    listener,
                    None,
                    None,
                    std::future::pending(),
                )));
            }
            nodes
        }
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut workers = Vec::new();
    for i in 0..nodes {
        let cfg = node::NodeConfig {
            coordinator: url.clone(),
            threads: 1,
            device: Device::Cpu,
            connect_timeout: Duration::from_secs(30),
            token: None,
            tls: None,
            fault: None,
            shared_memory: i >= remote,
            emulate_compute: None,
        };
        workers.push(tokio::spawn(node::run(cfg)));
    }
    let report = serve(
        listener,
        config,
        train,
        test,
        Default::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    for w in workers {
        w.await.unwrap().expect("node finished cleanly");
    }
    for a in aggregators {
        a.abort();
    }
    report
}

/// Largest relative difference ‖a − b‖ / ‖a‖ over the model's tensors (each
/// weight and bias tensor compared as a whole: single elements of a gradient
/// that is a sum with cancellation carry more rounding than that).
fn max_relative_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let model = model::Model::new(
        ModelSpec {
            kind: ModelKind::SimpleCnn,
            dropout: false,
        },
        0,
        &Device::Cpu,
    )
    .unwrap();
    let mut offset = 0;
    let mut worst = 0.0f64;
    for info in model.params().chain(model.buffers()) {
        let n = info.numel();
        let (x, y) = (&a[offset..offset + n], &b[offset..offset + n]);
        let diff: f64 = x
            .iter()
            .zip(y)
            .map(|(&p, &q)| ((p - q) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = x.iter().map(|&p| (p as f64).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(diff / norm.max(1e-12));
        offset += n;
    }
    assert_eq!(offset, a.len());
    worst
}

/// Largest |a − b| over all elements.
fn max_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

fn initial_weights() -> Vec<f32> {
    model::Model::new(
        ModelSpec {
            kind: ModelKind::SimpleCnn,
            dropout: false,
        },
        17,
        &Device::Cpu,
    )
    .unwrap()
    .weights()
    .unwrap()
}

/// With SGD the weights are `w - lr·g`, so they expose the averaged gradient
/// directly: N nodes must match 1 node to 1e-5 relative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_nodes_match_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    assert_eq!(train_set.len(), 40);
    // One step, global batch 40.
    let sgd = OptimizerKind::Sgd;
    let one = train(1, 1, sgd, train_set.clone(), test_set.clone()).await;
    let two = train(2, 1, sgd, train_set.clone(), test_set.clone()).await;
    let three = train(3, 1, sgd, train_set.clone(), test_set.clone()).await;
    assert_eq!((one.steps, two.steps, three.steps), (1, 1, 1));
    assert!(
        max_abs_difference(&initial_weights(), &one.weights) > 1e-3,
        "the step changed nothing"
    );
    let d2 = max_relative_difference(&one.weights, &two.weights);
    let d3 = max_relative_difference(&one.weights, &three.weights);
    assert!(d2 < 1e-5, "2 nodes differ from 1 node by {d2}");
    assert!(
        d3 < 1e-5,
        "3 nodes (uneven shares 14/13/13) differ from 1 node by {d3}"
    );
    // Same accounting of the epoch in all three runs.
    assert!((one.history.loss[0] - two.history.loss[0]).abs() < 1e-5);
    assert_eq!(one.history.accuracy, three.history.accuracy);
    assert_eq!(one.history.val_accuracy, two.history.val_accuracy);
}

/// With Adam the update is lr·g/(|g| + 1e-7): a parameter whose gradient is
/// itself near 1e-7 turns float rounding in the batch sum (one sum of 40 vs
/// sums of 20 + 20) into an update difference of a few 1e-7. So the bound is
/// absolute: within 1% of one step (lr 1e-3) everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adam_step_on_two_nodes_matches_one_node_within_a_hundredth_of_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let one = train(
        1,
        1,
        OptimizerKind::Adam,
        train_set.clone(),
        test_set.clone(),
    )
    .await;
    let two = train(2, 1, OptimizerKind::Adam, train_set, test_set).await;
    let d = max_abs_difference(&one.weights, &two.weights);
    assert!(d < 1e-5, "Adam weights differ by {d}");
}

/// Augmentation is drawn per sample, not per share: an augmented step on two
/// nodes matches one node's (as an unaugmented one does), two augmented runs
/// are bit-identical, and augmentation does change the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn augmented_steps_match_across_node_counts_and_repeat_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let sgd = OptimizerKind::Sgd;
    let augmented = |nodes| {
        train_with(
            nodes,
            1,
            sgd,
            train_set.clone(),
            test_set.clone(),
            Plane::Grpc,
            |c| c.augment = true,
        )
    };
    let one = augmented(1).await;
    let two = augmented(2).await;
    let again = augmented(2).await;
    let plain = train(1, 1, sgd, train_set.clone(), test_set.clone()).await;
    let d = max_relative_difference(&one.weights, &two.weights);
    assert!(d < 1e-5, "augmented: 2 nodes differ from 1 node by {d}");
    assert_eq!(two.weights, again.weights);
    let d = max_abs_difference(&plain.weights, &one.weights);
    assert!(d > 1e-6, "augmentation changed nothing ({d})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_node_count_gives_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let a = train(
        2,
        4,
        OptimizerKind::Adam,
        train_set.clone(),
        test_set.clone(),
    )
    .await;
    let b = train(2, 4, OptimizerKind::Adam, train_set, test_set).await;
    assert_eq!(a.steps, 4);
    assert_eq!(a.weights, b.weights);
}

/// The shared-memory plane moves the same values as gRPC: 2 nodes on shared
/// memory, on gRPC, and one of each give bit-identical weights over several
/// Adam steps, and the segments are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_and_grpc_give_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let adam = OptimizerKind::Adam;
    let grpc = train(2, 4, adam, train_set.clone(), test_set.clone()).await;
    assert_eq!(grpc.shared_memory_nodes, 0);
    let shared = Plane::Shared {
        dir: shm.path(),
        remote: 0,
    };
    let local = train_on(2, 4, adam, train_set.clone(), test_set.clone(), shared).await;
    assert_eq!(
        local.shared_memory_nodes, 2,
        "both nodes used shared memory"
    );
    let mixed = Plane::Shared {
        dir: shm.path(),
        remote: 1,
    };
    let mixed = train_on(2, 4, adam, train_set, test_set, mixed).await;
    assert_eq!(mixed.shared_memory_nodes, 1);
    assert_eq!(grpc.steps, 4);
    assert_eq!(grpc.weights, local.weights);
    assert_eq!(grpc.weights, mixed.weights);
    assert_eq!(grpc.history.val_accuracy, local.history.val_accuracy);
    let left: Vec<_> = std::fs::read_dir(shm.path()).unwrap().collect();
    assert!(left.is_empty(), "segments left behind: {left:?}");
}

/// How far apart two runs' updates are: ‖(a − w0) − (b − w0)‖ / ‖b − w0‖
/// over the whole trainable buffer.
fn update_difference(w0: &[f32], a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((&w, &x), &y) in w0.iter().zip(a).zip(b) {
        diff += ((x - y) as f64).powi(2);
        norm += ((y - w) as f64).powi(2);
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// The bf16 wire halves the bytes and changes the numbers only a little:
/// one SGD step (whose update is the averaged gradient itself) on 2 nodes in
/// bf16 is within 1% of the f32 step and of its own 1-node run, without
/// being bit-identical to f32 (so bf16 was really used); several Adam steps
/// stay as close, and a bf16 run is still reproducible bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_wire_tracks_f32_and_two_nodes_match_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let w0 = initial_weights();
    let (sgd, adam) = (OptimizerKind::Sgd, OptimizerKind::Adam);
    let f32_one = train(1, 1, sgd, train_set.clone(), test_set.clone()).await;
    let bf16_one = train_on(1, 1, sgd, train_set.clone(), test_set.clone(), Plane::Bf16).await;
    let bf16_two = train_on(2, 1, sgd, train_set.clone(), test_set.clone(), Plane::Bf16).await;
    assert_ne!(bf16_two.weights, f32_one.weights, "bf16 changed nothing");
    let vs_f32 = update_difference(&w0, &bf16_two.weights, &f32_one.weights);
    let vs_one = update_difference(&w0, &bf16_two.weights, &bf16_one.weights);
    eprintln!("SGD step: bf16 vs f32 {vs_f32:.2e}, bf16 2 nodes vs 1 node {vs_one:.2e}");
    assert!(
        vs_f32 < 1e-2,
        "bf16 SGD update differs from f32 by {vs_f32}"
    );
    assert!(
        vs_one < 1e-2,
        "bf16 on 2 nodes differs from 1 node by {vs_one}"
    );
    let f32_adam = train(2, 4, adam, train_set.clone(), test_set.clone()).await;
    let bf16_adam = train_on(2, 4, adam, train_set.clone(), test_set.clone(), Plane::Bf16).await;
    let again = train_on(2, 4, adam, train_set, test_set, Plane::Bf16).await;
    assert_eq!(bf16_adam.weights, again.weights);
    let adam_diff = update_difference(&w0, &bf16_adam.weights, &f32_adam.weights);
    eprintln!("4 Adam steps: bf16 vs f32 {adam_diff:.2e}");
    assert!(
        adam_diff < 5e-2,
        "bf16 Adam updates differ from f32 by {adam_diff}"
    );
}

/// Shard aggregators compute exactly what the coordinator computes alone
/// (averaging and Adam are element-wise): 2 nodes through 1 or 3
/// aggregators (slices cut in the middle of tensors) give bit-identical
/// weights over several steps, for simple-cnn and for resnet20 (whose
/// BatchNorm statistics the aggregators average and whose L2 they apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aggregators_give_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let adam = OptimizerKind::Adam;
    let resnet20 = ModelKind::Resnet {
        n: 3,
        dropout: false,
    };
    for kind in [ModelKind::SimpleCnn, resnet20] {
        let run = |plane| {
            train_with(
                2,
                4,
                adam,
                train_set.clone(),
                test_set.clone(),
                plane,
                move |c| c.model.kind = kind,
            )
        };
        let alone = run(Plane::Grpc).await;
        let one = run(Plane::Sharded(1)).await;
        let three = run(Plane::Sharded(3)).await;
        assert_eq!(alone.steps, 4);
        assert_eq!(alone.weights, one.weights, "{kind}: 1 aggregator");
        assert_eq!(alone.weights, three.weights, "{kind}: 3 aggregators");
        assert_eq!(alone.history.accuracy, three.history.accuracy);
        assert_eq!(alone.history.val_accuracy, three.history.val_accuracy);
        // The L2 penalty is summed per slice, in another order.
        let loss = (alone.history.loss[0] - three.history.loss[0]).abs();
        assert!(loss < 1e-9, "{kind}: losses differ by {loss}");
    }
}

/// On the bf16 wire too: gradients rounded with error feedback by each node
/// and weights sent as bf16 changes to what the nodes hold, slice by slice,
/// give the very bits of the coordinator's own bf16 wire; and they differ
/// from f32 (bf16 was really used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aggregators_on_the_bf16_wire_match_the_coordinators_bf16_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (train_set, test_set) = datasets(dir.path());
    let adam = OptimizerKind::Adam;
    let resnet20 = ModelKind::Resnet {
        n: 3,
        dropout: false,
    };
    for kind in [ModelKind::SimpleCnn, resnet20] {
        let run = |plane, wire| {
            train_with(
                2,
                4,
                adam,
                train_set.clone(),
                test_set.clone(),
                plane,
                move |c| {
                    c.model.kind = kind;
                    c.wire = wire;
                },
            )
        };
        let star = run(Plane::Bf16, Wire::Bf16).await;
        let sharded = run(Plane::Sharded(3), Wire::Bf16).await;
        let f32_sharded = run(Plane::Sharded(3), Wire::F32).await;
        assert_eq!(star.weights, sharded.weights, "{kind}");
        assert_ne!(
            star.weights, f32_sharded.weights,
            "{kind}: bf16 changed nothing"
        );
    }
}
