//! Building workspace binaries as static executables for the guest and the
//! emulated host, which have no shared libraries.
//!
//! The build runs `cargo build --release --target x86_64-unknown-linux-gnu`
//! with `+crt-static` in a target directory of its own
//! (`<workspace>/target/static`), so it never waits on the calling cargo's
//! lock (a running `cargo test` holds it) nor invalidates its artifacts.
//! Naming the target explicitly keeps the flag away from build scripts and
//! proc macros, which must stay dynamic.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::elf::{Elf, ElfError};

/// The target triple static binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// Why a static binary could not be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// cargo did not start.
    #[error("cannot run cargo")]
    Spawn(#[source] std::io::Error),
    /// cargo ran and failed (its diagnostics went to stderr).
    #[error("`cargo build -p {package} --bin {bin}` failed ({status})")]
    Failed {
        /// The package.
        package: String,
        /// The binary.
        bin: String,
        /// cargo's exit status.
        status: std::process::ExitStatus,
    },
    /// The binary cannot be read after the build.
    #[error("cannot read the built binary {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The output is not an ELF executable.
    #[error("built binary {0} is not a valid ELF file")]
    Elf(PathBuf, #[source] ElfError),
    /// The output still needs a dynamic loader.
    #[error("built binary {0} is dynamically linked (has PT_INTERP)")]
    NotStatic(PathBuf),
}

/// The workspace root: the one cargo is running in now when there is one
/// (`cargo run` and `cargo test` set `CARGO_MANIFEST_DIR` at run time to a
/// member of it), else the one this crate was compiled in. The run-time
/// answer matters when one target directory serves two checkouts: the
/// compiled-in path may then be the other checkout's, whose VMM, agent and
/// `testhost-init` would be built and tested instead.
pub fn workspace_root() -> PathBuf {
    runtime_workspace_root(std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from))
        .unwrap_or_else(|| {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).to_path_buf()
        })
}

/// This workspace's root from a member's (or the root's) manifest
/// directory; `None` for another project.
fn runtime_workspace_root(manifest_dir: Option<PathBuf>) -> Option<PathBuf> {
    let dir = manifest_dir?;
    let candidates = [Some(dir.clone()), dir.parent().map(Path::to_path_buf)];
    candidates.into_iter().flatten().find(|d| {
        d.join("resources").join("Cargo.toml").is_file()
            && std::fs::read_to_string(d.join("Cargo.toml"))
                .is_ok_and(|m| m.contains("[workspace]"))
    })
}

/// The target directory static builds use.
pub fn static_target_dir() -> PathBuf {
    workspace_root().join("target").join("static")
}

/// Where `build_static` leaves binary `bin`.
pub fn static_binary_path(bin: &str) -> PathBuf {
    static_target_dir().join(TARGET).join("release").join(bin)
}

/// Builds `bin` of workspace package `package` as a static release binary
/// and returns its path. Cargo's progress goes to stderr.
pub fn build_static(package: &str, bin: &str) -> Result<PathBuf, BuildError> {
    let root = workspace_root();
    // Run the same cargo as the caller when there is one (it is the
    // toolchain the workspace pins).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            TARGET,
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(static_target_dir())
        // These would take precedence over the per-target flags below.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env(RUSTFLAGS_VAR, STATIC_RUSTFLAGS)
        // Images carry these binaries: DWARF would more than double their
        // size (and unpack time under emulation); symbols stay for
        // backtraces.
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .status()
        .map_err(BuildError::Spawn)?;
    if !status.success() {
        return Err(BuildError::Failed {
            package: package.to_owned(),
            bin: bin.to_owned(),
            status,
        });
    }
    let path = static_binary_path(bin);
    check_static(&path)?;
    Ok(path)
}

/// Fails unless `path` is an ELF executable without a dynamic loader.
pub fn check_static(path: &Path) -> Result<(), BuildError> {
    let data = std::fs::read(path).map_err(|e| BuildError::Read(path.to_owned(), e))?;
    let elf = Elf::parse(&data).map_err(|e| BuildError::Elf(path.to_owned(), e))?;
    if elf.has_interp() {
        return Err(BuildError::NotStatic(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
        assert!(
            static_binary_path("x").ends_with("target/static/x86_64-unknown-linux-gnu/release/x")
        );
    }

    #[test]
    fn the_running_checkout_wins_over_the_compiled_in_one() {
        let root = workspace_root();
        assert_eq!(
            runtime_workspace_root(Some(root.join("tests"))),
            Some(root.clone())
        );
        assert_eq!(runtime_workspace_root(Some(root.clone())), Some(root));
        assert_eq!(runtime_workspace_root(Some(PathBuf::from("/proc"))), None);
        assert_eq!(runtime_workspace_root(None), None);
    }

    #[test]
    fn dynamic_binaries_are_refused() {
        // Cargo itself (or the shell) is dynamically linked on Debian.
        let err = check_static(Path::new("/bin/sh")).unwrap_err();
        assert!(matches!(err, BuildError::NotStatic(_)), "{err}");
        let err = check_static(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("Cargo.toml")
                .as_path(),
        );
        assert!(matches!(err, Err(BuildError::Elf(..))));
    }
}
