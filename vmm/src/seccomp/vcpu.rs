//! vCPU threads (`vcpuN`): `KVM_RUN` and the exits it returns. Device
//! emulation needs no system call of its own beyond the common list:
//! interrupts are irqfd writes, guest events eventfd writes, the console
//! a condition variable.
//!
//! Found with strace and `--seccomp log` over `vmm/tests/vcpu_kvm.rs`, the
//! tiny-kernel runs of `vmm/tests/exit_status.rs` (power off, reset,
//! console floods, SIGTERM, panic) with hot-add and register dumps, and
//! the end-to-end boot and hotplug tests.

use seccompiler::BackendError;

use super::kvm;
use super::rules::Allowed;

/// The ioctls a vCPU thread makes on its own vCPU fd.
pub(crate) const IOCTLS: [u64; 6] = [
    kvm::KVM_RUN,
    // "Did the guest start this vCPU?" (the hot-add timeout asks the thread).
    kvm::KVM_GET_MP_STATE,
    // The register dump of a diagnosis or a triple fault (describe_guest_state).
    kvm::KVM_GET_REGS,
    kvm::KVM_GET_SREGS,
    kvm::KVM_GET_VCPU_EVENTS,
    kvm::KVM_GET_LAPIC,
];

/// What a vCPU thread may do beyond the common list.
pub(crate) fn allowed() -> Result<Allowed, BackendError> {
    let mut a = Allowed::default();
    a.when_arg_in(libc::SYS_ioctl, 1, &IOCTLS)?;
    Ok(a)
}
