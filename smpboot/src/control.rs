//! The per-thread control block: the request word the controller writes,
//! the acknowledgement word the thread writes, and the thread's counters.
//!
//! The request word (`req`) holds the controller's requests and the
//! client's wake token:
//!
//! | bits  | meaning                                                 |
//! |-------|---------------------------------------------------------|
//! | 0     | `STOP`: leave the loop                                  |
//! | 1     | `STOP_ONLINE`: the CPU was online when stop was asked   |
//! | 2     | `PARK`: park (cleared by unpark)                        |
//! | 3     | `WAKE`: a wake token, consumed by the thread            |
//! | 8..31 | park generation, bumped atomically with each `PARK` set |
//! | 31    | `SLEEPING`: the thread is (about to be) in `futex_wait` |
//!
//! Only the thread sets or clears `SLEEPING` and clears `WAKE`; writers
//! issue a futex wake only when they see `SLEEPING`, so a wake on a busy
//! thread costs one atomic operation. The park generation makes every park
//! request a new value of the word, so a thread that read the word before
//! an unpark/park pair cannot sleep on a stale value (no ABA).
//!
//! The acknowledgement word (`ack`) holds the last park generation the
//! thread acknowledged while blocked in park, an `EXITED` bit, and a
//! `WAITER` bit set by the (single) controller before it sleeps on it.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::futex;

pub(crate) const STOP: u32 = 1;
pub(crate) const STOP_ONLINE: u32 = 1 << 1;
pub(crate) const PARK: u32 = 1 << 2;
pub(crate) const WAKE: u32 = 1 << 3;
const GEN_SHIFT: u32 = 8;
const GEN_MASK: u32 = (1 << 23) - 1;
const SLEEPING: u32 = 1 << 31;

const ACK_GEN_MASK: u32 = GEN_MASK;
const ACK_EXITED: u32 = 1 << 30;
const ACK_WAITER: u32 = 1 << 31;

/// The park generation carried by a request word.
pub(crate) fn park_gen(req: u32) -> u32 {
    (req >> GEN_SHIFT) & GEN_MASK
}

/// The request word a new thread starts with: parked, generation 1.
const INITIAL_REQ: u32 = PARK | (1 << GEN_SHIFT);
/// The generation a creator waits for after spawning.
pub(crate) const INITIAL_GEN: u32 = 1;

/// The kernel's `td->status`, plus our own failure and exit states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadStatus {
    /// No thread exists for this (descriptor, CPU).
    Absent,
    /// The thread exists but has not run `setup` yet (the kernel's
    /// `HP_THREAD_NONE`).
    Created,
    /// The thread ran `setup` (or `unpark`) and runs its work loop.
    Active,
    /// The thread ran its `park` callback (the kernel's `HP_THREAD_PARKED`).
    Parked,
    /// A callback panicked; the thread runs no more callbacks until stopped.
    Failed,
    /// The thread left its loop.
    Exited,
}

impl ThreadStatus {
    fn to_u8(self) -> u8 {
        match self {
            ThreadStatus::Absent => 0,
            ThreadStatus::Created => 1,
            ThreadStatus::Active => 2,
            ThreadStatus::Parked => 3,
            ThreadStatus::Failed => 4,
            ThreadStatus::Exited => 5,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ThreadStatus::Created,
            2 => ThreadStatus::Active,
            3 => ThreadStatus::Parked,
            4 => ThreadStatus::Failed,
            5 => ThreadStatus::Exited,
            _ => ThreadStatus::Absent,
        }
    }
}

/// Which callback a counter or a failure refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callback {
    Create,
    Setup,
    ShouldRun,
    ThreadFn,
    Park,
    Unpark,
    Cleanup,
}

impl Callback {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Callback::Create => "create",
            Callback::Setup => "setup",
            Callback::ShouldRun => "thread_should_run",
            Callback::ThreadFn => "thread_fn",
            Callback::Park => "park",
            Callback::Unpark => "unpark",
            Callback::Cleanup => "cleanup",
        }
    }
}

/// Completed calls of each callback of one thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) create: AtomicU64,
    pub(crate) setup: AtomicU64,
    pub(crate) park: AtomicU64,
    pub(crate) unpark: AtomicU64,
    pub(crate) thread_fn: AtomicU64,
    pub(crate) cleanup: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(&self, cb: Callback) {
        let c = match cb {
            Callback::Create => &self.create,
            Callback::Setup => &self.setup,
            Callback::Park => &self.park,
            Callback::Unpark => &self.unpark,
            Callback::ThreadFn => &self.thread_fn,
            Callback::Cleanup => &self.cleanup,
            Callback::ShouldRun => return,
        };
        c.fetch_add(1, Ordering::Release);
    }
}

