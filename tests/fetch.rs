//! CIFAR-10 on a fresh machine, against an HTTP server on 127.0.0.1 that
//! serves a small generated archive: a download lands in the cache with its
//! checksum checked, a cut connection is resumed with a range request, a
//! wrong checksum or a 404 leaves nothing that looks valid, and a training
//! run without --data fetches by itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use common::*;

/// What the server does with a request.
#[derive(Clone, Copy)]
enum Serve {
    /// The whole file (or the range asked for).
    Whole,
    /// Announces the whole file, sends this many bytes, closes.
    CutAfter(usize),
    /// 404.
    Missing,
}

/// A one-file HTTP/1.1 server; records the Range header of each request.
struct Server {
    url: String,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

impl Server {
    /// Serves `body`; the i-th request gets `plan[i]` (the last one after).
    fn start(body: Vec<u8>, plan: Vec<Serve>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/cifar-10-binary.tar.gz",
            listener.local_addr().unwrap()
        );
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (r, p) = (ranges.clone(), Mutex::new(plan));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let serve = {
                    let mut p = p.lock().unwrap();
                    if p.len() > 1 {
                        p.remove(0)
                    } else {
                        p[0]
                    }
                };
                let _ = handle(stream, &body, serve, &r);
            }
        });
        Server { url, ranges }
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }
}

fn handle(
    mut stream: TcpStream,
    body: &[u8],
    serve: Serve,
    ranges: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    ranges
        .lock()
        .unwrap()
        .push(range.map(|r| format!("bytes={r}-")));
    match serve {
        Serve::Missing => {
            stream.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )?;
        }
        Serve::Whole | Serve::CutAfter(_) => {
            let from = range.unwrap_or(0).min(body.len());
            let rest = &body[from..];
            let head = match range {
                Some(_) => format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {from}-{}/{}\r\nconnection: close\r\n\r\n",
                    rest.len(),
                    body.len() - 1,
                    body.len()
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    rest.len()
                ),
            };
            stream.write_all(head.as_bytes())?;
            let n = match serve {
                Serve::CutAfter(n) => n.min(rest.len()),
                _ => rest.len(),
            };
            stream.write_all(&rest[..n])?;
        }
    }
    stream.flush()?;
    // Read what is left so closing sends FIN, not RST.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs gradcast with the cache in `cache` and the mirror `url`.
fn run(args: &[&str], cache: &Path, url: &str, sha: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("GRADCAST_DATA")
        .env_remove("GRADCAST_DATA_SHA256")
        .env("GRADCAST_CACHE", cache)
        .env("GRADCAST_DATA_URL", url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = sha {
        cmd.env("GRADCAST_DATA_SHA256", s);
    }
    let child = cmd.spawn().unwrap();
    child.wait_with_output().unwrap()
}

/// A generated archive, its SHA-256, and a cache folder (not created) in
/// the same temporary folder.
struct Fixture {
    dir: tempfile::TempDir,
    body: Vec<u8>,
    sha: String,
    cache: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read(synthetic(dir.path(), 20, 10)).unwrap();
    let sha = sha256(&body);
    let cache = dir.path().join("cache");
    Fixture {
        dir,
        body,
        sha,
        cache,
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_download_is_verified_and_lands_in_the_cache() {
    let Fixture {
        dir,
        body,
        cache,
        sha,
    } = fixture();
    let server = Server::start(body.clone(), vec![Serve::Whole]);
    let out = run(&["data", "fetch"], &cache, &server.url, Some(&sha));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = cache.join("cifar-10-binary.tar.gz");
    assert_eq!(text(&out.stdout).trim(), path.display().to_string());
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert!(stderr.contains("checksum verified"), "{stderr}");
    assert_eq!(files(&cache), vec!["cifar-10-binary.tar.gz"]);
    // Once there, it is used as it is: no second request.
    let again = run(&["data", "fetch"], &cache, &server.url, Some(&sha));
    assert!(again.status.success());
    assert_eq!(server.ranges().len(), 1);
    // A mirror without a checksum is used, with a warning.
    let other = dir.path().join("other");
    let out = run(&["data", "fetch"], &other, &server.url, None);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("was not verified"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_cut_download_resumes_where_it_stopped() {
    let Fixture {
        dir: _dir,
        body,
        cache,
        sha,
    } = fixture();
    let cut = body.len() / 3;
    let server = Server::start(body.clone(), vec![Serve::CutAfter(cut), Serve::Whole]);
    let first = run(&["data", "fetch"], &cache, &server.url, Some(&sha));
    let stderr = text(&first.stderr);
    assert!(
        !first.status.success(),
        "a cut download succeeded: {stderr}"
    );
    assert!(
        stderr.contains("run the same command again to resume"),
        "{stderr}"
    );
    // Nothing that looks like the archive; the part is kept.
    assert_eq!(files(&cache), vec!["cifar-10-binary.tar.gz.part"]);
    assert_eq!(
        std::fs::metadata(cache.join("cifar-10-binary.tar.gz.part"))
            .unwrap()
            .len(),
        cut as u64
    );
    let second = run(&["data", "fetch"], &cache, &server.url, Some(&sha));
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(
        server.ranges(),
        vec![None, Some(format!("bytes={cut}-"))],
        "the second request asks for the rest only"
    );
    assert_eq!(
        std::fs::read(cache.join("cifar-10-binary.tar.gz")).unwrap(),
        body
    );
    assert_eq!(files(&cache), vec!["cifar-10-binary.tar.gz"]);
}

#[test]
fn a_wrong_checksum_or_a_404_leaves_nothing_that_looks_valid() {
    let Fixture {
        dir: _dir,
        body,
        cache,
        sha: _,
    } = fixture();
    let server = Server::start(body.clone(), vec![Serve::Whole]);
    let wrong = sha256(b"something else");
    let out = run(&["data", "fetch"], &cache, &server.url, Some(&wrong));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not have the expected SHA-256"),
        "{stderr}"
    );
    assert!(files(&cache).is_empty(), "{:?}", files(&cache));

    let missing = Server::start(body, vec![Serve::Missing]);
    let out = run(&["data", "fetch"], &cache, &missing.url, None);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("404"), "{stderr}");
    assert!(stderr.contains("pass --data PATH"), "{stderr}");
    assert!(files(&cache).is_empty(), "{:?}", files(&cache));
}

/// The README's first command on a fresh machine: no --data at all.
#[test]
fn a_run_without_data_fetches_it_first() {
    let Fixture {
        dir: _dir,
        body,
        cache,
        sha,
    } = fixture();
    let server = Server::start(body.clone(), vec![Serve::Whole]);
    let args = [
        "run",
        "--nodes",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--progress",
        "plain",
    ];
    let out = run(&args, &cache, &server.url, Some(&sha));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("epoch 1/1"), "{stderr}");
    assert_eq!(server.ranges().len(), 1, "downloaded once, by `run`");
    assert_eq!(
        std::fs::read(cache.join("cifar-10-binary.tar.gz")).unwrap(),
        body
    );
}
