//! The guest initramfs of a run: the guest image's layout (the agent as
//! `/init`, `resources::guest_image::initramfs_archive`) plus the user's
//! files and the workload's description at `/etc/workload.json`.
//!
//! Directories are copied whole (files with their permission bits,
//! symbolic links as links, directories; other special files are left
//! out, said on stderr). Inside an added directory, entries that would land
//! on the agent's own paths (`/init`, `/etc/workload.json`, `/proc`,
//! `/sys`, `/dev`) are left out too, so a root file system of your own can
//! be added at `/`.
//!
//! A dynamically linked executable (an ELF with an interpreter) brings its
//! shared libraries and its interpreter, at the paths `ldd` names on this
//! machine (a file the user added at the same path wins); if `ldd` cannot
//! find them all, the run stops with an error saying to link it
//! statically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use api::workload::{WorkloadSpec, SPEC_PATH};
use resources::cpio::Compression;
use resources::elf::{Elf, PT_INTERP};

use super::args::{reserved, Add};
use crate::emulated::WorkDir;

/// Memory the guest kernel and the agent need besides the initramfs (MiB).
const BASE_MIB: u64 = 96;

/// Why the image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The user's files are unusable (the launcher exits with
    /// [`super::status::USAGE`]).
    #[error("{0}")]
    Input(String),
    /// Building the guest image or writing the archive failed.
    #[error(transparent)]
    Harness(#[from] crate::Error),
}

fn input<T>(msg: impl Into<String>) -> Result<T, ImageError> {
    Err(ImageError::Input(msg.into()))
}

/// What goes in at one guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File { host: PathBuf, mode: u32 },
    Symlink(String),
}

/// The user's files, by guest path (relative, no leading `/`).
#[derive(Debug, Default)]
pub struct Layout {
    entries: BTreeMap<String, Entry>,
    /// Things left out, for the launcher's notes.
    pub skipped: Vec<String>,
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

impl Layout {
    /// Collects every `--add` (files read later, when the archive is made).
    pub fn collect(adds: &[Add]) -> Result<Self, ImageError> {
        let mut layout = Layout::default();
        for add in adds {
            let meta = std::fs::metadata(&add.host)
                .or_else(|e| input(format!("--add {}: {e}", add.host.display())))?;
            let rel = add.guest.trim_start_matches('/').to_owned();
            if meta.is_dir() {
                layout.walk(&add.host, &rel)?;
            } else if meta.is_file() {
                layout.entries.insert(
                    rel,
                    Entry::File {
                        host: add.host.clone(),
                        mode: mode_of(&meta),
                    },
                );
            } else {
                return input(format!(
                    "--add {}: not a regular file or a directory",
                    add.host.display()
                ));
            }
        }
        Ok(layout)
    }

