//! Debian's static busybox (`busybox-static`), for test guests whose init
//! is not our agent (`tests/tests/service.rs`).
//!
//! Fetched like the kernel ([`crate::fetch`]): `apt-get download` where
//! apt knows the package, else straight from Debian's archive through its
//! signed index ([`crate::debian::resolve_package`]: the `InRelease`
//! verified with gpgv, the `Packages` index and the `.deb` checked against
//! their signed sizes and SHA-256). `HOTPLUG_KERNEL_FETCH=apt|direct`
//! forces one path here too. The `.deb` is unpacked ([`crate::deb`]) and
//! `bin/busybox` kept in `<cache>/busybox/busybox`; without network a
//! busybox cached before is used, with a warning.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::apt::{self, AptError};
use crate::cache::{self, Lock, ScratchDir, Stamp};
use crate::deb::{self, DebError};
use crate::debian::{self, FetchError};
use crate::fetch::Mode;

/// The Debian package.
pub const PACKAGE: &str = "busybox-static";

/// Why busybox could not be provided.
#[derive(Debug, Error)]
pub enum BusyboxError {
    /// Neither apt nor the direct fetch could provide the package, and
    /// none is cached.
    #[error("cannot get {PACKAGE}: {}", crate::kernel::describe(.apt.as_deref(), .direct.as_deref()))]
    Unavailable {
        /// Why apt could not, if it was tried.
        apt: Option<Box<AptError>>,
        /// Why the direct fetch could not, if it was tried.
        direct: Option<Box<FetchError>>,
    },
    /// The package could not be unpacked.
    #[error("cannot unpack {PACKAGE}")]
    Unpack(#[from] DebError),
    /// The package has no static busybox binary.
    #[error("{PACKAGE} ({0}) has no bin/busybox ELF executable")]
    Missing(String),
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

impl BusyboxError {
    /// True if this machine cannot get the package (no apt lists and no
    /// network to the mirror, no gpgv or keyring) rather than a wrong
    /// download: tests report it as a loud skip.
    pub fn is_unavailable(&self) -> bool {
        match self {
            BusyboxError::Unavailable { direct, .. } => {
                direct.as_deref().is_none_or(FetchError::is_environmental)
            }
            _ => false,
        }
    }
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BusyboxError {
    let context = context.into();
    move |source| BusyboxError::Io { context, source }
}

/// A static busybox ready to pack into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busybox {
    /// The binary.
    pub path: PathBuf,
    /// The package it came from (`busybox-static=VERSION`).
    pub package: String,
    /// How it was fetched (`apt`, `direct fetch (...)`, `cache`).
    pub via: String,
}

/// The static busybox in `cache_root/busybox`, fetched and unpacked if
/// needed (see the module docs).
pub fn ensure_busybox_in(cache_root: &Path) -> Result<Busybox, BusyboxError> {
    let dir = cache_root.join(PACKAGE);
    fs::create_dir_all(&dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    let _lock = Lock::acquire(&dir.join(".lock")).map_err(io_ctx("locking the busybox cache"))?;
    let mode = Mode::from_env().unwrap_or(Mode::Auto);
    let (deb, spec, via) = match fetch(&dir, mode) {
        Ok(found) => found,
        Err(e) if e.is_unavailable() => {
            return match cached(&dir) {
                Some(bb) => {
                    log::warn!("{e}; using the cached {}", bb.package);
                    Ok(bb)
                }
                None => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    if let Some(bb) = cached(&dir).filter(|b| b.package == spec) {
        return Ok(Busybox { via, ..bb });
    }
    let scratch =
        ScratchDir::new(&dir, "unpack").map_err(io_ctx("creating a scratch directory"))?;
    deb::unpack(&deb, scratch.path())?;
    let unpacked = scratch.path().join("bin/busybox");
    let data = fs::read(&unpacked).map_err(|_| BusyboxError::Missing(spec.clone()))?;
    if !data.starts_with(b"\x7fELF") {
        return Err(BusyboxError::Missing(spec));
    }
    let path = dir.join("busybox");
    cache::atomic_write_bytes(&path, &data, 0o755)
        .map_err(io_ctx(format!("writing {}", path.display())))?;
    let fp = cache::fingerprint(&path).map_err(io_ctx(format!("stat {}", path.display())))?;
    Stamp::new()
        .with("package", spec.as_str())
        .with("busybox", fp)
        .write(&dir.join("stamp"))
        .map_err(io_ctx("writing the busybox stamp"))?;
    Ok(Busybox {
        path,
        package: spec,
        via,
    })
}

/// The busybox unpacked before, if its stamp holds.
fn cached(dir: &Path) -> Option<Busybox> {
    let stamp = Stamp::read(&dir.join("stamp"))?;
    let path = dir.join("busybox");
    stamp.matches_file("busybox", &path).then(|| Busybox {
        path,
        package: stamp.get("package").unwrap_or(PACKAGE).to_owned(),
        via: "cache".to_owned(),
    })
}

/// The `.deb` (downloaded if needed), its `name=version` and how it came.
fn fetch(dir: &Path, mode: Mode) -> Result<(PathBuf, String, String), BusyboxError> {
    let downloads = dir.join("downloads");
    fs::create_dir_all(&downloads).map_err(io_ctx("creating the download directory"))?;
    let mut apt_error = None;
    if mode != Mode::Direct {
        match fetch_with_apt(&downloads) {
            Ok((deb, spec)) => return Ok((deb, spec, "apt".to_owned())),
            Err(e) if mode == Mode::Apt => {
                return Err(BusyboxError::Unavailable {
                    apt: Some(Box::new(e)),
                    direct: None,
                })
            }
            Err(e) => {
                log::info!("apt cannot get {PACKAGE} ({e}); fetching Debian's index directly");
                apt_error = Some(Box::new(e));
            }
        }
    }
    let unavailable = |apt, e| BusyboxError::Unavailable {
        apt,
        direct: Some(Box::new(e)),
    };
    let config = debian::Config::from_system();
    let resolved = debian::resolve_package(PACKAGE, &config, &dir.join("index"))
        .map_err(|e| unavailable(apt_error.take(), e))?;
    let spec = resolved.package.apt_spec();
    let deb = downloads.join(format!("{spec}.deb"));
    if !debian::is_downloaded(&resolved, &deb) {
        log::info!("downloading {}", resolved.url);
        debian::download(&resolved, &deb).map_err(|e| unavailable(apt_error.take(), e))?;
    }
    let via = format!("direct fetch ({}, verified index)", resolved.suite);
    Ok((deb, spec, via))
}

fn fetch_with_apt(downloads: &Path) -> Result<(PathBuf, String), AptError> {
    let version = apt::candidate_version(PACKAGE)?;
    let spec = format!("{PACKAGE}={version}");
    let deb = downloads.join(format!("{spec}.deb"));
    if deb.is_file() {
        return Ok((deb, spec));
    }
    let scratch = ScratchDir::new(downloads, "download").map_err(|source| AptError::Io {
        context: "creating a scratch directory".into(),
        source,
    })?;
    let fetched = apt::download_spec(&spec, scratch.path())?;
    fs::rename(&fetched, &deb).map_err(|source| AptError::Io {
        context: format!("moving {}", fetched.display()),
        source,
    })?;
    Ok((deb, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_is_classified() {
        let offline = BusyboxError::Unavailable {
            apt: Some(Box::new(AptError::ListsMissing)),
            direct: Some(Box::new(FetchError::Network {
                url: "http://m/InRelease".into(),
                source: "connection refused".into(),
            })),
        };
        assert!(offline.is_unavailable());
        let text = offline.to_string();
        assert!(
            text.starts_with("cannot get busybox-static: apt: "),
            "{text}"
        );
        assert!(text.ends_with("InRelease: connection refused"), "{text}");
        let tampered = BusyboxError::Unavailable {
            apt: None,
            direct: Some(Box::new(FetchError::BadSignature {
                what: "InRelease".into(),
                why: "BADSIG".into(),
            })),
        };
        assert!(!tampered.is_unavailable(), "a bad signature is a failure");
        assert!(!BusyboxError::Missing("x".into()).is_unavailable());
    }

    #[test]
    fn a_cache_without_a_good_stamp_is_not_used() {
        let dir = crate::cache::tests::test_dir("busybox-cache");
        assert_eq!(cached(dir.path()), None);
        fs::write(dir.path().join("busybox"), b"\x7fELF...").unwrap();
        assert_eq!(cached(dir.path()), None, "no stamp");
        let fp = cache::fingerprint(&dir.path().join("busybox")).unwrap();
        Stamp::new()
            .with("package", "busybox-static=1")
            .with("busybox", fp)
            .write(&dir.path().join("stamp"))
            .unwrap();
        let bb = cached(dir.path()).unwrap();
        assert_eq!(
            (bb.package.as_str(), bb.via.as_str()),
            ("busybox-static=1", "cache")
        );
    }

    /// Network: `cargo test -p resources -- --ignored fetches_busybox`
    /// (`HOTPLUG_KERNEL_FETCH=direct` for the signed-index path).
    #[test]
    #[ignore = "downloads busybox-static from Debian"]
    fn fetches_busybox() {
        let dir = crate::cache::tests::test_dir("busybox-fetch");
        let bb = ensure_busybox_in(dir.path()).unwrap();
        assert!(bb.package.starts_with("busybox-static="), "{bb:?}");
        let data = fs::read(&bb.path).unwrap();
        assert!(data.starts_with(b"\x7fELF"));
        // A second call reuses the unpacked binary.
        let again = ensure_busybox_in(dir.path()).unwrap();
        assert_eq!((again.path, again.package), (bb.path, bb.package));
    }
}
