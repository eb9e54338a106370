//! The files a launch needs, from the `resources` crate: the Debian kernel
//! and its KVM modules (the emulated host), `testhost-init` and `vmm`
//! built static, and the guest image. Results are memoised per process.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::emulated::HostImage;
use crate::error::{Error, Result};

/// Module parameters of `kvm-amd` in the emulated host (nested is the
/// default; stated so that it is visible in the job description).
pub const KVM_AMD_PARAMS: &str = "nested=1";

/// Extra `kvm-amd` parameters for experiments with the emulated host's
/// configuration (e.g. `npt=0 vgif=0`), appended to [`KVM_AMD_PARAMS`].
pub const KVM_AMD_PARAMS_ENV: &str = "E2E_KVM_AMD_PARAMS";

/// `kvm-amd`'s parameters: [`KVM_AMD_PARAMS`] and then `extra` (a later
/// parameter overrides an earlier one when the module loads). Only
/// `name=value` words of `[a-z_]` names and `[0-9A-Za-z_]` values pass.
fn kvm_amd_params(extra: Option<&str>) -> String {
    let valid = |w: &&str| {
        w.split_once('=').is_some_and(|(k, v)| {
            !k.is_empty()
                && !v.is_empty()
                && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
    };
    let mut words = vec![KVM_AMD_PARAMS];
    words.extend(extra.unwrap_or_default().split_whitespace().filter(valid));
    words.join(" ")
}

/// The guest's files.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    /// The compressed kernel (bzImage).
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel with its PVH entry note.
    pub vmlinux: PathBuf,
    /// Initramfs (uncompressed: faster under emulation).
    pub initramfs: PathBuf,
    /// Default command line of the image.
    pub cmdline: String,
    /// The static guest agent the initramfs carries as `/init`.
    pub agent: PathBuf,
}

fn memo<T: Clone>(cell: &Mutex<Option<T>>, make: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut slot = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = slot.as_ref() {
        return Ok(v.clone());
    }
    let v = make()?;
    *slot = Some(v.clone());
    Ok(v)
}

fn artifact(what: &'static str) -> impl FnOnce(resources::Error) -> Error {
    move |e| Error::Artifact {
        what,
        source: Box::new(e),
    }
}

/// The emulated host's kernel, modules and init.
pub fn host_image() -> Result<HostImage> {
    static CELL: Mutex<Option<HostImage>> = Mutex::new(None);
    memo(&CELL, || {
        let kernel = resources::ensure_kernel().map_err(artifact("the Debian kernel"))?;
        let mut modules = Vec::new();
        for name in resources::kernel::KVM_MODULES {
            let path = kernel.module_path(name).ok_or_else(|| Error::Artifact {
                what: "the KVM modules",
                source: format!("{name}.ko not found under {}", kernel.modules.display()).into(),
            })?;
            let params = if name == "kvm-amd" {
                kvm_amd_params(std::env::var(KVM_AMD_PARAMS_ENV).ok().as_deref())
            } else {
                String::new()
            };
            modules.push((path, params));
        }
        let init =
            resources::build_static("e2e", "testhost-init").map_err(artifact("testhost-init"))?;
        Ok(HostImage {
            kernel: kernel.bzimage,
            modules,
            init,
        })
    })
}

/// The guest image (kernel, uncompressed initramfs, command line).
pub fn guest_image() -> Result<GuestFiles> {
    static CELL: Mutex<Option<GuestFiles>> = Mutex::new(None);
    memo(&CELL, || {
        let img = resources::ensure_guest_image_with(resources::cpio::Compression::None)
            .map_err(artifact("the guest image"))?;
        Ok(GuestFiles {
            bzimage: img.kernel.bzimage,
            vmlinux: img.kernel.vmlinux,
            initramfs: img.initramfs,
            cmdline: img.cmdline,
            agent: img.agent,
        })
    })
}

/// Environment variable naming a prebuilt static `vmm` to test instead of
/// building the workspace's.
pub const VMM_ENV: &str = "E2E_VMM";

/// The `vmm` binary, static (runs inside the emulated host and directly):
/// `$E2E_VMM` if set, else built from the workspace.
pub fn vmm_binary() -> Result<PathBuf> {
    static CELL: Mutex<Option<PathBuf>> = Mutex::new(None);
    memo(&CELL, || {
        if let Some(path) = std::env::var_os(VMM_ENV) {
            return Ok(PathBuf::from(path));
        }
        resources::build_static("vmm", "vmm").map_err(artifact("the vmm binary"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_amd_params_take_valid_extras_only() {
        assert_eq!(kvm_amd_params(None), "nested=1");
        assert_eq!(
            kvm_amd_params(Some(" npt=0  vgif=0 ")),
            "nested=1 npt=0 vgif=0"
        );
        assert_eq!(
            kvm_amd_params(Some("npt=0 x;reboot=1 =1 avic= nrips=0")),
            "nested=1 npt=0 nrips=0"
        );
    }
}
