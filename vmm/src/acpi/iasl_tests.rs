//! Checks the tables with ACPICA's `iasl` (Debian package acpica-tools).
//!
//! Every table but the RSDP (not an SDT: `iasl` does not take it alone; its
//! checksums and fields are unit-tested in `tables`) is disassembled with
//! `iasl -d` and the result compiled back with `iasl`; neither may report an
//! error or a warning, and the disassembly must carry no `****` marker (bad
//! checksum, truncated subtable). The text is then searched for what the
//! guest depends on. Then ACPICA's `acpiexec` (same package; the
//! interpreter Linux uses) loads the DSDT and runs the methods, its
//! OperationRegions backed by plain memory: every evaluation must succeed
//! and `CTFY` must notify exactly the requested processor. A missing tool
//! FAILS these tests: install acpica-tools (CI does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{build_acpi_tables, AcpiConfig, AcpiTables};

const INSTALL_HINT: &str =
    "ACPICA tool not found: install acpica-tools (apt-get install acpica-tools)";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-acpi-iasl-{}-{test}", std::process::id()));
        // A leftover from an earlier run with the same pid is stale.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `tool args` in `dir`; returns stdout and stderr. Panics when the
/// tool is missing or fails.
fn run(tool: &str, dir: &Path, args: &[&str]) -> String {
    let out = match Command::new(tool).args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{tool}: {INSTALL_HINT}"),
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn iasl(dir: &Path, args: &[&str]) -> String {
    run("iasl", dir, args)
}

/// Loads `dsdt` in acpiexec and runs `commands` (debugger syntax);
/// returns the output after checking that every evaluation succeeded.
fn acpiexec(test: &str, dsdt: &[u8], commands: &[&str]) -> String {
    let scratch = Scratch::new(test);
    fs::write(scratch.0.join("dsdt.dat"), dsdt).expect("write DSDT");
    let batch = commands.join("; ");
    let out = run("acpiexec", &scratch.0, &["-b", &batch, "dsdt.dat"]);
    for bad in ["failed with status", "AE_", "Error", "Exception", "Warning"] {
        assert!(!out.contains(bad), "acpiexec: {bad}:\n{out}");
    }
    assert_eq!(
        out.matches("Evaluating ").count(),
        commands.len(),
        "acpiexec did not run every command:\n{out}"
    );
    out
}

/// Disassembles `name`.dat; returns the ASL text after checking that iasl
/// complained about nothing.
fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let dat = format!("{name}.dat");
    fs::write(dir.join(&dat), bytes).expect("write table");
    let log = iasl(dir, &["-d", &dat]);
    for bad in [
        "Error",
        "Warning",
        "Invalid",
        "not contain a valid",
        "too long",
    ] {
        assert!(!log.contains(bad), "iasl -d {name}: {bad}:\n{log}");
    }
    let dsl = fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("iasl wrote no .dsl");
    for bad in ["****", "Invalid", "Unknown"] {
        assert!(!dsl.contains(bad), "{name} disassembly has {bad:?}:\n{dsl}");
    }
    dsl
}

/// Compiles `name`.dsl back; checks for "0 Errors, 0 Warnings".
fn recompile(dir: &Path, name: &str) {
    let out = format!("{name}-recompiled");
    let log = iasl(dir, &["-p", &out, &format!("{name}.dsl")]);
    let summary = log
        .lines()
        .find(|l| l.starts_with("Compilation"))
        .unwrap_or_else(|| panic!("no compilation summary for {name}:\n{log}"));
    assert!(
        summary.starts_with("Compilation successful. 0 Errors, 0 Warnings"),
        "{name}: {summary}\n{log}"
    );
}

/// Disassembles and recompiles every SDT; returns (name, ASL) pairs.
fn check_all(test: &str, tables: &AcpiTables) -> Vec<(&'static str, String)> {
    let scratch = Scratch::new(test);
    tables
        .tables
        .iter()
        .filter(|t| t.name != "RSDP")
        .map(|t| {
            let name = t.name.to_lowercase();
            let dsl = disassemble(&scratch.0, &name, &t.bytes);
            recompile(&scratch.0, &name);
            (t.name, dsl)
        })
        .collect()
}

