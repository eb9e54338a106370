//! The API forward's codec and both ends of the multiplexer, over an
//! in-process socket pair standing in for the serial line.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use e2e::mux::codec::{CodecError, Decoder, Frame, Kind, MAX_PAYLOAD};
use e2e::mux::{Forwarder, Mux, WINDOW};

#[test]
fn codec_roundtrips_every_kind_split_anywhere() {
    let frames = vec![
        Frame::hello(),
        Frame::empty(1, Kind::Open),
        Frame::data(1, &[7u8; MAX_PAYLOAD]),
        Frame::data(u32::MAX, b""),
        Frame::ack(1, 4096),
        Frame::empty(1, Kind::Eof),
        Frame::empty(2, Kind::Close),
    ];
    let mut wire = Vec::new();
    for f in &frames {
        f.encode_into(&mut wire).unwrap();
    }
    for chunk in [1, 3, 8, 9, 4104, wire.len()] {
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            dec.push(piece);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames, "chunk size {chunk}");
    }
}

#[test]
fn codec_rejects_garbage() {
    let mut dec = Decoder::new();
    dec.push(b"hello");
    assert_eq!(dec.next_frame(), Err(CodecError::BadMagic(b'h')));

    let mut bad_kind = Frame::empty(1, Kind::Open).encode().unwrap();
    bad_kind[5] = 99;
    let mut dec = Decoder::new();
    dec.push(&bad_kind);
    assert_eq!(dec.next_frame(), Err(CodecError::BadKind(99)));

    let mut too_long = Frame::empty(1, Kind::Data).encode().unwrap();
    too_long[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
    let mut dec = Decoder::new();
    dec.push(&too_long);
    assert_eq!(
        dec.next_frame(),
        Err(CodecError::TooLong(usize::from(u16::MAX)))
    );

    assert_eq!(
        Frame::data(1, &vec![0; MAX_PAYLOAD + 1]).encode(),
        Err(CodecError::TooLong(MAX_PAYLOAD + 1))
    );
    assert_eq!(
        Frame::empty(1, Kind::Ack).ack_count(),
        Err(CodecError::BadAck)
    );
}

#[test]
fn codec_waits_for_complete_frames() {
    let wire = Frame::data(5, b"abc").encode().unwrap();
    let mut dec = Decoder::new();
    dec.push(&wire[..wire.len() - 1]);
    assert_eq!(dec.next_frame(), Ok(None));
    dec.push(&wire[wire.len() - 1..]);
    assert_eq!(dec.next_frame().unwrap().unwrap().payload, b"abc");
}

/// A forwarder on a temp socket, a connector end serving `target`.
struct Rig {
    path: PathBuf,
    _fwd: Forwarder,
    host: Mux,
    guest: Mux,
}

fn rig(name: &str, target: PathBuf) -> Rig {
    let (a, b) = UnixStream::pair().unwrap();
    let host = Mux::listener(Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    let connector = Box::new(move |_id: u32| UnixStream::connect(&target));
    let guest = Mux::connector(Box::new(b.try_clone().unwrap()), Box::new(b), connector).unwrap();
    let path = std::env::temp_dir().join(format!("e2e-mux-{name}-{}.sock", std::process::id()));
    let fwd = Forwarder::bind(&path, host.clone()).unwrap();
    Rig {
        path,
        _fwd: fwd,
        host,
        guest,
    }
}

fn echo_server(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("e2e-echo-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut r = conn.try_clone().unwrap();
                let mut w = conn;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    path
}

fn connect(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn forwards_many_connections_with_back_pressure() {
    let rig = rig("many", echo_server("many"));
    assert!(rig.host.wait_hello(Duration::from_secs(5)));
    let workers: Vec<_> = (0..4usize)
        .map(|n| {
            let path = rig.path.clone();
            thread::spawn(move || {
                let c = connect(&path);
                // Much more than the window, written while reading back.
                let data: Vec<u8> = (0..(WINDOW * 5 + 123))
                    .map(|i| u8::try_from((i * 7 + n) % 251).unwrap_or(0))
                    .collect();
                let mut w = c.try_clone().unwrap();
                let d2 = data.clone();
                let writer = thread::spawn(move || {
                    w.write_all(&d2).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                let mut r = c;
                r.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == data, "connection {n} corrupted");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Both half-closes seen: every channel is gone on both ends.
    for _ in 0..100 {
        if rig.host.open_channels() == 0 && rig.guest.open_channels() == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (rig.host.open_channels(), rig.guest.open_channels()),
        (0, 0)
    );
}

#[test]
fn server_side_close_reaches_the_client() {
    // A server that answers once and closes, like an HTTP server with
    // "Connection: close".
    let path = std::env::temp_dir().join(format!("e2e-once-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap();
            conn.write_all(&buf[..n]).unwrap();
            conn.write_all(b" ok").unwrap();
        }
    });
    let rig = rig("once", path);
    let mut c = connect(&rig.path);
    c.write_all(b"GET").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "GET ok");
}

#[test]
fn refused_connection_is_closed_not_hung() {
    let missing = std::env::temp_dir().join(format!("e2e-missing-{}.sock", std::process::id()));
    let rig = rig("refused", missing);
    let mut c = connect(&rig.path);
    let _ = c.write_all(b"x");
    let mut buf = Vec::new();
    // EOF (or reset), but not a timeout.
    match c.read_to_end(&mut buf) {
        Ok(_) => assert!(buf.is_empty()),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "hung"),
    }
}

#[test]
fn dead_link_closes_clients() {
    let (a, b) = UnixStream::pair().unwrap();
    let host = Mux::listener(Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    let path = std::env::temp_dir().join(format!("e2e-mux-dead-{}.sock", std::process::id()));
    let _fwd = Forwarder::bind(&path, host.clone()).unwrap();
    // The peer never says hello and goes away.
    drop(b);
    let mut c = connect(&path);
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(buf.is_empty());
    assert!(host.dead().is_some());
}

#[test]
fn forwarder_refuses_to_replace_live_socket_or_file() {
    let path = std::env::temp_dir().join(format!("e2e-live-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let _live = UnixListener::bind(&path).unwrap();
    assert!(e2e::mux::remove_stale_socket(&path).is_err());
    drop(_live);
    // A stale socket file (nobody listening) is replaced.
    assert!(e2e::mux::remove_stale_socket(&path).is_ok());
    let file = std::env::temp_dir().join(format!("e2e-file-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    assert!(e2e::mux::remove_stale_socket(&file).is_err());
    let _ = std::fs::remove_file(&file);
}

#[test]
fn forwarder_socket_is_0600_and_channels_are_capped() {
    use std::os::unix::fs::PermissionsExt;
    let target = echo_server("cap");
    let (a, b) = UnixStream::pair().unwrap();
    let host = Mux::listener(Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    let connector = Box::new(move |_id: u32| UnixStream::connect(&target));
    let _guest = Mux::connector(Box::new(b.try_clone().unwrap()), Box::new(b), connector).unwrap();
    let path = std::env::temp_dir().join(format!("e2e-mux-cap-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let fwd = Forwarder::bind_with_limit(&path, host.clone(), 3).unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(host.wait_hello(Duration::from_secs(5)));
    assert_eq!(e2e::mux::MAX_CHANNELS, 64);

    let echo = |c: &mut UnixStream, text: &[u8]| {
        c.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, text);
    };
    let mut held: Vec<UnixStream> = (0..3)
        .map(|_| {
            let mut c = connect(&fwd.path().to_path_buf());
            echo(&mut c, b"ping");
            c
        })
        .collect();
    assert_eq!(fwd.active_channels(), 3);
    // One more: the API's JSON 503, then closed.
    for _ in 0..2 {
        let mut c = connect(&path);
        c.write_all(b"GET /api/v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"), "{head}");
        let err: api::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(err.error.code, api::ErrorCode::Unavailable);
        assert!(err.error.message.contains("connection limit"), "{body}");
    }
    // One closes: its place is free again.
    let gone = held.remove(0);
    gone.shutdown(std::net::Shutdown::Both).unwrap();
    drop(gone);
    for _ in 0..250 {
        if fwd.active_channels() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fwd.active_channels(), 2);
    let mut c = connect(&path);
    echo(&mut c, b"again");
    drop(fwd);
    assert!(!path.exists());
}
