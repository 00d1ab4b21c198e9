//! The choices `GRADCAST_KERNEL_PATH=measure` makes for each convolution
//! shape (the vector width, Winograd or the direct kernel, Winograd's
//! transforms, the weight gradient through them or not and its direct
//! form), and the plan file that makes them repeatable.
//!
//! A choice is timed once per process, at the shape's first use. With
//! `GRADCAST_KERNEL_PLAN=FILE` each choice also goes into FILE, one line
//! each (`winograd cin=32 cout=32 … = true`), and a choice FILE already
//! holds is read from it instead of timed. A run with the same FILE thus
//! makes the same choices as the run that wrote it, and gives the same
//! results to the bit; processes that share FILE (the nodes of one `gradcast
//! run`) make the same choices too: the first choice written for a shape is
//! every process's (FILE is locked while it is read and written). Lines
//! starting with `#` are comments.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::{Isa, Wide};

/// The environment variable naming the plan file.
pub const KERNEL_PLAN_VAR: &str = "GRADCAST_KERNEL_PLAN";

/// A choice as a plan file writes it.
pub(crate) trait Choice: Copy {
    fn name(self) -> &'static str;
    fn parse(s: &str) -> Option<Self>;
}

impl Choice for bool {
    fn name(self) -> &'static str {
        if self {
            "true"
        } else {
            "false"
        }
    }

    fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl Choice for Isa {
    fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            _ => None,
        }
    }
}

/// The shortest of three runs of `f`: how a choice times each candidate.
pub(crate) fn best_of_three(mut f: impl FnMut()) -> std::time::Duration {
    (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            f();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Checks the plan file [`KERNEL_PLAN_VAR`] names, if any, before a process
/// relies on it: it is read only with `GRADCAST_KERNEL_PATH=measure`, it
/// can be opened to read and append (it is created if missing), and every
/// line of it is a choice. The error says what is wrong, naming the file.
pub fn check_plan() -> Result<(), String> {
    let Some(path) = plan_path() else {
        return Ok(());
    };
    if crate::kernel_path() != crate::KernelPath::Measure {
        return Err(format!(
            "{KERNEL_PLAN_VAR} is set, but a plan is read only with {}=measure",
            crate::KERNEL_PATH_VAR
        ));
    }
    locked(path, |_, text| entries(text).map(|_| ()))
        .map_err(|e| format!("{KERNEL_PLAN_VAR}={}: {e}", path.display()))
}

/// The plan file [`KERNEL_PLAN_VAR`] names, if any (read once).
fn plan_path() -> Option<&'static Path> {
    static PLAN: OnceLock<Option<PathBuf>> = OnceLock::new();
    PLAN.get_or_init(|| std::env::var_os(KERNEL_PLAN_VAR).map(PathBuf::from))
        .as_deref()
}

/// `what` for shape `g`: this process's earlier choice, else the plan
/// file's (with [`KERNEL_PLAN_VAR`] set), else `time`'s (which returns the
/// choice and its timings for the profile line), kept for the process and
/// written to the plan file.
///
/// # Panics
///
/// When the plan file cannot be read or written, or holds a line for this
/// choice that is not one: a run asked to repeat choices must not quietly
/// make others.
pub(crate) fn choose<T: Choice>(
    what: &'static str,
    g: &Wide,
    time: impl FnOnce() -> (T, String),
) -> T {
    static MADE: OnceLock<Mutex<HashMap<(&'static str, Wide), &'static str>>> = OnceLock::new();
    // (A poisoned map only means another thread panicked mid-choice: its
    // entries are still whole.)
    let made = || {
        MADE.get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    if let Some(c) = made().get(&(what, *g)).and_then(|name| T::parse(name)) {
        return c;
    }
    // Unlocked meanwhile: timing one choice may need another (Winograd's
    // timing runs the direct kernel in the vectors chosen for the shape).
    // Threads that time the same shape at once both time it (through the
    // plan file, if any, one after the other).
    let choice = match plan_path() {
        Some(path) => from_plan(path, what, g, time)
            .unwrap_or_else(|e| panic!("{KERNEL_PLAN_VAR}={}: {e}", path.display())),
        None => timed(what, g, time),
    };
    // The first choice kept is every thread's.
    let kept = *made().entry((what, *g)).or_insert(choice.name());
    T::parse(kept).unwrap_or(choice)
}

fn timed<T: Choice>(what: &str, g: &Wide, time: impl FnOnce() -> (T, String)) -> T {
    let (choice, timings) = time();
    if crate::profiling() {
        eprintln!("PROF choice {what}={} ({timings}) {g:?}", choice.name());
    }
    choice
}

/// [`choose`] through the plan file at `path` (created if missing): its
/// choice if it has one, else `time`'s, written to it unless another
/// process wrote one meanwhile (then that one is taken). The file is locked
/// only to read and write, not while timing: timing one choice can need
/// another (Winograd's transformed products run the direct kernel on other
/// shapes).
fn from_plan<T: Choice>(
    path: &Path,
    what: &str,
    g: &Wide,
    time: impl FnOnce() -> (T, String),
) -> io::Result<T> {
    let key = key(what, g);
    if let Some(planned) = locked(path, |_, text| planned::<T>(text, &key, what))? {
        return Ok(planned);
    }
    let choice = timed(what, g, time);
    locked(path, |file, text| {
        if let Some(planned) = planned::<T>(text, &key, what)? {
            return Ok(planned);
        }
        // (A file whose last line has no newline gets one first.)
        let sep = if text.is_empty() || text.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        writeln!(file, "{sep}{key} = {}", choice.name())?;
        file.flush()?;
        Ok(choice)
    })
}

/// Runs `f` on the plan file and its text while holding the file's lock.
fn locked<R>(path: &Path, f: impl FnOnce(&mut File, &str) -> io::Result<R>) -> io::Result<R> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    // Released when `file` is dropped.
    file.lock()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    f(&mut file, &text)
}

/// The choice the plan's text holds for `key`, if any.
fn planned<T: Choice>(text: &str, key: &str, what: &str) -> io::Result<Option<T>> {
    lookup(text, key)?
        .map(|value| {
            T::parse(value).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("`{key}` has the value {value:?}, which is not a choice of {what}"),
                )
            })
        })
        .transpose()
}

