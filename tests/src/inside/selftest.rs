//! Proves a `/dev/kvm` works: creates a VM and a vCPU and runs three
//! real-mode instructions (`mov al, 0x42; out 0x10, al; hlt`).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use thiserror::Error;

use crate::sys::AnonMap;

const CODE_GPA: u64 = 0x1000;
const PORT: u16 = 0x10;
const VALUE: u8 = 0x42;
const CODE: [u8; 5] = [0xb0, VALUE, 0xe6, 0x10, 0xf4];

/// The self-test failed.
#[derive(Debug, Error)]
pub enum SelftestError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be mapped.
    #[error("cannot map guest memory")]
    Memory(#[source] std::io::Error),
    /// The vCPU exited in an unexpected way.
    #[error("unexpected vCPU exit: {0}")]
    Exit(String),
}

/// Runs the self-test; returns a one-line report.
pub fn run() -> Result<String, SelftestError> {
    // Declared before the VM so that it is unmapped after the VM is gone.
    let mut mem = AnonMap::new(0x1000).map_err(SelftestError::Memory)?;
    mem.as_mut_slice()[..CODE.len()].copy_from_slice(&CODE);
    let kvm = Kvm::new().map_err(|e| SelftestError::Kvm("open /dev/kvm", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| SelftestError::Kvm("KVM_CREATE_VM", e))?;
    set_region(&vm, &mem)?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| SelftestError::Kvm("KVM_CREATE_VCPU", e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| SelftestError::Kvm("KVM_GET_SREGS", e))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| SelftestError::Kvm("KVM_SET_SREGS", e))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| SelftestError::Kvm("KVM_GET_REGS", e))?;
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| SelftestError::Kvm("KVM_SET_REGS", e))?;
    let mut saw_out = false;
    for _ in 0..16 {
        match vcpu.run().map_err(|e| SelftestError::Kvm("KVM_RUN", e))? {
            VcpuExit::IoOut(PORT, data) if data == [VALUE] => saw_out = true,
            VcpuExit::Hlt if saw_out => {
                return Ok(format!(
                    "kvm selftest ok: api={} vcpus_max={} out {PORT:#x}={VALUE:#x} then hlt",
                    kvm.get_api_version(),
                    kvm.get_max_vcpus()
                ));
            }
            other => return Err(SelftestError::Exit(format!("{other:?}"))),
        }
    }
    Err(SelftestError::Exit("no hlt after 16 exits".into()))
}

/// Registers `mem` as guest memory at [`CODE_GPA`]; `mem` must outlive `vm`.
fn set_region(vm: &kvm_ioctls::VmFd, mem: &AnonMap) -> Result<(), SelftestError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: CODE_GPA,
        memory_size: mem.len() as u64,
        userspace_addr: mem.addr(),
    };
    // SAFETY: the region covers exactly `mem`, a live anonymous mapping owned
    // by the caller, which drops it only after the VM (see run()).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| SelftestError::Kvm("KVM_SET_USER_MEMORY_REGION", e))
}
