//! The stock Debian cloud kernel: fetched once, unpacked, its vmlinux
//! extracted, and reused from the cache while the package is current.
//!
//! Cache layout, one directory per kernel release:
//! ```text
//! <cache>/kernel/.lock                       serialises updates
//! <cache>/kernel/resolved                    last meta package resolution
//! <cache>/kernel/downloads/<pkg>=<ver>.deb   the package as downloaded
//! <cache>/kernel/<release>/root/             dpkg-deb -x of the package
//! <cache>/kernel/<release>/vmlinux           ELF extracted from the bzImage
//! <cache>/kernel/<release>/stamp             what the above were made from
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::apt::{self, AptError, KernelPackage};
use crate::bzimage::{self, BzImageError};
use crate::cache::{self, Lock, ScratchDir, Stamp};

/// The meta package that names the current stock kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Modules an emulated KVM host loads, in order.
pub const KVM_MODULES: [&str; 3] = ["irqbypass", "kvm", "kvm-amd"];
/// Bump when the cache layout or stamp meaning changes.
const STAMP_FORMAT: &str = "1";

/// Why the kernel could not be provided.
#[derive(Debug, Error)]
pub enum KernelError {
    /// apt could not resolve or fetch the package, and nothing is cached.
    #[error("cannot get the kernel package")]
    Apt(#[from] AptError),
    /// The vmlinux could not be extracted from the bzImage.
    #[error("cannot extract vmlinux from {path}")]
    Extract {
        /// The bzImage.
        path: PathBuf,
        /// Why.
        #[source]
        source: BzImageError,
    },
    /// The package lacks a file it should have.
    #[error("kernel package {package} has no {what}")]
    Missing {
        /// The package.
        package: String,
        /// What is missing.
        what: String,
    },
    /// A module is compressed (or otherwise not an ELF object).
    #[error("module {0} is not an uncompressed ELF .ko")]
    CompressedModule(PathBuf),
    /// File system error in the cache.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The bzImage (`boot/vmlinuz-<version>`).
    pub bzimage: PathBuf,
    /// The uncompressed ELF from the bzImage payload, for PVH boot.
    pub vmlinux: PathBuf,
    /// The unpacked `lib/modules/<version>` directory.
    pub modules: PathBuf,
    /// The Debian package it came from, as `name=version`.
    pub package: String,
    /// PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`) of the vmlinux, if any.
    pub pvh_entry: Option<u64>,
}

impl Kernel {
    /// True if the vmlinux can be booted through its PVH entry point.
    pub fn has_pvh(&self) -> bool {
        self.pvh_entry.is_some()
    }

    /// The kernel's build configuration (`boot/config-<version>`).
    pub fn config(&self) -> PathBuf {
        self.root()
            .join("boot")
            .join(format!("config-{}", self.version))
    }

    fn root(&self) -> PathBuf {
        // bzimage is <root>/boot/vmlinuz-<version>.
        self.bzimage
            .parent()
            .and_then(Path::parent)
            .map_or_else(PathBuf::new, Path::to_path_buf)
    }

    /// The `.ko` file of module `name` (`-` and `_` are interchangeable, as
    /// for modprobe), e.g. `module_path("kvm-amd")`.
    pub fn module_path(&self, name: &str) -> Option<PathBuf> {
        find_module(&self.modules, name)
    }
}

fn module_key(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

/// Looks `name` up in `modules.order` (present in Debian's package even
/// before depmod runs), then by walking `kernel/`.
fn find_module(modules: &Path, name: &str) -> Option<PathBuf> {
    let want = module_key(name);
    let matches = |file: &str| {
        let base = file.rsplit('/').next().unwrap_or(file);
        base.ends_with(".ko") && module_key(base) == want
    };
    if let Ok(order) = fs::read_to_string(modules.join("modules.order")) {
        if let Some(rel) = order.lines().map(str::trim).find(|l| matches(l)) {
            let path = modules.join(rel);
            if path.is_file() {
                return Some(path);
            }
        }
    }
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if matches(&entry.file_name().to_string_lossy()) {
                return Some(path);
            }
        }
    }
    None
}

