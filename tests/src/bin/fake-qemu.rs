//! `fake-qemu`: stands in for `qemu-system-x86_64` in the harness's own
//! tests (resets, errors, retries) without booting anything.
//!
//! It connects the `-chardev socket` paths like QEMU does, then plays the
//! script given as `-kernel`: sections `--- attempt N` (the N-th start;
//! a `<script>.count` file counts starts), lines `kcon: TEXT` (the emulated
//! host's kernel console), `out: TEXT` (stdout: testhost-init's console),
//! `sleep MS`, `exit N`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut sockets = Vec::new();
    let mut script = None;
    for pair in args.windows(2) {
        if pair[0] == "-chardev" {
            if let Some(path) = pair[1].split(',').find_map(|kv| kv.strip_prefix("path=")) {
                match UnixStream::connect(path) {
                    Ok(s) => sockets.push(s),
                    Err(e) => {
                        eprintln!("fake-qemu: cannot connect {path}: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
        if pair[0] == "-kernel" {
            script = Some(PathBuf::from(&pair[1]));
        }
    }
    let Some(script) = script else {
        eprintln!("fake-qemu: no -kernel script");
        std::process::exit(1);
    };
    let counter = script.with_extension("count");
    let attempt = std::fs::read_to_string(&counter)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let _ = std::fs::write(&counter, attempt.to_string());
    let text = std::fs::read_to_string(&script).unwrap_or_default();
    let mut current = 0;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("--- attempt ") {
            current = n.trim().parse().unwrap_or(0);
            continue;
        }
        if current != attempt {
            continue;
        }
        if let Some(msg) = line.strip_prefix("kcon: ") {
            if let Some(kcon) = sockets.first_mut() {
                let _ = writeln!(kcon, "{msg}\r");
            }
        } else if let Some(msg) = line.strip_prefix("out: ") {
            println!("{msg}");
        } else if let Some(ms) = line.strip_prefix("sleep ") {
            std::thread::sleep(Duration::from_millis(ms.trim().parse().unwrap_or(0)));
        } else if let Some(code) = line.strip_prefix("exit ") {
            std::process::exit(code.trim().parse().unwrap_or(1));
        }
    }
    std::process::exit(0);
}
