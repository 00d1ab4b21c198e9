//! `gradcast`: the command-line face of the cluster. Subcommands start a
//! coordinator, a node, or a whole single-host cluster; the work is done by the
//! `coordinator` and `node` crates.

mod fetch;
mod health;
mod inspect;
mod launch;
mod metrics_http;
mod plot;
mod progress_bar;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use coordinator::{LrSchedule, OptimizerKind, TrainConfig};
use data::Dataset;
use model::{Device, ModelKind, ModelSpec};

/// Synchronous data-parallel training of CIFAR-10 models over gRPC.
#[derive(Parser)]
#[command(name = "gradcast", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: holds the data and the weights, waits for nodes, trains.
    Coordinator(CoordinatorArgs),
    /// Run a worker node: joins a coordinator and computes gradients.
    Node(NodeArgs),
    /// Run a whole cluster on this host: a coordinator and N node processes.
    Run(RunArgs),
    /// Write a small synthetic data set in the CIFAR-10 binary layout (for smoke tests).
    Synthetic(SyntheticArgs),
    /// Test loss, accuracy and per-class accuracy of a checkpoint.
    Eval(EvalArgs),
    /// Classify PNG/JPEG images with a checkpoint (top-3 classes).
    Predict(PredictArgs),
    /// Draw learning curves from one or more history JSON files.
    Plot(PlotArgs),
    /// Measure training and inference img/s of a model on random data
    /// (`gradcast bench --model resnet20 [--batch-size 128] [--threads 2] [--device cuda]`).
    #[command(disable_help_flag = true)]
    Bench {
        /// Options: --model NAME [--batch-size N] [--threads N] [--steps N] [--warmup N] [--reference] [--device cpu|cuda[:N]].
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        options: Vec<String>,
    },
    /// Get CIFAR-10 into the cache (`gradcast data fetch`).
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
    /// Exit 0 if the process serving metrics on ADDR answers /health, or with
    /// --grpc if the coordinator on ADDR reports SERVING (container and
    /// Kubernetes health checks).
    Healthcheck {
        /// Metrics address of the process to check (with --grpc: the
        /// coordinator's gRPC address).
        #[arg(default_value = "127.0.0.1:9100")]
        addr: String,
        /// Ask the coordinator's standard gRPC health service (grpc.health.v1).
        #[arg(long)]
        grpc: bool,
        /// With --grpc: the service to ask about ("" for the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Subcommand)]
enum DataAction {
    /// Download the official cifar-10-binary.tar.gz into the cache (resuming a
    /// partial download, verifying its checksum) and print its path.
    Fetch(SourceArgs),
}

/// Where CIFAR-10 comes from when no --data is given.
#[derive(Args, Clone, Debug, Default)]
pub struct SourceArgs {
    /// Download from this mirror instead of the official site.
    #[arg(long, env = "GRADCAST_DATA_URL")]
    pub data_url: Option<String>,
    /// SHA-256 the mirror's archive must have (the official one is always checked).
    #[arg(long, env = "GRADCAST_DATA_SHA256")]
    pub data_sha256: Option<String>,
}

impl SourceArgs {
    /// The archive in the cache (`GRADCAST_CACHE`, `$XDG_CACHE_HOME/gradcast`
    /// or `~/.cache/gradcast`), downloaded first if it is not there.
    fn fetch(&self) -> Result<PathBuf> {
        let source = fetch::Source::new(self.data_url.clone(), self.data_sha256.clone());
        fetch::ensure(&fetch::cache_dir()?, &source)
    }
}

#[derive(Args)]
struct EvalArgs {
    /// A safetensors checkpoint written by --checkpoint-dir.
    #[arg(long)]
    checkpoint: PathBuf,
    /// CIFAR-10 archive or folder (its test_batch.bin is used).
    #[arg(long, env = "GRADCAST_DATA")]
    data: PathBuf,
    /// Evaluate on the first K test samples only.
    #[arg(long)]
    test_limit: Option<usize>,
}

#[derive(Args)]
struct PredictArgs {
    /// A safetensors checkpoint written by --checkpoint-dir.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Images (PNG or JPEG; resized to 32×32 if needed).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct PlotArgs {
    /// History JSON files (from --history); several are overlaid.
    #[arg(required = true)]
    histories: Vec<PathBuf>,
    /// Output PNG.
    #[arg(short, long, default_value = "curves.png")]
    output: PathBuf,
    /// Legend labels, comma-separated (default: the file names).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
}

#[derive(Args)]
struct SyntheticArgs {
    /// Folder to write cifar-10-batches-bin/ (and cifar-10-binary.tar.gz) into.
    #[arg(long)]
    out: PathBuf,
    /// Records in each of the 5 training files.
    #[arg(long, default_value_t = 200)]
    train_per_file: usize,
    /// Records in the test file.
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Seed of the class patterns and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What to train and how; shared by `coordinator` and `run`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// CIFAR-10: the cifar-10-binary.tar.gz archive or its extracted
    /// cifar-10-batches-bin folder [default: the cached official archive,
    /// downloaded on first use].
    #[arg(long, env = "GRADCAST_DATA")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Model: simple-cnn, complex-cnn, resnet20, resnet20-dropout, resnet50-dropout, resnet<6n+2>[-dropout].
    #[arg(long, env = "GRADCAST_MODEL", default_value = "simple-cnn")]
    pub model: String,
    /// Epochs to train.
    #[arg(long, env = "GRADCAST_EPOCHS", default_value_t = 1)]
    pub epochs: u32,
    /// Global batch size, split across the nodes of each step.
    #[arg(long, env = "GRADCAST_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Optimizer: adam (Keras defaults) or sgd.
    #[arg(long, env = "GRADCAST_OPTIMIZER", default_value = "adam")]
    pub optimizer: OptimizerKind,
    /// Learning rate.
    #[arg(long, env = "GRADCAST_LR", default_value_t = 1e-3)]
    pub lr: f64,
    /// Learning-rate schedule: constant, step-decay (complex-cnn's default) or resnet-keras.
    #[arg(long, env = "GRADCAST_LR_SCHEDULE")]
    pub lr_schedule: Option<LrSchedule>,
    /// Seed of weight initialisation, epoch order and dropout.
    #[arg(long, env = "GRADCAST_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Train on the first K training samples only.
    #[arg(long, env = "GRADCAST_TRAIN_LIMIT")]
    pub train_limit: Option<usize>,
    /// Evaluate on the first K test samples only.
    #[arg(long, env = "GRADCAST_TEST_LIMIT")]
    pub test_limit: Option<usize>,
    /// Write the Keras-style history JSON here after every epoch.
    #[arg(long, env = "GRADCAST_HISTORY")]
    pub history: Option<PathBuf>,
    /// Draw the learning curves (accuracy and loss per epoch) to this PNG at the end.
    #[arg(long, env = "GRADCAST_PLOT")]
    pub plot: Option<PathBuf>,
    /// Write safetensors checkpoints here (every epoch, and final.safetensors at the end).
    #[arg(long, env = "GRADCAST_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Progress display: auto (a bar on a terminal, log lines otherwise), bar or plain.
    #[arg(long, env = "GRADCAST_PROGRESS", default_value = "auto", value_parser = ["auto", "bar", "plain"])]
    pub progress: String,
    /// Seconds to wait for a node's answer to one step before giving up.
    #[arg(long, env = "GRADCAST_STEP_TIMEOUT", default_value_t = 300)]
    pub step_timeout: u64,
    /// Keep training while at least this many nodes remain; below it, wait
    /// --rejoin-timeout seconds for replacements, then fail.
    #[arg(long, env = "GRADCAST_MIN_NODES", default_value_t = 1)]
    pub min_nodes: usize,
    /// Seconds to wait for replacement nodes when fewer than --min-nodes remain.
    #[arg(long, env = "GRADCAST_REJOIN_TIMEOUT", default_value_t = 60)]
    pub rejoin_timeout: u64,
    /// Share each batch in proportion to the nodes' measured speed.
    #[arg(long, env = "GRADCAST_BALANCE")]
    pub balance: bool,
    /// Also save the resume state every K steps (it is always saved after each epoch).
    #[arg(long, env = "GRADCAST_CHECKPOINT_EVERY", default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Continue from <checkpoint-dir>/resume.safetensors if it exists.
    #[arg(long, env = "GRADCAST_RESUME", requires = "checkpoint_dir")]
    pub resume: bool,
    /// Cluster token nodes must present to join (also read from GRADCAST_TOKEN).
    #[arg(long, env = "GRADCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Scale the averaged gradient down to this L2 norm when it is larger.
    #[arg(long, env = "GRADCAST_CLIP_NORM")]
    pub clip_norm: Option<f64>,
    /// Folder on a tmpfs for the shared-memory data plane with nodes on this
    /// host (weights and gradients bypass gRPC); `off` sends everything over gRPC.
    #[arg(long, env = "GRADCAST_SHM_DIR", default_value = "/dev/shm")]
    pub shm_dir: String,
    /// How weights and gradients travel over gRPC: f32, or bf16 (half the
    /// bytes; gradients rounded with error feedback, master weights and Adam
    /// state stay f32). Nodes on shared memory always use f32.
    #[arg(long, env = "GRADCAST_WIRE", default_value = "f32")]
    pub wire: coordinator::Wire,
    /// Disable dropout layers (for equivalence tests).
    #[arg(long, hide = true)]
    pub no_dropout: bool,
}

impl TrainArgs {
    /// The data set: `--data`, or the cached official archive (downloaded
    /// first if needed).
    pub fn dataset(&self) -> Result<PathBuf> {
        match &self.data {
            Some(path) => Ok(path.clone()),
            None => self.source.fetch(),
        }
    }

    /// The same flags as command-line arguments, to hand to a child process.
    fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--model".into(),
            self.model.clone(),
            "--epochs".into(),
            self.epochs.to_string(),
            "--batch-size".into(),
            self.batch_size.to_string(),
            "--optimizer".into(),
            self.optimizer.to_string(),
            "--lr".into(),
            self.lr.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--step-timeout".into(),
            self.step_timeout.to_string(),
            "--progress".into(),
            self.progress.clone(),
        ];
        let optional = [
            (
                "--data",
                self.data.as_ref().map(|p| p.display().to_string()),
            ),
            ("--data-url", self.source.data_url.clone()),
            ("--data-sha256", self.source.data_sha256.clone()),
            ("--lr-schedule", self.lr_schedule.map(|s| s.to_string())),
            ("--train-limit", self.train_limit.map(|k| k.to_string())),
            ("--test-limit", self.test_limit.map(|k| k.to_string())),
            ("--clip-norm", self.clip_norm.map(|k| k.to_string())),
            (
                "--history",
                self.history.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "--plot",
                self.plot.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "--checkpoint-dir",
                self.checkpoint_dir
                    .as_ref()
                    .map(|p| p.display().to_string()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(v) = value {
                a.push(flag.into());
                a.push(v);
            }
        }
        a.extend([
            "--shm-dir".into(),
            self.shm_dir.clone(),
            "--wire".into(),
            self.wire.to_string(),
            "--min-nodes".into(),
            self.min_nodes.to_string(),
            "--rejoin-timeout".into(),
            self.rejoin_timeout.to_string(),
            "--checkpoint-every".into(),
            self.checkpoint_every.to_string(),
        ]);
        for (flag, on) in [
            ("--balance", self.balance),
            ("--resume", self.resume),
            ("--no-dropout", self.no_dropout),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        // The token travels in the environment (GRADCAST_TOKEN), not on the command line.
        a
    }
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on for nodes (port 0 picks a free one; the chosen address is printed).
    #[arg(long, env = "GRADCAST_LISTEN", default_value = "0.0.0.0:50051")]
    listen: String,
    /// Nodes to wait for before training starts.
    #[arg(long, env = "GRADCAST_NODES", default_value_t = 1)]
    nodes: usize,
    /// Seconds to wait for the nodes to join (default: forever).
    #[arg(long, env = "GRADCAST_JOIN_TIMEOUT")]
    join_timeout: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9100; port 0 picks one).
    #[arg(long, env = "GRADCAST_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "GRADCAST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "GRADCAST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require nodes to present client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "GRADCAST_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct NodeArgs {
    /// Coordinator URL, e.g. http://10.0.0.5:50051.
    #[arg(long, env = "GRADCAST_COORDINATOR")]
    coordinator: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "GRADCAST_THREADS")]
    threads: Option<usize>,
    /// Compute device: cpu, or cuda / cuda:N in builds with CUDA support.
    #[arg(long, env = "GRADCAST_DEVICE", default_value = "cpu")]
    device: String,
    /// Seconds to keep retrying to reach the coordinator.
    #[arg(long, env = "GRADCAST_CONNECT_TIMEOUT", default_value_t = 120)]
    connect_timeout: u64,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9101; port 0 picks one).
    #[arg(long, env = "GRADCAST_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Cluster token to present to the coordinator (also read from GRADCAST_TOKEN).
    #[arg(long, env = "GRADCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate; use an https:// URL.
    #[arg(long, env = "GRADCAST_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key.
    #[arg(long, env = "GRADCAST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for --tls-cert.
    #[arg(long, env = "GRADCAST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name expected in the coordinator's certificate (default: the URL's host).
    #[arg(long, env = "GRADCAST_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Misbehave on purpose, to test the coordinator: nan-gradients, huge-gradient,
    /// lie-about-counts, wrong-step or slow=MILLISECONDS.
    #[arg(long, hide = true)]
    fault: Option<node::Fault>,
    /// Never use the coordinator's shared memory, even on its host (everything over gRPC).
    #[arg(long, env = "GRADCAST_NO_SHARED_MEMORY")]
    no_shared_memory: bool,
    /// Benchmarks of the transport only: wait MILLISECONDS per training step
    /// instead of computing, and answer a fixed pseudo-gradient of the model's
    /// size (the model does not learn).
    #[arg(
        long,
        hide = true,
        env = "GRADCAST_EMULATE_COMPUTE_MS",
        value_name = "MILLISECONDS"
    )]
    emulate_compute_ms: Option<u64>,
}

