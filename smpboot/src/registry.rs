//! The registry: descriptors, their per-CPU threads, and the hotplug lock.
//!
//! [`Registry`] holds one mutex, the hotplug lock. Register, unregister,
//! every CPU transition ([`Hotplug`](crate::Hotplug)) and snapshots take it,
//! so they exclude each other (statement 6). Waking a thread does not: a
//! [`WakeHandle`] reaches the thread's control word directly.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use thiserror::Error;

use crate::control::Control;
use crate::descriptor::ThreadDescriptor;
use crate::event::{DescriptorId, Observer, RegistryEvent};
use crate::hotplug::{CpuState, Hotplug, Transition};
use crate::placement::{PinnedPlacement, Placement};
use crate::snapshot::Snapshot;
use crate::spawn::{StdSpawner, ThreadSpawner};
use crate::topology::{Topology, TopologyError};
use crate::worker::{inside_registry, CreateError, ReentryGuard, ThreadHandle};

/// The largest CPU number plus one the registry accepts (Linux's NR_CPUS
/// upper bound).
pub const MAX_CPUS: u32 = 8192;

/// Errors of the registry and its CPU transitions.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// A callback, an observer or a holder of the hotplug lock called a
    /// method that takes the lock (it would deadlock).
    #[error("registry called from inside the registry")]
    Reentrant,
    /// The CPU is not one of the registry's possible CPUs.
    #[error("unknown CPU {0}")]
    UnknownCpu(u32),
    /// The descriptor is registered already.
    #[error("descriptor is already registered")]
    AlreadyRegistered,
    /// The descriptor is not registered.
    #[error("descriptor is not registered")]
    NotRegistered,
    /// Creating the thread for a CPU failed.
    #[error("cannot create the thread for CPU {cpu}")]
    ThreadCreation {
        /// The CPU whose thread could not be made.
        cpu: u32,
        /// Why.
        #[source]
        source: CreateError,
    },
    /// The transition does not apply to the CPU's current state.
    #[error("cannot {transition} CPU {cpu}: it is {state}")]
    InvalidTransition {
        /// The CPU.
        cpu: u32,
        /// Its state in the registry.
        state: CpuState,
        /// The transition asked for.
        transition: Transition,
    },
    /// The registry was built without any possible CPU.
    #[error("no possible CPUs")]
    NoCpus,
    /// Reading the topology for the builder failed.
    #[error("cannot read the CPU topology")]
    Topology(#[source] TopologyError),
}

/// The registry's view of one possible CPU.
#[derive(Debug)]
pub(crate) struct CpuSlot {
    pub(crate) state: CpuState,
    /// The last transition was `offline` (so `failed_offline` applies).
    pub(crate) down_by_offline: bool,
    pub(crate) forced_offlines: u64,
}

/// Per-CPU control blocks of one registration, for lock-free wakes.
#[derive(Debug)]
pub(crate) struct WakeTable {
    slots: Box<[OnceLock<Arc<Control>>]>,
}

/// Wakes the threads of one registered descriptor.
///
/// Cheap to clone; never takes the hotplug lock, so it may be used from
/// callbacks, interrupt-like contexts or other threads at any time. Waking
/// a thread that is parked, stopped or not created is a no-op (a parked
/// thread checks `thread_should_run` again when unparked).
#[derive(Debug, Clone)]
pub struct WakeHandle {
    descriptor: DescriptorId,
    table: Arc<WakeTable>,
}

impl WakeHandle {
    /// Wakes the thread of `cpu`; false if that CPU never had one.
    pub fn wake(&self, cpu: u32) -> bool {
        let slot = usize::try_from(cpu)
            .ok()
            .and_then(|i| self.table.slots.get(i));
        match slot.and_then(OnceLock::get) {
            Some(control) => {
                control.wake();
                true
            }
            None => false,
        }
    }

    /// Wakes every thread of the descriptor.
    pub fn wake_all(&self) {
        for control in self.table.slots.iter().filter_map(OnceLock::get) {
            control.wake();
        }
    }

    /// The registration this handle belongs to.
    pub fn descriptor(&self) -> DescriptorId {
        self.descriptor
    }
}

/// A registered descriptor and its threads (indexed by CPU).
#[derive(Debug)]
pub(crate) struct Registered {
    pub(crate) id: DescriptorId,
    pub(crate) desc: Arc<ThreadDescriptor>,
    pub(crate) threads: Vec<Option<ThreadHandle>>,
    wake: Arc<WakeTable>,
}

