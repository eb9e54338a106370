//! A minimal, bounds-checked reader for 64-bit little-endian ELF files.
//!
//! Just enough to answer the questions the image builder asks: is this a
//! static executable (no `PT_INTERP`), does this kernel carry a PVH entry
//! note, and where does the ELF image end (the kernel's compressed payload
//! has relocation data appended after the ELF proper).

use thiserror::Error;

/// `PT_INTERP`: the program header naming the dynamic loader.
pub const PT_INTERP: u32 = 3;
/// `PT_NOTE`: a program header covering ELF notes.
pub const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note holding the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `EM_X86_64`.
pub const EM_X86_64: u16 = 62;
const SHT_NOBITS: u32 = 8;

/// Why a buffer is not an ELF file this reader understands.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The buffer does not start with the ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// Only ELFCLASS64, little-endian files are supported.
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    /// A header or table points outside the buffer.
    #[error("ELF {0} lies outside the file")]
    Truncated(&'static str),
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    /// Segment type (`PT_*`).
    pub kind: u32,
    /// Offset of the segment in the file.
    pub offset: u64,
    /// Physical address the segment is loaded at.
    pub paddr: u64,
    /// Size of the segment in the file.
    pub filesz: u64,
    /// Size of the segment in memory.
    pub memsz: u64,
}

/// One ELF note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// Owner name without its terminating NUL (e.g. `b"Xen"`).
    pub name: &'a [u8],
    /// Note type.
    pub kind: u32,
    /// Descriptor bytes.
    pub desc: &'a [u8],
}

/// A parsed ELF64 file borrowing its bytes.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    data: &'a [u8],
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// All program headers, in file order.
    pub program_headers: Vec<ProgramHeader>,
    extent: u64,
}