fn dsl_of<'a>(all: &'a [(&'static str, String)], name: &str) -> &'a str {
    &all.iter()
        .find(|(n, _)| *n == name)
        .expect("table checked")
        .1
}

fn build(boot: u32, max: u32) -> AcpiTables {
    build_acpi_tables(&AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
    })
    .expect("tables")
}

fn assert_has(text: &str, what: &str, needle: &str) {
    assert!(text.contains(needle), "{what} lacks {needle:?}");
}

#[test]
fn iasl_accepts_every_table_for_8_vcpus() {
    let all = check_all("max8", &build(2, 8));
    assert_eq!(all.len(), 4);

    let dsdt = dsl_of(&all, "DSDT");
    for needle in [
        "Name (_S5, Package (0x04)",
        "Device (_SB.COM1)",
        "Device (_SB.COM2)",
        "EisaId (\"PNP0501\")",
        "0x03F8,",
        "0x02F8,",
        "Device (_SB.GED)",
        "Name (_HID, \"ACPI0013\"",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n            {\n                0x00000005,",
        "OperationRegion (GDST, SystemMemory, 0xD0001000, 0x04)",
        "Method (_EVT, 1, Serialized)",
        "Local0 = GDAT",
        "\\_SB.CPUS.CSCN ()",
        "Device (_SB.CPUS)",
        "Name (_HID, \"ACPI0010\"",
        "Name (_CID, EisaId (\"PNP0A05\")",
        "OperationRegion (PRST, SystemMemory, 0xD0000000, 0x0C)",
        "CSEL,   32",
        "CSTS,   8",
        "CPEN,   1",
        "CEJF,   1",
        "Mutex (CPLK, 0x00)",
        "Method (CSTA, 1,",
        "Method (CEJ0, 1,",
        "Method (CTFY, 2,",
        "Method (CSCN, 0,",
        "While ((Local0 < 0x08))",
        "CTFY (Local0, One)",
        "CTFY (Local0, 0x03)",
        "Notify (C007, Arg1)",
        "Return (CSTA (0x07))",
        "CEJ0 (0x07)",
    ] {
        assert_has(dsdt, "DSDT", needle);
    }
    // Linux's GED driver fails its probe on any non-interrupt _CRS entry.
    assert!(
        !dsdt.contains("Memory32Fixed"),
        "GED _CRS must hold only its interrupt"
    );
    for id in 0..8 {
        assert_has(dsdt, "DSDT", &format!("Device (C00{id})"));
    }
    assert!(!dsdt.contains("Device (C008)"));
    assert_eq!(dsdt.matches("Name (_HID, \"ACPI0007\"").count(), 8);
    assert_eq!(dsdt.matches("Method (_EJ0, 1").count(), 7, "all but vCPU 0");
    let c000 = &dsdt[dsdt.find("Device (C000)").unwrap()..dsdt.find("Device (C001)").unwrap()];
    assert!(!c000.contains("_EJ0"));
    assert_has(
        c000,
        "C000",
        "0x00, 0x08, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00",
    );

    let madt = dsl_of(&all, "APIC");
    assert_has(madt, "MADT", "Revision : 05");
    assert_has(madt, "MADT", "Local Apic Address : FEE00000");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 8);
    assert_eq!(madt.matches("Processor Enabled : 1").count(), 2);
    assert_eq!(madt.matches("Runtime Online Capable : 1").count(), 6);
    assert_eq!(madt.matches("[I/O APIC]").count(), 1);
    assert_has(madt, "MADT", "Address : FEC00000");

    let fadt = dsl_of(&all, "FACP");
    for needle in [
        "Revision : 06",
        "FADT Minor Revision : 05",
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Value to cause reset : 01",
        "Address : 0000000000000604",
        "Address : 0000000000000600",
        "Address : 0000000000000601",
    ] {
        assert_has(fadt, "FADT", needle);
    }

    let xsdt = dsl_of(&all, "XSDT");
    assert_eq!(xsdt.matches("ACPI Table Address").count(), 2);
}

#[test]
fn iasl_accepts_every_table_for_300_vcpus() {
    let all = check_all("max300", &build(4, 300));
    let madt = dsl_of(&all, "APIC");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 255);
    assert_eq!(madt.matches("[Processor Local x2APIC]").count(), 45);
    assert_has(madt, "MADT", "Processor x2Apic ID : 0000012B");
    assert_has(madt, "MADT", "Processor UID : 0000012B");

    let dsdt = dsl_of(&all, "DSDT");
    assert_has(dsdt, "DSDT", "While ((Local0 < 0x012C))");
    assert_has(dsdt, "DSDT", "Device (C12B)");
    assert_has(dsdt, "DSDT", "Notify (C12B, Arg1)");
    assert_eq!(dsdt.matches("Name (_HID, \"ACPI0007\"").count(), 300);
    // The last vCPU's _MAT is its x2APIC entry with the enabled bit.
    let last = &dsdt[dsdt.find("Device (C12B)").unwrap()..];
    assert_has(
        last,
        "C12B",
        "0x09, 0x10, 0x00, 0x00, 0x2B, 0x01, 0x00, 0x00",
    );
}

