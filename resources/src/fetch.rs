//! Which path gets a kernel package: the system's apt where it knows
//! Debian's archive (fast: the package lists are local, and a resolution
//! is memoised while they are unchanged), else the direct fetch of
//! [`crate::debian`] (signed index over HTTP(S)).
//!
//! `HOTPLUG_KERNEL_FETCH=apt|direct` forces one path; the default, `auto`,
//! tries apt first and falls back to the direct fetch when apt cannot
//! resolve the meta package or download it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::apt::{self, AptError, KernelPackage};
use crate::cache::{ScratchDir, Stamp};
use crate::debian::{self, FetchError};
use crate::kernel::KernelError;

/// Environment variable choosing the fetch path.
pub const FETCH_ENV: &str = "HOTPLUG_KERNEL_FETCH";

/// Which paths may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// apt, then the direct fetch.
    Auto,
    /// apt only.
    Apt,
    /// The direct fetch only.
    Direct,
}

impl Mode {
    /// `$HOTPLUG_KERNEL_FETCH` (`auto`, `apt`, `direct`); unset or empty
    /// means `auto`.
    pub fn from_env() -> Result<Mode, KernelError> {
        match std::env::var(FETCH_ENV).as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(Mode::Auto),
            Ok("apt") => Ok(Mode::Apt),
            Ok("direct") => Ok(Mode::Direct),
            Ok(other) => Err(KernelError::BadSetting {
                variable: FETCH_ENV,
                value: other.to_owned(),
                allowed: "auto, apt, direct",
            }),
        }
    }
}

/// Where a kernel package was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// apt knows it.
    Apt(KernelPackage),
    /// Found in Debian's signed index, fetched directly.
    Direct(debian::Resolved),
}

impl Plan {
    /// The package.
    pub fn package(&self) -> &KernelPackage {
        match self {
            Plan::Apt(p) => p,
            Plan::Direct(r) => &r.package,
        }
    }

    /// How it is fetched, for the log.
    pub fn via(&self) -> String {
        match self {
            Plan::Apt(_) => "apt".to_owned(),
            Plan::Direct(r) => format!("direct fetch ({}, verified index)", r.suite),
        }
    }
}

/// Resolves `meta` as `mode` allows.
pub fn resolve(kernel_dir: &Path, meta: &str, mode: Mode) -> Result<Plan, KernelError> {
    let mut apt_error = None;
    if mode != Mode::Direct {
        match resolve_with_apt(kernel_dir, meta) {
            Ok(pkg) => return Ok(Plan::Apt(pkg)),
            Err(e) if mode == Mode::Apt => return Err(unavailable(meta, Some(e), None)),
            Err(e) => {
                log::info!("apt cannot resolve {meta} ({e}); fetching Debian's index directly");
                apt_error = Some(e);
            }
        }
    }
    resolve_direct(kernel_dir, meta)
        .map(Plan::Direct)
        .map_err(|e| unavailable(meta, apt_error, Some(e)))
}

fn unavailable(meta: &str, apt: Option<AptError>, direct: Option<FetchError>) -> KernelError {
    KernelError::Unavailable {
        meta: meta.to_owned(),
        apt: apt.map(Box::new),
        direct: direct.map(Box::new),
    }
}

fn resolve_direct(kernel_dir: &Path, meta: &str) -> Result<debian::Resolved, FetchError> {
    let config = debian::Config::from_system();
    debian::resolve(meta, &config, &kernel_dir.join("index"))
}

