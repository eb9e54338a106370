//! The guest image: the stock kernel (cloud flavour, or the one
//! `GUEST_KERNEL_FLAVOUR` names) plus an initramfs whose `/init` is the
//! statically linked guest agent.
//!
//! The initramfs is rebuilt only when the agent binary, the layout or the
//! compression changed (recorded in a stamp next to it).

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cache::{self, Lock, Stamp};
use crate::cpio::{Archive, Compression};
use crate::kernel::{self, Flavour, Kernel, KernelError};
use crate::static_build::{self, BuildError};

/// The workspace package holding the guest agent.
pub const AGENT_PACKAGE: &str = "guest";
/// The guest agent binary, installed as `/init`.
pub const AGENT_BIN: &str = "guest-agent";
/// Bump whenever the archive layout below changes.
const LAYOUT_VERSION: &str = "1";

/// The default guest command line, one parameter per entry with its reason.
pub const CMDLINE_PARAMS: &[(&str, &str)] = &[
    // The agent's ready line and CPU lines go to /dev/console.
    (
        "console=ttyS0",
        "kernel and agent console on the first 16550 UART",
    ),
    // Every console line costs ~15 ms in the nested setup.
    (
        "quiet",
        "kernel log level 4: only warnings and errors reach the console",
    ),
    (
        "reboot=k",
        "reboot through the i8042 keyboard controller reset line",
    ),
    (
        "panic=-1",
        "reboot at once on a panic, so the VMM sees the guest end",
    ),
    (
        "pci=off",
        "no PCI bus: the VMM has none, probing it only costs exits",
    ),
    (
        "rdinit=/init",
        "run the agent from the initramfs as PID 1 (the default, made explicit)",
    ),
];

/// The default guest command line (see [`CMDLINE_PARAMS`]).
pub fn default_cmdline() -> String {
    CMDLINE_PARAMS
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why the guest image could not be made.
#[derive(Debug, Error)]
pub enum GuestImageError {
    /// The kernel is unavailable.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The agent did not build.
    #[error(transparent)]
    Build(#[from] BuildError),
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

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestImageError {
    let context = context.into();
    move |source| GuestImageError::Io { context, source }
}

/// A bootable guest: kernel, initramfs and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The stock kernel.
    pub kernel: Kernel,
    /// The initramfs (cpio newc, gzip by default).
    pub initramfs: PathBuf,
    /// The default guest command line.
    pub cmdline: String,
    /// The static agent binary packed as `/init`.
    pub agent: PathBuf,
}

/// Prints, once per process, which kernel the guest boots (straight to
/// stderr, past a test runner's capture: every end-to-end log shows it).
fn announce_guest_kernel(kernel: &Kernel) {
    use std::io::Write;
    use std::sync::Mutex;
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() == Some(kernel.version.as_str()) {
        return;
    }
    *last = Some(kernel.version.clone());
    let line = format!(
        "GUEST-KERNEL: {} ({} flavour, {})\n",
        kernel.version, kernel.flavour, kernel.package
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// What every guest initramfs has: the mount points of the kernel file
/// systems, a `/tmp`, and `/dev/console` so the kernel can open a console
/// for `/init` before devtmpfs is mounted.
pub fn base_archive() -> Archive {
    let mut archive = Archive::new();
    archive
        .dir("dev", 0o755)
        .char_device("dev/console", 0o600, 5, 1)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("tmp", 0o1777);
    archive
}

/// The initramfs layout: [`base_archive`] with the agent as `/init`.
pub fn initramfs_archive(agent: &Path) -> std::io::Result<Archive> {
    let mut archive = base_archive();
    archive.file_from_host("init", agent, 0o755)?;
    Ok(archive)
}

fn initramfs_name(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "initramfs.cpio",
        Compression::Gzip => "initramfs.cpio.gz",
    }
}

/// Builds (or reuses) the guest image in `cache_root/guest`, with the
/// initramfs compressed as asked and the kernel flavour of
/// `GUEST_KERNEL_FLAVOUR` (cloud by default).
pub fn ensure_guest_image_in(
    cache_root: &Path,
    compression: Compression,
) -> Result<GuestImage, GuestImageError> {
    ensure_guest_image_for(cache_root, compression, Flavour::guest_from_env()?)
}

/// [`ensure_guest_image_in`] with the kernel of `flavour`.
pub fn ensure_guest_image_for(
    cache_root: &Path,
    compression: Compression,
    flavour: Flavour,
) -> Result<GuestImage, GuestImageError> {
    let kernel = kernel::ensure_flavour_in(cache_root, flavour)?;
    announce_guest_kernel(&kernel);
    let agent = static_build::build_static(AGENT_PACKAGE, AGENT_BIN)?;
    let dir = cache_root.join("guest");
    let _lock = Lock::acquire(&dir.join(".lock")).map_err(io_ctx("locking the guest cache"))?;
    let initramfs = dir.join(initramfs_name(compression));
    let stamp_path = dir.join(format!("{}.stamp", initramfs_name(compression)));
    let agent_fp =
        cache::fingerprint(&agent).map_err(io_ctx(format!("stat {}", agent.display())))?;
    let image = GuestImage {
        kernel,
        initramfs: initramfs.clone(),
        cmdline: default_cmdline(),
        agent: agent.clone(),
    };
    let fresh = Stamp::read(&stamp_path).is_some_and(|s| {
        s.get("layout") == Some(LAYOUT_VERSION)
            && s.get("agent") == Some(&agent_fp)
            && s.matches_file("initramfs", &initramfs)
    });
    if fresh {
        return Ok(image);
    }
    log::info!("packing {}", initramfs.display());
    let archive =
        initramfs_archive(&agent).map_err(io_ctx(format!("reading {}", agent.display())))?;
    fs::create_dir_all(&dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    cache::atomic_write(&initramfs, |w| archive.write_to(w, compression))
        .map_err(io_ctx(format!("writing {}", initramfs.display())))?;
    let initramfs_fp =
        cache::fingerprint(&initramfs).map_err(io_ctx(format!("stat {}", initramfs.display())))?;
    Stamp::new()
        .with("layout", LAYOUT_VERSION)
        .with("agent", agent_fp)
        .with("initramfs", initramfs_fp)
        .write(&stamp_path)
        .map_err(io_ctx("writing the initramfs stamp"))?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_documented_defaults() {
        let c = default_cmdline();
        assert!(
            c.starts_with("console=ttyS0 quiet reboot=k panic=-1 pci=off"),
            "{c}"
        );
        assert!(!c.contains("  "));
    }

    #[test]
    fn initramfs_layout() {
        let archive = initramfs_archive(Path::new("/bin/sh")).unwrap();
        let paths: Vec<_> = archive.paths().collect();
        assert_eq!(paths, ["dev", "dev/console", "proc", "sys", "tmp", "init"]);
        assert!(initramfs_archive(Path::new("/nonexistent/agent")).is_err());
    }
}
