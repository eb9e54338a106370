//! API types shared by the VMM, its client and the guest agent (placeholder).
#![forbid(unsafe_code)]
