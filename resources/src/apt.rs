//! Finding and downloading Debian kernel packages with the system's apt
//! (the fast path where apt knows Debian's archive; [`crate::debian`] is
//! the other).
//!
//! The stock kernel is named through its meta package
//! (`linux-image-cloud-amd64`), whose candidate version depends on exactly
//! one versioned image package (`linux-image-6.1.0-56-cloud-amd64`, or on
//! some releases the `-unsigned` build). Old versions leave the mirror, so
//! the versioned name is never hard-coded. `apt-get download` needs no
//! root once apt's package lists exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use thiserror::Error;

/// Where apt keeps its package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// Why a package could not be resolved, fetched or unpacked.
#[derive(Debug, Error)]
pub enum AptError {
    /// A tool could not be started at all.
    #[error("cannot run {tool} (is it installed?)")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// apt has no package lists to look in.
    #[error("apt has no package lists: run `apt-get update` as root once")]
    ListsMissing,
    /// The meta package is unknown to apt.
    #[error("apt does not know package {0} (is the Debian main archive in sources.list?)")]
    UnknownPackage(String),
    /// The meta package's dependencies name no kernel image.
    #[error("{0} depends on no linux-image package")]
    NoImageDependency(String),
    /// A tool ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// The tail of its error output.
        stderr: String,
    },
    /// The download produced no .deb file.
    #[error("apt-get download of {0} produced no .deb file")]
    NoDeb(String),
    /// File system error around the tools.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A versioned kernel image package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    /// Debian version pinned by the meta package, e.g. `6.1.192-2`.
    pub version: Option<String>,
    /// Kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

impl KernelPackage {
    /// `name=version` for apt, or the bare name if unversioned.
    pub fn apt_spec(&self) -> String {
        match &self.version {
            Some(v) => format!("{}={v}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Picks the kernel image package out of a meta package's `Depends` field,
/// e.g. `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`. Alternatives
/// (`a | b`) are considered in order; `-dbg` packages are skipped; the
/// `-unsigned` suffix is not part of the kernel release.
pub fn parse_depends_field(depends: &str) -> Option<KernelPackage> {
    depends
        .split([',', '|'])
        .map(str::trim)
        .filter_map(|dep| {
            let (name, rest) = dep.split_once([' ', '(']).unwrap_or((dep, ""));
            let name = name.split(':').next().unwrap_or(name);
            let release = name.strip_prefix("linux-image-")?;
            if name.ends_with("-dbg")
                || name.ends_with("-dbgsym")
                || !release.starts_with(char::is_numeric)
            {
                return None;
            }
            let release = release.strip_suffix("-unsigned").unwrap_or(release);
            let version = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.trim().strip_prefix('='))
                .map(|v| v.trim().to_owned());
            Some(KernelPackage {
                name: name.to_owned(),
                version,
                release: release.to_owned(),
            })
        })
        .next()
}

/// Extracts the kernel package from `apt-cache show --no-all-versions`
/// output (one RFC 822 style record; continuation lines start with a space).
pub fn parse_show_output(text: &str) -> Option<KernelPackage> {
    let mut depends = None::<String>;
    for line in text.lines() {
        if line.is_empty() && depends.is_some() {
            break; // Only the first record (the candidate) counts.
        }
        match &mut depends {
            Some(d) if line.starts_with([' ', '\t']) => d.push_str(line),
            Some(_) => break,
            None => {
                if let Some(v) = line.strip_prefix("Depends:") {
                    depends = Some(v.to_owned());
                }
            }
        }
    }
    parse_depends_field(&depends?)
}

/// Extracts the kernel package from `apt-cache depends` output, e.g.
/// `  Depends: linux-image-6.1.0-56-cloud-amd64` (alternatives are
/// prefixed `|`; virtual packages are shown in angle brackets).
pub fn parse_depends_output(text: &str) -> Option<KernelPackage> {
    let deps: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .trim_start_matches('|')
                .strip_prefix("Depends:")
        })
        .map(str::trim)
        .filter(|d| !d.starts_with('<'))
        .collect();
    parse_depends_field(&deps.join(" | "))
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<Output, AptError> {
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| AptError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("W:")).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" / ");
    Err(AptError::Failed {
        command: format!("{cmd:?}").replace('"', ""),
        stderr: if tail.is_empty() {
            out.status.to_string()
        } else {
            tail
        },
    })
}

/// True if apt has any package list to search.
pub fn lists_present() -> bool {
    std::fs::read_dir(APT_LISTS).is_ok_and(|dir| {
        dir.flatten()
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    })
}

/// An identity of apt's package lists (names, sizes, modification times):
/// it changes whenever `apt-get update` changes what apt-cache would say,
/// so a resolution can be reused while it stays the same. `None` if there
/// are no lists.
pub fn lists_fingerprint() -> Option<String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<(String, u64, i64, i64)> = std::fs::read_dir(APT_LISTS)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, meta.len(), meta.mtime(), meta.mtime_nsec())
            })
        })
        .filter(|(name, ..)| name.contains("_Packages"))
        .collect();
    if entries.is_empty() {
        return None;
    }
    entries.sort();
    let mut hasher = std::hash::DefaultHasher::new();
    entries.hash(&mut hasher);
    Some(format!("{}:{:016x}", entries.len(), hasher.finish()))
}

/// Resolves `meta` to the kernel image package its candidate depends on.
pub fn resolve(meta: &str) -> Result<KernelPackage, AptError> {
    let text = show_candidate(meta)?;
    if let Some(pkg) = parse_show_output(&text) {
        return Ok(pkg);
    }
    // Fall back to the resolver's view, which handles odd field layouts.
    let out = run(
        "apt-cache",
        Command::new("apt-cache").args(["depends", meta]),
    )?;
    parse_depends_output(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| AptError::NoImageDependency(meta.into()))
}

