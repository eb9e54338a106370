//! [`VcpuId`]: the one name of a vCPU across the VMM.
//!
//! A vCPU id is the KVM vCPU id, the x2APIC/APIC ID the guest sees, the
//! ACPI processor device's `_UID`, the hotplug register block's selector
//! value and the id in the HTTP API. It is *not* Linux's logical CPU
//! number inside the guest (`cpuN`): Linux numbers hot-added CPUs in the
//! order they arrive, so the guest agent maps between the two and speaks
//! vCPU ids on the wire.

use std::fmt;

/// A vCPU id (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VcpuId(u32);

impl VcpuId {
    /// The boot processor: always present, never removable.
    pub const BOOT: VcpuId = VcpuId(0);

    /// The vCPU with this id.
    pub const fn new(id: u32) -> Self {
        Self(id)
    }

    /// The id as the API and the guest spell it.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The id as an index into per-vCPU tables (a `u32` always fits a
    /// `usize` on the 64-bit hosts the VMM builds for).
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Every id below `max`, ascending.
    pub fn all(max: u32) -> impl DoubleEndedIterator<Item = VcpuId> + Clone {
        (0..max).map(VcpuId)
    }

    /// Whether this is the boot processor.
    pub const fn is_boot(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<VcpuId> for u32 {
    fn from(id: VcpuId) -> u32 {
        id.0
    }
}

impl From<VcpuId> for u64 {
    fn from(id: VcpuId) -> u64 {
        u64::from(id.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_index_as_numbers() {
        let id = VcpuId::new(7);
        assert_eq!(id.to_string(), "7");
        assert_eq!(id.index(), 7);
        assert_eq!(u64::from(id), 7);
        assert!(VcpuId::BOOT.is_boot() && !id.is_boot());
        assert_eq!(
            VcpuId::all(3).rev().map(VcpuId::get).collect::<Vec<_>>(),
            [2, 1, 0]
        );
    }
}
