//! `--seccomp enforce`: a system call outside a thread's list raises
//! SIGSYS (`SECCOMP_RET_TRAP`) and this handler ends the VMM with one line
//! on stderr and exit status 7 ([`ExitStatus::Seccomp`]):
//!
//! ```text
//! vmm: seccomp: thread vcpu3 made a forbidden system call 41 (socket); exiting with status 7
//! ```
//!
//! The thread's name is the label its [`super::enter`] left in a
//! thread-local; the system call is `si_syscall` of the siginfo, named for
//! the common ones ([`syscall_name`]). The handler only reads that
//! thread-local, formats into a stack buffer and calls `write(2)` and
//! `_exit(2)`, all async-signal-safe and in every thread's list.

use std::cell::Cell;
use std::fmt::Write as _;

use crate::exit::ExitStatus;

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;
/// Bytes of a thread label kept (a Linux thread name has 15).
const LABEL: usize = 16;

thread_local! {
    /// This thread's label for the SIGSYS line (NUL-padded), set by
    /// `enter`. Const-initialised without a destructor: the handler can
    /// read it.
    static THREAD_LABEL: Cell<[u8; LABEL]> = const { Cell::new([0; LABEL]) };
}

/// Sets the calling thread's label (truncated to 16 bytes).
pub(crate) fn set_thread_label(label: &str) {
    let mut buf = [0; LABEL];
    let n = label.len().min(LABEL);
    buf[..n].copy_from_slice(&label.as_bytes()[..n]);
    THREAD_LABEL.with(|l| l.set(buf));
}

/// The calling thread's label: the one `enter` set, else (a thread
/// still starting under its creator's filter) its kernel name, else `?`.
fn thread_label() -> [u8; LABEL] {
    let label = THREAD_LABEL.try_with(Cell::get).unwrap_or([0; LABEL]);
    if label[0] != 0 {
        return label;
    }
    let mut name = kernel_name();
    if name[0] == 0 {
        name[0] = b'?';
    }
    name
}

/// The calling thread's name as the kernel knows it (`comm`), NUL-padded.
fn kernel_name() -> [u8; LABEL] {
    let mut name = [0u8; LABEL];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) to the
    // buffer, which has 16; prctl is async-signal-safe, and PR_GET_NAME
    // is in every thread's list.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    if rc != 0 {
        name = [0; LABEL];
    }
    name
}

/// The SIGSYS part of `siginfo_t` on x86_64 (`_sigsys` in the kernel's
/// `__sifields`, after the three ints and padding to 8 bytes).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A line built without allocating (the handler may not allocate).
pub(crate) struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// The one line for thread `label`'s forbidden system call `nr`
/// (`from_seccomp`: the SIGSYS came from a filter, not from kill(2)).
pub(crate) fn line(label: &[u8], nr: i64, from_seccomp: bool) -> Line {
    let end = label.iter().position(|&b| b == 0).unwrap_or(label.len());
    let label = std::str::from_utf8(&label[..end]).unwrap_or("?");
    let status = ExitStatus::Seccomp.code();
    let mut out = Line::new();
    let _ = if !from_seccomp {
        writeln!(
            out,
            "vmm: seccomp: thread {label} received a SIGSYS not raised by a filter; exiting with status {status}"
        )
    } else if let Some(name) = syscall_name(nr) {
        writeln!(
            out,
            "vmm: seccomp: thread {label} made a forbidden system call {nr} ({name}); exiting with status {status}"
        )
    } else {
        writeln!(
            out,
            "vmm: seccomp: thread {label} made a forbidden system call {nr}; exiting with status {status}"
        )
    };
    out
}

/// Writes `bytes` to stderr with the async-signal-safe write(2).
fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) on fd 2 from a live buffer of `bytes.len()` bytes;
    // it is async-signal-safe and its result does not matter here.
    let _ = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
}

/// Ends the process at once with `status` (no destructors, no atexit).
pub(crate) fn exit_now(status: ExitStatus) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and never returns; skipping
    // destructors and atexit handlers is the point.
    unsafe { libc::_exit(libc::c_int::from(status.code())) }
}

/// Reads the SIGSYS fields of the siginfo the kernel passed.
fn sigsys_fields(info: *const libc::siginfo_t) -> (libc::c_int, libc::c_int) {
    if info.is_null() {
        return (0, -1);
    }
    // SAFETY: the kernel passes a complete 128-byte siginfo_t to an
    // SA_SIGINFO handler; SigsysInfo is its x86_64 SIGSYS layout and
    // smaller, and its fields are plain integers.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    (info.code, info.syscall)
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (code, nr) = sigsys_fields(info);
    let line = line(&thread_label(), i64::from(nr), code == SYS_SECCOMP);
    write_stderr(line.as_bytes());
    exit_now(ExitStatus::Seccomp);
}

