//! The kernel fetch on a machine whose apt cannot find the kernel (an
//! Ubuntu runner, another distribution): Debian's signed index and the
//! package come straight from the archive into a fresh cache, and the
//! kernel is one the image builder accepts (vmlinux extracted, PVH entry,
//! uncompressed KVM modules).
//!
//! 1. apt, apt-cache and dpkg-deb hidden from `PATH` (only `gpgv` left):
//!    apt cannot run, the package is unpacked by the built-in unpacker,
//!    whose tree is then compared with `dpkg-deb -x`'s where dpkg-deb is
//!    installed.
//! 2. apt present but configured without any source (`APT_CONFIG` naming
//!    an empty sources list and lists directory): apt does not know the
//!    package, the direct path resolves it again (the cached kernel is
//!    reused).
//!
//! Needs the network to Debian's mirror, gpgv and the Debian archive
//! keyring: without them it prints `E2E-SKIP:` (and fails under
//! `E2E_REQUIRE`). This file holds one test because it changes the
//! process's `PATH` and `APT_CONFIG`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use resources::cache::Stamp;
use resources::elf::Elf;
use resources::fetch::{self, Mode, Plan};
use resources::kernel::{self, Flavour, Kernel, KernelError};

fn skip(reason: &str) {
    if std::env::var_os("E2E_REQUIRE").is_some() {
        panic!("E2E_REQUIRE is set but the test cannot run: {reason}");
    }
    // Past the test runner's capture.
    let _ = writeln!(std::io::stdout(), "E2E-SKIP: {reason}");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// A directory with `name` linked to the real tool, for a bare `PATH`.
fn tool_dir(root: &Path, tools: &[&str]) -> PathBuf {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for tool in tools {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file());
        if let Some(path) = found {
            std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
        }
    }
    bin
}

/// Path -> (kind and mode, size, link target) of every entry under `root`.
fn tree(root: &Path) -> BTreeMap<PathBuf, (u32, u64, Option<PathBuf>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let link = meta.is_symlink().then(|| fs::read_link(&path).unwrap());
            let size = if meta.is_file() { meta.len() } else { 0 };
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                (meta.mode(), size, link),
            );
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fn check_kernel(k: &Kernel) {
    assert_eq!(k.flavour, Flavour::Cloud);
    assert!(k.version.ends_with("-cloud-amd64"), "{}", k.version);
    let vmlinux = fs::read(&k.vmlinux).unwrap();
    let elf = Elf::parse(&vmlinux).unwrap();
    assert_eq!(elf.extent(), vmlinux.len() as u64);
    assert!(k.has_pvh(), "no PVH entry in {}", k.vmlinux.display());
    assert_eq!(elf.pvh_entry(), k.pvh_entry);
    for m in kernel::KVM_MODULES {
        assert!(k.module_path(m).is_some(), "no {m}.ko");
    }
    assert!(k.config().is_file());
}

#[test]
fn kernel_fetch_without_apt_knowing_debian() {
    let scratch =
        std::env::temp_dir().join(format!("resources-direct-fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    let cache = scratch.join("cache");
    let kernel_dir = cache.join("kernel");
    let saved_path = std::env::var_os("PATH").unwrap_or_default();
    std::env::remove_var(fetch::FETCH_ENV);

    // 1. No apt, no dpkg-deb: only gpgv on PATH.
    let bare = tool_dir(&scratch, &["gpgv"]);
    std::env::set_var("PATH", &bare);
    let start = Instant::now();
    let result = kernel::ensure_flavour_in(&cache, Flavour::Cloud);
    let cold = start.elapsed();
    std::env::set_var("PATH", &saved_path);
    let k = match result {
        Ok(k) => k,
        Err(e) if e.is_unavailable() => {
            skip(&format!(
                "the direct kernel fetch cannot run here: {}",
                chain(&e)
            ));
            let _ = fs::remove_dir_all(&scratch);
            return;
        }
        Err(e) => panic!("direct fetch failed: {}", chain(&e)),
    };
    check_kernel(&k);
    let dir = kernel_dir.join(&k.version);
    let stamp = Stamp::read(&dir.join("stamp")).unwrap();
    let via = stamp.get("via").unwrap();
    assert!(via.starts_with("direct fetch"), "{via}");
    assert_eq!(stamp.get("unpacker"), Some("built-in unpacker"));
    println!(
        "E2E-TIME direct_fetch_cold ms={} kernel={} via={via:?}",
        cold.as_millis(),
        k.package
    );

    // The built-in unpacker made the tree dpkg-deb makes.
    let deb = fetch::deb_path(&kernel_dir, &{
        let (name, version) = k.package.split_once('=').unwrap();
        resources::apt::KernelPackage {
            name: name.into(),
            version: Some(version.into()),
            release: k.version.clone(),
        }
    });
    assert!(deb.is_file(), "{}", deb.display());
    let by_dpkg = scratch.join("dpkg");
    fs::create_dir_all(&by_dpkg).unwrap();
    match Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&by_dpkg)
        .status()
    {
        Ok(s) if s.success() => {
            let ours = tree(&dir.join("root"));
            let theirs = tree(&by_dpkg);
            assert_eq!(ours.len(), theirs.len(), "entry counts differ");
            for (path, want) in &theirs {
                let got = ours
                    .get(path)
                    .unwrap_or_else(|| panic!("{} missing", path.display()));
                assert_eq!(got, want, "{}", path.display());
            }
            println!("built-in unpacker: {} entries as dpkg-deb -x", ours.len());
        }
        other => println!("dpkg-deb not usable ({other:?}): tree not cross-checked"),
    }

    // 2. apt without any source: it does not know the package, the direct
    //    path resolves it (indices by hash from the cache) and the
    //    unpacked kernel is reused.
    let apt_dir = scratch.join("apt");
    fs::create_dir_all(apt_dir.join("sources.list.d")).unwrap();
    fs::create_dir_all(apt_dir.join("lists/partial")).unwrap();
    let conf = apt_dir.join("apt.conf");
    fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"/dev/null\";\n\
             Dir::Etc::SourceParts \"{0}/sources.list.d\";\n\
             Dir::State::Lists \"{0}/lists\";\n",
            apt_dir.display()
        ),
    )
    .unwrap();
    std::env::set_var("APT_CONFIG", &conf);
    let start = Instant::now();
    let plan = fetch::resolve(&kernel_dir, Flavour::Cloud.meta_package(), Mode::Auto);
    let again = kernel::ensure_flavour_in(&cache, Flavour::Cloud);
    let warm = start.elapsed();
    std::env::remove_var("APT_CONFIG");
    let plan = match plan {
        Ok(plan) => plan,
        Err(e @ KernelError::Unavailable { .. }) if e.is_unavailable() => {
            skip(&format!("second fetch lost the network: {}", chain(&e)));
            return;
        }
        Err(e) => panic!("{}", chain(&e)),
    };
    assert!(
        matches!(plan, Plan::Direct(_)),
        "apt without sources resolved it: {plan:?}"
    );
    assert_eq!(plan.package().apt_spec(), k.package);
    assert_eq!(again.unwrap(), k, "the cached kernel is reused");
    println!("E2E-TIME direct_fetch_cached ms={}", warm.as_millis());
    let _ = fs::remove_dir_all(&scratch);
}
