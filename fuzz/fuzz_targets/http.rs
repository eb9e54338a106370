//! Raw bytes from an API client through the real server and router:
//! `vmm::fuzzing::http`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::http(data));
