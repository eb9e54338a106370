//! `testhost-init`: PID 1 of the emulated KVM host.
//!
//! Mounts `/proc`, `/sys`, `/dev`; loads `irqbypass`, `kvm`, `kvm-amd`
//! with `finit_module`; opens `/dev/kvm` and keeps one idle VM for its
//! whole life (so the VMM's VM is never the last one torn down: avoids the
//! soft lockup seen in `kvm_destroy_vm`); prints on `/dev/ttyS2` (the
//! kernel keeps ttyS0 to itself); serves the API forward on
//! `/dev/ttyS1`; runs the job of `/job.json` with its output on the
//! console; prints `TESTHOST-EXIT status=N` and powers off. Any failure
//! prints one `TESTHOST-ERROR` line and powers off too.
//!
//! Also runs as a job itself: `testhost-init kvm-selftest` and
//! `testhost-init echo-server PATH`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::job::{self, Job};
use e2e::mux::Mux;
use e2e::sys;

/// How long a forwarded connection waits for the VMM's socket to appear.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("kvm-selftest") => match e2e::inside::selftest::run() {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("kvm selftest failed: {}", e2e::chain(&e));
                std::process::exit(1);
            }
        },
        Some("echo-server") if args.len() == 3 => {
            if let Err(e) = e2e::inside::echo::serve(Path::new(&args[2])) {
                eprintln!("echo-server: {e}");
                std::process::exit(1);
            }
        }
        Some("bench") => std::process::exit(e2e::bench::inside::main(&args[2..])),
        _ if std::process::id() == 1 => init(),
        _ => {
            eprintln!("usage: testhost-init (as PID 1) | kvm-selftest | echo-server PATH");
            std::process::exit(2);
        }
    }
}

/// PID 1: never returns.
fn init() -> ! {
    let outcome = std::panic::catch_unwind(run);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => say(&format!("{} {e:#}", job::ERROR)),
        Err(_) => say(&format!("{} panic in testhost-init", job::ERROR)),
    }
    let e = sys::power_off();
    say(&format!("{} power off failed: {e}", job::ERROR));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A console line, flushed at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Writes [`job::ALIVE`] into the kernel log every [`job::ALIVE_EVERY`]
/// (the kernel prints it on ttyS0 as one message, never inside the job's
/// lines on ttyS2). Best effort: without /dev/kmsg the harness just cannot
/// tell a frozen host early.
fn start_heartbeat() {
    let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") else {
        say("testhost-init: no /dev/kmsg: no heartbeat");
        return;
    };
    let _ = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            kmsg_record(&mut kmsg, &format!("{} up_ms={}", job::ALIVE, uptime_ms()));
            std::thread::sleep(job::ALIVE_EVERY);
        });
}

/// Writes `line` as one kernel log record (one write() is one record) at
/// level 5 (notice), which the kernel prints on its console (ttyS0).
fn kmsg_record(kmsg: &mut File, line: &str) {
    let _ = kmsg.write_all(format!("<5>{line}\n").as_bytes());
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|secs| Duration::from_secs_f64(secs).as_millis())
        .and_then(|ms| u64::try_from(ms).ok())
        .unwrap_or(0)
}

fn run() -> Result<()> {
    mount_basics()?;
    let init_ms = uptime_ms();
    let job: Job = serde_json::from_slice(
        &std::fs::read(job::JOB_PATH)
            .with_context(|| format!("stage=job cannot read {}", job::JOB_PATH))?,
    )
    .context("stage=job bad job description")?;

    let t = Instant::now();
    for m in &job.modules {
        let file =
            File::open(&m.path).with_context(|| format!("stage=modules cannot open {}", m.path))?;
        sys::finit_module(&file, &m.params)
            .with_context(|| format!("stage=modules cannot load {}", m.path))?;
    }
    let modules_ms = t.elapsed().as_millis();

    // Kept open until power-off: the VMM's VM is never the last one.
    let kvm = kvm_ioctls::Kvm::new().context("stage=kvm cannot open /dev/kvm")?;
    let _idle_vm = kvm
        .create_vm()
        .context("stage=kvm cannot create the idle VM")?;
    // The SVM features the module ended up with (parameters it was given
    // or its defaults), so that every log says which configuration ran.
    let svm: Vec<String> = ["nested", "npt", "nrips", "vgif", "avic", "vls", "lbrv"]
        .iter()
        .map(|p| {
            let v = std::fs::read_to_string(format!("/sys/module/kvm_amd/parameters/{p}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("{p}={v}")
        })
        .collect();

    // The multiplexer's handle lives until power-off with the tty.
    let forward = match &job.api_socket {
        Some(path) => Some(start_forward(PathBuf::from(path))?),
        None => None,
    };
    say(&format!(
        "{} init_ms={init_ms} modules_ms={modules_ms} ready_ms={} kvm_api={} {}",
        job::READY,
        uptime_ms(),
        kvm.get_api_version(),
        svm.join(" ")
    ));

    start_heartbeat();
    let t = Instant::now();
    let status = run_job(&job)?;
    let line = match status.code() {
        Some(code) => format!(
            "{} status={code} run_ms={}",
            job::EXIT,
            t.elapsed().as_millis()
        ),
        None => {
            let sig = status.signal().unwrap_or(0);
            format!(
                "{} status={} signal={sig} run_ms={}",
                job::EXIT,
                job::signal_status(sig),
                t.elapsed().as_millis()
            )
        }
    };
    if let Some((tty, _mux)) = &forward {
        let _ = sys::tcdrain(tty);
    }
    say(&line);
    let _ = sys::tcdrain(&std::io::stdout());
    Ok(())
}

fn mount_basics() -> Result<()> {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        std::fs::create_dir_all(target).with_context(|| format!("stage=mount mkdir {target}"))?;
        sys::mount(src, target, fstype, libc::MS_NOSUID)
            .with_context(|| format!("stage=mount {target}"))?;
    }
    // Our lines and the job's go to their own serial port, apart from the
    // kernel's console, so the harness can tell the host's kernel messages
    // from the guest's.
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(job::CONSOLE_TTY)
        .with_context(|| format!("stage=mount cannot open {}", job::CONSOLE_TTY))?;
    sys::redirect_stdio(&console).context("stage=mount redirect stdio")?;
    Ok(())
}

/// Opens the forward's serial port in raw mode and serves the connecting
/// end of the multiplexer on it. Returns the tty (drained at exit) and the
/// multiplexer.
fn start_forward(api_socket: PathBuf) -> Result<(File, Mux)> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(job::FORWARD_TTY)
        .with_context(|| format!("stage=forward cannot open {}", job::FORWARD_TTY))?;
    sys::set_raw(&tty).context("stage=forward cannot set raw mode")?;
    sys::set_blocking(&tty).context("stage=forward cannot clear O_NONBLOCK")?;
    let reader = tty.try_clone().context("stage=forward clone tty")?;
    let writer = tty.try_clone().context("stage=forward clone tty")?;
    let connector = Box::new(move |_id: u32| connect_patiently(&api_socket));
    let mux = Mux::connector(Box::new(reader), Box::new(writer), connector)
        .context("stage=forward cannot send hello")?;
    Ok((tty, mux))
}

