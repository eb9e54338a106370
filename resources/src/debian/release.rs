//! A suite's signed `InRelease` file: its OpenPGP signature checked with
//! `gpgv` against the Debian archive keyring, and the `Release` fields
//! (codename, validity, SHA-256 of every index) read from the text that
//! `gpgv` verified, never from the raw download.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use super::FetchError;
use crate::cache::ScratchDir;

/// One file listed in the `SHA256` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Path relative to `dists/<suite>/`, e.g. `main/binary-amd64/Packages.xz`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// The fields of a `Release` file that the fetch uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    fields: BTreeMap<String, String>,
    sha256: Vec<IndexEntry>,
}

impl Release {
    /// Parses `Release` text (RFC 822 style; multi-line fields are only
    /// read for `SHA256`).
    pub fn parse(text: &str) -> Self {
        let mut release = Release::default();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix([' ', '\t']) {
                if current == "SHA256" {
                    let parts: Vec<&str> = rest.split_whitespace().collect();
                    if let [sha, size, path] = parts[..] {
                        if let Ok(size) = size.parse() {
                            release.sha256.push(IndexEntry {
                                path: path.to_owned(),
                                size,
                                sha256: sha.to_ascii_lowercase(),
                            });
                        }
                    }
                }
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                current = key.trim().to_owned();
                release
                    .fields
                    .insert(current.clone(), value.trim().to_owned());
            }
        }
        release
    }

    /// A single-line field.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The `SHA256` entry of `path`.
    pub fn entry(&self, path: &str) -> Option<&IndexEntry> {
        self.sha256.iter().find(|e| e.path == path)
    }

    /// True if the archive serves indices under `by-hash/SHA256/<hash>`,
    /// which stay valid while the suite is updated (no race between the
    /// `InRelease` and the index it names).
    pub fn acquire_by_hash(&self) -> bool {
        self.get("Acquire-By-Hash") == Some("yes")
    }

    /// Checks that this is the suite asked for and still valid at `now`
    /// (seconds since the epoch), as apt does: a signed `Release` of
    /// another suite, or a stale one replayed by a mirror, is refused.
    pub fn check(&self, suite: &str, now: i64) -> Result<(), FetchError> {
        let codename = self.get("Codename");
        if codename != Some(suite) && self.get("Suite") != Some(suite) {
            return Err(FetchError::WrongSuite {
                suite: suite.to_owned(),
                found: codename.unwrap_or("none").to_owned(),
            });
        }
        if let Some(until) = self.get("Valid-Until") {
            match parse_date(until) {
                Some(t) if t >= now => {}
                Some(_) => {
                    return Err(FetchError::Expired {
                        suite: suite.to_owned(),
                        until: until.to_owned(),
                    })
                }
                None => {
                    return Err(FetchError::Index(format!(
                        "{suite}: unreadable Valid-Until {until:?}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Parses a `Release` date, `Sat, 11 Jul 2026 10:16:37 UTC` (RFC 2822
/// with `UTC`, `GMT`, `Z` or `+0000`), into seconds since the epoch.
pub fn parse_date(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    // The weekday is optional.
    let parts = match parts.first() {
        Some(first) if first.ends_with(',') => &parts[1..],
        _ => &parts[..],
    };
    let [day, month, year, time, zone] = parts else {
        return None;
    };
    if !matches!(*zone, "UTC" | "GMT" | "Z" | "+0000") {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let day: i64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else {
        return None;
    };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What `gpgv`'s status lines say about the signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// At least one good signature by a key of the keyring, made with a
    /// strong digest, and no bad one (signatures by keys the keyring
    /// lacks are ignored, as apt does). Holds the signing fingerprints.
    Good(Vec<String>),
    /// Why not.
    Bad(String),
}

/// OpenPGP hash algorithm ids too weak to trust (MD5, SHA-1, RIPEMD-160).
const WEAK_DIGESTS: [&str; 3] = ["1", "2", "3"];

/// Reads `gpgv --status-fd` output.
pub fn verdict(status: &str) -> Verdict {
    let mut good = Vec::new();
    let mut problems = Vec::new();
    for line in status.lines() {
        let Some(rest) = line.strip_prefix("[GNUPG:] ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words.as_slice() {
            ["VALIDSIG", fpr, _date, _ts, _exp, _ver, _res, _pk, hash, ..] => {
                if WEAK_DIGESTS.contains(hash) {
                    problems.push(format!("signature by {fpr} uses weak digest {hash}"));
                } else {
                    good.push((*fpr).to_owned());
                }
            }
            [kind @ ("BADSIG" | "EXPSIG" | "EXPKEYSIG" | "REVKEYSIG"), id, ..] => {
                problems.push(format!("{kind} {id}"))
            }
            _ => {}
        }
    }
    if !problems.is_empty() {
        Verdict::Bad(problems.join(", "))
    } else if good.is_empty() {
        Verdict::Bad("no good signature by a key of the keyring".into())
    } else {
        Verdict::Good(good)
    }
}

/// Verifies a downloaded `InRelease` with `gpgv` against `keyring` and
/// returns the signed text and the signing keys' fingerprints.
pub fn verify(
    inrelease: &[u8],
    keyring: &Path,
    scratch_parent: &Path,
    what: &str,
) -> Result<(String, Vec<String>), FetchError> {
    if !keyring.is_file() {
        return Err(FetchError::NoKeyring(keyring.to_owned()));
    }
    let io = |context: &str| {
        let context = format!("{context} for gpgv");
        move |source| FetchError::Io { context, source }
    };
    fs::create_dir_all(scratch_parent).map_err(io("creating a directory"))?;
    let scratch = ScratchDir::new(scratch_parent, "gpgv").map_err(io("creating a scratch dir"))?;
    let input = scratch.path().join("InRelease");
    let output = scratch.path().join("Release");
    fs::write(&input, inrelease).map_err(io("writing the InRelease"))?;
    let out = Command::new("gpgv")
        .env("LC_ALL", "C")
        .arg("--homedir")
        .arg(scratch.path())
        .args(["--status-fd", "1", "--keyring"])
        .arg(keyring)
        .arg("--output")
        .arg(&output)
        .arg(&input)
        .output()
        .map_err(|source| FetchError::GpgvMissing { source })?;
    let status = String::from_utf8_lossy(&out.stdout);
    match verdict(&status) {
        Verdict::Good(keys) => {
            let text = fs::read(&output).map_err(io("reading the verified text"))?;
            let text = String::from_utf8(text)
                .map_err(|_| FetchError::Index(format!("{what}: Release is not UTF-8")))?;
            Ok((text, keys))
        }
        Verdict::Bad(why) => Err(FetchError::BadSignature {
            what: what.to_owned(),
            why: format!(
                "{why} (gpgv {}: {})",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rfind(|l| !l.is_empty())
                    .unwrap_or("")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASE: &str = "\
Origin: Debian
Suite: oldstable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
Acquire-By-Hash: yes
MD5Sum:
 0ed6d4c8891eb86358b94bb35d9e4da4  1484322 contrib/Contents-all
SHA256:
 515E692F2C4121C6FCEC444EF100CC18F79A991910615F3A88C8B7BECFC94D2F 50060337 main/binary-amd64/Packages
 9e0b5aabb2465b3d2e7a7fe27f9913846277833f7a2826e7767acccff5b588c5  8790396 main/binary-amd64/Packages.xz
";

    #[test]
    fn parses_fields_and_sha256_entries() {
        let r = Release::parse(RELEASE);
        assert_eq!(r.get("Codename"), Some("bookworm"));
        assert!(r.acquire_by_hash());
        let xz = r.entry("main/binary-amd64/Packages.xz").unwrap();
        assert_eq!(xz.size, 8_790_396);
        let plain = r.entry("main/binary-amd64/Packages").unwrap();
        assert!(plain.sha256.starts_with("515e692f"), "lower-cased");
        assert_eq!(r.entry("contrib/Contents-all"), None, "MD5 entries ignored");
    }

    #[test]
    fn suite_and_validity_are_checked() {
        let now = parse_date("Tue, 01 Dec 2026 00:00:00 UTC").unwrap();
        let r = Release::parse(RELEASE);
        r.check("bookworm", now).unwrap();
        r.check("oldstable", now).unwrap();
        let err = r.check("bookworm-security", now).unwrap_err();
        assert!(matches!(err, FetchError::WrongSuite { .. }), "{err}");
        let valid = Release::parse(&format!(
            "{RELEASE}Valid-Until: Tue, 08 Dec 2026 01:33:13 UTC\n"
        ));
        valid.check("bookworm", now).unwrap();
        let later = parse_date("Wed, 09 Dec 2026 00:00:00 UTC").unwrap();
        let err = valid.check("bookworm", later).unwrap_err();
        assert!(matches!(err, FetchError::Expired { .. }), "{err}");
        let garbled = Release::parse(&format!("{RELEASE}Valid-Until: soon\n"));
        assert!(garbled.check("bookworm", now).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            parse_date("Sat, 11 Jul 2026 10:16:37 UTC"),
            Some(1_783_764_997)
        );
        assert_eq!(parse_date("29 Feb 2000 23:59:59 GMT"), Some(951_868_799));
        assert_eq!(parse_date("Sat, 11 Jul 2026 10:16:37 CEST"), None);
        assert_eq!(parse_date("Sat, 11 Foo 2026 10:16:37 UTC"), None);
        assert_eq!(parse_date(""), None);
    }

    const GOOD: &str = "\
[GNUPG:] NEWSIG
[GNUPG:] GOODSIG 6ED0E7B82643E131 Debian Archive Automatic Signing Key (12/bookworm)
[GNUPG:] VALIDSIG 4CB50190207B4758A3F73A796ED0E7B82643E131 2026-07-11 1783765031 0 4 0 1 8 01 B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8
[GNUPG:] NEWSIG
[GNUPG:] ERRSIG 78DBA3BC47EF2265 1 8 01 1783765032 9 B8E5F13176D2A7A75220028078DBA3BC47EF2265
[GNUPG:] NO_PUBKEY 78DBA3BC47EF2265
";

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(GOOD),
            Verdict::Good(vec!["4CB50190207B4758A3F73A796ED0E7B82643E131".into()])
        );
        let bad = format!("{GOOD}[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 6ED0E7B82643E131 Debian\n");
        assert!(matches!(verdict(&bad), Verdict::Bad(w) if w.contains("BADSIG")));
        let none =
            "[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG 78DB 1 8 01 1 9 B8E5\n[GNUPG:] NO_PUBKEY 78DB\n";
        assert!(matches!(verdict(none), Verdict::Bad(w) if w.contains("no good signature")));
        let sha1 = GOOD.replace(" 1 8 01 B8B8", " 1 2 01 B8B8");
        assert!(matches!(verdict(&sha1), Verdict::Bad(w) if w.contains("weak digest")));
        assert!(matches!(verdict(""), Verdict::Bad(_)));
    }

    #[test]
    fn missing_keyring_is_reported_before_gpgv_runs() {
        let dir = crate::cache::tests::test_dir("nokeyring");
        let err = verify(b"x", &dir.path().join("none.gpg"), dir.path(), "t").unwrap_err();
        assert!(matches!(err, FetchError::NoKeyring(_)), "{err}");
        assert!(err.is_environmental());
    }

    /// An unsigned or garbled InRelease is refused (needs gpgv and the
    /// Debian keyring; skipped without them).
    #[test]
    fn garbage_is_not_verified() {
        let keyring = Path::new(super::super::KEYRINGS[0]);
        if !keyring.is_file() || Command::new("gpgv").arg("--version").output().is_err() {
            println!("gpgv or {} missing: not checked", keyring.display());
            return;
        }
        let dir = crate::cache::tests::test_dir("gpgvbad");
        let text = format!("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{RELEASE}");
        let err = verify(text.as_bytes(), keyring, dir.path(), "t").unwrap_err();
        assert!(matches!(err, FetchError::BadSignature { .. }), "{err}");
        assert!(!err.is_environmental());
    }
}
