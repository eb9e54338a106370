//! The API socket: mode 0600, the stale-socket rule, cleanup on shutdown.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use vmm::api_server::{self, ApiMetrics, ApiServerError, SocketError};
use vmm::control;

use crate::fake::{Harness, Scratch, Settle};

/// Start a server at `path` whose VMM end is never read (enough to bind).
fn start_at(path: &std::path::Path) -> Result<api_server::ApiServerHandle, ApiServerError> {
    let (sender, _receiver) = control::channel().unwrap();
    api_server::start(path, sender, Arc::new(ApiMetrics::new()))
}

#[test]
fn socket_is_0600_and_removed_on_shutdown() {
    let mut h = Harness::start(Settle::After(Duration::ZERO));
    let meta = fs::symlink_metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing else was left beside it.
    assert_eq!(fs::read_dir(h.dir()).unwrap().count(), 1);
    h.blocking().vm().unwrap();
    let server = h.server.take().unwrap();
    assert_eq!(server.socket_path(), h.socket);
    server.shutdown().unwrap();
    assert!(!h.socket.exists());
    assert!(h.blocking().vm().is_err());
}

#[test]
fn live_socket_is_refused_and_keeps_serving() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    match start_at(&h.socket) {
        Err(ApiServerError::Socket(SocketError::InUse(path))) => assert_eq!(path, h.socket),
        other => panic!("{other:?}"),
    }
    h.blocking().vcpus().unwrap();
}

#[test]
fn stale_socket_is_replaced() {
    let scratch = Scratch::new();
    let path = scratch.0.join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    let server = start_at(&path).unwrap();
    assert_eq!(
        fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    server.shutdown().unwrap();
    assert!(!path.exists());
}

#[test]
fn non_socket_is_refused_and_left_alone() {
    let scratch = Scratch::new();
    let path = scratch.0.join("api.sock");
    fs::write(&path, b"important").unwrap();
    let err = start_at(&path).unwrap_err();
    assert!(
        matches!(err, ApiServerError::Socket(SocketError::NotASocket(_))),
        "{err:?}"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        format!("{} exists and is not a socket", path.display())
    );
    assert_eq!(fs::read(&path).unwrap(), b"important");
    let missing_dir = scratch.0.join("no/such/dir/api.sock");
    assert!(start_at(&missing_dir).is_err());
}

#[test]
fn shutdown_is_bounded_with_a_wait_in_flight() {
    let mut h = Harness::start(Settle::Never);
    let socket = h.socket.clone();
    let waiter = std::thread::spawn(move || {
        let c = api::client::BlockingClient::new(socket).unwrap();
        c.add_vcpu(5, Some(Duration::from_secs(60)))
    });
    // Let the request reach the server and start waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.fake.lock().table.running().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = std::time::Instant::now();
    h.server.take().unwrap().shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!h.socket.exists());
    // The waiting client is cut off rather than left hanging.
    assert!(waiter.join().unwrap().is_err());
}
