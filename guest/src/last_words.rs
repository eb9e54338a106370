//! The agent's last message to the VMM: [`GuestMessage::Fatal`], sent
//! when the agent fails (a panic in any of its threads, an error its loop
//! cannot recover from) just before it powers the guest off, so that the
//! VMM can tell an agent failure from a clean power-off.
//!
//! A panic can strike any thread while the event loop owns the channel, so
//! the line does not go through [`Channel`](crate::channel::Channel): the
//! loop [arms](arm) this module with a duplicate of the channel's
//! descriptor, and [`send`] writes the line there as plain UART bytes
//! (which the VMM reads in stream order, mailbox or not), then waits a
//! bounded time for the tty to transmit them. If the channel may hold half
//! a line ([`set_partial`]) a newline goes first, so the VMM drops that
//! half and still reads the fatal line whole. Only the first call sends.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_proto::agent::{encode, GuestMessage};

/// How long [`send`] waits for the tty to take and transmit the line.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// Longest reason sent (the rest is cut at a character boundary).
pub const MAX_REASON: usize = 1024;

static TARGET: Mutex<Option<OwnedFd>> = Mutex::new(None);
static PARTIAL: AtomicBool = AtomicBool::new(false);
static SENT: AtomicBool = AtomicBool::new(false);

/// From now on [`send`] writes to (a duplicate of) `fd`.
pub fn arm(fd: BorrowedFd<'_>) -> io::Result<()> {
    let dup = fd.try_clone_to_owned()?;
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(dup);
    Ok(())
}

/// Says whether the channel may have sent part of a line only (bytes
/// still queued after a flush).
pub fn set_partial(partial: bool) {
    PARTIAL.store(partial, Ordering::Relaxed);
}

/// `reason` cut to at most [`MAX_REASON`] bytes.
fn shorten(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// The bytes [`send`] writes.
fn line(reason: &str, partial: bool) -> String {
    let msg = encode(&GuestMessage::Fatal {
        reason: shorten(reason).to_owned(),
    });
    if partial {
        format!("\n{msg}")
    } else {
        msg
    }
}

/// Sends `fatal` with `reason`, once; true if it was written whole.
pub fn send(reason: &str) -> bool {
    if SENT.swap(true, Ordering::AcqRel) {
        return false;
    }
    let target = TARGET.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fd) = target.as_ref() else {
        return false;
    };
    let bytes = line(reason, PARTIAL.load(Ordering::Relaxed));
    let deadline = Instant::now() + DRAIN_LIMIT;
    let written = write_all(fd, bytes.as_bytes(), deadline);
    if written {
        drain(fd, deadline);
    }
    written
}

/// Writes `bytes` to the (non-blocking) `fd`, waiting for room until
/// `deadline`.
fn write_all(fd: &OwnedFd, mut bytes: &[u8], deadline: Instant) -> bool {
    while !bytes.is_empty() {
        // SAFETY: bytes is valid for reads of bytes.len() bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = bytes.get(n.unsigned_abs()..).unwrap_or_default();
            continue;
        }
        let err = io::Error::last_os_error();
        let retry = n == 0
            || matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
        if !retry || Instant::now() >= deadline {
            return false;
        }
        wait_writable(fd, deadline);
    }
    true
}

fn wait_writable(fd: &OwnedFd, deadline: Instant) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: pfd is one live pollfd for the call's duration.
    unsafe { libc::poll(&raw mut pfd, 1, ms) };
}

/// Waits until the tty (or socket) has transmitted its output queue, or
/// `deadline`.
fn drain(fd: &OwnedFd, deadline: Instant) {
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int to the pointer, which is live.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
        if rc < 0 || queued <= 0 || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::agent::decode;

    #[test]
    fn the_line_is_a_fatal_message_with_a_bounded_reason() {
        let l = line("panic: boom", false);
        let back: GuestMessage = decode(l.trim_end().as_bytes()).unwrap();
        assert_eq!(
            back,
            GuestMessage::Fatal {
                reason: "panic: boom".into()
            }
        );
        assert!(line("x", true).starts_with("\n{"), "a half line is ended");
        let long = "é".repeat(MAX_REASON);
        let l = line(&long, false);
        let GuestMessage::Fatal { reason } = decode(l.trim_end().as_bytes()).unwrap() else {
            panic!("{l}")
        };
        assert!(reason.len() <= MAX_REASON && reason.len() >= MAX_REASON - 1);
    }

    #[test]
    fn send_writes_once_to_the_armed_descriptor() {
        use std::io::Read;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        arm(std::os::fd::AsFd::as_fd(&a)).unwrap();
        drop(a);
        set_partial(false);
        assert!(send("agent loop: poll: EBADF"));
        assert!(!send("again"), "only the first call sends");
        *TARGET.lock().unwrap() = None;
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(
            got,
            "{\"v\":2,\"type\":\"fatal\",\"reason\":\"agent loop: poll: EBADF\"}\n"
        );
    }
}
