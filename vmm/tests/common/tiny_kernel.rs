//! Tiny PVH test kernels: a few bytes of 32-bit code wrapped in an ELF64
//! vmlinux stand-in with a PVH entry note, so the VMM boots them like a
//! Linux kernel. The code starts in flat 32-bit protected mode without
//! paging (PVH), so it runs on any /dev/kvm, PVM included, and reaches
//! guest-physical addresses (RAM, the mailbox, MMIO registers) directly.
//!
//! The encoders below are just what the tests need, each one checked
//! against its Intel encoding in the comment beside it.

use std::path::{Path, PathBuf};

/// Guest-physical address of the code's first byte (and the entry point).
pub const ENTRY: u32 = 0x10_0000;

/// An ELF64 vmlinux stand-in: one PT_LOAD of `code` at [`ENTRY`] and a PVH
/// entry note (XEN_ELFNOTE_PHYS32_ENTRY) pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHSIZE: u16 = 64;
    const PHSIZE: u16 = 56;
    const CODE_OFF: u64 = 0x1000;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend(v.to_le_bytes());
    }
    note.extend(b"Xen\0");
    note.extend(ENTRY.to_le_bytes());
    let note_off = u64::from(EHSIZE + 2 * PHSIZE);

    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]);
    f.extend([0; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(u64::from(ENTRY).to_le_bytes());
    f.extend(u64::from(EHSIZE).to_le_bytes()); // phoff
    f.extend(0u64.to_le_bytes()); // shoff
    f.extend(0u32.to_le_bytes()); // flags
    for v in [EHSIZE, PHSIZE, 2, 64, 0, 0] {
        f.extend(v.to_le_bytes());
    }
    let len = code.len() as u64;
    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend(kind.to_le_bytes());
            f.extend(flags.to_le_bytes());
            for v in [off, addr, addr, size, size, align] {
                f.extend(v.to_le_bytes());
            }
        };
    phdr(&mut f, 1, 5, CODE_OFF, u64::from(ENTRY), len, 0x1000); // PT_LOAD r-x
    phdr(&mut f, 4, 4, note_off, 0, note.len() as u64, 4); // PT_NOTE
    f.extend(&note);
    f.resize(usize::try_from(CODE_OFF).unwrap(), 0);
    f.extend(code);
    f
}

/// Writes the kernel of `code` to `dir/name`; returns its path.
pub fn kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pvh_elf(code)).unwrap();
    path
}

/// 32-bit code: `out` of `byte` to I/O port `port`.
pub fn out(port: u16, byte: u8) -> Vec<u8> {
    // mov dx, port; mov al, byte; out dx, al
    let [lo, hi] = port.to_le_bytes();
    vec![0x66, 0xba, lo, hi, 0xb0, byte, 0xee]
}

/// 32-bit code: copies `len` bytes from `src` to `dst` (rep movsb; PVH
/// enters with flat segments and the direction flag clear).
pub fn copy(src: u32, dst: u32, len: u32) -> Vec<u8> {
    let mut code = vec![0xbe]; // mov esi, src
    code.extend(src.to_le_bytes());
    code.push(0xbf); // mov edi, dst
    code.extend(dst.to_le_bytes());
    code.push(0xb9); // mov ecx, len
    code.extend(len.to_le_bytes());
    code.extend([0xf3, 0xa4]); // rep movsb
    code
}

/// 32-bit code: `mov ecx, value`.
pub fn mov_ecx(value: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend(value.to_le_bytes());
    code
}

/// 32-bit code: `mov eax, [addr]`.
pub fn load_eax(addr: u32) -> Vec<u8> {
    let mut code = vec![0xa1];
    code.extend(addr.to_le_bytes());
    code
}

/// 32-bit code: `add eax, value`.
pub fn add_eax(value: u32) -> Vec<u8> {
    let mut code = vec![0x05];
    code.extend(value.to_le_bytes());
    code
}

/// 32-bit code: `mov [addr], eax`.
pub fn store_eax(addr: u32) -> Vec<u8> {
    let mut code = vec![0xa3];
    code.extend(addr.to_le_bytes());
    code
}

/// 32-bit code: `mov [addr], ecx` (a 32-bit store).
pub fn store_ecx(addr: u32) -> Vec<u8> {
    let mut code = vec![0x89, 0x0d]; // ModRM: mod 00, reg ecx, r/m disp32
    code.extend(addr.to_le_bytes());
    code
}

/// 32-bit code: `mov byte [addr], value` (an 8-bit store).
pub fn store_byte(addr: u32, value: u8) -> Vec<u8> {
    let mut code = vec![0xc6, 0x05];
    code.extend(addr.to_le_bytes());
    code.push(value);
    code
}

/// 32-bit code: `inc ecx`.
pub fn inc_ecx() -> Vec<u8> {
    vec![0x41]
}

/// 32-bit code: `dec ecx`.
pub fn dec_ecx() -> Vec<u8> {
    vec![0x49]
}

/// 32-bit code: `cmp ecx, value` (sign-extended 8-bit immediate).
pub fn cmp_ecx(value: i8) -> Vec<u8> {
    vec![0x83, 0xf9, value.to_le_bytes()[0]]
}

/// The 8-bit displacement of a 2-byte jump at the end of `code` to `target`.
fn rel8(code: &[u8], target: usize) -> u8 {
    let next = code.len() + 2;
    let back = isize::try_from(target).unwrap() - isize::try_from(next).unwrap();
    let rel = i8::try_from(back).expect("a short jump");
    rel.to_le_bytes()[0]
}

/// Appends `jmp target` (an offset in `code`, at most 126 bytes back).
pub fn jmp(code: &mut Vec<u8>, target: usize) {
    let rel = rel8(code, target);
    code.extend([0xeb, rel]);
}

/// Appends `jnz target` (an offset in `code`, at most 126 bytes back).
pub fn jnz(code: &mut Vec<u8>, target: usize) {
    let rel = rel8(code, target);
    code.extend([0x75, rel]);
}