impl Registered {
    fn new(id: DescriptorId, desc: &Arc<ThreadDescriptor>, slots: usize) -> Self {
        Registered {
            id,
            desc: Arc::clone(desc),
            threads: (0..slots).map(|_| None).collect(),
            wake: Arc::new(WakeTable {
                slots: (0..slots).map(|_| OnceLock::new()).collect(),
            }),
        }
    }

    pub(crate) fn thread(&self, cpu: u32) -> Option<&ThreadHandle> {
        self.threads.get(cpu as usize).and_then(Option::as_ref)
    }

    fn thread_mut(&mut self, cpu: u32) -> Option<&mut ThreadHandle> {
        self.threads.get_mut(cpu as usize).and_then(Option::as_mut)
    }
}

/// Everything behind the hotplug lock.
#[derive(Debug)]
pub(crate) struct State {
    /// Indexed by CPU number; `None` for numbers that are not possible.
    pub(crate) cpus: Vec<Option<CpuSlot>>,
    /// Possible CPUs, ascending.
    pub(crate) possible: Vec<u32>,
    /// Registered descriptors, oldest first.
    pub(crate) descriptors: Vec<Registered>,
    pub(crate) next_serial: u64,
    next_id: u64,
    pub(crate) forced_offlines: u64,
}

impl State {
    pub(crate) fn slot(&self, cpu: u32) -> Result<&CpuSlot, RegistryError> {
        self.cpus
            .get(cpu as usize)
            .and_then(Option::as_ref)
            .ok_or(RegistryError::UnknownCpu(cpu))
    }

    pub(crate) fn slot_mut(&mut self, cpu: u32) -> Result<&mut CpuSlot, RegistryError> {
        self.cpus
            .get_mut(cpu as usize)
            .and_then(Option::as_mut)
            .ok_or(RegistryError::UnknownCpu(cpu))
    }
}

/// The configuration every operation needs besides the state.
pub(crate) struct Env {
    placement: Arc<dyn Placement>,
    spawner: Arc<dyn ThreadSpawner>,
    observer: Option<Arc<Observer>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("placement", &self.placement)
            .field("spawner", &self.spawner)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl Env {
    pub(crate) fn emit(&self, event: RegistryEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    /// Creates the (parked) thread of `reg` on `cpu` and runs `create`.
    pub(crate) fn create_thread(
        &self,
        next_serial: &mut u64,
        reg: &mut Registered,
        cpu: u32,
    ) -> Result<(), RegistryError> {
        *next_serial += 1;
        let handle = ThreadHandle::spawn(
            &reg.desc,
            cpu,
            *next_serial,
            &self.placement,
            &*self.spawner,
        )
        .map_err(|source| RegistryError::ThreadCreation { cpu, source })?;
        if let Some(slot) = reg.wake.slots.get(cpu as usize) {
            // A (registration, CPU) gets one thread ever (statement 3).
            let _ = slot.set(Arc::clone(&handle.control));
        }
        self.emit(RegistryEvent::ThreadCreated {
            descriptor: reg.id,
            cpu,
        });
        handle.call_create(&reg.desc);
        reg.threads[cpu as usize] = Some(handle);
        Ok(())
    }

    /// Creates the thread of `reg` on `cpu` unless it exists.
    pub(crate) fn ensure_thread(
        &self,
        next_serial: &mut u64,
        reg: &mut Registered,
        cpu: u32,
    ) -> Result<(), RegistryError> {
        if reg.thread(cpu).is_some() {
            return Ok(());
        }
        self.create_thread(next_serial, reg, cpu)
    }

    pub(crate) fn unpark(&self, reg: &mut Registered, cpu: u32) {
        let id = reg.id;
        if let Some(t) = reg.thread_mut(cpu) {
            if t.is_parked() {
                t.unpark();
                self.emit(RegistryEvent::UnparkRequested {
                    descriptor: id,
                    cpu,
                });
            }
        }
    }

    /// Parks the thread of `reg` on `cpu`, synchronously; true if it was
    /// running before.
    pub(crate) fn park(&self, reg: &mut Registered, cpu: u32) -> bool {
        let id = reg.id;
        let Some(t) = reg.thread_mut(cpu) else {
            return false;
        };
        let Some(gen) = t.request_park() else {
            return false;
        };
        self.emit(RegistryEvent::ParkRequested {
            descriptor: id,
            cpu,
        });
        t.wait_parked(gen);
        self.emit(RegistryEvent::Parked {
            descriptor: id,
            cpu,
        });
        true
    }

    /// Stops every thread of `reg`, ascending CPUs, synchronously.
    pub(crate) fn destroy(&self, reg: &mut Registered, cpus: &[Option<CpuSlot>]) {
        let id = reg.id;
        for (index, slot) in reg.threads.iter_mut().enumerate() {
            let Some(thread) = slot.take() else {
                continue;
            };
            let cpu = thread.control.cpu;
            let online = cpus
                .get(index)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.state == CpuState::Online);
            self.emit(RegistryEvent::StopRequested {
                descriptor: id,
                cpu,
            });
            thread.stop(online);
            self.emit(RegistryEvent::Stopped {
                descriptor: id,
                cpu,
            });
        }
    }
}

/// The per-CPU hotplug thread registry.
///
/// Build it with [`Registry::builder`]. Share it with `Arc`; every method
/// takes `&self`.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    env: Env,
}

