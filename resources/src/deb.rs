//! Unpacking a `.deb`'s file system tree: with `dpkg-deb -x` where it is
//! installed, else in Rust (the `ar` container, then `data.tar` with xz,
//! zstd, gzip or no compression).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::Command;

use thiserror::Error;

/// Why a `.deb` could not be unpacked.
#[derive(Debug, Error)]
pub enum DebError {
    /// `dpkg-deb` ran and failed.
    #[error("`dpkg-deb -x {deb}` failed: {stderr}")]
    Dpkg {
        /// The package file.
        deb: String,
        /// The tail of its error output.
        stderr: String,
    },
    /// The file is not a Debian binary package this code reads.
    #[error("{deb} is not a Debian binary package: {why}")]
    Format {
        /// The package file.
        deb: String,
        /// What is wrong.
        why: String,
    },
    /// Reading the package or writing the tree failed.
    #[error("unpacking {deb}")]
    Io {
        /// The package file.
        deb: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Which tool unpacked a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpacker {
    /// `dpkg-deb -x`.
    DpkgDeb,
    /// This module's own reader.
    Rust,
}

impl std::fmt::Display for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unpacker::DpkgDeb => "dpkg-deb",
            Unpacker::Rust => "built-in unpacker",
        })
    }
}

/// Unpacks the file system tree of `deb` into `dir` with `dpkg-deb` if it
/// can be run, else in Rust.
pub fn unpack(deb: &Path, dir: &Path) -> Result<Unpacker, DebError> {
    match Command::new("dpkg-deb")
        .env("LC_ALL", "C")
        .arg("-x")
        .arg(deb)
        .arg(dir)
        .output()
    {
        Ok(out) if out.status.success() => Ok(Unpacker::DpkgDeb),
        Ok(out) => Err(DebError::Dpkg {
            deb: deb.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
        Err(e) => {
            log::info!(
                "dpkg-deb unavailable ({e}): unpacking {} in Rust",
                deb.display()
            );
            unpack_in_rust(deb, dir).map(|()| Unpacker::Rust)
        }
    }
}

/// Unpacks `deb` without dpkg-deb: the `ar` members `debian-binary`
/// (format 2.x), then `data.tar[.xz|.zst|.gz]` extracted with permissions
/// and modification times. Paths leaving `dir` are refused (by `tar`).
pub fn unpack_in_rust(deb: &Path, dir: &Path) -> Result<(), DebError> {
    let name = deb.display().to_string();
    let io = |source| DebError::Io {
        deb: name.clone(),
        source,
    };
    let format = |why: String| DebError::Format {
        deb: name.clone(),
        why,
    };
    let file = File::open(deb).map_err(io)?;
    let mut archive = ar::Archive::new(BufReader::new(file));
    let mut seen_version = false;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(io)?;
        let member = String::from_utf8_lossy(entry.header().identifier())
            .trim_end_matches('/')
            .trim()
            .to_owned();
        if member == "debian-binary" {
            let mut version = String::new();
            entry.read_to_string(&mut version).map_err(io)?;
            if !version.starts_with("2.") {
                return Err(format(format!("format version {:?}", version.trim())));
            }
            seen_version = true;
            continue;
        }
        let Some(compression) = member.strip_prefix("data.tar") else {
            continue;
        };
        if !seen_version {
            return Err(format("data.tar before debian-binary".into()));
        }
        let reader: Box<dyn Read + '_> = match compression {
            ".xz" => Box::new(lzma_rust2::XzReader::new(BufReader::new(entry), true)),
            ".zst" => Box::new(
                ruzstd::decoding::StreamingDecoder::new(BufReader::new(entry))
                    .map_err(|e| format(format!("data.tar.zst: {e}")))?,
            ),
            ".gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            "" => Box::new(entry),
            other => return Err(format(format!("unsupported member data.tar{other}"))),
        };
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(true);
        tar.set_preserve_mtime(true);
        tar.set_overwrite(true);
        return tar.unpack(dir).map_err(io);
    }
    Err(format("no data.tar member".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::test_dir;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    /// A .deb with the given data.tar member name and bytes.
    fn deb_with(data_name: &str, data: &[u8], version: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut b = ar::Builder::new(&mut out);
            let header = |name: &str, len: usize| {
                let mut h = ar::Header::new(name.as_bytes().to_vec(), len as u64);
                h.set_mode(0o100644);
                h
            };
            b.append(&header("debian-binary", version.len()), version)
                .unwrap();
            b.append(&header("control.tar.gz", 0), &[][..]).unwrap();
            b.append(&header(data_name, data.len()), data).unwrap();
        }
        out
    }

    fn tar_bytes() -> Vec<u8> {
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        t.append_data(&mut h, "./boot/", &[][..]).unwrap();
        let body = b"kernel bytes";
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(body.len() as u64);
        h.set_mtime(1_700_000_000);
        t.append_data(&mut h, "./boot/vmlinuz-6.1.0-1-amd64", &body[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        t.append_link(&mut h, "./boot/vmlinuz", "vmlinuz-6.1.0-1-amd64")
            .unwrap();
        t.into_inner().unwrap()
    }

    fn check_tree(dir: &Path) {
        let k = dir.join("boot/vmlinuz-6.1.0-1-amd64");
        assert_eq!(std::fs::read(&k).unwrap(), b"kernel bytes");
        let meta = std::fs::metadata(&k).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            meta.modified().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            std::fs::read_link(dir.join("boot/vmlinuz")).unwrap(),
            Path::new("vmlinuz-6.1.0-1-amd64")
        );
    }

    #[test]
    fn unpacks_plain_and_gzip_data_members() {
        let tar = tar_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        for (name, data) in [("data.tar", &tar), ("data.tar.gz", &gz)] {
            let dir = test_dir("deb");
            let deb = dir.path().join("p.deb");
            std::fs::write(&deb, deb_with(name, data, b"2.0\n")).unwrap();
            let out = dir.path().join("root");
            unpack_in_rust(&deb, &out).unwrap();
            check_tree(&out);
            // dpkg-deb, where installed, reads the same file the same way.
            let out2 = dir.path().join("root2");
            if let Ok(Unpacker::DpkgDeb) = unpack(&deb, &out2) {
                check_tree(&out2);
            }
        }
    }

    #[test]
    fn refuses_what_is_not_a_deb() {
        let dir = test_dir("notdeb");
        let deb = dir.path().join("p.deb");
        let out = dir.path().join("root");
        std::fs::write(&deb, deb_with("data.tar", &tar_bytes(), b"3.0\n")).unwrap();
        let err = unpack_in_rust(&deb, &out).unwrap_err();
        assert!(err.to_string().contains("format version"), "{err}");
        std::fs::write(&deb, deb_with("data.tar.bz2", b"x", b"2.0\n")).unwrap();
        let err = unpack_in_rust(&deb, &out).unwrap_err();
        assert!(err.to_string().contains("unsupported"), "{err}");
        std::fs::write(&deb, deb_with("other", b"x", b"2.0\n")).unwrap();
        let err = unpack_in_rust(&deb, &out).unwrap_err();
        assert!(err.to_string().contains("no data.tar"), "{err}");
        std::fs::write(&deb, b"not an ar file").unwrap();
        assert!(unpack_in_rust(&deb, &out).is_err());
    }
}
