//! A writer for cpio archives in the "newc" format, as the kernel unpacks
//! them into its initramfs.
//!
//! The archive is built in memory, then written in one go, optionally
//! gzip-compressed. The writer emits every header itself, so device nodes
//! (e.g. `/dev/console`) need no privileges. Entries are written in the
//! order they were added; parent directories missing at the time an entry
//! is added are added before it (the kernel does not create them). Owners
//! are root and timestamps zero, so equal inputs give identical archives.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const NEWC_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// How the archive stream is compressed. The kernel accepts both (the
/// Debian cloud kernel also has xz, zstd, lz4... built in). Uncompressed is
/// faster to unpack under emulation; gzip is about a third of the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain newc stream.
    None,
    /// gzip at the default level.
    #[default]
    Gzip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    perm: u32,
    content: Content,
}

impl Entry {
    fn mode(&self) -> u32 {
        let kind = match self.content {
            Content::Dir => S_IFDIR,
            Content::File(_) => S_IFREG,
            Content::Symlink(_) => S_IFLNK,
            Content::CharDevice { .. } => S_IFCHR,
        };
        kind | (self.perm & 0o7777)
    }

    fn data(&self) -> &[u8] {
        match &self.content {
            Content::File(data) => data,
            Content::Symlink(target) => target.as_bytes(),
            Content::Dir | Content::CharDevice { .. } => &[],
        }
    }
}

/// An initramfs under construction. Paths are relative to the archive root;
/// a leading `/` is accepted and dropped.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: Vec<Entry>,
    /// Path -> index in `entries`.
    index: HashMap<String, usize>,
}

