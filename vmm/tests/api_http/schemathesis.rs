//! schemathesis (PyPI) against `api/openapi.yaml` and the real server with
//! the fake VMM. schemathesis speaks TCP only, so the test forwards a
//! loopback port (127.0.0.1, ephemeral) to the Unix socket.
//!
//! This test fails, loudly, when schemathesis is missing: install it with
//! `scripts/deps python` (CI does). `SCHEMATHESIS=/path/to/it`
//! overrides the command.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixStream};
use tokio::sync::oneshot;

use crate::fake::{Harness, Settle};

/// The whole run must end within this.
const LIMIT: Duration = Duration::from_secs(600);

/// Forwards 127.0.0.1:port to the Unix socket until dropped.
struct Forwarder {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(socket: &Path) -> Self {
        let socket = socket.to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let accept = async {
                    loop {
                        let Ok((mut tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let socket = socket.clone();
                        tokio::spawn(async move {
                            if let Ok(mut unix) = UnixStream::connect(&socket).await {
                                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept => {}
                }
            });
        });
        Self {
            port: port_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `$SCHEMATHESIS`, else the virtual environment `scripts/deps` makes
/// (`.cache/venv`), else `schemathesis` on PATH.
fn schemathesis() -> String {
    if let Ok(p) = std::env::var("SCHEMATHESIS") {
        return p;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/bin/schemathesis");
    if venv.exists() {
        return venv.display().to_string();
    }
    "schemathesis".into()
}

#[test]
fn schemathesis_against_openapi_yaml() {
    let program = schemathesis();
    let version = Command::new(&program).arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {
            eprintln!("using {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(out) => panic!(
            "`{program} --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "schemathesis is required for this test and could not be run ({program}: {e}); \
             run `scripts/deps python` (a virtual environment in .cache/venv)"
        ),
    }
    let h = Harness::start(Settle::After(Duration::from_millis(2)));
    let forwarder = Forwarder::start(&h.socket);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = manifest.join("../api/openapi.yaml");
    let config = manifest.join("../api/tests/schemathesis.toml");
    let reports = crate::fake::Scratch::new();
    let mut child = Command::new(&program)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("http://127.0.0.1:{}", forwarder.port)])
        // Every check is enabled by the config file, not `--checks all`:
        // a check named on the command line would override the file's
        // per-operation settings (the test hooks' section).
        .args(["--max-examples", "40", "--seed", "1"])
        .args(["--request-timeout", "10", "--no-color"])
        .arg("--report-dir")
        .arg(&reports.0)
        .current_dir(&reports.0)
        .stdin(Stdio::null())
        .spawn()
        .expect("start schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis ran longer than {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "schemathesis found problems (see its output above): {status}"
    );
    // The run went through the real server.
    assert!(
        h.metrics.total() > 50,
        "only {} requests reached the server",
        h.metrics.total()
    );
    assert_eq!(h.metrics.requests(500) + h.metrics.requests(503), 0);
}