impl Registry {
    /// Starts a registry configuration.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// Takes the hotplug lock; `Reentrant` from a callback or observer.
    fn lock(&self) -> Result<(MutexGuard<'_, State>, ReentryGuard), RegistryError> {
        if inside_registry() {
            return Err(RegistryError::Reentrant);
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok((state, ReentryGuard::enter()))
    }

    /// Takes the hotplug lock for a sequence of CPU transitions, the way
    /// the kernel holds its hotplug lock across a whole bring-up or
    /// tear-down (no register or unregister can come in between). The
    /// single-step methods below ([`prepare`](Self::prepare) and so on)
    /// each take it for one step.
    pub fn hotplug(&self) -> Result<Hotplug<'_>, RegistryError> {
        let (state, guard) = self.lock()?;
        Ok(Hotplug::new(&self.env, state, guard))
    }

    /// Registers `desc`: creates its thread on every online CPU, ascending,
    /// unparking each before creating the next (statement 1), and a parked
    /// one on every CPU prepared for bring-up. On any creation failure all
    /// its threads are stopped and the error returned (statement 4).
    pub fn register(&self, desc: &Arc<ThreadDescriptor>) -> Result<WakeHandle, RegistryError> {
        let (mut guard, _reentry) = self.lock()?;
        let state = &mut *guard;
        if state.descriptors.iter().any(|r| Arc::ptr_eq(&r.desc, desc)) {
            return Err(RegistryError::AlreadyRegistered);
        }
        state.next_id += 1;
        let id = DescriptorId(state.next_id);
        let mut reg = Registered::new(id, desc, state.cpus.len());
        for &cpu in &state.possible {
            let cpu_state = state.slot(cpu)?.state;
            if cpu_state == CpuState::Offline {
                continue;
            }
            if let Err(e) = self
                .env
                .create_thread(&mut state.next_serial, &mut reg, cpu)
            {
                log::warn!(
                    "smpboot: registering {:?} failed at CPU {cpu}: {e}",
                    desc.name_pattern()
                );
                self.env.destroy(&mut reg, &state.cpus);
                return Err(e);
            }
            if cpu_state == CpuState::Online {
                self.env.unpark(&mut reg, cpu);
            }
        }
        let handle = WakeHandle {
            descriptor: id,
            table: Arc::clone(&reg.wake),
        };
        state.descriptors.push(reg);
        self.env.emit(RegistryEvent::Registered { descriptor: id });
        log::info!("smpboot: registered {:?} as {id}", desc.name_pattern());
        Ok(handle)
    }

    /// Unregisters `desc`: removes it, then stops its threads on all
    /// possible CPUs, ascending, and joins them (statement 21). No `park`
    /// runs; threads of offline CPUs get `cleanup(cpu, false)`. When this
    /// returns no callback of `desc` runs any more and it may be
    /// registered again (statement 22).
    pub fn unregister(&self, desc: &ThreadDescriptor) -> Result<(), RegistryError> {
        let (mut guard, _reentry) = self.lock()?;
        let state = &mut *guard;
        let index = state
            .descriptors
            .iter()
            .position(|r| std::ptr::eq(Arc::as_ptr(&r.desc), desc))
            .ok_or(RegistryError::NotRegistered)?;
        let mut reg = state.descriptors.remove(index);
        self.env
            .emit(RegistryEvent::Unregistered { descriptor: reg.id });
        self.env.destroy(&mut reg, &state.cpus);
        log::info!(
            "smpboot: unregistered {:?} ({})",
            desc.name_pattern(),
            reg.id
        );
        Ok(())
    }

