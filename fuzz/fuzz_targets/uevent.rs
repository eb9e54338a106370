//! Kernel uevent datagrams through the agent's parser:
//! `guest::fuzzing::uevent`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| guest::fuzzing::uevent(data));
