//! AML for the processor container `\_SB_.CPUS` and its processors.
//!
//! ```text
//! Device (\_SB.CPUS) {                      // ACPI0010, _CID PNP0A05
//!   OperationRegion (PRST, SystemMemory, CPU_HOTPLUG_MMIO_BASE, 12)
//!   Field (PRST, DWordAcc, NoLock, Preserve)     { CSEL, 32 }
//!   Field (PRST, ByteAcc, NoLock, WriteAsZeros)  { Offset (4), CSTS, 8 }
//!   Field (PRST, ByteAcc, NoLock, WriteAsZeros)  { Offset (4), CPEN, 1, CINS, 1, CRMV, 1, CEJF, 1 }
//!   Mutex (CPLK, 0)
//!   Method (CSTA, 1) { lock; CSEL = Arg0; Local0 = CPEN ? 0xF : 0; unlock; Return (Local0) }
//!   Method (CEJ0, 1) { lock; CSEL = Arg0; CEJF = 1; unlock }
//!   Method (CTFY, 2) { If (Arg0 == 0) { Notify (C000, Arg1) } If (Arg0 == 1) ... }
//!   Method (CSCN, 0) {
//!     lock
//!     Local0 = 0
//!     While (Local0 < max_vcpus) {
//!       CSEL = Local0
//!       Local1 = CSTS                           // one read per vCPU
//!       If (Local1 & INSERTING) { CTFY (Local0, 1); CSTS = INSERTING }  // device check, ack
//!       If (Local1 & REMOVING)  { CTFY (Local0, 3); CSTS = REMOVING }   // eject request, ack
//!       Local0++
//!     }
//!     unlock
//!   }
//!   Device (C000) { _HID "ACPI0007", _UID 0, _STA -> CSTA (0), _MAT, _EJ0 -> CEJ0 (0) }
//!   ...
//! }
//! ```
//!
//! The scan costs two MMIO exits per possible vCPU and notifies only the
//! vCPUs whose inserting or removing bit is set. `Notify` needs a named
//! target, hence the `CTFY` If-chain (evaluated only for changed vCPUs).
//! Notifications are queued by the guest's ACPICA and handled after the
//! scan drops `CPLK`, so `_STA` and `_EJ0` (which take `CPLK`) never wait
//! on the scan for long. vCPU 0 has no `_EJ0`: it is never removable.

use acpi_tables::aml::{
    Acquire, Add, And, Arg, BufferData, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local, Method, MethodCall, Mutex,
    Name, Notify, OpRegion, OpRegionSpace, Path, Release, Return, Store, While, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::madt::{processor_entry, FLAG_ENABLED};
use crate::devices::cpu_hotplug::{
    CONTROL_EJECT, REGISTER_BLOCK_LEN, STATUS_ENABLED, STATUS_INSERTING, STATUS_REMOVING,
};
use crate::layout;

/// Full path of the scan method the GED's `_EVT` calls.
pub(super) const SCAN_METHOD: &str = "\\_SB_.CPUS.CSCN";
/// Notify code: device check (a CPU appeared).
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notify code: eject request (the platform wants the CPU removed).
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// `Acquire` timeout meaning "wait forever".
const WAIT_FOREVER: u16 = 0xffff;
/// The largest vCPU count whose device names (`C000`..`CFFF`) fit.
pub(super) const MAX_NAMED_VCPUS: u32 = 0x1000;

// The bit fields CPEN, CINS, CRMV, CEJF are bits 0..3 of the status byte.
const _: () = assert!(
    STATUS_ENABLED == 1 << 0
        && STATUS_INSERTING == 1 << 1
        && STATUS_REMOVING == 1 << 2
        && CONTROL_EJECT == 1 << 3
);

/// The AML name of vCPU `id`'s device (`id` below [`MAX_NAMED_VCPUS`]).
pub(super) fn cpu_device_name(id: u32) -> String {
    format!("C{id:03X}")
}

/// `\_SB_.CPUS` for `max_vcpus` possible vCPUs.
pub(super) struct ProcessorContainer {
    /// Number of processor devices (ids `0..max_vcpus`).
    pub(super) max_vcpus: u32,
}

impl Aml for ProcessorContainer {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new("_HID".into(), &"ACPI0010");
        let cid = Name::new("_CID".into(), &EISAName::new("PNP0A05"));
        let base = layout::CPU_HOTPLUG_MMIO_BASE;
        let region = OpRegion::new(
            "PRST".into(),
            OpRegionSpace::SystemMemory,
            &base,
            &REGISTER_BLOCK_LEN,
        );
        let selector = Field::new(
            "PRST".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::Preserve,
            vec![FieldEntry::Named(*b"CSEL", 32)],
        );
        let status_byte = Field::new(
            "PRST".into(),
            FieldAccessType::Byte,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![FieldEntry::Reserved(32), FieldEntry::Named(*b"CSTS", 8)],
        );
        let status_bits = Field::new(
            "PRST".into(),
            FieldAccessType::Byte,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Reserved(32),
                FieldEntry::Named(*b"CPEN", 1),
                FieldEntry::Named(*b"CINS", 1),
                FieldEntry::Named(*b"CRMV", 1),
                FieldEntry::Named(*b"CEJF", 1),
            ],
        );
        let lock = Mutex::new("CPLK".into(), 0);
        let methods = ContainerMethods {
            max_vcpus: self.max_vcpus,
        };
        let cpus: Vec<CpuDevice> = (0..self.max_vcpus).map(|id| CpuDevice { id }).collect();

        let mut children: Vec<&dyn Aml> = vec![
            &hid,
            &cid,
            &region,
            &selector,
            &status_byte,
            &status_bits,
            &lock,
            &methods,
        ];
        children.extend(cpus.iter().map(|c| c as &dyn Aml));
        Device::new("_SB_.CPUS".into(), children).to_aml_bytes(sink);
    }
}

