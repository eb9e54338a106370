//! Privileges: `no_new_privs` first thing in `main` ([`set_no_new_privs`]:
//! nothing the VMM could exec gains privileges, and seccomp filters need
//! no capability), and `--user UID:GID` ([`drop_to`]): once `/dev/kvm`,
//! the guest images, a `--serial file:` and the API socket are open, the
//! VMM gives up root before any vCPU runs guest code.
//!
//! What `--user` needs:
//! - root (CAP_SETUID and CAP_SETGID) to start with;
//! - nothing opened afterwards: `/dev/kvm`, the kernel, the initramfs and
//!   the console file are opened before the drop, and a hot-added vCPU is
//!   an ioctl on the VM fd already open;
//! - the API socket is handed to the user (chown) before the drop, so
//!   the user can connect to it and, at exit, remove it: that also needs
//!   write permission on the socket's directory (a sticky `/tmp` is fine,
//!   the user owns the socket). Where it cannot, the socket is left and
//!   the next VMM on that path replaces it as stale.
//!
//! The drop is setgroups([]) then setgid then setuid, each checked, then
//! verified (real, effective and saved ids, no supplementary groups).
//! glibc applies each call to every thread of the process; the threads
//! alive at that point (console, API) have them in their seccomp list,
//! with exactly these ids.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Errors of the privilege handling.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// prctl(PR_SET_NO_NEW_PRIVS) failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// The API socket could not be handed to the user.
    #[error("cannot hand the API socket {0} to uid {1}")]
    Chown(String, u32, #[source] std::io::Error),
    /// setgroups([]) failed.
    #[error("cannot drop the supplementary groups (--user needs root)")]
    SetGroups(#[source] std::io::Error),
    /// setgid failed.
    #[error("cannot set gid {0} (--user needs root)")]
    SetGid(u32, #[source] std::io::Error),
    /// setuid failed.
    #[error("cannot set uid {0} (--user needs root)")]
    SetUid(u32, #[source] std::io::Error),
    /// The ids after the drop are not the asked ones.
    #[error("privileges not dropped as asked: {0}")]
    NotDropped(String),
}

/// `--user UID:GID`: numeric ids (no name lookup: the static VMM has no
/// NSS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

impl FromStr for User {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid --user {s:?}: expected UID:GID (numbers)");
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            uid: uid.trim().parse().map_err(|_| bad())?,
            gid: gid.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// `Ok` if `rc` is 0, else the errno.
fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets `no_new_privs` on the calling thread; the threads it spawns
/// afterwards inherit it, so call it before any.
pub fn set_no_new_privs() -> Result<(), PrivilegeError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(PrivilegeError::NoNewPrivs)
}

/// Whether `no_new_privs` is set on the calling thread.
pub fn no_new_privs() -> bool {
    // SAFETY: prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// Drops the supplementary groups (glibc: in every thread).
fn setgroups_empty() -> std::io::Result<()> {
    // SAFETY: a size of 0 means the list is not read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
}

/// setgid(2) (glibc: in every thread).
fn setgid(gid: u32) -> std::io::Result<()> {
    // SAFETY: setgid takes no pointers.
    check(unsafe { libc::setgid(gid) })
}

/// setuid(2) (glibc: in every thread).
fn setuid(uid: u32) -> std::io::Result<()> {
    // SAFETY: setuid takes no pointers.
    check(unsafe { libc::setuid(uid) })
}

/// The real, effective and saved user and group ids and the number of
/// supplementary groups of the calling thread.
fn ids() -> ([u32; 3], [u32; 3], libc::c_int) {
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: the pointers are to live locals; getgroups with a size of 0
    // only counts.
    let groups = unsafe {
        libc::getresuid(&mut ru, &mut eu, &mut su);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
        libc::getgroups(0, std::ptr::null_mut())
    };
    ([ru, eu, su], [rg, eg, sg], groups)
}

/// Hands the API socket at `socket` to `user`, then drops the process's
/// privileges to `user` and checks they are gone.
pub fn drop_to(user: User, socket: Option<&Path>) -> Result<(), PrivilegeError> {
    if let Some(path) = socket {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .map_err(|e| PrivilegeError::Chown(path.display().to_string(), user.uid, e))?;
    }
    setgroups_empty().map_err(PrivilegeError::SetGroups)?;
    setgid(user.gid).map_err(|e| PrivilegeError::SetGid(user.gid, e))?;
    setuid(user.uid).map_err(|e| PrivilegeError::SetUid(user.uid, e))?;
    let (uids, gids, groups) = ids();
    if uids != [user.uid; 3] || gids != [user.gid; 3] || groups != 0 {
        return Err(PrivilegeError::NotDropped(format!(
            "uids {uids:?}, gids {gids:?}, {groups} supplementary groups"
        )));
    }
    log::info!("privileges dropped to uid {} gid {}", user.uid, user.gid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_as_numeric_ids() {
        assert_eq!(
            "1000:100".parse(),
            Ok(User {
                uid: 1000,
                gid: 100
            })
        );
        assert_eq!("0:0".parse::<User>().unwrap().to_string(), "0:0");
        for bad in [
            "",
            "1000",
            "1000:",
            ":100",
            "nobody:nogroup",
            "1:2:3",
            "-1:0",
        ] {
            let e = bad.parse::<User>().unwrap_err();
            assert!(e.contains("UID:GID"), "{bad}: {e}");
        }
    }

    #[test]
    fn no_new_privs_is_set_for_the_thread() {
        let set = std::thread::spawn(|| {
            set_no_new_privs().unwrap();
            no_new_privs()
        });
        assert!(set.join().unwrap());
    }
}
