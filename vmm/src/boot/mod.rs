//! Loading the guest kernel, its initramfs and command line, and the boot
//! information the kernel reads first (`boot_params` or PVH `start_info`).
//!
//! The image format picks the protocol: an ELF vmlinux with a PVH note
//! boots through PVH (no decompression in the guest: faster), a bzImage
//! through Linux's 64-bit boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use crate::memory::GuestMemoryMmap;
use crate::x86::regs::EntryMode;

mod linux64;
mod pvh;

/// What to boot.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry point (guest physical).
    pub entry: u64,
    /// Address of boot_params or start_info.
    pub boot_info: u64,
}

/// Where the initramfs went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitramfsPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Cannot open or read the kernel or initramfs file.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The image is neither a bzImage nor an ELF.
    #[error("{0} is neither a bzImage nor an ELF vmlinux")]
    UnknownFormat(PathBuf),
    /// An ELF kernel without a PVH entry point.
    #[error("{0} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); use the bzImage instead")]
    NoPvhEntry(PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load the kernel image")]
    Load(#[source] linux_loader::loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The initramfs does not fit in low memory beside the kernel.
    #[error("initramfs of {0} bytes does not fit in guest memory beside the kernel")]
    InitramfsTooLarge(u64),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The boot configurator failed.
    #[error("cannot write the boot information")]
    Configure(#[source] linux_loader::configurator::Error),
}

/// The formats a kernel file can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    BzImage,
    Elf,
}

fn detect_format(path: &Path, file: &mut File) -> Result<Format, BootError> {
    let read_err = |e| BootError::Read(path.to_owned(), e);
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    file.read_exact(&mut magic).map_err(read_err)?;
    if magic == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    let mut hdrs = [0u8; 4];
    file.seek(SeekFrom::Start(0x202)).map_err(read_err)?;
    file.read_exact(&mut hdrs).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if hdrs == *b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(BootError::UnknownFormat(path.to_owned()))
    }
}

/// Loads the kernel, initramfs and command line into `mem` and writes the
/// boot information. `mem_size` is the guest RAM size; `rsdp` the ACPI
/// RSDP address handed to the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    spec: &KernelSpec,
    mem_size: u64,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let mut kernel =
        File::open(&spec.kernel).map_err(|e| BootError::Read(spec.kernel.clone(), e))?;
    let format = detect_format(&spec.kernel, &mut kernel)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(spec.cmdline.trim())
        .map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::CmdlineWrite)?;
    let cmdline_len = spec.cmdline.trim().len() + 1;

    match format {
        Format::BzImage => {
            let loaded = linux_loader::loader::BzImage::load(
                mem,
                None,
                &mut kernel,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(BootError::Load)?;
            let header = loaded.setup_header.unwrap_or_default();
            let max_addr = if header.version >= 0x203 {
                u64::from(header.initrd_addr_max)
            } else {
                0x37ff_ffff
            };
            let initrd = match &spec.initramfs {
                Some(p) => Some(load_initramfs(
                    mem,
                    p,
                    mem_size,
                    loaded.kernel_end,
                    max_addr,
                )?),
                None => None,
            };
            let boot_info =
                linux64::write_boot_params(mem, header, cmdline_len, initrd, mem_size, rsdp)?;
            Ok(BootEntry {
                mode: EntryMode::Linux64,
                entry: loaded.kernel_load.0 + 0x200,
                boot_info,
            })
        }
        Format::Elf => {
            let loaded = linux_loader::loader::Elf::load(
                mem,
                None,
                &mut kernel,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(BootError::Load)?;
            let entry = match loaded.pvh_boot_cap {
                linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(a) => a.0,
                _ => return Err(BootError::NoPvhEntry(spec.kernel.clone())),
            };
            let initrd = match &spec.initramfs {
                Some(p) => Some(load_initramfs(
                    mem,
                    p,
                    mem_size,
                    loaded.kernel_end,
                    u64::from(u32::MAX),
                )?),
                None => None,
            };
            let boot_info = pvh::write_start_info(mem, initrd, mem_size, rsdp)?;
            Ok(BootEntry {
                mode: EntryMode::Pvh,
                entry,
                boot_info,
            })
        }
    }
}

/// Places the initramfs page-aligned at the top of low memory (below the
/// MMIO hole and `max_addr`), above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    max_addr: u64,
) -> Result<InitramfsPlacement, BootError> {
    let data = std::fs::read(path).map_err(|e| BootError::Read(path.to_owned(), e))?;
    let size = data.len() as u64;
    let top = mem_size
        .min(MMIO_HOLE_START)
        .min(max_addr.saturating_add(1));
    let addr = placement(top, size, kernel_end).ok_or(BootError::InitramfsTooLarge(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::Write("initramfs", e))?;
    debug_assert!(mem.address_in_range(GuestAddress(addr + size.saturating_sub(1))));
    Ok(InitramfsPlacement { addr, size })
}

/// The page-aligned address of `size` bytes placed just below `top`, or
/// `None` if they would overlap anything below `floor`.
pub fn placement(top: u64, size: u64, floor: u64) -> Option<u64> {
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= floor).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory_page_aligned() {
        assert_eq!(
            placement(0x1000_0000, 0x1800, 0x200_0000),
            Some(0x0fff_e000)
        );
        assert_eq!(
            placement(0x1000_0000, 0x1000, 0x200_0000),
            Some(0x0fff_f000)
        );
        assert_eq!(placement(0x300_0000, 0x200_0000, 0x200_0000), None);
        assert_eq!(placement(0x1000, 0x2000, 0), None);
    }

    #[test]
    fn unknown_format_is_rejected() {
        let p = std::env::temp_dir().join(format!("notakernel-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let mut f = File::open(&p).unwrap();
        assert!(matches!(
            detect_format(&p, &mut f),
            Err(BootError::UnknownFormat(_))
        ));
        std::fs::write(&p, b"\x7fELFxxxx").unwrap();
        let mut f = File::open(&p).unwrap();
        assert_eq!(detect_format(&p, &mut f).unwrap(), Format::Elf);
        std::fs::remove_file(&p).unwrap();
    }
}
