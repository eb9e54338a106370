//! PID 1 duties: mount the kernel file systems, take signals through a
//! signalfd, reap orphans, and power the machine off with a last word on
//! the console.
//!
//! Run as any other PID (by hand, in tests) nothing is mounted and "power
//! off" just ends the process, so the agent can be exercised on a host.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use thiserror::Error;

use crate::console;
use crate::last_words;

/// Why the file systems could not be mounted.
#[derive(Debug, Error)]
#[error("cannot mount {fstype} on {target}")]
pub struct MountError {
    /// File system type.
    pub fstype: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// True if this process is the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all four pointers are NUL-terminated strings that outlive the
    // call; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts `/proc`, `/sys` and a devtmpfs on `/dev`. Already mounted file
/// systems (EBUSY) are fine.
pub fn mount_filesystems() -> Result<(), MountError> {
    const NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&'static str, &'static str, libc::c_ulong, &str); 3] = [
        ("proc", "/proc", NODEV_NOEXEC, ""),
        ("sysfs", "/sys", NODEV_NOEXEC, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
    ];
    for (fstype, target, flags, data) in mounts {
        let result = std::fs::create_dir_all(Path::new(target))
            .and_then(|()| mount(fstype, target, fstype, flags, data));
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(MountError {
                    fstype,
                    target,
                    source,
                })
            }
        }
    }
    Ok(())
}

fn sync() {
    // SAFETY: sync() has no arguments and cannot fail.
    unsafe { libc::sync() }
}

fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: reboot() takes no pointers; it returns only on failure.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Prints `GUEST-POWEROFF <reason>` and powers the machine off (PID 1), or
/// exits the process (any other PID; status 0 for a requested stop, as the
/// caller decides with `ok`).
pub fn power_off(reason: &str, ok: bool) -> ! {
    console::say(&format!("GUEST-POWEROFF {reason}"));
    if !is_pid1() {
        std::process::exit(if ok { 0 } else { 1 });
    }
    sync();
    let err = reboot(libc::RB_POWER_OFF);
    console::say(&format!("GUEST-FATAL poweroff failed: {err}"));
    // Without power-off support, halt; as a last resort let init exit,
    // which panics the kernel (panic=-1 then resets the machine).
    let _ = reboot(libc::RB_HALT_SYSTEM);
    std::process::exit(1)
}

/// Turns a Rust panic in any thread into the agent's last message to the
/// VMM (`fatal`, see [`last_words`]) and, in PID 1, a power-off instead
/// of a kernel panic ("Attempted to kill init"), after the usual console
/// report. With `exit`, any other process ends with status 101 (a panic
/// in a worker thread would otherwise leave a service half working, where
/// its manager can restart it whole).
pub fn install_panic_hook(exit: bool) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        last_words::send(&panic_text(info));
        if is_pid1() {
            power_off("reason=panic", false);
        }
        if exit {
            std::process::exit(101);
        }
    }));
}

/// `panic: <message> at <file>:<line>:<column>`.
fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    let msg = info.payload_as_str().unwrap_or("(no message)");
    match info.location() {
        Some(l) => format!("panic: {msg} at {}:{}:{}", l.file(), l.line(), l.column()),
        None => format!("panic: {msg}"),
    }
}

/// Reaps every exited child without blocking; returns each one's pid and
/// wait status (the workload's is reported to the VMM).
pub fn reap_children() -> Vec<(libc::pid_t, libc::c_int)> {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: status is a live c_int the kernel writes to.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        reaped.push((pid, status));
    }
}

/// Signals the agent handles.
pub const HANDLED: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR2,
    libc::SIGPWR,
];

/// A signal taken from the signalfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A child exited: reap.
    Child,
    /// A request to stop (SIGTERM, SIGINT, SIGUSR2 or SIGPWR): power off.
    Stop(libc::c_int),
}

/// The handled signals, blocked and delivered through a signalfd (which
/// also works for PID 1: blocked signals are queued even for init).
#[derive(Debug)]
pub struct Signals {
    fd: OwnedFd,
}

fn handled_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    for sig in HANDLED {
        // SAFETY: set is an initialised sigset_t and sig a valid signal.
        unsafe { libc::sigaddset(&raw mut set, sig) };
    }
    set
}

fn block_signals(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: set points to an initialised sigset_t; the old mask is not
    // requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn new_signalfd(set: &libc::sigset_t) -> io::Result<OwnedFd> {
    // SAFETY: set points to an initialised sigset_t; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_siginfo(fd: BorrowedFd<'_>) -> io::Result<Option<libc::signalfd_siginfo>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
    let size = size_of::<libc::signalfd_siginfo>();
    // SAFETY: info is valid for writes of `size` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    if n.unsigned_abs() != size {
        return Ok(None);
    }
    // SAFETY: the kernel filled the whole structure (n == size), and it was
    // zero-initialised before anyway.
    Ok(Some(unsafe { info.assume_init() }))
}

impl Signals {
    /// Blocks the handled signals in this thread (call before starting any
    /// other thread, so they inherit the mask) and opens the signalfd.
    pub fn new() -> io::Result<Self> {
        let set = handled_set();
        block_signals(&set)?;
        Ok(Self {
            fd: new_signalfd(&set)?,
        })
    }

    /// Drains pending signals without blocking.
    pub fn read(&self) -> io::Result<Vec<Signal>> {
        let mut out = Vec::new();
        while let Some(info) = read_siginfo(self.fd.as_fd())? {
            let signo = libc::c_int::try_from(info.ssi_signo).unwrap_or(0);
            out.push(if signo == libc::SIGCHLD {
                Signal::Child
            } else {
                Signal::Stop(signo)
            });
        }
        Ok(out)
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The conventional name of a handled signal.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPWR => "SIGPWR",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_pid1_in_tests() {
        assert!(!is_pid1());
    }

    #[test]
    fn reaping_without_children_is_harmless() {
        // The workload tests' children are theirs to reap: not while they run.
        let _children = crate::workload::tests::children();
        let _ = reap_children();
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGKILL), "signal");
    }

    #[test]
    fn signalfd_delivers_a_child_exit() {
        // Blocking is per thread: do it in a thread of our own so the test
        // harness's other threads keep their signal mask.
        std::thread::spawn(|| {
            let signals = Signals::new().unwrap();
            // SAFETY: raising a signal that is blocked in this thread only
            // queues it for the signalfd.
            let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
            assert_eq!(rc, 0);
            let got = signals.read().unwrap();
            assert_eq!(got, [Signal::Stop(libc::SIGUSR2)]);
        })
        .join()
        .unwrap();
    }
}
