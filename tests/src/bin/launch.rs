//! `launch`: boots the default guest with our VMM, directly on this
//! machine's KVM or inside the emulated KVM host, and serves its API
//! socket on this machine.
//!
//! ```text
//! cargo run --release -p e2e --bin launch -- [--api-socket PATH] \
//!     [--cpus boot=1,max=8] [--memory 256M] [--append "loglevel=7"] [--host emulated] \
//!     [--seccomp enforce|log|off]
//! ```
//!
//! The API socket: `--api-socket`, else `$VMM_SOCKET`, else the default
//! (`api::socket::default_path`: `$XDG_RUNTIME_DIR/vmm.sock`, else
//! `/run/vmm/vmm.sock` for root, else `$TMPDIR/vmm-UID/vmm.sock`; its
//! directory is made 0700 and must be private), the path `vmmctl` uses
//! without `--socket`. The socket itself is 0600, whether the VMM serves
//! it (direct) or the forward does (emulated).
//!
//! The console streams to stdout; the launcher's own lines go to stderr.
//! Exits with the VMM's status (0 to 7, see the README); Ctrl-C (or
//! SIGTERM) stops everything (130); 1 is the launcher's own error. When
//! the emulated KVM host itself fails under the VM (a reset, its kernel
//! panicking, e.g. on a stack overflow in its KVM, a lockup, silence past
//! `--timeout`, or the nested guest failing as the nested emulation makes
//! it fail), it says so in one line, `launch: the emulated KVM host failed
//! (<classification>): this is a fault of the nested emulation on this
//! machine, not of the guest or the VMM; see tests/README.md`, and exits
//! with 123 (`e2e::launcher::HOST_FAILED`), in both modes.
//!
//! With `--run CMD` it runs your program in the guest instead, beside the
//! agent, with your `--add`ed files, under an optional `--churn`, and
//! exits with its status (see `e2e::workload`, and `e2e::workload::status`
//! for the table):
//!
//! ```text
//! launch --api-socket /tmp/vmm.sock --add ./target/release/mytest:/bin/mytest \
//!     --run "/bin/mytest --iterations 100" --churn random --churn-seed 7 --churn-max 4
//! ```

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use e2e::{Echo, VmSpec};

/// Boot the default guest with the VMM and expose its API socket.
#[derive(Debug, Parser)]
#[command(name = "launch")]
struct Args {
    /// API socket path on this machine (forwarded into the emulated host)
    /// [default: $VMM_SOCKET, else $XDG_RUNTIME_DIR/vmm.sock, else
    /// /run/vmm/vmm.sock as root or $TMPDIR/vmm-UID/vmm.sock]
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// vCPUs: `boot=N,max=M` or `N`.
    #[arg(long, default_value = "boot=1,max=8")]
    cpus: String,
    // --memory, --cmdline and --append mean what they mean to `vmm`
    // (api::options parses them for both).
    #[arg(long, value_name = "SIZE", default_value = "256M", help = api::options::MEMORY_HELP)]
    memory: api::options::Memory,
    #[arg(long, value_name = "STRING", help = CMDLINE_HELP)]
    cmdline: Option<String>,
    #[arg(long, value_name = "STRING", help = api::options::APPEND_HELP)]
    append: Option<String>,
    /// Force the host: direct or emulated (default: automatic, `E2E_HOST`).
    #[arg(long)]
    host: Option<String>,
    /// Stop the VM after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// The VMM's seccomp filters: enforce (a forbidden system call ends it
    /// with status 7), log (allowed, logged by the kernel) or off.
    #[arg(long, default_value = "enforce", value_parser = ["enforce", "log", "off"])]
    seccomp: String,
    /// Your own workload (`--add`, `--run`, `--churn`, ...).
    #[command(flatten)]
    workload: e2e::workload::cli::WorkloadArgs,
}

fn parse_cpus(s: &str) -> Result<(u32, u32)> {
    if let Ok(n) = s.trim().parse::<u32>() {
        return Ok((n, n));
    }
    let (mut boot, mut max) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("boot", v)) => boot = Some(v.trim().parse::<u32>()?),
            Some(("max", v)) => max = Some(v.trim().parse::<u32>()?),
            _ => bail!("--cpus {s:?}: expected boot=N,max=M or N"),
        }
    }
    let boot = boot.context("--cpus needs boot=N")?;
    Ok((boot, max.unwrap_or(boot)))
}

/// `--cmdline`'s help: the default it replaces is the guest image's
/// (`resources::default_cmdline`; a test checks they agree).
const CMDLINE_HELP: &str = "Guest kernel command line, replacing the default guest \
image's (console=ttyS0 quiet reboot=k panic=-1 pci=off rdinit=/init); --append adds \
to it instead";