/// Shared state between one thread and its controller.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) cpu: u32,
    pub(crate) serial: u64,
    req: AtomicU32,
    ack: AtomicU32,
    status: AtomicU8,
    last_cpu: AtomicU32,
    pub(crate) counters: Counters,
    failure: Mutex<Option<String>>,
}

const NO_CPU: u32 = u32::MAX;

impl Control {
    pub(crate) fn new(cpu: u32, serial: u64) -> Self {
        Control {
            cpu,
            serial,
            req: AtomicU32::new(INITIAL_REQ),
            ack: AtomicU32::new(0),
            status: AtomicU8::new(ThreadStatus::Created.to_u8()),
            last_cpu: AtomicU32::new(NO_CPU),
            counters: Counters::default(),
            failure: Mutex::new(None),
        }
    }

    // ----- controller and client side -----

    /// Sets `bits` in the request word and wakes the thread if it sleeps.
    fn post(&self, bits: u32) {
        let prev = self.req.fetch_or(bits, Ordering::AcqRel);
        if prev & SLEEPING != 0 {
            futex::wake_all(&self.req);
        }
    }

    /// Gives the thread a wake token (never lost: see the module docs).
    pub(crate) fn wake(&self) {
        self.post(WAKE);
    }

    /// Asks the thread to park and returns the generation to wait for.
    pub(crate) fn request_park(&self) -> u32 {
        let prev = self
            .req
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let gen = (park_gen(v) + 1) & GEN_MASK;
                Some((v & !(GEN_MASK << GEN_SHIFT)) | (gen << GEN_SHIFT) | PARK)
            })
            .unwrap_or_else(|v| v);
        if prev & SLEEPING != 0 {
            futex::wake_all(&self.req);
        }
        (park_gen(prev) + 1) & GEN_MASK
    }

    /// Waits until the thread acknowledged park generation `gen` (true) or
    /// exited (false).
    pub(crate) fn wait_parked(&self, gen: u32) -> bool {
        loop {
            let v = self.ack.load(Ordering::Acquire);
            if v & ACK_EXITED != 0 {
                return false;
            }
            if v & ACK_GEN_MASK == gen {
                return true;
            }
            let waiting = v | ACK_WAITER;
            if v != waiting
                && self
                    .ack
                    .compare_exchange(v, waiting, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                continue;
            }
            futex::wait(&self.ack, waiting);
        }
    }

    /// Lets a parked thread run again; does not wait for it.
    pub(crate) fn unpark(&self) {
        let prev = self.req.fetch_and(!PARK, Ordering::AcqRel);
        if prev & SLEEPING != 0 {
            futex::wake_all(&self.req);
        }
    }

    /// Asks the thread to leave its loop; `online` is passed to `cleanup`.
    pub(crate) fn request_stop(&self, online: bool) {
        let bits = if online { STOP | STOP_ONLINE } else { STOP };
        self.post(bits);
    }

    // ----- thread side -----

    /// Reads the request word and consumes the wake token.
    pub(crate) fn take_requests(&self) -> u32 {
        self.req.fetch_and(!WAKE, Ordering::AcqRel)
    }

    /// Reads the request word without consuming anything.
    pub(crate) fn requests(&self) -> u32 {
        self.req.load(Ordering::Acquire)
    }

    /// Sleeps until `done(req)` holds; returns the word that satisfied it.
    pub(crate) fn sleep_until(&self, done: impl Fn(u32) -> bool) -> u32 {
        loop {
            let v = self.req.load(Ordering::Acquire);
            if done(v) {
                if v & SLEEPING != 0 {
                    return self.req.fetch_and(!SLEEPING, Ordering::AcqRel) & !SLEEPING;
                }
                return v;
            }
            if let Some(asleep) = self.prepare_sleep(v) {
                futex::wait(&self.req, asleep);
            }
        }
    }

    /// Sets `SLEEPING` in the word last read as `v`; `None` if it changed.
    fn prepare_sleep(&self, v: u32) -> Option<u32> {
        if v & SLEEPING != 0 {
            return Some(v);
        }
        self.req
            .compare_exchange(v, v | SLEEPING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| v | SLEEPING)
    }

    /// Blocks in park until unparked or stopped, acknowledging each park
    /// generation it sees. Returns the request word it left with.
    pub(crate) fn park_loop(&self) -> u32 {
        loop {
            let v = self.req.load(Ordering::Acquire);
            if v & STOP != 0 || v & PARK == 0 {
                if v & SLEEPING != 0 {
                    return self.req.fetch_and(!SLEEPING, Ordering::AcqRel) & !SLEEPING;
                }
                return v;
            }
            self.acknowledge_park(park_gen(v));
            if let Some(asleep) = self.prepare_sleep(v) {
                futex::wait(&self.req, asleep);
            }
        }
    }

    fn acknowledge_park(&self, gen: u32) {
        let cur = self.ack.load(Ordering::Acquire);
        if cur & ACK_GEN_MASK == gen {
            return;
        }
        let prev = self.ack.swap(gen, Ordering::AcqRel);
        if prev & ACK_WAITER != 0 {
            futex::wake_all(&self.ack);
        }
    }

    /// Marks the thread gone and wakes a controller waiting for a park.
    pub(crate) fn acknowledge_exit(&self) {
        self.set_status(ThreadStatus::Exited);
        self.ack.fetch_or(ACK_EXITED, Ordering::AcqRel);
        futex::wake_all(&self.ack);
    }

    // ----- observable state -----

    pub(crate) fn status(&self) -> ThreadStatus {
        ThreadStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    pub(crate) fn set_status(&self, s: ThreadStatus) {
        self.status.store(s.to_u8(), Ordering::Release);
    }

    pub(crate) fn record_cpu(&self, cpu: u32) {
        self.last_cpu.store(cpu, Ordering::Relaxed);
    }

    pub(crate) fn last_cpu(&self) -> Option<u32> {
        match self.last_cpu.load(Ordering::Relaxed) {
            NO_CPU => None,
            c => Some(c),
        }
    }

    /// Records a failure and moves the thread to [`ThreadStatus::Failed`].
    pub(crate) fn fail(&self, message: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(message);
        }
        drop(f);
        self.set_status(ThreadStatus::Failed);
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What `thread_fn` can ask about its thread while it runs.
///
/// `thread_fn` is never interrupted: a long one should poll
/// [`should_yield`](Self::should_yield) and return early, so that park and
/// stop requests (a CPU going down, an unregister) are served promptly.
#[derive(Debug, Clone, Copy)]
pub struct ThreadContext<'a> {
    control: &'a Control,
}

