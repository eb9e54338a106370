//! The KVM ioctl request numbers the filters name. kvm-ioctls keeps its
//! own private, so these are the same `_IO`/`_IOR`/`_IOW` encodings,
//! computed from the kvm_bindings structure sizes (checked against the
//! kernel's values in the tests).

use kvm_bindings::{
    kvm_cpuid2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// KVM's ioctl type.
const KVMIO: u32 = 0xAE;

/// The size field of an ioctl request for `T` (14 bits).
#[allow(clippy::cast_possible_truncation)]
const fn size<T>() -> u32 {
    let n = std::mem::size_of::<T>();
    assert!(n < 1 << 14);
    n as u32
}

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0)
}

const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size::<T>())
}

const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size::<T>())
}

/// VM fd: create a vCPU (hot-add of a vCPU that never existed).
pub const KVM_CREATE_VCPU: u64 = io(0x41);
/// vCPU fd: enter the guest.
pub const KVM_RUN: u64 = io(0x80);
/// vCPU fd: general registers (register dumps).
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
/// vCPU fd: special registers (register dumps).
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
/// vCPU fd: MSRs (configuring a new vCPU).
pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
/// vCPU fd: FPU state (configuring a new vCPU).
pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
/// vCPU fd: local APIC state (configuring a new vCPU, register dumps).
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
/// vCPU fd: local APIC state (configuring a new vCPU: LINT pins).
pub const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
/// vCPU fd: CPUID (configuring a new vCPU).
pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
/// vCPU fd: MP state (the "did the guest start it" probe, register dumps).
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
/// vCPU fd: MP state (a re-added vCPU goes back to wait-for-SIPI).
pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
/// vCPU fd: pending exceptions and interrupts (register dumps).
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_kernels() {
        // From linux/kvm.h as compiled for x86_64 (strace decodes these).
        assert_eq!(KVM_CREATE_VCPU, 0xae41);
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_SET_FPU, 0x41a0_ae8d);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_SET_LAPIC, 0x4400_ae8f);
        assert_eq!(KVM_SET_CPUID2, 0x4008_ae90);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_SET_MP_STATE, 0x4004_ae99);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
    }
}
