//! HTTP(S) downloads for the direct fetch (ureq with rustls; proxies from
//! the usual `http_proxy`/`https_proxy`/`ALL_PROXY` variables).
//!
//! Every body has a size bound, and a transfer that stalls for a minute
//! is abandoned. Nothing fetched here is trusted until it is checked
//! against a signed index (see [`super::release`]).

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::FetchError;
use crate::cache;

/// Connection set-up bound (DNS and TCP/TLS connect each).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A transfer with no byte for this long is abandoned.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_resolve(Some(CONNECT_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(STALL_TIMEOUT))
            .timeout_per_read(Some(STALL_TIMEOUT))
            .user_agent(concat!("hotplug-resources/", env!("CARGO_PKG_VERSION")))
            .build()
            .into()
    })
}

/// Lower-case hex of a SHA-256 digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data` in lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn open(url: &str) -> Result<ureq::Body, FetchError> {
    let network = |source| FetchError::Network {
        url: url.to_owned(),
        source: Box::new(source),
    };
    let response = agent().get(url).call().map_err(network)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status,
        });
    }
    Ok(response.into_body())
}

/// The body of `url`, at most `limit` bytes (a longer one is refused as
/// not what the index says, not as a network failure).
pub fn get(url: &str, limit: u64) -> Result<Vec<u8>, FetchError> {
    let mut body = open(url)?;
    body.with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|source| match source {
            ureq::Error::BodyExceedsLimit(_) => FetchError::Mismatch {
                what: url.to_owned(),
                expected: format!("at most {limit} bytes"),
                actual: "more".to_owned(),
            },
            source => FetchError::Network {
                url: url.to_owned(),
                source: Box::new(source),
            },
        })
}

/// Downloads `url` into `dest` (atomically) if it is exactly `size` bytes
/// with SHA-256 `sha256`; nothing is left at `dest` otherwise.
pub fn download_verified(
    url: &str,
    dest: &Path,
    size: u64,
    sha256: &str,
) -> Result<(), FetchError> {
    // No limit in the reader: the loop stops one byte past `size` itself.
    let mut reader = open(url)?.into_reader();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut failure = None;
    let written = cache::atomic_write(dest, |w| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    failure = Some(FetchError::Network {
                        url: url.to_owned(),
                        source: Box::new(e),
                    });
                    return Err(std::io::Error::other("download failed"));
                }
            };
            got += n as u64;
            if got > size {
                break;
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])?;
        }
        let actual = hex(&hasher.clone().finalize());
        if got != size || actual != sha256 {
            failure = Some(FetchError::Mismatch {
                what: url.to_owned(),
                expected: format!("{size} bytes, SHA-256 {sha256}"),
                actual: if got > size {
                    format!("more than {size} bytes")
                } else {
                    format!("{got} bytes, SHA-256 {actual}")
                },
            });
            return Err(std::io::Error::other("verification failed"));
        }
        Ok(())
    });
    match (written, failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(f)) => Err(f),
        (Err(source), None) => Err(FetchError::Io {
            context: format!("writing {}", dest.display()),
            source,
        }),
    }
}

/// True if `path` is exactly `size` bytes with SHA-256 `sha256`.
pub fn file_matches(path: &Path, size: u64, sha256: &str) -> std::io::Result<bool> {
    if fs::metadata(path)?.len() != size {
        return Ok(false);
    }
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(&hasher.finalize()) == sha256)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn file_check_compares_size_and_hash() {
        let dir = crate::cache::tests::test_dir("filematch");
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        let good = sha256_hex(b"abc");
        assert!(file_matches(&p, 3, &good).unwrap());
        assert!(!file_matches(&p, 4, &good).unwrap());
        assert!(!file_matches(&p, 3, &sha256_hex(b"abd")).unwrap());
        assert!(file_matches(&dir.path().join("none"), 3, &good).is_err());
    }

    /// Serves `body` to `n` requests on a loopback port; returns the base URL.
    pub(crate) fn serve(body: &'static [u8], n: usize) -> String {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(n) {
                let mut stream = stream.unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn downloads_are_checked_before_they_land() {
        let dir = crate::cache::tests::test_dir("dlcheck");
        let dest = dir.path().join("x.deb");
        let url = serve(b"abc", 5);
        let err = download_verified(&url, &dest, 3, &sha256_hex(b"abd")).unwrap_err();
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert!(!err.is_environmental());
        assert!(!dest.exists());
        let err = download_verified(&url, &dest, 1, &sha256_hex(b"a")).unwrap_err();
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert!(err.to_string().ends_with("got more than 1 bytes"), "{err}");
        assert!(!dest.exists());
        download_verified(&url, &dest, 3, &sha256_hex(b"abc")).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"abc");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp files left"
        );
        // A body longer than the bound is refused as a mismatch.
        let err = get(&url, 2).unwrap_err();
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert_eq!(get(&url, 3).unwrap(), b"abc");
    }

    #[test]
    fn unreachable_mirror_is_a_network_error() {
        // Port 9 on the loopback: nothing listens, the connect is refused.
        let err = get("http://127.0.0.1:9/debian/dists/x/InRelease", 1024).unwrap_err();
        assert!(err.is_environmental(), "{err}");
        let dir = crate::cache::tests::test_dir("dlfail");
        let dest = dir.path().join("x.deb");
        let err = download_verified("http://127.0.0.1:9/x.deb", &dest, 1, "00").unwrap_err();
        assert!(matches!(err, FetchError::Network { .. }), "{err}");
        assert!(!dest.exists());
    }
}
