//! Small programs `testhost-init` runs inside the emulated host as jobs
//! that do not need the VMM: a KVM self-test and an echo server for the
//! API forward.

pub mod echo;
pub mod selftest;
