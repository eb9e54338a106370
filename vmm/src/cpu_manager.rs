//! The vCPU manager: one state per possible vCPU id and the rules of
//! hot-add and hot-remove.
//!
//! ```text
//!            begin_add                 guest online (or insert acked, no agent)
//!   Absent ------------> Adding ----------------------------------> Present
//!     ^                                                               |
//!     |        thread joined  <-- guest ejects (_EJ0) <-- Removing <--+ begin_remove
//!     +--------------------------------------------------------------+
//! ```
//!
//! - A vCPU fd, once created, is kept: removal parks the stopped [`Vcpu`]
//!   in its slot and a later add of that id reuses it (KVM cannot destroy
//!   a vCPU; re-creating the id fails with EEXIST).
//! - Removal kicks and joins the vCPU thread only after the guest ejected
//!   it; the register block honours an eject only for a vCPU marked for
//!   removal and never for vCPU 0.
//!
//! # Threads and lock order
//! The manager lives on the VMM thread and is not shared. It takes the
//! hotplug-device mutex and then, separately, the GED mutex, each only for
//! a few register updates; vCPU threads take the same device mutexes
//! during MMIO exits. No lock is ever held while a vCPU thread is kicked
//! or joined, so a vCPU blocked on a device mutex can never deadlock a
//! removal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{VcpuInfo, VcpuList, VcpuState};
use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;

use crate::boot::BootEntry;
use crate::bus::lock;
use crate::devices::cpu_hotplug::CpuHotplugError;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::{Vcpu, VcpuContext, VcpuError, VcpuHandle};
use crate::vm::devices::{GedAdapter, HotplugAdapter};
use crate::x86::cpuid;

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
    /// The change does not fit the vCPU's current state.
    #[error("vCPU {id} is {state}")]
    WrongState {
        /// vCPU.
        id: u32,
        /// Its state.
        state: VcpuState,
    },
}

#[derive(Debug)]
struct Slot {
    state: VcpuState,
    /// The stopped vCPU, kept for reuse.
    parked: Option<Vcpu>,
    /// The running vCPU thread.
    running: Option<VcpuHandle>,
    /// What the guest last said about this CPU.
    guest_online: Option<bool>,
}

/// Counters of the manager, served by the API.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuCounters {
    /// vCPU fds created (never more than the max: removed ones are reused).
    pub vcpu_fds_created: u64,
    /// vCPU fds reused by a hot-add.
    pub vcpu_fds_reused: u64,
    /// Hot-adds confirmed.
    pub hot_adds: u64,
    /// Hot-removes completed (ejected and joined).
    pub hot_removes: u64,
}