/// Checks that the KVM host modules exist and are uncompressed.
fn check_modules(kernel: &Kernel) -> Result<(), KernelError> {
    for name in KVM_MODULES {
        let path = kernel
            .module_path(name)
            .ok_or_else(|| KernelError::Missing {
                package: kernel.package.clone(),
                what: format!("module {name}.ko"),
            })?;
        let mut magic = [0u8; 4];
        let ok = fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok();
        if !ok || &magic != b"\x7fELF" {
            return Err(KernelError::CompressedModule(path));
        }
    }
    Ok(())
}

fn paths_for(dir: &Path, release: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = dir.join("root");
    (
        root.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("vmlinux"),
        root.join("lib").join("modules").join(release),
    )
}

/// Rebuilds a `Kernel` from a release directory whose stamp is valid for
/// `want` (any package if `None`).
fn from_stamp(dir: &Path, want: Option<&KernelPackage>) -> Option<Kernel> {
    let stamp = Stamp::read(&dir.join("stamp"))?;
    let release = stamp.get("release")?;
    if stamp.get("format") != Some(STAMP_FORMAT) {
        return None;
    }
    if let Some(want) = want {
        if stamp.get("package") != Some(&want.apt_spec()) || release != want.release {
            return None;
        }
    }
    let (bzimage, vmlinux, modules) = paths_for(dir, release);
    if !stamp.matches_file("bzimage", &bzimage)
        || !stamp.matches_file("vmlinux", &vmlinux)
        || !modules.is_dir()
    {
        return None;
    }
    let pvh_entry = match stamp.get("pvh_entry")? {
        "none" => None,
        hex => Some(u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok()?),
    };
    Some(Kernel {
        version: release.to_owned(),
        bzimage,
        vmlinux,
        modules,
        package: stamp.get("package")?.to_owned(),
        pvh_entry,
    })
}

/// The most recently stamped valid kernel in the cache, for offline use.
fn newest_cached(kernel_dir: &Path) -> Option<Kernel> {
    let mut found: Vec<(std::time::SystemTime, Kernel)> = fs::read_dir(kernel_dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let mtime = e.path().join("stamp").metadata().ok()?.modified().ok()?;
            Some((mtime, from_stamp(&e.path(), None)?))
        })
        .collect();
    found.sort_by_key(|(t, _)| *t);
    found.pop().map(|(_, k)| k)
}

/// Returns the current stock kernel, downloading and unpacking it into
/// `cache_root/kernel` if it is not there yet. When apt cannot be used but
/// a kernel was cached before, that kernel is used (with a warning).
pub fn ensure_kernel_in(cache_root: &Path) -> Result<Kernel, KernelError> {
    let kernel_dir = cache_root.join("kernel");
    let _lock =
        Lock::acquire(&kernel_dir.join(".lock")).map_err(io_ctx("locking the kernel cache"))?;
    let pkg = match resolve_memoized(&kernel_dir) {
        Ok(pkg) => pkg,
        Err(e) => {
            if let Some(kernel) = newest_cached(&kernel_dir) {
                log::warn!("{e}; using cached kernel {}", kernel.package);
                return Ok(kernel);
            }
            return Err(e.into());
        }
    };
    let dir = kernel_dir.join(&pkg.release);
    if let Some(kernel) = from_stamp(&dir, Some(&pkg)) {
        return Ok(kernel);
    }
    log::info!("preparing kernel {}", pkg.apt_spec());
    let deb = fetch_deb(&kernel_dir, &pkg)?;
    unpack(&deb, &dir)?;
    let (bzimage, vmlinux, modules) = paths_for(&dir, &pkg.release);
    let missing = |what: &str| KernelError::Missing {
        package: pkg.apt_spec(),
        what: what.to_owned(),
    };
    if !bzimage.is_file() {
        return Err(missing(&format!("/boot/vmlinuz-{}", pkg.release)));
    }
    if !modules.is_dir() {
        return Err(missing(&format!("/lib/modules/{}", pkg.release)));
    }
    let image = fs::read(&bzimage).map_err(io_ctx(format!("reading {}", bzimage.display())))?;
    let extracted = bzimage::extract_vmlinux(&image).map_err(|source| KernelError::Extract {
        path: bzimage.clone(),
        source,
    })?;
    cache::atomic_write_bytes(&vmlinux, &extracted.elf, 0o644)
        .map_err(io_ctx(format!("writing {}", vmlinux.display())))?;
    let kernel = Kernel {
        version: pkg.release.clone(),
        bzimage,
        vmlinux,
        modules,
        package: pkg.apt_spec(),
        pvh_entry: extracted.pvh_entry,
    };
    check_modules(&kernel)?;
    let fp = |p: &Path| cache::fingerprint(p).map_err(io_ctx(format!("stat {}", p.display())));
    Stamp::new()
        .with("format", STAMP_FORMAT)
        .with("package", pkg.apt_spec())
        .with("release", pkg.release.as_str())
        .with("bzimage", fp(&kernel.bzimage)?)
        .with("vmlinux", fp(&kernel.vmlinux)?)
        .with("compression", extracted.compression.to_string())
        .with(
            "pvh_entry",
            kernel
                .pvh_entry
                .map_or_else(|| "none".into(), |e| format!("{e:#x}")),
        )
        .write(&dir.join("stamp"))
        .map_err(io_ctx("writing the kernel stamp"))?;
    log::info!(
        "kernel {} ready ({} payload, PVH entry {:?})",
        kernel.version,
        extracted.compression,
        kernel.pvh_entry
    );
    Ok(kernel)
}

