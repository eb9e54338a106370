//! Loading an ELF vmlinux by mapping it, not copying it.
//!
//! Debian's vmlinux is 52 MB. Copying it into guest RAM costs the VMM a
//! page fault and a copy per page before the guest runs (~0.6 s inside the
//! emulated host) and keeps every page resident, touched or not. Instead
//! each `PT_LOAD` segment's file pages are mapped copy-on-write
//! (`MAP_PRIVATE | MAP_FIXED`) over the guest RAM at its physical address:
//! the guest faults in only what it touches, straight from the page cache,
//! and its writes go to private copies. The file may change or go away
//! afterwards without affecting the guest (private mapping of pages read
//! at fault time: as with any mmap, a file truncated while the VM runs
//! would fault; the VMM's images are never rewritten in place).
//!
//! Used when every segment is page-aligned alike in the file and in guest
//! memory, segments do not share pages and all fit in one RAM region;
//! otherwise [`load`] answers `None` and the caller copies (linux-loader).
//! Bytes of a mapped page outside its segment (head and tail) are zeroed,
//! so guest memory holds exactly what a copy would have put there.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

const PAGE: u64 = 4096;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The Xen ELF note giving the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What a mapped load produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// The PVH entry point, if the image has one.
    pub pvh_entry: Option<u64>,
    /// First byte after the highest segment.
    pub kernel_end: u64,
}

/// One program header, the fields used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn read_at(file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// The program headers of a little-endian ELF64 image; `None` if it is not one.
fn segments(file: &File) -> Option<Vec<Segment>> {
    let eh = read_at(file, 0, 64)?;
    if eh.get(0..4)? != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let phoff = u64_at(&eh, 32)?;
    let phentsize = usize::from(u16_at(&eh, 54)?);
    let phnum = usize::from(u16_at(&eh, 56)?);
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return None;
    }
    let table = read_at(file, phoff, phentsize * phnum)?;
    (0..phnum)
        .map(|i| {
            let p = &table[i * phentsize..];
            Some(Segment {
                kind: u32_at(p, 0)?,
                offset: u64_at(p, 8)?,
                paddr: u64_at(p, 24)?,
                filesz: u64_at(p, 32)?,
                memsz: u64_at(p, 40)?,
            })
        })
        .collect()
}

