//! Binding the API's Unix socket: mode 0600 from the first moment, and
//! never replacing anything but a stale socket.
//!
//! If the path exists and is a socket nobody listens on, it is removed. If
//! it is a live socket, or not a socket, binding fails. The socket is bound
//! inside a fresh 0700 directory, made 0600, then hard-linked into place:
//! nobody else can connect before the mode is set, and the link fails
//! (rather than replaces) if something appeared at the path meanwhile.
//! A missing parent directory (the last component only, e.g. `/run/vmm`)
//! is created with mode 0700.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A server is listening there.
    #[error("{} is in use by a running server", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is there.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The path could not be examined.
    #[error("cannot examine {}", path.display())]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding, setting the mode or linking failed.
    #[error("cannot create the socket {}", path.display())]
    Create {
        /// The path that failed.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The socket file this server created, so it removes only its own.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the socket file if it is still the one we created.
    pub(super) fn remove(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Bind a listening socket at `path` (mode 0600), applying the stale-socket
/// rule.
pub(super) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    clear_stale(path)?;
    let create = |at: &Path| {
        let at = at.to_owned();
        move |source| SocketError::Create { path: at, source }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        match fs::DirBuilder::new().mode(0o700).create(parent) {
            Ok(()) => log::info!("created {} (mode 0700)", parent.display()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create(parent)(e)),
        }
    }
    let private = PrivateDir::new(path).map_err(create(path))?;
    let temp = private.dir.join("s");
    let listener = UnixListener::bind(&temp).map_err(create(&temp))?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o600)).map_err(create(&temp))?;
    if let Err(source) = fs::hard_link(&temp, path) {
        return Err(match source.kind() {
            ErrorKind::AlreadyExists => SocketError::InUse(path.to_owned()),
            _ => SocketError::Create {
                path: path.to_owned(),
                source,
            },
        });
    }
    let meta = fs::symlink_metadata(path).map_err(create(path))?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}

/// Remove `path` if it is a socket nobody listens on; fail if it is a live
/// socket or not a socket.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(SocketError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A 0700 directory beside the socket path, removed (with its contents)
/// on drop.
struct PrivateDir {
    dir: PathBuf,
}

impl PrivateDir {
    fn new(socket: &Path) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let parent = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".api-{}-{n}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self { dir })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-sock-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn binds_0600_and_removes_only_its_own() {
        let dir = scratch("own");
        let path = dir.join("api.sock");
        let (listener, file) = bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        // Nothing left behind but the socket.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // A live socket is not replaced.
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(listener);
        file.remove();
        assert!(!path.exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stale_socket_is_replaced_other_files_are_not() {
        let dir = scratch("stale");
        let path = dir.join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (_listener, file) = bind(&path).unwrap();
        file.remove();

        fs::write(&path, b"keep me").unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket(_))));
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
        fs::remove_file(&path).unwrap();

        fs::create_dir(&path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_parent_is_created_0700_one_level_only() {
        let dir = scratch("parent");
        let path = dir.join("run-vmm").join("vmm.sock");
        let (_listener, file) = bind(&path).unwrap();
        let meta = fs::symlink_metadata(dir.join("run-vmm")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        file.remove();
        assert!(bind(&dir.join("a/b/vmm.sock")).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_replaced_by_someone_else_is_left_alone() {
        let dir = scratch("replaced");
        let path = dir.join("api.sock");
        let (_listener, file) = bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"theirs").unwrap();
        file.remove();
        assert_eq!(fs::read(&path).unwrap(), b"theirs");
        fs::remove_dir_all(dir).unwrap();
    }
}
