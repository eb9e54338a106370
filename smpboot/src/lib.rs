//! Per-CPU hotplug threads: a userspace rendering of Linux's
//! `kernel/smpboot.c`.
//!
//! A client describes one kind of per-CPU worker once, as a
//! [`ThreadDescriptor`]. The [`Registry`] then keeps exactly one thread of
//! that kind on every online CPU and walks each thread through create,
//! setup, park, unpark and stop as CPUs come and go, calling the
//! descriptor's callbacks at each change. The behaviour follows
//! `shared/design/smpboot-spec.md`, statement by statement.
//!
//! # Using it
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use smpboot::{Registry, SimTopology, ThreadDescriptor};
//!
//! let topo = SimTopology::new(4, [0, 1]);
//! let registry = Registry::builder()
//!     .topology(&topo).unwrap()
//!     .placement(Arc::new(topo.placement()))
//!     .build().unwrap();
//! let pending = Arc::new(AtomicBool::new(false));
//! let (p1, p2) = (Arc::clone(&pending), Arc::clone(&pending));
//! let desc = ThreadDescriptor::builder(
//!     "worker/%u",
//!     move |_cpu| p1.load(Ordering::Acquire),
//!     move |_ctx| { p2.store(false, Ordering::Release); },
//! )
//! .setup(|cpu| println!("worker on CPU {cpu} starts"))
//! .build();
//! let waker = registry.register(&desc).unwrap();   // threads on CPUs 0, 1
//! pending.store(true, Ordering::Release);
//! waker.wake(0);                                    // never lost
//!
//! registry.prepare(2).unwrap();                     // before CPU 2 comes up
//! registry.online(2).unwrap();                      // after it came up
//! registry.offline(2).unwrap();                     // parks, synchronously
//! registry.unregister(&desc).unwrap();              // stops and joins all
//! ```
//!
//! # Driving it from a topology source (the guest agent)
//! The guest agent learns of CPU changes from the kernel (the sysfs
//! writes it makes itself, uevents for the rest) and calls, around each:
//!
//! | kernel event                        | call                                   |
//! |-------------------------------------|----------------------------------------|
//! | before writing 1 to `cpuN/online`   | [`Hotplug::prepare`] (creates, parked) |
//! | after that write succeeded          | [`Hotplug::online`] (unparks)          |
//! | before writing 0 to `cpuN/online`   | [`Hotplug::offline`] (parks, waits)    |
//! | the write of 0 failed               | [`Hotplug::failed_offline`] (unparks)  |
//! | uevent: CPU went down without us    | [`Hotplug::forced_offline`] (reported) |
//!
//! A failed bring-up after `prepare` needs no call: the threads stay
//! parked and are reused. Take [`Registry::hotplug`] to hold the lock
//! across a whole bring-up or tear-down (the single-step methods on
//! [`Registry`] take it per step). [`CpuHotplug`] does all of this against
//! any [`Topology`], including acting on stale or echoed uevents only when
//! `cpuN/online` confirms them; the agent's sysfs + uevent implementation
//! of [`Topology`] plugs in there ([`parse_cpu_list`] reads
//! `cpu/possible` and `cpu/online`). A [`Snapshot`] is plain data for the
//! agent to send to the host.
//!
//! # Threading model
//! - **Controller context**: whoever calls the registry (the agent's event
//!   loop, a test). Every registry method except waking runs there, under
//!   one mutex, the *hotplug lock*, and is synchronous: register creates
//!   and starts threads, offline waits until every thread is parked,
//!   unregister joins its threads. Only `online`/`failed_offline` unparks
//!   and `register`'s unparks do not wait for the threads to run.
//! - **Per-CPU threads**: one OS thread per (descriptor, CPU), pinned
//!   through a [`Placement`] and named from the descriptor's pattern. It
//!   runs every callback except `create` (which runs in the controller).
//!   Its loop checks stop, then park, then the setup/unpark transition,
//!   then `thread_should_run`.
//! - **Wakers**: any thread may call [`WakeHandle::wake`]; it touches only
//!   the target's control word (an atomic and, if the target sleeps, one
//!   futex wake). A wake that arrives between a `false` from
//!   `thread_should_run` and the sleep is kept as a token, never lost.
//!
//! Each per-CPU thread has a control word written by the controller (stop,
//! park) and by wakers, and an acknowledgement word written by the thread
//! (parked, exited). A park waits on the acknowledgement; nothing else
//! blocks the controller on a thread except joining it on stop.
//!
//! # Lock order
//! There is one lock that callers see: the hotplug lock. Internal locks
//! (a thread's failure message, the fault injector's CPU set, the
//! simulated topology's event queue) are leaves, never held while taking
//! another. Per-CPU threads never take the hotplug lock, and the
//! controller holds it while waiting for them (park, join); hence a
//! callback or an observer must not call a locked registry method. Such a
//! call returns [`RegistryError::Reentrant`] instead of deadlocking.
//!
//! # Beyond the kernel
//! A [`Snapshot`] shows every (descriptor, CPU) thread with its status,
//! last CPU and callback counts. Thread-creation failure is a typed error,
//! injectable with [`FaultInjector`]. A panicking callback marks its thread
//! [`ThreadStatus::Failed`]; the registry and the other threads carry on.

#![deny(missing_docs)]

mod control;
mod descriptor;
mod driver;
mod event;
mod futex;
mod hotplug;
mod placement;
mod registry;
mod sim;
mod snapshot;
mod spawn;
mod topology;
mod worker;

pub use control::{ThreadContext, ThreadStatus};
pub use descriptor::{
    CleanupFn, CpuFn, DescriptorBuilder, ShouldRunFn, ThreadDescriptor, ThreadFn,
};
pub use driver::{CpuHotplug, EventOutcome, HotplugError};
pub use event::{DescriptorId, Observer, RegistryEvent};
pub use hotplug::{CpuState, ForcedOffline, Hotplug, Transition};
pub use placement::{
    current_affinity, current_cpu, pin_current_thread, set_current_affinity, PinnedPlacement,
    Placement, PlacementError,
};
pub use registry::{Registry, RegistryBuilder, RegistryError, WakeHandle, MAX_CPUS};
pub use sim::{SimPlacement, SimTopology};
pub use snapshot::{CallCounts, CpuSnapshot, DescriptorSnapshot, Snapshot, ThreadSnapshot};
pub use spawn::{FaultInjector, SpawnError, StdSpawner, ThreadBody, ThreadSpawner};
pub use topology::{parse_cpu_list, CpuEvent, CpuEventKind, Topology, TopologyError};
pub use worker::CreateError;
