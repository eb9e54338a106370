//! Cache plumbing: atomic writes, file fingerprints, stamp files and
//! inter-process locks.
//!
//! Every artifact is written to a temporary name in its final directory
//! and renamed into place, so an interrupted run leaves either the old file
//! or the new one, never half of one. A stamp file, written last, records
//! what an artifact was made from; an artifact is reused only if its stamp
//! matches the current inputs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique temporary path next to `path` (same directory, so a rename is
/// atomic), hidden and tagged with the process id.
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "tmp".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes a file atomically: `fill` writes into a temporary file that is
/// synced and renamed over `path` only if `fill` succeeds.
pub fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut writer = io::BufWriter::new(&file);
        fill(&mut writer)?;
        writer.flush()?;
        drop(writer);
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomically replaces `path` with `data`, preserving a given mode.
pub fn atomic_write_bytes(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    atomic_write(path, |w| {
        w.write_all(data)?;
        w.get_ref()
            .set_permissions(fs::Permissions::from_mode(mode))
    })
}

/// A cheap identity of a file's current contents: size and modification
/// time in nanoseconds. Any rewrite changes it in practice.
pub fn fingerprint(path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    Ok(format!(
        "{}:{}.{:09}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// A stamp: ordered `key=value` lines describing how an artifact was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp(BTreeMap<String, String>);

impl Stamp {
    /// An empty stamp.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` (builder style).
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Parses stamp text; lines without `=` are ignored.
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// Reads a stamp file; `None` if absent or unreadable.
    pub fn read(path: &Path) -> Option<Self> {
        fs::read_to_string(path).ok().map(|t| Self::parse(&t))
    }

    /// Writes the stamp atomically.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text: String = self.0.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        atomic_write(path, |w| w.write_all(text.as_bytes()))
    }

    /// True if `key` is recorded with the current fingerprint of `path`.
    pub fn matches_file(&self, key: &str, path: &Path) -> bool {
        match (self.get(key), fingerprint(path)) {
            (Some(recorded), Ok(current)) => recorded == current,
            _ => false,
        }
    }
}

/// An exclusive `flock` on a lock file, released on drop. Serialises cache
/// updates between processes (and between threads: each lock opens its own
/// file description).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Takes an exclusive lock on `file`, waiting as long as it is held.
fn flock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps
        // open for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl Lock {
    /// Locks `path` (created if needed), waiting for other holders.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        flock_exclusive(&file)?;
        Ok(Self { _file: file })
    }
}

/// A fresh, empty scratch directory inside `parent`, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `parent/.<tag>.tmp-<pid>-<n>`.
    pub fn new(parent: &Path, tag: &str) -> io::Result<Self> {
        let path = temp_path(&parent.join(tag));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn test_dir(tag: &str) -> ScratchDir {
        ScratchDir::new(&std::env::temp_dir(), &format!("resources-test-{tag}")).unwrap()
    }

    #[test]
    fn atomic_write_replaces_or_leaves_old() {
        let dir = test_dir("atomic");
        let p = dir.path().join("f");
        atomic_write_bytes(&p, b"one", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        let err = atomic_write(&p, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("interrupted"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"one");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp file left behind");
    }

    #[test]
    fn stamp_round_trip_and_fingerprints() {
        let dir = test_dir("stamp");
        let f = dir.path().join("artifact");
        fs::write(&f, b"abc").unwrap();
        let stamp = Stamp::new()
            .with("artifact", fingerprint(&f).unwrap())
            .with("v", "1");
        let sp = dir.path().join("stamp");
        stamp.write(&sp).unwrap();
        let back = Stamp::read(&sp).unwrap();
        assert_eq!(back, stamp);
        assert!(back.matches_file("artifact", &f));
        fs::write(&f, b"abcd").unwrap();
        assert!(!back.matches_file("artifact", &f));
        assert!(!back.matches_file("missing", &f));
        assert_eq!(Stamp::parse("a=b=c\njunk\n").get("a"), Some("b=c"));
    }

    #[test]
    fn lock_is_exclusive_between_descriptions() {
        let dir = test_dir("lock");
        let p = dir.path().join("lock");
        let first = Lock::acquire(&p).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            let _second = Lock::acquire(&p2).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
