//! The fuzz targets `uevent` and `sysfs` (`guest::fuzzing`) as bounded
//! property tests: the committed corpus plus seeded random inputs (see
//! `fuzz/props.rs`; `FUZZ_CASES`, `FUZZ_SEED`).

#[path = "../../fuzz/props.rs"]
mod props;

use guest::fuzzing;
use rand::rngs::StdRng;
use rand::Rng;

/// A kernel uevent of the kinds the agent meets, with odd fields mixed in.
fn uevent(rng: &mut StdRng) -> Vec<u8> {
    let action = [
        "add", "remove", "online", "offline", "change", "bind", "ADD", "",
    ][rng.gen_range(0..8)];
    let devpath = match rng.gen_range(0..5) {
        0 => format!("/devices/system/cpu/cpu{}", rng.gen_range(0..300)),
        1 => format!("/devices/LNXSYSTM:00/LNXCPU:{:02}", rng.gen_range(0..16)),
        2 => "/devices/system/cpu/cpufreq".to_owned(),
        3 => format!("/devices/system/cpu/cpu{}", rng.gen::<u64>()),
        _ => "/devices/system/memory/memory32".to_owned(),
    };
    let mut out = format!("{action}@{devpath}\0").into_bytes();
    for _ in 0..rng.gen_range(0..6) {
        let field = match rng.gen_range(0..7) {
            0 => format!("ACTION={action}"),
            1 => format!("DEVPATH={devpath}"),
            2 => "SUBSYSTEM=cpu".to_owned(),
            3 => format!("SEQNUM={}", rng.gen::<u64>()),
            4 => "SUBSYSTEM=acpi".to_owned(),
            5 => "junk".to_owned(),
            _ => String::new(),
        };
        out.extend(field.as_bytes());
        out.push(0);
    }
    out
}

#[test]
fn uevent_datagrams() {
    props::run("uevent", 4000, fuzzing::uevent, uevent);
}

/// Length-prefixed text, as `guest::fuzzing::sysfs` reads it.
fn piece(out: &mut Vec<u8>, text: &[u8]) {
    out.extend(u16::try_from(text.len()).unwrap().to_le_bytes());
    out.extend(text);
}

/// A CPU list as the kernel writes it, or nearly.
fn cpu_list(rng: &mut StdRng) -> String {
    let mut parts = Vec::new();
    for _ in 0..rng.gen_range(0..4) {
        let lo = rng.gen_range(0..12u32);
        parts.push(match rng.gen_range(0..5) {
            0 => format!("{lo}-{}", lo + rng.gen_range(0..4)),
            1 => format!("{lo}-{}", lo.saturating_sub(1)),
            2 => "65535".to_owned(),
            3 => "65536".to_owned(),
            _ => lo.to_string(),
        });
    }
    let mut text = parts.join(",");
    if rng.gen() {
        text.push('\n');
    }
    text
}

/// `/proc/cpuinfo` of a few CPUs.
fn cpuinfo(rng: &mut StdRng) -> String {
    let mut text = String::new();
    for cpu in 0..rng.gen_range(0..4) {
        text.push_str(&format!(
            "processor\t: {cpu}\nvendor_id\t: AuthenticAMD\napicid\t\t: {}\ninitial apicid\t: {}\n\n",
            rng.gen_range(0..8),
            cpu
        ));
    }
    text
}

/// A `sysfs` input: the lists, one CPU's files, `/proc/cpuinfo`, then
/// id map calls.
fn sysfs(rng: &mut StdRng) -> Vec<u8> {
    let mut out = vec![rng.gen(), rng.gen()];
    for _ in 0..3 {
        piece(&mut out, cpu_list(rng).as_bytes());
    }
    piece(
        &mut out,
        [&b"1\n"[..], b"0\n", b"", b"x"][rng.gen_range(0..4)],
    );
    piece(&mut out, rng.gen_range(0..10u32).to_string().as_bytes());
    piece(&mut out, cpuinfo(rng).as_bytes());
    out.extend(props::random_bytes(rng, 64));
    out
}

#[test]
fn sysfs_and_ids() {
    props::run("sysfs", 1500, fuzzing::sysfs, sysfs);
}
