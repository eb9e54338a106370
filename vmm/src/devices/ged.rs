//! The Generic Event Device's event register, as a pure state machine.
//!
//! One 32-bit register at offset 0 of `layout::GED_MMIO_BASE`. The VMM
//! ORs event bits in with [`Ged::notify`] and then raises the GED
//! interrupt (`layout::GED_GSI`, edge, active high); the guest's `_EVT`
//! method reads the register, which returns the pending bits and clears
//! them, and dispatches on them (bit [`EVENT_CPU_HOTPLUG`]: CPU scan).
//!
//! [`Ged::notify`] asks for an interrupt on every non-empty event, even
//! when bits were already pending: an edge that arrives while the guest
//! has no handler (early boot) is lost, and only a later edge gets the
//! pending bits read. A spurious `_EVT` reads 0 and does nothing.

use log::debug;

use super::BusDevice;

/// Offset of the event register.
pub const EVENT_OFFSET: u64 = 0;
/// Bytes of the block the AML's OperationRegion covers.
pub const REGISTER_BLOCK_LEN: u64 = 4;
/// Event bit: vCPUs were inserted or are to be removed; scan them.
pub const EVENT_CPU_HOTPLUG: u32 = 1 << 0;

/// The GED event register.
#[derive(Debug, Clone, Default)]
pub struct Ged {
    pending: u32,
    ignored_accesses: u64,
}

impl Ged {
    /// No event pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `event_bits`; returns whether to raise the GED interrupt
    /// (whenever `event_bits` is not empty).
    pub fn notify(&mut self, event_bits: u32) -> bool {
        self.pending |= event_bits;
        event_bits != 0
    }

    /// Bits the guest has not read yet.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Guest accesses ignored (bad width or offset, any write).
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    /// The guest reads: the event register returns and clears the pending
    /// bits; anything else reads all ones.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == EVENT_OFFSET && data.len() == 4 {
            data.copy_from_slice(&std::mem::take(&mut self.pending).to_le_bytes());
        } else {
            data.fill(0xff);
            self.ignore("read", offset, data.len());
        }
    }

    /// The guest writes: the register is read-only, so this is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.ignore("write", offset, data.len());
    }

    fn ignore(&mut self, what: &str, offset: u64, len: usize) {
        self.ignored_accesses += 1;
        debug!("ged: ignored {what} of {len} bytes at offset {offset:#x}");
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Ged::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        Ged::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_event(g: &mut Ged) -> u32 {
        let mut d = [0u8; 4];
        g.read(EVENT_OFFSET, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn read_returns_and_clears() {
        let mut g = Ged::new();
        assert_eq!(read_event(&mut g), 0);
        assert!(g.notify(EVENT_CPU_HOTPLUG));
        assert_eq!(g.pending(), EVENT_CPU_HOTPLUG);
        assert_eq!(read_event(&mut g), EVENT_CPU_HOTPLUG);
        assert_eq!(read_event(&mut g), 0);
        assert_eq!(g.ignored_accesses(), 0);
    }

    #[test]
    fn notify_accumulates_and_always_asks_for_an_interrupt() {
        let mut g = Ged::new();
        assert!(g.notify(EVENT_CPU_HOTPLUG));
        assert!(g.notify(EVENT_CPU_HOTPLUG));
        assert!(g.notify(1 << 5));
        assert_eq!(read_event(&mut g), EVENT_CPU_HOTPLUG | 1 << 5);
    }

    #[test]
    fn empty_notify_raises_nothing() {
        let mut g = Ged::new();
        assert!(!g.notify(0));
        assert_eq!(g.pending(), 0);
    }

    #[test]
    fn other_accesses_are_ignored_and_keep_the_bits() {
        let mut g = Ged::new();
        g.notify(EVENT_CPU_HOTPLUG);
        let mut count = 0;
        for offset in 0..8u64 {
            for len in [0usize, 1, 2, 4, 8] {
                if (offset, len) == (EVENT_OFFSET, 4) {
                    continue;
                }
                let mut d = vec![0u8; len];
                g.read(offset, &mut d);
                assert!(d.iter().all(|&b| b == 0xff));
                g.write(offset, &vec![0u8; len]);
                count += 2;
            }
        }
        g.write(EVENT_OFFSET, &[0; 4]);
        count += 1;
        assert_eq!(g.ignored_accesses(), count);
        assert_eq!(g.pending(), EVENT_CPU_HOTPLUG);
    }

    #[test]
    fn bus_device_reads_and_clears() {
        let mut g = Ged::new();
        g.notify(EVENT_CPU_HOTPLUG);
        let dev: &mut dyn BusDevice = &mut g;
        let mut d = [0u8; 4];
        dev.read(EVENT_OFFSET, &mut d);
        assert_eq!(u32::from_le_bytes(d), EVENT_CPU_HOTPLUG);
        dev.read(EVENT_OFFSET, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
