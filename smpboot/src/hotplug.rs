//! CPU transitions, driven by a topology source (statements 7 to 11).
//!
//! The guest agent learns of CPU changes from the kernel (sysfs writes it
//! makes itself, uevents for the rest) and calls, around each change:
//!
//! | kernel event                        | call                           |
//! |-------------------------------------|--------------------------------|
//! | before writing 1 to `cpuN/online`   | [`Hotplug::prepare`]           |
//! | after the write succeeded           | [`Hotplug::online`]            |
//! | before writing 0 to `cpuN/online`   | [`Hotplug::offline`] (parks)   |
//! | the write of 0 failed               | [`Hotplug::failed_offline`]    |
//! | the CPU went down without us        | [`Hotplug::forced_offline`]    |
//!
//! If a bring-up fails after `prepare`, nothing needs undoing: the threads
//! stay parked and are reused by the next `prepare` (statement 7).
//! [`CpuHotplug`](crate::CpuHotplug) does all of this against a
//! [`Topology`](crate::Topology).

use std::fmt;
use std::sync::MutexGuard;

use crate::event::{DescriptorId, RegistryEvent};
use crate::registry::{Env, RegistryError, State};
use crate::worker::ReentryGuard;

/// The registry's view of a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuState {
    /// Down. Threads of it, if any, are parked.
    Offline,
    /// Prepared for bring-up: every registered descriptor has a parked
    /// thread for it. Still counts as offline.
    Prepared,
    /// Up: every registered descriptor has a running thread on it.
    Online,
}

impl fmt::Display for CpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuState::Offline => "offline",
            CpuState::Prepared => "prepared",
            CpuState::Online => "online",
        })
    }
}

/// A CPU transition, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// [`Hotplug::prepare`].
    Prepare,
    /// [`Hotplug::online`].
    Online,
    /// [`Hotplug::offline`].
    Offline,
    /// [`Hotplug::failed_offline`].
    FailedOffline,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::Prepare => "prepare",
            Transition::Online => "online",
            Transition::Offline => "offline",
            Transition::FailedOffline => "roll back the offlining of",
        })
    }
}

/// The report of [`Hotplug::forced_offline`]: what the registry found and
/// did when it learned that a CPU had gone down on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedOffline {
    /// The CPU.
    pub cpu: u32,
    /// The registry's view of it before.
    pub previous: CpuState,
    /// Descriptors whose thread was running there and got parked late;
    /// until then it may have run on another CPU.
    pub parked: Vec<DescriptorId>,
}

impl ForcedOffline {
    /// Whether the CPU really went down behind the registry's back (it was
    /// online in its view). False for the echo of a normal offlining.
    pub fn was_forced(&self) -> bool {
        self.previous == CpuState::Online
    }
}

/// The hotplug lock, held across one or more CPU transitions.
///
/// Obtained from [`Registry::hotplug`](crate::Registry::hotplug). While it
/// is held, no register, unregister or other transition can run. Holding
/// it across the sysfs write of a bring-up or tear-down makes the whole
/// operation atomic, as in the kernel.
#[derive(Debug)]
pub struct Hotplug<'a> {
    env: &'a Env,
    state: MutexGuard<'a, State>,
    _reentry: ReentryGuard,
}

impl<'a> Hotplug<'a> {
    pub(crate) fn new(env: &'a Env, state: MutexGuard<'a, State>, reentry: ReentryGuard) -> Self {
        Hotplug {
            env,
            state,
            _reentry: reentry,
        }
    }

    /// The registry's view of `cpu`.
    pub fn cpu_state(&self, cpu: u32) -> Result<CpuState, RegistryError> {
        Ok(self.state.slot(cpu)?.state)
    }

    fn expect(
        &self,
        cpu: u32,
        allowed: &[CpuState],
        transition: Transition,
    ) -> Result<CpuState, RegistryError> {
        let state = self.cpu_state(cpu)?;
        if allowed.contains(&state) {
            Ok(state)
        } else {
            Err(RegistryError::InvalidTransition {
                cpu,
                state,
                transition,
            })
        }
    }

