//! `gradcast run`: a coordinator and N node processes on 127.0.0.1, with their
//! output streamed (prefixed by process) and the coordinator's exit status
//! passed on.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::TrainArgs;

/// Forwards each line of `pipe` to our stdout or stderr with `prefix`, and
/// reports the coordinator's address line through `addr`.
fn forward(
    pipe: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    addr: Option<mpsc::Sender<String>>,
) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let (Some(tx), Some(a)) = (&addr, line.strip_prefix("listening on ")) {
                let _ = tx.send(a.trim().to_string());
            }
            if to_stderr {
                eprintln!("{prefix}{line}");
            } else {
                println!("{prefix}{line}");
            }
        }
    });
}

fn spawn(
    cmd: &mut Command,
    prefix: &str,
    addr: Option<mpsc::Sender<String>>,
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
        forward(
            out,
            if addr.is_some() {
                String::new()
            } else {
                prefix.to_string()
            },
            false,
            addr,
        );
    }
    if let Some(err) = child.stderr.take() {
        forward(err, prefix.to_string(), true, None);
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
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find the gradcast executable")?;
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = threads_per_node.unwrap_or((cores / nodes).max(1));
    let (addr_tx, addr_rx) = mpsc::channel();
    // On a terminal the coordinator draws its progress bar straight onto ours.
    let bar = train.progress == "bar"
        || (train.progress == "auto" && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut train = train.clone();
    // Fetched once here, not by the coordinator behind a progress prefix.
    train.data = Some(train.dataset()?);
    let token_env: Vec<(&str, String)> = train
        .token
        .iter()
        .map(|t| ("GRADCAST_TOKEN", t.clone()))
        .collect();
    train.progress = if bar { "bar" } else { "plain" }.to_string();
    let mut coordinator = spawn(
        Command::new(&exe)
            .envs(token_env.clone())
            .arg("coordinator")
            .args(["--listen", "127.0.0.1:0", "--nodes", &nodes.to_string()])
            .args(["--metrics-listen", &metrics_addr(metrics_port, 0)])
            .args(train.to_args()),
        "coordinator | ",
        Some(addr_tx),
        bar,
    )?;
    let addr = loop {
        match addr_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(a) => break a,
            Err(_) => {
                if let Some(status) = coordinator.try_wait()? {
                    bail!("the coordinator exited before listening ({status})");
                }
            }
        }
    };
    eprintln!("gradcast run: coordinator on {addr}, starting {nodes} node(s) with {threads} thread(s) each");
    let mut children = Vec::new();
    for i in 0..nodes {
        children.push(spawn(
            Command::new(&exe)
                .envs(token_env.clone())
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
            None,
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
