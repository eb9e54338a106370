//! `vmm`: boot a Linux guest whose vCPUs can be added and removed at run time.
//!
//! Exit statuses: see `vmm::exit` (0 power off, 1 VMM error, 2 reset,
//! 3 vCPU failure, 4 signalled, 5 guest agent failure, 6 VMM panic,
//! 7 killed by seccomp).

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use api::options;
use clap::Parser;
use vmm::boot::KernelSpec;
use vmm::config::{CpusConfig, SerialOutput, VmConfig};
use vmm::event_loop::Vmm;
use vmm::exit::{self, ExitStatus};
use vmm::kvm_check::{self, KvmFlavor};
use vmm::privileges::{self, User};
use vmm::seccomp::{self, SeccompMode, ThreadClass};
use vmm::signals::{self, TerminateSignal};

/// How long a panicking VMM waits for its vCPU threads to stop.
const PANIC_STOP_BOUND: Duration = Duration::from_secs(2);

/// A VMM specialised in vCPU hot-add and hot-remove.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Guest kernel (required): an ELF vmlinux with a PVH note, or a
    /// bzImage. For the default guest image use scripts/run-vm (or the
    /// launcher, `cargo run -p e2e --bin launch`), which builds it and
    /// passes --kernel and --initramfs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    // The help of --cmdline, --append and --memory is the launcher's too
    // (api::options: one meaning in both programs).
    #[arg(long, value_name = "STRING", help = options::VMM_CMDLINE_HELP)]
    cmdline: Option<String>,
    #[arg(long, value_name = "STRING", help = options::APPEND_HELP)]
    append: Option<String>,
    /// vCPUs: boot=N,max=M (or just N).
    #[arg(long, default_value = "boot=1,max=8")]
    cpus: CpusConfig,
    #[arg(long, value_name = "SIZE", default_value = "256M", help = options::MEMORY_HELP)]
    memory: options::Memory,
    /// Serve the HTTP API on this Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Console output: stdout, off, or file:PATH.
    #[arg(long, default_value = "stdout")]
    serial: SerialOutput,
    /// Serve the test-only API routes (/api/v1/test/..., fault injection)
    /// for end-to-end tests. Never in production.
    #[arg(long)]
    test_hooks: bool,
    /// How long the guest has for each hotplug step, in seconds:
    /// add=30,prepare=10,eject=30,restore=10 (keys left out keep these).
    #[arg(long, value_parser = vmm::config::parse_timeouts, default_value = "")]
    hotplug_timeouts: vmm::hotplug::Timeouts,
    /// Boot even though /dev/kvm is PVM (stock kernels will not boot).
    #[arg(long)]
    allow_pvm: bool,
    /// Seccomp filters per thread: enforce (a system call outside a
    /// thread's list ends the VMM with status 7 and a line naming the
    /// thread and the call), log (allowed, logged by the kernel), off.
    #[arg(long, default_value = "enforce")]
    seccomp: SeccompMode,
    /// Drop to this user and group (numeric UID:GID) once /dev/kvm, the
    /// guest images and the API socket are open, before the guest runs.
    /// Needs root; the API socket is handed to the user, and its directory
    /// must let the user remove it at exit.
    #[arg(long)]
    user: Option<User>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info, debug or trace"))
}

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let t = self.start.elapsed().as_secs_f64();
            // One write per line: stderr is unbuffered, and the guest
            // console may share the terminal.
            let line = format!("[vmm {t:9.3}s {:5}] {}\n", r.level(), r.args());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        }
    }
    fn flush(&self) {}
}