    /// Whether `desc` is registered now.
    pub fn is_registered(&self, desc: &ThreadDescriptor) -> Result<bool, RegistryError> {
        let (state, _reentry) = self.lock()?;
        Ok(state
            .descriptors
            .iter()
            .any(|r| std::ptr::eq(Arc::as_ptr(&r.desc), desc)))
    }

    /// Prepares `cpu` for bring-up; see [`Hotplug::prepare`].
    pub fn prepare(&self, cpu: u32) -> Result<(), RegistryError> {
        self.hotplug()?.prepare(cpu)
    }

    /// `cpu` is up; see [`Hotplug::online`].
    pub fn online(&self, cpu: u32) -> Result<(), RegistryError> {
        self.hotplug()?.online(cpu)
    }

    /// `cpu` is about to go down; see [`Hotplug::offline`].
    pub fn offline(&self, cpu: u32) -> Result<(), RegistryError> {
        self.hotplug()?.offline(cpu)
    }

    /// `cpu` did not go down after all; see [`Hotplug::failed_offline`].
    pub fn failed_offline(&self, cpu: u32) -> Result<(), RegistryError> {
        self.hotplug()?.failed_offline(cpu)
    }

    /// `cpu` went down on its own; see [`Hotplug::forced_offline`].
    pub fn forced_offline(&self, cpu: u32) -> Result<crate::ForcedOffline, RegistryError> {
        self.hotplug()?.forced_offline(cpu)
    }

    /// The registry's view of `cpu`.
    pub fn cpu_state(&self, cpu: u32) -> Result<CpuState, RegistryError> {
        let (state, _reentry) = self.lock()?;
        Ok(state.slot(cpu)?.state)
    }

    /// The possible CPUs, ascending.
    pub fn possible_cpus(&self) -> Result<Vec<u32>, RegistryError> {
        let (state, _reentry) = self.lock()?;
        Ok(state.possible.clone())
    }

    /// A consistent picture of every CPU and every (descriptor, CPU) thread
    /// (statement 23).
    pub fn snapshot(&self) -> Result<Snapshot, RegistryError> {
        let (state, _reentry) = self.lock()?;
        Ok(Snapshot::capture(&state))
    }
}

impl Drop for Registry {
    /// Unregisters whatever is left, newest first, so no thread outlives
    /// the registry.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        while let Some(mut reg) = state.descriptors.pop() {
            self.env
                .emit(RegistryEvent::Unregistered { descriptor: reg.id });
            self.env.destroy(&mut reg, &state.cpus);
        }
    }
}

/// Configures a [`Registry`].
#[derive(Default)]
pub struct RegistryBuilder {
    possible: Vec<u32>,
    online: Vec<u32>,
    placement: Option<Arc<dyn Placement>>,
    spawner: Option<Arc<dyn ThreadSpawner>>,
    observer: Option<Arc<Observer>>,
}