impl<'a> ThreadContext<'a> {
    pub(crate) fn new(control: &'a Control) -> Self {
        ThreadContext { control }
    }

    /// The CPU this thread serves.
    pub fn cpu(&self) -> u32 {
        self.control.cpu
    }

    /// A park request is pending (the CPU is going down).
    pub fn should_park(&self) -> bool {
        self.control.requests() & PARK != 0
    }

    /// A stop request is pending (the descriptor is being unregistered).
    pub fn should_stop(&self) -> bool {
        self.control.requests() & STOP != 0
    }

    /// Either request is pending: return from `thread_fn` soon.
    pub fn should_yield(&self) -> bool {
        self.control.requests() & (STOP | PARK) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn park_generation_wraps_and_bumps() {
        let c = Control::new(0, 1);
        assert_eq!(park_gen(c.requests()), INITIAL_GEN);
        c.unpark();
        let g = c.request_park();
        assert_eq!(g, 2);
        assert_eq!(park_gen(c.requests()), 2);
        assert_ne!(c.requests() & PARK, 0);
    }

    #[test]
    fn wake_before_sleep_is_not_lost() {
        let c = Control::new(0, 1);
        c.unpark();
        c.take_requests();
        c.wake();
        // The token is set: sleeping returns at once.
        let v = c.sleep_until(|v| v & WAKE != 0);
        assert_ne!(v & WAKE, 0);
    }

    #[test]
    fn park_acknowledgement_reaches_the_controller() {
        let c = Arc::new(Control::new(0, 1));
        let t = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                // Like the worker: an unpark may be seen before the next
                // park request; only stop ends the loop.
                while c.park_loop() & STOP == 0 {}
                c.acknowledge_exit();
            })
        };
        assert!(c.wait_parked(INITIAL_GEN));
        c.unpark();
        let g = c.request_park();
        assert!(c.wait_parked(g));
        c.request_stop(false);
        t.join().unwrap();
        assert!(!c.wait_parked(g + 1));
        assert_eq!(c.status(), ThreadStatus::Exited);
    }

    #[test]
    fn sleeping_thread_wakes_on_token() {
        let c = Arc::new(Control::new(0, 1));
        c.unpark();
        let t = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.sleep_until(|v| v & WAKE != 0))
        };
        std::thread::sleep(Duration::from_millis(10));
        c.wake();
        let v = t.join().unwrap();
        assert_ne!(v & WAKE, 0);
        assert_eq!(c.requests() & SLEEPING, 0);
    }

    #[test]
    fn failure_keeps_the_first_message() {
        let c = Control::new(2, 7);
        c.fail("first".into());
        c.fail("second".into());
        assert_eq!(c.failure().as_deref(), Some("first"));
        assert_eq!(c.status(), ThreadStatus::Failed);
        assert_eq!(c.last_cpu(), None);
        c.record_cpu(2);
        assert_eq!(c.last_cpu(), Some(2));
    }
}
