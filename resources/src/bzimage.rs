//! Extracts the uncompressed `vmlinux` ELF from an x86 bzImage.
//!
//! A bzImage is real-mode setup code followed by a small decompressor
//! (the "protected-mode code") that carries the compressed kernel as its
//! payload. The setup header (Linux boot protocol >= 2.08) says where:
//! `payload_offset` (0x248) and `payload_length` (0x24c), relative to the
//! start of the protected-mode code at `(setup_sects + 1) * 512`.
//!
//! The payload's compression is found by its magic bytes. Debian's 6.1
//! cloud kernel uses LZ4 (`CONFIG_KERNEL_LZ4`, the "legacy" LZ4 frame the
//! kernel build writes with `lz4 -l`, followed by the 4-byte uncompressed
//! size), its generic kernel xz (`CONFIG_KERNEL_XZ`: one xz stream with
//! the x86 BCJ filter, then the size); gzip and zstd are also decoded. The decompressed payload is the kernel
//! ELF followed by relocation data, which is cut off.

use std::io::Read;

use thiserror::Error;

use crate::elf::{Elf, ElfError, EM_X86_64};

const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// Legacy LZ4 frame magic (`lz4 -l`), also repeated between concatenated streams.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Largest block a legacy LZ4 frame holds, uncompressed.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Why a vmlinux could not be extracted.
#[derive(Debug, Error)]
pub enum BzImageError {
    /// Too short, missing the `HdrS` magic or the 0xAA55 boot flag.
    #[error("not a bzImage (no Linux setup header)")]
    NotBzImage,
    /// The boot protocol predates the payload fields.
    #[error("boot protocol {major}.{minor} has no payload fields (need 2.08 or later)")]
    OldProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The payload fields point outside the file.
    #[error("payload (offset {offset:#x}, length {length}) lies outside the file")]
    PayloadOutOfBounds {
        /// Absolute offset of the payload.
        offset: usize,
        /// Payload length.
        length: usize,
    },
    /// The payload is compressed with something this crate cannot decode.
    #[error("kernel payload compression {0} is not supported")]
    Unsupported(Compression),
    /// The compressed stream is damaged.
    #[error("corrupt {0} payload: {1}")]
    Corrupt(Compression, String),
    /// Decompression did not yield a usable x86-64 ELF.
    #[error("decompressed payload is not an x86-64 kernel ELF")]
    NotKernelElf(#[source] Option<ElfError>),
}

/// Compression of a kernel payload, as told by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// Raw LZMA (`5d 00 00`).
    Lzma,
    /// bzip2 (`BZh`).
    Bzip2,
    /// LZO (`89 4c 5a 4f`).
    Lzo,
    /// Legacy LZ4 frame (`02 21 4c 18`).
    Lz4,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// No known magic; the payload may be an uncompressed ELF.
    Unknown,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Unknown => "unknown",
        })
    }
}

impl Compression {
    /// Identifies a compressed stream by its first bytes.
    pub fn detect(data: &[u8]) -> Self {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x5d, 0, 0], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map_or(Compression::Unknown, |(_, c)| *c)
    }
}

/// The parts of the setup header this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Number of 512-byte setup sectors (0 means 4).
    pub setup_sects: u8,
    /// Boot protocol version, e.g. 0x020f.
    pub version: u16,
    /// Payload offset relative to the protected-mode code.
    pub payload_offset: u32,
    /// Payload length in bytes.
    pub payload_length: u32,
}

impl SetupHeader {
    /// Parses and validates the setup header at the start of a bzImage.
    pub fn parse(image: &[u8]) -> Result<Self, BzImageError> {
        if image.len() < PAYLOAD_LENGTH + 4
            || &image[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS"
            || image[BOOT_FLAG..BOOT_FLAG + 2] != [0x55, 0xaa]
        {
            return Err(BzImageError::NotBzImage);
        }
        let version = u16::from_le_bytes([image[VERSION], image[VERSION + 1]]);
        if version < 0x0208 {
            let [minor, major] = version.to_le_bytes();
            return Err(BzImageError::OldProtocol { major, minor });
        }
        let le32 = |off: usize| {
            u32::from_le_bytes([image[off], image[off + 1], image[off + 2], image[off + 3]])
        };
        Ok(Self {
            setup_sects: image[SETUP_SECTS],
            version,
            payload_offset: le32(PAYLOAD_OFFSET),
            payload_length: le32(PAYLOAD_LENGTH),
        })
    }

    /// File offset of the protected-mode code.
    pub fn protected_mode_offset(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            usize::from(self.setup_sects)
        };
        (sects + 1) * 512
    }

    /// The compressed payload within `image`.
    pub fn payload<'a>(&self, image: &'a [u8]) -> Result<&'a [u8], BzImageError> {
        let offset = self.protected_mode_offset() + self.payload_offset as usize;
        let length = self.payload_length as usize;
        offset
            .checked_add(length)
            .and_then(|end| image.get(offset..end))
            .ok_or(BzImageError::PayloadOutOfBounds { offset, length })
    }
}

