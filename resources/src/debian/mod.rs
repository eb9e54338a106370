//! Debian's archive fetched directly over HTTP(S), for machines whose apt
//! does not know it (Ubuntu CI runners, other distributions).
//!
//! What is checked against what, as apt does it:
//!
//! 1. Each suite's `InRelease` (`bookworm`, `bookworm-updates`,
//!    `bookworm-security`) is verified with `gpgv` against the Debian
//!    archive keyring; only the text `gpgv` verified is read, and its
//!    `Codename` must be the suite asked for and its `Valid-Until` (if
//!    any) in the future ([`release`]).
//! 2. `main/binary-amd64/Packages.xz` (or `.gz`) must have exactly the
//!    size and SHA-256 that the signed `Release` lists for it before it
//!    is decompressed ([`packages`]); it is fetched by hash where the
//!    archive offers that, so an update of the mirror between the two
//!    downloads cannot mix versions.
//! 3. The meta package is resolved through its `Depends` to the versioned
//!    image package of the same suite, and the `.deb` must have exactly
//!    the `Size` and `SHA256` of that `Packages` stanza ([`http`]).
//!
//! Across suites the highest version of the meta package wins, as with
//! apt at equal priorities, so both paths pick the same kernel. The
//! mirrors come from the machine's apt configuration where it names a
//! Debian mirror ([`sources`]), else Debian's standard mirror; the
//! `HOTPLUG_DEBIAN_MIRROR`, `HOTPLUG_DEBIAN_SECURITY_MIRROR` and
//! `HOTPLUG_DEBIAN_KEYRING` variables override them.

pub mod http;
pub mod packages;
pub mod release;
pub mod sources;

use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::apt::{parse_depends_field, KernelPackage};
use crate::cache;
use packages::Stanza;
use release::Release;

/// The Debian release the kernels come from (its modules are
/// uncompressed, which the emulated host's module loading needs).
pub const CODENAME: &str = "bookworm";
/// Debian's standard mirror, used when apt names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian's standard security mirror.
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// Overrides the archive mirror (base URL, e.g. `http://host/debian`).
pub const MIRROR_ENV: &str = "HOTPLUG_DEBIAN_MIRROR";
/// Overrides the security mirror.
pub const SECURITY_MIRROR_ENV: &str = "HOTPLUG_DEBIAN_SECURITY_MIRROR";
/// Overrides the keyring the indices are verified with.
pub const KEYRING_ENV: &str = "HOTPLUG_DEBIAN_KEYRING";
/// Where the `debian-archive-keyring` package puts the keyring (Debian,
/// Ubuntu); newer releases also ship it as `.pgp`.
pub const KEYRINGS: [&str; 2] = [
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "/usr/share/keyrings/debian-archive-keyring.pgp",
];
/// The package indices, in order of preference, with their compression.
const PACKAGES_INDICES: [(&str, IndexCompression); 2] = [
    ("main/binary-amd64/Packages.xz", IndexCompression::Xz),
    ("main/binary-amd64/Packages.gz", IndexCompression::Gzip),
];
/// Bound on an `InRelease` download (bookworm's is 150 KB).
const INRELEASE_LIMIT: u64 = 4 << 20;

#[derive(Debug, Clone, Copy)]
enum IndexCompression {
    Xz,
    Gzip,
}

