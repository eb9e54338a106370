//! The VMM thread (the main thread, running the event loop): eventfds and
//! a timerfd under one epoll, and the machinery of hot-add and hot-remove:
//! creating and configuring vCPUs, starting their threads, kicking and
//! joining them. Its filter also admits everything a vCPU thread does
//! (`rules::allowed`): hot-added vCPU threads start under it.
//!
//! Found with strace and `--seccomp log` over the tiny-kernel runs of
//! `vmm/tests/exit_status.rs` and `vmm/tests/seccomp.rs` (hot-add, re-add
//! of a parked vCPU, removal, timeouts, SIGTERM, panic) and the end-to-end
//! boot and hotplug tests.

use seccompiler::{BackendError, SeccompCmpOp};

use super::kvm;
use super::rules::{arg, c, masked, Allowed, Context};
use crate::vcpu::kick;

/// The ioctls of a hot-add: creating the vCPU on the VM fd, configuring
/// it as `Vcpu::configure` does, or sending a parked one back to
/// wait-for-SIPI (`Vcpu::wait_for_sipi`).
pub(crate) const IOCTLS: [u64; 7] = [
    kvm::KVM_CREATE_VCPU,
    kvm::KVM_SET_CPUID2,
    kvm::KVM_SET_MSRS,
    kvm::KVM_SET_FPU,
    kvm::KVM_GET_LAPIC,
    kvm::KVM_SET_LAPIC,
    kvm::KVM_SET_MP_STATE,
];

/// What the VMM thread may do beyond the common list (and the vCPU list).
pub(crate) fn allowed(ctx: &Context) -> Result<Allowed, BackendError> {
    let mut a = Allowed::default();
    // The event loop: the epoll instance is made when the loop starts.
    a.any(libc::SYS_epoll_create1);
    a.any(libc::SYS_epoll_ctl);
    a.any(libc::SYS_epoll_wait);
    // Draining eventfds (guest events, control requests, SIGINT/SIGTERM)
    // and the hotplug deadline timerfd.
    a.any(libc::SYS_read);
    a.any(libc::SYS_timerfd_settime);
    a.when_arg_in(libc::SYS_ioctl, 1, &IOCTLS)?;
    // Kicking a vCPU thread (stop, register dump, start probe): the kick
    // signal, to a thread of this process.
    a.when(
        libc::SYS_tgkill,
        vec![
            arg(0, SeccompCmpOp::Eq, u64::from(ctx.pid))?,
            arg(2, SeccompCmpOp::Eq, c(kick::kick_signal()))?,
        ],
    )?;
    // Starting a hot-added vCPU's thread: a thread, never a process
    // (clone3 answers ENOSYS, `rules::clone3_enosys`, so glibc uses clone).
    a.when(
        libc::SYS_clone,
        vec![masked(0, c(libc::CLONE_THREAD), c(libc::CLONE_THREAD))?],
    )?;
    a.any(libc::SYS_clone3);
    // The new thread, still under this filter: glibc's thread start,
    // std's thread name, then installing its own filter (seccompiler sets
    // no_new_privs again first).
    a.any(libc::SYS_set_robust_list);
    a.any(libc::SYS_rseq);
    a.when_arg_in(
        libc::SYS_prctl,
        0,
        &[c(libc::PR_SET_NAME), c(libc::PR_SET_NO_NEW_PRIVS)],
    )?;
    a.when(
        libc::SYS_seccomp,
        vec![
            arg(0, SeccompCmpOp::Eq, c(libc::SECCOMP_SET_MODE_FILTER))?,
            arg(1, SeccompCmpOp::Eq, 0)?,
        ],
    )?;
    // The metrics' process figures (`procstat`): /proc/self/status, opened
    // before any filter and read again with pread; open fds counted with
    // F_GETFD; the guest RAM's residency.
    a.any(libc::SYS_pread64);
    a.when(
        libc::SYS_fcntl,
        vec![arg(1, SeccompCmpOp::Eq, c(libc::F_GETFD))?],
    )?;
    a.any(libc::SYS_mincore);
    // At exit: the API server removes its socket if it is still its own
    // (stat, then unlink).
    a.any(libc::SYS_statx);
    a.any(libc::SYS_unlink);
    Ok(a)
}
