//! Shared-memory segments: the data plane between a coordinator and the nodes
//! on its own host.
//!
//! A segment is a file on a tmpfs (`/dev/shm` by default) mapped by both
//! processes. It starts with a 64-byte header and then holds `len` f32 values
//! in native byte order (both ends run on the same machine):
//!
//! | bytes  | field                                                        |
//! |--------|--------------------------------------------------------------|
//! | 0..8   | magic `gcshm\0\x01\0` (layout version 1)                     |
//! | 8..16  | version of the values (the step), [`WRITING`] or [`EMPTY`]   |
//! | 16..24 | `len`, the number of f32 values                              |
//! | 24..40 | proof: 16 random bytes a node echoes to show it mapped it    |
//!
//! The version word is a seqlock: a writer sets it to [`WRITING`], writes the
//! values and then stores the new version with release ordering; a reader
//! checks that it holds the version it expects before and after copying the
//! values out. Each segment has a single writer (the coordinator for the
//! weights, one node for its gradients), and the protocol never has a reader
//! and a writer on the same segment at once, so a failed check means a broken
//! or hostile peer, never a race to retry. Readers copy the values into
//! private memory before they trust them.
//!
//! The coordinator creates every segment (`create`, with its pages reserved
//! up front so a full tmpfs is an error at creation, not a `SIGBUS` later) and
//! removes it when dropped; segment names carry the creating process id, so
//! [`remove_stale`] can clean up after a coordinator that was killed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::MmapRaw;
use thiserror::Error;

/// Marks the header of a segment (layout version 1).
const MAGIC: u64 = u64::from_le_bytes(*b"gcshm\0\x01\0");
/// Bytes before the values.
const HEADER: usize = 64;
/// Version word while a writer is changing the values.
pub const WRITING: u64 = u64::MAX;
/// Version word of a segment that was never written.
pub const EMPTY: u64 = u64::MAX - 1;
/// Prefix of every segment file name.
const PREFIX: &str = "gradcast-";

/// Why a segment could not be used.
#[derive(Debug, Error)]
pub enum ShmError {
    /// Creating, opening or mapping the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The segment's file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is not a segment of the expected layout and size.
    #[error("{path}: not a gradcast segment of {len} values")]
    Layout {
        /// The segment's file.
        path: PathBuf,
        /// Values expected.
        len: usize,
    },
    /// The segment does not hold the version a reader expects.
    #[error("shared segment holds version {found}, expected {expected}")]
    Version {
        /// Version wanted.
        expected: u64,
        /// Version found (or [`WRITING`] / [`EMPTY`]).
        found: u64,
    },
    /// A write or read does not fit the segment.
    #[error("{got} values do not fit a segment of {len}")]
    Size {
        /// Values given.
        got: usize,
        /// Values the segment holds.
        len: usize,
    },
}

/// One mapped segment.
pub struct Segment {
    map: MmapRaw,
    path: PathBuf,
    len: usize,
    /// Whether dropping it removes the file (the creator's copy).
    owner: bool,
}

// The mapping is plain memory shared with other processes; every access goes
// through raw pointers and the version protocol above, never through Rust
// references that another thread could invalidate.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("owner", &self.owner)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ShmError + '_ {
    move |source| ShmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A segment file name for process `pid`: `gradcast-<pid>-<tag>-<what>`.
pub fn segment_name(tag: &str, what: &str) -> String {
    format!("{PREFIX}{}-{tag}-{what}", std::process::id())
}