/// The kernel ELF extracted from a bzImage.
#[derive(Debug)]
pub struct Vmlinux {
    /// The ELF bytes, trailing relocation data removed.
    pub elf: Vec<u8>,
    /// How the payload was compressed.
    pub compression: Compression,
    /// PVH entry point from the `XEN_ELFNOTE_PHYS32_ENTRY` note, if any.
    pub pvh_entry: Option<u64>,
}

/// Extracts the kernel ELF from a bzImage.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vmlinux, BzImageError> {
    let header = SetupHeader::parse(image)?;
    let payload = header.payload(image)?;
    let compression = Compression::detect(payload);
    let mut elf = decompress(compression, payload)?;
    let parsed = Elf::parse(&elf).map_err(|e| BzImageError::NotKernelElf(Some(e)))?;
    if parsed.machine != EM_X86_64 {
        return Err(BzImageError::NotKernelElf(None));
    }
    let pvh_entry = parsed.pvh_entry();
    let extent = usize::try_from(parsed.extent()).map_err(|_| BzImageError::NotKernelElf(None))?;
    elf.truncate(extent);
    Ok(Vmlinux {
        elf,
        compression,
        pvh_entry,
    })
}

/// Decompresses a kernel payload. `Unknown` is passed through unchanged
/// (an uncompressed payload is caught by the ELF check that follows).
pub fn decompress(compression: Compression, payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |e: &dyn std::fmt::Display| BzImageError::Corrupt(compression, e.to_string());
    let mut out = Vec::new();
    match compression {
        Compression::Unknown => out.extend_from_slice(payload),
        Compression::Lz4 => out = decompress_lz4_legacy(payload)?,
        Compression::Gzip => {
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| corrupt(&e))?;
        }
        Compression::Xz => {
            // One stream: the size trailer after it is not xz padding.
            lzma_rust2::XzReader::new(payload, false)
                .read_to_end(&mut out)
                .map_err(|e| corrupt(&e))?;
        }
        Compression::Zstd => {
            let mut input = payload;
            ruzstd::decoding::StreamingDecoder::new(&mut input)
                .map_err(|e| corrupt(&e))?
                .read_to_end(&mut out)
                .map_err(|e| corrupt(&e))?;
        }
        other => return Err(BzImageError::Unsupported(other)),
    }
    Ok(out)
}

