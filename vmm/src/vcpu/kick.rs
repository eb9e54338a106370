//! Kicking a vCPU thread out of KVM_RUN, the way Firecracker does it: no
//! thread but the vCPU's own ever writes its `kvm_run`.
//!
//! - The vCPU thread publishes the address of its `kvm_run.immediate_exit`
//!   in a thread-local (`publish`) before its first KVM_RUN and clears
//!   it before it hands the vCPU back.
//! - The kick signal ([`kick_signal`], SIGRTMIN+0) is sent to that thread;
//!   its handler runs *on* the thread and sets `immediate_exit = 1`
//!   through the thread-local. Inside KVM_RUN the signal makes it return
//!   EINTR; between the stop-flag check and KVM_RUN, `immediate_exit`
//!   makes the next KVM_RUN return at once.
//! - The VMM thread only sets flags and sends signals.
//!
//! A registry of the running vCPU threads (`register`) lets a panicking
//! VMM stop them all without their handles ([`stop_all`]).

use std::cell::Cell;
use std::marker::PhantomData;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::lock;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

/// How often a stop request repeats its signal until the thread ends.
pub const KICK_REPEAT: Duration = Duration::from_millis(10);

/// The kick signal number.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's vCPU `immediate_exit` byte, or null. Const-initialised
    /// and without a destructor, so the signal handler can read it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// While alive, the kick signal sets the published `immediate_exit` byte
/// of the current thread. Clears it on drop. Not `Send`: it belongs to the
/// thread that published.
#[derive(Debug)]
pub(crate) struct Published {
    _thread_bound: PhantomData<*mut u8>,
}

/// Publishes `immediate_exit` for this thread's kick signal handler.
///
/// # Safety
/// `immediate_exit` must point to a writable byte (the `immediate_exit`
/// field of this thread's vCPU `kvm_run` mapping) that stays mapped until
/// the returned guard is dropped, and the guard must be dropped on this
/// thread (it is not `Send`).
pub(crate) unsafe fn publish(immediate_exit: *mut u8) -> Published {
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    Published {
        _thread_bound: PhantomData,
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Sets the byte `p` to 1.
fn set_immediate_exit(p: *mut u8) {
    // SAFETY: `p` is non-null only between `publish` and the guard's drop
    // on this very thread, and `publish`'s contract keeps the byte mapped
    // and writable until then. The handler runs on the publishing thread,
    // so no other thread writes through `p`; a volatile byte store cannot
    // tear.
    unsafe { std::ptr::write_volatile(p, 1) }
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a TLS read of a const-initialised Cell and a store.
    let _ = IMMEDIATE_EXIT.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            set_immediate_exit(p);
        }
    });
}

/// Installs the kick signal's handler (once per process).
pub(crate) fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *RESULT.get_or_init(|| register_signal_handler(kick_signal(), kick_handler))
}

/// A running vCPU thread as the registry knows it.
#[derive(Debug)]
struct Entry {
    token: u64,
    thread: libc::pthread_t,
    stop: Arc<AtomicBool>,
}

static RUNNING: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

/// This thread's pthread id.
fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Sends the kick signal to `thread`.
fn signal_thread(thread: libc::pthread_t) {
    // SAFETY: callers pass a thread of the registry while holding its lock:
    // a registered thread deregisters (under that lock) before it exits, so
    // the pthread id is alive. A failure (ESRCH) is harmless.
    let _ = unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// The current vCPU thread's place in the registry; removed on drop (so
/// before the thread exits).
#[derive(Debug)]
pub(crate) struct Registration {
    token: u64,
    _thread_bound: PhantomData<*mut u8>,
}

/// Registers the current thread as a running vCPU thread stopped by `stop`.
pub(crate) fn register(stop: Arc<AtomicBool>) -> Registration {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    lock(&RUNNING).push(Entry {
        token,
        thread: current_thread(),
        stop,
    });
    Registration {
        token,
        _thread_bound: PhantomData,
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&RUNNING).retain(|e| e.token != self.token);
    }
}

/// vCPU threads running now (registered).
pub fn running_threads() -> usize {
    lock(&RUNNING).len()
}

/// Asks every running vCPU thread to stop and kicks it, repeating the kick
/// every [`KICK_REPEAT`] until all have left their loops or `timeout`
/// passed. Returns how many are still running. For a VMM that lost its
/// vCPU handles (a panic); the threads are not joined.
pub fn stop_all(timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let left = {
            let running = lock(&RUNNING);
            for e in running.iter() {
                e.stop.store(true, Ordering::Release);
                signal_thread(e.thread);
            }
            running.len()
        };
        let now = Instant::now();
        if left == 0 || now >= deadline {
            return left;
        }
        std::thread::sleep(KICK_REPEAT.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use vmm_sys_util::signal::Killable;

    fn read(p: *const u8) -> u8 {
        // SAFETY: tests pass a pointer to a live local byte.
        unsafe { std::ptr::read_volatile(p) }
    }

    fn wait_for_byte(p: *const u8, want: u8) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if read(p) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn the_kick_sets_only_the_target_threads_published_byte() {
        install_handler().unwrap();
        let (to_thread, from_test) = mpsc::channel::<()>();
        let (to_test, from_thread) = mpsc::channel::<(bool, u8)>();
        let thread = std::thread::spawn(move || {
            let mut byte = 0u8;
            let p: *mut u8 = &mut byte;
            // SAFETY: `byte` outlives the guard, dropped below on this thread.
            let published = unsafe { publish(p) };
            to_test.send((true, 0)).unwrap();
            // The test signals this thread: the handler, running here, sets the byte.
            let set = wait_for_byte(p, 1);
            drop(published);
            // SAFETY: as above; plain write to a live local.
            unsafe { std::ptr::write_volatile(p, 0) };
            to_test.send((set, 0)).unwrap();
            // Unpublished: a kick must not touch it.
            from_test.recv().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            to_test.send((true, read(p))).unwrap();
        });
        assert!(from_thread.recv().unwrap().0);
        thread.kill(kick_signal()).unwrap();
        let (set, _) = from_thread.recv().unwrap();
        assert!(set, "the handler did not set the published byte");
        thread.kill(kick_signal()).unwrap();
        to_thread.send(()).unwrap();
        let (_, after) = from_thread.recv().unwrap();
        assert_eq!(after, 0, "a kick wrote to an unpublished byte");
        thread.join().unwrap();
    }

    #[test]
    fn stop_all_stops_registered_threads_and_waits_for_them() {
        install_handler().unwrap();
        let stops: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let threads: Vec<_> = stops
            .iter()
            .map(|stop| {
                let stop = stop.clone();
                let ready = ready_tx.clone();
                std::thread::spawn(move || {
                    let reg = register(stop.clone());
                    ready.send(()).unwrap();
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    drop(reg);
                })
            })
            .collect();
        for _ in 0..3 {
            ready_rx.recv().unwrap();
        }
        assert_eq!(stop_all(Duration::from_secs(5)), 0);
        assert!(stops.iter().all(|s| s.load(Ordering::Acquire)));
        for t in threads {
            t.join().unwrap();
        }
    }
}