/// Resolves the meta package, reusing the last answer while apt's package
/// lists are unchanged (apt-cache parses all lists on every call, which
/// takes most of a second here).
fn resolve_memoized(kernel_dir: &Path) -> Result<KernelPackage, AptError> {
    let path = kernel_dir.join("resolved");
    let lists = apt::lists_fingerprint();
    if let (Some(lists), Some(stamp)) = (&lists, Stamp::read(&path)) {
        if stamp.get("lists") == Some(lists) && stamp.get("meta") == Some(META_PACKAGE) {
            if let (Some(name), Some(release)) = (stamp.get("name"), stamp.get("release")) {
                return Ok(KernelPackage {
                    name: name.to_owned(),
                    version: stamp.get("version").map(str::to_owned),
                    release: release.to_owned(),
                });
            }
        }
    }
    let pkg = apt::resolve(META_PACKAGE)?;
    if let Some(lists) = lists {
        let mut stamp = Stamp::new()
            .with("lists", lists)
            .with("meta", META_PACKAGE)
            .with("name", pkg.name.as_str())
            .with("release", pkg.release.as_str());
        if let Some(version) = &pkg.version {
            stamp = stamp.with("version", version.as_str());
        }
        // Only an optimisation: a failed write costs a slower next run.
        let _ = stamp.write(&path);
    }
    Ok(pkg)
}

/// Returns the cached .deb of `pkg`, downloading it if needed.
fn fetch_deb(kernel_dir: &Path, pkg: &KernelPackage) -> Result<PathBuf, KernelError> {
    let downloads = kernel_dir.join("downloads");
    let deb = downloads.join(format!("{}.deb", pkg.apt_spec()));
    if deb.is_file() {
        return Ok(deb);
    }
    fs::create_dir_all(&downloads).map_err(io_ctx("creating the download directory"))?;
    let scratch =
        ScratchDir::new(&downloads, "download").map_err(io_ctx("creating a scratch directory"))?;
    let fetched = apt::download(pkg, scratch.path())?;
    fs::rename(&fetched, &deb).map_err(io_ctx(format!("moving {}", fetched.display())))?;
    Ok(deb)
}

