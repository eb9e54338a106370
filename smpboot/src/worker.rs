//! The per-CPU thread: its loop (statements 12 to 20) and the handle the
//! registry keeps to create, park, unpark and stop it.
//!
//! Each loop iteration checks, in this order: stop, then park, then the
//! setup or unpark transition, then `thread_should_run`. After a setup or
//! unpark transition the loop starts over, so stop and park are checked
//! again before any work runs.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;

use crate::control::{
    Callback, Control, ThreadContext, ThreadStatus, INITIAL_GEN, PARK, STOP, STOP_ONLINE, WAKE,
};
use crate::descriptor::ThreadDescriptor;
use crate::placement::{Placement, PlacementError};
use crate::spawn::{SpawnError, ThreadSpawner};

/// Errors of creating one per-CPU thread.
#[derive(Debug, Error)]
pub enum CreateError {
    /// The spawner could not start the thread.
    #[error("cannot spawn the thread")]
    Spawn(#[from] SpawnError),
    /// The new thread could not be placed on its CPU.
    #[error("cannot place the new thread")]
    Bind(#[source] PlacementError),
}

thread_local! {
    /// Set on per-CPU threads and while a thread holds the hotplug lock.
    static IN_REGISTRY: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a per-CPU thread or holds the hotplug lock
/// (calling a locked registry method would deadlock).
pub(crate) fn inside_registry() -> bool {
    IN_REGISTRY.with(Cell::get)
}

/// Marks the calling thread as inside the registry until dropped.
#[derive(Debug)]
pub(crate) struct ReentryGuard {
    was: bool,
}

impl ReentryGuard {
    pub(crate) fn enter() -> Self {
        ReentryGuard {
            was: IN_REGISTRY.with(|c| c.replace(true)),
        }
    }
}

impl Drop for ReentryGuard {
    fn drop(&mut self) {
        let was = self.was;
        IN_REGISTRY.with(|c| c.set(was));
    }
}

/// The registry's handle on one per-CPU thread.
#[derive(Debug)]
pub(crate) struct ThreadHandle {
    pub(crate) control: Arc<Control>,
    join: Option<JoinHandle<()>>,
    /// Park requested and not yet undone (the registry's view).
    parked: bool,
}

impl ThreadHandle {
    /// Creates the thread for `cpu` and waits until it is parked.
    pub(crate) fn spawn(
        desc: &Arc<ThreadDescriptor>,
        cpu: u32,
        serial: u64,
        placement: &Arc<dyn Placement>,
        spawner: &dyn ThreadSpawner,
    ) -> Result<Self, CreateError> {
        let control = Arc::new(Control::new(cpu, serial));
        let bind_error = Arc::new(Mutex::new(None));
        let worker = Worker {
            desc: Arc::clone(desc),
            ctl: Arc::clone(&control),
            placement: Arc::clone(placement),
        };
        let slot = Arc::clone(&bind_error);
        let join = spawner.spawn(
            desc.thread_name(cpu),
            cpu,
            Box::new(move || worker.run(&slot)),
        )?;
        if control.wait_parked(INITIAL_GEN) {
            return Ok(ThreadHandle {
                control,
                join: Some(join),
                parked: true,
            });
        }
        // The thread exited at once: it could not be placed.
        if join.join().is_err() {
            log::error!("smpboot: thread for CPU {cpu} panicked at start");
        }
        let err = bind_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(PlacementError::Unknown(cpu));
        Err(CreateError::Bind(err))
    }

    /// Runs the descriptor's `create` callback for this thread, here.
    pub(crate) fn call_create(&self, desc: &ThreadDescriptor) {
        if let Some(create) = &desc.create {
            let cpu = self.control.cpu;
            let res = catch_unwind(AssertUnwindSafe(|| create(cpu)));
            self.control.counters.bump(Callback::Create);
            if let Err(p) = res {
                report_panic(&self.control, Callback::Create, p.as_ref());
            }
        }
    }

    /// Whether a park is requested and not undone.
    pub(crate) fn is_parked(&self) -> bool {
        self.parked
    }

    /// Asks the thread to park (statement 9); `None` if a park is already
    /// requested (a second request gets no second `park` call). Follow
    /// with [`wait_parked`](Self::wait_parked).
    pub(crate) fn request_park(&mut self) -> Option<u32> {
        if self.parked {
            return None;
        }
        self.parked = true;
        Some(self.control.request_park())
    }

    /// Waits until the thread is blocked in park after request `gen`.
    pub(crate) fn wait_parked(&self, gen: u32) {
        if !self.control.wait_parked(gen) {
            log::warn!(
                "smpboot: thread for CPU {} exited while parking",
                self.control.cpu
            );
        }
    }

    /// Lets the thread run again; does not wait for it (statement 8).
    pub(crate) fn unpark(&mut self) {
        if self.parked {
            self.control.unpark();
            self.parked = false;
        }
    }

    /// Stops the thread and joins it; `online` goes to `cleanup`.
    pub(crate) fn stop(mut self, online: bool) {
        self.stop_and_join(online);
    }

    fn stop_and_join(&mut self, online: bool) {
        if let Some(join) = self.join.take() {
            self.control.request_stop(online);
            if join.join().is_err() {
                log::error!("smpboot: thread for CPU {} panicked", self.control.cpu);
            }
        }
    }
}

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        self.stop_and_join(false);
    }
}

/// What runs on the per-CPU thread.
struct Worker {
    desc: Arc<ThreadDescriptor>,
    ctl: Arc<Control>,
    placement: Arc<dyn Placement>,
}

impl Worker {
    fn run(self, bind_error: &Mutex<Option<PlacementError>>) {
        let _inside = ReentryGuard::enter();
        match self.placement.bind(self.ctl.cpu) {
            Ok(()) => self.run_loop(),
            Err(e) => *bind_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
        }
        self.ctl.acknowledge_exit();
    }

