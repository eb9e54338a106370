//! The few system calls the harness and `testhost-init` need that std
//! does not wrap. Each unsafe block is alone in a small function.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mount(2)` without options data; `EBUSY` (already mounted) is success.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let (source, target, fstype) = (cstring(source)?, cstring(target)?, cstring(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; a null data pointer is allowed.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    match check(ret) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Loads a kernel module from an open `.ko` file with `finit_module(2)`;
/// `EEXIST` (already loaded) is success.
pub fn finit_module(module: &File, params: &str) -> io::Result<()> {
    let params = cstring(params)?;
    let flags: libc::c_int = 0;
    // SAFETY: the fd is open for the duration of the call, params is a valid
    // NUL-terminated string; the syscall reads only those.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            module.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Flushes file systems and powers the machine off. Returns only on failure.
pub fn power_off() -> io::Error {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; on success it does not return.
    let ret = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    match check(ret) {
        Err(e) => e,
        Ok(()) => io::Error::other("reboot(RB_POWER_OFF) returned"),
    }
}

/// Puts a terminal in raw mode: 8 bits, no echo, no line discipline
/// processing, no flow control, modem lines ignored, 115200 baud.
pub fn set_raw(tty: &impl AsFd) -> io::Result<()> {
    let fd = tty.as_fd().as_raw_fd();
    // SAFETY: termios is plain data; all-zero is a valid value to fill in.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid open descriptor and t a valid termios to write.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: t is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !libc::CRTSCTS;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // Speed bits set directly: the libc crate binds cfset*speed to
    // versioned glibc symbols that a static link cannot resolve.
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
    // SAFETY: fd is valid and t a valid termios to read.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })
}

/// Waits until everything written to a terminal has been sent.
pub fn tcdrain(tty: &impl AsFd) -> io::Result<()> {
    // SAFETY: the fd is valid for the call.
    check(unsafe { libc::tcdrain(tty.as_fd().as_raw_fd()) })
}

/// Clears `O_NONBLOCK` on a descriptor.
pub fn set_blocking(file: &impl AsFd) -> io::Result<()> {
    let fd = file.as_fd().as_raw_fd();
    // SAFETY: F_GETFL on a valid fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(flags)?;
    // SAFETY: F_SETFL on a valid fd has no memory effects.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) })
}

/// Makes `file` this process's standard input, output and error.
pub fn redirect_stdio(file: &File) -> io::Result<()> {
    for target in 0..3 {
        // SAFETY: dup2 on a valid fd; replacing fds 0-2 is the intent.
        check(unsafe { libc::dup2(file.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill has no memory effects.
    check(unsafe { libc::kill(pid, signal) })
}

/// Makes the child of `cmd` receive SIGKILL when the spawning thread dies,
/// so no QEMU or VMM outlives a crashed harness.
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)));
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// spawns afterwards), so that [`wait_termination_signal`] receives them.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: set is a valid, initialised sigset; the old set is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for one of the signals blocked by [`block_termination_signals`].
pub fn wait_termination_signal() -> io::Result<libc::c_int> {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: set is initialised and sig a valid out pointer.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// An anonymous, private, page-aligned memory mapping.
#[derive(Debug)]
pub struct AnonMap {
    addr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AnonMap {
    /// Maps `len` zeroed bytes.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address does
        // not alias any existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(AnonMap { addr, len })
    }

    /// The mapping's address, as KVM wants it.
    pub fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by
        // self and borrowed mutably for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly the mapping created in new().
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}
