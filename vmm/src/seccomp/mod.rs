//! Seccomp filters, one per thread class ([`ThreadClass`]), each
//! installed by its thread ([`enter`]) before it handles guest or client
//! input.
//!
//! | class | thread | installed | list |
//! |---|---|---|---|
//! | `vmm` | the main thread (event loop) | after the VM is built, before the event loop | `vmm.rs` (+ `vcpu.rs`) |
//! | `api` | `vmm_api` | first thing on the thread, before it accepts | `api.rs` |
//! | `vcpu` | `vcpuN` | first thing on the thread, before the first `KVM_RUN` | `vcpu.rs` |
//! | `console` | `console` | first thing on the thread | `console.rs` |
//!
//! Every list starts from the common one (`rules::common`: allocation,
//! futexes, clocks, `write`, signal returns, thread exit). Arguments are
//! checked where it matters: ioctl request numbers (`kvm.rs`), no
//! executable mappings, `clone` only for threads, `tgkill` only to this
//! process (the vCPU kick, or SIGABRT), `prctl` and `seccomp` only as
//! thread creation uses them, and with `--user` the exact set-id calls of
//! the privilege drop.
//!
//! Filters are per thread and inherited: a thread starts with its
//! creator's, and the kernel runs every filter of the chain (the strictest
//! answer wins). The console, the API and the boot vCPU threads are
//! started before the VMM thread filters itself; hot-added vCPU threads
//! are started afterwards, by the VMM thread, so the VMM list includes
//! the vCPU list and the vCPU filter on top narrows them down again.
//! clone3(2) answers ENOSYS on the VMM thread (a second, tiny filter):
//! its flags are out of a filter's reach, and glibc then uses clone(2).
//!
//! Modes ([`SeccompMode`], `vmm --seccomp`): `enforce` (the default)
//! answers a call outside the list with SIGSYS (`SECCOMP_RET_TRAP`), whose
//! handler ([`sigsys`]) writes one line naming the thread and the system
//! call and exits with status 7 ([`crate::exit::ExitStatus::Seccomp`]);
//! `log` lets it through and the kernel logs it (`SECCOMP_RET_LOG`: a
//! line `audit: type=1326 ... comm="vcpu3" ... syscall=41` in dmesg, the
//! way the lists were checked); `off` installs nothing.
//!
//! The C library opens a file or two lazily, from whichever thread first
//! needs it (malloc's arena limit and heap trimming); [`configure`] has
//! that done before any filter exists (`warm_up.rs`).
//!
//! Nothing is installed until [`configure`] runs (the `vmm` binary calls
//! it; library users and most tests do not), and [`enter`] does nothing
//! before.

mod api;
mod console;
mod kvm;
mod rules;
pub mod sigsys;
mod vcpu;
mod vmm;
mod warm_up;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::BpfProgram;

use crate::exit::ExitStatus;
use crate::privileges::User;

/// What the filters do with a system call outside a thread's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SeccompMode {
    /// SIGSYS: the VMM exits with status 7 and a line naming the call.
    #[default]
    Enforce,
    /// Allowed and logged by the kernel (`SECCOMP_RET_LOG`).
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!(
                "unknown seccomp mode {s:?}: use enforce, log or off"
            )),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The kinds of thread the VMM has, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// The main thread: builds the VM, then runs the event loop.
    Vmm,
    /// The HTTP API server.
    Api,
    /// A vCPU thread.
    Vcpu,
    /// The console writer.
    Console,
}

impl ThreadClass {
    /// Every class.
    pub const ALL: [ThreadClass; 4] = [Self::Vmm, Self::Api, Self::Vcpu, Self::Console];

    /// The class's name (as `VMM_TEST_FORBIDDEN_SYSCALL` spells it, and
    /// the thread's label in the SIGSYS line, except for vCPU threads,
    /// which are named `vcpuN`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Api => "api",
            Self::Vcpu => "vcpu",
            Self::Console => "console",
        }
    }
}

impl fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ThreadClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown thread class {s:?}: use vmm, api, vcpu or console"))
    }
}

/// Errors setting up or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list does not compile (a bug in the list).
    #[error("cannot compile the seccomp filter of the {0} thread")]
    Compile(ThreadClass, #[source] seccompiler::BackendError),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of thread {0}")]
    Install(String, #[source] seccompiler::Error),
    /// [`configure`] ran before.
    #[error("the seccomp filters are already configured")]
    AlreadyConfigured,
}

/// What [`configure`] sets up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// What a forbidden system call does.
    pub mode: SeccompMode,
    /// `--user`: the threads alive when privileges are dropped may make
    /// exactly its set-id calls.
    pub user: Option<User>,
    /// Test hook (`--test-hooks` and `VMM_TEST_FORBIDDEN_SYSCALL=CLASS`):
    /// the first thread of this class makes a forbidden system call
    /// (socket(2)) right after installing its filter.
    pub forbidden_syscall: Option<ThreadClass>,
}

