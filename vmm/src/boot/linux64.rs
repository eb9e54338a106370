//! `boot_params` (the zero page) for Linux's 64-bit boot protocol.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestAddress;

use super::{BootError, InitramfsPlacement};
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::memory::{e820_map, GuestMemoryMmap};

/// "Undefined" boot loader type: the VMM is not a registered loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel signature of boot_params.hdr.boot_flag.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;

/// Builds the boot_params structure (pure; tested without guest memory).
pub fn build_boot_params(
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<InitramfsPlacement>,
    mem_size: u64,
    rsdp: GuestAddress,
) -> boot_params {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = u32::try_from(i.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(i.size).unwrap_or(0);
    }
    params.acpi_rsdp_addr = rsdp.0;
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len())).unwrap_or(0);
    params
}

/// Writes boot_params at the zero page and returns its address.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<InitramfsPlacement>,
    mem_size: u64,
    rsdp: GuestAddress,
) -> Result<u64, BootError> {
    let params = build_boot_params(header, cmdline_len, initrd, mem_size, rsdp);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::Configure)?;
    Ok(ZERO_PAGE_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{EBDA_START, HIMEM_START};

    #[test]
    fn boot_params_carry_cmdline_initrd_rsdp_and_e820() {
        let header = setup_header {
            version: 0x20f,
            ..Default::default()
        };
        let p = build_boot_params(
            header,
            42,
            Some(InitramfsPlacement {
                addr: 0x0f00_0000,
                size: 0x12_3456,
            }),
            256 << 20,
            GuestAddress(0xe_0000),
        );
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12_3456);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 2);
        let e0 = p.e820_table[0];
        let e1 = p.e820_table[1];
        assert_eq!((e0.addr, e0.size, e0.r#type), (0, EBDA_START, 1));
        assert_eq!(
            (e1.addr, e1.size, e1.r#type),
            (HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
    }
}
