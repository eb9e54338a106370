//! The MADT ("APIC"): one processor entry per *possible* vCPU, the IOAPIC.
//!
//! APIC ID = ACPI processor UID = vCPU id. Ids below 255 get a local APIC
//! entry (type 0), the others a local x2APIC entry (type 9), as the ACPI
//! spec asks. Boot vCPUs are enabled; the others are "online capable",
//! which Linux counts as hotpluggable ("Allowing N CPUs, M hotplug CPUs").
//! The same entries, with the enabled bit set, are the processors' `_MAT`.
//!
//! No interrupt source overrides: KVM's default GSI routing wires ISA IRQ n
//! to IOAPIC pin n (QEMU's IRQ0 -> GSI2 override only holds because QEMU
//! reroutes GSI 0 to pin 2), the UARTs and the GED are edge/active-high like
//! ISA defaults, and a hardware-reduced guest uses no PIT or legacy PIC.

use acpi_tables::sdt::Sdt;

use super::{low32, oem_table_id, OEM_ID};
use crate::layout;

/// ACPI 6.3 MADT revision: the first with the "online capable" flag.
const MADT_REVISION: u8 = 5;
const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_LOCAL_X2APIC: u8 = 9;
/// Length of the MADT header: SDT header, local APIC address, flags.
const HEADER_LEN: u32 = 44;
const LOCAL_APIC_LEN: u8 = 8;
const IO_APIC_LEN: u8 = 12;
const LOCAL_X2APIC_LEN: u8 = 16;
/// Smallest APIC ID that needs an x2APIC entry (255 is the xAPIC broadcast).
pub(super) const FIRST_X2APIC_ID: u32 = 255;
/// Processor flag: usable now.
pub(super) const FLAG_ENABLED: u32 = 1 << 0;
/// Processor flag: can be brought online later (hotplug).
pub(super) const FLAG_ONLINE_CAPABLE: u32 = 1 << 1;
/// The in-kernel IOAPIC's id.
const IO_APIC_ID: u8 = 0;

/// The processor entry of vCPU `id` with `flags`: local APIC below 255,
/// local x2APIC from 255 on.
pub(super) fn processor_entry(id: u32, flags: u32) -> Vec<u8> {
    match u8::try_from(id) {
        Ok(id8) if id < FIRST_X2APIC_ID => {
            let mut e = vec![TYPE_LOCAL_APIC, LOCAL_APIC_LEN, id8, id8];
            e.extend_from_slice(&flags.to_le_bytes());
            e
        }
        _ => {
            let mut e = vec![TYPE_LOCAL_X2APIC, LOCAL_X2APIC_LEN, 0, 0];
            e.extend_from_slice(&id.to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&id.to_le_bytes());
            e
        }
    }
}

/// Size of the processor entry of vCPU `id`.
pub(super) fn processor_entry_len(id: u32) -> usize {
    if id < FIRST_X2APIC_ID {
        usize::from(LOCAL_APIC_LEN)
    } else {
        usize::from(LOCAL_X2APIC_LEN)
    }
}

/// The MADT for `max_vcpus` possible vCPUs of which `0..boot_vcpus` boot.
pub(super) fn build(boot_vcpus: u32, max_vcpus: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        usize::from(IO_APIC_LEN) + (0..max_vcpus).map(processor_entry_len).sum::<usize>(),
    );
    for id in 0..max_vcpus {
        let flags = if id < boot_vcpus {
            FLAG_ENABLED
        } else {
            FLAG_ONLINE_CAPABLE
        };
        body.extend_from_slice(&processor_entry(id, flags));
    }
    body.extend_from_slice(&[TYPE_IO_APIC, IO_APIC_LEN, IO_APIC_ID, 0]);
    body.extend_from_slice(&low32(layout::IOAPIC_START).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base

    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        oem_table_id(*b"APIC"),
        1,
    );
    madt.write_u32(36, low32(layout::APIC_START));
    madt.write_u32(40, 0); // flags: no PC-AT dual 8259 setup to honour
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::checksum_ok;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// (type, bytes) of each entry after the header.
    fn entries(madt: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = HEADER_LEN as usize;
        while at < madt.len() {
            let len = usize::from(madt[at + 1]);
            assert!(len >= 2);
            out.push(&madt[at..at + len]);
            at += len;
        }
        assert_eq!(at, madt.len());
        out
    }

    #[test]
    fn boot2_max8_bytes() {
        let madt = build(2, 8);
        assert!(checksum_ok(&madt));
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(u32_at(&madt, 4) as usize, madt.len());
        assert_eq!(madt[8], MADT_REVISION);
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 0);
        assert_eq!(madt.len(), 44 + 8 * 8 + 12);
        let e = entries(&madt);
        assert_eq!(e.len(), 9);
        assert_eq!(e[0], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(e[1], &[0, 8, 1, 1, 1, 0, 0, 0]);
        for (id, entry) in e.iter().enumerate().take(8).skip(2) {
            let id = u8::try_from(id).unwrap();
            assert_eq!(*entry, &[0, 8, id, id, 2, 0, 0, 0]);
        }
        assert_eq!(e[8], &[1, 12, 0, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]);
    }

    #[test]
    fn x2apic_entries_from_255() {
        let madt = build(4, 300);
        assert!(checksum_ok(&madt));
        assert_eq!(madt.len(), 44 + 255 * 8 + 45 * 16 + 12);
        let e = entries(&madt);
        assert_eq!(e.len(), 301);
        assert_eq!(e[254], &[0, 8, 254, 254, 2, 0, 0, 0]);
        let x = e[255];
        assert_eq!(x[0], 9);
        assert_eq!(x[1], 16);
        assert_eq!(&x[2..4], &[0, 0]);
        assert_eq!(u32_at(x, 4), 255, "x2APIC id");
        assert_eq!(u32_at(x, 8), FLAG_ONLINE_CAPABLE);
        assert_eq!(u32_at(x, 12), 255, "uid");
        assert_eq!(u32_at(e[299], 4), 299);
        assert_eq!(u32_at(e[299], 12), 299);
        assert_eq!(e[300][0], TYPE_IO_APIC);
    }

    #[test]
    fn boot_vcpus_beyond_255_are_enabled_x2apic() {
        let madt = build(256, 256);
        let e = entries(&madt);
        assert_eq!(u32_at(e[255], 8), FLAG_ENABLED);
        assert!(e[..255].iter().all(|x| x[4] == 1));
    }

    #[test]
    fn mat_entries_are_enabled_madt_entries() {
        assert_eq!(
            processor_entry(3, FLAG_ENABLED),
            vec![0, 8, 3, 3, 1, 0, 0, 0]
        );
        let x = processor_entry(0x1234, FLAG_ENABLED);
        assert_eq!(x.len(), processor_entry_len(0x1234));
        assert_eq!(&x[..4], &[9, 16, 0, 0]);
        assert_eq!(u32_at(&x, 4), 0x1234);
        assert_eq!(u32_at(&x, 8), 1);
        assert_eq!(u32_at(&x, 12), 0x1234);
    }
}
