//! Guest RAM: its layout around the 32-bit MMIO hole, its creation, the
//! e820 map the guest is given, and its registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    AGENT_MAILBOX_BASE, AGENT_MAILBOX_SIZE, EBDA_START, HIGH_RAM_START, HIMEM_START,
    MMIO_HOLE_START,
};

/// Guest memory as the VMM uses it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest guest RAM the boot layout works with.
pub const MIN_MEMORY: u64 = 32 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Memory size below the minimum or not page aligned.
    #[error("invalid guest memory size {0:#x}: at least 32 MiB, a multiple of 4 KiB")]
    InvalidSize(u64),
    /// Mapping guest RAM failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory slot {0} with KVM")]
    Register(u32, #[source] kvm_ioctls::Error),
}

/// The RAM ranges (start, length) for `size` bytes of guest RAM: below the
/// MMIO hole first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), size - MMIO_HOLE_START),
        ]
    }
}

/// Maps `size` bytes of anonymous guest RAM, plus the agent mailbox
/// (`layout::AGENT_MAILBOX_BASE`, in the MMIO hole: memory the VMM shares
/// with the guest agent, never RAM to the guest, see `api::mailbox`).
/// Pages become resident only when the guest touches them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < MIN_MEMORY || !size.is_multiple_of(4096) {
        return Err(MemoryError::InvalidSize(size));
    }
    let mut ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (a, usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    ranges.push((GuestAddress(AGENT_MAILBOX_BASE), AGENT_MAILBOX_SIZE));
    ranges.sort_by_key(|(a, _)| *a);
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)
}

/// Kind of an e820 entry (the values of the boot protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind.
    pub kind: E820Kind,
}

/// The e820 map of a guest with `size` bytes of RAM: conventional memory
/// up to the EBDA, then RAM from 1 MiB, split around the MMIO hole. The
/// legacy area 0xA0000-0xFFFFF (holding the ACPI tables) is not RAM.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820Kind::Ram,
    }];
    for (start, len) in ram_ranges(size) {
        let first = start.0.max(HIMEM_START);
        let end = start.0 + len;
        if end > first {
            map.push(E820Entry {
                addr: first,
                size: end - first,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Registers every region of `mem` with the VM as a KVM memory slot.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = u32::try_from(slot).unwrap_or(u32::MAX);
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::InvalidSize(region.len()))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        set_memory_region(vm, desc).map_err(|e| MemoryError::Register(slot, e))?;
    }
    Ok(())
}

fn set_memory_region(
    vm: &VmFd,
    desc: kvm_userspace_memory_region,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the host range belongs to a GuestMemoryMmap region that the
    // VMM keeps mapped for the whole life of the VM (the Vm owns it and
    // drops it only after the VM fd), and regions never overlap.
    unsafe { vm.set_user_memory_region(desc) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range_and_two_e820_ram_entries() {
        let size = 256 << 20;
        assert_eq!(ram_ranges(size), vec![(GuestAddress(0), size)]);
        let map = e820_map(size);
        assert_eq!(map.len(), 2);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[1].addr, HIMEM_START);
        assert_eq!(map[1].addr + map[1].size, size);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let size = 4 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[1].0, GuestAddress(HIGH_RAM_START));
        assert_eq!(ranges[0].1 + ranges[1].1, size);
        let map = e820_map(size);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_HOLE_START);
        assert_eq!(map[2].addr, HIGH_RAM_START);
    }

    #[test]
    fn the_mailbox_is_mapped_but_not_ram() {
        let mem = create_guest_memory(256 << 20).unwrap();
        assert!(mem
            .get_host_address(GuestAddress(
                AGENT_MAILBOX_BASE + AGENT_MAILBOX_SIZE as u64 - 1
            ))
            .is_ok());
        assert!(e820_map(256 << 20)
            .iter()
            .all(|e| e.addr + e.size <= AGENT_MAILBOX_BASE
                || e.addr >= AGENT_MAILBOX_BASE + AGENT_MAILBOX_SIZE as u64));
        let big = create_guest_memory(4 << 30).unwrap();
        assert_eq!(big.num_regions(), 3);
    }

    #[test]
    fn rejects_tiny_or_unaligned_sizes() {
        assert!(create_guest_memory(1 << 20).is_err());
        assert!(create_guest_memory((64 << 20) + 1).is_err());
        assert!(create_guest_memory(64 << 20).is_ok());
    }
}
