//! Makes the images the VMM and its tests boot, from Debian packages and
//! this workspace's own binaries, and caches them.
//!
//! - [`ensure_kernel`]: the stock Debian cloud kernel (`linux-image-cloud-amd64`
//!   resolved to its versioned package with apt where apt knows Debian's
//!   archive, else from the archive's signed index fetched directly:
//!   [`fetch`], [`debian`]; unpacked with dpkg-deb or in Rust: [`deb`]),
//!   its bzImage, the vmlinux ELF extracted from it for PVH boot, and its
//!   modules (the KVM ones an emulated host loads). [`ensure_guest_kernel`]
//!   is the guest's: the cloud kernel, or Debian's generic one
//!   (`linux-image-amd64`) with `GUEST_KERNEL_FLAVOUR=generic`.
//! - [`build_static`]: a workspace binary built statically linked.
//! - [`cpio::Archive`]: an initramfs writer (newc, optionally gzip).
//! - [`ensure_guest_image`]: kernel + initramfs with the guest agent as
//!   `/init` + the default command line.
//!
//! - [`ensure_busybox`]: Debian's static busybox (`busybox-static`), fetched
//!   the same ways, for test guests with an init of their own.
//!
//! Everything lands in [`cache_dir`]. Each step writes atomically and
//! records its inputs in a stamp, so a warm call only checks stamps (and
//! lets cargo confirm the agent is up to date). Updates of one cache are
//! serialised between processes with `flock`, so parallel tests may call
//! these functions concurrently. All functions are blocking and
//! single-threaded; nothing here needs root. The kernel used is announced
//! on stderr, one `KERNEL: <release> (<flavour>, <package>) via <path>`
//! line per process.
//!
//! `cargo run -p resources --bin mkimage` builds the guest image and
//! prints its paths.

pub mod apt;
pub mod busybox;
pub mod bzimage;
pub mod cache;
pub mod cpio;
pub mod deb;
pub mod debian;
pub mod elf;
pub mod fetch;
pub mod guest_image;
pub mod kernel;
pub mod static_build;

use std::path::PathBuf;

use thiserror::Error;

pub use guest_image::{default_cmdline, GuestImage, GuestImageError};
pub use kernel::{Flavour, Kernel, KernelError};
pub use static_build::{workspace_root, BuildError};

/// Environment variable that overrides the cache location.
pub const CACHE_ENV: &str = "HOTPLUG_CACHE";

/// Any failure of this crate's entry points.
#[derive(Debug, Error)]
pub enum Error {
    /// The kernel could not be provided.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A static binary did not build.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The guest image could not be assembled.
    #[error(transparent)]
    GuestImage(#[from] GuestImageError),
}

impl Error {
    /// True if the kernel cannot be had on this machine (apt unusable or
    /// without Debian's archive, and the direct fetch without network to
    /// the mirror, gpgv or the keyring) rather than a wrong download or a
    /// bug: tests that need a kernel report such failures as a loud skip.
    /// (The name predates the direct fetch.)
    pub fn is_apt_unavailable(&self) -> bool {
        match self {
            Error::Kernel(k) | Error::GuestImage(GuestImageError::Kernel(k)) => k.is_unavailable(),
            _ => false,
        }
    }
}

/// The cache directory: `$HOTPLUG_CACHE` if set, else `<workspace>/.cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".cache"),
    }
}

/// The current stock cloud kernel (the emulated host's, and the guest's
/// by default), fetched and unpacked into the cache if needed.
pub fn ensure_kernel() -> Result<Kernel, Error> {
    Ok(kernel::ensure_kernel_in(&cache_dir())?)
}

/// The current stock kernel of `flavour`, fetched and unpacked into the
/// cache if needed.
pub fn ensure_kernel_flavour(flavour: Flavour) -> Result<Kernel, Error> {
    Ok(kernel::ensure_flavour_in(&cache_dir(), flavour)?)
}

/// The guest's kernel: the flavour `GUEST_KERNEL_FLAVOUR` names
/// (`cloud`, the default, or `generic`).
pub fn ensure_guest_kernel() -> Result<Kernel, Error> {
    ensure_kernel_flavour(Flavour::guest_from_env()?)
}

/// Builds workspace binary `bin` of `package` statically linked (release,
/// `x86_64-unknown-linux-gnu`, `+crt-static`, target dir
/// `<workspace>/target/static`) and returns its path.
pub fn build_static(package: &str, bin: &str) -> Result<PathBuf, Error> {
    Ok(static_build::build_static(package, bin)?)
}

/// Debian's static busybox, fetched and unpacked into the cache if needed.
pub fn ensure_busybox() -> Result<busybox::Busybox, busybox::BusyboxError> {
    busybox::ensure_busybox_in(&cache_dir())
}

/// The guest image with a gzip-compressed initramfs, built if needed.
pub fn ensure_guest_image() -> Result<GuestImage, Error> {
    ensure_guest_image_with(cpio::Compression::Gzip)
}

/// The guest image with the initramfs compressed as asked (uncompressed
/// unpacks faster under emulation).
pub fn ensure_guest_image_with(compression: cpio::Compression) -> Result<GuestImage, Error> {
    Ok(guest_image::ensure_guest_image_in(
        &cache_dir(),
        compression,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_defaults_to_workspace() {
        // Only checks the default branch when the variable is unset, so the
        // test does not race with others by mutating the environment.
        if std::env::var_os(CACHE_ENV).is_none() {
            assert_eq!(cache_dir(), workspace_root().join(".cache"));
        }
    }

    #[test]
    fn unavailability_is_classified() {
        let unavailable = |direct| {
            Error::Kernel(KernelError::Unavailable {
                meta: "linux-image-cloud-amd64".into(),
                apt: Some(Box::new(apt::AptError::ListsMissing)),
                direct,
            })
        };
        let apt_only = unavailable(None);
        assert!(apt_only.is_apt_unavailable());
        let text = apt_only.to_string();
        assert!(text.contains("cannot get the kernel package"), "{text}");
        assert!(text.contains("apt: apt has no package lists"), "{text}");
        let offline = unavailable(Some(Box::new(debian::FetchError::Network {
            url: "http://m/InRelease".into(),
            source: "connection refused".into(),
        })));
        assert!(offline.is_apt_unavailable());
        assert!(
            offline
                .to_string()
                .ends_with("direct fetch: cannot fetch http://m/InRelease: connection refused"),
            "{offline}"
        );
        let tampered = unavailable(Some(Box::new(debian::FetchError::BadSignature {
            what: "InRelease".into(),
            why: "BADSIG".into(),
        })));
        assert!(
            !tampered.is_apt_unavailable(),
            "a bad signature is a failure, not a skip"
        );
        let other = Error::Kernel(KernelError::CompressedModule("x".into()));
        assert!(!other.is_apt_unavailable());
    }
}
