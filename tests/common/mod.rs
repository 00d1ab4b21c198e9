//! Helpers shared by the multi-process tests: spawning the real `gradcast`
//! binary on 127.0.0.1 and watching its output.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gradcast");

/// Writes a synthetic data set (folder and archive) and returns the archive.
pub fn synthetic(dir: &Path, per_file: usize, test: usize) -> PathBuf {
    let spec = data::SyntheticSpec {
        train_per_file: per_file,
        test,
        seed: 1,
    };
    data::write_synthetic(dir, &spec, true).unwrap();
    dir.join("cifar-10-binary.tar.gz")
}

/// Waits for `child` at most `limit`; kills it and fails the test after that.
pub fn wait(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines a process printed (stdout and stderr), with the time each arrived.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<(Instant, String)>>>);

impl Lines {
    fn follow(&self, pipe: impl Read + Send + 'static) {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.0.lock().unwrap().push((Instant::now(), line));
            }
        });
    }

    /// All lines so far.
    pub fn all(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// When the first line containing `needle` arrived.
    pub fn when(&self, needle: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// Waits up to `limit` for a line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            if let Some((_, l)) = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < end,
                "no line with {needle:?} within {limit:?}:\n{}",
                self.all().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }
}

/// Spawns `gradcast ARGS` with `env`, collecting its output.
pub fn start(args: &[&str], env: &[(&str, &str)]) -> (Child, Lines) {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Lines::default();
    lines.follow(child.stdout.take().unwrap());
    lines.follow(child.stderr.take().unwrap());
    (child, lines)
}

/// The address a coordinator printed (`listening on ADDR`).
pub fn address(lines: &Lines) -> String {
    let line = lines.wait_for("listening on ", Duration::from_secs(60));
    line.rsplit(' ').next().unwrap().trim().to_string()
}

/// Starts a node against `addr` with extra arguments.
pub fn node(addr: &str, extra: &[&str]) -> (Child, Lines) {
    let url = format!("http://{addr}");
    let mut args = vec!["node", "--coordinator", url.as_str(), "--threads", "1"];
    args.extend_from_slice(extra);
    start(&args, &[])
}

/// Samples each epoch trained on, from the coordinator's epoch lines.
pub fn epoch_samples(lines: &Lines) -> Vec<u64> {
    lines
        .all()
        .iter()
        .filter(|l| l.contains("val_accuracy") && l.contains(" samples in "))
        .filter_map(|l| {
            let before = l.split(" samples in ").next()?;
            before.rsplit('(').next()?.trim().parse().ok()
        })
        .collect()
}

/// Samples each node computed in `epoch` (1-based), from the per-node lines.
pub fn node_samples(lines: &Lines, epoch: u32) -> Vec<(u64, u64)> {
    lines
        .all()
        .iter()
        .filter_map(|l| {
            let rest = l.split(&format!("epoch {epoch}/")).nth(1)?;
            let rest = rest.split(" node ").nth(1)?;
            let (node, rest) = rest.split_once(": ")?;
            let samples = rest.split(' ').next()?;
            Some((node.parse().ok()?, samples.parse().ok()?))
        })
        .collect()
}

/// Runs `gradcast ARGS` to completion (within `limit`) and returns its output.
pub fn gradcast(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(out_pipe).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err_pipe).unwrap_or_default());
    let status = wait(&mut child, limit, &format!("gradcast {args:?}"));
    Output {
        status,
        stdout: out.join().unwrap().into_bytes(),
        stderr: err.join().unwrap().into_bytes(),
    }
}

/// Runs `gradcast ARGS` and fails the test unless it succeeds.
pub fn gradcast_ok(args: &[&str]) -> Output {
    let out = gradcast(args, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "gradcast {args:?} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The number on the `final val_accuracy: ` line.
pub fn final_accuracy(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("final val_accuracy: "))
        .unwrap_or_else(|| panic!("no final line in:\n{stdout}"));
    line.trim().parse().unwrap()
}

/// `gradcast coordinator` on a free port with small batches and short
/// timeouts (step 30 s, rejoin 20 s), plus `extra`.
pub fn coordinator_args<'a>(
    data: &'a str,
    nodes: &'a str,
    epochs: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
        "--nodes",
        nodes,
        "--epochs",
        epochs,
        "--batch-size",
        "8",
        "--step-timeout",
        "30",
        "--rejoin-timeout",
        "20",
    ];
    a.extend_from_slice(extra);
    a
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it:
/// `dir/ca.pem`, `dir/server.pem`, `dir/server.key`.
pub fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "gradcast test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = server.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The weights and buffers of the model `DIR/final.safetensors` was written
/// for, by name.
pub fn final_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = model::Checkpoint::load(&dir.join("final.safetensors")).unwrap();
    let kind = ckpt.model_kind().unwrap();
    let m = model::Model::new(model::ModelSpec::new(kind), 0, &model::Device::Cpu).unwrap();
    m.params()
        .chain(m.buffers())
        .map(|i| (i.name.clone(), ckpt.tensor(&i.name).unwrap().1.to_vec()))
        .collect()
}

/// The first tensor (by name) whose bits differ between `a` and `b`, if any.
pub fn first_difference<'a>(
    a: &'a [(String, Vec<f32>)],
    b: &[(String, Vec<f32>)],
) -> Option<&'a str> {
    assert_eq!(a.len(), b.len(), "different tensors");
    a.iter().zip(b).find_map(|((name, x), (other, y))| {
        assert_eq!(name, other);
        let same = x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        (!same).then_some(name.as_str())
    })
}