    fn run_loop(&self) {
        let cpu = self.ctl.cpu;
        let desc = &*self.desc;
        loop {
            let req = self.ctl.take_requests();
            if req & STOP != 0 {
                self.stop(req & STOP_ONLINE != 0);
                return;
            }
            if req & PARK != 0 {
                self.park();
                continue;
            }
            match self.ctl.status() {
                ThreadStatus::Created => {
                    if let Some(setup) = &desc.setup {
                        if self.call(Callback::Setup, || setup(cpu)).is_none() {
                            continue;
                        }
                    }
                    self.ctl.set_status(ThreadStatus::Active);
                    continue;
                }
                ThreadStatus::Parked => {
                    if let Some(unpark) = &desc.unpark {
                        if self.call(Callback::Unpark, || unpark(cpu)).is_none() {
                            continue;
                        }
                    }
                    self.ctl.set_status(ThreadStatus::Active);
                    continue;
                }
                ThreadStatus::Active => {}
                ThreadStatus::Failed | ThreadStatus::Exited | ThreadStatus::Absent => {
                    self.ctl.sleep_until(|v| v & (STOP | PARK) != 0);
                    continue;
                }
            }
            match self.call(Callback::ShouldRun, || (desc.thread_should_run)(cpu)) {
                Some(true) => {
                    let ctx = ThreadContext::new(&self.ctl);
                    self.call(Callback::ThreadFn, || (desc.thread_fn)(&ctx));
                }
                Some(false) => {
                    // A wake after the `false` answer left WAKE set: no sleep.
                    self.ctl.sleep_until(|v| v & (WAKE | STOP | PARK) != 0);
                }
                None => {}
            }
        }
    }

    /// The park branch: the callback if active, then block until unparked.
    fn park(&self) {
        if self.ctl.status() == ThreadStatus::Active {
            if let Some(park) = &self.desc.park {
                let cpu = self.ctl.cpu;
                if self.call(Callback::Park, || park(cpu)).is_some() {
                    self.ctl.set_status(ThreadStatus::Parked);
                }
            }
        }
        let left = self.ctl.park_loop();
        if left & STOP == 0 {
            // Unparked: the CPU may have been down, which broke the affinity.
            if let Err(e) = self.placement.bind(self.ctl.cpu) {
                log::error!("smpboot: cannot re-pin thread to CPU {}: {e}", self.ctl.cpu);
                self.ctl
                    .fail(format!("cannot re-pin to CPU {}: {e}", self.ctl.cpu));
            }
        }
    }

