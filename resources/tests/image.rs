//! End-to-end checks of the real images: fetches the Debian kernel with
//! apt (network to the mirror needed on the first run), builds the static
//! agent, packs the initramfs, and boots it under QEMU TCG when QEMU is
//! installed.
//!
//! When apt (or QEMU) is unusable the tests print a line starting
//! `E2E-SKIP:` with the reason; they never skip silently, and with
//! `E2E_REQUIRE` set (as on CI) they fail instead.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use resources::kernel::KVM_MODULES;
use resources::{elf::Elf, GuestImage, Kernel};

/// Reports a test that cannot run here: a loud skip, or a failure when
/// `E2E_REQUIRE` is set.
fn skip(reason: &str) {
    if std::env::var_os("E2E_REQUIRE").is_some() {
        panic!("E2E_REQUIRE is set but the test cannot run: {reason}");
    }
    println!("E2E-SKIP: {reason}");
}

/// Runs `f`, turning "apt is unusable here" into a loud skip.
fn or_skip<T>(what: &str, f: impl FnOnce() -> Result<T, resources::Error>) -> Option<T> {
    match f() {
        Ok(v) => Some(v),
        Err(e) if e.is_apt_unavailable() => {
            skip(&format!("{what}: apt is unusable here: {}", chain(&e)));
            None
        }
        Err(e) => panic!("{what}: {}", chain(&e)),
    }
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

fn check_kernel(k: &Kernel) {
    assert!(k.flavour.matches_release(&k.version), "{}", k.version);
    let bz = std::fs::read(&k.bzimage).unwrap();
    assert_eq!(&bz[0x202..0x206], b"HdrS");
    let vmlinux = std::fs::read(&k.vmlinux).unwrap();
    let elf = Elf::parse(&vmlinux).unwrap();
    assert_eq!(
        elf.extent(),
        vmlinux.len() as u64,
        "trailing bytes after the ELF"
    );
    assert_eq!(elf.pvh_entry(), k.pvh_entry);
    assert!(k.has_pvh(), "Debian's kernels have CONFIG_PVH");
    assert!(k.modules.ends_with(&k.version));
    for m in KVM_MODULES {
        let path = k.module_path(m).unwrap_or_else(|| panic!("no {m}.ko"));
        let mut magic = [0u8; 4];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact(&mut magic)
            .unwrap();
        assert_eq!(&magic, b"\x7fELF", "{} is compressed", path.display());
    }
    assert!(k.config().is_file());
}

fn cpio_listing(initramfs: &Path) -> Option<String> {
    let gz = std::fs::read(initramfs).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip by default");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert!(plain.starts_with(b"070701"));
    let mut child = match Command::new("cpio")
        .args(["-itv", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            println!("cpio not available ({e}): listing not checked");
            return None;
        }
    };
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &plain).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    Some(String::from_utf8(out.stdout).unwrap())
}

fn check_image(img: &GuestImage) {
    check_kernel(&img.kernel);
    resources::static_build::check_static(&img.agent).unwrap();
    assert!(img.cmdline.contains("console=ttyS0"));
    if let Some(listing) = cpio_listing(&img.initramfs) {
        let line = |name: &str| {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")))
                .unwrap_or_else(|| panic!("no {name} in\n{listing}"))
                .to_owned()
        };
        assert!(line("dev/console").starts_with("crw-------"));
        assert!(line("dev/console").contains("5,"));
        assert!(line("init").starts_with("-rwxr-xr-x"));
        for dir in ["dev", "proc", "sys", "tmp"] {
            assert!(line(dir).starts_with('d'), "{dir}");
        }
    }
}

#[test]
fn kernel_and_guest_image_are_built_and_cached() {
    let t = Instant::now();
    let Some(kernel) = or_skip("ensure_kernel", resources::ensure_kernel) else {
        return;
    };
    println!(
        "ensure_kernel: {:.2} s ({})",
        t.elapsed().as_secs_f64(),
        kernel.package
    );
    check_kernel(&kernel);

    let t = Instant::now();
    let Some(img) = or_skip("ensure_guest_image", resources::ensure_guest_image) else {
        return;
    };
    println!("ensure_guest_image: {:.2} s", t.elapsed().as_secs_f64());
    check_image(&img);
    // The guest's kernel is the cloud one unless GUEST_KERNEL_FLAVOUR says
    // otherwise.
    let guest_kernel = resources::ensure_guest_kernel().unwrap();
    assert_eq!(img.kernel, guest_kernel);
    if guest_kernel.flavour == resources::Flavour::Cloud {
        assert_eq!(img.kernel, kernel);
    }

    // A second call reuses everything: same paths, initramfs not rewritten.
    let before = std::fs::metadata(&img.initramfs)
        .unwrap()
        .modified()
        .unwrap();
    let t = Instant::now();
    let again = resources::ensure_guest_image().unwrap();
    println!(
        "ensure_guest_image (warm): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(again, img);
    let after = std::fs::metadata(&img.initramfs)
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "initramfs rebuilt although nothing changed");
}

/// Boots `kernel` with the guest image's initramfs under QEMU TCG until
/// the agent's ready line and power-off. Returns the ready line and the
/// seconds to it, or `None` (after an `E2E-SKIP:` line) without QEMU.
fn boot(img: &GuestImage, kernel: &Path) -> Option<(String, f64)> {
    let qemu = "qemu-system-x86_64";
    let cmdline = format!("{} agent.poweroff=ready", img.cmdline);
    let spawned = Command::new(qemu)
        .args(["-accel", "tcg,thread=multi", "-m", "512", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&img.initramfs)
        .arg("-append")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            skip(&format!("boot smoke test: cannot run {qemu}: {e}"));
            return None;
        }
    };
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((start.elapsed(), line));
        }
    });
    let deadline = start + Duration::from_secs(300);
    let mut console = Vec::new();
    let status = loop {
        console.extend(rx.try_iter());
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text: Vec<_> = console.iter().map(|(_, l)| l.as_str()).collect();
            panic!(
                "guest did not power off within 300 s; console:\n{}",
                text.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader sends everything up to EOF, which follows the exit.
    console.extend(rx.iter());
    let text: Vec<_> = console.iter().map(|(_, l)| l.as_str()).collect();
    let text = text.join("\n");
    let (at, ready) = console
        .iter()
        .find(|(_, l)| l.starts_with("GUEST-READY"))
        .unwrap_or_else(|| panic!("no ready line; console:\n{text}"));
    assert!(text.contains("GUEST-POWEROFF reason=ready"), "{text}");
    assert!(!text.contains("GUEST-FATAL"), "{text}");
    assert!(status.success(), "qemu exited with {status}");
    Some((ready.clone(), at.as_secs_f64()))
}

/// Boots the guest image under QEMU TCG, through the bzImage and through
/// the extracted vmlinux (QEMU boots an ELF kernel by its PVH note).
#[test]
fn guest_image_boots_to_ready_under_qemu() {
    let Some(img) = or_skip("ensure_guest_image", resources::ensure_guest_image) else {
        return;
    };
    for (how, kernel) in [
        ("bzImage", &img.kernel.bzimage),
        ("PVH vmlinux", &img.kernel.vmlinux),
    ] {
        let Some((ready, secs)) = boot(&img, kernel) else {
            return;
        };
        assert!(ready.contains("nproc=2 online=0-1"), "{ready}");
        println!("TCG boot via {how}: ready after {secs:.2} s: {ready}");
    }
}
