//! `gradcast`: the command-line face of the cluster. Subcommands start a
//! coordinator, a node, or a whole single-host cluster; the work is done by the
//! `coordinator` and `node` crates.

mod bench;
mod fetch;
mod flags;
mod health;
mod inspect;
mod launch;
mod logging;
mod metrics_http;
mod plot;
mod progress_bar;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use coordinator::TrainConfig;
use data::Dataset;
use model::ModelSpec;

use flags::{
    AggregatorArgs, Cli, Command, CoordinatorArgs, DataAction, NodeArgs, PlotArgs, ServerTlsArgs,
    TrainArgs,
};

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn shutdown_signal() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// The TLS a server (the coordinator, an aggregator) serves, if asked;
/// `client_ca`: require client certificates signed by it.
fn server_tls(
    tls: &ServerTlsArgs,
    client_ca: Option<&std::path::Path>,
) -> Result<Option<coordinator::ServerTls>> {
    let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) else {
        return Ok(None);
    };
    Ok(Some(coordinator::ServerTls {
        cert: read_pem(cert, "TLS certificate")?,
        key: read_pem(key, "TLS key")?,
        client_ca: client_ca.map(|p| read_pem(p, "client CA")).transpose()?,
    }))
}

fn client_tls(args: &NodeArgs) -> Result<Option<node::ClientTls>> {
    if args.tls_ca.is_none() && args.tls_cert.is_none() && args.tls_domain.is_none() {
        return Ok(None);
    }
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((
            read_pem(c, "client certificate")?,
            read_pem(k, "client key")?,
        )),
        _ => None,
    };
    Ok(Some(node::ClientTls {
        ca: args
            .tls_ca
            .as_deref()
            .map(|p| read_pem(p, "CA certificate"))
            .transpose()?,
        identity,
        domain: args.tls_domain.clone(),
    }))
}

