//! Driving the registry from a [`Topology`]: the calls a guest agent makes.
//!
//! [`CpuHotplug`] holds the hotplug lock across each whole bring-up or
//! tear-down, sysfs write included, so no registration slips in between
//! (statement 6), and turns topology events into late transitions.

use std::time::Duration;

use thiserror::Error;

use crate::hotplug::{CpuState, ForcedOffline};
use crate::registry::{Registry, RegistryError};
use crate::topology::{CpuEvent, CpuEventKind, Topology, TopologyError};

/// Errors of driving CPU changes.
#[derive(Debug, Error)]
pub enum HotplugError {
    /// A registry transition failed.
    #[error("registry transition failed")]
    Registry(#[from] RegistryError),
    /// The CPU did not come up; its threads stay parked for next time.
    #[error("CPU {cpu} did not come up")]
    BringUp {
        /// The CPU.
        cpu: u32,
        /// The topology's error.
        #[source]
        source: TopologyError,
    },
    /// The CPU did not go down; its threads were unparked again.
    #[error("CPU {cpu} did not go down")]
    TakeDown {
        /// The CPU.
        cpu: u32,
        /// The topology's error.
        #[source]
        source: TopologyError,
    },
    /// Reading the topology failed.
    #[error("cannot read the topology")]
    Topology(#[source] TopologyError),
}

/// What handling one topology event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Nothing to do: an echo of our own change, a stale event, or a CPU
    /// device that appeared (it starts offline).
    Ignored,
    /// A CPU went down behind the registry's back; its threads were parked.
    ForcedOffline(ForcedOffline),
    /// A CPU came up behind the registry's back; its threads were created
    /// and unparked late.
    CameOnline(u32),
}

/// Brings CPUs up and down through a topology, keeping the registry in step.
#[derive(Debug)]
pub struct CpuHotplug<'a> {
    registry: &'a Registry,
    topology: &'a dyn Topology,
}

impl<'a> CpuHotplug<'a> {
    /// Drives `registry` from `topology`.
    pub fn new(registry: &'a Registry, topology: &'a dyn Topology) -> Self {
        CpuHotplug { registry, topology }
    }

    /// Prepare, bring `cpu` up, then online its threads.
    pub fn bring_up(&self, cpu: u32) -> Result<(), HotplugError> {
        let mut hp = self.registry.hotplug()?;
        hp.prepare(cpu)?;
        self.topology
            .set_online(cpu, true)
            .map_err(|source| HotplugError::BringUp { cpu, source })?;
        hp.online(cpu)?;
        Ok(())
    }

    /// Park `cpu`'s threads, take it down, and unpark them again if that
    /// failed.
    pub fn take_down(&self, cpu: u32) -> Result<(), HotplugError> {
        let mut hp = self.registry.hotplug()?;
        hp.offline(cpu)?;
        if let Err(source) = self.topology.set_online(cpu, false) {
            hp.failed_offline(cpu)?;
            return Err(HotplugError::TakeDown { cpu, source });
        }
        Ok(())
    }

    /// Acts on one event, checking the topology's present state first so
    /// that stale events and echoes of our own changes do nothing.
    pub fn handle_event(&self, event: CpuEvent) -> Result<EventOutcome, HotplugError> {
        let mut hp = self.registry.hotplug()?;
        let cpu = event.cpu;
        let online_now = self
            .topology
            .is_online(cpu)
            .map_err(HotplugError::Topology)?;
        match event.kind {
            CpuEventKind::Offline | CpuEventKind::Removed if !online_now => {
                if hp.cpu_state(cpu)? == CpuState::Offline {
                    return Ok(EventOutcome::Ignored);
                }
                let report = hp.forced_offline(cpu)?;
                Ok(if report.was_forced() {
                    EventOutcome::ForcedOffline(report)
                } else {
                    EventOutcome::Ignored
                })
            }
            CpuEventKind::Online if online_now => {
                if hp.cpu_state(cpu)? == CpuState::Online {
                    return Ok(EventOutcome::Ignored);
                }
                log::warn!("smpboot: CPU {cpu} came up without notice");
                hp.prepare(cpu)?;
                hp.online(cpu)?;
                Ok(EventOutcome::CameOnline(cpu))
            }
            _ => Ok(EventOutcome::Ignored),
        }
    }

