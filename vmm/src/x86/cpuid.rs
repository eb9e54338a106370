//! CPUID for every vCPU: KVM's supported set, with the vCPU's APIC ID
//! patched in and a topology sized for the *maximum* vCPU count, so that
//! CPUID APIC ID = KVM vCPU ID = MADT APIC ID for boot and hot-added vCPUs
//! alike. Topology: one socket, one thread per core, `max_vcpus` cores.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, HTT: the logical-processor count field is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Extended topology level types (leaf 0xB / 0x1F, ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` items (ceil(log2(count))).
pub fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Patches `entries` (KVM's supported CPUID) for vCPU `apic_id` of a VM of
/// at most `max_vcpus` vCPUs.
pub fn patch_entries(entries: &mut [kvm_cpuid_entry2], apic_id: u32, max_vcpus: u32) {
    let core_bits = id_bits(max_vcpus);
    let package_count = max_vcpus.clamp(1, 255);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (package_count << 16) | ((apic_id & 0xff) << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.edx |= LEAF1_EDX_HTT;
            }
            0x4 => {
                // Intel's deterministic cache leaf: EAX[31:26] = cores per package - 1.
                let cores = package_count.min(64) - 1;
                e.eax = (e.eax & 0x03ff_ffff) | (cores << 26);
                // EAX[25:14] = logical processors sharing this cache - 1:
                // each core has its own caches below the last level.
                e.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = max_vcpus & 0xffff;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index & 0xff;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
                let nc = package_count - 1;
                e.ecx = (e.ecx & !0xf0ff) | ((core_bits & 0xf) << 12) | (nc & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC ID; one thread per core; node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// KVM reports leaf 0xB with only the subleaves it knows; make sure the
/// three we describe exist (0: SMT, 1: core, 2: terminator).
fn ensure_topology_subleaves(cpuid: &mut CpuId) {
    for leaf in [0xb_u32, 0x1f] {
        if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
            continue;
        }
        for index in 0..3 {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == leaf && e.index == index);
            if !present {
                let entry = kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                // Failure only means the table is full; Linux then sees fewer levels.
                let _ = cpuid.push(entry);
            }
        }
    }
}

/// The CPUID of vCPU `apic_id`, derived from `base` (KVM's supported set).
pub fn for_vcpu(base: &CpuId, apic_id: u32, max_vcpus: u32) -> CpuId {
    let mut cpuid = base.clone();
    ensure_topology_subleaves(&mut cpuid);
    patch_entries(cpuid.as_mut_slice(), apic_id, max_vcpus);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        assert_eq!(id_bits(9), 4);
        assert_eq!(id_bits(256), 8);
    }

    #[test]
    fn apic_id_is_patched_in_every_topology_leaf() {
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x00ff_0800,
                ..Default::default()
            },
            entry(0xb, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap();
        for id in [0u32, 3, 7] {
            let c = for_vcpu(&base, id, 8);
            let l1 = find(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, id);
            assert_eq!(
                (l1.ebx >> 16) & 0xff,
                8,
                "logical processor count = max vCPUs"
            );
            assert_eq!(l1.ebx & 0xffff, 0x0800, "low half kept");
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            for sub in 0..3 {
                let b = find(&c, 0xb, sub);
                assert_eq!(b.edx, id);
                assert_eq!(b.ecx & 0xff, sub);
            }
            assert_eq!(find(&c, 0xb, 0).ecx >> 8, LEVEL_TYPE_SMT);
            assert_eq!(find(&c, 0xb, 1).ecx >> 8, LEVEL_TYPE_CORE);
            assert_eq!(find(&c, 0xb, 1).eax, 3);
            assert_eq!(find(&c, 0xb, 1).ebx, 8);
            assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0, "terminating level");
            assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 7);
            assert_eq!((find(&c, 0x8000_0008, 0).ecx >> 12) & 0xf, 3);
            assert_eq!(find(&c, 0x8000_001e, 0).eax, id);
        }
    }

    #[test]
    fn x2apic_ids_above_255_keep_the_full_id_in_leaf_b() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let c = for_vcpu(&base, 300, 512);
        assert_eq!(find(&c, 0xb, 0).edx, 300);
        assert_eq!(find(&c, 1, 0).ebx >> 24, 300 & 0xff);
        assert_eq!(find(&c, 0xb, 1).eax, 9);
    }

    #[test]
    fn missing_topology_leaf_is_not_invented() {
        let base = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        let c = for_vcpu(&base, 1, 4);
        assert!(!c.as_slice().iter().any(|e| e.function == 0xb));
    }
}
