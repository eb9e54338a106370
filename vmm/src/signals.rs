//! SIGINT and SIGTERM: the handler writes an eventfd the event loop
//! watches (async-signal-safe: an atomic store and a `write(2)`).
//!
//! [`install`] is the first thing `main` does, before any thread or VM
//! exists, so a signal during start-up is seen: `main` checks
//! [`TerminateSignal::received`] between start-up steps, and the event
//! loop finds the eventfd readable on its first turn. The eventfd lives in
//! a static for the life of the process (the handler may run at any time);
//! the event loop gets a duplicate ([`TerminateSignal::eventfd`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;

/// Errors installing the handlers.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The eventfd could not be created or duplicated.
    #[error("cannot create the termination eventfd")]
    EventFd(#[source] std::io::Error),
    /// The signals could not be unblocked.
    #[error("cannot unblock SIGINT and SIGTERM")]
    Unblock(#[source] std::io::Error),
    /// sigaction failed.
    #[error("cannot install the handler of signal {0}")]
    Sigaction(libc::c_int, #[source] std::io::Error),
}

/// The signals that end the VMM (exit status 4).
pub const TERMINATE_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The eventfd the handler writes, -1 before [`install`].
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// The last terminating signal received, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Owns the eventfd for the life of the process.
static EVENTFD: OnceLock<EventFd> = OnceLock::new();

/// Writes 1 to `fd` with the async-signal-safe `write(2)`.
fn write_one(fd: libc::c_int) {
    let one: u64 = 1;
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local of
    // 8 bytes, as an eventfd wants; `fd` is the eventfd kept open in
    // EVENTFD for the life of the process.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

extern "C" fn on_terminate(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        write_one(fd);
    }
}

/// Installs `on_terminate` for `sig`, restarting interrupted system calls.
fn set_handler(sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
    // handler only does async-signal-safe work (an atomic store, write(2));
    // sigaction's pointers are to live locals and its result is checked.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_terminate as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART;
        libc::sigaction(sig, &act, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unblocks `sigs` in the calling thread (and so in the threads it spawns
/// afterwards): a parent may have left them blocked across exec.
fn unblock(sigs: &[libc::c_int]) -> std::io::Result<()> {
    // SAFETY: the set is initialised by sigemptyset before sigaddset and
    // pthread_sigmask read it; the old mask is not wanted (null).
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in sigs {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// The installed SIGINT/SIGTERM handling.
#[derive(Debug, Clone, Copy)]
pub struct TerminateSignal {
    _installed: (),
}

/// Installs the SIGINT and SIGTERM handlers (idempotent) and unblocks
/// both signals in the calling thread. Call it before spawning threads.
pub fn install() -> Result<TerminateSignal, SignalError> {
    let evt = match EVENTFD.get() {
        Some(evt) => evt,
        None => {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SignalError::EventFd)?;
            EVENTFD.get_or_init(|| evt)
        }
    };
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in TERMINATE_SIGNALS {
        set_handler(sig).map_err(|e| SignalError::Sigaction(sig, e))?;
    }
    unblock(&TERMINATE_SIGNALS).map_err(SignalError::Unblock)?;
    Ok(TerminateSignal { _installed: () })
}

impl TerminateSignal {
    /// The signal received so far, if any (SIGINT or SIGTERM).
    pub fn received(&self) -> Option<libc::c_int> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig),
        }
    }

    /// A duplicate of the eventfd the handler writes, for the event loop
    /// (readable once a signal came, also one that came before).
    pub fn eventfd(&self) -> Result<EventFd, SignalError> {
        EVENTFD
            .get()
            .ok_or_else(|| SignalError::EventFd(std::io::Error::other("not installed")))?
            .try_clone()
            .map_err(SignalError::EventFd)
    }
}

/// The name of a terminating signal, for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_is_seen_through_the_flag_and_the_eventfd() {
        let signals = install().unwrap();
        let evt = signals.eventfd().unwrap();
        // Raise it on this thread: the handler runs before raise returns.
        // SAFETY: raise(3) with a signal whose handler is installed above.
        let rc = unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(rc, 0);
        assert_eq!(signals.received(), Some(libc::SIGTERM));
        assert!(evt.read().unwrap() >= 1);
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