fn slice<'a>(
    data: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(offset).map_err(|_| ElfError::Truncated(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::Truncated(what))?;
    let end = start.checked_add(len).ok_or(ElfError::Truncated(what))?;
    data.get(start..end).ok_or(ElfError::Truncated(what))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

impl<'a> Elf<'a> {
    /// Parses the ELF header, program headers and section header extents.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        if data.len() < 64 {
            return Err(ElfError::Truncated("header"));
        }
        if data[4] != 2 || data[5] != 1 {
            return Err(ElfError::Unsupported);
        }
        let machine = u16_at(data, 18);
        let entry = u64_at(data, 24);
        let phoff = u64_at(data, 32);
        let shoff = u64_at(data, 40);
        let phentsize = u64::from(u16_at(data, 54));
        let phnum = u64::from(u16_at(data, 56));
        let shentsize = u64::from(u16_at(data, 58));
        let shnum = u64::from(u16_at(data, 60));

        let mut extent: u64 = 64;
        let mut program_headers = Vec::new();
        if phnum > 0 {
            if phentsize < 56 {
                return Err(ElfError::Truncated("program header table"));
            }
            let table = slice(data, phoff, phentsize * phnum, "program header table")?;
            extent = extent.max(phoff + phentsize * phnum);
            for chunk in table.chunks_exact(usize::from(u16_at(data, 54))) {
                let ph = ProgramHeader {
                    kind: u32_at(chunk, 0),
                    offset: u64_at(chunk, 8),
                    paddr: u64_at(chunk, 24),
                    filesz: u64_at(chunk, 32),
                    memsz: u64_at(chunk, 40),
                };
                let end = ph
                    .offset
                    .checked_add(ph.filesz)
                    .ok_or(ElfError::Truncated("segment"))?;
                extent = extent.max(end);
                program_headers.push(ph);
            }
        }
        if shnum > 0 && shoff > 0 {
            if shentsize < 64 {
                return Err(ElfError::Truncated("section header table"));
            }
            let table = slice(data, shoff, shentsize * shnum, "section header table")?;
            extent = extent.max(shoff + shentsize * shnum);
            for chunk in table.chunks_exact(usize::from(u16_at(data, 58))) {
                if u32_at(chunk, 4) == SHT_NOBITS {
                    continue;
                }
                let end = u64_at(chunk, 24)
                    .checked_add(u64_at(chunk, 32))
                    .ok_or(ElfError::Truncated("section"))?;
                extent = extent.max(end);
            }
        }
        if extent > data.len() as u64 {
            return Err(ElfError::Truncated("image"));
        }
        Ok(Self {
            data,
            machine,
            entry,
            program_headers,
            extent,
        })
    }

    /// Number of bytes the ELF file proper occupies: the end of its last
    /// header table, segment or section. Bytes after this are not ELF.
    pub fn extent(&self) -> u64 {
        self.extent
    }

    /// True if the file names a dynamic loader (`PT_INTERP`), i.e. it is not
    /// a statically linked executable.
    pub fn has_interp(&self) -> bool {
        self.program_headers.iter().any(|p| p.kind == PT_INTERP)
    }

    /// All notes of all `PT_NOTE` segments. Malformed notes end the scan of
    /// their segment.
    pub fn notes(&self) -> Vec<Note<'a>> {
        let mut out = Vec::new();
        for ph in self.program_headers.iter().filter(|p| p.kind == PT_NOTE) {
            let Ok(mut seg) = slice(self.data, ph.offset, ph.filesz, "note") else {
                continue;
            };
            while seg.len() >= 12 {
                let namesz = u32_at(seg, 0) as usize;
                let descsz = u32_at(seg, 4) as usize;
                let kind = u32_at(seg, 8);
                let name_start = 12usize;
                let desc_start = name_start + namesz.next_multiple_of(4);
                let next = desc_start + descsz.next_multiple_of(4);
                if desc_start + descsz > seg.len() {
                    break;
                }
                let mut name = &seg[name_start..name_start + namesz];
                if let [rest @ .., 0] = name {
                    name = rest;
                }
                out.push(Note {
                    name,
                    kind,
                    desc: &seg[desc_start..desc_start + descsz],
                });
                seg = seg.get(next..).unwrap_or(&[]);
            }
        }
        out
    }

    /// The PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY` in a `Xen` note), if
    /// the kernel has one. The descriptor is 4 or 8 bytes depending on how
    /// the kernel emitted it.
    pub fn pvh_entry(&self) -> Option<u64> {
        self.notes()
            .into_iter()
            .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
            .and_then(|n| match n.desc.len() {
                4 => Some(u64::from(u32_at(n.desc, 0))),
                8 => Some(u64_at(n.desc, 0)),
                _ => None,
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tiny ELF64 with the given program headers (type, payload)
    /// laid out one after the other, followed by `trailer` junk.
    pub(crate) fn build(segments: &[(u32, Vec<u8>)], trailer: &[u8]) -> Vec<u8> {
        let phnum = segments.len();
        let mut out = vec![0u8; 64 + 56 * phnum];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        out[32..40].copy_from_slice(&64u64.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&u16::try_from(phnum).unwrap().to_le_bytes());
        let mut offset = out.len();
        let mut payload = Vec::new();
        for (i, (kind, data)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            out[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&(offset as u64).to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out[ph + 40..ph + 48].copy_from_slice(&(data.len() as u64).to_le_bytes());
            payload.extend_from_slice(data);
            offset += data.len();
        }
        out.extend_from_slice(&payload);
        out.extend_from_slice(trailer);
        out
    }

    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(u32::try_from(name.len()).unwrap() + 1).to_le_bytes());
        n.extend_from_slice(&u32::try_from(desc.len()).unwrap().to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n.extend_from_slice(desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    #[test]
    fn rejects_non_elf() {
        assert_eq!(Elf::parse(b"MZ\x90\0").unwrap_err(), ElfError::NotElf);
        assert_eq!(
            Elf::parse(b"\x7fELF").unwrap_err(),
            ElfError::Truncated("header")
        );
    }

    #[test]
    fn finds_pvh_note_and_extent() {
        let mut notes = note(b"GNU", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(
            b"Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0abcu64.to_le_bytes(),
        ));
        let elf_bytes = build(&[(1, vec![0x90; 32]), (PT_NOTE, notes)], b"RELOCS");
        let elf = Elf::parse(&elf_bytes).unwrap();
        assert_eq!(elf.machine, EM_X86_64);
        assert_eq!(elf.notes().len(), 2);
        assert_eq!(elf.pvh_entry(), Some(0x0100_0abc));
        assert_eq!(elf.extent(), elf_bytes.len() as u64 - 6);
        assert!(!elf.has_interp());
    }

    #[test]
    fn detects_interp_and_missing_pvh() {
        let elf_bytes = build(&[(PT_INTERP, b"/lib/ld.so\0".to_vec())], &[]);
        let elf = Elf::parse(&elf_bytes).unwrap();
        assert!(elf.has_interp());
        assert_eq!(elf.pvh_entry(), None);
    }

    #[test]
    fn truncated_segment_is_an_error() {
        let mut elf_bytes = build(&[(1, vec![0; 100])], &[]);
        elf_bytes.truncate(elf_bytes.len() - 10);
        assert_eq!(
            Elf::parse(&elf_bytes).unwrap_err(),
            ElfError::Truncated("image")
        );
    }

    #[test]
    fn malformed_note_stops_scan_without_panic() {
        let mut bad = note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let elf_bytes = build(&[(PT_NOTE, bad)], &[]);
        let elf = Elf::parse(&elf_bytes).unwrap();
        assert!(elf.notes().is_empty());
    }
}