/// The socket: `flag`, else `env` ($VMM_SOCKET), else the default path,
/// whose private directory is created if need be.
fn api_socket(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> Result<PathBuf> {
    if let Some(path) = flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from)) {
        return Ok(path);
    }
    let path = api::socket::default_path();
    api::socket::prepare_dir(&path)
        .with_context(|| format!("cannot use the default API socket {}", path.display()))?;
    Ok(path)
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("launch: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<i32> {
    let args = Args::parse();
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread below receives these signals.
    e2e::sys::block_termination_signals().context("cannot block signals")?;
    let (sig_tx, sig_rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(sig) = e2e::sys::wait_termination_signal() {
            let _ = sig_tx.send(sig);
        }
    });

    let (boot, max) = parse_cpus(&args.cpus)?;
    let host = match args.host.as_deref() {
        None => None,
        Some(v) => e2e::host::parse_forced(Some(v))?,
    };
    let timeout = match args.timeout {
        0 => Duration::from_secs(7 * 24 * 3600),
        s => Duration::from_secs(s),
    };
    let socket = api_socket(
        args.api_socket.clone(),
        std::env::var_os(api::socket::SOCKET_ENV),
    )?;
    let mut spec = VmSpec::new(boot, max)
        .cmdline(args.append.as_deref().unwrap_or(""))
        .vmm_arg("--seccomp")
        .vmm_arg(&args.seccomp);
    spec.base_cmdline = args.cmdline.clone();
    spec.memory_mib = args.memory.mib();
    spec.api_socket = Some(socket.clone());
    spec.host = host;
    spec.timeout = timeout;
    spec.echo = Echo::Stdout;
    // Several launchers may run at once (distinct API sockets); the test
    // suite's own lock only with E2E_SUITE_LOCK=1.
    spec.suite_lock = e2e::locks::suite_lock_from_env(false);

    if args.workload.wanted() {
        let limit = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
        let interrupted = || sig_rx.try_recv().is_ok();
        return Ok(e2e::workload::cli::main(
            &args.workload,
            spec,
            limit,
            &interrupted,
        ));
    }

    eprintln!("launch: preparing the guest image, the static vmm and the emulated host if needed");
    let socket_is_default = socket == api::socket::from_env();
    let mut say = |line: &str| eprintln!("launch: {line}");
    let interrupted = || sig_rx.try_recv().ok();
    let mut plain = e2e::launcher::Plain {
        say: &mut say,
        interrupted: &interrupted,
        timeout: (args.timeout > 0).then_some(timeout),
        socket_is_default,
    };
    Ok(plain.run(|| e2e::launch(&spec)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn parses_sizes_and_cpus() {
        assert_eq!(parse_cpus("boot=2,max=8").unwrap(), (2, 8));
        assert_eq!(parse_cpus("4").unwrap(), (4, 4));
        assert!(parse_cpus("max=4").is_err());
    }

    /// `--memory`, `--cmdline` and `--append` mean what they mean to `vmm`:
    /// the same parser, the same composition, the VMM given the result.
    #[test]
    fn memory_and_cmdline_mean_what_they_mean_to_the_vmm() {
        let args = Args::try_parse_from([
            "launch",
            "--memory",
            "512",
            "--cmdline",
            "console=ttyS0 loglevel=7",
            "--append",
            "agent.trace",
        ])
        .unwrap();
        assert_eq!(args.memory.mib(), 512);
        for (given, mib) in [("1G", 1024), ("300M", 300), ("64", 64)] {
            let a = Args::try_parse_from(["launch", "--memory", given]).unwrap();
            assert_eq!(a.memory, api::options::parse_memory(given).unwrap());
            assert_eq!(a.memory.mib(), mib);
        }
        for bad in ["1.5G", "16M", "lots", "1536K"] {
            assert!(
                Args::try_parse_from(["launch", "--memory", bad]).is_err(),
                "{bad}"
            );
        }
        let mut spec = VmSpec::new(1, 2).cmdline(args.append.as_deref().unwrap_or(""));
        spec.base_cmdline = args.cmdline.clone();
        spec.memory_mib = args.memory.mib();
        let argv = spec.vmm_args("k", "i", "console=ttyS0 quiet", "s");
        let value = |flag: &str| {
            let i = argv.iter().position(|a| a == flag).unwrap();
            argv[i + 1].clone()
        };
        // --cmdline replaced the image's default; --append came after it.
        assert_eq!(value("--cmdline"), "console=ttyS0 loglevel=7 agent.trace");
        assert_eq!(value("--memory"), "512M");
        // Without --cmdline the image's default stays, --append after it.
        let appended = VmSpec::new(1, 2).cmdline("agent.trace");
        let argv = appended.vmm_args("k", "i", "console=ttyS0 quiet", "s");
        assert!(argv.iter().any(|a| a == "console=ttyS0 quiet agent.trace"));
        assert!(CMDLINE_HELP.contains(&format!("({})", resources::default_cmdline())));
    }

    #[test]
    fn socket_flag_then_env() {
        let flag = Some(PathBuf::from("/x/flag.sock"));
        let env = Some(std::ffi::OsString::from("/x/env.sock"));
        assert_eq!(
            api_socket(flag, env.clone()).unwrap(),
            Path::new("/x/flag.sock")
        );
        assert_eq!(api_socket(None, env).unwrap(), Path::new("/x/env.sock"));
    }
}
