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
    #[error("cannot map {0} bytes of guest memory")]
    Map(usize, #[source] std::io::Error),
    /// vm-memory refused the mapping as a region.
    #[error("cannot describe guest memory to vm-memory: {0}")]
    Region(String),
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

/// Host mappings of guest RAM, unmapped when the last [`GuestRam`] goes.
#[derive(Debug)]
struct Mappings(Vec<(usize, usize)>);

impl Drop for Mappings {
    fn drop(&mut self) {
        for &(addr, len) in &self.0 {
            // SAFETY: (addr, len) is a mapping made by map_aligned and
            // owned by this object; every GuestMemoryMmap built over it is
            // held by a GuestRam, which holds this object: none is left.
            unsafe {
                libc::munmap(addr as *mut libc::c_void, len);
            }
        }
    }
}

/// Guest RAM: the [`GuestMemoryMmap`] the rest of the VMM uses (through
/// `Deref`), over anonymous mappings this type owns. Each region's host
/// address is 2 MiB-aligned like its guest-physical address, so KVM can
/// map guest memory with 2 MiB pages (transparent huge pages); an
/// arbitrary `mmap` address (what vm-memory would pick) rules them out
/// and costs the guest a nested page fault per 4 KiB page. Clones share
/// the mappings; the last one unmaps them.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    _mappings: std::sync::Arc<Mappings>,
}

impl GuestRam {
    /// Bytes of guest memory resident on the host now (`mincore` over each
    /// mapping), so the VMM's own memory is the process's less this.
    pub fn resident_bytes(&self) -> u64 {
        self._mappings
            .0
            .iter()
            .map(|&(addr, len)| resident_in(addr, len))
            .sum()
    }
}

/// Resident bytes of the mapping at `addr` (page aligned), `len` bytes.
fn resident_in(addr: usize, len: usize) -> u64 {
    const PAGE: usize = 4096;
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: (addr, len) is a live mapping owned by `Mappings` (the
    // caller holds it), and `vec` has one byte per page of it, as mincore
    // writes.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    let pages = vec.iter().filter(|&&b| b & 1 != 0).count();
    (pages as u64).saturating_mul(PAGE as u64)
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Alignment of guest RAM's host mappings (the x86 huge page size).
pub const HOST_ALIGN: usize = 2 << 20;

/// Maps `len` bytes of anonymous memory at a host address congruent to
/// `gpa` modulo [`HOST_ALIGN`] (over-allocates, then trims both ends).
fn map_aligned(len: usize, gpa: u64) -> std::io::Result<usize> {
    let phase = usize::try_from(gpa % HOST_ALIGN as u64).unwrap_or(0);
    let total = len + 2 * HOST_ALIGN;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // picks; it aliases nothing.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HOST_ALIGN) + phase;
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges are the unused ends of the mapping just made.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned)
}

/// Maps `size` bytes of anonymous guest RAM, plus the agent mailbox
/// (`layout::AGENT_MAILBOX_BASE`, in the MMIO hole: memory the VMM shares
/// with the guest agent, never RAM to the guest, see `api::mailbox`).
/// Pages become resident only when the guest touches them.
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    if size < MIN_MEMORY || !size.is_multiple_of(4096) {
        return Err(MemoryError::InvalidSize(size));
    }
    let mut ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (a, usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    ranges.push((GuestAddress(AGENT_MAILBOX_BASE), AGENT_MAILBOX_SIZE));
    ranges.sort_by_key(|(a, _)| *a);
    let mut mappings = Mappings(Vec::new());
    let mut regions = Vec::new();
    for (gpa, len) in ranges {
        let host = map_aligned(len, gpa.0).map_err(|e| MemoryError::Map(len, e))?;
        mappings.0.push((host, len));
        // SAFETY: host..host+len is the live mapping just made, owned by
        // `mappings`, which every GuestRam over these regions keeps alive.
        let region = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(len)
                .with_raw_mmap_pointer(host as *mut u8)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
        }
        .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(region, gpa)
            .ok_or_else(|| MemoryError::Region(format!("region at {gpa:?} overflows")))?;
        regions.push(region);
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))?;
    Ok(GuestRam {
        mem,
        _mappings: std::sync::Arc::new(mappings),
    })
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

    #[test]
    fn guest_resident_memory_counts_touched_pages() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(64 << 20).unwrap();
        let before = mem.resident_bytes();
        for page in 0..64u64 {
            mem.write_obj(1u8, GuestAddress(0x10_0000 + page * 4096))
                .unwrap();
        }
        assert!(mem.resident_bytes() >= before + 64 * 4096);
    }

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
    fn host_addresses_are_aligned_like_guest_addresses() {
        let mem = create_guest_memory(4 << 30).unwrap();
        for gpa in [0, HIGH_RAM_START, AGENT_MAILBOX_BASE] {
            let h = mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
            assert_eq!(h % HOST_ALIGN, usize::try_from(gpa).unwrap() % HOST_ALIGN);
        }
        // Clones share the mapping: still usable after the original goes.
        let copy = mem.clone();
        drop(mem);
        vm_memory::Bytes::write_obj(&*copy, 7u8, GuestAddress(0x1000)).unwrap();
    }

    #[test]
    fn rejects_tiny_or_unaligned_sizes() {
        assert!(create_guest_memory(1 << 20).is_err());
        assert!(create_guest_memory((64 << 20) + 1).is_err());
        assert!(create_guest_memory(64 << 20).is_ok());
    }
}