/// Why the direct fetch failed.
#[derive(Debug, Error)]
pub enum FetchError {
    /// The mirror could not be reached or the transfer broke off.
    #[error("cannot fetch {url}")]
    Network {
        /// What was being fetched.
        url: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP status {status}")]
    Status {
        /// What was being fetched.
        url: String,
        /// The status code.
        status: u16,
    },
    /// `gpgv` is not installed.
    #[error("cannot run gpgv to verify Debian's index (install the gpgv package)")]
    GpgvMissing {
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// The keyring is not installed.
    #[error("no Debian archive keyring at {0} (install the debian-archive-keyring package)")]
    NoKeyring(PathBuf),
    /// The signature did not verify.
    #[error("{what}: signature not accepted: {why}")]
    BadSignature {
        /// The file.
        what: String,
        /// gpgv's verdict.
        why: String,
    },
    /// The signed Release is another suite's.
    #[error("the signed Release for {suite} is for {found}")]
    WrongSuite {
        /// The suite asked for.
        suite: String,
        /// The Codename found.
        found: String,
    },
    /// The signed Release is past its `Valid-Until`.
    #[error("the signed Release for {suite} expired at {until} (is the clock right?)")]
    Expired {
        /// The suite.
        suite: String,
        /// Its Valid-Until.
        until: String,
    },
    /// A download did not match what the signed index says.
    #[error("{what}: expected {expected}, got {actual}")]
    Mismatch {
        /// The file.
        what: String,
        /// Size and hash the index lists.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// An index lacks something it should have, or cannot be read.
    #[error("{0}")]
    Index(String),
    /// No suite has the meta package.
    #[error("no suite of {suites} has package {meta}")]
    UnknownPackage {
        /// The meta package.
        meta: String,
        /// The suites searched.
        suites: String,
    },
    /// The meta package depends on no kernel image.
    #[error("{0} depends on no linux-image package")]
    NoImageDependency(String),
    /// The image package the meta package names is not in the index.
    #[error("{package} is not in {suite}'s index")]
    MissingDependency {
        /// `name=version`.
        package: String,
        /// The suite.
        suite: String,
    },
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

impl FetchError {
    /// True if the failure is this machine's situation (no network to the
    /// mirror, no gpgv, no keyring) rather than a wrong or tampered
    /// download: tests report it as a loud skip.
    pub fn is_environmental(&self) -> bool {
        match self {
            FetchError::Network { .. } | FetchError::GpgvMissing { .. } => true,
            FetchError::NoKeyring(_) => true,
            FetchError::Status { status, .. } => {
                matches!(status, 403 | 407 | 429) || *status >= 500
            }
            _ => false,
        }
    }
}

/// One suite and the mirror it is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    /// e.g. `bookworm-security`.
    pub name: String,
    /// Base URL, e.g. `http://deb.debian.org/debian-security`.
    pub mirror: String,
}

/// Where and how the direct fetch looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Suites searched; the highest version of a package among them wins.
    pub suites: Vec<Suite>,
    /// The keyring the `InRelease` files must be signed with.
    pub keyring: PathBuf,
}

impl Config {
    /// The suites of [`CODENAME`] on the given mirrors.
    pub fn new(mirror: &str, security_mirror: &str, keyring: PathBuf) -> Self {
        let mirror = mirror.trim_end_matches('/');
        let security_mirror = security_mirror.trim_end_matches('/');
        let suite = |name: String, mirror: &str| Suite {
            name,
            mirror: mirror.to_owned(),
        };
        Config {
            suites: vec![
                suite(CODENAME.to_owned(), mirror),
                suite(format!("{CODENAME}-updates"), mirror),
                suite(format!("{CODENAME}-security"), security_mirror),
            ],
            keyring,
        }
    }

    /// The mirrors of this machine's apt configuration (or the variables,
    /// or Debian's standard ones) and the installed keyring.
    pub fn from_system() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (apt_archive, apt_security) =
            sources::debian_mirrors(&sources::read_entries(Path::new("/etc/apt")));
        let mirror = env(MIRROR_ENV)
            .or(apt_archive)
            .unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
        let security = env(SECURITY_MIRROR_ENV)
            .or(apt_security)
            .unwrap_or_else(|| DEFAULT_SECURITY_MIRROR.to_owned());
        let keyring = env(KEYRING_ENV).map(PathBuf::from).unwrap_or_else(|| {
            let found = KEYRINGS.iter().map(PathBuf::from).find(|p| p.is_file());
            found.unwrap_or_else(|| PathBuf::from(KEYRINGS[0]))
        });
        Config::new(&mirror, &security, keyring)
    }
}

/// A versioned kernel package found in a verified index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The image package (name, version, kernel release).
    pub package: KernelPackage,
    /// Where its `.deb` is.
    pub url: String,
    /// Its size, from the signed index.
    pub size: u64,
    /// Its SHA-256, from the signed index.
    pub sha256: String,
    /// The suite it came from.
    pub suite: String,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Resolves meta package `meta` (e.g. `linux-image-cloud-amd64`) to its
/// image package through the signed indices of `config`'s suites.
/// `state` keeps the kernel stanzas of each verified index, keyed by the
/// index's hash, so an unchanged index is not downloaded again.
pub fn resolve(meta: &str, config: &Config, state: &Path) -> Result<Resolved, FetchError> {
    let mut found: Vec<(&Suite, Vec<Stanza>)> = Vec::new();
    for (i, suite) in config.suites.iter().enumerate() {
        match suite_stanzas(suite, config, state, &|p| p.starts_with("linux-image-")) {
            Ok(stanzas) => found.push((suite, stanzas)),
            // A mirror may lack the -updates or -security suite: the base
            // suite still names a kernel (an older one).
            Err(FetchError::Status { status: 404, url }) if i > 0 => {
                log::warn!(
                    "{url}: not on this mirror (404); suite {} skipped",
                    suite.name
                );
            }
            Err(e) => return Err(e),
        }
    }
    pick(meta, &found)
}

/// The highest version of `meta` among the suites, and its image package.
fn pick(meta: &str, found: &[(&Suite, Vec<Stanza>)]) -> Result<Resolved, FetchError> {
    let (suite, stanzas, meta_stanza) = found
        .iter()
        .flat_map(|(suite, stanzas)| {
            stanzas
                .iter()
                .filter(|s| s.package() == meta)
                .map(move |s| (*suite, stanzas, s))
        })
        .max_by(|a, b| packages::compare_versions(a.2.version(), b.2.version()))
        .ok_or_else(|| FetchError::UnknownPackage {
            meta: meta.to_owned(),
            suites: found
                .iter()
                .map(|(s, _)| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let depends = meta_stanza.get("Depends").unwrap_or("");
    let package = parse_depends_field(&depends.replace('\n', " "))
        .ok_or_else(|| FetchError::NoImageDependency(meta.to_owned()))?;
    let image = stanzas
        .iter()
        .filter(|s| s.package() == package.name)
        .filter(|s| package.version.as_deref().is_none_or(|v| s.version() == v))
        .max_by(|a, b| packages::compare_versions(a.version(), b.version()))
        .ok_or_else(|| FetchError::MissingDependency {
            package: package.apt_spec(),
            suite: suite.name.clone(),
        })?;
    let field = |k: &str| {
        image.get(k).ok_or_else(|| {
            FetchError::Index(format!(
                "{}: stanza of {} lacks {k}",
                suite.name, package.name
            ))
        })
    };
    let filename = field("Filename")?;
    let size = field("Size")?
        .parse()
        .map_err(|_| FetchError::Index(format!("{}: bad Size of {}", suite.name, package.name)))?;
    let sha256 = field("SHA256")?.to_ascii_lowercase();
    if filename.contains("..") || filename.starts_with('/') {
        return Err(FetchError::Index(format!("odd Filename {filename:?}")));
    }
    let package = KernelPackage {
        version: Some(image.version().to_owned()),
        ..package
    };
    Ok(Resolved {
        url: format!("{}/{filename}", suite.mirror),
        size,
        sha256,
        suite: suite.name.clone(),
        package,
    })
}

/// Resolves package `name` (not a meta package: e.g. `busybox-static`) to
/// its highest version among `config`'s suites, like [`resolve`] does a
/// kernel. The result's `package.release` is empty. `state` keeps the
/// stanzas of `name` per verified index (a directory of its own: one
/// per package looked up).
pub fn resolve_package(name: &str, config: &Config, state: &Path) -> Result<Resolved, FetchError> {
    let mut best: Option<(&Suite, Stanza)> = None;
    for (i, suite) in config.suites.iter().enumerate() {
        let stanzas = match suite_stanzas(suite, config, state, &|p| p == name) {
            Ok(stanzas) => stanzas,
            Err(FetchError::Status { status: 404, url }) if i > 0 => {
                log::warn!(
                    "{url}: not on this mirror (404); suite {} skipped",
                    suite.name
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        for stanza in stanzas.into_iter().filter(|s| s.package() == name) {
            let better = best.as_ref().is_none_or(|(_, b)| {
                packages::compare_versions(stanza.version(), b.version()).is_gt()
            });
            if better {
                best = Some((suite, stanza));
            }
        }
    }
    let (suite, stanza) = best.ok_or_else(|| FetchError::UnknownPackage {
        meta: name.to_owned(),
        suites: config
            .suites
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let field = |k: &str| {
        stanza
            .get(k)
            .ok_or_else(|| FetchError::Index(format!("{}: stanza of {name} lacks {k}", suite.name)))
    };
    let filename = field("Filename")?;
    let size = field("Size")?
        .parse()
        .map_err(|_| FetchError::Index(format!("{}: bad Size of {name}", suite.name)))?;
    let sha256 = field("SHA256")?.to_ascii_lowercase();
    if filename.contains("..") || filename.starts_with('/') {
        return Err(FetchError::Index(format!("odd Filename {filename:?}")));
    }
    Ok(Resolved {
        package: KernelPackage {
            name: name.to_owned(),
            version: Some(stanza.version().to_owned()),
            release: String::new(),
        },
        url: format!("{}/{filename}", suite.mirror),
        size,
        sha256,
        suite: suite.name.clone(),
    })
}

/// The stanzas of a suite's verified `Packages` index whose package name
/// `keep` accepts (kept in `state`, so one directory per filter).
fn suite_stanzas(
    suite: &Suite,
    config: &Config,
    state: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<Stanza>, FetchError> {
    let io = |context: String| move |source| FetchError::Io { context, source };
    let dists = format!("{}/dists/{}", suite.mirror, suite.name);
    let url = format!("{dists}/InRelease");
    let raw = http::get(&url, INRELEASE_LIMIT)?;
    let (text, keys) = release::verify(&raw, &config.keyring, state, &url)?;
    let release = Release::parse(&text);
    release.check(&suite.name, now())?;
    log::info!("{url}: signed by {}", keys.join(", "));
    let (path, entry, compression) = PACKAGES_INDICES
        .iter()
        .find_map(|(p, c)| release.entry(p).map(|e| (p, e, *c)))
        .ok_or_else(|| {
            FetchError::Index(format!("{url} lists no main/binary-amd64 Packages index"))
        })?;
    let kept = state.join(format!("{}-{}.packages", suite.name, entry.sha256));
    if let Ok(text) = fs::read_to_string(&kept) {
        return Ok(packages::parse(&text));
    }
    let by_hash = format!(
        "{dists}/{}/by-hash/SHA256/{}",
        path.rsplit_once('/').map_or("", |(dir, _)| dir),
        entry.sha256
    );
    let plain = format!("{dists}/{path}");
    let data = match release.acquire_by_hash() {
        true => match http::get(&by_hash, entry.size + 1) {
            Err(FetchError::Status { status: 404, .. }) => http::get(&plain, entry.size + 1),
            other => other,
        },
        false => http::get(&plain, entry.size + 1),
    }?;
    let actual = http::sha256_hex(&data);
    if data.len() as u64 != entry.size || actual != entry.sha256 {
        return Err(FetchError::Mismatch {
            what: plain,
            expected: format!("{} bytes, SHA-256 {}", entry.size, entry.sha256),
            actual: format!("{} bytes, SHA-256 {actual}", data.len()),
        });
    }
    let reader: Box<dyn Read> = match compression {
        IndexCompression::Xz => Box::new(lzma_rust2::XzReader::new(&data[..], true)),
        IndexCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&data[..])),
    };
    let mut stanzas = Vec::new();
    packages::filter(BufReader::with_capacity(1 << 16, reader), keep, &mut |s| {
        stanzas.push(s)
    })
    .map_err(|e| FetchError::Index(format!("{plain}: cannot decompress: {e}")))?;
    // Forget this suite's older indices, then keep this one's stanzas.
    for old in fs::read_dir(state).into_iter().flatten().flatten() {
        let name = old.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{}-", suite.name))
            && name.ends_with(".packages")
            && name[suite.name.len() + 1..].len() == 64 + ".packages".len()
        {
            let _ = fs::remove_file(old.path());
        }
    }
    cache::atomic_write_bytes(&kept, packages::render(&stanzas).as_bytes(), 0o644)
        .map_err(io(format!("writing {}", kept.display())))?;
    Ok(stanzas)
}

/// Downloads the `.deb` of `resolved` to `dest`, checked against the size
/// and SHA-256 of its signed index entry.
pub fn download(resolved: &Resolved, dest: &Path) -> Result<(), FetchError> {
    http::download_verified(&resolved.url, dest, resolved.size, &resolved.sha256)
}

/// True if `path` holds exactly the `.deb` of `resolved`.
pub fn is_downloaded(resolved: &Resolved, path: &Path) -> bool {
    http::file_matches(path, resolved.size, &resolved.sha256).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanzas(text: &str) -> Vec<Stanza> {
        packages::parse(text)
    }

    const MAIN: &str = "\
Package: linux-image-cloud-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-40-cloud-amd64 (= 6.1.176-1)

Package: linux-image-6.1.0-40-cloud-amd64
Version: 6.1.176-1
Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-40-cloud-amd64_6.1.176-1_amd64.deb
Size: 100
SHA256: AA
";

    const SECURITY: &str = "\
Package: linux-image-cloud-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)

Package: linux-image-6.1.0-57-cloud-amd64
Version: 6.1.192-3
Filename: pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb
Size: 200
SHA256: bb
";

    #[test]
    fn the_highest_version_across_suites_wins() {
        let config = Config::new("http://m/debian/", "http://s/debian-security", "k".into());
        assert_eq!(config.suites[0].mirror, "http://m/debian");
        assert_eq!(config.suites[2].name, "bookworm-security");
        let found = vec![
            (&config.suites[0], stanzas(MAIN)),
            (&config.suites[1], Vec::new()),
            (&config.suites[2], stanzas(SECURITY)),
        ];
        let r = pick("linux-image-cloud-amd64", &found).unwrap();
        assert_eq!(
            r.package.apt_spec(),
            "linux-image-6.1.0-57-cloud-amd64=6.1.192-3"
        );
        assert_eq!(r.package.release, "6.1.0-57-cloud-amd64");
        assert_eq!(r.suite, "bookworm-security");
        assert_eq!(r.size, 200);
        assert!(r
            .url
            .starts_with("http://s/debian-security/pool/updates/main/l/"));
        let only_main = pick("linux-image-cloud-amd64", &found[..1]).unwrap();
        assert_eq!(only_main.sha256, "aa", "lower-cased");
        let err = pick("linux-image-amd64", &found).unwrap_err();
        assert!(matches!(err, FetchError::UnknownPackage { .. }), "{err}");
        assert!(!err.is_environmental());
    }

    #[test]
    fn a_missing_image_stanza_is_an_error() {
        let config = Config::new("http://m/debian", "http://s/x", "k".into());
        let meta_only = MAIN.split("\n\n").next().unwrap();
        let found = vec![(&config.suites[0], stanzas(meta_only))];
        let err = pick("linux-image-cloud-amd64", &found).unwrap_err();
        assert!(matches!(err, FetchError::MissingDependency { .. }), "{err}");
        let odd = MAIN.replace("Filename: pool", "Filename: ../pool");
        let found = vec![(&config.suites[0], stanzas(&odd))];
        assert!(pick("linux-image-cloud-amd64", &found).is_err());
    }

    #[test]
    fn classification() {
        let status = |status| FetchError::Status {
            url: "u".into(),
            status,
        };
        assert!(status(503).is_environmental());
        assert!(status(407).is_environmental());
        assert!(!status(404).is_environmental());
        assert!(FetchError::NoKeyring("k".into()).is_environmental());
        assert!(!FetchError::Index("x".into()).is_environmental());
    }

    #[test]
    fn unreachable_mirror_fails_as_environmental() {
        let dir = cache::tests::test_dir("unreach");
        let config = Config::new(
            "http://127.0.0.1:9/debian",
            "http://127.0.0.1:9/s",
            "k".into(),
        );
        let err = resolve("linux-image-cloud-amd64", &config, dir.path()).unwrap_err();
        assert!(err.is_environmental(), "{err}");
    }
}
