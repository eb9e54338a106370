//! Creating OS threads, with a fault injector for tests.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;

/// Errors of thread creation.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// The OS refused a new thread (for example the process hit its limit).
    #[error("the OS refused a new thread")]
    Os(#[source] io::Error),
    /// A [`FaultInjector`] made this creation fail.
    #[error("injected thread-creation failure")]
    Injected,
}

/// The body of a per-CPU thread, handed to a [`ThreadSpawner`].
pub type ThreadBody = Box<dyn FnOnce() + Send + 'static>;

/// Creates the OS thread for one (descriptor, CPU).
pub trait ThreadSpawner: Send + Sync + fmt::Debug {
    /// Starts `body` on a new thread called `name`, meant for `cpu`.
    ///
    /// On error `body` must not have run and no thread may be left behind.
    fn spawn(&self, name: String, cpu: u32, body: ThreadBody)
        -> Result<JoinHandle<()>, SpawnError>;
}

/// Plain `std::thread` creation.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdSpawner {
    stack_size: Option<usize>,
}

impl StdSpawner {
    /// A spawner whose threads get `bytes` of stack.
    pub fn with_stack_size(bytes: usize) -> Self {
        StdSpawner {
            stack_size: Some(bytes),
        }
    }
}

impl ThreadSpawner for StdSpawner {
    fn spawn(
        &self,
        name: String,
        _cpu: u32,
        body: ThreadBody,
    ) -> Result<JoinHandle<()>, SpawnError> {
        let mut b = std::thread::Builder::new().name(name);
        if let Some(size) = self.stack_size {
            b = b.stack_size(size);
        }
        b.spawn(body).map_err(SpawnError::Os)
    }
}

/// A spawner that fails on demand and counts its live threads.
///
/// Failures are armed per CPU ([`fail_on_cpu`](Self::fail_on_cpu)) or for
/// the n-th creation from now ([`fail_nth`](Self::fail_nth)).
/// [`live_threads`](Self::live_threads) proves that nothing leaked.
#[derive(Debug, Default)]
pub struct FaultInjector {
    inner: StdSpawner,
    failing_cpus: Mutex<HashSet<u32>>,
    /// 0: disarmed; n: the n-th creation from now fails.
    countdown: AtomicU64,
    live: Arc<AtomicUsize>,
    spawned: AtomicU64,
    injected: AtomicU64,
}

impl FaultInjector {
    /// A fault injector with nothing armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every creation for `cpu` fails until [`clear`](Self::clear).
    pub fn fail_on_cpu(&self, cpu: u32) {
        self.cpus().insert(cpu);
    }

    /// The `n`-th creation from now fails once (`n` = 1: the next one).
    pub fn fail_nth(&self, n: u64) {
        self.countdown.store(n, Ordering::SeqCst);
    }

    /// Disarms every failure.
    pub fn clear(&self) {
        self.cpus().clear();
        self.countdown.store(0, Ordering::SeqCst);
    }

    /// Threads created by this spawner whose body has not returned yet.
    pub fn live_threads(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Threads created successfully so far.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::SeqCst)
    }

    /// Creations made to fail so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn cpus(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.failing_cpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn should_fail(&self, cpu: u32) -> bool {
        if self.cpus().contains(&cpu) {
            return true;
        }
        self.countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 0).then(|| n - 1)
            })
            .is_ok_and(|n| n == 1)
    }
}

/// Decrements the live count when the thread body ends, even by panic.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ThreadSpawner for FaultInjector {
    fn spawn(
        &self,
        name: String,
        cpu: u32,
        body: ThreadBody,
    ) -> Result<JoinHandle<()>, SpawnError> {
        if self.should_fail(cpu) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(SpawnError::Injected);
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard(Arc::clone(&self.live));
        let wrapped: ThreadBody = Box::new(move || {
            let _guard = guard;
            body();
        });
        // On a spawn error the closure (and the guard in it) is dropped,
        // which undoes the live count.
        let handle = self.inner.spawn(name, cpu, wrapped)?;
        self.spawned.fetch_add(1, Ordering::SeqCst);
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> ThreadBody {
        Box::new(|| {})
    }

    #[test]
    fn std_spawner_names_the_thread() {
        let h = StdSpawner::default()
            .spawn(
                "w/1".into(),
                1,
                Box::new(|| assert_eq!(std::thread::current().name(), Some("w/1"))),
            )
            .unwrap();
        h.join().unwrap();
    }

    #[test]
    fn fail_on_cpu_fails_until_cleared() {
        let f = FaultInjector::new();
        f.fail_on_cpu(3);
        assert!(matches!(
            f.spawn("a".into(), 3, noop()),
            Err(SpawnError::Injected)
        ));
        assert!(matches!(
            f.spawn("a".into(), 3, noop()),
            Err(SpawnError::Injected)
        ));
        f.spawn("b".into(), 2, noop()).unwrap().join().unwrap();
        f.clear();
        f.spawn("a".into(), 3, noop()).unwrap().join().unwrap();
        assert_eq!(f.injected(), 2);
        assert_eq!(f.spawned(), 2);
        assert_eq!(f.live_threads(), 0);
    }

    #[test]
    fn fail_nth_fails_exactly_once() {
        let f = FaultInjector::new();
        f.fail_nth(2);
        f.spawn("a".into(), 0, noop()).unwrap().join().unwrap();
        assert!(f.spawn("a".into(), 0, noop()).is_err());
        f.spawn("a".into(), 0, noop()).unwrap().join().unwrap();
        assert_eq!(f.injected(), 1);
    }

    #[test]
    fn live_count_follows_the_body() {
        let f = FaultInjector::new();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let h = f
            .spawn(
                "a".into(),
                0,
                Box::new(move || {
                    rx.recv().ok();
                }),
            )
            .unwrap();
        assert_eq!(f.live_threads(), 1);
        tx.send(()).unwrap();
        h.join().unwrap();
        assert_eq!(f.live_threads(), 0);
    }
}
