//! ACPI tables for a hardware-reduced x86 guest whose vCPUs come and go.
//!
//! [`build_acpi_tables`] produces the tables without touching guest memory
//! (so they are unit-tested, and checked with `iasl`); [`create_acpi_tables`]
//! writes them into the ACPI area (`layout::ACPI_START..ACPI_END`, the BIOS
//! read-only area that Linux scans for the RSDP) and returns the RSDP's
//! address for `boot_params.acpi_rsdp_addr`.
//!
//! Placement, each table 16-byte aligned:
//! RSDP (at `ACPI_START`) -> XSDT -> { FADT -> DSDT, MADT }.
//!
//! - `tables`: RSDP, XSDT, the hardware-reduced FADT (power off through
//!   `\_S5_` and the sleep registers, reboot through the reset register;
//!   see `devices::power`).
//! - `madt`: one processor entry per possible vCPU, enabled or online
//!   capable.
//! - `dsdt` and `cpu_aml`: `\_S5_`, COM1/COM2, the Generic Event Device
//!   (`devices::ged`) and the processor container driving the CPU hotplug
//!   block (`devices::cpu_hotplug`).

mod cpu_aml;
mod dsdt;
#[cfg(test)]
mod iasl_tests;
mod madt;
mod tables;

use log::info;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout;

/// OEM ID of every table.
const OEM_ID: [u8; 6] = *b"VCPUHP";
/// Alignment of every table in guest memory (the RSDP needs 16).
const TABLE_ALIGN: u64 = 16;
/// The largest `max_vcpus` the AML can name (`C000`..`CFFF`).
pub const MAX_ACPI_VCPUS: u32 = cpu_aml::MAX_NAMED_VCPUS;

/// The OEM table ID of table `signature`: "VCPU" + signature.
fn oem_table_id(signature: [u8; 4]) -> [u8; 8] {
    let mut id = *b"VCPU    ";
    id[4..].copy_from_slice(&signature);
    id
}

/// Narrows a layout address the tables store in 32 bits; used in constant
/// contexts too, where a value that does not fit fails the build.
#[allow(clippy::cast_possible_truncation)] // checked by the assert
const fn low32(v: u64) -> u32 {
    assert!(
        v <= u32::MAX as u64,
        "address above 4 GiB in a 32-bit ACPI field"
    );
    v as u32
}

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs present at boot: ids `0..boot_vcpus` (enabled in the MADT).
    pub boot_vcpus: u32,
    /// Possible vCPUs: ids `0..max_vcpus` (the rest are online capable).
    pub max_vcpus: u32,
}

/// Errors building or writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// `boot_vcpus` must be at least 1 and at most `max_vcpus`.
    #[error("invalid vCPU counts: {boot} at boot, {max} at most")]
    InvalidVcpuCounts {
        /// Requested boot vCPUs.
        boot: u32,
        /// Requested maximum.
        max: u32,
    },
    /// More vCPUs than the AML can name.
    #[error("{max} vCPUs requested, the ACPI tables support at most {limit}")]
    TooManyVcpus {
        /// Requested maximum.
        max: u32,
        /// [`MAX_ACPI_VCPUS`].
        limit: u32,
    },
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {needed} bytes, the ACPI area has {available}")]
    TooLarge {
        /// Bytes from `ACPI_START` to the end of the last table.
        needed: u64,
        /// `ACPI_END - ACPI_START`.
        available: u64,
    },
    /// Guest memory does not cover the ACPI area.
    #[error("cannot write the {table} table at {address:#x}")]
    Write {
        /// Which table.
        table: &'static str,
        /// Its guest physical address.
        address: u64,
        /// Why.
        #[source]
        source: GuestMemoryError,
    },
}

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// "RSDP" or the table's signature.
    pub name: &'static str,
    /// Guest physical address.
    pub address: GuestAddress,
    /// The table, checksummed.
    pub bytes: Vec<u8>,
}

/// Every table, in guest-memory order (RSDP first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// RSDP, XSDT, FACP, APIC (MADT), DSDT.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The table called `name` ("RSDP", "XSDT", "FACP", "APIC", "DSDT").
    pub fn get(&self, name: &str) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Where the RSDP goes.
    pub fn rsdp_address(&self) -> GuestAddress {
        GuestAddress(layout::ACPI_START)
    }

    /// Bytes from `ACPI_START` to the end of the last table.
    pub fn total_len(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.address.0 + t.bytes.len() as u64)
            .max()
            .unwrap_or(layout::ACPI_START)
            - layout::ACPI_START
    }
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Builds every table for `cfg`, placed in the ACPI area, without guest
/// memory.
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
    } = *cfg;
    if boot == 0 || boot > max {
        return Err(AcpiError::InvalidVcpuCounts { boot, max });
    }
    if max > MAX_ACPI_VCPUS {
        return Err(AcpiError::TooManyVcpus {
            max,
            limit: MAX_ACPI_VCPUS,
        });
    }

    let madt = madt::build(boot, max);
    let dsdt = dsdt::build(max);
    let rsdp_at = layout::ACPI_START;
    let xsdt_at = align_up(rsdp_at + tables::rsdp_len() as u64);
    let fadt_at = align_up(xsdt_at + tables::xsdt_len(2) as u64);
    let madt_at = align_up(fadt_at + tables::fadt_len() as u64);
    let dsdt_at = align_up(madt_at + madt.len() as u64);
    let end = dsdt_at + dsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - layout::ACPI_START,
            available: layout::ACPI_END - layout::ACPI_START,
        });
    }

    let table = |name, at, bytes| AcpiTable {
        name,
        address: GuestAddress(at),
        bytes,
    };
    Ok(AcpiTables {
        tables: vec![
            table("RSDP", rsdp_at, tables::build_rsdp(xsdt_at)),
            table("XSDT", xsdt_at, tables::build_xsdt(&[fadt_at, madt_at])),
            table("FACP", fadt_at, tables::build_fadt(dsdt_at)),
            table("APIC", madt_at, madt),
            table("DSDT", dsdt_at, dsdt),
        ],
    })
}

