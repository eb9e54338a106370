//! The two futex operations the per-thread control word needs (Linux only).
//!
//! Both are process-private (`FUTEX_PRIVATE_FLAG`): the words live in this
//! process's heap and are never shared with another process.

use std::ptr;
use std::sync::atomic::AtomicU32;

/// Blocks the calling thread while `word` still holds `expected`.
///
/// Returns on a wake-up, a signal, a spurious wake-up, or at once if the
/// word no longer holds `expected`; callers re-check their condition.
pub(crate) fn wait(word: &AtomicU32, expected: u32) {
    // SAFETY: `word.as_ptr()` points to a live, aligned u32 for the whole
    // call (we hold a shared reference to it); FUTEX_WAIT only reads it and
    // the timeout pointer is null (wait without a time limit). Errors
    // (EAGAIN when the value changed, EINTR) are benign: the caller loops.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ptr::null::<libc::timespec>(),
        );
    }
}

/// Wakes every thread blocked in [`wait`] on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: `word.as_ptr()` points to a live, aligned u32; FUTEX_WAKE does
    // not access the memory, it only uses the address as a key. The return
    // value (the number of woken threads) is not needed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn wait_returns_at_once_when_value_differs() {
        let word = AtomicU32::new(1);
        wait(&word, 0);
    }

    #[test]
    fn wake_releases_a_waiter() {
        let word = Arc::new(AtomicU32::new(0));
        let waiter = {
            let word = Arc::clone(&word);
            std::thread::spawn(move || {
                while word.load(Ordering::Acquire) == 0 {
                    wait(&word, 0);
                }
            })
        };
        word.store(1, Ordering::Release);
        wake_all(&word);
        waiter.join().unwrap();
    }
}
