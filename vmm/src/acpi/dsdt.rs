//! The DSDT: `\_S5_`, the two UARTs, the Generic Event Device and the
//! processor container.
//!
//! ```text
//! Name (\_S5_, Package () { 5, 0, 0, 0 })   // SLP_TYP the power device expects
//! Device (\_SB.COM1) { PNP0501, IO 0x3F8/8, Interrupt {4} }
//! Device (\_SB.COM2) { PNP0501, IO 0x2F8/8, Interrupt {3} }
//! Device (\_SB.GED_) {
//!   Name (_HID, "ACPI0013")
//!   Name (_CRS, { Interrupt (Consumer, Edge, ActiveHigh, Exclusive) {GED_GSI} })  // interrupts only: Linux rejects others
//!   OperationRegion (GDST, SystemMemory, GED_MMIO_BASE, 4)
//!   Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
//!   Method (_EVT, 1, Serialized) {
//!     Local0 = GDAT                               // read-and-clear
//!     If (Local0 & CPU_HOTPLUG) { \_SB.CPUS.CSCN () }
//!   }
//! }
//! ```
//!
//! The UARTs are declared the way firmware does (QEMU, Cloud Hypervisor and
//! Firecracker all do): in hardware-reduced mode Linux has no legacy PIC,
//! so ISA IRQs 3 and 4 only reach the 8250 driver through these `_CRS`
//! entries. The PNP driver takes over the legacy ports at the same I/O
//! base, so ttyS0/ttyS1 are not duplicated.

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Method, MethodCall, Name, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Store, IO, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::cpu_aml::{ProcessorContainer, SCAN_METHOD};
use super::{oem_table_id, OEM_ID};
use crate::devices::{ged, power};
use crate::layout;

/// DSDT revision 2: 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// Length of an SDT header.
const SDT_HEADER_LEN: u32 = 36;
/// Ports of a 16550 UART.
const UART_PORTS: u8 = 8;

/// The AML of `\_S5_`: power off with SLP_TYP [`power::S5_SLEEP_TYPE`].
fn s5(sink: &mut Vec<u8>) {
    let typ = power::S5_SLEEP_TYPE;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&typ, &ZERO, &ZERO, &ZERO]),
    )
    .to_aml_bytes(sink);
}

/// A 16550 UART at `port` on ISA IRQ `gsi`.
fn uart(sink: &mut Vec<u8>, path: &str, uid: u8, port: u16, gsi: u32) {
    let io = IO::new(port, port, 1, UART_PORTS);
    let irq = Interrupt::new(true, true, false, false, gsi);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    Device::new(
        path.into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// The Generic Event Device.
fn ged(sink: &mut Vec<u8>) {
    // Linux's GED driver walks _CRS and rejects anything but interrupts
    // ("unable to parse IRQ resource"): the register is reached through
    // the OperationRegion below, not through _CRS.
    let irq = Interrupt::new(true, true, false, false, layout::GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let base = layout::GED_MMIO_BASE;
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemMemory,
        &base,
        &ged::REGISTER_BLOCK_LEN,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &gdat);
    let cpu_bit = And::new(&ZERO, &Local(0), &ged::EVENT_CPU_HOTPLUG);
    let scan = MethodCall::new(SCAN_METHOD.into(), vec![]);
    let on_cpu = If::new(&cpu_bit, vec![&scan]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read_events, &on_cpu]);
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(sink);
}

/// The DSDT's AML body.
pub(super) fn aml(max_vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    s5(&mut body);
    uart(
        &mut body,
        "_SB_.COM1",
        1,
        layout::COM1_PORT,
        layout::COM1_GSI,
    );
    uart(
        &mut body,
        "_SB_.COM2",
        2,
        layout::COM2_PORT,
        layout::COM2_GSI,
    );
    ged(&mut body);
    ProcessorContainer { max_vcpus }.to_aml_bytes(&mut body);
    body
}

/// The whole DSDT.
pub(super) fn build(max_vcpus: u32) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(*b"DSDT"),
        1,
    );
    dsdt.append_slice(&aml(max_vcpus));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::checksum_ok;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn header_and_checksum() {
        let d = build(8);
        assert!(checksum_ok(&d));
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert_eq!(d[8], DSDT_REVISION);
    }

    #[test]
    fn s5_package_bytes() {
        let mut v = Vec::new();
        s5(&mut v);
        // NameOp "_S5_" PackageOp len=7 count=4 BytePrefix 5 Zero Zero Zero
        assert_eq!(
            v,
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]
        );
    }

    #[test]
    fn devices_are_declared() {
        let d = build(4);
        for name in [
            &b"COM1"[..],
            b"COM2",
            b"GED_",
            b"GDAT",
            b"_EVT",
            b"CPUS",
            b"ACPI0013",
            b"ACPI0010",
        ] {
            assert!(contains(&d, name), "{}", String::from_utf8_lossy(name));
        }
        // The scan method is called by its full path.
        assert!(contains(&d, b"\\/\x03_SB_CPUSCSCN"));
    }
}
