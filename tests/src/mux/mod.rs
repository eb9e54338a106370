//! API forwarding into the emulated host: Unix socket connections
//! multiplexed over one serial line.
//!
//! The harness listens on the user's socket path ([`Forwarder`], mode
//! 0600, at most [`MAX_CHANNELS`] channels at once, `503` beyond); each
//! accepted connection becomes a channel of the [`Mux`], whose link is the
//! outer QEMU's second serial port (a host Unix socket). Inside the
//! emulated host, `testhost-init` runs the connecting end of the same
//! [`Mux`] on `/dev/ttyS1` (raw mode) and connects every channel to the
//! VMM's API socket. [`codec`] is the frame format, without I/O.

pub mod codec;
mod endpoint;
mod forward;

pub use endpoint::{Connector, Guard, Mux, WINDOW};
pub use forward::{bind_private, remove_stale_socket, Forwarder, MAX_CHANNELS};