/// Connects to `path`, waiting for the VMM to create it.
fn connect_patiently(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Copies the child's stdout and stderr to the console whole lines at a
/// time: the guest console (the VMM's stdout) and the VMM's log (stderr)
/// never interleave within a line. Returns the writer thread, which ends
/// once both streams are closed.
fn relay_lines(
    child: &mut std::process::Child,
    last_line: std::sync::Arc<std::sync::Mutex<Instant>>,
) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let streams: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    std::thread::spawn(move || {
        for line in rx {
            if let Ok(mut t) = last_line.lock() {
                *t = Instant::now();
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    })
}

/// Runs the job's program with the console as its output, bounded by the
/// job's timeout.
fn run_job(job: &Job) -> Result<ExitStatus> {
    let Some((prog, args)) = job.argv.split_first() else {
        bail!("stage=job empty argv");
    };
    let mut child = Command::new(prog)
        .args(args)
        .env("PATH", "/bin")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("stage=job cannot start {prog}"))?;
    let last_line = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let relay = relay_lines(&mut child, last_line.clone());
    let deadline = Instant::now() + Duration::from_secs(job.timeout_secs);
    let mut reported: Option<Instant> = None;
    loop {
        let quiet_since = last_line
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| Instant::now());
        let since_report = reported
            .filter(|at| *at > quiet_since)
            .map(|at| at.elapsed());
        if job::silence_report_due(quiet_since.elapsed(), since_report) {
            report_silence(child.id(), quiet_since.elapsed());
            reported = Some(Instant::now());
        }
        if let Some(status) = child.try_wait().context("stage=job wait")? {
            // Everything the job printed is on the console before its exit line.
            let _ = relay.join();
            return Ok(status);
        }
        if Instant::now() >= deadline {
            dump_threads(child.id(), &mut |line| say(line));
            let _ = child.kill();
            let _ = child.wait();
            let _ = relay.join();
            bail!(
                "stage=job timeout: {prog} still running after {}s, killed",
                job.timeout_secs
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The job printed nothing for `quiet`: writes the state of its threads
/// and of ours (the relay), and the serial ports' counters, into the
/// kernel log, which reaches the harness on ttyS0 even when the console
/// port (ttyS2) is what stalled. Which of "the VMM is blocked in the
/// kernel", "the guest went quiet" and "the console stopped moving" it
/// was can then be read from the failed test's log.
fn report_silence(pid: u32, quiet: Duration) {
    let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") else {
        return;
    };
    let mut put = |line: &str| kmsg_record(&mut kmsg, line);
    put(&format!(
        "TESTHOST-DIAG the job printed nothing for {} s: its threads, ours, the serial ports",
        quiet.as_secs()
    ));
    dump_threads(pid, &mut put);
    dump_threads(std::process::id(), &mut put);
    for line in std::fs::read_to_string("/proc/tty/driver/serial")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("tx:"))
    {
        put(&format!("TESTHOST-DIAG serial {line}"));
    }
}

/// Writes the state and kernel stack of every thread of `pid` to `out`
/// (why a job hangs: e.g. a vCPU thread stuck in KVM_RUN, or the process
/// stuck in VM teardown).
fn dump_threads(pid: u32, out: &mut dyn FnMut(&str)) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        // The syscall number and first argument (an ioctl's request).
        let syscall = read("syscall");
        let syscall: Vec<&str> = syscall.split_whitespace().take(3).collect();
        out(&format!(
            "TESTHOST-DIAG tid={} comm={} state={state} wchan={} syscall={}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            syscall.join(",")
        ));
        for frame in read("stack").lines().take(12) {
            out(&format!("TESTHOST-DIAG   {frame}"));
        }
    }
}
