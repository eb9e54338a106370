//! Who may run a VM beside whom on one machine.
//!
//! Several VMs may run at once (the launcher, CI jobs, test processes):
//! everything one VM uses is its own (a fresh work dir for the emulated
//! host's initramfs and serial sockets, its own API socket; no network,
//! ports or tap devices), and the caches under `.cache` and `target/static`
//! are shared under their own `flock`s and atomic renames (`resources`).
//! Three locks remain, each for one reason:
//!
//! - [`SocketLock`]: one VM per API socket. `<socket>.lock` beside the
//!   socket, held for the VM's whole life (a retried boot included); a
//!   second VM on the same socket is refused at once, naming the holder.
//! - [`HostSlot`]: at most [`max_emulated_hosts`] emulated hosts at once
//!   (each is a whole outer QEMU of up to [`crate::emulated::QemuConfig`]'s
//!   3 GiB): a launch beyond that waits for a slot, and says so.
//! - [`SuiteLock`]: the test suite's own serialisation, one VM at a time
//!   machine-wide on 2 cores (`/tmp/e2e-host.lock`), taken only when
//!   [`crate::VmSpec::suite_lock`] says so: by default for the library's
//!   callers (the tests), never for the launcher. `E2E_SUITE_LOCK=0` turns
//!   it off (tests in parallel), `E2E_SUITE_LOCK=1` on (the launcher too).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// The test suite's machine-wide lock file.
pub const SUITE_LOCK_PATH: &str = "/tmp/e2e-host.lock";
/// `E2E_SUITE_LOCK=0|1`: whether VMs take [`SuiteLock`].
pub const SUITE_LOCK_ENV: &str = "E2E_SUITE_LOCK";
/// `E2E_MAX_EMULATED_HOSTS=N`: the cap on emulated hosts at once (0: none).
pub const MAX_HOSTS_ENV: &str = "E2E_MAX_EMULATED_HOSTS";
/// Longest wait for the suite lock or a host slot.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// What one emulated host may take at most: its QEMU's `-m` (3 GiB) plus
/// QEMU's own (TCG translation cache, about 0.3 GiB), rounded up.
pub const HOST_MEMORY_BOUND: u64 = 7 << 29; // 3.5 GiB
/// Memory left to the machine itself when counting host slots.
pub const MACHINE_RESERVE: u64 = 2 << 30;

/// Whether VMs take the suite lock: `E2E_SUITE_LOCK` if it is `0` or `1`,
/// else `default`.
pub fn suite_lock_from_env(default: bool) -> bool {
    match std::env::var(SUITE_LOCK_ENV).as_deref() {
        Ok("0") | Ok("false") => false,
        Ok("1") | Ok("true") => true,
        _ => default,
    }
}

/// `pid N <command line>`, written into a held lock file for the next
/// one's message.
fn holder_line() -> String {
    let me = std::env::args().collect::<Vec<_>>().join(" ");
    format!("pid {} {me}", std::process::id())
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

fn write_holder(file: &mut File) {
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", holder_line());
}

fn read_holder(file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut holder);
    // Another process wrote it: one line, no control characters.
    holder.trim().escape_debug().to_string()
}

/// The lock file of the API socket `socket`: `<socket>.lock`.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    socket.with_file_name(name)
}

/// One VM per API socket: see the module docs. Removed (while held) on drop.
#[derive(Debug)]
pub struct SocketLock {
    file: File,
    path: PathBuf,
}

