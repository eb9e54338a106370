//! A tiny echo server on a Unix socket, the stand-in for the VMM's API when
//! testing the API forward. Every connection gets its bytes back; a
//! connection that sends `QUIT` gets `BYE\n` and ends the server (status 0).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;

/// Serves `path` until a client sends `QUIT`.
pub fn serve(path: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let acceptor = thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let quit = quit_tx.clone();
            thread::spawn(move || {
                if let Ok(true) = echo(conn) {
                    let _ = quit.send(());
                }
            });
        }
    });
    let _ = quit_rx.recv();
    drop(acceptor);
    Ok(())
}

/// Echoes one connection; true if it asked the server to quit.
fn echo(mut conn: UnixStream) -> io::Result<bool> {
    let mut buf = [0u8; 8192];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        if buf[..n].starts_with(b"QUIT") {
            conn.write_all(b"BYE\n")?;
            conn.flush()?;
            return Ok(true);
        }
        conn.write_all(&buf[..n])?;
    }
}