    fn set_state(
        &mut self,
        cpu: u32,
        new: CpuState,
        down_by_offline: bool,
    ) -> Result<(), RegistryError> {
        let slot = self.state.slot_mut(cpu)?;
        let changed = slot.state != new;
        slot.state = new;
        slot.down_by_offline = down_by_offline;
        if changed {
            self.env.emit(RegistryEvent::CpuChanged { cpu, state: new });
        }
        Ok(())
    }

    /// Creates any missing thread of `cpu`, newest registration first,
    /// stopping at the first error.
    fn create_missing(&mut self, cpu: u32) -> Result<(), RegistryError> {
        let state = &mut *self.state;
        for reg in state.descriptors.iter_mut().rev() {
            self.env.ensure_thread(&mut state.next_serial, reg, cpu)?;
        }
        Ok(())
    }

    /// Before `cpu` comes up: creates the threads of every registered
    /// descriptor for it, newest registration first, parked (statement 7).
    ///
    /// On the first creation error this stops and returns it: the
    /// bring-up must then fail. Threads already created stay parked and
    /// are reused next time. Valid from offline or prepared.
    pub fn prepare(&mut self, cpu: u32) -> Result<(), RegistryError> {
        self.expect(
            cpu,
            &[CpuState::Offline, CpuState::Prepared],
            Transition::Prepare,
        )?;
        self.create_missing(cpu)?;
        self.set_state(cpu, CpuState::Prepared, false)?;
        log::debug!("smpboot: CPU {cpu} prepared");
        Ok(())
    }

    /// After `cpu` came up: unparks every thread of it, newest registration
    /// first, without waiting for them to run (statement 8). Valid from
    /// prepared.
    ///
    /// A thread parked again before it got to run stays parked without
    /// calling `unpark` or a second `park` (as in the kernel): callback
    /// counts depend on whether the thread ran in between.
    pub fn online(&mut self, cpu: u32) -> Result<(), RegistryError> {
        self.expect(cpu, &[CpuState::Prepared], Transition::Online)?;
        self.create_missing(cpu)?;
        self.unpark_all(cpu);
        self.set_state(cpu, CpuState::Online, false)?;
        log::info!("smpboot: CPU {cpu} online");
        Ok(())
    }

    /// Before `cpu` goes down: parks every thread of it, oldest
    /// registration first (statement 9). Synchronous: when this returns
    /// every `park` callback has finished and every thread is blocked.
    /// Valid from online; afterwards the CPU counts as offline.
    pub fn offline(&mut self, cpu: u32) -> Result<(), RegistryError> {
        self.expect(cpu, &[CpuState::Online], Transition::Offline)?;
        self.park_all(cpu);
        self.set_state(cpu, CpuState::Offline, true)?;
        log::info!("smpboot: CPU {cpu} offline");
        Ok(())
    }

    /// The CPU did not go down after [`offline`](Self::offline) (the
    /// kernel's CPU_DOWN_FAILED): unparks its threads again, newest
    /// registration first (statement 10). Valid only right after
    /// `offline`. A descriptor registered in between (without the lock
    /// held across) first gets its thread created.
    pub fn failed_offline(&mut self, cpu: u32) -> Result<(), RegistryError> {
        let state = self.expect(cpu, &[CpuState::Offline], Transition::FailedOffline)?;
        if !self.state.slot(cpu)?.down_by_offline {
            return Err(RegistryError::InvalidTransition {
                cpu,
                state,
                transition: Transition::FailedOffline,
            });
        }
        self.create_missing(cpu)?;
        self.unpark_all(cpu);
        self.set_state(cpu, CpuState::Online, false)?;
        log::warn!("smpboot: CPU {cpu} did not go down; its threads run again");
        Ok(())
    }

