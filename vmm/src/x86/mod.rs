//! x86_64 CPU state builders: CPUID, MSRs, registers, page tables, LAPIC.
//!
//! The builders work on plain kvm-bindings structures so they are unit
//! tested without /dev/kvm; the few functions that apply them take a
//! `VcpuFd`.

pub mod cpuid;
pub mod msrs;
pub mod regs;
