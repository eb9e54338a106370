//! The host side of the API forward: a Unix socket listener (mode 0600)
//! whose every connection becomes one channel of a [`Mux`].
//!
//! Channels are bounded: at most [`MAX_CHANNELS`] at once (each holds two
//! pump threads, and one more while it waits for the emulated host's
//! hello). A connection beyond them is answered by one refusing thread,
//! like the VMM's own server at its limit: the client's request is read
//! (briefly), then `503` with the API's JSON error (`unavailable`) and the
//! connection is closed. While that thread is busy with [`MAX_REFUSALS`]
//! others, a connection is closed at once.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::endpoint::Mux;

/// How long a user's connection waits for the emulated host to come up.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// Channels forwarded at once, by default.
pub const MAX_CHANNELS: usize = 64;

/// Connections waiting for their `503`; more are closed at once.
pub const MAX_REFUSALS: usize = 64;

/// How long a refused connection may take to send its request headers.
const REFUSAL_READ: Duration = Duration::from_millis(200);

/// Accepts connections on a socket path and forwards each through a [`Mux`].
/// Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct Forwarder {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// One channel's place among the [`MAX_CHANNELS`]; given back on drop.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Forwarder {
    /// Binds `path` (mode 0600, replacing a stale socket file) and serves it.
    pub fn bind(path: &Path, mux: Mux) -> io::Result<Self> {
        Self::bind_with_limit(path, mux, MAX_CHANNELS)
    }

    /// [`Forwarder::bind`] with at most `max_channels` channels at once.
    pub fn bind_with_limit(path: &Path, mux: Mux, max_channels: usize) -> io::Result<Self> {
        let listener = bind_private(path)?;
        Ok(Self::serve_with_limit(listener, path, mux, max_channels))
    }

    /// Serves an already bound listener; `path` is removed on drop.
    pub fn serve(listener: UnixListener, path: &Path, mux: Mux) -> Self {
        Self::serve_with_limit(listener, path, mux, MAX_CHANNELS)
    }

    /// [`Forwarder::serve`] with at most `max_channels` channels at once.
    pub fn serve_with_limit(
        listener: UnixListener,
        path: &Path,
        mux: Mux,
        max_channels: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), active.clone());
        let thread = thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || accept_loop(&listener, &mux, &flag, &count, max_channels))
            .ok();
        Forwarder {
            path: path.to_path_buf(),
            stop,
            active,
            thread,
        }
    }

    /// The socket path users connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Channels forwarded now (opening or open).
    pub fn active_channels(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

fn accept_loop(
    listener: &UnixListener,
    mux: &Mux,
    stop: &AtomicBool,
    active: &Arc<AtomicUsize>,
    max_channels: usize,
) {
    let mut refuser: Option<SyncSender<UnixStream>> = None;
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        if active.load(Ordering::SeqCst) >= max_channels {
            refuse(&mut refuser, conn, max_channels);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(active.clone());
        let mux = mux.clone();
        // Opening waits for the peer's hello: do not block accept. The slot
        // goes with the channel's pumps (or is dropped if it fails).
        let _ = thread::Builder::new()
            .name("api-open".into())
            .spawn(move || mux.open_guarded(conn, HELLO_TIMEOUT, Arc::new(slot)));
    }
}

/// Hand `conn` to the refusing thread (started on first use), or close it
/// at once if that thread has [`MAX_REFUSALS`] waiting.
fn refuse(refuser: &mut Option<SyncSender<UnixStream>>, conn: UnixStream, max: usize) {
    if refuser.is_none() {
        let (tx, rx) = mpsc::sync_channel::<UnixStream>(MAX_REFUSALS);
        let answer = at_capacity(max);
        let spawned = thread::Builder::new()
            .name("api-refuse".into())
            .spawn(move || {
                for conn in rx {
                    answer_and_close(conn, &answer);
                }
            });
        if spawned.is_ok() {
            *refuser = Some(tx);
        }
    }
    // Full (or no thread): `conn` is dropped, i.e. closed.
    if let Some(tx) = refuser {
        let _ = tx.try_send(conn);
    }
}

/// The whole `503` answer of a forward at its limit.
fn at_capacity(max: usize) -> Vec<u8> {
    let body = serde_json::to_vec(&api::ErrorBody::from(api::ApiError::new(
        api::ErrorCode::Unavailable,
        format!(
            "the API forward is at its connection limit ({max} connections); try again shortly"
        ),
    )))
    .unwrap_or_default();
    let mut bytes = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Read the request's head (bounded by [`REFUSAL_READ`] and 8 KiB), so the
/// client is not cut off while writing it, then answer and close.
fn answer_and_close(mut conn: UnixStream, answer: &[u8]) {
    let deadline = Instant::now() + REFUSAL_READ;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 8192 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let _ = conn.set_write_timeout(Some(REFUSAL_READ));
    let _ = conn.write_all(answer);
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a listening socket at `path` with mode 0600 from the first moment:
/// bound inside a fresh 0700 directory beside it, made 0600, then
/// hard-linked into place (which fails rather than replaces if something
/// appeared there meanwhile). A stale socket at `path` is removed first
/// ([`remove_stale_socket`]).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    remove_stale_socket(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!(".fwd-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let bound = (|| {
        let temp = dir.join("s");
        let listener = UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&temp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bound
}

/// Removes `path` if it is a socket nobody listens on; refuses to replace
/// anything else (a live socket or a regular file).
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ))
            } else {
                std::fs::remove_file(path)
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}
