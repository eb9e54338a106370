//! The API thread (`vmm_api`, `api_server`): hyper on a current-thread
//! tokio runtime over the Unix socket the VMM thread bound (the listener,
//! the epoll instance and the waker eventfd all exist before the thread
//! starts). Requests go to the VMM thread as messages plus an eventfd
//! write (common list). With `--user` it also takes part in the set-id
//! broadcast (`rules::set_ids`).
//!
//! Found with strace over the requests of `vmm/tests/api_http` and the
//! end-to-end tests (GET, PUT, DELETE with and without `?wait`, metrics,
//! test faults, connections closed early, shutdown with connections open).

use seccompiler::BackendError;

use super::rules::{c, Allowed};

/// What the API thread may do beyond the common list.
pub(crate) fn allowed() -> Result<Allowed, BackendError> {
    let mut a = Allowed::default();
    // The reactor: tokio's I/O driver (mio) and its timers (epoll timeouts).
    a.any(libc::SYS_epoll_wait);
    a.any(libc::SYS_epoll_ctl);
    // New connections, always non-blocking and close-on-exec.
    a.when_arg_in(
        libc::SYS_accept4,
        3,
        &[c(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)],
    )?;
    // Reading requests (std's UnixStream::read is recv(2) = recvfrom with
    // no address) and writing responses (hyper writes headers and body
    // with one writev).
    a.any(libc::SYS_recvfrom);
    a.any(libc::SYS_writev);
    // Closing a connection (hyper shuts the write side down first).
    a.any(libc::SYS_shutdown);
    Ok(a)
}