    /// Waits up to `timeout` for one event and handles it.
    pub fn poll(&self, timeout: Duration) -> Result<Option<EventOutcome>, HotplugError> {
        match self
            .topology
            .next_event(timeout)
            .map_err(HotplugError::Topology)?
        {
            Some(event) => self.handle_event(event).map(Some),
            None => Ok(None),
        }
    }

    /// Handles every event already queued; returns the non-ignored ones.
    pub fn drain(&self) -> Result<Vec<EventOutcome>, HotplugError> {
        let mut outcomes = Vec::new();
        while let Some(outcome) = self.poll(Duration::ZERO)? {
            if outcome != EventOutcome::Ignored {
                outcomes.push(outcome);
            }
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SimTopology, ThreadDescriptor};
    use std::sync::Arc;

    fn setup(online: &[u32]) -> (SimTopology, Registry) {
        let topo = SimTopology::new(4, online.iter().copied());
        let reg = Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .build()
            .unwrap();
        (topo, reg)
    }

    #[test]
    fn own_changes_echo_as_ignored_events() {
        let (topo, reg) = setup(&[0]);
        let hp = CpuHotplug::new(&reg, &topo);
        hp.bring_up(2).unwrap();
        hp.take_down(2).unwrap();
        hp.bring_up(2).unwrap();
        assert!(hp.drain().unwrap().is_empty());
        assert_eq!(reg.cpu_state(2).unwrap(), CpuState::Online);
    }

    #[test]
    fn refused_offline_rolls_back() {
        let (topo, reg) = setup(&[0, 1]);
        let d = ThreadDescriptor::builder("d/%u", |_| false, |_| {}).build();
        reg.register(&d).unwrap();
        topo.refuse_next(1, false);
        let hp = CpuHotplug::new(&reg, &topo);
        assert!(matches!(
            hp.take_down(1),
            Err(HotplugError::TakeDown { cpu: 1, .. })
        ));
        assert_eq!(reg.cpu_state(1).unwrap(), CpuState::Online);
        let s = reg.snapshot().unwrap();
        assert!(!s.descriptors[0].threads[1].parked);
    }

    #[test]
    fn refused_online_leaves_threads_parked() {
        let (topo, reg) = setup(&[0]);
        let d = ThreadDescriptor::builder("d/%u", |_| false, |_| {}).build();
        reg.register(&d).unwrap();
        topo.refuse_next(3, true);
        let hp = CpuHotplug::new(&reg, &topo);
        assert!(matches!(
            hp.bring_up(3),
            Err(HotplugError::BringUp { cpu: 3, .. })
        ));
        let s = reg.snapshot().unwrap();
        assert!(s.descriptors[0].threads[3].parked);
        let serial = s.descriptors[0].threads[3].serial;
        hp.bring_up(3).unwrap();
        let s = reg.snapshot().unwrap();
        assert_eq!(s.descriptors[0].threads[3].serial, serial);
    }

    #[test]
    fn events_behind_our_back_are_acted_on() {
        let (topo, reg) = setup(&[0, 1]);
        let hp = CpuHotplug::new(&reg, &topo);
        topo.force_offline(1).unwrap();
        topo.force_online(2).unwrap();
        let out = hp.drain().unwrap();
        assert!(matches!(&out[0], EventOutcome::ForcedOffline(r) if r.cpu == 1));
        assert_eq!(out[1], EventOutcome::CameOnline(2));
        assert_eq!(reg.snapshot().unwrap().forced_offlines, 1);
    }

    #[test]
    fn stale_offline_event_is_ignored() {
        let (topo, reg) = setup(&[0, 1]);
        let hp = CpuHotplug::new(&reg, &topo);
        topo.force_offline(1).unwrap();
        topo.force_online(1).unwrap();
        // Both events are stale or echoes by now except the online one.
        let out = hp.drain().unwrap();
        assert!(out.is_empty());
        assert_eq!(reg.cpu_state(1).unwrap(), CpuState::Online);
    }
}
