//! Which host runs the VMM: this machine's `/dev/kvm` directly, or an
//! emulated KVM host (QEMU TCG with nested SVM).
//!
//! Direct needs a usable `/dev/kvm` that is not PVM (`/sys/module/kvm_pvm`):
//! PVM runs small guest snippets but cannot boot a stock kernel (see
//! `shared/design/environment.md`). Emulated needs `qemu-system-x86_64`.
//! `E2E_HOST=direct|emulated|auto` forces a choice; `E2E_QEMU` names the
//! QEMU binary.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Environment variable forcing the host kind.
pub const HOST_ENV: &str = "E2E_HOST";
/// Environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "E2E_QEMU";
/// Default name of the QEMU binary, looked up in `PATH`.
pub const QEMU_NAME: &str = "qemu-system-x86_64";

/// Where the VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// On this machine's `/dev/kvm`.
    Direct,
    /// Inside the emulated KVM host.
    Emulated,
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKind::Direct => "direct",
            HostKind::Emulated => "emulated",
        })
    }
}

/// The facts host selection depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `Ok` if `/dev/kvm` opens and reports API version 12, else why not.
    pub kvm: Result<(), String>,
    /// `/sys/module/kvm_pvm` exists.
    pub pvm: bool,
    /// The QEMU binary, if found.
    pub qemu: Option<PathBuf>,
}

/// Host selection failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    /// No host can run the tests here: they must be skipped.
    #[error("{0}")]
    Unavailable(String),
    /// The forced host kind cannot run here.
    #[error("{HOST_ENV}={forced} but {why}")]
    ForcedUnavailable {
        /// The forced kind.
        forced: HostKind,
        /// Why it cannot run.
        why: String,
    },
    /// The environment variable has an unknown value.
    #[error("{HOST_ENV}={0:?} is not one of direct, emulated, auto")]
    BadEnv(String),
}

impl HostFacts {
    /// Probes this machine.
    pub fn probe() -> Self {
        let qemu = std::env::var_os(QEMU_ENV)
            .map(PathBuf::from)
            .or_else(|| find_in_path(QEMU_NAME));
        Self::probe_at(Path::new("/"), qemu)
    }

    /// Probes a machine whose `/dev` and `/sys` are under `root` (tests use
    /// a fake root).
    pub fn probe_at(root: &Path, qemu: Option<PathBuf>) -> Self {
        HostFacts {
            kvm: kvm_usable(&root.join("dev/kvm")),
            pvm: root.join("sys/module/kvm_pvm").exists(),
            qemu,
        }
    }
}

/// Parses the value of [`HOST_ENV`]: `None` means automatic.
pub fn parse_forced(value: Option<&str>) -> Result<Option<HostKind>, SelectError> {
    match value.map(str::trim) {
        None | Some("") | Some("auto") => Ok(None),
        Some("direct") => Ok(Some(HostKind::Direct)),
        Some("emulated") => Ok(Some(HostKind::Emulated)),
        Some(other) => Err(SelectError::BadEnv(other.to_string())),
    }
}

/// Chooses the host kind from `facts`, honouring a forced kind.
pub fn choose(facts: &HostFacts, forced: Option<HostKind>) -> Result<HostKind, SelectError> {
    let direct = match (&facts.kvm, facts.pvm) {
        (Err(why), _) => Err(format!("/dev/kvm is not usable ({why})")),
        (Ok(()), true) => Err(
            "/dev/kvm is PVM (/sys/module/kvm_pvm exists), which cannot boot a stock kernel"
                .to_string(),
        ),
        (Ok(()), false) => Ok(()),
    };
    let emulated = match &facts.qemu {
        Some(_) => Ok(()),
        None => Err(format!("{QEMU_NAME} is not installed")),
    };
    match forced {
        Some(kind) => {
            let ok = if kind == HostKind::Direct {
                direct
            } else {
                emulated
            };
            ok.map(|()| kind)
                .map_err(|why| SelectError::ForcedUnavailable { forced: kind, why })
        }
        None => match (direct, emulated) {
            (Ok(()), _) => Ok(HostKind::Direct),
            (Err(_), Ok(())) => Ok(HostKind::Emulated),
            (Err(d), Err(e)) => Err(SelectError::Unavailable(format!(
                "no KVM host: {d}, and {e} for an emulated one"
            ))),
        },
    }
}

/// Chooses the host kind for this machine and environment.
pub fn select() -> Result<(HostKind, HostFacts), SelectError> {
    let forced = parse_forced(std::env::var(HOST_ENV).ok().as_deref())?;
    let facts = HostFacts::probe();
    choose(&facts, forced).map(|kind| (kind, facts))
}

fn kvm_usable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "path has a NUL byte".to_string())?;
    let kvm = kvm_ioctls::Kvm::new_with_path(cpath.as_c_str())
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match kvm.get_api_version() {
        12 => Ok(()),
        v => Err(format!("KVM API version {v}, expected 12")),
    }
}

/// Finds an executable `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
