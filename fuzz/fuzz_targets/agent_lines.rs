//! Lines from the guest agent (or the VMM): `agent_proto::fuzzing::agent_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_proto::fuzzing::agent_lines(data));
