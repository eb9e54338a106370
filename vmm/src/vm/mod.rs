//! Building a VM: KVM, guest memory, interrupt controllers, devices, ACPI
//! tables and the loaded kernel, ready for its vCPUs.

pub mod console;
pub mod devices;

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestAddress;

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, BootEntry};
use crate::config::VmConfig;
use crate::events::EventSender;
use crate::layout;
use crate::memory::{self, GuestRam};
use devices::Devices;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM capability the VMM relies on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// More vCPUs than KVM allows.
    #[error("KVM allows at most {allowed} vCPUs, {requested} requested")]
    TooManyVcpus {
        /// KVM's limit.
        allowed: usize,
        /// The configured maximum.
        requested: u32,
    },
    /// A VM-level KVM call failed.
    #[error("cannot {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[from] memory::MemoryError),
    /// Devices.
    #[error("devices")]
    Devices(#[from] devices::DevicesError),
    /// ACPI tables.
    #[error("ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    /// Kernel loading.
    #[error("kernel")]
    Boot(#[from] boot::BootError),
}

/// A VM with memory, devices and a loaded kernel, before any vCPU runs.
#[derive(Debug)]
pub struct Vm {
    /// The VM fd (shared with the vCPU manager).
    pub fd: Arc<VmFd>,
    /// Guest RAM. Declared after `fd`: dropped after the VM is gone.
    pub mem: GuestRam,
    /// KVM's supported CPUID, the base of every vCPU's CPUID.
    pub supported_cpuid: CpuId,
    /// Where the boot vCPU starts.
    pub boot_entry: BootEntry,
    /// The devices.
    pub devices: Devices,
    /// Keeps /dev/kvm open.
    _kvm: Kvm,
}

fn require(kvm: &Kvm, cap: Cap, name: &'static str) -> Result<(), VmError> {
    if kvm.check_extension(cap) {
        Ok(())
    } else {
        Err(VmError::MissingCap(name))
    }
}

impl Vm {
    /// Builds the VM described by `cfg`; devices report to `events`.
    pub fn create(cfg: &VmConfig, events: &EventSender) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        require(&kvm, Cap::Irqchip, "in-kernel irqchip")?;
        require(&kvm, Cap::Irqfd, "irqfd")?;
        require(&kvm, Cap::ImmediateExit, "immediate_exit")?;
        require(&kvm, Cap::UserMemory, "user memory")?;
        let allowed = kvm.get_max_vcpus();
        if cfg.cpus.max as usize > allowed {
            return Err(VmError::TooManyVcpus {
                allowed,
                requested: cfg.cpus.max,
            });
        }

        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Setup("create the VM", e))?;
        fd.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
            .map_err(|e| VmError::Setup("set the TSS address", e))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Setup("set the identity map address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("create the in-kernel irqchip", e))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| VmError::Setup("create the in-kernel PIT", e))?;

        let mem = memory::create_guest_memory(cfg.memory)?;
        memory::register_with_kvm(&fd, &mem)?;

        let mailbox = crate::agent::Mailbox::new(&mem);
        let devices = Devices::new(&fd, cfg.cpus.max, &cfg.serial, events, mailbox)?;
        let rsdp = acpi::create_acpi_tables(
            &mem,
            &AcpiConfig {
                boot_vcpus: cfg.cpus.boot,
                max_vcpus: cfg.cpus.max,
            },
        )?;
        let loading = std::time::Instant::now();
        let boot_entry = boot::load(&mem, &cfg.kernel, cfg.memory, rsdp)?;
        log::debug!("kernel and initramfs loaded in {:?}", loading.elapsed());
        debug_assert_eq!(rsdp, GuestAddress(layout::ACPI_START));

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Setup("read the supported CPUID", e))?;

        Ok(Self {
            fd: Arc::new(fd),
            mem,
            supported_cpuid,
            boot_entry,
            devices,
            _kvm: kvm,
        })
    }
}
