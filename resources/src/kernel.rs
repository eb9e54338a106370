//! The stock Debian kernels (the `cloud` flavour by default, or the
//! `generic` one): fetched once, unpacked, their vmlinux extracted, and
//! reused from the cache while the package is current.
//!
//! The package is found with apt where apt knows Debian's archive, else
//! fetched directly from it with its signed index checked ([`crate::fetch`]).
//!
//! Cache layout, one directory per kernel release:
//! ```text
//! <cache>/kernel/.lock                       serialises updates
//! <cache>/kernel/resolved-<meta>             last apt resolution of a meta package
//! <cache>/kernel/index/                      kernel stanzas of verified Packages indices
//! <cache>/kernel/downloads/<pkg>=<ver>.deb   the package as downloaded
//! <cache>/kernel/<release>/root/             the package's files (dpkg-deb -x)
//! <cache>/kernel/<release>/vmlinux           ELF extracted from the bzImage
//! <cache>/kernel/<release>/stamp             what the above were made from
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::apt::{AptError, KernelPackage};
use crate::bzimage::{self, BzImageError};
use crate::cache::{self, Lock, ScratchDir, Stamp};
use crate::deb::{self, DebError};
use crate::debian::FetchError;
use crate::fetch::{self, Mode};

/// The meta package of the default (cloud) flavour.
pub const META_PACKAGE: &str = Flavour::Cloud.meta_package();
/// Modules an emulated KVM host loads, in order.
pub const KVM_MODULES: [&str; 3] = ["irqbypass", "kvm", "kvm-amd"];
/// Bump when the cache layout or stamp meaning changes.
const STAMP_FORMAT: &str = "1";

/// Which of Debian's x86-64 kernel configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flavour {
    /// `linux-image-cloud-amd64`: for virtual machines, most drivers left
    /// out (the default, and the emulated host's kernel).
    #[default]
    Cloud,
    /// `linux-image-amd64`: the generic configuration, most drivers as
    /// modules.
    Generic,
}

impl Flavour {
    /// Environment variable choosing the guest's kernel flavour.
    pub const GUEST_ENV: &'static str = "GUEST_KERNEL_FLAVOUR";

    /// The meta package that names the current kernel of this flavour.
    pub const fn meta_package(self) -> &'static str {
        match self {
            Flavour::Cloud => "linux-image-cloud-amd64",
            Flavour::Generic => "linux-image-amd64",
        }
    }

    /// `cloud` or `generic`.
    pub const fn name(self) -> &'static str {
        match self {
            Flavour::Cloud => "cloud",
            Flavour::Generic => "generic",
        }
    }

    /// True if kernel release `release` (`uname -r`) is of this flavour:
    /// `6.1.0-57-cloud-amd64` is cloud, `6.1.0-57-amd64` generic.
    pub fn matches_release(self, release: &str) -> bool {
        match self {
            Flavour::Cloud => release.ends_with("-cloud-amd64"),
            Flavour::Generic => {
                release.ends_with("-amd64")
                    && release.split('-').nth(2).is_some_and(|s| s == "amd64")
            }
        }
    }

    /// The guest's flavour: `$GUEST_KERNEL_FLAVOUR` (`cloud` or `generic`),
    /// cloud when unset or empty.
    pub fn guest_from_env() -> Result<Flavour, KernelError> {
        match std::env::var(Self::GUEST_ENV) {
            Err(_) => Ok(Flavour::Cloud),
            Ok(v) if v.is_empty() => Ok(Flavour::Cloud),
            Ok(v) => v.parse().map_err(|()| KernelError::BadSetting {
                variable: Self::GUEST_ENV,
                value: v,
                allowed: "cloud, generic",
            }),
        }
    }
}

