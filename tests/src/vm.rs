//! The one way every end-to-end test and the `launch` binary start a VM:
//! [`VmSpec`] -> [`launch`] -> [`RunningVm`].
//!
//! [`launch`] picks the host ([`crate::host`]), prepares the artifacts
//! (guest image, static `vmm`, `testhost-init`), and starts the VMM
//! directly or inside the emulated host. A failed boot of the emulated
//! host itself is retried once (noted in the console log); failures of our
//! VMM or guest never are. [`run`] does the same for a whole scenario.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::artifacts;
use crate::console::{Console, Echo, WaitError};
use crate::emulated::{EmulatedHost, FileIn, HostTimings, Payload, QemuConfig, WorkDir};
use crate::error::{AfterFailure, BoxError, Error, IoContext, Result};
use crate::host::{self, HostKind};
use crate::locks::{self, HostSlot, SocketLock, SuiteLock};
/// The VMM's API socket inside the emulated host.
const INSIDE_API_SOCKET: &str = "/run/vmm.sock";

/// Which image of the guest kernel the VMM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKernel {
    /// The bzImage (Linux boot protocol; the guest decompresses itself).
    BzImage,
    /// The vmlinux ELF through its PVH entry (no decompression: faster
    /// under emulation, a larger file to load).
    Vmlinux,
}

impl GuestKernel {
    /// `E2E_GUEST_KERNEL=bzimage|vmlinux`, else `default`.
    pub fn from_env(default: GuestKernel) -> GuestKernel {
        match std::env::var("E2E_GUEST_KERNEL").as_deref() {
            Ok("bzimage") => GuestKernel::BzImage,
            Ok("vmlinux") => GuestKernel::Vmlinux,
            _ => default,
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Which kernel image to boot (default: the PVH vmlinux, about twice
    /// as fast to boot inside the emulated host; `E2E_GUEST_KERNEL`).
    pub kernel: GuestKernel,
    /// vCPUs online at boot.
    pub boot_vcpus: u32,
    /// Hotplug ceiling.
    pub max_vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Replaces the guest image's command line (the launcher's `--cmdline`).
    pub base_cmdline: Option<String>,
    /// Appended to the command line (the launcher's `--append`).
    pub extra_cmdline: Vec<String>,
    /// Extra VMM arguments after the standard ones (e.g. `--test-hooks`).
    pub extra_vmm_args: Vec<String>,
    /// API socket path on this machine; default: in the run's work dir.
    pub api_socket: Option<PathBuf>,
    /// Force a host kind; default: [`host::select`] (honours `E2E_HOST`).
    pub host: Option<HostKind>,
    /// Bound on the whole run (the VMM is killed after it).
    pub timeout: Duration,
    /// Where console lines are echoed as they arrive.
    pub echo: Echo,
    /// Boot this initramfs instead of the guest image's (the launcher's
    /// `--add`/`--run`: the image's plus the user's files).
    pub initramfs: Option<PathBuf>,
    /// Take the test suite's machine-wide lock ([`locks::SuiteLock`]) for
    /// the VM's life: on by default (`E2E_SUITE_LOCK=0` turns it off), off
    /// in the launcher. VMs never share an API socket either way.
    pub suite_lock: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            kernel: GuestKernel::from_env(GuestKernel::Vmlinux),
            boot_vcpus: 1,
            max_vcpus: 1,
            memory_mib: 256,
            base_cmdline: None,
            extra_cmdline: Vec::new(),
            extra_vmm_args: Vec::new(),
            api_socket: None,
            host: None,
            timeout: Duration::from_secs(300),
            echo: default_echo(),
            initramfs: None,
            suite_lock: locks::suite_lock_from_env(true),
        }
    }
}

impl VmSpec {
    /// `boot` vCPUs online at boot, up to `max`.
    pub fn new(boot_vcpus: u32, max_vcpus: u32) -> Self {
        VmSpec {
            boot_vcpus,
            max_vcpus,
            ..Self::default()
        }
    }

    /// Adds guest command line parameters.
    pub fn cmdline(mut self, params: &str) -> Self {
        self.extra_cmdline
            .extend(params.split_whitespace().map(str::to_string));
        self
    }

    /// Adds an argument to the VMM's command line.
    pub fn vmm_arg(mut self, arg: &str) -> Self {
        self.extra_vmm_args.push(arg.to_string());
        self
    }

