//! A `Packages` index: its stanzas (one per package version), kept only
//! for the packages the fetch cares about, and Debian's version order.

use std::cmp::Ordering;
use std::io::BufRead;

/// One stanza of a `Packages` file. Continuation lines are joined to
/// their field with a newline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    fields: Vec<(String, String)>,
}

impl Stanza {
    /// The value of field `key` (field names are case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// `Package`.
    pub fn package(&self) -> &str {
        self.get("Package").unwrap_or("")
    }

    /// `Version`.
    pub fn version(&self) -> &str {
        self.get("Version").unwrap_or("")
    }

    fn push_line(&mut self, line: &str) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = self.fields.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            self.fields
                .push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Parses stanzas separated by blank lines.
pub fn parse(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    // Reading from a byte slice cannot fail.
    let _ = filter(text.as_bytes(), |_| true, &mut |s| out.push(s));
    out
}

/// Streams the stanzas of `reader`, handing those whose `Package`
/// satisfies `keep` to `sink` (a `Packages` file of the main archive is
/// some 50 MB; the fetch keeps a few hundred stanzas of it).
pub fn filter(
    mut reader: impl BufRead,
    keep: impl Fn(&str) -> bool,
    sink: &mut dyn FnMut(Stanza),
) -> std::io::Result<()> {
    let mut line = String::new();
    let mut stanza = Stanza::default();
    let mut wanted = None::<bool>;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        let text = line.trim_end_matches(['\n', '\r']);
        if n == 0 || text.trim().is_empty() {
            if !stanza.is_empty() && wanted.unwrap_or_else(|| keep(stanza.package())) {
                sink(std::mem::take(&mut stanza));
            }
            stanza = Stanza::default();
            wanted = None;
            if n == 0 {
                return Ok(());
            }
            continue;
        }
        if wanted == Some(false) {
            continue;
        }
        stanza.push_line(text);
        if wanted.is_none() {
            if let Some(name) = text.strip_prefix("Package:") {
                wanted = Some(keep(name.trim()));
            }
        }
    }
}

/// Writes stanzas back as `Packages` text.
pub fn render(stanzas: &[Stanza]) -> String {
    let mut out = String::new();
    for s in stanzas {
        for (k, v) in &s.fields {
            let mut lines = v.split('\n');
            out.push_str(&format!("{k}: {}\n", lines.next().unwrap_or("")));
            for cont in lines {
                out.push_str(&format!(" {cont}\n"));
            }
        }
        out.push('\n');
    }
    out
}

/// Debian's version order (`dpkg --compare-versions`): epoch, then the
/// upstream version, then the revision, each compared with `~` before
/// everything (even the end), letters before other characters, and digit
/// runs numerically.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

fn split_version(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => {
            (e.parse().unwrap_or(u64::MAX), rest)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// The weight of a non-digit character: the end and `~` sort first.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (x, y) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if x != y {
                return x.cmp(&y);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGES: &str = "\
Package: hello
Version: 2.10-3
Filename: pool/main/h/hello/hello_2.10-3_amd64.deb

Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.
SHA256: 00

Package: linux-image-6.1.0-57-cloud-amd64
Version: 6.1.192-3
Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb
Size: 26705532
SHA256: abcd
";

    #[test]
    fn filters_stanzas_by_package() {
        let mut kept = Vec::new();
        filter(
            PACKAGES.as_bytes(),
            |p| p.starts_with("linux-image-"),
            &mut |s| kept.push(s),
        )
        .unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].package(), "linux-image-cloud-amd64");
        assert_eq!(
            kept[0].get("description").unwrap(),
            "Linux for x86-64 cloud (meta-package)\nThis package depends on the latest Linux kernel\nand modules for use on cloud platforms."
        );
        assert_eq!(kept[1].get("Size"), Some("26705532"));
        assert_eq!(parse(&render(&kept)), kept, "render round-trips");
        assert_eq!(parse(PACKAGES).len(), 3);
        assert_eq!(parse("\n\n").len(), 0);
        // CRLF and a missing final newline.
        let crlf = "Package: a\r\nVersion: 1\r\n\r\nPackage: b\r\nVersion: 2";
        let all = parse(crlf);
        assert_eq!((all[0].version(), all[1].package()), ("1", "b"));
    }

    #[test]
    fn version_order_matches_dpkg() {
        use Ordering::*;
        let cases = [
            ("6.1.192-3", "6.1.176-1", Greater),
            ("6.1.192-3", "6.1.192-3", Equal),
            ("6.1.192-3", "6.1.192-10", Less),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0-1", "1.0+deb12u1-1", Less),
            ("1:0.9", "2.0", Greater),
            ("1.0", "1.0-0", Equal),
            ("1.0a", "1.0+", Less),
            ("1.0", "1.0.0", Less),
            ("1.01", "1.1", Equal),
            ("1.0~", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("2.30-1", "2.4-1", Greater),
            ("6.1.192-3~bpo11+1", "6.1.192-3", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    /// Cross-checks against dpkg itself where it is installed.
    #[test]
    fn version_order_agrees_with_dpkg() {
        let pairs = [
            ("6.1.192-3", "6.1.176-1"),
            ("1.0~rc1", "1.0"),
            ("1:1", "2"),
            ("a1", "a01"),
            ("1.2.3+b1", "1.2.3"),
        ];
        for (a, b) in pairs {
            let Ok(out) = std::process::Command::new("dpkg")
                .args(["--compare-versions", a, "lt", b])
                .status()
            else {
                println!("dpkg not available: not cross-checked");
                return;
            };
            assert_eq!(
                out.success(),
                compare_versions(a, b) == Ordering::Less,
                "{a} < {b}"
            );
        }
    }
}
