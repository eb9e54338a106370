//! The seam between the coordinator and the machinery: what the
//! coordinator asks of vCPU threads, the hotplug register block and the
//! GED. `cpu_manager::CpuManager` implements it over KVM; the tests use
//! `fake::FakeMachine`, so the coordinator's timeouts and races run
//! without KVM.

use crate::cpu_manager::CpuError;
use crate::VcpuId;

/// How taking back a request the guest may already be acting on went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdraw {
    /// The guest had not acknowledged it: it is gone, the guest never
    /// acts on it.
    Withdrawn,
    /// The guest acknowledged it and may be acting on it (it has enumerated
    /// the inserted CPU, or is offlining the CPU to eject): nothing was
    /// taken back.
    Seen,
    /// The guest already ejected the vCPU (the eject event is on its way).
    Ejected,
}

/// Whether the guest started a hot-added vCPU (sent it INIT-SIPI-SIPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// It still waits for its SIPI: the guest never ran code on it.
    No,
    /// It left wait-for-SIPI.
    Yes,
    /// Not known yet (the vCPU thread was asked; ask again shortly).
    Unknown,
}

/// What the coordinator drives (see the module docs).
pub trait Machine: std::fmt::Debug {
    /// Starts hot-adding `id`: its thread runs (waiting for SIPI), the
    /// register block marks it inserting and the GED tells the guest.
    fn begin_add(&mut self, id: VcpuId) -> Result<(), CpuError>;
    /// Takes back the insertion of `id` if the guest has not acknowledged
    /// it; on [`Withdraw::Withdrawn`] the caller then stops the thread.
    fn withdraw_insert(&mut self, id: VcpuId) -> Withdraw;
    /// Whether the guest started `id` (asks its thread when not known).
    fn started(&mut self, id: VcpuId) -> Started;
    /// Raises (or raises again) the ACPI eject request of `id`.
    fn request_eject(&mut self, id: VcpuId) -> Result<(), CpuError>;
    /// Takes back the eject request of `id` if the guest has not
    /// acknowledged it.
    fn withdraw_eject(&mut self, id: VcpuId) -> Withdraw;
    /// Stops and joins `id`'s thread (bounded), keeps its fd for reuse and
    /// clears its register slot. An error leaves the thread where it was
    /// (a later call retries).
    fn stop(&mut self, id: VcpuId) -> Result<(), CpuError>;
    /// Logs what every vCPU thread is doing and asks each for its guest
    /// state, for a guest that stopped answering.
    fn diagnose(&self, id: VcpuId, what: &str);
    /// vCPU fds created and reused so far.
    fn fd_counts(&self) -> (u64, u64);
    /// Guest accesses to the hotplug registers that were ignored.
    fn ignored_register_accesses(&self) -> u64;
}

#[cfg(test)]
pub mod fake {
    //! A machine without KVM: threads and register slots as booleans, with
    //! knobs for the failures the coordinator must survive.

    use std::collections::BTreeSet;

    use super::*;

    /// One vCPU of the fake machine.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct FakeVcpu {
        /// Its thread runs.
        pub thread: bool,
        /// The register block shows it present (`_STA` enabled).
        pub present: bool,
        /// Insert event raised, not acknowledged.
        pub inserting: bool,
        /// The guest acknowledged the insert (scan ran).
        pub insert_acked: bool,
        /// Eject requested.
        pub eject_pending: bool,
        /// The guest acknowledged the eject request.
        pub eject_acked: bool,
        /// The guest ejected it (event pending for the coordinator).
        pub ejected: bool,
        /// The guest sent it INIT-SIPI-SIPI.
        pub started: bool,
    }

    /// The fake machine.
    #[derive(Debug, Default)]
    pub struct FakeMachine {
        /// Every vCPU.
        pub vcpus: Vec<FakeVcpu>,
        /// vCPUs whose thread will not stop when asked.
        pub stuck: BTreeSet<u32>,
        /// `begin_add` fails for these.
        pub add_fails: BTreeSet<u32>,
        /// `started` answers `Unknown` once for these, then the truth.
        pub started_unknown_once: BTreeSet<u32>,
        /// fds created.
        pub created: u64,
    }

    impl FakeMachine {
        /// `max` vCPUs, the first `boot` present and running.
        pub fn new(max: u32, boot: u32) -> Self {
            let mut m = Self {
                vcpus: vec![FakeVcpu::default(); max as usize],
                ..Self::default()
            };
            for v in m.vcpus.iter_mut().take(boot as usize) {
                *v = FakeVcpu {
                    thread: true,
                    present: true,
                    insert_acked: true,
                    started: true,
                    ..FakeVcpu::default()
                };
            }
            m
        }

        fn v(&mut self, id: VcpuId) -> Result<&mut FakeVcpu, CpuError> {
            self.vcpus
                .get_mut(id.index())
                .ok_or(CpuError::NoSuchVcpu(id.get()))
        }
    }

    impl Machine for FakeMachine {
        fn begin_add(&mut self, id: VcpuId) -> Result<(), CpuError> {
            if self.add_fails.contains(&id.get()) {
                return Err(CpuError::NoSuchVcpu(id.get()));
            }
            let v = self.v(id)?;
            assert!(!v.thread && !v.present, "add of a vCPU in use: {v:?}");
            *v = FakeVcpu {
                thread: true,
                present: true,
                inserting: true,
                ..FakeVcpu::default()
            };
            self.created += 1;
            Ok(())
        }

        fn withdraw_insert(&mut self, id: VcpuId) -> Withdraw {
            let Ok(v) = self.v(id) else {
                return Withdraw::Withdrawn;
            };
            if v.inserting {
                v.inserting = false;
                v.present = false;
                Withdraw::Withdrawn
            } else {
                Withdraw::Seen
            }
        }

        fn started(&mut self, id: VcpuId) -> Started {
            if self.started_unknown_once.remove(&id.get()) {
                return Started::Unknown;
            }
            match self.v(id) {
                Ok(v) if v.started => Started::Yes,
                _ => Started::No,
            }
        }

        fn request_eject(&mut self, id: VcpuId) -> Result<(), CpuError> {
            let v = self.v(id)?;
            if !v.present || !v.thread {
                return Err(CpuError::NoSuchVcpu(id.get()));
            }
            v.eject_pending = true;
            v.eject_acked = false;
            Ok(())
        }

        fn withdraw_eject(&mut self, id: VcpuId) -> Withdraw {
            let Ok(v) = self.v(id) else {
                return Withdraw::Withdrawn;
            };
            if v.ejected {
                Withdraw::Ejected
            } else if v.eject_pending && v.eject_acked {
                // Withdrawn, but the guest may be acting on it already.
                v.eject_pending = false;
                Withdraw::Seen
            } else {
                v.eject_pending = false;
                Withdraw::Withdrawn
            }
        }

        fn stop(&mut self, id: VcpuId) -> Result<(), CpuError> {
            if self.stuck.contains(&id.get()) {
                return Err(CpuError::NoSuchVcpu(id.get()));
            }
            let v = self.v(id)?;
            *v = FakeVcpu::default();
            Ok(())
        }

        fn diagnose(&self, _id: VcpuId, _what: &str) {}

        fn fd_counts(&self) -> (u64, u64) {
            (self.created, 0)
        }

        fn ignored_register_accesses(&self) -> u64 {
            0
        }
    }
}