    fn walk(&mut self, dir: &Path, rel: &str) -> Result<(), ImageError> {
        let read = |e: std::io::Error| ImageError::Input(format!("{}: {e}", dir.display()));
        let mut children: Vec<_> = std::fs::read_dir(dir)
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        children.sort_by_key(std::fs::DirEntry::file_name);
        if !rel.is_empty() {
            let meta = std::fs::metadata(dir).map_err(read)?;
            self.entries
                .insert(rel.to_owned(), Entry::Dir(mode_of(&meta)));
        }
        for child in children {
            let name = child.file_name();
            let Some(name) = name.to_str() else {
                self.skipped
                    .push(format!("{}: not a UTF-8 name", child.path().display()));
                continue;
            };
            let path = child.path();
            let guest = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if reserved(&format!("/{guest}")) {
                self.skipped
                    .push(format!("{} (/{guest} is the agent's)", path.display()));
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).map_err(read)?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(read)?;
                let Some(target) = target.to_str() else {
                    self.skipped
                        .push(format!("{}: not a UTF-8 link", path.display()));
                    continue;
                };
                self.entries
                    .insert(guest, Entry::Symlink(target.to_owned()));
            } else if kind.is_dir() {
                self.walk(&path, &guest)?;
            } else if kind.is_file() {
                self.entries.insert(
                    guest,
                    Entry::File {
                        host: path,
                        mode: mode_of(&meta),
                    },
                );
            } else {
                self.skipped.push(format!(
                    "{} (not a file, link or directory)",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    /// The guest paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// The interpreter a dynamically linked ELF names, if it names one.
pub fn interpreter(data: &[u8]) -> Option<String> {
    let elf = Elf::parse(data).ok()?;
    let ph = elf.program_headers.iter().find(|p| p.kind == PT_INTERP)?;
    let start = usize::try_from(ph.offset).ok()?;
    let end = start.checked_add(usize::try_from(ph.filesz).ok()?)?;
    let raw = data.get(start..end)?;
    let text = raw.split(|&b| b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(text).into_owned())
}

/// The advice every refused dynamic program gets.
pub const LINK_STATICALLY: &str =
    "link it statically (Rust: RUSTFLAGS='-C target-feature=+crt-static' \
     cargo build --target x86_64-unknown-linux-gnu; C: -static), or --add its libraries";

/// The libraries `ldd` says `program` needs, absolute paths (the
/// interpreter included); an error naming what is missing otherwise.
pub fn libraries(program: &Path, interp: &str) -> Result<Vec<String>, String> {
    let shown = program.display();
    let out = Command::new("ldd").arg(program).output().map_err(|e| {
        format!(
            "{shown} is dynamically linked (interpreter {interp}) and `ldd` cannot run to find \
             its libraries ({e}): {LINK_STATICALLY}"
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("not found"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{shown} is dynamically linked and these libraries are not found here: {}: \
             {LINK_STATICALLY}",
            missing.join(", ")
        ));
    }
    if !out.status.success() {
        return Err(format!(
            "{shown} is dynamically linked and `ldd` failed on it ({}): {LINK_STATICALLY}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut libs: Vec<String> = text
        .lines()
        .filter_map(|line| match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        })
        .filter(|p| p.starts_with('/'))
        .map(str::to_owned)
        .collect();
    if interp.starts_with('/') && !libs.iter().any(|l| l == interp) {
        libs.push(interp.to_owned());
    }
    Ok(libs)
}

/// The run's initramfs, in a scratch directory removed when dropped.
#[derive(Debug)]
pub struct Image {
    /// The archive (uncompressed cpio).
    pub path: PathBuf,
    /// Lines for the launcher to say (libraries added, things left out).
    pub notes: Vec<String>,
    /// Bytes of the user's files and their libraries.
    pub bytes: u64,
    _dir: WorkDir,
}

/// Builds the initramfs: the guest image's, `adds`, `spec`. `memory_mib`
/// (the guest's) bounds what fits.
pub fn build(adds: &[Add], spec: &WorkloadSpec, memory_mib: u32) -> Result<Image, ImageError> {
    let layout = Layout::collect(adds)?;
    let guest = crate::artifacts::guest_image()?;
    let mut archive = resources::guest_image::initramfs_archive(&guest.agent)
        .map_err(|e| crate::Error::io(format!("reading {}", guest.agent.display()), e))?;
    let mut notes: Vec<String> = layout
        .skipped
        .iter()
        .map(|s| format!("left out {s}"))
        .collect();
    let mut bytes = 0u64;
    let mut extra: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (path, entry) in &layout.entries {
        match entry {
            Entry::Dir(mode) => {
                archive.dir(path, *mode);
            }
            Entry::Symlink(target) => {
                archive.symlink(path, target);
            }
            Entry::File { host, mode } => {
                let data =
                    std::fs::read(host).or_else(|e| input(format!("{}: {e}", host.display())))?;
                bytes += data.len() as u64;
                if let Some(interp) = interpreter(&data) {
                    let libs = libraries(host, &interp).map_err(ImageError::Input)?;
                    notes.push(format!(
                        "/{path} is dynamically linked: adding {}",
                        libs.join(" ")
                    ));
                    for lib in libs {
                        let rel = lib.trim_start_matches('/').to_owned();
                        if !layout.entries.contains_key(&rel) {
                            extra.insert(rel, PathBuf::from(lib));
                        }
                    }
                }
                archive.bytes(path, data, *mode);
            }
        }
    }
    for (rel, host) in extra {
        let data = std::fs::canonicalize(&host)
            .and_then(std::fs::read)
            .or_else(|e| input(format!("library {}: {e}", host.display())))?;
        bytes += data.len() as u64;
        archive.bytes(&rel, data, 0o755);
    }
    let need = bytes.div_ceil(1 << 20) * 2 + BASE_MIB;
    if need > u64::from(memory_mib) {
        return input(format!(
            "the added files take {} MiB; unpacked in a guest of {memory_mib} MiB they leave it \
             too little: give --memory {need}M or more",
            bytes.div_ceil(1 << 20)
        ));
    }
    archive.bytes(SPEC_PATH, spec.to_json(), 0o644);
    let dir = WorkDir::new("workload")?;
    let path = dir.path().join("initramfs.cpio");
    let file = std::fs::File::create(&path)
        .map_err(|e| crate::Error::io(format!("creating {}", path.display()), e))?;
    archive
        .write_to(file, Compression::None)
        .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    Ok(Image {
        path,
        notes,
        bytes,
        _dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("launch-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn directories_files_links_and_reserved_paths() {
        let root = scratch("layout");
        std::fs::create_dir_all(root.join("rootfs/usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("rootfs/proc")).unwrap();
        std::fs::write(root.join("rootfs/init"), "#!/bin/sh\n").unwrap();
        std::fs::write(root.join("rootfs/usr/bin/tool"), "x").unwrap();
        std::fs::set_permissions(
            root.join("rootfs/usr/bin/tool"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("rootfs/bin")).unwrap();
        std::fs::write(root.join("data.txt"), "hello").unwrap();
        let adds = [
            Add {
                host: root.join("rootfs"),
                guest: "/".into(),
            },
            Add {
                host: root.join("data.txt"),
                guest: "/srv/data.txt".into(),
            },
        ];
        let layout = Layout::collect(&adds).unwrap();
        assert_eq!(
            layout.paths().collect::<Vec<_>>(),
            ["bin", "srv/data.txt", "usr", "usr/bin", "usr/bin/tool"]
        );
        assert_eq!(layout.entries["bin"], Entry::Symlink("usr/bin".into()));
        assert!(matches!(
            layout.entries["usr/bin/tool"],
            Entry::File { mode: 0o750, .. }
        ));
        assert_eq!(layout.skipped.len(), 2, "{:?}", layout.skipped);
        assert!(layout.skipped.iter().all(|s| s.contains("is the agent's")));
        let missing = Layout::collect(&[Add {
            host: root.join("nope"),
            guest: "/bin/nope".into(),
        }]);
        assert!(matches!(missing, Err(ImageError::Input(_))));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn dynamic_programs_bring_their_libraries_or_are_refused() {
        // The shell of this machine is dynamically linked (Debian).
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let data = std::fs::read(&sh).unwrap();
        let interp = interpreter(&data).expect("/bin/sh has an interpreter");
        assert!(interp.starts_with('/'), "{interp}");
        match libraries(&sh, &interp) {
            Ok(libs) => {
                assert!(libs.iter().any(|l| l.contains("libc.so")), "{libs:?}");
                assert!(libs.contains(&interp), "{libs:?}");
            }
            Err(e) => assert!(e.contains("link it statically"), "{e}"),
        }
        // A program whose libraries cannot be found: refused, with advice.
        let root = scratch("ldd");
        let fake = root.join("prog");
        std::fs::write(&fake, b"not an ELF").unwrap();
        let e = libraries(&fake, "/lib64/ld-linux-x86-64.so.2").unwrap_err();
        assert!(e.contains("link it statically"), "{e}");
        assert_eq!(interpreter(b"#!/bin/sh\n"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
