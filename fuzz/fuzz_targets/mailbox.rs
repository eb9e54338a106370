//! The mailbox ring, its doorbells and the inbound stream:
//! `agent_proto::fuzzing::mailbox`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_proto::fuzzing::mailbox(data));