/// The configured filters, compiled once.
struct Configured {
    settings: Settings,
    programs: HashMap<ThreadClass, BpfProgram>,
    clone3_enosys: BpfProgram,
}

static CONFIGURED: OnceLock<Configured> = OnceLock::new();

thread_local! {
    /// Whether this thread runs under an enforcing filter.
    static ENFORCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The filter of `class` in `mode` for this process, compiled (for
/// tests and diagnostics; `Off` compiles as `Log`).
pub fn compile(
    class: ThreadClass,
    mode: SeccompMode,
    user: Option<User>,
) -> Result<BpfProgram, SeccompError> {
    rules::compile(class, mode, &rules::Context::current(user))
}

/// How many system calls `class` may make (in some form), for reports.
pub fn allowed_count(class: ThreadClass, user: Option<User>) -> Result<usize, SeccompError> {
    rules::allowed(class, &rules::Context::current(user))
        .map(|a| a.len())
        .map_err(|e| SeccompError::Compile(class, e))
}

/// Compiles every filter for `settings` and, in enforce mode, installs
/// the SIGSYS handler. Call it once, before the VM's threads exist.
pub fn configure(settings: Settings) -> Result<(), SeccompError> {
    if CONFIGURED.get().is_some() {
        return Err(SeccompError::AlreadyConfigured);
    }
    let mut programs = HashMap::new();
    let mut clone3_enosys = BpfProgram::new();
    if settings.mode != SeccompMode::Off {
        warm_up::malloc();
        let ctx = rules::Context::current(settings.user);
        for class in ThreadClass::ALL {
            programs.insert(class, rules::compile(class, settings.mode, &ctx)?);
        }
        clone3_enosys = rules::clone3_enosys()?;
    }
    if settings.mode == SeccompMode::Enforce {
        sigsys::install().map_err(SeccompError::Handler)?;
    }
    CONFIGURED
        .set(Configured {
            settings,
            programs,
            clone3_enosys,
        })
        .map_err(|_| SeccompError::AlreadyConfigured)
}

/// The calling thread's label in the SIGSYS line: `vcpuN` for a vCPU
/// thread, the class's name otherwise.
fn label(class: ThreadClass) -> String {
    match class {
        ThreadClass::Vcpu => std::thread::current()
            .name()
            .unwrap_or(class.name())
            .to_owned(),
        _ => class.name().to_owned(),
    }
}

/// Installs the filter of `class` on the calling thread (nothing before
/// [`configure`], or with `--seccomp off`).
pub fn try_enter(class: ThreadClass) -> Result<(), SeccompError> {
    let Some(configured) = CONFIGURED.get() else {
        return Ok(());
    };
    let Some(program) = configured.programs.get(&class) else {
        return Ok(());
    };
    let label = label(class);
    sigsys::set_thread_label(&label);
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(label.clone(), e))
    };
    if class == ThreadClass::Vmm {
        install(&configured.clone3_enosys)?;
    }
    install(program)?;
    ENFORCED.with(|e| e.set(configured.settings.mode == SeccompMode::Enforce));
    log::debug!(
        "seccomp: thread {label} filtered ({})",
        configured.settings.mode
    );
    if configured.settings.forbidden_syscall == Some(class) {
        forbidden_syscall(&label);
    }
    Ok(())
}

/// [`try_enter`] for a thread that cannot report an error: a thread that
/// should be filtered and is not ends the VMM (status 1) with one line.
pub fn enter(class: ThreadClass) {
    if let Err(e) = try_enter(class) {
        let line = format!("vmm: error: {e}{}\n", error_chain(&e));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        sigsys::exit_now(ExitStatus::VmmError);
    }
}

/// The causes of `e`, each after ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Whether the calling thread runs under an enforcing filter (a
/// forbidden call would end the VMM): the panic path then avoids what
/// only a diagnosis needs (resolving a backtrace reads the executable).
pub fn enforced_here() -> bool {
    ENFORCED.with(std::cell::Cell::get)
}

/// The test hook: socket(2), which no list allows, once per process.
fn forbidden_syscall(label: &str) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    log::warn!("test hook: thread {label} makes a forbidden system call (socket)");
    // SAFETY: socket(2) takes no pointers; a descriptor it returns (in log
    // mode) is closed at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests;