/// The PVH entry from the image's notes.
fn pvh_entry(file: &File, notes: &[Segment]) -> Option<u64> {
    for n in notes {
        let data = read_at(file, n.offset, usize::try_from(n.filesz).ok()?)?;
        let mut at = 0usize;
        while at + 12 <= data.len() {
            let namesz = usize::try_from(u32_at(&data, at)?).ok()?;
            let descsz = usize::try_from(u32_at(&data, at + 4)?).ok()?;
            let kind = u32_at(&data, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let next = desc_at + descsz.next_multiple_of(4);
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && data.get(name_at..name_at + namesz)? == b"Xen\0"
            {
                return match descsz {
                    4 => u32_at(&data, desc_at).map(u64::from),
                    8 => u64_at(&data, desc_at),
                    _ => None,
                };
            }
            at = next;
        }
    }
    None
}

/// Whether `[start, start+len)` of guest memory is one contiguous host range.
fn host_range(mem: &GuestMemoryMmap, start: u64, len: u64) -> Option<*mut u8> {
    let first = mem.get_host_address(GuestAddress(start)).ok()?;
    let last = mem.get_host_address(GuestAddress(start + len - 1)).ok()?;
    (last as usize - first as usize == usize::try_from(len - 1).ok()?).then_some(first)
}

/// Maps the `PT_LOAD` segments of `file` into `mem`; `None` (nothing
/// changed) when the image cannot be mapped as described above.
pub fn load(mem: &GuestMemoryMmap, file: &File) -> Option<Mapped> {
    let all = segments(file)?;
    let loads: Vec<Segment> = all
        .iter()
        .copied()
        .filter(|s| s.kind == PT_LOAD && s.memsz > 0)
        .collect();
    let notes: Vec<Segment> = all.iter().copied().filter(|s| s.kind == PT_NOTE).collect();
    // Plan every mapping first: nothing is touched unless all can be done.
    let mut plan = Vec::new();
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for s in &loads {
        if s.filesz > s.memsz || s.offset % PAGE != s.paddr % PAGE {
            return None;
        }
        let first = s.paddr - s.paddr % PAGE;
        let end = (s.paddr + s.memsz).next_multiple_of(PAGE);
        if taken.iter().any(|&(a, b)| first < b && a < end) {
            return None;
        }
        taken.push((first, end));
        let host = host_range(mem, first, end - first)?;
        plan.push((*s, first, host));
    }
    for (s, first, host) in &plan {
        let file_end = (s.paddr + s.filesz).next_multiple_of(PAGE);
        let len = usize::try_from(file_end - first).ok()?;
        if len > 0 {
            let offset = libc::off_t::try_from(s.offset - s.offset % PAGE).ok()?;
            // SAFETY: `host` starts a range of `mem` at least `len` bytes
            // long (host_range checked the whole segment); the guest has
            // not run, no reference into that range is alive, and
            // replacing pages of the VMM's own anonymous guest mapping
            // with private file pages keeps it mapped and writable. KVM's
            // memslot follows the new pages through its MMU notifier.
            let r = unsafe {
                libc::mmap(
                    host.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if r == libc::MAP_FAILED {
                log::warn!(
                    "cannot map the kernel segment at {:#x}: {}",
                    s.paddr,
                    std::io::Error::last_os_error()
                );
                return None;
            }
        }
        // The mapped pages' bytes outside the segment read as zero, as
        // after a copy into fresh memory.
        let head = usize::try_from(s.paddr - first).ok()?;
        let zero_tail = usize::try_from(file_end - (s.paddr + s.filesz)).ok()?;
        if head > 0 {
            mem.write_slice(&vec![0u8; head], GuestAddress(*first))
                .ok()?;
        }
        if zero_tail > 0 && s.filesz > 0 {
            mem.write_slice(&vec![0u8; zero_tail], GuestAddress(s.paddr + s.filesz))
                .ok()?;
        }
    }
    let kernel_end = loads.iter().map(|s| s.paddr + s.memsz).max()?;
    Some(Mapped {
        pvh_entry: pvh_entry(file, &notes),
        kernel_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    /// A tiny ELF64: one PT_LOAD at paddr 0x20_0010 (file offset 0x1010,
    /// 0x20 bytes, memsz 0x40) and a Xen PVH note with entry 0x20_0010.
    fn image() -> Vec<u8> {
        let mut f = vec![0u8; 0x1100];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum
        let ph =
            |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, paddr: u64, fsz: u64, msz: u64| {
                f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
                f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
                f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
                f[at + 32..at + 40].copy_from_slice(&fsz.to_le_bytes());
                f[at + 40..at + 48].copy_from_slice(&msz.to_le_bytes());
            };
        ph(&mut f, 64, PT_LOAD, 0x1010, 0x20_0010, 0x20, 0x40);
        ph(&mut f, 120, PT_NOTE, 0x200, 0, 20, 20);
        // Note: namesz 4, descsz 4, type 18, "Xen\0", entry.
        f[0x200..0x204].copy_from_slice(&4u32.to_le_bytes());
        f[0x204..0x208].copy_from_slice(&4u32.to_le_bytes());
        f[0x208..0x20c].copy_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        f[0x20c..0x210].copy_from_slice(b"Xen\0");
        f[0x210..0x214].copy_from_slice(&0x20_0010u32.to_le_bytes());
        // Segment bytes, and file bytes around them that must not show.
        f[0x1000..0x1100].fill(0xee);
        for (i, b) in f[0x1010..0x1030].iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap() + 1;
        }
        f
    }

    fn file_of(bytes: &[u8]) -> (tempdir::Dir, File) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vmlinux");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let file = File::open(&path).unwrap();
        (dir, file)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("vmm-elf-map-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn maps_segments_exactly_as_a_copy_would_and_finds_the_pvh_entry() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let (_dir, file) = file_of(&image());
        let mapped = load(&mem, &file).unwrap();
        assert_eq!(mapped.pvh_entry, Some(0x20_0010));
        assert_eq!(mapped.kernel_end, 0x20_0050);
        let mut page = vec![0u8; 0x1000];
        mem.read_slice(&mut page, GuestAddress(0x20_0000)).unwrap();
        assert!(page[..0x10].iter().all(|&b| b == 0), "head zeroed");
        assert_eq!(page[0x10], 1);
        assert_eq!(page[0x2f], 0x20);
        assert!(page[0x30..].iter().all(|&b| b == 0), "tail and bss zeroed");
        // Private: the guest's writes do not reach the file.
        mem.write_slice(&[0x55], GuestAddress(0x20_0010)).unwrap();
        let mut b = [0u8; 1];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut b, 0x1010).unwrap();
        assert_eq!(b, [1]);
    }

    #[test]
    fn misaligned_or_foreign_images_are_left_to_the_copying_loader() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let mut bad = image();
        bad[64 + 8..64 + 16].copy_from_slice(&0x1011u64.to_le_bytes()); // offset % page != paddr % page
        let (_dir, file) = file_of(&bad);
        assert_eq!(load(&mem, &file), None);
        let (_dir2, file2) = file_of(
            b"MZ not an elf at all, padded................................................",
        );
        assert_eq!(load(&mem, &file2), None);
    }
}