impl Segment {
    /// Creates `dir/name` (which must not exist) for `len` values, readable
    /// and writable by this user only, with all its pages reserved, and
    /// stores `proof` in its header. The file is removed when the returned
    /// segment is dropped.
    pub fn create(dir: &Path, name: &str, len: usize, proof: [u8; 16]) -> Result<Self, ShmError> {
        let path = dir.join(name);
        let bytes = HEADER + len * 4;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // From here on the file exists: remove it again if anything fails.
        let segment = (|| {
            reserve(&file, bytes).map_err(io_err(&path))?;
            let map = MmapRaw::map_raw(&file).map_err(io_err(&path))?;
            Ok::<_, ShmError>(map)
        })();
        let map = match segment {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let segment = Self {
            map,
            path,
            len,
            owner: true,
        };
        // SAFETY: the mapping is at least HEADER bytes long and page-aligned;
        // nobody else knows the file yet.
        unsafe {
            let p = segment.map.as_mut_ptr();
            (p as *mut u64).write(MAGIC);
            (p.add(16) as *mut u64).write(len as u64);
            std::ptr::copy_nonoverlapping(proof.as_ptr(), p.add(24), 16);
        }
        segment.word().store(EMPTY, Ordering::Release);
        Ok(segment)
    }

    /// Maps an existing segment of `len` values made by another process.
    /// Dropping it leaves the file alone.
    pub fn open(path: &Path, len: usize) -> Result<Self, ShmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        let layout = || ShmError::Layout {
            path: path.to_path_buf(),
            len,
        };
        if size != (HEADER + len * 4) as u64 {
            return Err(layout());
        }
        let map = MmapRaw::map_raw(&file).map_err(io_err(path))?;
        if map.len() != HEADER + len * 4 {
            return Err(layout());
        }
        let segment = Self {
            map,
            path: path.to_path_buf(),
            len,
            owner: false,
        };
        // SAFETY: the mapping holds at least HEADER bytes (checked above).
        let (magic, stored_len) = unsafe {
            let p = segment.map.as_ptr();
            (
                (p as *const u64).read_volatile(),
                (p.add(16) as *const u64).read_volatile(),
            )
        };
        if magic != MAGIC || stored_len != len as u64 {
            return Err(layout());
        }
        Ok(segment)
    }

    /// The segment's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of f32 values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The proof stored at creation.
    pub fn proof(&self) -> [u8; 16] {
        let mut proof = [0u8; 16];
        // SAFETY: the header is 64 bytes; bytes 24..40 are the proof.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(24), proof.as_mut_ptr(), 16) };
        proof
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: bytes 8..16 of a page-aligned mapping, aligned for u64 and
        // only ever accessed atomically.
        unsafe { &*(self.map.as_ptr().add(8) as *const AtomicU64) }
    }

    fn values(&self) -> *mut f32 {
        // SAFETY: HEADER is within the mapping and a multiple of 4.
        unsafe { self.map.as_mut_ptr().add(HEADER) as *mut f32 }
    }

    /// The version its values belong to ([`WRITING`], [`EMPTY`] or a step).
    pub fn version(&self) -> u64 {
        self.word().load(Ordering::Acquire)
    }

    /// Writes `parts` one after the other from the start and then marks the
    /// values as `version`.
    pub fn write(&self, version: u64, parts: &[&[f32]]) -> Result<(), ShmError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > self.len {
            return Err(ShmError::Size {
                got: total,
                len: self.len,
            });
        }
        self.word().store(WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut at = 0;
        for part in parts {
            // SAFETY: at + part.len() <= len (checked above); the destination
            // is shared memory that `part`, a private slice, cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), self.values().add(at), part.len())
            };
            at += part.len();
        }
        self.word().store(version, Ordering::Release);
        Ok(())
    }

    /// Lets `f` write the values in place and then marks them as `version`
    /// (for a writer that produces them block by block, e.g. on several
    /// threads, instead of copying them from one buffer).
    pub fn write_with<R>(&self, version: u64, f: impl FnOnce(&mut [f32]) -> R) -> R {
        self.word().store(WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        // SAFETY: `len` f32s inside the mapping. This process is the
        // segment's single writer and readers only read it, so no other
        // reference to these values exists in this process.
        let out = f(unsafe { std::slice::from_raw_parts_mut(self.values(), self.len) });
        self.word().store(version, Ordering::Release);
        out
    }

    /// A view of the values in place, provided the segment holds `version`.
    /// Call [`View::finish`] after reading to learn whether the values held
    /// still: only then were they whole.
    pub fn view(&self, version: u64) -> Result<View<'_>, ShmError> {
        self.expect(version)?;
        Ok(View {
            segment: self,
            version,
        })
    }

    /// Runs `f` on the values in place, provided the segment holds `version`
    /// before and after. `f` must copy what it keeps: the values are only
    /// known to be whole once this returns `Ok`.
    pub fn with_values<R>(&self, version: u64, f: impl FnOnce(&[f32]) -> R) -> Result<R, ShmError> {
        let view = self.view(version)?;
        let out = f(view.values());
        view.finish()?;
        Ok(out)
    }

    fn expect(&self, version: u64) -> Result<(), ShmError> {
        match self.version() {
            v if v == version => Ok(()),
            found => Err(ShmError::Version {
                expected: version,
                found,
            }),
        }
    }
}