    /// Bounds the whole run (inside the emulated host: the VMM is killed
    /// after it, with a dump of its threads).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The VMM's arguments after the binary, with the given paths and the
    /// image's default command line (which [`Self::base_cmdline`] replaces).
    pub fn vmm_args(&self, kernel: &str, initramfs: &str, cmdline: &str, api: &str) -> Vec<String> {
        let cmdline = api::options::compose_cmdline(
            cmdline,
            self.base_cmdline.as_deref(),
            Some(&self.extra_cmdline.join(" ")),
        );
        [
            "--kernel",
            kernel,
            "--initramfs",
            initramfs,
            "--cmdline",
            &cmdline,
            "--cpus",
            &format!("boot={},max={}", self.boot_vcpus, self.max_vcpus),
            "--memory",
            &format!("{}M", self.memory_mib),
            "--api-socket",
            api,
            "--serial",
            "stdout",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.extra_vmm_args.iter().cloned())
        .collect()
    }
}

/// `E2E_ECHO=1` echoes consoles to stderr live.
pub fn default_echo() -> Echo {
    match std::env::var("E2E_ECHO").as_deref() {
        Ok("1") | Ok("true") => Echo::Stderr,
        _ => Echo::Off,
    }
}

/// A job for the emulated host that needs no VMM (proves the host works).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostJob {
    /// `testhost-init kvm-selftest`: a VM and a vCPU run real-mode code.
    KvmSelftest,
    /// `testhost-init echo-server`: an echo server behind the API socket.
    EchoServer,
}

enum Backend {
    Direct(Child),
    Emulated(Box<EmulatedHost>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Direct(c) => write!(f, "Direct(pid {})", c.id()),
            Backend::Emulated(h) => h.fmt(f),
        }
    }
}

/// A launched VM (or host job). Dropping it kills everything it started.
#[derive(Debug)]
pub struct RunningVm {
    kind: HostKind,
    backend: Backend,
    console: Console,
    api_socket: PathBuf,
    retried: Option<String>,
    _workdir: WorkDir,
    _leases: Arc<Leases>,
}

/// The locks a VM holds for its life, across a retried boot too (see
/// [`crate::locks`]).
#[derive(Debug)]
struct Leases {
    _suite: Option<SuiteLock>,
    _socket: Option<SocketLock>,
    _slot: Option<HostSlot>,
}

impl Leases {
    /// Suite lock first (waits), then the socket (fails at once when taken),
    /// then an emulated-host slot (waits).
    fn take(plan: &Plan) -> Result<Arc<Leases>> {
        let suite = if plan.suite_lock {
            Some(SuiteLock::acquire()?)
        } else {
            None
        };
        let socket = match &plan.api_socket {
            Some(p) => Some(SocketLock::acquire(p)?),
            None => None,
        };
        let slot = match plan.kind {
            HostKind::Emulated => HostSlot::acquire(locks::max_emulated_hosts())?,
            HostKind::Direct => None,
        };
        Ok(Arc::new(Leases {
            _suite: suite,
            _socket: socket,
            _slot: slot,
        }))
    }
}

/// Everything needed to start one attempt.
#[derive(Debug, Clone)]
struct Plan {
    kind: HostKind,
    /// Direct: full argv on this machine.
    direct_argv: Vec<String>,
    /// Emulated: the payload and QEMU.
    payload: Option<(Payload, QemuConfig, crate::emulated::HostImage)>,
    api_socket: Option<PathBuf>,
    echo: Echo,
    suite_lock: bool,
}

/// Launches the VMM as `spec` says; retries a failed emulated-host boot once.
/// The VM lives no longer than the thread that launched it (its processes
/// get SIGKILL when that thread ends: `sys::kill_with_parent`), so launch
/// VMs that run side by side from threads that outlive them.
pub fn launch(spec: &VmSpec) -> Result<RunningVm> {
    let plan = plan_vm(spec)?;
    launch_plan(&plan)
}

/// Boots the emulated host with a job that needs no VMM.
pub fn launch_host_job(
    job: HostJob,
    api_socket: Option<PathBuf>,
    timeout: Duration,
) -> Result<RunningVm> {
    let (image, qemu) = emulated_host()?;
    launch_host_job_on(qemu, image, job, api_socket, timeout)
}

/// [`launch_host_job`] with a given QEMU and host image (the harness's own
/// tests use a fake QEMU).
pub fn launch_host_job_on(
    qemu: QemuConfig,
    image: crate::emulated::HostImage,
    job: HostJob,
    api_socket: Option<PathBuf>,
    timeout: Duration,
) -> Result<RunningVm> {
    let argv = match job {
        HostJob::KvmSelftest => vec!["/init".to_string(), "kvm-selftest".to_string()],
        HostJob::EchoServer => vec![
            "/init".to_string(),
            "echo-server".to_string(),
            INSIDE_API_SOCKET.to_string(),
        ],
    };
    let payload = Payload {
        files: Vec::new(),
        argv,
        api_socket: (job == HostJob::EchoServer).then(|| INSIDE_API_SOCKET.to_string()),
        timeout,
    };
    launch_plan(&Plan {
        kind: HostKind::Emulated,
        direct_argv: Vec::new(),
        payload: Some((payload, qemu, image)),
        api_socket,
        echo: default_echo(),
        suite_lock: locks::suite_lock_from_env(true),
    })
}