impl std::fmt::Debug for RegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBuilder")
            .field("possible", &self.possible)
            .field("online", &self.online)
            .field("placement", &self.placement)
            .field("spawner", &self.spawner)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl RegistryBuilder {
    /// The possible CPUs and those of them online now.
    pub fn cpus(
        mut self,
        possible: impl IntoIterator<Item = u32>,
        online: impl IntoIterator<Item = u32>,
    ) -> Self {
        self.possible = possible.into_iter().collect();
        self.online = online.into_iter().collect();
        self
    }

    /// Reads the possible and online CPUs from `topology`.
    pub fn topology(self, topology: &dyn Topology) -> Result<Self, RegistryError> {
        let possible = topology.possible_cpus().map_err(RegistryError::Topology)?;
        let online = topology.online_cpus().map_err(RegistryError::Topology)?;
        Ok(self.cpus(possible, online))
    }

    /// How threads are placed on their CPU ([`PinnedPlacement`] by
    /// default; [`SimPlacement`](crate::SimPlacement) for simulated CPUs).
    pub fn placement(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// How threads are created ([`StdSpawner`] by default;
    /// [`FaultInjector`](crate::FaultInjector) to make creation fail).
    pub fn spawner(mut self, spawner: Arc<dyn ThreadSpawner>) -> Self {
        self.spawner = Some(spawner);
        self
    }

    /// Receives every [`RegistryEvent`], under the hotplug lock.
    pub fn observer(mut self, observer: impl Fn(&RegistryEvent) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Builds the registry. Every CPU must be below [`MAX_CPUS`] and every
    /// online CPU possible.
    pub fn build(self) -> Result<Registry, RegistryError> {
        let mut possible = self.possible;
        possible.sort_unstable();
        possible.dedup();
        let Some(&max) = possible.last() else {
            return Err(RegistryError::NoCpus);
        };
        if max >= MAX_CPUS {
            return Err(RegistryError::UnknownCpu(max));
        }
        let mut cpus: Vec<Option<CpuSlot>> = (0..=max).map(|_| None).collect();
        for &cpu in &possible {
            cpus[cpu as usize] = Some(CpuSlot {
                state: CpuState::Offline,
                down_by_offline: false,
                forced_offlines: 0,
            });
        }
        for &cpu in &self.online {
            match cpus.get_mut(cpu as usize).and_then(Option::as_mut) {
                Some(slot) => slot.state = CpuState::Online,
                None => return Err(RegistryError::UnknownCpu(cpu)),
            }
        }
        Ok(Registry {
            state: Mutex::new(State {
                cpus,
                possible,
                descriptors: Vec::new(),
                next_serial: 0,
                next_id: 0,
                forced_offlines: 0,
            }),
            env: Env {
                placement: self.placement.unwrap_or_else(|| Arc::new(PinnedPlacement)),
                spawner: self
                    .spawner
                    .unwrap_or_else(|| Arc::new(StdSpawner::default())),
                observer: self.observer,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimTopology;

    fn sim(possible: u32, online: &[u32]) -> Registry {
        let topo = SimTopology::new(possible, online.iter().copied());
        Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .build()
            .unwrap()
    }

    #[test]
    fn builder_validates_cpus() {
        assert!(matches!(
            Registry::builder().build(),
            Err(RegistryError::NoCpus)
        ));
        assert!(matches!(
            Registry::builder().cpus([0, 1], [2]).build(),
            Err(RegistryError::UnknownCpu(2))
        ));
        assert!(matches!(
            Registry::builder().cpus([MAX_CPUS], []).build(),
            Err(RegistryError::UnknownCpu(_))
        ));
        let r = Registry::builder().cpus([3, 1, 1], [1]).build().unwrap();
        assert_eq!(r.possible_cpus().unwrap(), vec![1, 3]);
        assert_eq!(r.cpu_state(1).unwrap(), CpuState::Online);
        assert_eq!(r.cpu_state(3).unwrap(), CpuState::Offline);
        assert!(matches!(r.cpu_state(2), Err(RegistryError::UnknownCpu(2))));
    }

    #[test]
    fn wake_handle_reports_missing_threads() {
        let r = sim(4, &[0, 1]);
        let d = ThreadDescriptor::builder("w/%u", |_| false, |_| {}).build();
        let h = r.register(&d).unwrap();
        assert!(h.wake(0));
        assert!(!h.wake(2));
        assert!(!h.wake(1000));
        h.wake_all();
        r.unregister(&d).unwrap();
        assert!(matches!(
            r.unregister(&d),
            Err(RegistryError::NotRegistered)
        ));
    }

    #[test]
    fn locked_methods_refuse_reentry() {
        let r = sim(2, &[0]);
        let hp = r.hotplug().unwrap();
        assert!(matches!(r.snapshot(), Err(RegistryError::Reentrant)));
        drop(hp);
        assert!(r.snapshot().is_ok());
    }

    #[test]
    fn error_messages_are_short_sentences() {
        let e = RegistryError::InvalidTransition {
            cpu: 3,
            state: CpuState::Online,
            transition: Transition::Prepare,
        };
        assert_eq!(e.to_string(), "cannot prepare CPU 3: it is online");
        assert_eq!(RegistryError::UnknownCpu(9).to_string(), "unknown CPU 9");
    }
}