/// Resolves `meta` with apt, reusing the last answer while apt's package
/// lists (and `APT_CONFIG`) are unchanged: apt-cache parses all lists on
/// every call, which takes most of a second here.
fn resolve_with_apt(kernel_dir: &Path, meta: &str) -> Result<KernelPackage, AptError> {
    let path = kernel_dir.join(format!("resolved-{meta}"));
    let config = std::env::var("APT_CONFIG").unwrap_or_default();
    let lists = apt::lists_fingerprint().map(|l| format!("{l}:{config}"));
    if let (Some(lists), Some(stamp)) = (&lists, Stamp::read(&path)) {
        if stamp.get("lists") == Some(lists) && stamp.get("meta") == Some(meta) {
            if let (Some(name), Some(release)) = (stamp.get("name"), stamp.get("release")) {
                return Ok(KernelPackage {
                    name: name.to_owned(),
                    version: stamp.get("version").map(str::to_owned),
                    release: release.to_owned(),
                });
            }
        }
    }
    let pkg = apt::resolve(meta)?;
    if let Some(lists) = lists {
        let mut stamp = Stamp::new()
            .with("lists", lists)
            .with("meta", meta)
            .with("name", pkg.name.as_str())
            .with("release", pkg.release.as_str());
        if let Some(version) = &pkg.version {
            stamp = stamp.with("version", version.as_str());
        }
        // Only an optimisation: a failed write costs a slower next run.
        let _ = fs::create_dir_all(kernel_dir);
        let _ = stamp.write(&path);
    }
    Ok(pkg)
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// Where the `.deb` of `pkg` is kept.
pub fn deb_path(kernel_dir: &Path, pkg: &KernelPackage) -> PathBuf {
    kernel_dir
        .join("downloads")
        .join(format!("{}.deb", pkg.apt_spec()))
}

/// Returns the cached `.deb` of `plan`'s package, downloading it if
/// needed. If apt fails to download it (and `mode` allows), the direct
/// fetch resolves and downloads the package instead; the plan returned
/// is the one that got it.
pub fn fetch_deb(
    kernel_dir: &Path,
    meta: &str,
    plan: Plan,
    mode: Mode,
) -> Result<(PathBuf, Plan), KernelError> {
    let downloads = kernel_dir.join("downloads");
    fs::create_dir_all(&downloads).map_err(io_ctx("creating the download directory"))?;
    match plan {
        Plan::Direct(resolved) => {
            let deb = deb_path(kernel_dir, &resolved.package);
            if !debian::is_downloaded(&resolved, &deb) {
                log::info!("downloading {}", resolved.url);
                debian::download(&resolved, &deb).map_err(|e| unavailable(meta, None, Some(e)))?;
            }
            Ok((deb, Plan::Direct(resolved)))
        }
        Plan::Apt(pkg) => {
            let deb = deb_path(kernel_dir, &pkg);
            if deb.is_file() {
                return Ok((deb, Plan::Apt(pkg)));
            }
            let scratch = ScratchDir::new(&downloads, "download")
                .map_err(io_ctx("creating a scratch directory"))?;
            match apt::download(&pkg, scratch.path()) {
                Ok(fetched) => {
                    fs::rename(&fetched, &deb)
                        .map_err(io_ctx(format!("moving {}", fetched.display())))?;
                    Ok((deb, Plan::Apt(pkg)))
                }
                Err(e) if mode == Mode::Apt => Err(unavailable(meta, Some(e), None)),
                Err(e) => {
                    log::warn!(
                        "apt cannot download {} ({e}); trying the direct fetch",
                        pkg.apt_spec()
                    );
                    let resolved = resolve_direct(kernel_dir, meta)
                        .map_err(|d| unavailable(meta, Some(e), Some(d)))?;
                    fetch_deb(kernel_dir, meta, Plan::Direct(resolved), Mode::Direct)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::test_dir;

    #[test]
    fn plans_say_how() {
        let pkg = KernelPackage {
            name: "linux-image-6.1.0-57-amd64".into(),
            version: Some("6.1.192-3".into()),
            release: "6.1.0-57-amd64".into(),
        };
        assert_eq!(Plan::Apt(pkg.clone()).via(), "apt");
        let direct = Plan::Direct(debian::Resolved {
            package: pkg.clone(),
            url: "http://m/x.deb".into(),
            size: 1,
            sha256: "00".into(),
            suite: "bookworm-security".into(),
        });
        assert!(
            direct.via().contains("bookworm-security"),
            "{}",
            direct.via()
        );
        assert_eq!(direct.package(), &pkg);
        let dir = test_dir("debpath");
        assert!(deb_path(dir.path(), &pkg)
            .ends_with("downloads/linux-image-6.1.0-57-amd64=6.1.192-3.deb"));
    }

    #[test]
    fn a_corrupt_cached_deb_is_fetched_again_and_checked() {
        // The "mirror" serves the wrong bytes: the cached file does not
        // match its index entry, the new download neither, and nothing
        // is left behind.
        let dir = test_dir("debrefetch");
        let url = debian::http::tests::serve(b"tampered", 1);
        let pkg = KernelPackage {
            name: "linux-image-1-amd64".into(),
            version: Some("1".into()),
            release: "1-amd64".into(),
        };
        let deb = deb_path(dir.path(), &pkg);
        fs::create_dir_all(deb.parent().unwrap()).unwrap();
        fs::write(&deb, b"stale").unwrap();
        let plan = Plan::Direct(debian::Resolved {
            package: pkg,
            url: format!("{url}/x.deb"),
            size: 8,
            sha256: debian::http::sha256_hex(b"original"),
            suite: "bookworm".into(),
        });
        let err = fetch_deb(dir.path(), "m", plan, Mode::Direct).unwrap_err();
        let KernelError::Unavailable {
            direct: Some(d), ..
        } = &err
        else {
            panic!("{err}");
        };
        assert!(matches!(**d, FetchError::Mismatch { .. }), "{d}");
        assert_eq!(
            fs::read(&deb).unwrap(),
            b"stale",
            "the old file stays until a good one lands"
        );
    }

    #[test]
    fn modes() {
        // Only checks parsing of the current value, without mutating the
        // environment (tests run in parallel threads).
        if std::env::var_os(FETCH_ENV).is_none() {
            assert_eq!(Mode::from_env().unwrap(), Mode::Auto);
        }
    }
}