#[derive(Args)]
struct RunArgs {
    /// Node processes to start.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Compute threads per node (default: cores / nodes, at least 1).
    #[arg(long)]
    threads_per_node: Option<usize>,
    /// Metrics ports: the coordinator gets BASE, node i gets BASE+1+i (0: free ports, printed).
    #[arg(long, default_value_t = 0)]
    metrics_port: u16,
    #[command(flatten)]
    train: TrainArgs,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => bail!("--device {s}: unknown device; use cpu, cuda or cuda:N"),
        },
    };
    cuda_device(s, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(s: &str, ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .with_context(|| format!("--device {s}: cannot open CUDA device {ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(s: &str, _ordinal: usize) -> Result<Device> {
    bail!("--device {s}: this build has no CUDA support; rebuild with --features cuda")
}

async fn shutdown_signal() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn server_tls(args: &CoordinatorArgs) -> Result<Option<coordinator::ServerTls>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    Ok(Some(coordinator::ServerTls {
        cert: read_pem(cert, "TLS certificate")?,
        key: read_pem(key, "TLS key")?,
        client_ca: args
            .tls_ca
            .as_deref()
            .map(|p| read_pem(p, "client CA"))
            .transpose()?,
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
    let kind: ModelKind = t.model.parse()?;
    let mut config = TrainConfig::new(ModelSpec {
        kind,
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
    config.min_nodes = t.min_nodes.max(1);
    config.rejoin_timeout = Duration::from_secs(t.rejoin_timeout);
    config.balance = t.balance;
    config.checkpoint_every = t.checkpoint_every;
    config.resume = t.resume;
    config.clip_norm = t.clip_norm.filter(|c| *c > 0.0);
    config.shared_memory = (t.shm_dir != "off").then(|| PathBuf::from(&t.shm_dir));
    config.wire = t.wire;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if t.progress == "bar" || (t.progress == "auto" && terminal) {
        config.progress = Some(std::sync::Arc::new(progress_bar::EpochBar::default()));
    }
    config.step_timeout = Duration::from_secs(t.step_timeout.max(1));
    config.join_timeout = args.join_timeout.map(Duration::from_secs);
    if t.batch_size == 0 || args.nodes == 0 {
        bail!("--batch-size and --nodes must be at least 1");
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
        println!("listening on {}", listener.local_addr()?);
        let security = coordinator::Security {
            token: t.token.clone().filter(|t| !t.is_empty()),
            tls: server_tls(&args)?,
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
    let device = parse_device(&args.device)?;
    let threads = args
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    // candle's CPU kernels size their thread pools from the environment; set
    // it before any of them start.
    model::use_threads(threads);
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
#[global_allocator]
static ALLOC: model::BlockCache = model::BlockCache;

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
    init_logging();
    let outcome = match cli.command {
        Command::Coordinator(a) => coordinator_main(a),
        Command::Node(a) => node_main(a),
        Command::Run(a) => {
            launch::run_cluster(a.nodes, a.threads_per_node, a.metrics_port, &a.train)
        }
        Command::Eval(a) => {
            inspect::eval(&a.checkpoint, &a.data, a.test_limit).map(|_| ExitCode::SUCCESS)
        }
        Command::Predict(a) => {
            inspect::predict(&a.checkpoint, &a.images).map(|_| ExitCode::SUCCESS)
        }
        Command::Plot(a) => plot_main(a),
        Command::Bench { options } => model::bench::main_with_args(options.into_iter())
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!(e)),
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