/// A plan file's lines as `(choice and shape, value)`, in file order
/// (blank lines and `#` comments skipped); an error names the first line
/// that is not a choice.
fn entries(text: &str) -> io::Result<Vec<(&str, &str)>> {
    text.lines()
        .enumerate()
        .map(|(n, line)| (n, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| match line.split_once(" = ") {
            Some((k, v)) => Ok((k.trim(), v.trim())),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line {} is not `CHOICE SHAPE = VALUE`: {line:?}", n + 1),
            )),
        })
        .collect()
}

/// The value of `key` in a plan file's text (its first line for `key`).
fn lookup<'a>(text: &'a str, key: &str) -> io::Result<Option<&'a str>> {
    Ok(entries(text)?
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v))
}

/// A choice's name in a plan file: what is chosen, and every field of the
/// shape.
fn key(what: &str, g: &Wide) -> String {
    let Wide {
        cin,
        cout,
        s,
        wp,
        kh,
        kw,
        l,
        stride,
        sp,
        oh,
    } = *g;
    format!(
        "{what} cin={cin} cout={cout} s={s} wp={wp} kh={kh} kw={kw} l={l} stride={stride} sp={sp} oh={oh}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cin: usize) -> Wide {
        Wide {
            cin,
            cout: 32,
            s: 1168,
            wp: 34,
            kh: 3,
            kw: 3,
            l: 1088,
            stride: 1,
            sp: 0,
            oh: 32,
        }
    }

    fn temp_plan(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "gradcast-plan-{}-{name}-{}",
            std::process::id(),
            nonce()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn nonce() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    #[test]
    fn a_timed_choice_is_written_and_then_read_instead_of_timed() {
        let path = temp_plan("roundtrip");
        let (a, b) = (shape(32), shape(64));
        let chosen = from_plan(&path, "isa", &a, || (Isa::Avx2, String::new())).unwrap();
        assert_eq!(chosen, Isa::Avx2);
        let other = from_plan(&path, "winograd", &b, || (true, String::new())).unwrap();
        assert!(other);
        // Read back without timing, whatever the timing would now say.
        let again = from_plan(&path, "isa", &a, || -> (Isa, String) {
            panic!("a choice in the plan was timed again")
        });
        assert_eq!(again.unwrap(), Isa::Avx2);
        assert!(from_plan(&path, "winograd", &b, || -> (bool, String) {
            panic!("timed")
        })
        .unwrap());
        // A shape not in the plan yet is timed and added.
        assert!(!from_plan(&path, "winograd", &a, || (false, String::new())).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains(&format!("{} = avx2\n", key("isa", &a))),
            "{text}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_hand_written_plan_is_followed_and_a_bad_one_refused() {
        let path = temp_plan("hand");
        let g = shape(16);
        std::fs::write(
            &path,
            format!("# made by hand\n\n{} = false", key("winograd", &g)),
        )
        .unwrap();
        let w = from_plan(&path, "winograd", &g, || -> (bool, String) {
            panic!("timed")
        });
        assert!(!w.unwrap());
        // Appending after a last line without a newline keeps lines apart.
        assert_eq!(
            from_plan(&path, "isa", &g, || (Isa::Avx512, String::new())).unwrap(),
            Isa::Avx512
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with(&format!("= false\n{} = avx512\n", key("isa", &g))),
            "{text}"
        );

        std::fs::write(&path, format!("{} = maybe\n", key("winograd", &g))).unwrap();
        let e = from_plan(&path, "winograd", &g, || (true, String::new())).unwrap_err();
        assert!(e.to_string().contains("not a choice of winograd"), "{e}");
        std::fs::write(&path, "winograd cin=16\n").unwrap();
        let e = from_plan(&path, "winograd", &g, || (true, String::new())).unwrap_err();
        assert!(e.to_string().contains("line 1 is not"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn processes_sharing_a_plan_agree() {
        // Threads stand in for processes: each opens and locks the file
        // itself; all time at once, the first to write decides for all.
        let path = temp_plan("shared");
        let g = shape(48);
        let answers: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let path = &path;
                    s.spawn(move || {
                        // Long enough that every thread reads the empty
                        // file before the first writes.
                        from_plan(path, "winograd", &g, || {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            (i % 2 == 0, String::new())
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let _ = std::fs::remove_file(&path);
    }
}