/// CSTA, CEJ0, CTFY and CSCN.
struct ContainerMethods {
    max_vcpus: u32,
}

impl Aml for ContainerMethods {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let csel = Path::new("CSEL");
        let csts = Path::new("CSTS");

        // CSTA (id): 0xF when present, else 0.
        let acquire = Acquire::new("CPLK".into(), WAIT_FOREVER);
        let release = Release::new("CPLK".into());
        let select_arg = Store::new(&csel, &Arg(0));
        let clear = Store::new(&Local(0), &ZERO);
        let cpen = Path::new("CPEN");
        let present = Equal::new(&cpen, &ONE);
        let sta_on = Store::new(&Local(0), &0xfu8);
        let if_present = If::new(&present, vec![&sta_on]);
        let ret = Return::new(&Local(0));
        Method::new(
            "CSTA".into(),
            1,
            false,
            vec![&acquire, &select_arg, &clear, &if_present, &release, &ret],
        )
        .to_aml_bytes(sink);

        // CEJ0 (id): set the eject bit of the selected vCPU.
        let cejf = Path::new("CEJF");
        let eject = Store::new(&cejf, &ONE);
        Method::new(
            "CEJ0".into(),
            1,
            false,
            vec![&acquire, &select_arg, &eject, &release],
        )
        .to_aml_bytes(sink);

        // CTFY (id, code): Notify (C<id>, code).
        NotifyMethod {
            max_vcpus: self.max_vcpus,
        }
        .to_aml_bytes(sink);

        // CSCN: notify and acknowledge every vCPU with a pending event.
        let select_local = Store::new(&csel, &Local(0));
        let read_status = Store::new(&Local(1), &csts);
        let inserting = And::new(&ZERO, &Local(1), &STATUS_INSERTING);
        let notify_check = MethodCall::new("CTFY".into(), vec![&Local(0), &NOTIFY_DEVICE_CHECK]);
        let ack_insert = Store::new(&csts, &STATUS_INSERTING);
        let on_insert = If::new(&inserting, vec![&notify_check, &ack_insert]);
        let removing = And::new(&ZERO, &Local(1), &STATUS_REMOVING);
        let notify_eject = MethodCall::new("CTFY".into(), vec![&Local(0), &NOTIFY_EJECT_REQUEST]);
        let ack_remove = Store::new(&csts, &STATUS_REMOVING);
        let on_remove = If::new(&removing, vec![&notify_eject, &ack_remove]);
        let next = Add::new(&Local(0), &Local(0), &ONE);
        let more = LessThan::new(&Local(0), &self.max_vcpus);
        let walk = While::new(
            &more,
            vec![&select_local, &read_status, &on_insert, &on_remove, &next],
        );
        Method::new(
            "CSCN".into(),
            0,
            false,
            vec![&acquire, &clear, &walk, &release],
        )
        .to_aml_bytes(sink);
    }
}

