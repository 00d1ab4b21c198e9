//! The command line: every subcommand's flags, parsed and checked by clap
//! (value parsers, so a bad value is a usage error that names the flag).

use std::path::PathBuf;

use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use coordinator::{LrSchedule, OptimizerKind};
use model::{DeviceChoice, ModelKind};

/// At least 1 (counts, sizes, seconds that must not be zero).
fn at_least_one<T>() -> RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    RangedU64ValueParser::<T>::new().range(1..)
}

/// A finite number above zero.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err(format!("{s} is not a positive number")),
        Err(e) => Err(e.to_string()),
    }
}

/// How a training run shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// Always the bar.
    Bar,
    /// Always log lines.
    Plain,
}

impl ProgressMode {
    /// Whether to draw the bar, given whether stderr is a terminal.
    pub fn bar(self, terminal: bool) -> bool {
        self == ProgressMode::Bar || (self == ProgressMode::Auto && terminal)
    }

    /// The flag's value, to hand to a child process.
    pub fn name(self) -> &'static str {
        match self {
            ProgressMode::Auto => "auto",
            ProgressMode::Bar => "bar",
            ProgressMode::Plain => "plain",
        }
    }
}

/// What `gradcast bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Training steps only.
    Train,
    /// Inference only.
    Eval,
    /// Both.
    Both,
}

