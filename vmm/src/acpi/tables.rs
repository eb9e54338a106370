//! The fixed-size tables: RSDP, XSDT and the hardware-reduced FADT.
//!
//! The FADT is revision 6.5 (Linux honours the MADT's "online capable" flag
//! from FADT 6.3 on) with the HW_REDUCED_ACPI flag: no PM timer, no SCI, no
//! GPE blocks, no FACS. It points at the I/O-port sleep control, sleep
//! status and reset registers of `devices::power`, which is all Linux needs
//! to power off through `\_S5_` and to reboot through the reset register.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::{oem_table_id, OEM_ID};
use crate::layout;

/// IA-PC boot architecture flag: do not probe for VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: no MSI.
const IAPC_MSI_NOT_PRESENT: u16 = 1 << 3;
/// IA-PC boot architecture flag: do not touch PCIe ASPM.
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// FADT "hypervisor vendor identity".
const HYPERVISOR_VENDOR: [u8; 8] = *b"VCPUHPVM";

/// Length of the RSDP (ACPI 2.0+).
pub(super) fn rsdp_len() -> usize {
    Rsdp::len()
}

/// Length of the FADT.
pub(super) fn fadt_len() -> usize {
    FADT::len()
}

/// Length of an XSDT with `entries` pointers.
pub(super) fn xsdt_len(entries: usize) -> usize {
    36 + 8 * entries
}

fn io_register_8bit(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The RSDP (revision 2) pointing at the XSDT.
pub(super) fn build_rsdp(xsdt: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(rsdp_len());
    Rsdp::new(OEM_ID, xsdt).to_aml_bytes(&mut out);
    out
}

/// The XSDT listing `tables`.
pub(super) fn build_xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(*b"XSDT"), 1);
    for &t in tables {
        xsdt.add_entry(t);
    }
    let mut out = Vec::with_capacity(xsdt_len(tables.len()));
    xsdt.to_aml_bytes(&mut out);
    out
}

/// The hardware-reduced FADT pointing at the DSDT.
pub(super) fn build_fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(*b"FACP"), 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons (there are none in hardware-reduced ACPI).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_register_8bit(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register_8bit(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register_8bit(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let mut out = Vec::with_capacity(fadt_len());
    fadt.finalize().to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::checksum_ok;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// A GAS at `at`: (space, bit width, bit offset, access size, address).
    fn gas_at(b: &[u8], at: usize) -> (u8, u8, u8, u8, u64) {
        (b[at], b[at + 1], b[at + 2], b[at + 3], u64_at(b, at + 4))
    }

    #[test]
    fn fadt_is_hardware_reduced_revision_6_5() {
        let f = build_fadt(0xe_1000);
        assert!(checksum_ok(&f));
        assert_eq!(&f[0..4], b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(u32_at(&f, 4), 276);
        assert_eq!((f[8], f[131]), (6, 5), "major, minor revision");
        let flags = u32_at(&f, 112);
        assert_eq!(flags, 1 << 20 | 1 << 10 | 1 << 5 | 1 << 4);
        // No FACS, no SCI, no PM blocks, no PM timer, no GPEs.
        assert_eq!(u32_at(&f, 36), 0, "FIRMWARE_CTRL");
        assert_eq!(u64_at(&f, 132), 0, "X_FIRMWARE_CTRL");
        assert_eq!(u16_at(&f, 46), 0, "SCI_INT");
        assert!(
            f[56..92].iter().all(|&b| b == 0),
            "PM1/PM2/PM_TMR/GPE blocks"
        );
        assert!(f[148..244].iter().all(|&b| b == 0), "X_ PM/GPE blocks");
        // DSDT through X_DSDT only.
        assert_eq!(u32_at(&f, 40), 0);
        assert_eq!(u64_at(&f, 140), 0xe_1000);
        assert_eq!(u16_at(&f, 109), 0b11100, "IAPC_BOOT_ARCH");
    }

    #[test]
    fn fadt_registers_are_the_power_device_ports() {
        let f = build_fadt(0);
        assert_eq!(gas_at(&f, 116), (1, 8, 0, 1, 0x604), "RESET_REG");
        assert_eq!(f[128], layout::ACPI_RESET_VALUE);
        assert_eq!(gas_at(&f, 244), (1, 8, 0, 1, 0x600), "SLEEP_CONTROL_REG");
        assert_eq!(gas_at(&f, 256), (1, 8, 0, 1, 0x601), "SLEEP_STATUS_REG");
        assert_eq!(&f[268..276], b"VCPUHPVM");
    }

    #[test]
    fn xsdt_lists_the_tables() {
        let x = build_xsdt(&[0xe_0100, 0xe_0200]);
        assert!(checksum_ok(&x));
        assert_eq!(&x[0..4], b"XSDT");
        assert_eq!(x.len(), xsdt_len(2));
        assert_eq!(u32_at(&x, 4) as usize, x.len());
        assert_eq!(u64_at(&x, 36), 0xe_0100);
        assert_eq!(u64_at(&x, 44), 0xe_0200);
    }

    #[test]
    fn rsdp_is_revision_2_with_both_checksums() {
        let r = build_rsdp(0xe_0040);
        assert_eq!(r.len(), 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(r[15], 2, "revision");
        assert!(checksum_ok(&r[..20]), "ACPI 1.0 checksum");
        assert!(checksum_ok(&r), "extended checksum");
        assert_eq!(u32_at(&r, 16), 0, "no RSDT");
        assert_eq!(u32_at(&r, 20), 36, "length");
        assert_eq!(u64_at(&r, 24), 0xe_0040);
    }
}