impl SocketLock {
    /// Takes the lock of `socket` or fails at once if another VM has it.
    pub fn acquire(socket: &Path) -> Result<Self> {
        let path = socket_lock_path(socket);
        loop {
            let mut file =
                open_lock_file(&path).ctx(|| format!("cannot open {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::InUse(format!(
                        "the API socket {} belongs to another running VM ({}); \
                         give this one another --api-socket",
                        socket.display(),
                        read_holder(&mut file)
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e))
                }
            }
            // The previous holder removes the file while it holds it: a
            // lock on a removed file is no lock; open the new one.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                write_holder(&mut file);
                return Ok(SocketLock { file, path });
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        // Removed while still held, so nobody locks a file about to vanish.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Waits (at most [`LOCK_TIMEOUT`]) for `try_take` to succeed, saying once
/// what it waits for.
fn wait_for<T>(what: &str, mut try_take: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut said = false;
    loop {
        if let Some(t) = try_take()? {
            return Ok(t);
        }
        if !said {
            eprintln!("e2e: waiting up to {LOCK_TIMEOUT:?} for {what}");
            said = true;
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout: LOCK_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The test suite's machine-wide lock (see the module docs).
#[derive(Debug)]
pub struct SuiteLock {
    _file: File,
}

impl SuiteLock {
    /// Takes [`SUITE_LOCK_PATH`], waiting for the VM of another test.
    pub fn acquire() -> Result<Self> {
        let path = Path::new(SUITE_LOCK_PATH);
        // Another user's file: still lockable through a read-only open.
        let mut file = open_lock_file(path)
            .or_else(|_| File::open(path))
            .ctx(|| format!("cannot open {SUITE_LOCK_PATH}"))?;
        let holder = read_holder(&mut file);
        let what = format!("the test VM of another process ({SUITE_LOCK_PATH}: {holder})");
        wait_for(&what, || match file.try_lock() {
            Ok(()) => Ok(Some(())),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(Error::io(format!("cannot lock {SUITE_LOCK_PATH}"), e))
            }
        })?;
        write_holder(&mut file);
        Ok(SuiteLock { _file: file })
    }
}

/// How many emulated hosts may run at once: `E2E_MAX_EMULATED_HOSTS`
/// (0: no cap), else what this machine's memory holds at
/// [`HOST_MEMORY_BOUND`] each after [`MACHINE_RESERVE`] (at least 1).
pub fn max_emulated_hosts() -> Option<u32> {
    if let Some(n) = std::env::var(MAX_HOSTS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        return (n > 0).then_some(n);
    }
    Some(hosts_for_memory(mem_total().unwrap_or(0)))
}

/// Emulated hosts that fit in `mem_total` bytes.
pub fn hosts_for_memory(mem_total: u64) -> u32 {
    let n = mem_total.saturating_sub(MACHINE_RESERVE) / HOST_MEMORY_BOUND;
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// One of [`max_emulated_hosts`] slots (per user: files under the
/// temporary directory), held while an emulated host runs.
#[derive(Debug)]
pub struct HostSlot {
    _file: File,
    /// Which slot.
    pub index: u32,
}

impl HostSlot {
    /// Takes a free slot, waiting while all `cap` are held; `None` cap: no
    /// slot needed.
    pub fn acquire(cap: Option<u32>) -> Result<Option<Self>> {
        let Some(cap) = cap else { return Ok(None) };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let dir = std::env::temp_dir().join(format!("e2e-host-slots-{uid}"));
        std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
        let what = format!(
            "one of the {cap} emulated-host slots ({MAX_HOSTS_ENV}; {} holds them)",
            dir.display()
        );
        wait_for(&what, || {
            for index in 0..cap {
                let path = dir.join(format!("slot-{index}.lock"));
                let mut file =
                    open_lock_file(&path).ctx(|| format!("cannot open {}", path.display()))?;
                if file.try_lock().is_ok() {
                    write_holder(&mut file);
                    return Ok(Some(Some(HostSlot { _file: file, index })));
                }
            }
            Ok(None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("e2e-locks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn one_vm_per_socket_and_distinct_sockets_side_by_side() {
        let d = dir("socket");
        let a = d.join("a.sock");
        let first = SocketLock::acquire(&a).unwrap();
        assert_eq!(first.path(), d.join("a.sock.lock"));
        let err = SocketLock::acquire(&a).unwrap_err();
        assert!(matches!(err, Error::InUse(_)), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // Another socket is another VM's.
        let other = SocketLock::acquire(&d.join("b.sock")).unwrap();
        drop(first);
        assert!(!d.join("a.sock.lock").exists(), "lock file left behind");
        let again = SocketLock::acquire(&a).unwrap();
        drop((again, other));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn memory_bounds_the_emulated_hosts() {
        // This machine: 24 GiB.
        assert_eq!(hosts_for_memory(24 << 30), 6);
        assert_eq!(hosts_for_memory(4 << 30), 1);
        assert_eq!(hosts_for_memory(0), 1);
        assert_eq!(hosts_for_memory(128 << 30), 36);
    }

    #[test]
    fn socket_lock_path_is_beside_the_socket() {
        assert_eq!(
            socket_lock_path(Path::new("/run/vmm/vmm.sock")),
            Path::new("/run/vmm/vmm.sock.lock")
        );
    }
}