impl std::str::FromStr for Flavour {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "cloud" => Ok(Flavour::Cloud),
            "generic" => Ok(Flavour::Generic),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `error: cause: cause`, a whole source chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why neither fetch path gave a package: `apt: ...; direct fetch: ...`,
/// each with its whole cause chain.
pub(crate) fn describe(apt: Option<&AptError>, direct: Option<&FetchError>) -> String {
    let mut parts = Vec::new();
    if let Some(e) = apt {
        parts.push(format!("apt: {}", chain(e)));
    }
    if let Some(e) = direct {
        parts.push(format!("direct fetch: {}", chain(e)));
    }
    parts.join("; ")
}

/// Why the kernel could not be provided.
#[derive(Debug, Error)]
pub enum KernelError {
    /// Neither apt nor the direct fetch could provide the package (as far
    /// as they were tried), and no kernel of the flavour is cached.
    #[error("cannot get the kernel package {meta}: {}", describe(.apt.as_deref(), .direct.as_deref()))]
    Unavailable {
        /// The meta package.
        meta: String,
        /// Why apt could not, if it was tried.
        apt: Option<Box<AptError>>,
        /// Why the direct fetch could not, if it was tried.
        direct: Option<Box<FetchError>>,
    },
    /// The package could not be unpacked.
    #[error("cannot unpack the kernel package")]
    Unpack(#[from] DebError),
    /// An environment variable has a value this crate does not know.
    #[error("{variable}={value:?}: expected one of {allowed}")]
    BadSetting {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        allowed: &'static str,
    },
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

impl KernelError {
    /// True if the kernel is unavailable because of this machine's
    /// situation (apt unusable or without Debian's archive, and the
    /// direct fetch without network, gpgv or keyring, or not tried),
    /// rather than a wrong download or a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            KernelError::Unavailable { direct, .. } => {
                direct.as_deref().is_none_or(FetchError::is_environmental)
            }
            _ => false,
        }
    }
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
    /// The configuration it was built with.
    pub flavour: Flavour,
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
    // Stamps written before flavours existed are all cloud kernels.
    let flavour = match stamp.get("flavour") {
        Some(name) => name.parse().ok()?,
        None => Flavour::Cloud,
    };
    Some(Kernel {
        version: release.to_owned(),
        bzimage,
        vmlinux,
        modules,
        package: stamp.get("package")?.to_owned(),
        pvh_entry,
        flavour,
    })
}

/// The most recently stamped valid kernel of `flavour` in the cache, for
/// offline use.
fn newest_cached(kernel_dir: &Path, flavour: Flavour) -> Option<Kernel> {
    let mut found: Vec<(std::time::SystemTime, Kernel)> = fs::read_dir(kernel_dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let mtime = e.path().join("stamp").metadata().ok()?.modified().ok()?;
            Some((mtime, from_stamp(&e.path(), None)?))
        })
        .filter(|(_, k)| k.flavour == flavour && flavour.matches_release(&k.version))
        .collect();
    found.sort_by_key(|(t, _)| *t);
    found.pop().map(|(_, k)| k)
}

/// Prints one line per kernel and process saying which kernel is used
/// and how it was got, straight to stderr (past a test runner's capture,
/// so every end-to-end log shows it).
fn announce(kernel: &Kernel, how: &str, started: Instant) {
    use std::collections::HashSet;
    use std::io::Write;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen
        .get_or_insert_with(HashSet::new)
        .insert(kernel.version.clone())
    {
        return;
    }
    let line = format!(
        "KERNEL: {} ({} flavour, {}) via {how} in {:.2} s\n",
        kernel.version,
        kernel.flavour,
        kernel.package,
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Returns the current stock kernel of the default (cloud) flavour; see
/// [`ensure_flavour_in`].
pub fn ensure_kernel_in(cache_root: &Path) -> Result<Kernel, KernelError> {
    ensure_flavour_in(cache_root, Flavour::Cloud)
}

/// Returns the current stock kernel of `flavour`, fetching and unpacking
/// it into `cache_root/kernel` if it is not there yet (with apt, or
/// directly from Debian's archive: [`crate::fetch`]). When neither can
/// reach the package but a kernel of the flavour was cached before, that
/// kernel is used (with a warning).
pub fn ensure_flavour_in(cache_root: &Path, flavour: Flavour) -> Result<Kernel, KernelError> {
    let started = Instant::now();
    let mode = Mode::from_env()?;
    let meta = flavour.meta_package();
    let kernel_dir = cache_root.join("kernel");
    let _lock =
        Lock::acquire(&kernel_dir.join(".lock")).map_err(io_ctx("locking the kernel cache"))?;
    let plan = match fetch::resolve(&kernel_dir, meta, mode) {
        Ok(plan) => plan,
        Err(e) => {
            if let Some(kernel) = newest_cached(&kernel_dir, flavour) {
                log::warn!("{e}; using cached kernel {}", kernel.package);
                announce(&kernel, "the cache (offline)", started);
                return Ok(kernel);
            }
            return Err(e);
        }
    };
    let dir = kernel_dir.join(&plan.package().release);
    if let Some(kernel) = from_stamp(&dir, Some(plan.package())) {
        announce(&kernel, &format!("{} (cached)", plan.via()), started);
        return Ok(kernel);
    }
    log::info!(
        "preparing kernel {} via {}",
        plan.package().apt_spec(),
        plan.via()
    );
    let (deb, plan) = fetch::fetch_deb(&kernel_dir, meta, plan, mode)?;
    let pkg = plan.package().clone();
    let dir = kernel_dir.join(&pkg.release);
    let unpacker = unpack(&deb, &dir)?;
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
        flavour,
    };
    check_modules(&kernel)?;
    let fp = |p: &Path| cache::fingerprint(p).map_err(io_ctx(format!("stat {}", p.display())));
    Stamp::new()
        .with("format", STAMP_FORMAT)
        .with("package", pkg.apt_spec())
        .with("release", pkg.release.as_str())
        .with("flavour", flavour.name())
        .with("via", plan.via())
        .with("unpacker", unpacker.to_string())
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
        "kernel {} ready ({} payload, PVH entry {:?}, unpacked with {unpacker})",
        kernel.version,
        extracted.compression,
        kernel.pvh_entry
    );
    announce(&kernel, &plan.via(), started);
    Ok(kernel)
}