/// Synchronous data-parallel training of CIFAR-10 models over gRPC.
#[derive(Parser)]
#[command(name = "gradcast", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the coordinator: holds the data and the weights, waits for nodes, trains.
    Coordinator(CoordinatorArgs),
    /// Run a worker node: joins a coordinator and computes gradients.
    Node(NodeArgs),
    /// Run a whole cluster on this host: a coordinator and N node processes.
    Run(RunArgs),
    /// Run a shard aggregator: averages and optimises one slice of the
    /// weights for a coordinator started with --aggregators.
    Aggregator(AggregatorArgs),
    /// Write a small synthetic data set in the CIFAR-10 binary layout (for smoke tests).
    Synthetic(SyntheticArgs),
    /// Test loss, accuracy and per-class accuracy of a checkpoint.
    Eval(EvalArgs),
    /// Classify PNG/JPEG images with a checkpoint (top-3 classes).
    Predict(PredictArgs),
    /// Draw learning curves from one or more history JSON files.
    Plot(PlotArgs),
    /// Measure training and inference img/s of a model on random data; one
    /// JSON line per measurement (median over the steps).
    Bench(BenchArgs),
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
pub enum DataAction {
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
    pub fn fetch(&self) -> anyhow::Result<PathBuf> {
        let source = crate::fetch::Source::new(self.data_url.clone(), self.data_sha256.clone());
        crate::fetch::ensure(&crate::fetch::cache_dir()?, &source)
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// A safetensors checkpoint written by --checkpoint-dir.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// CIFAR-10 archive or folder (its test_batch.bin is used).
    #[arg(long, env = "GRADCAST_DATA")]
    pub data: PathBuf,
    /// Evaluate on the first K test samples only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

#[derive(Args)]
pub struct PredictArgs {
    /// A safetensors checkpoint written by --checkpoint-dir.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images (PNG or JPEG; resized to 32×32 if needed).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args)]
pub struct PlotArgs {
    /// History JSON files (from --history); several are overlaid.
    #[arg(required = true)]
    pub histories: Vec<PathBuf>,
    /// Output PNG.
    #[arg(short, long, default_value = "curves.png")]
    pub output: PathBuf,
    /// Legend labels, comma-separated (default: the file names).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
}

#[derive(Args)]
pub struct SyntheticArgs {
    /// Folder to write cifar-10-batches-bin/ (and cifar-10-binary.tar.gz) into.
    #[arg(long)]
    pub out: PathBuf,
    /// Records in each of the 5 training files.
    #[arg(long, default_value_t = 200)]
    pub train_per_file: usize,
    /// Records in the test file.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    /// Seed of the class patterns and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    pub model: ModelKind,
    /// Epochs to train.
    #[arg(long, env = "GRADCAST_EPOCHS", default_value_t = 1)]
    pub epochs: u32,
    /// Global batch size, split across the nodes of each step.
    #[arg(long, env = "GRADCAST_BATCH_SIZE", default_value_t = 32, value_parser = at_least_one::<usize>())]
    pub batch_size: usize,
    /// Optimizer: adam (Keras defaults) or sgd.
    #[arg(long, env = "GRADCAST_OPTIMIZER", default_value = "adam")]
    pub optimizer: OptimizerKind,
    /// Learning rate.
    #[arg(long, env = "GRADCAST_LR", default_value_t = 1e-3, value_parser = positive)]
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
    #[arg(long, env = "GRADCAST_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Seconds to wait for a node's answer to one step before giving up.
    #[arg(long, env = "GRADCAST_STEP_TIMEOUT", default_value_t = 300, value_parser = at_least_one::<u64>())]
    pub step_timeout: u64,
    /// Keep training while at least this many nodes remain; below it, wait
    /// --rejoin-timeout seconds for replacements, then fail.
    #[arg(long, env = "GRADCAST_MIN_NODES", default_value_t = 1, value_parser = at_least_one::<usize>())]
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
    #[arg(long, env = "GRADCAST_CLIP_NORM", value_parser = positive)]
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
    /// Augment the training samples: random crop of the image padded with 4
    /// black pixels and horizontal flip, drawn per sample from --seed (runs
    /// stay reproducible).
    #[arg(long, env = "GRADCAST_AUGMENT")]
    pub augment: bool,
    /// Disable dropout layers (for equivalence tests).
    #[arg(long, hide = true)]
    pub no_dropout: bool,
}

impl TrainArgs {
    /// The data set: `--data`, or the cached official archive (downloaded
    /// first if needed).
    pub fn dataset(&self) -> anyhow::Result<PathBuf> {
        match &self.data {
            Some(path) => Ok(path.clone()),
            None => self.source.fetch(),
        }
    }

    /// The same flags as command-line arguments, to hand to a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--model".into(),
            self.model.to_string(),
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
            self.progress.name().into(),
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
            ("--augment", self.augment),
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
pub struct CoordinatorArgs {
    /// Address to listen on for nodes (port 0 picks a free one; the chosen address is printed).
    #[arg(long, env = "GRADCAST_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: String,
    /// Nodes to wait for before training starts.
    #[arg(long, env = "GRADCAST_NODES", default_value_t = 1, value_parser = at_least_one::<usize>())]
    pub nodes: usize,
    /// Seconds to wait for the nodes to join (default: forever).
    #[arg(long, env = "GRADCAST_JOIN_TIMEOUT")]
    pub join_timeout: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9100; port 0 picks one).
    #[arg(long, env = "GRADCAST_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Require nodes to present client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "GRADCAST_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Also write the bound address to this file, once listening (how
    /// `gradcast run` learns it).
    #[arg(long, hide = true)]
    pub address_file: Option<PathBuf>,
    /// Shard aggregators (`gradcast aggregator`), as URLs reachable from
    /// here and from every node, comma-separated: aggregator k averages and
    /// optimises slice k of the weights, and nodes exchange gradients and
    /// weights with them instead of with the coordinator (for clusters
    /// whose coordinator link would carry N copies of the model per step).
    #[arg(long, env = "GRADCAST_AGGREGATORS", value_delimiter = ',')]
    pub aggregators: Vec<String>,
    /// CA certificate (PEM) that signed the aggregators' TLS certificates
    /// (for https:// aggregator URLs).
    #[arg(long, env = "GRADCAST_AGGREGATOR_CA")]
    pub aggregator_ca: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args)]
pub struct AggregatorArgs {
    /// Address to listen on for the coordinator and the nodes (port 0 picks a free one; printed).
    #[arg(long, env = "GRADCAST_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: String,
    /// Cluster token every call must present (also read from GRADCAST_TOKEN).
    #[arg(long, env = "GRADCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9102; port 0 picks one).
    #[arg(long, env = "GRADCAST_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Also write the bound address to this file, once listening.
    #[arg(long, hide = true)]
    pub address_file: Option<PathBuf>,
}

/// Serving gRPC over TLS (the coordinator, an aggregator).
#[derive(Args)]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "GRADCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "GRADCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct NodeArgs {
    /// Coordinator URL, e.g. http://10.0.0.5:50051.
    #[arg(long, env = "GRADCAST_COORDINATOR")]
    pub coordinator: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "GRADCAST_THREADS", value_parser = at_least_one::<usize>())]
    pub threads: Option<usize>,
    /// Compute device: cpu, or cuda / cuda:N in builds with CUDA support.
    #[arg(long, env = "GRADCAST_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// Seconds to keep retrying to reach the coordinator.
    #[arg(long, env = "GRADCAST_CONNECT_TIMEOUT", default_value_t = 120)]
    pub connect_timeout: u64,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9101; port 0 picks one).
    #[arg(long, env = "GRADCAST_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Cluster token to present to the coordinator (also read from GRADCAST_TOKEN).
    #[arg(long, env = "GRADCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate; use an https:// URL.
    #[arg(long, env = "GRADCAST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key.
    #[arg(long, env = "GRADCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for --tls-cert.
    #[arg(long, env = "GRADCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name expected in the coordinator's certificate (default: the URL's host).
    #[arg(long, env = "GRADCAST_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Misbehave on purpose, to test the coordinator: nan-gradients, huge-gradient,
    /// lie-about-counts, wrong-step, no-receipt, withhold-slices, flood-slices
    /// or slow=MILLISECONDS.
    #[arg(long, hide = true)]
    pub fault: Option<node::Fault>,
    /// Never use the coordinator's shared memory, even on its host (everything over gRPC).
    #[arg(long, env = "GRADCAST_NO_SHARED_MEMORY")]
    pub no_shared_memory: bool,
    /// Benchmarks of the transport only: wait MILLISECONDS per training step
    /// instead of computing, and answer a fixed pseudo-gradient of the model's
    /// size (the model does not learn).
    #[arg(
        long,
        hide = true,
        env = "GRADCAST_EMULATE_COMPUTE_MS",
        value_name = "MILLISECONDS"
    )]
    pub emulate_compute_ms: Option<u64>,
}