/// Unpacks `deb` as `dir/root`, replacing any previous, possibly partial, tree.
fn unpack(deb: &Path, dir: &Path) -> Result<(), KernelError> {
    fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    // Invalidate first: a crash from here on leaves no valid stamp.
    let _ = fs::remove_file(dir.join("stamp"));
    let scratch = ScratchDir::new(dir, "root").map_err(io_ctx("creating a scratch directory"))?;
    apt::extract(deb, scratch.path())?;
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io_ctx(format!("removing {}", root.display())))?;
    }
    fs::rename(scratch.path(), &root)
        .map_err(io_ctx(format!("moving the tree to {}", root.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::test_dir;

    fn fake_modules(root: &Path, with_order: bool) -> PathBuf {
        let modules = root.join("lib/modules/6.1.0-1-cloud-amd64");
        fs::create_dir_all(modules.join("kernel/arch/x86/kvm")).unwrap();
        fs::create_dir_all(modules.join("kernel/virt/lib")).unwrap();
        for f in [
            "arch/x86/kvm/kvm.ko",
            "arch/x86/kvm/kvm-amd.ko",
            "virt/lib/irqbypass.ko",
        ] {
            fs::write(modules.join("kernel").join(f), b"\x7fELF....").unwrap();
        }
        if with_order {
            fs::write(
                modules.join("modules.order"),
                "kernel/virt/lib/irqbypass.ko\nkernel/arch/x86/kvm/kvm.ko\nkernel/arch/x86/kvm/kvm-amd.ko\n",
            )
            .unwrap();
        }
        modules
    }

    fn kernel_at(modules: PathBuf) -> Kernel {
        Kernel {
            version: "6.1.0-1-cloud-amd64".into(),
            bzimage: PathBuf::from("/nonexistent/boot/vmlinuz"),
            vmlinux: PathBuf::from("/nonexistent/vmlinux"),
            modules,
            package: "linux-image-test=1".into(),
            pvh_entry: None,
        }
    }

    #[test]
    fn finds_modules_by_order_and_by_walk() {
        for with_order in [true, false] {
            let dir = test_dir("modules");
            let k = kernel_at(fake_modules(dir.path(), with_order));
            let amd = k.module_path("kvm_amd").unwrap();
            assert!(amd.ends_with("kernel/arch/x86/kvm/kvm-amd.ko"), "{amd:?}");
            assert!(k.module_path("kvm").unwrap().ends_with("kvm/kvm.ko"));
            assert!(k.module_path("irqbypass.ko").is_some());
            assert_eq!(k.module_path("kvm-intel"), None);
            check_modules(&k).unwrap();
        }
    }

    #[test]
    fn compressed_module_is_rejected() {
        let dir = test_dir("xzmodule");
        let modules = fake_modules(dir.path(), true);
        fs::write(modules.join("kernel/arch/x86/kvm/kvm.ko"), b"\xfd7zXZ\0").unwrap();
        let err = check_modules(&kernel_at(modules)).unwrap_err();
        assert!(matches!(err, KernelError::CompressedModule(_)), "{err}");
    }

    #[test]
    fn stamp_must_match_package_and_files() {
        let dir = test_dir("kstamp");
        let rel = "6.1.0-1-cloud-amd64";
        let (bz, vm, modules) = paths_for(dir.path(), rel);
        fs::create_dir_all(bz.parent().unwrap()).unwrap();
        fs::create_dir_all(&modules).unwrap();
        fs::write(&bz, b"bz").unwrap();
        fs::write(&vm, b"elf").unwrap();
        let pkg = KernelPackage {
            name: format!("linux-image-{rel}"),
            version: Some("1".into()),
            release: rel.into(),
        };
        Stamp::new()
            .with("format", STAMP_FORMAT)
            .with("package", pkg.apt_spec())
            .with("release", rel)
            .with("bzimage", cache::fingerprint(&bz).unwrap())
            .with("vmlinux", cache::fingerprint(&vm).unwrap())
            .with("pvh_entry", "0x1000360")
            .write(&dir.path().join("stamp"))
            .unwrap();
        let k = from_stamp(dir.path(), Some(&pkg)).unwrap();
        assert_eq!(k.pvh_entry, Some(0x0100_0360));
        assert_eq!(k.version, rel);
        assert_eq!(
            k.config(),
            dir.path().join("root/boot/config-6.1.0-1-cloud-amd64")
        );
        let newer = KernelPackage {
            version: Some("2".into()),
            ..pkg.clone()
        };
        assert!(from_stamp(dir.path(), Some(&newer)).is_none());
        fs::write(&vm, b"changed").unwrap();
        assert!(from_stamp(dir.path(), Some(&pkg)).is_none());
    }
}