fn coordinator_main(args: CoordinatorArgs) -> Result<ExitCode> {
    let t = &args.train;
    let mut config = TrainConfig::new(ModelSpec {
        kind: t.model,
        dropout: !t.no_dropout,
    });
    config.epochs = t.epochs;
    config.batch_size = t.batch_size;
    config.nodes = args.nodes;
    config.optimizer = t.optimizer;
    config.lr = t.lr;
    config.lr_schedule = t.lr_schedule.unwrap_or(config.lr_schedule);
    config.seed = t.seed;
    config.history = t.history.clone();
    config.checkpoint_dir = t.checkpoint_dir.clone();
    config.min_nodes = t.min_nodes;
    config.rejoin_timeout = Duration::from_secs(t.rejoin_timeout);
    config.balance = t.balance;
    config.checkpoint_every = t.checkpoint_every;
    config.resume = t.resume;
    config.clip_norm = t.clip_norm;
    config.shared_memory = (t.shm_dir != "off").then(|| PathBuf::from(&t.shm_dir));
    config.wire = t.wire;
    config.augment = t.augment;
    config.aggregators = args.aggregators.clone();
    if t.progress
        .bar(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    {
        config.progress = Some(std::sync::Arc::new(progress_bar::EpochBar::default()));
    }
    config.step_timeout = Duration::from_secs(t.step_timeout);
    config.join_timeout = args.join_timeout.map(Duration::from_secs);
    if t.min_nodes > args.nodes {
        bail!(
            "--min-nodes {} is more than --nodes {}: training could never start",
            t.min_nodes,
            args.nodes
        );
    }
    let data = t.dataset()?;
    let (mut train, mut test) = Dataset::load_train_test(&data)?;
    if let Some(k) = t.train_limit {
        train.truncate(k);
    }
    if let Some(k) = t.test_limit {
        test.truncate(k);
    }
    if train.is_empty() || test.is_empty() {
        bail!("no samples left to train or test on (check --train-limit / --test-limit)");
    }
    tracing::info!(
        train = train.len(),
        test = test.len(),
        schedule = %config.lr_schedule,
        "loaded {}",
        data.display()
    );
    let rt = runtime(2)?;
    let report = rt.block_on(async {
        if let Some(addr) = &args.metrics_listen {
            let bound = metrics_http::start(addr).await?;
            coordinator::describe_metrics();
            println!("metrics on http://{bound}/metrics");
        }
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let bound = listener.local_addr()?;
        println!("listening on {bound}");
        if let Some(path) = &args.address_file {
            launch::write_address(path, bound)?;
        }
        let security = coordinator::Security {
            token: t.token.clone().filter(|t| !t.is_empty()),
            tls: server_tls(&args.tls, args.tls_ca.as_deref())?,
            aggregator_ca: args
                .aggregator_ca
                .as_deref()
                .map(|p| read_pem(p, "aggregator CA"))
                .transpose()?,
        };
        let report =
            coordinator::serve(listener, config, train, test, security, shutdown_signal()).await?;
        anyhow::Ok(report)
    })?;
    if let Some(path) = &t.plot {
        plot::plot(&[(String::new(), report.history.clone())], path)?;
        tracing::info!("learning curves in {}", path.display());
    }
    match report.final_val_accuracy() {
        Some(acc) => println!("final val_accuracy: {acc:.4}"),
        None => println!("final val_accuracy: none (no epoch trained)"),
    }
    Ok(ExitCode::SUCCESS)
}

fn node_main(args: NodeArgs) -> Result<ExitCode> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // candle's CPU kernels size their thread pools from the environment; set
    // it before any of them start.
    // SAFETY: still the only thread: the device (a CUDA driver starts
    // threads of its own) and the async runtime are opened below.
    unsafe { model::use_threads(threads) };
    model::check_kernel_plan().map_err(anyhow::Error::msg)?;
    let device = args.device.open().map_err(anyhow::Error::msg)?;
    let config = node::NodeConfig {
        coordinator: args.coordinator.clone(),
        threads,
        device,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        token: args.token.clone().filter(|t| !t.is_empty()),
        tls: client_tls(&args)?,
        fault: args.fault,
        shared_memory: !args.no_shared_memory,
        emulate_compute: args.emulate_compute_ms.map(Duration::from_millis),
    };
    runtime(1)?.block_on(async {
        if let Some(addr) = &args.metrics_listen {
            let bound = metrics_http::start(addr).await?;
            node::describe_metrics(&node::device_name(&config.device));
            println!("metrics on http://{bound}/metrics");
        }
        node::run(config).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn aggregator_main(args: AggregatorArgs) -> Result<ExitCode> {
    runtime(2)?.block_on(async {
        if let Some(addr) = &args.metrics_listen {
            let bound = metrics_http::start(addr).await?;
            coordinator::shard::aggregator::describe_metrics();
            println!("metrics on http://{bound}/metrics");
        }
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let bound = listener.local_addr()?;
        println!("aggregator listening on {bound}");
        if let Some(path) = &args.address_file {
            launch::write_address(path, bound)?;
        }
        let token = args.token.clone().filter(|t| !t.is_empty());
        let tls = server_tls(&args.tls, None)?;
        coordinator::shard::aggregator::serve(listener, token, tls, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn plot_main(a: PlotArgs) -> Result<ExitCode> {
    let mut histories = Vec::new();
    for (i, path) in a.histories.iter().enumerate() {
        let label = a.labels.get(i).cloned().unwrap_or_else(|| {
            if a.histories.len() == 1 {
                String::new()
            } else {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }
        });
        histories.push((label, plot::read_history(path)?));
    }
    plot::plot(&histories, &a.output)?;
    println!("wrote {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}

/// Keeps the large buffers of a training step for the next one.
#[cfg(not(any(feature = "mimalloc", feature = "jemalloc")))]
#[global_allocator]
static ALLOC: model::BlockCache = model::BlockCache;

/// For comparison with [`model::BlockCache`] only (`--features mimalloc`).
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// For comparison with [`model::BlockCache`] only (`--features jemalloc`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // An empty GRADCAST_* variable counts as unset (so `VAR=${VAR:-}` in a
    // compose file leaves the flag's default alone). Nothing runs yet, so
    // changing the environment is safe.
    for (key, value) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GRADCAST_") && value.is_empty() {
            std::env::remove_var(&key);
        }
    }
    let cli = Cli::parse();
    logging::init(logging::Style::detect());
    let outcome = match cli.command {
        Command::Coordinator(a) => coordinator_main(a),
        Command::Node(a) => node_main(a),
        Command::Aggregator(a) => aggregator_main(a),
        Command::Run(a) => model::check_kernel_plan()
            .map_err(anyhow::Error::msg)
            .and_then(|()| {
                launch::run_cluster(a.nodes, a.threads_per_node, a.metrics_port, &a.train)
            }),
        Command::Eval(a) => {
            inspect::eval(&a.checkpoint, &a.data, a.test_limit).map(|_| ExitCode::SUCCESS)
        }
        Command::Predict(a) => {
            inspect::predict(&a.checkpoint, &a.images).map(|_| ExitCode::SUCCESS)
        }
        Command::Plot(a) => plot_main(a),
        Command::Bench(a) => bench::main(&a),
        Command::Data {
            action: DataAction::Fetch(source),
        } => source.fetch().map(|path| {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }),
        Command::Healthcheck {
            addr,
            grpc,
            service,
        } => if grpc {
            health::probe(&addr, &service)
        } else {
            metrics_http::probe(&addr)
        }
        .map(|_| ExitCode::SUCCESS),
        Command::Synthetic(a) => {
            let spec = data::SyntheticSpec {
                train_per_file: a.train_per_file,
                test: a.test,
                seed: a.seed,
            };
            data::write_synthetic(&a.out, &spec, true)
                .with_context(|| format!("cannot write synthetic data to {}", a.out.display()))
                .map(|root| {
                    println!(
                        "wrote {} and {}",
                        root.display(),
                        a.out.join("cifar-10-binary.tar.gz").display()
                    );
                    ExitCode::SUCCESS
                })
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
