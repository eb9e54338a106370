//! A 16550 UART (vm-superio) on the port-I/O bus.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Raises the UART's interrupt by writing to an eventfd registered with
/// KVM as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A UART whose transmitted bytes go to `W`.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, W>,
    /// Writes whose interrupt or output failed (the guest never sees it).
    pub errors: u64,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("errors", &self.errors)
            .finish()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART signalling `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
            errors: 0,
        }
    }

    /// Queues bytes for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The output sink.
    pub fn output_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

/// The UART register an access targets: byte-wide accesses to offsets 0-7 only.
fn register(offset: u64, width: usize) -> Option<u8> {
    u8::try_from(offset).ok().filter(|o| *o <= 7 && width == 1)
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(off) = register(offset, data.len()) {
            data[0] = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(off) = register(offset, data.len()) else {
            return;
        };
        if self.uart.write(off, data[0]).is_err() {
            self.errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_bytes_and_raises_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Vec::new());
        s.write(1, &[0x02]); // IER: THR empty interrupt
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(s.output_mut().as_slice(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        // Wrong widths and offsets are ignored.
        s.write(0, &[1, 2]);
        s.write(9, b"x");
        let mut d = [0u8; 2];
        s.read(0, &mut d);
        assert_eq!(s.output_mut().as_slice(), b"hi");
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Vec::new());
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut d = [0u8; 1];
        s.read(0, &mut d);
        assert_eq!(d[0], b'o');
    }
}
