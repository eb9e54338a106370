//! `hvm_start_info` for the PVH boot protocol.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::{BootError, InitramfsPlacement};
use crate::layout::{CMDLINE_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use crate::memory::{e820_map, GuestMemoryMmap};

/// "xEn3" with the top bit of E set: the PVH start_info magic.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where the module list (the initramfs) is written.
const MODLIST_START: u64 = 0x6000;

/// Builds start_info and its memory map (pure).
pub fn build_start_info(
    initrd: Option<InitramfsPlacement>,
    mem_size: u64,
    rsdp: GuestAddress,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::try_from(modules.len()).unwrap_or(0),
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_START },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(0),
        ..Default::default()
    };
    (info, memmap, modules)
}

/// Writes start_info, the memory map and the module list; returns the
/// start_info address (the boot vCPU's `rbx`).
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitramfsPlacement>,
    mem_size: u64,
    rsdp: GuestAddress,
) -> Result<u64, BootError> {
    let (info, memmap, modules) = build_start_info(initrd, mem_size, rsdp);
    let mut params = BootParams::new(&info, GuestAddress(ZERO_PAGE_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)?;
    Ok(ZERO_PAGE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_points_at_everything() {
        let (info, memmap, modules) = build_start_info(
            Some(InitramfsPlacement {
                addr: 0x0f00_0000,
                size: 0x1000,
            }),
            128 << 20,
            GuestAddress(0xe_0000),
        );
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, MODLIST_START);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.memmap_entries as usize, memmap.len());
        assert_eq!(modules[0].paddr, 0x0f00_0000);
        assert!(memmap.iter().all(|e| e.type_ == 1));
        let (info, _, modules) = build_start_info(None, 128 << 20, GuestAddress(0));
        assert_eq!((info.nr_modules, modules.len()), (0, 0));
    }
}