    /// The stop branch: `cleanup` if `setup` ever ran (statements 19, 20).
    fn stop(&self, online: bool) {
        let ran_setup = matches!(
            self.ctl.status(),
            ThreadStatus::Active | ThreadStatus::Parked
        );
        if ran_setup {
            if let Some(cleanup) = &self.desc.cleanup {
                let cpu = self.ctl.cpu;
                self.call(Callback::Cleanup, || cleanup(cpu, online));
            }
        }
    }

    /// Runs one callback, containing a panic (statement 25).
    fn call<R>(&self, cb: Callback, f: impl FnOnce() -> R) -> Option<R> {
        self.ctl
            .record_cpu(self.placement.current_cpu(self.ctl.cpu));
        let res = catch_unwind(AssertUnwindSafe(f));
        self.ctl.counters.bump(cb);
        match res {
            Ok(v) => Some(v),
            Err(p) => {
                report_panic(&self.ctl, cb, p.as_ref());
                None
            }
        }
    }
}

fn report_panic(ctl: &Control, cb: Callback, payload: &(dyn Any + Send)) {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    log::error!("smpboot: {} panicked on CPU {}: {msg}", cb.name(), ctl.cpu);
    ctl.fail(format!("{} panicked: {msg}", cb.name()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::StdSpawner;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct Nowhere;

    impl Placement for Nowhere {
        fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
            if cpu == 99 {
                Err(PlacementError::Unknown(cpu))
            } else {
                Ok(())
            }
        }
        fn current_cpu(&self, cpu: u32) -> u32 {
            cpu
        }
    }

    fn placement() -> Arc<dyn Placement> {
        Arc::new(Nowhere)
    }

    #[test]
    fn bind_failure_is_a_creation_error() {
        let d = ThreadDescriptor::builder("t/%u", |_| false, |_| {}).build();
        let err = ThreadHandle::spawn(&d, 99, 1, &placement(), &StdSpawner::default()).unwrap_err();
        assert!(matches!(
            err,
            CreateError::Bind(PlacementError::Unknown(99))
        ));
    }

    #[test]
    fn second_park_request_gets_no_second_call() {
        let parks = Arc::new(AtomicU32::new(0));
        let p = Arc::clone(&parks);
        let d = ThreadDescriptor::builder("t/%u", |_| false, |_| {})
            .park(move |_| {
                p.fetch_add(1, Ordering::SeqCst);
            })
            .build();
        let mut h = ThreadHandle::spawn(&d, 0, 1, &placement(), &StdSpawner::default()).unwrap();
        h.unpark();
        while h.control.status() != ThreadStatus::Active {
            std::thread::yield_now();
        }
        let gen = h.request_park().unwrap();
        h.wait_parked(gen);
        assert!(h.request_park().is_none());
        // Bypass the handle's guard: a raw second request to the thread.
        let gen = h.control.request_park();
        assert!(h.control.wait_parked(gen));
        assert_eq!(parks.load(Ordering::SeqCst), 1);
        h.stop(false);
    }

    #[test]
    fn dropping_a_handle_stops_the_thread() {
        let d = ThreadDescriptor::builder("t/%u", |_| false, |_| {}).build();
        let h = ThreadHandle::spawn(&d, 0, 1, &placement(), &StdSpawner::default()).unwrap();
        let ctl = Arc::clone(&h.control);
        drop(h);
        assert_eq!(ctl.status(), ThreadStatus::Exited);
    }

    #[test]
    fn reentry_guard_nests() {
        assert!(!inside_registry());
        {
            let _a = ReentryGuard::enter();
            {
                let _b = ReentryGuard::enter();
                assert!(inside_registry());
            }
            assert!(inside_registry());
        }
        assert!(!inside_registry());
    }
}
