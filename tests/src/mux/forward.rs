//! The host side of the API forward: a Unix socket listener whose every
//! connection becomes one channel of a [`Mux`].

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::endpoint::Mux;

/// How long a user's connection waits for the emulated host to come up.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// Accepts connections on a socket path and forwards each through a [`Mux`].
/// Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct Forwarder {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds `path` (replacing a stale socket file) and serves it.
    pub fn bind(path: &Path, mux: Mux) -> io::Result<Self> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        Ok(Self::serve(listener, path, mux))
    }

    /// Serves an already bound listener; `path` is removed on drop.
    pub fn serve(listener: UnixListener, path: &Path, mux: Mux) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("api-forward".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let mux = mux.clone();
                    // Opening waits for the peer's hello: do not block accept.
                    let _ = thread::Builder::new()
                        .name("api-open".into())
                        .spawn(move || mux.open(conn, HELLO_TIMEOUT));
                }
            })
            .ok();
        Forwarder {
            path: path.to_path_buf(),
            stop,
            thread,
        }
    }

    /// The socket path users connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
