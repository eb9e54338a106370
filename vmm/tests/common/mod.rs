//! Shared helpers of the `vmm` binary's integration tests.

// Each test crate includes this module and uses a part of it.
#![allow(dead_code)]

pub mod tiny_kernel;
