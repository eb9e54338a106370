//! Identifiers and the events the registry reports to an observer.

use std::fmt;

use crate::hotplug::CpuState;

/// One registration of a descriptor. Registering the same descriptor again
/// after unregistering it gives a new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DescriptorId(pub u64);

impl fmt::Display for DescriptorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What the registry did, in order, as seen by the controlling context.
///
/// Events are delivered to the observer given to
/// [`RegistryBuilder::observer`](crate::RegistryBuilder::observer),
/// synchronously and under the hotplug lock: an observer must be quick and
/// must not call the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A descriptor joined the registry (after all its threads were made).
    Registered {
        /// The new registration.
        descriptor: DescriptorId,
    },
    /// A descriptor left the registry (before its threads are stopped).
    Unregistered {
        /// The registration removed.
        descriptor: DescriptorId,
    },
    /// A thread was created (parked) for a CPU.
    ThreadCreated {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A thread was asked to run again (the request does not wait).
    UnparkRequested {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A thread was asked to park; the registry now waits for it.
    ParkRequested {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A thread finished parking (its `park` callback returned).
    Parked {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A thread was asked to stop; the registry now joins it.
    StopRequested {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A thread was joined.
    Stopped {
        /// Its descriptor.
        descriptor: DescriptorId,
        /// Its CPU.
        cpu: u32,
    },
    /// A CPU changed state in the registry's view.
    CpuChanged {
        /// The CPU.
        cpu: u32,
        /// Its new state.
        state: CpuState,
    },
    /// A CPU went down without [`offline`](crate::Registry::offline); its
    /// threads were parked when the registry learned of it.
    ForcedOffline {
        /// The CPU.
        cpu: u32,
        /// How many threads were parked late.
        parked: usize,
    },
}

/// The observer callback type.
pub type Observer = dyn Fn(&RegistryEvent) + Send + Sync;