/// Writes the tables for `cfg` into guest memory; returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_acpi_tables(cfg)?;
    for t in &tables.tables {
        mem.write_slice(&t.bytes, t.address)
            .map_err(|source| AcpiError::Write {
                table: t.name,
                address: t.address.0,
                source,
            })?;
    }
    info!(
        "ACPI tables: {} bytes for {} boot / {} possible vCPUs",
        tables.total_len(),
        cfg.boot_vcpus,
        cfg.max_vcpus
    );
    Ok(tables.rsdp_address())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether `bytes` sum to zero (mod 256).
    pub(crate) fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn cfg(boot: u32, max: u32) -> AcpiConfig {
        AcpiConfig {
            boot_vcpus: boot,
            max_vcpus: max,
        }
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn tables_are_placed_in_order_and_linked() {
        let t = build_acpi_tables(&cfg(2, 8)).unwrap();
        let names: Vec<_> = t.tables.iter().map(|t| t.name).collect();
        assert_eq!(names, ["RSDP", "XSDT", "FACP", "APIC", "DSDT"]);
        let mut end = layout::ACPI_START;
        for table in &t.tables {
            assert_eq!(table.address.0 % TABLE_ALIGN, 0, "{}", table.name);
            assert!(table.address.0 >= end, "{} overlaps", table.name);
            end = table.address.0 + table.bytes.len() as u64;
            assert!(checksum_ok(&table.bytes), "{} checksum", table.name);
            if table.name != "RSDP" {
                let len = u32::from_le_bytes(table.bytes[4..8].try_into().unwrap());
                assert_eq!(len as usize, table.bytes.len(), "{} length", table.name);
                assert_eq!(&table.bytes[0..4], table.name.as_bytes());
            }
        }
        assert!(end <= layout::ACPI_END);
        assert_eq!(t.rsdp_address(), GuestAddress(layout::ACPI_START));
        let addr = |n| t.get(n).unwrap().address.0;
        assert_eq!(u64_at(&t.get("RSDP").unwrap().bytes, 24), addr("XSDT"));
        let xsdt = &t.get("XSDT").unwrap().bytes;
        assert_eq!(
            (u64_at(xsdt, 36), u64_at(xsdt, 44)),
            (addr("FACP"), addr("APIC"))
        );
        assert_eq!(u64_at(&t.get("FACP").unwrap().bytes, 140), addr("DSDT"));
    }

    #[test]
    fn invalid_counts_are_refused() {
        for (boot, max) in [(0, 4), (5, 4), (0, 0)] {
            assert!(matches!(
                build_acpi_tables(&cfg(boot, max)),
                Err(AcpiError::InvalidVcpuCounts { .. })
            ));
        }
        assert!(matches!(
            build_acpi_tables(&cfg(1, MAX_ACPI_VCPUS + 1)),
            Err(AcpiError::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn too_many_vcpus_for_the_area_is_a_clear_error() {
        let err = build_acpi_tables(&cfg(1, MAX_ACPI_VCPUS)).unwrap_err();
        let AcpiError::TooLarge { needed, available } = err else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(available, 0x2_0000);
        assert!(needed > available);
        assert!(err.to_string().contains("ACPI tables need"));
    }

    #[test]
    fn sizes_for_report() {
        for max in [8, 256, 1024] {
            let t = build_acpi_tables(&cfg(1, max)).unwrap();
            let sizes: Vec<_> = t.tables.iter().map(|t| (t.name, t.bytes.len())).collect();
            println!("max={max}: total {} bytes, {sizes:?}", t.total_len());
        }
    }

    #[test]
    fn up_to_1024_vcpus_fit() {
        let fits = |max| build_acpi_tables(&cfg(1, max)).is_ok();
        // Binary search for the largest max_vcpus that fits.
        let (mut lo, mut hi) = (1024, MAX_ACPI_VCPUS);
        assert!(fits(lo) && !fits(hi));
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        println!("largest max_vcpus that fits: {lo}");
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rsdp = create_acpi_tables(&mem, &cfg(2, 8)).unwrap();
        assert_eq!(rsdp, GuestAddress(0xe_0000));
        let t = build_acpi_tables(&cfg(2, 8)).unwrap();
        for table in &t.tables {
            let mut back = vec![0u8; table.bytes.len()];
            mem.read_slice(&mut back, table.address).unwrap();
            assert_eq!(back, table.bytes, "{}", table.name);
        }
    }

    #[test]
    fn memory_without_the_acpi_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let err = create_acpi_tables(&mem, &cfg(1, 1)).unwrap_err();
        assert!(
            matches!(err, AcpiError::Write { table: "RSDP", .. }),
            "{err:?}"
        );
    }
}