fn euid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The candidate version of `package` (its first `Version:` in
/// `apt-cache show --no-all-versions`).
pub fn candidate_version(package: &str) -> Result<String, AptError> {
    parse_version(&show_candidate(package)?).ok_or_else(|| AptError::UnknownPackage(package.into()))
}

/// `apt-cache show --no-all-versions package`: the candidate's record.
/// Nothing shown is [`AptError::ListsMissing`] without package lists,
/// else [`AptError::UnknownPackage`].
fn show_candidate(package: &str) -> Result<String, AptError> {
    let out = run(
        "apt-cache",
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
    );
    match out {
        Ok(out) if !out.stdout.is_empty() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(_) | Err(AptError::Failed { .. }) if !lists_present() => Err(AptError::ListsMissing),
        Ok(_) | Err(AptError::Failed { .. }) => Err(AptError::UnknownPackage(package.into())),
        Err(e) => Err(e),
    }
}

/// The first record's `Version:` of `apt-cache show` output.
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace))
}

/// Downloads `pkg` into `dir` (which should be empty) and returns the .deb.
pub fn download(pkg: &KernelPackage, dir: &Path) -> Result<PathBuf, AptError> {
    download_spec(&pkg.apt_spec(), dir)
}

/// Downloads the package `spec` (`name` or `name=version`) into `dir`
/// (which should be empty) and returns the .deb.
pub fn download_spec(spec: &str, dir: &Path) -> Result<PathBuf, AptError> {
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(dir).args(["download", "-q"]);
    if euid_is_root() {
        // As root apt drops to the `_apt` user, which may not be able to
        // write into the cache; the download is verified by hash either way.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd.arg(spec);
    run("apt-get", &mut cmd).map_err(|e| match e {
        AptError::Failed { .. } if !lists_present() => AptError::ListsMissing,
        e => e,
    })?;
    let io_err = |source| AptError::Io {
        context: format!("reading {}", dir.display()),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(path);
        }
    }
    Err(AptError::NoDeb(spec.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apt-cache show --no-all-versions linux-image-cloud-amd64`, bookworm.
    const SHOW: &str = "\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Installed-Size: 13
Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>
Architecture: amd64
Provides: linux-latest-modules-6.1.0-56-cloud-amd64, virtualbox-guest-modules, wireguard-modules (= 1.0.0)
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
Description-md5: 11b016f38b41530eec9d7e80035fed66
Homepage: https://www.kernel.org/
Built-Using: linux (= 6.1.192-2)
Section: kernel

Package: linux-image-cloud-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)
";

    /// `apt-cache depends linux-image-cloud-amd64`.
    const DEPENDS: &str = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";

    #[test]
    fn parses_show_output_of_candidate() {
        let pkg = parse_show_output(SHOW).unwrap();
        assert_eq!(
            pkg,
            KernelPackage {
                name: "linux-image-6.1.0-56-cloud-amd64".into(),
                version: Some("6.1.192-2".into()),
                release: "6.1.0-56-cloud-amd64".into(),
            }
        );
        assert_eq!(pkg.apt_spec(), "linux-image-6.1.0-56-cloud-amd64=6.1.192-2");
    }

    #[test]
    fn parses_depends_output() {
        let pkg = parse_depends_output(DEPENDS).unwrap();
        assert_eq!(pkg.name, "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(pkg.version, None);
        assert_eq!(pkg.apt_spec(), pkg.name);
        let alt = " |Depends: linux-image-6.1.0-9-cloud-amd64-dbg\n  Depends: <linux-image>\n  Depends: linux-image-6.1.0-9-cloud-amd64-unsigned\n";
        let pkg = parse_depends_output(alt).unwrap();
        assert_eq!(pkg.name, "linux-image-6.1.0-9-cloud-amd64-unsigned");
        assert_eq!(pkg.release, "6.1.0-9-cloud-amd64");
    }

    #[test]
    fn handles_unsigned_dbg_and_continuations() {
        let show = "Package: linux-image-cloud-amd64\nDepends: linux-image-6.1.0-9-cloud-amd64-dbg (= 6.1.27-1) |\n linux-image-6.1.0-9-cloud-amd64-unsigned (= 6.1.27-1), kmod\nVersion: 1\n";
        let pkg = parse_show_output(show).unwrap();
        assert_eq!(pkg.name, "linux-image-6.1.0-9-cloud-amd64-unsigned");
        assert_eq!(pkg.version.as_deref(), Some("6.1.27-1"));
        assert_eq!(pkg.release, "6.1.0-9-cloud-amd64");
    }

    #[test]
    fn parses_the_candidate_version() {
        let show = "Package: busybox-static\nSource: busybox (1:1.35.0-4+deb12u1)\nVersion: 1:1.35.0-4+deb12u1+b1\n\nPackage: busybox-static\nVersion: 1:1.35.0-4\n";
        assert_eq!(
            parse_version(show).as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert_eq!(parse_version("Package: x\n\nVersion: 2\n"), None);
        assert_eq!(parse_version("Version: a b\n"), None);
    }

    #[test]
    fn rejects_outputs_without_image() {
        assert_eq!(parse_show_output(""), None);
        assert_eq!(
            parse_show_output("Package: x\nDepends: kmod, linux-base\n"),
            None
        );
        assert_eq!(parse_depends_field("linux-image-amd64"), None);
        assert_eq!(parse_depends_output("E: No packages found\n"), None);
    }
}
