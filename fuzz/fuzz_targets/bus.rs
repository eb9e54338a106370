//! The buses and every device model, with the VMM's hotplug calls:
//! `vmm::fuzzing::bus`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::bus(data));
