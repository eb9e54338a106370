//! Can this host's /dev/kvm boot a stock Linux guest?
//!
//! `/dev/kvm` may be served by `kvm_pvm`, a page-table based hypervisor
//! that runs only PVM-patched kernels at speed and everything else through
//! KVM's instruction emulator: a stock kernel never finishes booting
//! there. Detect it and say so instead of hanging.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;

/// The one line printed when /dev/kvm is PVM.
pub const PVM_MESSAGE: &str = "this host's /dev/kvm is PVM (kvm_pvm): stock Linux kernels cannot boot on it; \
run the VMM inside the emulated KVM host instead: cargo run --release -p e2e --bin launch -- [vmm options] \
(or pass --allow-pvm to try anyway)";

/// What kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX/SVM): stock guests boot.
    Hardware,
    /// PVM: only PVM-patched guests boot; small code snippets work.
    Pvm,
}

/// Errors opening /dev/kvm.
#[derive(Debug, thiserror::Error)]
pub enum KvmCheckError {
    /// No device node.
    #[error(
        "{0} does not exist: load the kvm module (kvm_intel or kvm_amd) or run on a host with KVM"
    )]
    Missing(String),
    /// No permission.
    #[error("no permission to open {0}: run as root or add this user to the kvm group")]
    PermissionDenied(String),
    /// Any other open failure.
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
}

/// Checks `dev` (normally /dev/kvm) can be opened read-write.
pub fn check_device(dev: &Path) -> Result<(), KvmCheckError> {
    let name = dev.display().to_string();
    match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(KvmCheckError::Missing(name)),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            Err(KvmCheckError::PermissionDenied(name))
        }
        Err(e) => Err(KvmCheckError::Open(name, e)),
    }
}

/// The KVM flavour, judged from the sysfs tree at `sys_root` (normally /sys).
pub fn flavor(sys_root: &Path) -> KvmFlavor {
    if sys_root.join("module/kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else {
        KvmFlavor::Hardware
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_is_detected_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("kvmcheck-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm")).unwrap();
        assert_eq!(flavor(&dir), KvmFlavor::Hardware);
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        assert_eq!(flavor(&dir), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(PVM_MESSAGE.contains("PVM") && PVM_MESSAGE.contains("emulated KVM host"));
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = check_device(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmCheckError::Missing(_)));
        assert!(err.to_string().contains("does not exist"));
    }
}
