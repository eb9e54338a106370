//! The vCPU manager: the machinery of hot-add and hot-remove. It owns the
//! vCPU fds and threads and drives the hotplug register block and the GED;
//! it decides nothing (the coordinator in `hotplug` does, through the
//! [`Machine`] trait, which this implements).
//!
//! - A vCPU fd, once created, is kept: stopping parks the [`Vcpu`] in its
//!   slot and a later add of that id reuses it (KVM cannot destroy a vCPU;
//!   re-creating the id fails with EEXIST).
//! - The register block honours an eject only for a vCPU marked for
//!   removal and never for vCPU 0.
//!
//! # Threads and lock order
//! The manager lives on the VMM thread and is not shared. It takes the
//! hotplug-device mutex and then, separately, the GED mutex, each only for
//! a few register updates; vCPU threads take the same device mutexes
//! during MMIO exits. No lock is ever held while a vCPU thread is kicked
//! or joined, so a vCPU blocked on a device mutex can never deadlock a
//! removal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;

use crate::boot::BootEntry;
use crate::bus::lock;
use crate::devices::cpu_hotplug::{CpuHotplugError, Removal};
use crate::hotplug::machine::{Machine, Started, Withdraw};
use crate::memory::GuestMemoryMmap;
use crate::vcpu::{Vcpu, VcpuContext, VcpuError, VcpuHandle};
use crate::vm::devices::{GedAdapter, HotplugAdapter};
use crate::x86::cpuid;
use crate::VcpuId;

/// How long a vCPU thread may take to leave KVM_RUN once kicked.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of vCPU management.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Creating, configuring, starting or stopping a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The hotplug register block refused the change.
    #[error(transparent)]
    Hotplug(#[from] CpuHotplugError),
    /// The id is not a possible vCPU.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(u32),
    /// The vCPU's thread is already running.
    #[error("vCPU {0} is already running")]
    Running(u32),
    /// The vCPU has no thread.
    #[error("vCPU {0} is not running")]
    NotRunning(u32),
}

#[derive(Debug, Default)]
struct Slot {
    /// The stopped vCPU, kept for reuse.
    parked: Option<Vcpu>,
    /// The running vCPU thread.
    running: Option<VcpuHandle>,
}

/// fd counters of the manager, served by the API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuCounters {
    /// vCPU fds created (never more than the max: removed ones are reused).
    pub vcpu_fds_created: u64,
    /// vCPU fds reused by a hot-add.
    pub vcpu_fds_reused: u64,
}

/// The vCPU manager (see the module docs).
#[derive(Debug)]
pub struct CpuManager {
    vm: Arc<VmFd>,
    base_cpuid: CpuId,
    ctx: VcpuContext,
    hotplug: Arc<Mutex<HotplugAdapter>>,
    /// The register block's ignored accesses (`HotplugAdapter::ignored_accesses`).
    ignored_accesses: Arc<AtomicU64>,
    ged: Arc<Mutex<GedAdapter>>,
    slots: Vec<Slot>,
    join_timeout: Duration,
    counters: CpuCounters,
}

impl CpuManager {
    /// A manager for `max_vcpus` possible vCPUs, none created yet.
    pub fn new(
        vm: Arc<VmFd>,
        base_cpuid: CpuId,
        max_vcpus: u32,
        ctx: VcpuContext,
        hotplug: Arc<Mutex<HotplugAdapter>>,
        ged: Arc<Mutex<GedAdapter>>,
    ) -> Self {
        let ignored_accesses = lock(&hotplug).ignored_accesses();
        Self {
            vm,
            base_cpuid,
            ctx,
            hotplug,
            ignored_accesses,
            ged,
            slots: (0..max_vcpus).map(|_| Slot::default()).collect(),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            counters: CpuCounters::default(),
        }
    }