    /// The CPU went down without [`offline`](Self::offline) (an admin or
    /// the kernel acting alone): parks its threads now, oldest registration
    /// first (statement 11). Until this call they may have run on other
    /// CPUs, since the kernel broke their affinity.
    ///
    /// Never hidden: the returned report lists the threads parked late,
    /// an observer gets [`RegistryEvent::ForcedOffline`], and the snapshot
    /// counts it. For a CPU already offline (the echo of a normal
    /// offlining) or only prepared, it just records the CPU as offline.
    pub fn forced_offline(&mut self, cpu: u32) -> Result<ForcedOffline, RegistryError> {
        let previous = self.cpu_state(cpu)?;
        let mut report = ForcedOffline {
            cpu,
            previous,
            parked: Vec::new(),
        };
        if previous == CpuState::Online {
            report.parked = self.park_all(cpu);
            let slot = self.state.slot_mut(cpu)?;
            slot.forced_offlines += 1;
            self.state.forced_offlines += 1;
            log::warn!(
                "smpboot: CPU {cpu} went down without notice; parked {} thread(s) late",
                report.parked.len()
            );
            self.env.emit(RegistryEvent::ForcedOffline {
                cpu,
                parked: report.parked.len(),
            });
        }
        self.set_state(cpu, CpuState::Offline, false)?;
        Ok(report)
    }

    fn unpark_all(&mut self, cpu: u32) {
        for reg in self.state.descriptors.iter_mut().rev() {
            self.env.unpark(reg, cpu);
        }
    }

    fn park_all(&mut self, cpu: u32) -> Vec<DescriptorId> {
        let mut parked = Vec::new();
        for reg in self.state.descriptors.iter_mut() {
            if self.env.park(reg, cpu) {
                parked.push(reg.id);
            }
        }
        parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Registry, SimTopology, ThreadDescriptor};
    use std::sync::Arc;

    fn registry() -> Registry {
        let topo = SimTopology::new(4, [0, 1]);
        Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .build()
            .unwrap()
    }

    #[test]
    fn transitions_check_the_cpu_state() {
        let r = registry();
        let mut hp = r.hotplug().unwrap();
        assert!(matches!(
            hp.online(2),
            Err(RegistryError::InvalidTransition {
                transition: Transition::Online,
                ..
            })
        ));
        assert!(matches!(
            hp.prepare(0),
            Err(RegistryError::InvalidTransition { .. })
        ));
        assert!(matches!(
            hp.offline(2),
            Err(RegistryError::InvalidTransition { .. })
        ));
        assert!(matches!(
            hp.failed_offline(2),
            Err(RegistryError::InvalidTransition { .. })
        ));
        assert!(matches!(hp.prepare(9), Err(RegistryError::UnknownCpu(9))));
        hp.prepare(2).unwrap();
        hp.prepare(2).unwrap();
        hp.online(2).unwrap();
        hp.offline(2).unwrap();
        hp.failed_offline(2).unwrap();
        assert_eq!(hp.cpu_state(2).unwrap(), CpuState::Online);
        hp.offline(2).unwrap();
        // Only right after offline.
        let echo = hp.forced_offline(2).unwrap();
        assert!(!echo.was_forced());
        assert!(matches!(
            hp.failed_offline(2),
            Err(RegistryError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn forced_offline_reports_parked_threads() {
        let r = registry();
        let d = ThreadDescriptor::builder("f/%u", |_| false, |_| {}).build();
        let h = r.register(&d).unwrap();
        let report = r.forced_offline(1).unwrap();
        assert!(report.was_forced());
        assert_eq!(report.parked, vec![h.descriptor()]);
        assert_eq!(r.cpu_state(1).unwrap(), CpuState::Offline);
        let again = r.forced_offline(1).unwrap();
        assert!(!again.was_forced() && again.parked.is_empty());
    }

    #[test]
    fn state_and_transition_display() {
        assert_eq!(CpuState::Prepared.to_string(), "prepared");
        assert_eq!(
            Transition::FailedOffline.to_string(),
            "roll back the offlining of"
        );
    }
}
