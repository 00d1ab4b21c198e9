//! CIFAR-10 on a fresh machine: the user's cache, and a resumable, verified
//! download of the official archive into it.
//!
//! The archive is written to `NAME.part` and renamed into place only once
//! its checksum matched, so a killed download never leaves a file that later
//! looks valid; rerunning resumes the `.part` with an HTTP range request.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// Where the dataset's authors publish the binary version.
pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// SHA-256 of the official archive (170,052,171 bytes; its published MD5 is
/// c32a1d4ab5d03f1284b67883e8d87530).
pub const OFFICIAL_SHA256: &str =
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";
/// The archive's name in the cache.
pub const ARCHIVE: &str = "cifar-10-binary.tar.gz";

/// Where to get the archive, and what it must hash to.
#[derive(Debug, Clone)]
pub struct Source {
    pub url: String,
    /// Expected SHA-256 (lowercase hex); None: not verified.
    pub sha256: Option<String>,
}

impl Source {
    /// The official archive, or a mirror (`--data-url`) with the checksum
    /// given for it (`--data-sha256`; a mirror without one is not verified).
    pub fn new(url: Option<String>, sha256: Option<String>) -> Self {
        let official = url.as_deref().is_none_or(|u| u == OFFICIAL_URL);
        Self {
            url: url.unwrap_or_else(|| OFFICIAL_URL.to_string()),
            sha256: sha256
                .map(|s| s.trim().to_ascii_lowercase())
                .or_else(|| official.then(|| OFFICIAL_SHA256.to_string())),
        }
    }
}

/// The cache folder: `$GRADCAST_CACHE`, else `$XDG_CACHE_HOME/gradcast`,
/// else `~/.cache/gradcast`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("GRADCAST_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("gradcast"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("gradcast")),
        None => bail!("no cache folder: set GRADCAST_CACHE (or HOME), or pass --data PATH"),
    }
}

/// The archive in `cache`, downloaded from `source` first if it is not
/// there yet.
pub fn ensure(cache: &Path, source: &Source) -> Result<PathBuf> {
    let path = cache.join(ARCHIVE);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(cache)
        .with_context(|| format!("cannot create the cache folder {}", cache.display()))?;
    let part = cache.join(format!("{ARCHIVE}.part"));
    info!(
        "downloading CIFAR-10 from {} to {}",
        source.url,
        path.display()
    );
    download(&source.url, &part).map_err(|e| {
        e.context(format!(
            "no CIFAR-10 archive at {}. Without internet: download {OFFICIAL_URL} on a machine \
             that has it and pass --data PATH (or copy it to that path)",
            path.display()
        ))
    })?;
    match &source.sha256 {
        Some(expected) => {
            let got = sha256_file(&part)?;
            if &got != expected {
                // A wrong file must not be resumed either.
                let _ = fs::remove_file(&part);
                bail!(
                    "{} does not have the expected SHA-256: expected {expected}, got {got}; \
                     the download was removed (check --data-url / --data-sha256, or try again)",
                    source.url
                );
            }
            info!("checksum verified (SHA-256 {got})");
        }
        None => warn!(
            "{} was not verified: pass --data-sha256 HEX for a mirror to check it",
            source.url
        ),
    }
    fs::rename(&part, &path)
        .with_context(|| format!("cannot move {} into place", part.display()))?;
    info!("CIFAR-10 is at {}", path.display());
    Ok(path)
}

/// Downloads `url` into `part`, continuing from what `part` already holds.
fn download(url: &str, part: &Path) -> Result<()> {
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(None)
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request
        .call()
        .with_context(|| format!("cannot download {url}"))?;
    let status = response.status().as_u16();
    let (mut file, start) = match status {
        206 if have > 0 => {
            info!("resuming after {have} bytes");
            let file = OpenOptions::new().append(true).open(part)?;
            (file, have)
        }
        200 => (File::create(part)?, 0),
        // What we have already covers the whole file: let the checksum say.
        416 if have > 0 => return Ok(()),
        404 => bail!("{url}: 404 Not Found"),
        other => bail!("{url}: the server answered HTTP {other}"),
    };
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + start);
    let bar = crate::progress_bar::download(total, start);
    let mut body = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                file.flush()?;
                bar.abandon();
                bail!(
                    "download interrupted after {done} bytes ({e}); they are kept in {}: run \
                     the same command again to resume",
                    part.display()
                );
            }
        };
        file.write_all(&buf[..n])?;
        done += n as u64;
        bar.set_position(done);
    }
    file.sync_all()?;
    bar.finish_and_clear();
    if let Some(total) = total.filter(|&t| t != done) {
        bail!(
            "the download stopped at {done} of {total} bytes; they are kept in {}: run the \
             same command again to resume",
            part.display()
        );
    }
    Ok(())
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_official_archive_is_verified_and_a_mirror_only_when_told() {
        let official = Source::new(None, None);
        assert_eq!(official.url, OFFICIAL_URL);
        assert_eq!(official.sha256.as_deref(), Some(OFFICIAL_SHA256));
        let mirror = Source::new(Some("http://mirror/c.tgz".into()), None);
        assert_eq!(mirror.sha256, None);
        let told = Source::new(Some("http://mirror/c.tgz".into()), Some(" ABC ".into()));
        assert_eq!(told.sha256.as_deref(), Some("abc"));
    }

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