    /// How many vCPUs the VM can have.
    pub fn max(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    fn slot_mut(&mut self, id: VcpuId) -> Result<&mut Slot, CpuError> {
        self.slots
            .get_mut(id.index())
            .ok_or(CpuError::NoSuchVcpu(id.get()))
    }

    /// A configured vCPU for `id`: the parked one, or a new one.
    fn take_vcpu(&mut self, id: VcpuId) -> Result<Vcpu, CpuError> {
        if let Some(vcpu) = self.slot_mut(id)?.parked.take() {
            self.counters.vcpu_fds_reused += 1;
            if let Err(e) = vcpu.wait_for_sipi() {
                self.slot_mut(id)?.parked = Some(vcpu);
                return Err(e.into());
            }
            return Ok(vcpu);
        }
        let vcpu = Vcpu::create(&self.vm, id)?;
        self.counters.vcpu_fds_created += 1;
        let cpuid = cpuid::for_vcpu(&self.base_cpuid, id.get(), self.max());
        if let Err(e) = vcpu.configure(&cpuid) {
            self.slot_mut(id)?.parked = Some(vcpu);
            return Err(e.into());
        }
        Ok(vcpu)
    }

    fn start(&mut self, id: VcpuId, vcpu: Vcpu) -> Result<(), CpuError> {
        let handle = vcpu.start(self.ctx.clone())?;
        self.slot_mut(id)?.running = Some(handle);
        Ok(())
    }

    /// Creates and starts the boot vCPUs `0..boot`; vCPU 0 enters the
    /// kernel at `entry`, the others wait for the guest's INIT-SIPI.
    pub fn boot(
        &mut self,
        boot: u32,
        mem: &GuestMemoryMmap,
        entry: &BootEntry,
    ) -> Result<(), CpuError> {
        let mut vcpus = Vec::new();
        for id in VcpuId::all(boot) {
            let vcpu = self.take_vcpu(id)?;
            if id.is_boot() {
                vcpu.configure_boot(mem, entry)?;
            }
            lock(&self.hotplug).controller.mark_present(id.get())?;
            vcpus.push((id, vcpu));
        }
        for (id, vcpu) in vcpus {
            self.start(id, vcpu)?;
        }
        Ok(())
    }

    /// One line per vCPU with a thread, for diagnosing a guest that stops
    /// answering.
    pub fn describe_threads(&self) -> String {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let h = s.running.as_ref()?;
                Some(format!("vCPU {i}: thread {}", h.activity()))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn stop_thread(&mut self, id: VcpuId) -> Result<(), CpuError> {
        let timeout = self.join_timeout;
        let Some(handle) = self.slot_mut(id)?.running.take() else {
            return Ok(());
        };
        match handle.stop(timeout) {
            Ok(vcpu) => {
                self.slot_mut(id)?.parked = Some(vcpu);
                Ok(())
            }
            Err((handle, e)) => {
                self.slot_mut(id)?.running = handle.map(|h| *h);
                Err(e.into())
            }
        }
    }

    /// Stops every vCPU thread (VM shutdown). Returns the ids that did not
    /// stop within the bound.
    pub fn shutdown(&mut self) -> Vec<u32> {
        for slot in &self.slots {
            if let Some(h) = &slot.running {
                h.request_stop();
            }
        }
        VcpuId::all(self.max())
            .filter(|&id| self.stop_thread(id).is_err())
            .map(VcpuId::get)
            .collect()
    }
}

impl Machine for CpuManager {
    fn begin_add(&mut self, id: VcpuId) -> Result<(), CpuError> {
        if self.slot_mut(id)?.running.is_some() {
            return Err(CpuError::Running(id.get()));
        }
        let vcpu = self.take_vcpu(id)?;
        self.start(id, vcpu)?;
        let inserted = lock(&self.hotplug).controller.begin_insert(id.get());
        if let Err(e) = inserted {
            self.stop_thread(id)?;
            return Err(e.into());
        }
        lock(&self.ged).notify_cpu_change();
        Ok(())
    }

    fn withdraw_insert(&mut self, id: VcpuId) -> Withdraw {
        if lock(&self.hotplug).controller.withdraw_insert(id.get()) {
            Withdraw::Withdrawn
        } else {
            Withdraw::Seen
        }
    }

    fn started(&mut self, id: VcpuId) -> Started {
        match self.slots.get(id.index()).and_then(|s| s.running.as_ref()) {
            None => Started::No,
            Some(h) => match h.probe_started() {
                Some(true) => Started::Yes,
                Some(false) => Started::No,
                None => Started::Unknown,
            },
        }
    }

    fn request_eject(&mut self, id: VcpuId) -> Result<(), CpuError> {
        if self.slot_mut(id)?.running.is_none() {
            return Err(CpuError::NotRunning(id.get()));
        }
        {
            let mut h = lock(&self.hotplug);
            if h.controller.is_removal_pending(id.get()) {
                // Again: the guest may have missed or refused the first request.
                let _ = h.controller.cancel_removal(id.get());
            }
            h.controller.begin_remove(id.get())?;
        }
        lock(&self.ged).notify_cpu_change();
        Ok(())
    }

    fn withdraw_eject(&mut self, id: VcpuId) -> Withdraw {
        let mut h = lock(&self.hotplug);
        let Some(slot) = h.controller.slot(id.get()) else {
            return Withdraw::Withdrawn;
        };
        match slot.removal {
            Removal::Ejected => Withdraw::Ejected,
            Removal::None => Withdraw::Withdrawn,
            Removal::Pending => {
                let seen = !slot.removing;
                let _ = h.controller.cancel_removal(id.get());
                if seen {
                    Withdraw::Seen
                } else {
                    Withdraw::Withdrawn
                }
            }
        }
    }

    fn stop(&mut self, id: VcpuId) -> Result<(), CpuError> {
        self.stop_thread(id)?;
        lock(&self.hotplug).controller.unplug(id.get())?;
        Ok(())
    }

    fn diagnose(&self, id: VcpuId, what: &str) {
        log::warn!(
            "vCPU {id}: {what}; vCPU threads: {}",
            self.describe_threads()
        );
        for h in self.slots.iter().filter_map(|s| s.running.as_ref()) {
            h.request_dump();
        }
    }

    fn fd_counts(&self) -> (u64, u64) {
        (
            self.counters.vcpu_fds_created,
            self.counters.vcpu_fds_reused,
        )
    }

    fn ignored_register_accesses(&self) -> u64 {
        // Not through the adapter's lock: see `HotplugAdapter::ignored_accesses`.
        self.ignored_accesses.load(Ordering::Relaxed)
    }
}