/// Boots the emulated host with any program and files (the benchmarks:
/// `testhost-init bench` with both VMMs and their files); no API forward.
pub fn launch_emulated_payload(
    files: Vec<FileIn>,
    argv: Vec<String>,
    timeout: Duration,
) -> Result<RunningVm> {
    let (image, qemu) = emulated_host()?;
    let payload = Payload {
        files,
        argv,
        api_socket: None,
        timeout,
    };
    launch_plan(&Plan {
        kind: HostKind::Emulated,
        direct_argv: Vec::new(),
        payload: Some((payload, qemu, image)),
        api_socket: None,
        echo: default_echo(),
        suite_lock: locks::suite_lock_from_env(true),
    })
}

/// How long a failed scenario waits for the emulated host to show whether
/// it died under it (its console closes when QEMU ends).
const HOST_DEATH_GRACE: Duration = Duration::from_secs(5);

/// Launches `spec`, runs `scenario` on it, and retries the whole once if
/// the emulated host itself failed. On failure the console log goes to
/// stderr (shown by the test runner).
pub fn run<T>(
    spec: &VmSpec,
    mut scenario: impl FnMut(&mut RunningVm) -> std::result::Result<T, BoxError>,
) -> Result<T> {
    let plan = plan_vm(spec)?;
    let leases = Leases::take(&plan)?;
    // The first attempt's classified failure and its `E2E-RETRY:` note.
    let mut retried: Option<(String, String)> = None;
    loop {
        let mut vm = match boot_once(&plan, &leases) {
            Ok(vm) => vm,
            Err(e) if e.is_host_failure() && retried.is_none() => {
                retried = Some((e.to_string(), note_retry(&e)));
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some((_, note)) = &retried {
            vm.note_retry(note);
        }
        match scenario(&mut vm) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let host_failed = vm
                    .host_failure_after(HOST_DEATH_GRACE)
                    .or_else(|| {
                        e.downcast_ref::<Error>()
                            .filter(|e| e.is_host_failure())
                            .map(Error::to_string)
                    })
                    .or_else(|| vm.nested_guest_failure());
                let first = retried.as_ref().map(|(f, _)| f.as_str());
                match crate::error::after_failure(host_failed, first, e) {
                    AfterFailure::Retry(f) => {
                        eprintln!(
                            "--- console log of the failed attempt ---\n{}--- end ---",
                            vm.console_log()
                        );
                        let e = Error::HostFailed(f);
                        retried = Some((e.to_string(), note_retry(&e)));
                        note_last_lines(&vm);
                        continue;
                    }
                    AfterFailure::Fail(e) => {
                        eprintln!(
                            "--- console log ---\n{}--- end of console log ---",
                            vm.console_log()
                        );
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// The failed attempt's last console lines, escaped, past the test
/// runner's capture (like the `E2E-RETRY:` line), so that a retry that
/// then passes still shows what the failure looked like.
fn note_last_lines(vm: &RunningVm) {
    use std::io::Write;
    let lines = vm.console().lines();
    let mut out = std::io::stderr().lock();
    for l in lines.iter().rev().take(12).rev() {
        let _ = writeln!(
            out,
            "E2E-RETRY-CONSOLE: [{:>9.3}] {}",
            l.at.as_secs_f64(),
            api::cli::escape::field(&l.text)
        );
    }
}

fn note_retry(e: &Error) -> String {
    let note = format!("E2E-RETRY: {e}; booting the emulated host once more");
    // Past the test runner's capture: a retry shows even when it passes.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{note}");
    note
}

fn launch_plan(plan: &Plan) -> Result<RunningVm> {
    let leases = Leases::take(plan)?;
    match boot_once(plan, &leases) {
        Err(e) if e.is_host_failure() => {
            let note = note_retry(&e);
            let mut vm = boot_once(plan, &leases)?;
            vm.note_retry(&note);
            Ok(vm)
        }
        other => other,
    }
}

fn boot_once(plan: &Plan, leases: &Arc<Leases>) -> Result<RunningVm> {
    let workdir = WorkDir::new("vm")?;
    let api_socket = plan
        .api_socket
        .clone()
        .unwrap_or_else(|| workdir.path().join("api.sock"));
    let console = Console::new(plan.echo);
    let backend = match &plan.payload {
        Some((payload, qemu, image)) => {
            let host = EmulatedHost::boot(
                qemu,
                image,
                payload,
                workdir.path(),
                payload.api_socket.as_ref().map(|_| api_socket.as_path()),
                console.clone(),
            );
            match host {
                Ok(host) => Backend::Emulated(Box::new(host)),
                Err(e) => {
                    // Rare and worth seeing even if the retry passes.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "--- console of the failed boot ({e}) ---\n{}--- end ---",
                        console.tail(80)
                    );
                    return Err(e);
                }
            }
        }
        None => {
            crate::mux::remove_stale_socket(&api_socket)
                .ctx(|| format!("cannot use {}", api_socket.display()))?;
            let argv: Vec<String> = plan
                .direct_argv
                .iter()
                .map(|a| a.replace("{api}", &api_socket.to_string_lossy()))
                .collect();
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            crate::sys::kill_with_parent(&mut cmd);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let mut child = cmd.spawn().ctx(|| format!("cannot start {}", argv[0]))?;
            if let Some(out) = child.stdout.take() {
                console.attach(out, "");
            }
            if let Some(err) = child.stderr.take() {
                console.attach(err, "");
            }
            Backend::Direct(child)
        }
    };
    Ok(RunningVm {
        kind: plan.kind,
        backend,
        console,
        api_socket,
        retried: None,
        _workdir: workdir,
        _leases: Arc::clone(leases),
    })
}

fn emulated_host() -> Result<(crate::emulated::HostImage, QemuConfig)> {
    let facts = host::HostFacts::probe();
    let qemu = facts.qemu.ok_or_else(|| {
        host::SelectError::Unavailable(format!("{} is not installed", host::QEMU_NAME))
    })?;
    Ok((artifacts::host_image()?, QemuConfig::new(qemu)))
}

fn plan_vm(spec: &VmSpec) -> Result<Plan> {
    let kind = match spec.host {
        Some(k) => k,
        None => host::select()?.0,
    };
    let guest = artifacts::guest_image()?;
    let kernel = match spec.kernel {
        GuestKernel::BzImage => guest.bzimage.clone(),
        GuestKernel::Vmlinux => guest.vmlinux.clone(),
    };
    let vmm = artifacts::vmm_binary()?;
    let initramfs = spec.initramfs.as_ref().unwrap_or(&guest.initramfs);
    let mut plan = Plan {
        kind,
        direct_argv: Vec::new(),
        payload: None,
        api_socket: spec.api_socket.clone(),
        echo: spec.echo,
        suite_lock: spec.suite_lock,
    };
    match kind {
        HostKind::Direct => {
            plan.direct_argv.push(vmm.to_string_lossy().into_owned());
            plan.direct_argv.extend(spec.vmm_args(
                &kernel.to_string_lossy(),
                &initramfs.to_string_lossy(),
                &guest.cmdline,
                "{api}",
            ));
        }
        HostKind::Emulated => {
            let (image, qemu) = emulated_host()?;
            let mut argv = vec!["/bin/vmm".to_string()];
            argv.extend(spec.vmm_args(
                "/guest/kernel",
                "/guest/initramfs",
                &guest.cmdline,
                INSIDE_API_SOCKET,
            ));
            let payload = Payload {
                files: vec![
                    file_in("/bin/vmm", &vmm, 0o755),
                    file_in("/guest/kernel", &kernel, 0o644),
                    file_in("/guest/initramfs", initramfs, 0o644),
                ],
                argv,
                api_socket: Some(INSIDE_API_SOCKET.to_string()),
                timeout: spec.timeout,
            };
            plan.payload = Some((payload, qemu, image));
        }
    }
    Ok(plan)
}

fn file_in(inside: &str, host: &Path, mode: u32) -> FileIn {
    FileIn {
        inside: inside.to_string(),
        host: host.to_path_buf(),
        mode,
    }
}

/// What a console wait looks for: a substring or a predicate.
pub trait Matcher {
    /// True if `line` matches.
    fn matches(&self, line: &str) -> bool;
}

impl Matcher for &str {
    fn matches(&self, line: &str) -> bool {
        line.contains(*self)
    }
}

impl Matcher for String {
    fn matches(&self, line: &str) -> bool {
        line.contains(self.as_str())
    }
}

impl<F: Fn(&str) -> bool> Matcher for F {
    fn matches(&self, line: &str) -> bool {
        self(line)
    }
}

impl RunningVm {
    /// Where the VMM runs.
    pub fn host_kind(&self) -> HostKind {
        self.kind
    }

    /// The VMM's API socket on this machine (forwarded when emulated).
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The captured console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Figures of the emulated host's boot (`None` when direct).
    pub fn host_timings(&self) -> Option<HostTimings> {
        match &self.backend {
            Backend::Emulated(h) => Some(h.timings()),
            Backend::Direct(_) => None,
        }
    }

    /// The retry note, if this VM is a second attempt.
    pub fn retried(&self) -> Option<&str> {
        self.retried.as_deref()
    }

    fn note_retry(&mut self, note: &str) {
        self.console.push(&format!("harness: {note}"));
        self.retried = Some(note.to_string());
    }

    /// A mark for [`RunningVm::wait_for_console_after`]: lines so far.
    pub fn console_mark(&self) -> usize {
        self.console.len()
    }

    /// The first console line (since launch) matching `pattern`.
    pub fn wait_for_console(&self, pattern: impl Matcher, timeout: Duration) -> Result<String> {
        self.wait_for_console_after(0, pattern, timeout)
            .map(|(_, l)| l)
    }

    /// The first console line at or after `mark` matching `pattern`, with
    /// its index. Fails early when the VMM exits.
    pub fn wait_for_console_after(
        &self,
        mark: usize,
        pattern: impl Matcher,
        timeout: Duration,
    ) -> Result<(usize, String)> {
        let what = "a console line";
        self.console
            .wait_for_after(mark, |l| pattern.matches(l), timeout)
            .map_err(|e| {
                if let Some(f) = self.host_failure() {
                    return Error::HostFailed(f);
                }
                match e {
                    WaitError::Timeout(timeout) => Error::Timeout {
                        what: what.into(),
                        timeout,
                    },
                    WaitError::Closed => Error::Exited(what.into()),
                }
            })
    }

    /// All console lines so far, `[seconds] text` each.
    pub fn console_log(&self) -> String {
        self.console.log()
    }

    /// The emulated host's own failure (soft lockup, reset), if seen.
    pub fn host_failure(&self) -> Option<String> {
        match &self.backend {
            Backend::Emulated(h) => h.failure(),
            Backend::Direct(_) => None,
        }
    }

    /// In the emulated host only: the nested guest's kernel failed in a way
    /// the nested virtualization causes (see
    /// [`crate::job::nested_guest_failure`]), with the line that shows it.
    pub fn nested_guest_failure(&self) -> Option<String> {
        match &self.backend {
            Backend::Emulated(_) => self
                .console
                .lines()
                .iter()
                .find(|l| crate::job::nested_guest_failure(&l.text).is_some())
                .map(|l| {
                    format!(
                        "the nested guest failed as it does under this emulated host's nested \
                         virtualization (QEMU too): {}",
                        l.text
                    )
                }),
            Backend::Direct(_) => None,
        }
    }

    /// [`Self::host_failure`], after giving a dying emulated host up to
    /// `grace` to finish dying: a scenario that lost its API connection may
    /// notice before the host's console has closed.
    pub fn host_failure_after(&self, grace: Duration) -> Option<String> {
        if let Backend::Emulated(h) = &self.backend {
            h.console().wait_closed(grace);
        }
        self.host_failure()
    }

    /// The VMM's exit status (128+signal if killed) once it has exited;
    /// `None` while it runs.
    pub fn try_exit(&mut self) -> Result<Option<i32>> {
        match &mut self.backend {
            Backend::Emulated(h) => h.try_exit(),
            Backend::Direct(child) => {
                use std::os::unix::process::ExitStatusExt;
                let Some(status) = child.try_wait().ctx(|| "cannot wait for the VMM".into())?
                else {
                    return Ok(None);
                };
                self.console.wait_closed(Duration::from_secs(5));
                Ok(Some(status.code().unwrap_or_else(|| {
                    crate::job::signal_status(status.signal().unwrap_or(0))
                })))
            }
        }
    }

    /// Waits for the VMM to exit; its status (128+signal if killed). On
    /// timeout everything is killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        if let Backend::Emulated(h) = &mut self.backend {
            return h.wait_exit(timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::Timeout {
                    what: "the VMM to exit".into(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the VMM (and the emulated host). Idempotent.
    pub fn kill(&mut self) {
        match &mut self.backend {
            Backend::Emulated(h) => h.kill(),
            Backend::Direct(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
        if let Backend::Direct(_) = self.backend {
            let _ = std::fs::remove_file(&self.api_socket);
        }
    }
}
