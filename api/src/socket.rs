//! Where the API socket lives by default: never directly in a
//! world-writable directory such as `/tmp`.
//!
//! In order: `$XDG_RUNTIME_DIR/vmm.sock` when that is set (a per-user
//! directory the login session owns); `/run/vmm/vmm.sock` for root; else
//! `$TMPDIR/vmm-UID/vmm.sock` (`/tmp/vmm-UID`), a directory of this user
//! with mode 0700, as tmux does. The server side (the launcher) creates
//! that directory with [`prepare_dir`]; clients (`vmmctl`) only compute
//! the path, or take it from [`SOCKET_ENV`].

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The environment variable that names the socket (for `vmmctl` and the
/// launcher); [`default_path`] when unset.
pub const SOCKET_ENV: &str = "VMM_SOCKET";

/// The socket's file name in the default directory.
pub const SOCKET_NAME: &str = "vmm.sock";

/// The directory root's default socket lives in when there is no
/// `$XDG_RUNTIME_DIR`.
pub const ROOT_DIR: &str = "/run/vmm";

/// The default socket path for this process (see the module docs).
pub fn default_path() -> PathBuf {
    default_path_for(
        std::env::var_os("XDG_RUNTIME_DIR"),
        effective_uid(),
        &std::env::temp_dir(),
    )
}

/// [`SOCKET_ENV`] when set and not empty, else [`default_path`].
pub fn from_env() -> PathBuf {
    from_env_value(std::env::var_os(SOCKET_ENV))
}

/// `value` (of [`SOCKET_ENV`]) when set and not empty, else
/// [`default_path`].
pub fn from_env_value(value: Option<OsString>) -> PathBuf {
    match value {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => default_path(),
    }
}

/// The default socket path given `$XDG_RUNTIME_DIR`, the effective user id
/// and the temporary directory (the pure part of [`default_path`]).
pub fn default_path_for(xdg_runtime_dir: Option<OsString>, uid: u32, tmp: &Path) -> PathBuf {
    let dir = match xdg_runtime_dir {
        // The XDG spec demands an absolute path; anything else is ignored.
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        _ if uid == 0 => PathBuf::from(ROOT_DIR),
        _ => tmp.join(format!("vmm-{uid}")),
    };
    dir.join(SOCKET_NAME)
}

/// Makes `socket`'s directory ready for a server to bind in: creates it
/// with mode 0700 when missing (the parent must exist), then checks that it
/// is private: a real directory (not a symbolic link), owned by this user,
/// with no access for group or others. For the default path only; a path
/// the user names is taken as it is.
pub fn prepare_dir(socket: &Path) -> io::Result<()> {
    let dir = match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", dir.display()),
            ))
        }
    }
    check_private(dir, effective_uid())
}

/// `dir` is a directory (not a link) owned by `uid` with no group or other
/// access.
fn check_private(dir: &Path, uid: u32) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot examine {}: {e}", dir.display())))?;
    let problem = if !meta.file_type().is_dir() {
        Some("not a directory".to_owned())
    } else if meta.uid() != uid {
        Some(format!("owned by uid {}, not {uid}", meta.uid()))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "mode {:o}: group or others have access",
            meta.mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a private directory: {why}", dir.display()),
        )),
    }
}

/// This process's effective user id.
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and
    // cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn default_path_order() {
        let tmp = Path::new("/tmp");
        assert_eq!(
            default_path_for(Some("/run/user/1000".into()), 1000, tmp),
            Path::new("/run/user/1000/vmm.sock")
        );
        assert_eq!(
            default_path_for(Some("/run/user/0".into()), 0, tmp),
            Path::new("/run/user/0/vmm.sock")
        );
        assert_eq!(
            default_path_for(None, 0, tmp),
            Path::new("/run/vmm/vmm.sock")
        );
        assert_eq!(
            default_path_for(Some("relative".into()), 0, tmp),
            Path::new("/run/vmm/vmm.sock")
        );
        assert_eq!(
            default_path_for(None, 1000, Path::new("/var/tmp")),
            Path::new("/var/tmp/vmm-1000/vmm.sock")
        );
        assert_eq!(
            default_path_for(Some("".into()), 1000, tmp),
            Path::new("/tmp/vmm-1000/vmm.sock")
        );
    }

    #[test]
    fn env_value_wins_unless_empty() {
        assert_eq!(
            from_env_value(Some("/x/api.sock".into())),
            Path::new("/x/api.sock")
        );
        assert_eq!(from_env_value(Some("".into())), default_path());
        assert_eq!(from_env_value(None), default_path());
        assert!(default_path().ends_with(SOCKET_NAME));
    }

    #[test]
    fn prepare_creates_a_private_dir_and_refuses_shared_ones() {
        let base = std::env::temp_dir().join(format!("api-socket-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let dir = base.join("vmm-x");
        prepare_dir(&dir.join(SOCKET_NAME)).unwrap();
        let meta = fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        // Again: fine.
        prepare_dir(&dir.join(SOCKET_NAME)).unwrap();
        // Opened up: refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_dir(&dir.join(SOCKET_NAME)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("not a private directory"), "{err}");
        // A link to a private directory: refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare_dir(&link.join(SOCKET_NAME)).is_err());
        // A file: refused.
        let file = base.join("file");
        fs::write(&file, b"x").unwrap();
        assert!(prepare_dir(&file.join(SOCKET_NAME)).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
