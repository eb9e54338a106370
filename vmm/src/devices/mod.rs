//! Device models. Each is a plain state machine: `read(offset, data)` and
//! `write(offset, data)`, no file descriptors, no threads, no KVM. Whoever
//! owns a device turns its results into I/O (an irqfd, a vCPU removal, ...).

/// A device on the port-I/O or MMIO bus.
///
/// `offset` is relative to the base address the device was inserted at;
/// `data.len()` is the access width in bytes (1, 2, 4 or 8). A device must
/// never panic on any offset or width: a guest chooses both.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`. Fill `data`; leave
    /// it as all ones (the bus pre-fills it) for registers that do not exist.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub mod cmos;
pub mod cpu_hotplug;
pub mod ged;
pub mod power;
pub mod serial;
