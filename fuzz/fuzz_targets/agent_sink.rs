//! The VMM's end of the agent channel (COM2 sink, mailbox, link):
//! `vmm::fuzzing::agent_sink`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::agent_sink(data));
