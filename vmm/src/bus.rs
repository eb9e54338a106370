//! The port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A bus is built once before the vCPUs start and then shared read-only
//! (`Arc<Bus>`); each device has its own mutex, so vCPUs touching
//! different devices never contend. Accesses that hit no device are
//! counted, never fatal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Empty or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
    accesses: AtomicU64,
}

/// Distinct unhandled addresses remembered for diagnostics.
const UNHANDLED_ADDRESSES_KEPT: usize = 64;

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    unhandled: AtomicU64,
    unhandled_by_address: Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// Access counts of a bus, for diagnostics (every access is a VM exit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusStats {
    /// (base, length, accesses) per device.
    pub devices: Vec<(u64, u64, u64)>,
    /// (address, accesses) of the unhandled addresses seen first.
    pub unhandled: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            at,
            Entry {
                base,
                len,
                device,
                accesses: AtomicU64::new(0),
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        let offset = addr - e.base;
        // Checked: an access at the top of the address space must miss,
        // not wrap around into the device (found by the `bus` fuzz target).
        let end = offset.checked_add(u64::try_from(size).ok()?)?;
        (end <= e.len).then_some((e, offset))
    }

    /// Reads from the device at `addr`. Returns false (and fills `data`
    /// with all ones, like an empty bus) when no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0xff);
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                e.accesses.fetch_add(1, Ordering::Relaxed);
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                self.count_unhandled(addr);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Returns false when no device answers.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                e.accesses.fetch_add(1, Ordering::Relaxed);
                lock(&e.device).write(offset, data);
                true
            }
            None => {
                self.count_unhandled(addr);
                false
            }
        }
    }

    fn count_unhandled(&self, addr: u64) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        let mut map = lock(&self.unhandled_by_address);
        if let Some(n) = map.get_mut(&addr) {
            *n += 1;
        } else if map.len() < UNHANDLED_ADDRESSES_KEPT {
            map.insert(addr, 1);
        }
    }

    /// How many accesses hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    /// Access counts per device and per unhandled address.
    pub fn stats(&self) -> BusStats {
        BusStats {
            devices: self
                .entries
                .iter()
                .map(|e| (e.base, e.len, e.accesses.load(Ordering::Relaxed)))
                .collect(),
            unhandled: lock(&self.unhandled_by_address)
                .iter()
                .map(|(a, n)| (*a, *n))
                .collect(),
        }
    }
}

/// Locks a device, recovering from a poisoned mutex: device models keep
/// their state consistent between register accesses.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_counts_misses() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg::default()));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x8, Arc::new(Mutex::new(Reg::default())))
            .unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(a.lock().unwrap().last, vec![(0xe, vec![1, 2])]);
        // Crossing the end of a device, or nothing there.
        assert!(!bus.write(0x10f, &[1, 2]));
        assert!(!bus.read(0x150, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.read(0x50, &mut d));
        assert_eq!(bus.unhandled(), 3);
        let stats = bus.stats();
        assert_eq!(stats.devices, vec![(0x100, 0x10, 2), (0x200, 0x8, 0)]);
        assert_eq!(stats.unhandled, vec![(0x50, 1), (0x10f, 1), (0x150, 1)]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Reg::default())))
            .unwrap();
        for (b, l) in [(0x10f, 1), (0xf0, 0x11), (0x100, 0x10)] {
            assert!(matches!(
                bus.insert(b, l, Arc::new(Mutex::new(Reg::default()))),
                Err(BusError::Overlap { .. })
            ));
        }
        assert!(bus
            .insert(0x110, 0, Arc::new(Mutex::new(Reg::default())))
            .is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Reg::default())))
            .is_err());
        assert!(bus
            .insert(0x110, 1, Arc::new(Mutex::new(Reg::default())))
            .is_ok());
    }
}
