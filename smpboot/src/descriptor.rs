//! The descriptor: what one kind of per-CPU thread does at each step.
//!
//! A [`ThreadDescriptor`] is built once with [`ThreadDescriptor::builder`]
//! and shared as an `Arc`; the registry keeps one thread of that kind on
//! every online CPU and calls these closures from it.

use std::fmt;
use std::sync::Arc;

use crate::control::ThreadContext;

/// A callback taking the thread's CPU.
pub type CpuFn = dyn Fn(u32) + Send + Sync;
/// `thread_should_run(cpu)`: is there work for `thread_fn`?
pub type ShouldRunFn = dyn Fn(u32) -> bool + Send + Sync;
/// `thread_fn(ctx)`: one unit of work; `ctx` tells the CPU and whether to
/// return early.
pub type ThreadFn = dyn Fn(&ThreadContext<'_>) + Send + Sync;
/// `cleanup(cpu, online)`: mirror of `setup`, told whether the CPU is online.
pub type CleanupFn = dyn Fn(u32, bool) + Send + Sync;

/// One kind of per-CPU hotplug thread (the kernel's `smp_hotplug_thread`).
///
/// Every callback runs on the thread of its CPU, except `create`, which runs
/// in the context that created the thread (the caller of
/// [`Registry::register`](crate::Registry::register) or
/// [`Registry::prepare`](crate::Registry::prepare)), and `cleanup` of a
/// thread whose CPU is offline, which runs on whatever CPU is left.
///
/// Callbacks of one thread never overlap; callbacks of different CPUs run in
/// parallel. A callback must not call the registry's locked methods (they
/// return [`RegistryError::Reentrant`](crate::RegistryError::Reentrant));
/// waking through a [`WakeHandle`](crate::WakeHandle) is fine.
///
/// `unpark` is only ever called after a `park` call: a descriptor with
/// `unpark` but no `park` never sees `unpark` (the kernel's behaviour: the
/// thread only enters the parked status through its `park` callback).
pub struct ThreadDescriptor {
    name_pattern: String,
    pub(crate) thread_should_run: Box<ShouldRunFn>,
    pub(crate) thread_fn: Box<ThreadFn>,
    pub(crate) setup: Option<Box<CpuFn>>,
    pub(crate) cleanup: Option<Box<CleanupFn>>,
    pub(crate) park: Option<Box<CpuFn>>,
    pub(crate) unpark: Option<Box<CpuFn>>,
    pub(crate) create: Option<Box<CpuFn>>,
}

impl ThreadDescriptor {
    /// Starts a descriptor with its two required callbacks.
    ///
    /// `name_pattern` names each thread: every `%u` is replaced by the CPU
    /// number (`"ksoftirqd/%u"` gives `"ksoftirqd/3"`). Linux keeps the
    /// first 15 bytes as the OS-visible thread name.
    pub fn builder<S, F>(
        name_pattern: impl Into<String>,
        thread_should_run: S,
        thread_fn: F,
    ) -> DescriptorBuilder
    where
        S: Fn(u32) -> bool + Send + Sync + 'static,
        F: Fn(&ThreadContext<'_>) + Send + Sync + 'static,
    {
        DescriptorBuilder {
            desc: ThreadDescriptor {
                name_pattern: name_pattern.into(),
                thread_should_run: Box::new(thread_should_run),
                thread_fn: Box::new(thread_fn),
                setup: None,
                cleanup: None,
                park: None,
                unpark: None,
                create: None,
            },
        }
    }

    /// The name pattern given to the builder.
    pub fn name_pattern(&self) -> &str {
        &self.name_pattern
    }

    /// The name of this descriptor's thread on `cpu`.
    pub fn thread_name(&self, cpu: u32) -> String {
        self.name_pattern.replace("%u", &cpu.to_string())
    }

    /// Whether the descriptor has a `setup` callback.
    pub fn has_setup(&self) -> bool {
        self.setup.is_some()
    }

    /// Whether the descriptor has a `cleanup` callback.
    pub fn has_cleanup(&self) -> bool {
        self.cleanup.is_some()
    }

    /// Whether the descriptor has a `park` callback.
    pub fn has_park(&self) -> bool {
        self.park.is_some()
    }

    /// Whether the descriptor has an `unpark` callback.
    pub fn has_unpark(&self) -> bool {
        self.unpark.is_some()
    }

    /// Whether the descriptor has a `create` callback.
    pub fn has_create(&self) -> bool {
        self.create.is_some()
    }
}

impl fmt::Debug for ThreadDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadDescriptor")
            .field("name_pattern", &self.name_pattern)
            .field("setup", &self.has_setup())
            .field("cleanup", &self.has_cleanup())
            .field("park", &self.has_park())
            .field("unpark", &self.has_unpark())
            .field("create", &self.has_create())
            .finish_non_exhaustive()
    }
}

/// Adds the optional callbacks to a [`ThreadDescriptor`].
#[derive(Debug)]
pub struct DescriptorBuilder {
    desc: ThreadDescriptor,
}

impl DescriptorBuilder {
    /// `setup(cpu)`: runs once per thread, on its CPU, before any
    /// `thread_fn`.
    pub fn setup(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.desc.setup = Some(Box::new(f));
        self
    }

    /// `cleanup(cpu, online)`: runs when the thread stops, if it ever ran
    /// `setup`; `online` tells whether the CPU is online at that moment.
    pub fn cleanup(mut self, f: impl Fn(u32, bool) + Send + Sync + 'static) -> Self {
        self.desc.cleanup = Some(Box::new(f));
        self
    }

    /// `park(cpu)`: runs when an active thread is parked (its CPU goes down).
    pub fn park(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.desc.park = Some(Box::new(f));
        self
    }

    /// `unpark(cpu)`: runs when a thread leaves the parked status, which it
    /// only enters through `park`: without `park`, `unpark` is never called.
    pub fn unpark(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.desc.unpark = Some(Box::new(f));
        self
    }

    /// `create(cpu)`: runs in the creating context right after the thread
    /// for `cpu` was created (parked).
    pub fn create(mut self, f: impl Fn(u32) + Send + Sync + 'static) -> Self {
        self.desc.create = Some(Box::new(f));
        self
    }

    /// Finishes the descriptor.
    pub fn build(self) -> Arc<ThreadDescriptor> {
        Arc::new(self.desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_name_replaces_every_cpu_placeholder() {
        let d = ThreadDescriptor::builder("ksoftirqd/%u", |_| false, |_| {}).build();
        assert_eq!(d.thread_name(3), "ksoftirqd/3");
        let d = ThreadDescriptor::builder("w%u-%u", |_| false, |_| {}).build();
        assert_eq!(d.thread_name(12), "w12-12");
        let d = ThreadDescriptor::builder("plain", |_| false, |_| {}).build();
        assert_eq!(d.thread_name(1), "plain");
    }

    #[test]
    fn builder_records_which_callbacks_exist() {
        let d = ThreadDescriptor::builder("t/%u", |_| false, |_| {})
            .park(|_| {})
            .cleanup(|_, _| {})
            .build();
        assert!(d.has_park() && d.has_cleanup());
        assert!(!d.has_setup() && !d.has_unpark() && !d.has_create());
        let dbg = format!("{d:?}");
        assert!(dbg.contains("t/%u") && dbg.contains("park: true"));
    }
}