/// Unpacks `deb` as `dir/root`, replacing any previous, possibly partial, tree.
fn unpack(deb: &Path, dir: &Path) -> Result<deb::Unpacker, KernelError> {
    fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    // Invalidate first: a crash from here on leaves no valid stamp.
    let _ = fs::remove_file(dir.join("stamp"));
    let scratch = ScratchDir::new(dir, "root").map_err(io_ctx("creating a scratch directory"))?;
    let unpacker = deb::unpack(deb, scratch.path())?;
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io_ctx(format!("removing {}", root.display())))?;
    }
    fs::rename(scratch.path(), &root)
        .map_err(io_ctx(format!("moving the tree to {}", root.display())))?;
    Ok(unpacker)
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
            flavour: Flavour::Cloud,
        }
    }

    #[test]
    fn flavours() {
        assert_eq!(Flavour::default(), Flavour::Cloud);
        assert_eq!(META_PACKAGE, "linux-image-cloud-amd64");
        assert_eq!(Flavour::Generic.meta_package(), "linux-image-amd64");
        assert_eq!("generic".parse(), Ok(Flavour::Generic));
        assert_eq!("cloud".parse(), Ok(Flavour::Cloud));
        assert_eq!("rt".parse::<Flavour>(), Err(()));
        assert_eq!(Flavour::Generic.to_string(), "generic");
        assert!(Flavour::Cloud.matches_release("6.1.0-57-cloud-amd64"));
        assert!(!Flavour::Cloud.matches_release("6.1.0-57-amd64"));
        assert!(Flavour::Generic.matches_release("6.1.0-57-amd64"));
        assert!(!Flavour::Generic.matches_release("6.1.0-57-cloud-amd64"));
        assert!(!Flavour::Generic.matches_release("6.1.0-57-rt-amd64"));
        if std::env::var_os(Flavour::GUEST_ENV).is_none() {
            assert_eq!(Flavour::guest_from_env().unwrap(), Flavour::Cloud);
        }
    }

    /// Writes a valid stamped release directory for `rel` of `flavour`.
    fn stamped(kernel_dir: &Path, rel: &str, flavour: Option<Flavour>) {
        let dir = kernel_dir.join(rel);
        let (bz, vm, modules) = paths_for(&dir, rel);
        fs::create_dir_all(bz.parent().unwrap()).unwrap();
        fs::create_dir_all(&modules).unwrap();
        fs::write(&bz, b"bz").unwrap();
        fs::write(&vm, b"elf").unwrap();
        let mut stamp = Stamp::new()
            .with("format", STAMP_FORMAT)
            .with("package", format!("linux-image-{rel}=1"))
            .with("release", rel)
            .with("bzimage", cache::fingerprint(&bz).unwrap())
            .with("vmlinux", cache::fingerprint(&vm).unwrap())
            .with("pvh_entry", "none");
        if let Some(f) = flavour {
            stamp = stamp.with("flavour", f.name());
        }
        stamp.write(&dir.join("stamp")).unwrap();
    }

    #[test]
    fn the_offline_fallback_keeps_to_the_flavour() {
        let dir = test_dir("offline");
        assert!(newest_cached(dir.path(), Flavour::Cloud).is_none());
        // A stamp from before flavours: a cloud kernel.
        stamped(dir.path(), "6.1.0-1-cloud-amd64", None);
        stamped(dir.path(), "6.1.0-2-amd64", Some(Flavour::Generic));
        let cloud = newest_cached(dir.path(), Flavour::Cloud).unwrap();
        assert_eq!(
            (cloud.version.as_str(), cloud.flavour),
            ("6.1.0-1-cloud-amd64", Flavour::Cloud)
        );
        let generic = newest_cached(dir.path(), Flavour::Generic).unwrap();
        assert_eq!(generic.version, "6.1.0-2-amd64");
        assert_eq!(generic.flavour, Flavour::Generic);
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