/// The vCPU manager (see the module docs).
#[derive(Debug)]
pub struct CpuManager {
    vm: Arc<VmFd>,
    base_cpuid: CpuId,
    ctx: VcpuContext,
    hotplug: Arc<Mutex<HotplugAdapter>>,
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
        let slots = (0..max_vcpus)
            .map(|_| Slot {
                state: VcpuState::Absent,
                parked: None,
                running: None,
                guest_online: None,
            })
            .collect();
        Self {
            vm,
            base_cpuid,
            ctx,
            hotplug,
            ged,
            slots,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            counters: CpuCounters::default(),
        }
    }

    fn max(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    fn slot(&self, id: u32) -> Result<&Slot, CpuError> {
        self.slots.get(id as usize).ok_or(CpuError::NoSuchVcpu(id))
    }

    /// `WrongState` unless `id` is in state `want`.
    fn expect_state(&self, id: u32, want: VcpuState) -> Result<(), CpuError> {
        match self.slot(id)?.state {
            state if state == want => Ok(()),
            state => Err(CpuError::WrongState { id, state }),
        }
    }

    fn slot_mut(&mut self, id: u32) -> Result<&mut Slot, CpuError> {
        self.slots
            .get_mut(id as usize)
            .ok_or(CpuError::NoSuchVcpu(id))
    }

    /// A configured vCPU for `id`: the parked one, or a new one.
    fn take_vcpu(&mut self, id: u32) -> Result<Vcpu, CpuError> {
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
        let cpuid = cpuid::for_vcpu(&self.base_cpuid, id, self.max());
        if let Err(e) = vcpu.configure(&cpuid) {
            self.slot_mut(id)?.parked = Some(vcpu);
            return Err(e.into());
        }
        Ok(vcpu)
    }

    fn start(&mut self, vcpu: Vcpu) -> Result<(), CpuError> {
        let id = vcpu.id();
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
        for id in 0..boot {
            let vcpu = self.take_vcpu(id)?;
            if id == 0 {
                vcpu.configure_boot(mem, entry)?;
            }
            lock(&self.hotplug).controller.mark_present(id)?;
            vcpus.push(vcpu);
        }
        for vcpu in vcpus {
            let id = vcpu.id();
            self.start(vcpu)?;
            let slot = self.slot_mut(id)?;
            slot.state = VcpuState::Present;
        }
        Ok(())
    }

    /// The state of every possible vCPU, by id.
    pub fn states(&self) -> Vec<VcpuState> {
        self.slots.iter().map(|s| s.state).collect()
    }

    /// vCPUs present (including those being removed).
    pub fn present_count(&self) -> u32 {
        let n = self
            .slots
            .iter()
            .filter(|s| matches!(s.state, VcpuState::Present | VcpuState::Removing))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The API view of every vCPU.
    pub fn vcpu_list(&self) -> VcpuList {
        VcpuList {
            max_vcpus: self.max(),
            vcpus: self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| VcpuInfo {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    state: s.state,
                    guest_online: s.guest_online,
                    guest_cpu: None,
                    workers: None,
                })
                .collect(),
        }
    }

    /// One line per vCPU with a thread: its slot state and thread state,
    /// for diagnosing a guest that stops answering.
    pub fn describe_threads(&self) -> String {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let h = s.running.as_ref()?;
                Some(format!("vCPU {i}: {} thread {}", s.state, h.activity()))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Asks every running vCPU thread to log its guest state (registers,
    /// MP state, pending interrupts) at once; the guest runs on.
    pub fn request_dumps(&self) {
        for h in self.slots.iter().filter_map(|s| s.running.as_ref()) {
            h.request_dump();
        }
    }

    /// Counters.
    pub fn counters(&self) -> CpuCounters {
        self.counters
    }

    /// Guest accesses to the hotplug registers that were ignored or refused.
    pub fn ignored_register_accesses(&self) -> u64 {
        let h = lock(&self.hotplug);
        h.controller.ignored_accesses() + h.controller.rejected_ejects()
    }

    /// Starts hot-adding `id`: its thread runs (waiting for SIPI), the
    /// register block marks it inserting and the GED interrupt tells the
    /// guest to scan.
    pub fn begin_add(&mut self, id: u32) -> Result<(), CpuError> {
        self.expect_state(id, VcpuState::Absent)?;
        let vcpu = self.take_vcpu(id)?;
        self.start(vcpu)?;
        let inserted = lock(&self.hotplug).controller.begin_insert(id);
        if let Err(e) = inserted {
            self.stop_thread(id)?;
            return Err(e.into());
        }
        self.slot_mut(id)?.state = VcpuState::Adding;
        lock(&self.ged).notify_cpu_change();
        log::info!("vCPU {id}: hot-add started");
        Ok(())
    }

    /// Marks `id` as being removed without telling the guest through ACPI
    /// yet (the guest agent prepares the CPU first).
    pub fn reserve_remove(&mut self, id: u32) -> Result<(), CpuError> {
        self.slot(id)?;
        if id == 0 {
            return Err(CpuHotplugError::BootCpu.into());
        }
        self.expect_state(id, VcpuState::Present)?;
        self.slot_mut(id)?.state = VcpuState::Removing;
        Ok(())
    }

    /// Asks the guest through ACPI to eject `id` (reserved for removal):
    /// the register block marks it and the GED interrupt makes the guest
    /// scan; the guest offlines the CPU if needed and ejects it. Asking
    /// again re-sends the request.
    pub fn signal_remove(&mut self, id: u32) -> Result<(), CpuError> {
        self.expect_state(id, VcpuState::Removing)?;
        {
            let mut h = lock(&self.hotplug);
            if h.controller.is_removal_pending(id) {
                // Re-signal: the guest may have missed or refused the first request.
                let _ = h.controller.cancel_removal(id);
            }
            h.controller.begin_remove(id)?;
        }
        lock(&self.ged).notify_cpu_change();
        log::info!("vCPU {id}: ACPI eject requested");
        Ok(())
    }

    /// [`Self::reserve_remove`] then [`Self::signal_remove`].
    pub fn begin_remove(&mut self, id: u32) -> Result<(), CpuError> {
        self.reserve_remove(id)?;
        let signalled = self.signal_remove(id);
        if signalled.is_err() {
            self.slot_mut(id)?.state = VcpuState::Present;
        }
        signalled
    }

    /// Gives up a removal the guest has not carried out: the vCPU stays
    /// present and usable.
    pub fn cancel_remove(&mut self, id: u32) -> Result<(), CpuError> {
        self.expect_state(id, VcpuState::Removing)?;
        {
            let mut h = lock(&self.hotplug);
            if h.controller.is_removal_pending(id) {
                h.controller.cancel_removal(id)?;
            }
        }
        self.slot_mut(id)?.state = VcpuState::Present;
        Ok(())
    }

    /// Gives up an add the guest never confirmed: the thread is stopped and
    /// the slot is absent again (the fd kept).
    pub fn cancel_add(&mut self, id: u32) -> Result<(), CpuError> {
        self.expect_state(id, VcpuState::Adding)?;
        self.stop_thread(id)?;
        let mut h = lock(&self.hotplug);
        let _ = h.controller.begin_remove(id);
        let _ = h.controller.complete_removal(id);
        drop(h);
        let slot = self.slot_mut(id)?;
        slot.state = VcpuState::Absent;
        slot.guest_online = None;
        Ok(())
    }

    fn stop_thread(&mut self, id: u32) -> Result<(), CpuError> {
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

    /// The guest ejected `id`: join its thread, keep its fd, mark it
    /// absent. Returns whether a removal completed.
    pub fn on_ejected(&mut self, id: u32) -> Result<bool, CpuError> {
        let state = self.slot(id)?.state;
        if state != VcpuState::Removing {
            log::warn!("vCPU {id}: eject while {state}, ignored");
            return Ok(false);
        }
        self.stop_thread(id)?;
        lock(&self.hotplug).controller.complete_removal(id)?;
        let slot = self.slot_mut(id)?;
        slot.state = VcpuState::Absent;
        slot.guest_online = None;
        self.counters.hot_removes += 1;
        log::info!("vCPU {id}: removed (ejected, thread joined)");
        Ok(true)
    }

    /// Completes a hot-add without knowing the guest's CPU state (no
    /// agent): the guest's ACPI scan acknowledged the insertion. Returns
    /// true when this confirms an add.
    pub fn confirm_add(&mut self, id: u32) -> bool {
        match self.slot_mut(id) {
            Ok(slot) if slot.state == VcpuState::Adding => {
                slot.state = VcpuState::Present;
                self.counters.hot_adds += 1;
                log::info!("vCPU {id}: added (insertion acknowledged; no agent to confirm online)");
                true
            }
            _ => false,
        }
    }

    /// The guest reported `id` online or offline. Returns true when this
    /// confirms a hot-add.
    pub fn on_guest_online(&mut self, id: u32, online: bool) -> bool {
        let Ok(slot) = self.slot_mut(id) else {
            return false;
        };
        slot.guest_online = Some(online);
        if online && slot.state == VcpuState::Adding {
            slot.state = VcpuState::Present;
            self.counters.hot_adds += 1;
            log::info!("vCPU {id}: added (guest online)");
            return true;
        }
        false
    }

    /// Stops every vCPU thread (VM shutdown). Returns the ids that did not
    /// stop within the bound.
    pub fn shutdown(&mut self) -> Vec<u32> {
        for slot in &self.slots {
            if let Some(h) = &slot.running {
                h.request_stop();
            }
        }
        let ids: Vec<u32> = (0..self.max()).collect();
        ids.into_iter()
            .filter(|id| self.stop_thread(*id).is_err())
            .collect()
    }
}
