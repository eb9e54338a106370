//! The emulated KVM host, seen from the harness: builds its initramfs,
//! runs the outer QEMU (TCG, nested SVM), forwards the API socket over
//! its second serial port, and reads `testhost-init`'s markers.
//!
//! The outer QEMU runs with `-no-reboot`, so a reset of the emulated host
//! ends QEMU. Every step is bounded; a failure of the emulated host itself
//! (reset before ready, soft lockup) is [`Error::HostFailed`], which
//! [`crate::vm`] retries once.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::console::{Console, WaitError};
use crate::error::{Error, IoContext, Result};
use crate::job::{self, Job, Module};
use crate::mux::{Forwarder, Mux};

/// Bound on the emulated host's boot to `TESTHOST-READY` (measured: 3 to
/// 10 s, the latter with both cores busy compiling); a hung boot is retried.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The emulated host's kernel command line: console on ttyS0, captured
/// apart with the `host: ` prefix and not quiet (its full boot log costs no
/// measurable time and tells where a hung boot stopped); reboot at once on
/// a panic (QEMU then exits: `-no-reboot`).
/// `printk.devkmsg=on`: `testhost-init`'s silence report writes dozens of
/// records into `/dev/kmsg` at once, past the default rate limit.
pub const HOST_CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init printk.devkmsg=on";
/// Bound on QEMU connecting the forward link socket after its start.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// The emulated host's own files.
#[derive(Debug, Clone)]
pub struct HostImage {
    /// The outer kernel (Debian bzImage).
    pub kernel: PathBuf,
    /// `irqbypass`, `kvm`, `kvm-amd` in load order: (host path, parameters).
    pub modules: Vec<(PathBuf, String)>,
    /// The static `testhost-init` binary.
    pub init: PathBuf,
}

/// A file copied into the host initramfs.
#[derive(Debug, Clone)]
pub struct FileIn {
    /// Path inside the emulated host.
    pub inside: String,
    /// Path on this machine.
    pub host: PathBuf,
    /// Permission bits.
    pub mode: u32,
}

/// What the emulated host runs.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Files the program needs (binaries, guest kernel, guest initramfs).
    pub files: Vec<FileIn>,
    /// Program and arguments, with inside paths.
    pub argv: Vec<String>,
    /// Socket inside the emulated host that API channels connect to.
    pub api_socket: Option<String>,
    /// Bound on the program's run, enforced inside the emulated host.
    pub timeout: Duration,
}

/// Sizing of the outer QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Memory, QEMU syntax (`3G`).
    pub memory: String,
    /// vCPUs of the emulated host.
    pub cpus: u32,
    /// Appended to the emulated host's kernel command line
    /// (`E2E_HOST_APPEND`, for experiments).
    pub extra_append: String,
}

impl QemuConfig {
    /// The defaults of `environment.md`: 3 GiB, 2 vCPUs.
    pub fn new(binary: PathBuf) -> Self {
        QemuConfig {
            binary,
            memory: "3G".into(),
            cpus: 2,
            extra_append: std::env::var("E2E_HOST_APPEND").unwrap_or_default(),
        }
    }
}

/// Figures of one boot of the emulated host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostTimings {
    /// Harness launch to `TESTHOST-READY`.
    pub to_ready: Duration,
    /// The emulated host's uptime at `TESTHOST-READY` start of init.
    pub init_at: Option<Duration>,
    /// Time `testhost-init` took to load the modules.
    pub modules: Option<Duration>,
}

/// Writes the host initramfs: `testhost-init` as `/init`, the modules, the
/// payload's files and `/job.json`. Uncompressed: faster under emulation.
pub fn write_initramfs(out: &Path, image: &HostImage, payload: &Payload) -> Result<()> {
    let mut ar = resources::cpio::Archive::new();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "bin",
        "guest",
        "lib/modules",
    ] {
        ar.dir(dir, 0o755);
    }
    ar.char_device("dev/console", 0o600, 5, 1);
    ar.file_from_host("init", &image.init, 0o755)
        .ctx(|| format!("cannot read {}", image.init.display()))?;
    let mut modules = Vec::new();
    for (path, params) in &image.modules {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inside = format!("/lib/modules/{name}");
        ar.file_from_host(&inside, path, 0o644)
            .ctx(|| format!("cannot read {}", path.display()))?;
        modules.push(Module {
            path: inside,
            params: params.clone(),
        });
    }
    for f in &payload.files {
        ar.file_from_host(&f.inside, &f.host, f.mode)
            .ctx(|| format!("cannot read {}", f.host.display()))?;
    }
    let job = Job {
        modules,
        argv: payload.argv.clone(),
        api_socket: payload.api_socket.clone(),
        timeout_secs: payload.timeout.as_secs().max(1),
    };
    let json = serde_json::to_vec_pretty(&job)
        .map_err(|e| Error::io("cannot encode the job", e.into()))?;
    ar.bytes(job::JOB_PATH, json, 0o644);
    let file = std::fs::File::create(out).ctx(|| format!("cannot create {}", out.display()))?;
    ar.write_to(
        std::io::BufWriter::new(file),
        resources::cpio::Compression::None,
    )
    .ctx(|| format!("cannot write {}", out.display()))
}