/// `"/a//b/"` -> `"a/b"`.
fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, path: &str) -> Option<usize> {
        self.index.get(path).copied()
    }

    fn add(&mut self, path: &str, perm: u32, content: Content) -> &mut Self {
        let path = normalize(path);
        if path.is_empty() {
            // The root itself always exists.
            return self;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if self.position(parent).is_none() {
                self.add(parent, 0o755, Content::Dir);
            }
        }
        let entry = Entry {
            path,
            perm,
            content,
        };
        match self.position(&entry.path) {
            Some(i) => self.entries[i] = entry,
            None => {
                self.index.insert(entry.path.clone(), self.entries.len());
                self.entries.push(entry);
            }
        }
        self
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.add(path, mode, Content::Dir)
    }

    /// Adds a regular file with the contents of `host_path`, read now.
    pub fn file_from_host(
        &mut self,
        path: &str,
        host_path: impl AsRef<Path>,
        mode: u32,
    ) -> io::Result<()> {
        let data = std::fs::read(host_path.as_ref())?;
        self.add(path, mode, Content::File(data));
        Ok(())
    }

    /// Adds a regular file holding `data`.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.add(path, mode, Content::File(data.into()))
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, 0o777, Content::Symlink(target.to_owned()))
    }

    /// Adds a character device node, e.g. `/dev/console` is 5:1.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.add(path, mode, Content::CharDevice { major, minor })
    }

    /// The entry paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.path.as_str())
    }

    /// Number of entries (the trailer not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive, trailer included, to `out`.
    pub fn write_to(&self, out: impl Write, compression: Compression) -> io::Result<()> {
        match compression {
            Compression::None => {
                let mut out = io::BufWriter::new(out);
                self.write_newc(&mut out)?;
                out.flush()
            }
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(
                    io::BufWriter::new(out),
                    flate2::Compression::default(),
                );
                self.write_newc(&mut gz)?;
                gz.finish()?.flush()
            }
        }
    }

    /// The uncompressed archive as bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_newc(&mut out);
        out
    }

    fn write_newc(&self, out: &mut impl Write) -> io::Result<()> {
        let mut written = 0usize;
        for (i, entry) in self.entries.iter().enumerate() {
            let (rmaj, rmin) = match entry.content {
                Content::CharDevice { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if entry.content == Content::Dir { 2 } else { 1 };
            let header = Header {
                ino: u32::try_from(i + 1).map_err(|_| too_big("entry count"))?,
                mode: entry.mode(),
                nlink,
                filesize: u32::try_from(entry.data().len()).map_err(|_| too_big(&entry.path))?,
                rdevmajor: rmaj,
                rdevminor: rmin,
            };
            written += write_entry(out, &header, &entry.path, entry.data())?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        written += write_entry(out, &trailer, TRAILER, &[])?;
        debug_assert_eq!(written % 4, 0);
        Ok(())
    }
}

fn too_big(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} is too large for cpio newc"),
    )
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

const fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Writes one header, name and data with newc padding; returns bytes written.
fn write_entry(out: &mut impl Write, h: &Header, name: &str, data: &[u8]) -> io::Result<usize> {
    let namesize = name.len() + 1;
    let header = format!(
        "{NEWC_MAGIC}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        h.ino,
        h.mode,
        0, // uid
        0, // gid
        h.nlink,
        0, // mtime
        h.filesize,
        0, // devmajor
        0, // devminor
        h.rdevmajor,
        h.rdevminor,
        namesize,
        0, // check
    );
    debug_assert_eq!(header.len(), 110);
    let zeros = [0u8; 4];
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&zeros[..1 + pad4(110 + namesize)])?;
    out.write_all(data)?;
    out.write_all(&zeros[..pad4(data.len())])?;
    Ok(110 + namesize + pad4(110 + namesize) + data.len() + pad4(data.len()))
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};

    use super::*;

    /// One parsed newc entry: (name, mode, nlink, rdev, data).
    type Parsed = (String, u32, u32, (u32, u32), Vec<u8>);

    fn parse(mut buf: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(offset % 4, 0, "header not 4-aligned");
            assert_eq!(&buf[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, nlink, size) = (field(1), field(4), field(6) as usize);
            let rdev = (field(9), field(10));
            let namesize = field(11) as usize;
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(buf[110 + namesize - 1], 0);
            let data_start = 110 + namesize + pad4(110 + namesize);
            let data = buf[data_start..data_start + size].to_vec();
            let next = data_start + size + pad4(size);
            buf = &buf[next..];
            offset += next;
            if name == TRAILER {
                assert!(buf.is_empty(), "data after trailer");
                return out;
            }
            out.push((name, mode, nlink, rdev, data));
        }
    }

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.dir("/dev", 0o755)
            .char_device("/dev/console", 0o600, 5, 1)
            .bytes("/init", b"#!/bin/sh\n".to_vec(), 0o755)
            .symlink("/bin/sh", "busybox")
            .bytes("etc/x", "", 0o644);
        a
    }

    #[test]
    fn newc_layout() {
        let entries = parse(&sample().to_vec());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "bin",
                "bin/sh",
                "etc",
                "etc/x"
            ]
        );
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(entries[0].2, 2);
        assert_eq!(entries[1].1, 0o020_600);
        assert_eq!(entries[1].3, (5, 1));
        assert_eq!(entries[2].1, 0o100_755);
        assert_eq!(entries[2].4, b"#!/bin/sh\n");
        assert_eq!(entries[4].1, 0o120_777);
        assert_eq!(entries[4].4, b"busybox");
        assert!(entries[6].4.is_empty());
    }

    #[test]
    fn ends_with_trailer_and_is_deterministic() {
        let bytes = sample().to_vec();
        assert_eq!(bytes.len() % 4, 0);
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
        assert_eq!(bytes, sample().to_vec());
        assert_eq!(Archive::new().to_vec().len(), 124);
    }

    #[test]
    fn later_entry_replaces_earlier_and_parents_are_implicit() {
        let mut a = Archive::new();
        a.bytes("a/b/c", "1", 0o644)
            .bytes("/a/b/c", "22", 0o600)
            .dir("a", 0o700);
        let entries = parse(&a.to_vec());
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].0, "a");
        assert_eq!(entries[0].1, 0o040_700);
        assert_eq!(entries[2].4, b"22");
        assert_eq!(entries[2].1, 0o100_600);
        assert_eq!(a.paths().collect::<Vec<_>>(), ["a", "a/b", "a/b/c"]);
    }

    #[test]
    fn gzip_round_trip() {
        let a = sample();
        let mut gz = Vec::new();
        a.write_to(&mut gz, Compression::Gzip).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, a.to_vec());
        let mut raw = Vec::new();
        a.write_to(&mut raw, Compression::None).unwrap();
        assert_eq!(raw, plain);
    }

    #[test]
    fn file_from_host_reads_now() {
        let mut a = Archive::new();
        a.file_from_host("x", "/proc/self/nonexistent-file", 0o644)
            .unwrap_err();
        a.file_from_host(
            "cargo.toml",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            0o644,
        )
        .unwrap();
        let entries = parse(&a.to_vec());
        assert!(String::from_utf8_lossy(&entries[0].4).contains("name = \"resources\""));
    }

    #[test]
    fn system_cpio_lists_it() {
        let Ok(mut child) = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            println!("SKIP: system cpio not found, round trip not checked");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&sample().to_vec())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = listing.lines().collect();
        assert_eq!(lines.len(), 7, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------") && lines[1].contains("5,"));
        assert!(lines[1].ends_with(" dev/console"));
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(lines[4].starts_with("lrwxrwxrwx") && lines[4].ends_with("bin/sh -> busybox"));
    }
}