/// CTFY: `If (Arg0 == id) { Notify (C<id>, Arg1) }` for every vCPU.
struct NotifyMethod {
    max_vcpus: u32,
}

impl Aml for NotifyMethod {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let ids: Vec<u32> = (0..self.max_vcpus).collect();
        let targets: Vec<Path> = ids
            .iter()
            .map(|&id| Path::new(&cpu_device_name(id)))
            .collect();
        let matches: Vec<Equal> = ids.iter().map(|id| Equal::new(&Arg(0), id)).collect();
        let notifies: Vec<Notify> = targets.iter().map(|t| Notify::new(t, &Arg(1))).collect();
        let ifs: Vec<If> = matches
            .iter()
            .zip(&notifies)
            .map(|(m, n)| If::new(m, vec![n]))
            .collect();
        let body: Vec<&dyn Aml> = ifs.iter().map(|i| i as &dyn Aml).collect();
        Method::new("CTFY".into(), 2, false, body).to_aml_bytes(sink);
    }
}

/// One processor device.
struct CpuDevice {
    id: u32,
}

impl Aml for CpuDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let id = self.id;
        let hid = Name::new("_HID".into(), &"ACPI0007");
        let uid = Name::new("_UID".into(), &id);
        let csta = MethodCall::new("CSTA".into(), vec![&id]);
        let ret = Return::new(&csta);
        let sta = Method::new("_STA".into(), 0, false, vec![&ret]);
        let mat = Name::new(
            "_MAT".into(),
            &BufferData::new(processor_entry(id, FLAG_ENABLED)),
        );
        let cej0 = MethodCall::new("CEJ0".into(), vec![&id]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&cej0]);
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &sta, &mat];
        if id != 0 {
            children.push(&ej0);
        }
        Device::new(cpu_device_name(id).as_str().into(), children).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aml(max: u32) -> Vec<u8> {
        let mut v = Vec::new();
        ProcessorContainer { max_vcpus: max }.to_aml_bytes(&mut v);
        v
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn names_are_three_hex_digits() {
        assert_eq!(cpu_device_name(0), "C000");
        assert_eq!(cpu_device_name(255), "C0FF");
        assert_eq!(cpu_device_name(MAX_NAMED_VCPUS - 1), "CFFF");
    }

    #[test]
    fn one_device_per_possible_vcpu() {
        let a = aml(8);
        for id in 0..8 {
            assert!(contains(&a, cpu_device_name(id).as_bytes()));
        }
        assert!(!contains(&a, b"C008"));
        for name in [
            &b"CSTA"[..],
            b"CEJ0",
            b"CTFY",
            b"CSCN",
            b"CPLK",
            b"PRST",
            b"ACPI0007",
        ] {
            assert!(contains(&a, name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn vcpu0_has_no_ej0() {
        let mut d0 = Vec::new();
        CpuDevice { id: 0 }.to_aml_bytes(&mut d0);
        assert!(!contains(&d0, b"_EJ0"));
        let mut d1 = Vec::new();
        CpuDevice { id: 1 }.to_aml_bytes(&mut d1);
        assert!(contains(&d1, b"_EJ0"));
    }

    #[test]
    fn mat_carries_the_enabled_entry() {
        let mut d = Vec::new();
        CpuDevice { id: 300 }.to_aml_bytes(&mut d);
        assert!(contains(&d, &processor_entry(300, FLAG_ENABLED)));
    }

    #[test]
    fn size_grows_linearly() {
        let per_cpu = (aml(256).len() - aml(8).len()) / 248;
        assert!(per_cpu < 100, "{per_cpu} bytes per vCPU");
    }
}