/// Installs the SIGSYS handler (process-wide) and unblocks SIGSYS in the
/// calling thread and the threads it spawns afterwards.
pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
    // handler only does async-signal-safe work (a thread-local read,
    // formatting into a stack buffer, write(2), _exit(2)); the pointers
    // are to live locals and the results are checked.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        match libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) {
            0 => libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()),
            _ => -1,
        }
    };
    match rc {
        0 => Ok(()),
        -1 => Err(std::io::Error::last_os_error()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// `[(libc::SYS_x, "SYS_x"), ...]`.
macro_rules! syscall_names {
    ($($nr:ident),* $(,)?) => {
        [$((libc::$nr, stringify!($nr))),*]
    };
}

/// x86_64 system call numbers and names (`SYS_` + name) of the common
/// ones: every call of the lists and what a compromised or buggy thread
/// would likely try.
const NAMES: &[(i64, &str)] = &syscall_names![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_sched_yield,
    SYS_mremap,
    SYS_msync,
    SYS_mincore,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_sendfile,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getdents,
    SYS_getcwd,
    SYS_chdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_creat,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_fchown,
    SYS_umask,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_sysinfo,
    SYS_ptrace,
    SYS_getuid,
    SYS_getgid,
    SYS_setuid,
    SYS_setgid,
    SYS_geteuid,
    SYS_getegid,
    SYS_setpgid,
    SYS_getppid,
    SYS_setsid,
    SYS_setreuid,
    SYS_setregid,
    SYS_getgroups,
    SYS_setgroups,
    SYS_setresuid,
    SYS_getresuid,
    SYS_setresgid,
    SYS_getresgid,
    SYS_capget,
    SYS_capset,
    SYS_sigaltstack,
    SYS_mknod,
    SYS_personality,
    SYS_statfs,
    SYS_fstatfs,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_setrlimit,
    SYS_chroot,
    SYS_mount,
    SYS_umount2,
    SYS_reboot,
    SYS_init_module,
    SYS_delete_module,
    SYS_gettid,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_epoll_create,
    SYS_getdents64,
    SYS_set_tid_address,
    SYS_timer_create,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_fchmodat,
    SYS_faccessat,
    SYS_ppoll,
    SYS_unshare,
    SYS_set_robust_list,
    SYS_splice,
    SYS_tee,
    SYS_epoll_pwait,
    SYS_timerfd_create,
    SYS_eventfd,
    SYS_timerfd_settime,
    SYS_accept4,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup3,
    SYS_pipe2,
    SYS_prlimit64,
    SYS_sendmmsg,
    SYS_setns,
    SYS_getcpu,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_finit_module,
    SYS_sched_setattr,
    SYS_renameat2,
    SYS_seccomp,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_bpf,
    SYS_execveat,
    SYS_userfaultfd,
    SYS_membarrier,
    SYS_copy_file_range,
    SYS_statx,
    SYS_rseq,
    SYS_pidfd_send_signal,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_open_tree,
    SYS_move_mount,
    SYS_fsopen,
    SYS_pidfd_open,
    SYS_clone3,
    SYS_openat2,
    SYS_pidfd_getfd,
    SYS_faccessat2,
    SYS_restart_syscall,
];

/// The x86_64 name of system call `nr`, for the common ones.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .and_then(|(_, name)| name.strip_prefix("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_thread_and_the_call() {
        let l = line(b"vcpu3\0\0\0\0\0\0\0\0\0\0\0", 41, true);
        assert_eq!(
            std::str::from_utf8(l.as_bytes()).unwrap(),
            "vmm: seccomp: thread vcpu3 made a forbidden system call 41 (socket); exiting with status 7\n"
        );
        let l = line(b"api", 999, true);
        assert_eq!(
            std::str::from_utf8(l.as_bytes()).unwrap(),
            "vmm: seccomp: thread api made a forbidden system call 999; exiting with status 7\n"
        );
        let l = line(b"vmm", 0, false);
        assert!(std::str::from_utf8(l.as_bytes())
            .unwrap()
            .contains("not raised by a filter"));
    }

    #[test]
    fn names_are_x86_64s() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(41), Some("socket"));
        assert_eq!(syscall_name(59), Some("execve"));
        assert_eq!(syscall_name(435), Some("clone3"));
        assert_eq!(syscall_name(100_000), None);
        let mut seen = std::collections::HashSet::new();
        assert!(NAMES.iter().all(|(nr, _)| seen.insert(*nr)), "duplicates");
    }

    #[test]
    fn a_long_label_is_cut_not_overflowed() {
        let t = std::thread::spawn(|| {
            set_thread_label("a-very-long-thread-label");
            thread_label()
        });
        assert_eq!(&t.join().unwrap(), b"a-very-long-thre");
        // No label: the kernel's name of the thread.
        let t = std::thread::Builder::new()
            .name("unlabelled".into())
            .spawn(thread_label)
            .unwrap();
        assert_eq!(&t.join().unwrap()[..11], b"unlabelled\0");
    }

    #[test]
    fn the_siginfo_layout_matches_the_kernels() {
        assert_eq!(std::mem::offset_of!(SigsysInfo, call_addr), 16);
        assert_eq!(std::mem::offset_of!(SigsysInfo, syscall), 24);
        assert_eq!(std::mem::offset_of!(SigsysInfo, arch), 28);
        assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<libc::siginfo_t>());
    }
}