/// The outer QEMU's own log of its CPUs' resets (with the registers at
/// the reset) and of what it calls guest errors (a triple fault among
/// them): the emulated host's failures leave their account here.
pub const QEMU_DEBUG_LOG: &str = "qemu-debug.log";
/// What the outer QEMU logs into [`QEMU_DEBUG_LOG`].
const QEMU_DEBUG_ITEMS: &str = "cpu_reset,guest_errors";

/// The outer QEMU's command line. Serial ports: ttyS0 the emulated host's
/// kernel console (`kcon` socket), ttyS1 the API forward (`link` socket),
/// ttyS2 the console of `testhost-init` and the job (stdio). Its own log
/// goes to `debug_log`.
pub fn qemu_command(
    cfg: &QemuConfig,
    kernel: &Path,
    initrd: &Path,
    sockets: (&Path, &Path),
    debug_log: &Path,
) -> Command {
    let (kcon, link) = sockets;
    let mut cmd = Command::new(&cfg.binary);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-d", QEMU_DEBUG_ITEMS, "-D"])
        .arg(debug_log)
        .args(["-m", &cfg.memory, "-smp", &cfg.cpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("{HOST_CMDLINE} {}", cfg.extra_append).trim_end())
        .arg("-chardev")
        .arg(format!("socket,id=kcon,path={}", kcon.display()))
        .args(["-serial", "chardev:kcon"])
        .arg("-chardev")
        .arg(format!("socket,id=fwd,path={}", link.display()))
        .args(["-serial", "chardev:fwd"])
        .args(["-serial", "stdio"]);
    cmd
}

/// A running emulated host.
#[derive(Debug)]
pub struct EmulatedHost {
    qemu: Child,
    console: Console,
    mux: Mux,
    link: UnixStream,
    forwarder: Option<Forwarder>,
    timings: HostTimings,
    /// `testhost-init` ends the job (and says so) after this long.
    job_timeout: Duration,
    /// The outer QEMU's own log ([`QEMU_DEBUG_LOG`]).
    debug_log: PathBuf,
    /// Console mark up to which `TESTHOST-EXIT` was looked for.
    exit_scan: usize,
    /// When `TESTHOST-EXIT` arrived (console time), once it did.
    exit_seen_at: Option<Duration>,
}

/// How long the emulated host has to power off after `TESTHOST-EXIT`
/// (it takes well under a second) before it is stopped.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// How long past the job's own bound `testhost-init` has to report it.
pub const JOB_REPORT_GRACE: Duration = Duration::from_secs(30);

/// A running emulated host whose kernel has not printed
/// [`job::ALIVE`] for this long has frozen (it prints it every
/// [`job::ALIVE_EVERY`]; seen: a host that stopped mid-hot-add with
/// `npt=0`, its console and the API silent from then on).
pub const FROZEN_AFTER: Duration = Duration::from_secs(30);

/// How often a launcher following a running VM asks for a failure of its
/// emulated host that does not end it by itself (a frozen host).
pub const HOST_CHECK_EVERY: Duration = Duration::from_secs(5);

/// If the heartbeat of the emulated host's kernel stopped: its last
/// [`job::ALIVE`] among `lines` (with their console times) is more than
/// [`FROZEN_AFTER`] before `now`. `None` before the first heartbeat.
pub fn frozen_host<'a>(
    lines: impl DoubleEndedIterator<Item = (Duration, &'a str)>,
    now: Duration,
) -> Option<String> {
    let last = lines
        .rev()
        .find(|(_, text)| text.starts_with(job::HOST_PREFIX) && text.contains(job::ALIVE))?
        .0;
    let silent = now.saturating_sub(last);
    (silent > FROZEN_AFTER).then(|| {
        format!(
            "the emulated host froze: its kernel's heartbeat stopped {}s ago",
            silent.as_secs()
        )
    })
}

impl EmulatedHost {
    /// Boots the emulated host once and waits for `TESTHOST-READY`.
    /// `workdir` holds the initramfs and the link socket; `api_socket`, if
    /// given, is served on this machine and forwarded inside.
    pub fn boot(
        cfg: &QemuConfig,
        image: &HostImage,
        payload: &Payload,
        workdir: &Path,
        api_socket: Option<&Path>,
        console: Console,
    ) -> Result<Self> {
        let initrd = workdir.join("host-initramfs.cpio");
        write_initramfs(&initrd, image, payload)?;
        let bind = |name: &str| {
            let path = workdir.join(name);
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
                .ctx(|| format!("cannot bind {}", path.display()))
                .map(|l| (l, path))
        };
        let (kcon_listener, kcon_path) = bind("ttyS0.sock")?;
        let (link_listener, link_path) = bind("ttyS1.sock")?;
        // Bind the user's socket (0600) before QEMU starts, so it exists on
        // return.
        let api_listener = match api_socket {
            Some(p) => Some((
                crate::mux::bind_private(p).ctx(|| format!("cannot bind {}", p.display()))?,
                p,
            )),
            None => None,
        };
        // Until the forwarder owns it, a failed boot removes the socket file.
        let socket_guard = RemoveOnDrop(api_socket.map(Path::to_path_buf));
        let debug_log = workdir.join(QEMU_DEBUG_LOG);
        let mut cmd = qemu_command(
            cfg,
            &image.kernel,
            &initrd,
            (&kcon_path, &link_path),
            &debug_log,
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sys::kill_with_parent(&mut cmd);
        // Own process group: a terminal's Ctrl-C reaches the harness only,
        // which then shuts everything down in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut qemu = cmd
            .spawn()
            .ctx(|| format!("cannot start {}", cfg.binary.display()))?;
        if let Some(out) = qemu.stdout.take() {
            console.attach(out, "");
        }
        if let Some(err) = qemu.stderr.take() {
            console.attach(err, "qemu: ");
        }
        let accepted = accept_link(&kcon_listener, &mut qemu)
            .and_then(|kcon| Ok((kcon, accept_link(&link_listener, &mut qemu)?)));
        let link = match accepted {
            Ok((kcon, link)) => {
                console.attach(kcon, job::HOST_PREFIX);
                link
            }
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        };
        let reader = link
            .try_clone()
            .ctx(|| "cannot clone the link socket".into())?;
        let writer = link
            .try_clone()
            .ctx(|| "cannot clone the link socket".into())?;
        let mux = Mux::listener(Box::new(reader), Box::new(writer))
            .ctx(|| "cannot start the API forward".into())?;
        let forwarder = api_listener.map(|(l, p)| Forwarder::serve(l, p, mux.clone()));
        socket_guard.disarm();
        let mut host = EmulatedHost {
            qemu,
            console,
            mux,
            link,
            forwarder,
            timings: HostTimings::default(),
            job_timeout: payload.timeout,
            debug_log,
            exit_scan: 0,
            exit_seen_at: None,
        };
        host.wait_ready()?;
        Ok(host)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let decisive = |l: &str| {
            l.starts_with(job::READY)
                || l.trim_start_matches(job::HOST_PREFIX)
                    .starts_with(job::ERROR)
                || job::host_failure(l).is_some()
                || job::host_panic(l)
        };
        let res = self.console.wait_for(decisive, READY_TIMEOUT);
        if let Err(WaitError::Timeout(t)) = res {
            return Err(Error::HostFailed(format!(
                "no {} within {t:?} (hung boot)",
                job::READY
            )));
        }
        let lines = self.console.lines();
        let texts = lines.iter().map(|l| l.text.as_str());
        match job::outcome(texts, true, res.is_err()) {
            job::Outcome::Done(_) => {
                let line = res.unwrap_or_default();
                self.timings = HostTimings {
                    to_ready: self.console.start().elapsed(),
                    init_at: job::field(&line, "init_ms").and_then(parse_ms),
                    modules: job::field(&line, "modules_ms").and_then(parse_ms),
                };
                Ok(())
            }
            job::Outcome::Error(line) => Err(Error::Testhost(line)),
            job::Outcome::HostFailed(why) => Err(Error::HostFailed(self.with_qemu_account(why))),
            job::Outcome::Running => Err(Error::HostFailed(
                self.with_qemu_account("no ready marker".into()),
            )),
        }
    }

    /// The console (outer kernel, `testhost-init`, VMM and guest lines).
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Figures of this boot.
    pub fn timings(&self) -> HostTimings {
        self.timings
    }

    /// The forward's multiplexer (for diagnostics).
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// The emulated host's own failure, if any: a soft lockup or stall of
    /// its kernel, or its end (QEMU's output closed) without
    /// `TESTHOST-EXIT` or `TESTHOST-ERROR`, i.e. a reset.
    pub fn failure(&self) -> Option<String> {
        let lines = self.console.lines();
        let texts = lines.iter().map(|l| l.text.as_str());
        match job::outcome(texts, false, self.console.closed()) {
            job::Outcome::HostFailed(why) => Some(self.with_qemu_account(why)),
            job::Outcome::Running => frozen_host(
                lines.iter().map(|l| (l.at, l.text.as_str())),
                self.console.start().elapsed(),
            ),
            _ => None,
        }
    }

    /// `why`, and what the outer QEMU logged of it, if anything.
    fn with_qemu_account(&self, why: String) -> String {
        match qemu_account(&self.debug_log) {
            Some(account) => format!("{why}; the outer QEMU: {account}"),
            None => why,
        }
    }

    /// Whether `TESTHOST-EXIT` came more than [`POWEROFF_GRACE`] ago while
    /// QEMU still runs. Reads the console from where it last stopped.
    fn hung_after_exit(&mut self) -> bool {
        if self.exit_seen_at.is_none() {
            let follow = self.console.follow(self.exit_scan);
            self.exit_scan = follow.next;
            self.exit_seen_at = follow
                .lines
                .iter()
                .find(|l| job::parse_exit(&l.text).is_some())
                .map(|l| l.at);
        }
        self.exit_seen_at
            .is_some_and(|at| self.console.start().elapsed().saturating_sub(at) > POWEROFF_GRACE)
    }

    /// The job's exit status from `TESTHOST-EXIT` once QEMU has ended;
    /// `None` while it runs.
    pub fn try_exit(&mut self) -> Result<Option<i32>> {
        match self.qemu.try_wait() {
            Ok(Some(_)) => {}
            Ok(None) if self.hung_after_exit() => {
                // The job's status is final once reported; a host that then
                // hangs on its way down (seen: an RCU stall of its kernel
                // during power-off) is stopped, not waited for.
                self.console.push(&format!(
                    "e2e: the emulated host did not power off within {}s of {}: stopping it",
                    POWEROFF_GRACE.as_secs(),
                    job::EXIT
                ));
                self.kill();
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(Error::io("cannot wait for QEMU", e)),
        }
        self.console.wait_closed(Duration::from_secs(5));
        let lines = self.console.lines();
        match job::outcome(lines.iter().map(|l| l.text.as_str()), false, true) {
            job::Outcome::Done(status) => Ok(Some(status.unwrap_or(-1))),
            job::Outcome::Error(line) => Err(Error::Testhost(line)),
            job::Outcome::HostFailed(why) => Err(Error::HostFailed(self.with_qemu_account(why))),
            job::Outcome::Running => Err(Error::HostFailed(
                self.with_qemu_account("QEMU exited".into()),
            )),
        }
    }

    /// Waits for QEMU to end and returns the job's exit status from
    /// `TESTHOST-EXIT`. Kills QEMU on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                if let Some(f) = self.failure() {
                    return Err(Error::HostFailed(f));
                }
                if let Some(f) = silent_host(timeout, self.job_timeout) {
                    return Err(Error::HostFailed(f));
                }
                return Err(Error::Timeout {
                    what: format!("the emulated host to power off ({})", job::EXIT),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU (idempotent).
    pub fn kill(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
        }
        let _ = self.qemu.wait();
        self.mux.close("emulated host stopped");
        let _ = self.link.shutdown(std::net::Shutdown::Both);
    }

    /// The forwarded socket path on this machine, if any.
    pub fn api_socket(&self) -> Option<&Path> {
        self.forwarder.as_ref().map(Forwarder::path)
    }
}

impl Drop for EmulatedHost {
    fn drop(&mut self) {
        self.kill();
        self.forwarder.take();
    }
}

/// Removes a file on drop unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn parse_ms(v: &str) -> Option<Duration> {
    v.parse::<u64>().ok().map(Duration::from_millis)
}

fn accept_link(listener: &UnixListener, qemu: &mut Child) -> Result<UnixStream> {
    listener
        .set_nonblocking(true)
        .ctx(|| "cannot poll the link socket".into())?;
    let deadline = Instant::now() + LINK_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .ctx(|| "cannot configure the link socket".into())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("cannot accept QEMU's link connection", e)),
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(Error::Exited(format!(
                "QEMU to connect its serial link (QEMU exited: {status})"
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "QEMU to connect its serial link".into(),
                timeout: LINK_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scratch directory removed on drop (kept with `E2E_KEEP=1`).
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates a fresh directory under the system temp dir: a name no
    /// other process (of any PID namespace sharing the directory) has, made
    /// with `mkdir` so it is never someone else's.
    pub fn new(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let salt: u32 = rand::random();
            let dir = std::env::temp_dir()
                .join(format!("e2e-{tag}-{}-{n}-{salt:08x}", std::process::id()));
            // 0700: the serial and API sockets inside are this user's.
            let made =
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                    .create(&dir);
            match made {
                Ok(()) => return Ok(WorkDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The outer QEMU's account of a failure, from its [`QEMU_DEBUG_LOG`]:
/// its last few messages that are not register dumps ("Triple fault", a
/// guest error), escaped, newest last; `None` if it logged none. Reads at
/// most the log's last 64 KiB.
pub fn qemu_account(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 << 10;
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut bytes = Vec::new();
    file.take(TAIL).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    // Register dumps are `NAME=value` lines (`RAX=`, `ES =`, `CR0=`, ...).
    let dump = |l: &str| l.find('=').is_some_and(|i| i <= 5);
    let mut said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !dump(l) && !l.starts_with("CPU Reset"))
        .collect();
    said.dedup();
    let start = said.len().saturating_sub(3);
    let said = &said[start..];
    (!said.is_empty()).then(|| {
        said.iter()
            .map(|l| {
                l.chars()
                    .take(200)
                    .collect::<String>()
                    .escape_debug()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(" | ")
    })
}

/// A wait of `waited` for `TESTHOST-EXIT` that saw neither it nor
/// `TESTHOST-ERROR`: when that is longer than the job's own bound plus
/// `JOB_REPORT_GRACE`, `testhost-init` (which ends a job at its bound and
/// reports it) could not run either, so the emulated host itself stopped
/// (seen: a host that reached ready and then never answered again).
pub fn silent_host(waited: Duration, job_timeout: Duration) -> Option<String> {
    (waited >= job_timeout + JOB_REPORT_GRACE).then(|| {
        format!(
            "the emulated host stopped responding: no {} or job-timeout report \
             within {}s, past the job's own {}s bound (hang after ready)",
            job::EXIT,
            waited.as_secs(),
            job_timeout.as_secs()
        )
    })
}

#[cfg(test)]
mod silent_tests {
    use super::*;

    #[test]
    fn a_host_silent_past_the_jobs_bound_is_the_hosts_failure() {
        let s = Duration::from_secs;
        assert!(silent_host(s(120), s(60)).is_some());
        assert!(silent_host(s(80), s(60)).is_none());
    }

    #[test]
    fn a_host_whose_heartbeat_stopped_has_frozen() {
        let s = Duration::from_secs;
        let alive = "host: [   12.5] TESTHOST-ALIVE up_ms=12500";
        let lines = [
            (s(10), alive),
            (s(14), "GUEST-CPU online=0-1"),
            (s(15), alive),
        ];
        assert_eq!(frozen_host(lines.iter().copied(), s(40)), None);
        let why = frozen_host(lines.iter().copied(), s(50)).unwrap();
        assert!(why.contains("froze") && why.contains("35s"), "{why}");
        // Only the host's kernel console counts, and no heartbeat yet is
        // no verdict.
        let guest = [(s(1), "TESTHOST-ALIVE from the guest")];
        assert_eq!(frozen_host(guest.iter().copied(), s(100)), None);
        assert_eq!(frozen_host(std::iter::empty(), s(100)), None);
    }

    #[test]
    fn the_outer_qemus_account_skips_register_dumps() {
        let dir = std::env::temp_dir().join(format!("qemu-account-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(QEMU_DEBUG_LOG);
        assert_eq!(qemu_account(&log), None, "no log");
        std::fs::write(
            &log,
            "CPU Reset (CPU 0)\nRAX=0000 RBX=0000\nES =0000 00000000\nCR0=60000010\n\n",
        )
        .unwrap();
        assert_eq!(qemu_account(&log), None, "boot resets only");
        std::fs::write(
            &log,
            "CPU Reset (CPU 1)\nRAX=0000\nwrite to unknown port 0x80\x1b[2J\nTriple fault\nTriple fault\n",
        )
        .unwrap();
        assert_eq!(
            qemu_account(&log).as_deref(),
            Some("write to unknown port 0x80\\u{1b}[2J | Triple fault")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
