//! sysfs and /proc/cpuinfo text through the agent's readers, and its id
//! map: `guest::fuzzing::sysfs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guest::fuzzing::sysfs(data));