#[test]
#[should_panic(expected = "apic")]
fn checker_catches_a_bad_checksum() {
    let mut madt = build(1, 2).get("APIC").expect("MADT").bytes.clone();
    madt[9] ^= 0xff;
    let scratch = Scratch::new("badsum");
    disassemble(&scratch.0, "apic", &madt);
}

#[test]
#[should_panic(expected = "iasl -d dsdt")]
fn checker_catches_bad_aml() {
    let mut dsdt = build(1, 2).get("DSDT").expect("DSDT").bytes.clone();
    // Corrupt the first name after the \_S5_ package (COM1's device path).
    let at = dsdt.windows(4).position(|w| w == b"COM1").expect("COM1");
    dsdt[at] = 0xfe;
    let scratch = Scratch::new("badaml");
    disassemble(&scratch.0, "dsdt", &dsdt);
}

#[test]
fn acpiexec_runs_the_hotplug_methods() {
    let dsdt = build(2, 8).get("DSDT").expect("DSDT").bytes.clone();
    let out = acpiexec(
        "exec8",
        &dsdt,
        &[
            "execute \\_SB.GED._EVT 5",
            "execute \\_SB.CPUS.CSCN",
            "execute \\_SB.CPUS.C000._STA",
            "execute \\_SB.CPUS.C007._STA",
            "execute \\_SB.CPUS.C007._MAT",
            "execute \\_SB.CPUS.C007._EJ0 1",
            "execute \\_SB.CPUS.CTFY 5 1",
            "execute \\_SB.CPUS.CTFY 7 3",
            "execute \\_S5",
        ],
    );
    // Plain-memory regions read 0: nothing present, nothing to notify
    // during the scan; CTFY notifies exactly its target.
    assert_eq!(out.matches("Received a System Notify").count(), 2, "{out}");
    assert_has(&out, "acpiexec", "Notify on [C005]");
    assert_has(&out, "acpiexec", "Value 0x01 (Device Check)");
    assert_has(&out, "acpiexec", "Notify on [C007]");
    assert_has(&out, "acpiexec", "Value 0x03 (Eject Request)");
    assert_has(&out, "acpiexec", "0000: 00 08 07 07 01 00 00 00");
    assert_has(&out, "acpiexec", "[Integer] = 0000000000000005");
}

#[test]
fn acpiexec_scans_300_vcpus() {
    let dsdt = build(4, 300).get("DSDT").expect("DSDT").bytes.clone();
    let out = acpiexec(
        "exec300",
        &dsdt,
        &[
            "execute \\_SB.CPUS.CSCN",
            "execute \\_SB.CPUS.CTFY 299 3",
            "execute \\_SB.CPUS.C12B._MAT",
        ],
    );
    assert_has(&out, "acpiexec", "Notify on [C12B]");
    assert_has(
        &out,
        "acpiexec",
        "0000: 09 10 00 00 2B 01 00 00 01 00 00 00 2B 01 00 00",
    );
}