fn init_logging(level: log::LevelFilter) {
    let logger = Box::leak(Box::new(StderrLogger {
        start: Instant::now(),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// Why `--kernel` is required.
const NO_KERNEL: &str = "no --kernel given: pass --kernel PATH (and --initramfs PATH); \
for the default guest image run scripts/run-vm (the launcher, \
`cargo run -p e2e --bin launch`, builds it and passes both), \
or build it with `cargo run -p resources --bin mkimage`, which prints its paths";

fn kernel_spec(cli: &Cli) -> anyhow::Result<KernelSpec> {
    let Some(kernel) = &cli.kernel else {
        bail!("{NO_KERNEL}");
    };
    Ok(KernelSpec {
        kernel: kernel.clone(),
        initramfs: cli.initramfs.clone(),
        cmdline: options::compose_cmdline(
            options::VMM_DEFAULT_CMDLINE,
            cli.cmdline.as_deref(),
            cli.append.as_deref(),
        ),
    })
}

/// `Some(Signalled)` once SIGINT or SIGTERM came (checked between start-up steps).
fn signalled(signals: &TerminateSignal, during: &str) -> Option<ExitStatus> {
    let sig = signals.received()?;
    log::info!("{} during {during}: exiting", signals::name(sig));
    Some(ExitStatus::Signalled)
}

/// The test hook `VMM_TEST_FORBIDDEN_SYSCALL=CLASS` (with --test-hooks):
/// the first thread of that class makes a forbidden system call.
const FORBIDDEN_SYSCALL_ENV: &str = "VMM_TEST_FORBIDDEN_SYSCALL";

fn seccomp_settings(cli: &Cli) -> anyhow::Result<seccomp::Settings> {
    let forbidden_syscall = match std::env::var(FORBIDDEN_SYSCALL_ENV) {
        Ok(class) if cli.test_hooks => Some(
            class
                .parse::<ThreadClass>()
                .map_err(|e| anyhow::anyhow!("{FORBIDDEN_SYSCALL_ENV}: {e}"))?,
        ),
        _ => None,
    };
    Ok(seccomp::Settings {
        mode: cli.seccomp,
        user: cli.user,
        forbidden_syscall,
    })
}

fn run(cli: Cli, signals: &TerminateSignal) -> anyhow::Result<ExitStatus> {
    let kernel = kernel_spec(&cli)?;
    if let Some(s) = signalled(signals, "start-up") {
        return Ok(s);
    }
    kvm_check::check_device(std::path::Path::new("/dev/kvm"))?;
    if kvm_check::flavor(std::path::Path::new("/sys")) == KvmFlavor::Pvm && !cli.allow_pvm {
        bail!("{}", kvm_check::PVM_MESSAGE);
    }
    let cfg = VmConfig {
        kernel,
        cpus: cli.cpus,
        memory: cli.memory.bytes(),
        api_socket: cli.api_socket.clone(),
        serial: cli.serial.clone(),
        test_hooks: cli.test_hooks,
        timeouts: cli.hotplug_timeouts,
        user: cli.user,
    };
    if cfg.test_hooks {
        log::warn!("test hooks enabled: the API serves /api/v1/test/ (fault injection)");
    }
    // Before the VM's threads exist: each installs its filter as it starts.
    seccomp::configure(seccomp_settings(&cli)?)?;
    if cli.seccomp == SeccompMode::Enforce {
        log::info!("seccomp filters: {}", cli.seccomp);
    } else {
        log::warn!("seccomp filters: {}", cli.seccomp);
    }
    if let Some(s) = signalled(signals, "start-up") {
        return Ok(s);
    }
    // A signal from here on makes the event loop's first turn end the VM.
    let vmm = Vmm::start(&cfg, signals.eventfd()?)?;
    // The VM is built: the VMM thread's own filter, before the event loop.
    seccomp::try_enter(ThreadClass::Vmm)?;
    if cfg.test_hooks && std::env::var_os("VMM_TEST_PANIC").is_some() {
        // Test hook: the panic path with vCPU threads and the API running.
        panic!("test hook: VMM_TEST_PANIC");
    }
    let reason = vmm.run()?;
    log::debug!("exiting with status {}", reason.exit_code());
    Ok(reason.status())
}

/// The panic of the main (VMM) thread, printed by [`after_panic`] as
/// part of its one line.
static MAIN_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// One line per panic on stderr, guest text escaped: at once for other
/// threads (a vCPU thread's panic is caught there and fails the VM), in
/// [`after_panic`]'s line for the VMM thread. The backtrace only with
/// RUST_BACKTRACE.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        let msg = exit::panic_message(info.payload())
            .escape_debug()
            .to_string();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = format!("panic in thread '{name}'{at}: {msg}");
        let mut err = std::io::stderr().lock();
        if name == "main" {
            *MAIN_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        } else {
            let _ = std::io::Write::write_all(&mut err, format!("vmm: {what}\n").as_bytes());
        }
        let bt = std::backtrace::Backtrace::capture();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            // Resolving it reads the executable, which no seccomp list allows.
            let text = if seccomp::enforced_here() {
                "(backtrace not resolved under --seccomp enforce: run with --seccomp log)".into()
            } else {
                bt.to_string()
            };
            let _ = std::io::Write::write_all(&mut err, format!("{text}\n").as_bytes());
        }
    }));
}

/// Removes the API socket at `path` if nobody listens on it any more (the
/// API server, dropped while unwinding, normally removed it already; a
/// live socket there is another server's).
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// After a panic of the VMM thread: stop the vCPU threads (bounded),
/// remove the API socket, say so in one line.
fn after_panic(api_socket: Option<&std::path::Path>) {
    let left = vmm::vcpu::stop_all(PANIC_STOP_BOUND);
    // Under the VMM thread's filter the check cannot connect(2); the API
    // server removed its own socket already while unwinding.
    if let Some(path) = api_socket.filter(|_| !seccomp::enforced_here()) {
        remove_stale_socket(path);
    }
    let what = MAIN_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_else(|| "panic".into());
    let threads = match left {
        0 => "vCPU threads stopped".to_string(),
        n => format!("{n} vCPU threads did not stop"),
    };
    let line = format!(
        "vmm: {what}; {threads}, exiting with status {}\n",
        ExitStatus::Panic.code()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

fn main() -> ExitCode {
    // First, before any thread or VM exists: a signal from now on is seen.
    let signals = match signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitStatus::VmmError.into();
        }
    };
    // Inherited by every thread: nothing gains privileges from here on.
    if let Err(e) = privileges::set_no_new_privs() {
        eprintln!("vmm: error: {e}");
        return ExitStatus::VmmError.into();
    }
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors are VMM errors (1), not clap's 2 (a guest reset).
            let _ = e.print();
            return if e.use_stderr() {
                ExitStatus::VmmError
            } else {
                ExitStatus::PowerOff // --help, --version
            }
            .into();
        }
    };
    init_logging(cli.log_level);
    let api_socket = cli.api_socket.clone();
    let status = exit::run_guarded(
        AssertUnwindSafe(|| match run(cli, &signals) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("vmm: error: {e:#}");
                vmm::vcpu::stop_all(PANIC_STOP_BOUND);
                ExitStatus::VmmError
            }
        }),
        || after_panic(api_socket.as_deref()),
    );
    status.into()
}