#[derive(Args)]
pub struct RunArgs {
    /// Node processes to start.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<usize>())]
    pub nodes: usize,
    /// Compute threads per node (default: cores / nodes, at least 1).
    #[arg(long, value_parser = at_least_one::<usize>())]
    pub threads_per_node: Option<usize>,
    /// Metrics ports: the coordinator gets BASE, node i gets BASE+1+i (0: free ports, printed).
    #[arg(long, default_value_t = 0)]
    pub metrics_port: u16,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model: simple-cnn, complex-cnn, resnet20, resnet20-dropout, resnet50-dropout, resnet<6n+2>[-dropout].
    #[arg(long)]
    pub model: ModelKind,
    /// Samples per step.
    #[arg(long, default_value_t = 128, value_parser = at_least_one::<usize>())]
    pub batch_size: usize,
    /// Compute threads.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<usize>())]
    pub threads: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = at_least_one::<usize>())]
    pub steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = BenchMode::Both)]
    pub mode: BenchMode,
    /// candle's own ops only (the reference engine), instead of the fast kernels.
    #[arg(long)]
    pub reference: bool,
    /// Compute device: cpu, or cuda / cuda:N in builds with CUDA support.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gradcast").chain(args.iter().copied()))
    }

    #[test]
    fn bad_values_are_usage_errors_that_name_the_flag() {
        for (args, flag) in [
            (&["coordinator", "--min-nodes", "0"][..], "--min-nodes"),
            (&["coordinator", "--step-timeout", "0"], "--step-timeout"),
            (&["coordinator", "--nodes", "0"], "--nodes"),
            (&["coordinator", "--batch-size", "0"], "--batch-size"),
            (&["coordinator", "--clip-norm", "0"], "--clip-norm"),
            (&["coordinator", "--clip-norm", "nan"], "--clip-norm"),
            (&["coordinator", "--lr=-1"], "--lr"),
            (&["coordinator", "--model", "resnet21"], "--model"),
            (&["coordinator", "--progress", "fancy"], "--progress"),
            (&["run", "--nodes", "0"], "--nodes"),
            (&["run", "--threads-per-node", "0"], "--threads-per-node"),
            (
                &["node", "--coordinator", "http://x", "--device", "gpu"],
                "--device",
            ),
            (
                &["node", "--coordinator", "http://x", "--threads", "0"],
                "--threads",
            ),
            (
                &["bench", "--model", "simple-cnn", "--steps", "0"],
                "--steps",
            ),
            (
                &["bench", "--model", "simple-cnn", "--mode", "fast"],
                "--mode",
            ),
            (&["bench"], "--model"),
        ] {
            let err = match parse(args) {
                Ok(_) => panic!("{args:?} was accepted"),
                Err(e) => e,
            };
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ValueValidation
                        | ErrorKind::InvalidValue
                        | ErrorKind::MissingRequiredArgument
                ),
                "{args:?}: {:?}",
                err.kind()
            );
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_child_process_gets_the_same_settings() {
        let Command::Run(run) = parse(&[
            "run",
            "--model",
            "resnet20-dropout",
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--lr-schedule",
            "resnet-keras",
            "--clip-norm",
            "2.5",
            "--progress",
            "plain",
            "--min-nodes",
            "2",
            "--balance",
            "--wire",
            "bf16",
            "--checkpoint-dir",
            "/tmp/x",
            "--resume",
            "--augment",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert!(run.train.augment);
        let args = run.train.to_args();
        let mut argv = vec!["coordinator".to_string()];
        argv.extend(args);
        let Command::Coordinator(c) = Cli::try_parse_from(
            std::iter::once("gradcast".to_string()).chain(argv.iter().cloned()),
        )
        .unwrap()
        .command
        else {
            panic!("not coordinator")
        };
        assert_eq!(format!("{:?}", c.train), format!("{:?}", run.train));
    }

    #[test]
    fn bench_takes_its_flags_from_clap() {
        let Command::Bench(b) = parse(&[
            "bench", "--model", "resnet20", "--device", "cuda:1", "--mode", "train",
        ])
        .unwrap()
        .command
        else {
            panic!("not bench")
        };
        assert_eq!(
            b.model,
            ModelKind::Resnet {
                n: 3,
                dropout: false
            }
        );
        assert_eq!(b.device, DeviceChoice::Cuda(1));
        assert_eq!(b.mode, BenchMode::Train);
        assert_eq!((b.batch_size, b.threads, b.steps), (128, 2, 10));
    }
}