/// Decodes a legacy LZ4 frame as the kernel build writes it: magic, then
/// blocks each prefixed by its compressed size (the magic may recur between
/// concatenated streams), then the 4-byte little-endian uncompressed size
/// that the kernel's `size_append` adds.
fn decompress_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |msg: String| BzImageError::Corrupt(Compression::Lz4, msg);
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut input = payload
        .get(4..)
        .ok_or_else(|| corrupt("empty stream".into()))?;
    let mut out: Vec<u8> = Vec::new();
    let mut size_trailer = None;
    while input.len() >= 4 {
        let chunk = le32(input);
        if chunk == LZ4_LEGACY_MAGIC {
            input = &input[4..];
            continue;
        }
        if input.len() == 4 {
            size_trailer = Some(chunk);
            break;
        }
        input = &input[4..];
        let chunk = chunk as usize;
        let block = input
            .get(..chunk)
            .ok_or_else(|| corrupt(format!("block of {chunk} bytes runs past the end")))?;
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| corrupt(e.to_string()))?;
        out.truncate(start + n);
        input = &input[chunk..];
    }
    if !input.is_empty() && size_trailer.is_none() {
        return Err(corrupt(format!("{} stray bytes at the end", input.len())));
    }
    if let Some(expected) = size_trailer {
        // The trailer holds the size modulo 2^32.
        if u64::from(expected) != out.len() as u64 & 0xffff_ffff {
            return Err(corrupt(format!(
                "decompressed {} bytes, trailer says {expected}",
                out.len()
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::elf::tests::{build, note};
    use crate::elf::{PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY};

    fn kernel_elf() -> Vec<u8> {
        let notes = note(
            b"Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0360u32.to_le_bytes(),
        );
        build(&[(1, vec![0xcc; 5000]), (PT_NOTE, notes)], &[])
    }

    /// A synthetic bzImage: `setup_sects` setup sectors, then a fake
    /// decompressor of `pm_prefix` bytes, then the payload, then junk.
    fn bzimage(setup_sects: u8, pm_prefix: usize, payload: &[u8]) -> Vec<u8> {
        let pm = (usize::from(setup_sects) + 1) * 512;
        let mut img = vec![0u8; pm + pm_prefix];
        img[SETUP_SECTS] = setup_sects;
        img[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&[0x55, 0xaa]);
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        let off = u32::try_from(pm_prefix).unwrap();
        let len = u32::try_from(payload.len()).unwrap();
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&off.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xee; 77]);
        img
    }

    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&u32::try_from(c.len()).unwrap().to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out
    }

    #[test]
    fn parses_setup_header() {
        let img = bzimage(39, 0x2cc, b"payload!");
        let h = SetupHeader::parse(&img).unwrap();
        assert_eq!(
            h,
            SetupHeader {
                setup_sects: 39,
                version: 0x020f,
                payload_offset: 0x2cc,
                payload_length: 8,
            }
        );
        assert_eq!(h.protected_mode_offset(), 40 * 512);
        assert_eq!(h.payload(&img).unwrap(), b"payload!");
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let mut img = bzimage(4, 16, b"xy");
        img[SETUP_SECTS] = 0;
        let h = SetupHeader::parse(&img).unwrap();
        assert_eq!(h.protected_mode_offset(), 5 * 512);
        assert_eq!(h.payload(&img).unwrap(), b"xy");
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(
            SetupHeader::parse(&[0; 100]),
            Err(BzImageError::NotBzImage)
        ));
        let mut img = bzimage(2, 0, b"x");
        img[HEADER_MAGIC] = b'X';
        assert!(matches!(
            SetupHeader::parse(&img),
            Err(BzImageError::NotBzImage)
        ));
        let mut img = bzimage(2, 0, b"x");
        img[VERSION..VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            SetupHeader::parse(&img),
            Err(BzImageError::OldProtocol { major: 2, minor: 6 })
        ));
        let mut img = bzimage(2, 0, b"x");
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let h = SetupHeader::parse(&img).unwrap();
        assert!(matches!(
            h.payload(&img),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
    }

    #[test]
    fn detects_compressions() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x02, 0x21, 0x4c, 0x18, 0]),
            Compression::Lz4
        );
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"\xfd7zXZ\0.."), Compression::Xz);
        assert_eq!(Compression::detect(b"\x7fELF"), Compression::Unknown);
    }

    #[test]
    fn extracts_lz4_payload_and_cuts_relocs() {
        let elf = kernel_elf();
        let mut with_relocs = elf.clone();
        with_relocs.extend_from_slice(&[0xab; 300]);
        let img = bzimage(3, 0x100, &lz4_legacy(&with_relocs, 1024));
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, Compression::Lz4);
        assert_eq!(v.pvh_entry, Some(0x0100_0360));
        assert_eq!(v.elf, elf);
    }

    #[test]
    fn extracts_gzip_payload() {
        let elf = kernel_elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let img = bzimage(2, 0x40, &gz.finish().unwrap());
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, Compression::Gzip);
        assert_eq!(v.elf, elf);
    }

    #[test]
    fn extracts_zstd_payload_with_size_trailer() {
        let elf = kernel_elf();
        let level = ruzstd::encoding::CompressionLevel::Fastest;
        let mut payload = ruzstd::encoding::compress_to_vec(&elf[..], level);
        // The kernel build appends the uncompressed size to zstd payloads.
        payload.extend_from_slice(&u32::try_from(elf.len()).unwrap().to_le_bytes());
        let img = bzimage(2, 0x10, &payload);
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, Compression::Zstd);
        assert_eq!(v.elf, elf);
    }

    #[test]
    fn lz4_size_mismatch_and_truncation_are_errors() {
        let data = vec![7u8; 4000];
        let mut stream = lz4_legacy(&data, 1000);
        let n = stream.len();
        stream[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            decompress(Compression::Lz4, &stream),
            Err(BzImageError::Corrupt(..))
        ));
        let stream = lz4_legacy(&data, 1000);
        let cut = &stream[..stream.len() - 10];
        assert!(matches!(
            decompress(Compression::Lz4, cut),
            Err(BzImageError::Corrupt(..))
        ));
    }

    #[test]
    fn unsupported_compression_is_named() {
        let err = decompress(Compression::Bzip2, b"BZh9").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel payload compression bzip2 is not supported"
        );
    }

    #[test]
    fn extracts_xz_bcj_payload_with_size_trailer() {
        // As the kernel build writes it: xz --check=crc32 --x86 --lzma2,
        // then the 4-byte uncompressed size.
        use lzma_rust2::filter::FilterType;
        use lzma_rust2::{CheckType, XzOptions, XzWriter};
        let elf = kernel_elf();
        let mut options = XzOptions::with_preset(1);
        options.set_check_sum_type(CheckType::Crc32);
        options.prepend_pre_filter(FilterType::BcjX86, 0);
        let mut w = XzWriter::new(Vec::new(), options).unwrap();
        std::io::Write::write_all(&mut w, &elf).unwrap();
        let mut payload = w.finish().unwrap();
        assert_eq!(Compression::detect(&payload), Compression::Xz);
        payload.extend_from_slice(&u32::try_from(elf.len()).unwrap().to_le_bytes());
        let v = extract_vmlinux(&bzimage(4, 0x40, &payload)).unwrap();
        assert_eq!(v.compression, Compression::Xz);
        assert_eq!(v.elf, elf);
        let cut = &payload[..payload.len() / 2];
        assert!(matches!(
            decompress(Compression::Xz, cut),
            Err(BzImageError::Corrupt(Compression::Xz, _))
        ));
    }

    #[test]
    fn non_elf_payload_is_rejected() {
        let img = bzimage(2, 0, b"just some bytes");
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::NotKernelElf(_))
        ));
    }
}
