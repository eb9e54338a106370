//! The Debian mirrors named in this machine's apt configuration, if any:
//! `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*.list` (one-line
//! style) and `*.sources` (deb822 style).
//!
//! An entry counts as a Debian mirror when one of its suites is a Debian
//! codename or suite name (`bookworm`, `trixie-updates`, `stable`, ...),
//! so an Ubuntu machine's entries (`noble`, ...) never do; the security
//! archive is the one whose suite ends in `-security`. Only `http` and
//! `https` URIs are used.

use std::fs;
use std::path::Path;

/// One `deb` line or stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Base URI, without a trailing `/`.
    pub uri: String,
    /// Suites (distributions).
    pub suites: Vec<String>,
    /// Components.
    pub components: Vec<String>,
}

/// Debian's codenames and suite names (a suite may carry a suffix such
/// as `-updates` or `-security`).
const DEBIAN_NAMES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "oldoldstable",
    "testing",
    "unstable",
];

fn is_debian_suite(suite: &str) -> bool {
    let base = suite.split(['-', '/']).next().unwrap_or(suite);
    DEBIAN_NAMES.contains(&base)
}

fn usable_uri(uri: &str) -> Option<String> {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        .then(|| uri.trim_end_matches('/').to_owned())
}

/// Parses one-line style (`deb [options] uri suite component...`).
pub fn parse_list(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if let Some(uri) = usable_uri(uri) {
            out.push(Entry {
                uri,
                suites: vec![suite.to_owned()],
                components: words.map(str::to_owned).collect(),
            });
        }
    }
    out
}

/// Parses deb822 style (`Types:`, `URIs:`, `Suites:`, `Components:`,
/// `Enabled:`).
pub fn parse_sources(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let stanzas = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for stanza in super::packages::parse(&stanzas) {
        let words = |k: &str| -> Vec<String> {
            stanza
                .get(k)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        if !words("Types").iter().any(|t| t == "deb")
            || stanza
                .get("Enabled")
                .is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        for uri in words("URIs") {
            if let Some(uri) = usable_uri(&uri) {
                out.push(Entry {
                    uri,
                    suites: words("Suites"),
                    components: words("Components"),
                });
            }
        }
    }
    out
}

/// Every entry of the apt configuration under `etc_apt` (normally
/// `/etc/apt`); unreadable files are skipped.
pub fn read_entries(etc_apt: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string(etc_apt.join("sources.list")) {
        out.extend(parse_list(&text));
    }
    let mut files: Vec<_> = fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_list(&text)),
            Some("sources") => out.extend(parse_sources(&text)),
            _ => {}
        }
    }
    out
}

/// The Debian archive mirror and the security mirror among `entries`.
pub fn debian_mirrors(entries: &[Entry]) -> (Option<String>, Option<String>) {
    let has_main = |e: &&Entry| e.components.iter().any(|c| c == "main");
    let debian = |e: &&Entry| e.suites.iter().any(|s| is_debian_suite(s));
    let security = |e: &&Entry| {
        e.suites
            .iter()
            .any(|s| is_debian_suite(s) && (s.ends_with("-security") || s.ends_with("/updates")))
    };
    let archive = entries
        .iter()
        .filter(has_main)
        .filter(debian)
        .find(|e| !security(e))
        .map(|e| e.uri.clone());
    let sec = entries
        .iter()
        .filter(has_main)
        .filter(debian)
        .find(security)
        .map(|e| e.uri.clone());
    (archive, sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_SOURCES: &str = "\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security/
Suites: bookworm-security
Components: main
";

    const UBUNTU_LIST: &str = "\
# comment
deb http://archive.example/ubuntu noble main restricted universe
deb [arch=amd64 signed-by=/x.gpg] https://archive.example/ubuntu noble-security main
deb-src http://archive.example/ubuntu noble main
deb cdrom:[Ubuntu]/ noble main
";

    #[test]
    fn deb822_debian() {
        let entries = parse_sources(DEBIAN_SOURCES);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            debian_mirrors(&entries),
            (
                Some("http://mirror.example/debian".into()),
                Some("http://mirror.example/debian-security".into())
            )
        );
        let disabled = DEBIAN_SOURCES.replace("Signed-By:", "Enabled: no\nSigned-By:");
        assert_eq!(debian_mirrors(&parse_sources(&disabled)).0, None);
    }

    #[test]
    fn one_line_ubuntu_is_not_debian() {
        let entries = parse_list(UBUNTU_LIST);
        assert_eq!(entries.len(), 2, "deb-src and cdrom skipped: {entries:?}");
        assert_eq!(entries[1].uri, "https://archive.example/ubuntu");
        assert_eq!(entries[1].components, ["main"]);
        assert_eq!(debian_mirrors(&entries), (None, None));
    }

    #[test]
    fn one_line_debian_and_other_releases() {
        let text = "deb http://m.example/debian trixie main\n\
                    deb http://s.example/debian-security trixie-security main contrib\n\
                    deb http://m.example/debian bullseye contrib\n";
        let (archive, security) = debian_mirrors(&parse_list(text));
        assert_eq!(archive.as_deref(), Some("http://m.example/debian"));
        assert_eq!(
            security.as_deref(),
            Some("http://s.example/debian-security")
        );
    }

    #[test]
    fn reads_a_configuration_directory() {
        let dir = crate::cache::tests::test_dir("aptetc");
        fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
        fs::write(dir.path().join("sources.list"), UBUNTU_LIST).unwrap();
        fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            DEBIAN_SOURCES,
        )
        .unwrap();
        fs::write(
            dir.path().join("sources.list.d/x.list.disabled"),
            "deb http://x/ sid main",
        )
        .unwrap();
        let entries = read_entries(dir.path());
        assert_eq!(entries.len(), 4);
        assert_eq!(
            debian_mirrors(&entries).0.as_deref(),
            Some("http://mirror.example/debian")
        );
        assert!(read_entries(&dir.path().join("none")).is_empty());
    }
}
