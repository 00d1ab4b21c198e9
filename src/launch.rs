//! `gradcast run`: a coordinator and N node processes on 127.0.0.1, with their
//! output streamed (prefixed by process) and the coordinator's exit status
//! passed on. The coordinator tells its address through a file
//! (`--address-file`), not its output.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::flags::ProgressMode;
use crate::logging;
use crate::TrainArgs;

/// Writes `addr` to `path` atomically (a reader sees all of it or nothing).
pub fn write_address(path: &Path, addr: SocketAddr) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the address to {}", path.display()))
}

/// Waits for the coordinator to write its address to `path`.
fn read_address(path: &Path, coordinator: &mut Child) -> Result<SocketAddr> {
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text
                .trim()
                .parse()
                .with_context(|| format!("bad address {text:?} in {}", path.display()));
        }
        if let Some(status) = coordinator.try_wait()? {
            bail!("the coordinator exited before listening ({status})");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Forwards each line of `pipe` to our stdout or stderr with `prefix`.
fn forward(pipe: impl Read + Send + 'static, prefix: String, to_stderr: bool) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                eprintln!("{prefix}{line}");
            } else {
                println!("{prefix}{line}");
            }
        }
    });
}

/// Starts a process whose stderr lines (and stdout lines, unless it is the
/// coordinator, whose results are the run's) are printed with `prefix`.
fn spawn(
    cmd: &mut Command,
    prefix: &str,
    coordinator: bool,
    inherit_stderr: bool,
) -> Result<Child> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if inherit_stderr {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start a gradcast process")?;
    if let Some(out) = child.stdout.take() {
        let out_prefix = if coordinator { "" } else { prefix };
        forward(out, out_prefix.to_string(), false);
    }
    if let Some(err) = child.stderr.take() {
        forward(err, prefix.to_string(), true);
    }
    Ok(child)
}

/// Metrics address of process `index` (0 = coordinator, 1 + i = node i).
fn metrics_addr(base: u16, index: usize) -> String {
    let port = if base == 0 { 0 } else { base as usize + index };
    format!("127.0.0.1:{port}")
}

/// Starts the cluster and waits for the coordinator.
pub fn run_cluster(
    nodes: usize,
    threads_per_node: Option<usize>,
    metrics_port: u16,
    train: &TrainArgs,
) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the gradcast executable")?;
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = threads_per_node.unwrap_or((cores / nodes).max(1));
    // On a terminal the coordinator draws its progress bar straight onto ours.
    let bar = train
        .progress
        .bar(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The processes print through us, so they log in the style we would.
    let style = logging::Style::detect().name();
    let dir = tempfile::Builder::new()
        .prefix("gradcast-run-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    let address_file = dir.path().join("coordinator.addr");
    let mut train = train.clone();
    // Fetched once here, not by the coordinator behind a progress prefix.
    train.data = Some(train.dataset()?);
    let token_env: Vec<(&str, String)> = train
        .token
        .iter()
        .map(|t| ("GRADCAST_TOKEN", t.clone()))
        .collect();
    train.progress = if bar {
        ProgressMode::Bar
    } else {
        ProgressMode::Plain
    };
    let mut coordinator = spawn(
        Command::new(&exe)
            .envs(token_env.clone())
            .env(logging::STYLE_ENV, style)
            .arg("coordinator")
            .args(["--listen", "127.0.0.1:0", "--nodes", &nodes.to_string()])
            .args(["--metrics-listen", &metrics_addr(metrics_port, 0)])
            .arg("--address-file")
            .arg(&address_file)
            .args(train.to_args()),
        "coordinator | ",
        true,
        bar,
    )?;
    let addr = read_address(&address_file, &mut coordinator)?;
    eprintln!("gradcast run: coordinator on {addr}, starting {nodes} node(s) with {threads} thread(s) each");
    let mut children = Vec::new();
    for i in 0..nodes {
        children.push(spawn(
            Command::new(&exe)
                .envs(token_env.clone())
                .env(logging::STYLE_ENV, style)
                .arg("node")
                .args([
                    "--coordinator",
                    &format!("http://{addr}"),
                    "--threads",
                    &threads.to_string(),
                    "--metrics-listen",
                    &metrics_addr(metrics_port, 1 + i),
                ]),
            &format!("node{i}       | "),
            false,
            false,
        )?);
    }
    let status = coordinator.wait()?;
    let grace = Instant::now() + Duration::from_secs(10);
    for (i, child) in children.iter_mut().enumerate() {
        loop {
            match child.try_wait()? {
                Some(s) if !s.success() && status.success() => {
                    eprintln!("gradcast run: node{i} exited with {s}");
                    break;
                }
                Some(_) => break,
                None if Instant::now() > grace => {
                    eprintln!("gradcast run: node{i} still running after the coordinator ended; stopping it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                None => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    // Let the forwarding threads print the last lines.
    thread::sleep(Duration::from_millis(100));
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    })
}