/// The values of a segment read in place (see [`Segment::view`]).
pub struct View<'a> {
    segment: &'a Segment,
    version: u64,
}

impl View<'_> {
    /// The values. Another process may change them under the reader (only a
    /// broken or hostile one, see the module docs): use them only in ways
    /// that stay safe for any values, and trust the result only after
    /// [`View::finish`].
    pub fn values(&self) -> &[f32] {
        // SAFETY: `len` f32s inside the mapping, alive as long as `segment`.
        unsafe { std::slice::from_raw_parts(self.segment.values(), self.segment.len) }
    }

    /// Whether the segment still holds the version the view was made for.
    pub fn finish(self) -> Result<(), ShmError> {
        fence(Ordering::Acquire);
        self.segment.expect(self.version)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reserves `bytes` of the file's backing store, so that running out of
/// tmpfs space fails here rather than as a `SIGBUS` on first touch.
fn reserve(file: &File, bytes: usize) -> io::Result<()> {
    file.set_len(bytes as u64)?;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system call on an open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file.as_raw_fd();
    Ok(())
}

/// Removes the segments in `dir` left by gradcast processes that no longer
/// run (a coordinator killed before it could clean up). Returns how many
/// files were removed.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// 16 bytes from the operating system's random source.
pub fn random_bytes() -> io::Result<[u8; 16]> {
    let mut out = [0u8; 16];
    getrandom::fill(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_checks() {
        let dir = tempfile::tempdir().unwrap();
        let proof = [7u8; 16];
        let a = Segment::create(dir.path(), &segment_name("t", "w"), 6, proof).unwrap();
        assert_eq!(a.version(), EMPTY);
        let b = Segment::open(a.path(), 6).unwrap();
        assert_eq!(b.proof(), proof);
        a.write(3, &[&[1.0, 2.0], &[3.0, 4.0, 5.0, 6.0]]).unwrap();
        let got = b.with_values(3, |v| v.to_vec()).unwrap();
        assert_eq!(got, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(b.with_values(3, |v| v.iter().sum::<f32>()).unwrap(), 21.0);
        assert_eq!(a.write_with(8, |v| v.len()), 6);
        assert_eq!(b.version(), 8);
        a.write(3, &[&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]).unwrap();
        let view = b.view(3).unwrap();
        assert_eq!(view.values()[5], 6.0);
        assert!(view.finish().is_ok());
        let view = b.view(3).unwrap();
        a.write(9, &[&[0.0]]).unwrap();
        assert!(matches!(
            view.finish(),
            Err(ShmError::Version {
                expected: 3,
                found: 9
            })
        ));
        a.write(3, &[&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]).unwrap();
        assert!(matches!(
            b.with_values(4, |_| ()),
            Err(ShmError::Version {
                expected: 4,
                found: 3
            })
        ));
        assert!(matches!(
            a.write(4, &[&[0.0; 7]]),
            Err(ShmError::Size { got: 7, len: 6 })
        ));
        // The wrong size or a file that is no segment is refused.
        assert!(matches!(
            Segment::open(a.path(), 5),
            Err(ShmError::Layout { .. })
        ));
        let other = dir.path().join("plain");
        std::fs::write(&other, vec![0u8; HEADER + 24]).unwrap();
        assert!(matches!(
            Segment::open(&other, 6),
            Err(ShmError::Layout { .. })
        ));
        // Dropping the creator's copy removes the file; the reader's does not.
        let path = a.path().to_path_buf();
        drop(b);
        assert!(path.exists());
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn create_refuses_an_existing_name() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Segment::create(dir.path(), "gradcast-1-x-y", 1, [0; 16]).unwrap();
        assert!(matches!(
            Segment::create(dir.path(), "gradcast-1-x-y", 1, [0; 16]),
            Err(ShmError::Io { .. })
        ));
    }

    #[test]
    fn stale_segments_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum (4194304) never runs.
        let dead = dir.path().join("gradcast-4999999-abc-weights");
        std::fs::write(&dead, b"x").unwrap();
        let ours = Segment::create(dir.path(), &segment_name("t", "w"), 1, [0; 16]).unwrap();
        let unrelated = dir.path().join("other-4999999");
        std::fs::write(&unrelated, b"x").unwrap();
        assert_eq!(remove_stale(dir.path()), 1);
        assert!(!dead.exists());
        assert!(ours.path().exists());
        assert!(unrelated.exists());
    }
}
