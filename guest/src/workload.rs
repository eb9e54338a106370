//! The user's workload: a program the launcher put in the initramfs with
//! its description at [`SPEC_PATH`] (`agent_proto::workload`), which the
//! agent starts as its child, beside itself, once it is ready.
//!
//! The workload gets what a program expects of a small Linux system:
//! `/proc`, `/sys` and `/dev` (mounted by PID 1 already), a writable
//! `/tmp`, `/dev/shm` (tmpfs) and `/dev/pts`, `HOME=/root`, `PATH` and a
//! few more variables (`WorkloadSpec::environment`), a root entry in
//! `/etc/passwd` and `/etc/group` unless the user brought their own, the
//! loopback interface up, stdin on `/dev/null`, its own process group (a
//! `kill(0, ...)` of its own cannot reach the agent), `/` as its working
//! directory unless told otherwise.
//!
//! Its stdout and stderr are pipes the event loop polls: the bytes become
//! bounded lines and `workload_output` messages, at most
//! [`WINDOW`] of them unacknowledged by the VMM; while the window is full
//! the pipes are not read, so a slow host slows the workload down instead
//! of losing its output. When it exits (the agent reaps it on SIGCHLD),
//! what is left in the pipes is forwarded (for at most [`DRAIN_LIMIT`]: a
//! background child may keep them open), then `workload_exit`, and the
//! agent powers the guest off.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_proto::agent::{encode, GuestMessage};
use agent_proto::workload::{pack_output, LineSplitter, WorkloadSpec, WorkloadStream, WINDOW};

pub use agent_proto::workload::SPEC_PATH;

/// After the workload exited, how long its pipes may stay open before the
/// agent stops reading them and reports the exit.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Bytes of complete lines held at most before the pipes are left unread.
const READY_LIMIT: usize = 64 * 1024;
/// Bytes read per pipe per loop turn at most.
const READ_BUDGET: usize = 64 * 1024;

/// Reads the description at `path`: `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<WorkloadSpec>, String> {
    match std::fs::read(path) {
        Ok(bytes) => WorkloadSpec::from_json(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Sets up the system around the workload (see the module docs); returns
/// what could not be done, for the console. PID 1 only.
pub fn prepare_environment() -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |what: &str, r: io::Result<()>| {
        if let Err(e) = r {
            problems.push(format!("{what}: {e}"));
        }
    };
    for dir in ["/root", "/run", "/tmp", "/etc", "/dev/shm", "/dev/pts"] {
        note(dir, std::fs::create_dir_all(dir));
    }
    note("/tmp", set_mode("/tmp", 0o1777));
    note("/dev/shm", mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777"));
    note(
        "/dev/pts",
        mount("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666"),
    );
    for (path, text) in [
        ("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("/etc/group", "root:x:0:\n"),
    ] {
        if !Path::new(path).exists() {
            note(path, std::fs::write(path, text));
        }
    }
    note("loopback", loopback_up());
    problems
}

fn set_mode(path: &str, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    let c = |s: &str| {
        std::ffi::CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: four NUL-terminated strings that outlive the call; mount(2)
    // keeps none of them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Ok(())
}

/// Brings `lo` up (SIOCSIFFLAGS), so programs can talk to 127.0.0.1.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: req is a live ifreq naming the interface; the kernel writes
    // its flags into the union.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled ifru_flags, the union member read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; the kernel reads the name and the flags.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One of the workload's output pipes.
#[derive(Debug)]
struct Output {
    stream: WorkloadStream,
    pipe: Option<File>,
    splitter: LineSplitter,
}

/// A started workload (see the module docs).
#[derive(Debug)]
pub struct Workload {
    pid: u32,
    outputs: [Output; 2],
    /// Complete lines not sent yet, in order per stream.
    ready: VecDeque<(WorkloadStream, String)>,
    ready_bytes: usize,
    /// `workload_output` messages the VMM has not acknowledged.
    unacked: u32,
    /// (exit status, signal) once reaped, and when.
    exit: Option<(Option<i32>, Option<i32>, Instant)>,
    lines: u64,
    lost: u64,
}

/// Why the workload could not start: the `workload_failed` message.
pub fn failure(reason: String, not_found: bool) -> GuestMessage {
    GuestMessage::WorkloadFailed { reason, not_found }
}

fn nonblocking_file(fd: impl Into<OwnedFd>) -> io::Result<File> {
    let fd: OwnedFd = fd.into();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: fcntl with F_GETFL takes no pointer.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: fcntl with F_SETFL takes an int.
    if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

impl Workload {
    /// Starts `spec` (see the module docs); the `workload_failed` message
    /// when it cannot.
    pub fn start(spec: &WorkloadSpec) -> Result<Self, GuestMessage> {
        spec.validate().map_err(|e| failure(e.to_string(), false))?;
        let program = &spec.argv[0];
        let cwd = spec.cwd.as_deref().unwrap_or("/");
        if !Path::new(cwd).is_dir() {
            return Err(failure(
                format!("the working directory {cwd:?} does not exist"),
                false,
            ));
        }
        let mut cmd = Command::new(program);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(spec.environment())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            let not_found = e.kind() == io::ErrorKind::NotFound;
            let hint = if not_found {
                " (no such program in the guest, or it is dynamically linked and its \
                 ELF interpreter is missing: link it statically or add its libraries)"
            } else {
                ""
            };
            failure(format!("cannot run {program:?}: {e}{hint}"), not_found)
        })?;
        let pid = child.id();
        let pipes = (child.stdout.take(), child.stderr.take());
        // The child is reaped by the event loop (`init::reap_children`),
        // never through `child`: dropping it neither waits nor kills.
        drop(child);
        let open = |p: Option<OwnedFd>| p.map(nonblocking_file).transpose();
        let (out, err) = match (open(pipes.0.map(Into::into)), open(pipes.1.map(Into::into))) {
            (Ok(out), Ok(err)) => (out, err),
            (Err(e), _) | (_, Err(e)) => {
                return Err(failure(
                    format!("cannot read the workload's output: {e}"),
                    false,
                ))
            }
        };
        Ok(Self {
            pid,
            outputs: [
                Output {
                    stream: WorkloadStream::Out,
                    pipe: out,
                    splitter: LineSplitter::new(),
                },
                Output {
                    stream: WorkloadStream::Err,
                    pipe: err,
                    splitter: LineSplitter::new(),
                },
            ],
            ready: VecDeque::new(),
            ready_bytes: 0,
            unacked: 0,
            exit: None,
            lines: 0,
            lost: 0,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lines forwarded so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The pipes to poll for reading: none while the credit window is full
    /// or enough lines wait already.
    pub fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        if !self.wants_input() {
            return Vec::new();
        }
        self.outputs
            .iter()
            .filter_map(|o| o.pipe.as_ref().map(AsFd::as_fd))
            .collect()
    }

    fn wants_input(&self) -> bool {
        self.unacked < WINDOW && self.ready_bytes < READY_LIMIT
    }

    /// A child was reaped: if it is the workload, notes how it ended
    /// (`status` as waitpid(2) gives it).
    pub fn on_reaped(&mut self, pid: i32, status: i32, now: Instant) {
        if u32::try_from(pid).ok() != Some(self.pid) || self.exit.is_some() {
            return;
        }
        let ended = if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (Some(libc::WEXITSTATUS(status)), None)
        };
        self.exit = Some((ended.0, ended.1, now));
    }

    /// The VMM wrote out `n` more messages.
    pub fn on_ack(&mut self, n: u32) {
        self.unacked = self.unacked.saturating_sub(n);
    }

    /// Reads what the pipes hold (bounded), splitting it into lines.
    pub fn read(&mut self) {
        if !self.wants_input() {
            return;
        }
        let mut buf = [0u8; 8192];
        for o in &mut self.outputs {
            let mut budget = READ_BUDGET;
            while budget > 0 {
                let Some(pipe) = o.pipe.as_mut() else { break };
                match pipe.read(&mut buf) {
                    Ok(0) => {
                        o.pipe = None;
                        for line in o.splitter.finish() {
                            self.ready_bytes += line.len();
                            self.ready.push_back((o.stream, line));
                        }
                    }
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        for line in o.splitter.push(&buf[..n]) {
                            self.ready_bytes += line.len();
                            self.ready.push_back((o.stream, line));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // A broken pipe ends the stream like end of file.
                    Err(_) => o.pipe = None,
                }
            }
        }
    }

    /// `workload_output` messages for the lines ready, encoded, as many
    /// as the window allows (any number once the workload is being wound
    /// up) and as fit in `room` bytes (what the channel can still queue:
    /// it drops what does not fit).
    pub fn take_lines(&mut self, now: Instant, room: usize) -> Vec<String> {
        let unbounded = self.draining_over(now);
        let mut out = Vec::new();
        let mut room = room;
        'runs: while !self.ready.is_empty() {
            // The longest run of one stream's lines at the front.
            let stream = self.ready[0].0;
            let run = self.ready.iter().take_while(|(s, _)| *s == stream).count();
            let lines: Vec<String> = self.ready.drain(..run).map(|(_, l)| l).collect();
            let mut packed = pack_output(stream, lines).into_iter();
            while let Some(msg) = packed.next() {
                let line = encode(&msg);
                if (!unbounded && self.unacked >= WINDOW) || line.len() > room {
                    // Put the rest back, in order.
                    let rest = std::iter::once(msg).chain(packed).flat_map(|m| match m {
                        GuestMessage::WorkloadOutput { lines, .. } => lines,
                        _ => Vec::new(),
                    });
                    let rest: Vec<_> = rest.map(|l| (stream, l)).collect();
                    for item in rest.into_iter().rev() {
                        self.ready.push_front(item);
                    }
                    break 'runs;
                }
                if let GuestMessage::WorkloadOutput { lines, .. } = &msg {
                    self.lines += lines.len() as u64;
                    self.ready_bytes = self
                        .ready_bytes
                        .saturating_sub(lines.iter().map(String::len).sum());
                }
                self.unacked += 1;
                room -= line.len();
                out.push(line);
            }
        }
        if self.ready.is_empty() {
            self.ready_bytes = 0;
        }
        out
    }

    /// The workload exited and its pipes were read for too long already.
    fn draining_over(&self, now: Instant) -> bool {
        self.exit
            .is_some_and(|(_, _, at)| now.saturating_duration_since(at) >= DRAIN_LIMIT)
    }

    /// `workload_exit`, once the workload was reaped and its output is all
    /// sent. After [`DRAIN_LIMIT`] the pipes are closed (a background child
    /// kept them open); after twice that, lines the channel still had no
    /// room for are given up ([`Self::lost`]).
    pub fn finished(&mut self, now: Instant) -> Option<GuestMessage> {
        let (status, signal, at) = self.exit?;
        if self.draining_over(now) {
            for o in &mut self.outputs {
                o.pipe = None;
            }
        }
        let pipes_open = self.outputs.iter().any(|o| o.pipe.is_some());
        if pipes_open || !self.ready.is_empty() {
            if now.saturating_duration_since(at) < 2 * DRAIN_LIMIT {
                return None;
            }
            self.lost += self.ready.len() as u64;
            self.ready.clear();
        }
        Some(GuestMessage::WorkloadExit { status, signal })
    }

    /// Lines given up at the end (the VMM did not take them in time).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// How long the event loop may sleep: until the next drain limit once
    /// the workload exited; `None` otherwise (the pipes and SIGCHLD wake
    /// it).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let (_, _, at) = self.exit?;
        let next = if now < at + DRAIN_LIMIT {
            at + DRAIN_LIMIT
        } else {
            at + 2 * DRAIN_LIMIT
        };
        Some(
            next.saturating_duration_since(now)
                .max(Duration::from_millis(10)),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Held by the tests that start children (and by the one that reaps
    /// any child), so that no test reaps another's.
    static CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) fn children() -> std::sync::MutexGuard<'static, ()> {
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
    }

    use agent_proto::agent::decode;

    /// Room a channel with nothing queued has.
    const ROOM: usize = crate::channel::MAX_QUEUED;

    fn spec(script: &str) -> WorkloadSpec {
        WorkloadSpec::new(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }

    /// Runs `w` to its end the way the event loop does, acknowledging
    /// every message at once; returns (stdout lines, stderr lines, exit).
    fn run(mut w: Workload) -> (Vec<String>, Vec<String>, GuestMessage) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the workload did not end");
            let mut status = 0;
            // SAFETY: status is a live c_int the kernel writes to.
            let rc = unsafe { libc::waitpid(w.pid() as i32, &raw mut status, libc::WNOHANG) };
            if rc > 0 {
                w.on_reaped(rc, status, Instant::now());
            }
            w.read();
            for line in w.take_lines(Instant::now(), ROOM) {
                let m = decode::<GuestMessage>(line.trim_end().as_bytes()).unwrap();
                let GuestMessage::WorkloadOutput { stream, lines } = m else {
                    panic!("{m:?}")
                };
                match stream {
                    WorkloadStream::Out => out.extend(lines),
                    WorkloadStream::Err => err.extend(lines),
                }
                w.on_ack(1);
            }
            if let Some(exit) = w.finished(Instant::now()) {
                return (out, err, exit);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn output_and_exit_status_come_back() {
        let _children = children();
        let w = Workload::start(&spec(
            "echo one; echo two >&2; printf 'no newline'; echo \"$HOME $USER\"; exit 3",
        ))
        .unwrap();
        let (out, err, exit) = run(w);
        assert_eq!(out, ["one", "no newline/root root"]);
        assert_eq!(err, ["two"]);
        assert_eq!(
            exit,
            GuestMessage::WorkloadExit {
                status: Some(3),
                signal: None
            }
        );
    }

    #[test]
    fn a_signal_and_a_flood_under_the_window() {
        let _children = children();
        let w = Workload::start(&spec("seq 1 20000; kill -KILL $$")).unwrap();
        let (out, _, exit) = run(w);
        assert_eq!(out.len(), 20000);
        assert_eq!(out.last().map(String::as_str), Some("20000"));
        assert_eq!(
            exit,
            GuestMessage::WorkloadExit {
                status: None,
                signal: Some(libc::SIGKILL)
            }
        );
    }

    #[test]
    fn the_window_holds_the_output_back_until_acknowledged() {
        let _children = children();
        let mut w = Workload::start(&spec("seq 1 100000")).unwrap();
        let now = Instant::now();
        // What the channel has no room for stays ready.
        std::thread::sleep(Duration::from_millis(50));
        w.read();
        assert!(w.take_lines(now, 100).is_empty());
        let mut sent = 0;
        for _ in 0..200 {
            w.read();
            sent += w.take_lines(now, ROOM).len();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            sent, WINDOW as usize,
            "no more than the window unacknowledged"
        );
        assert!(w.poll_fds().is_empty(), "the pipes are left unread");
        w.on_ack(1);
        w.read();
        assert_eq!(w.take_lines(now, ROOM).len(), 1);
    }

    #[test]
    fn start_failures_say_why() {
        let _children = children();
        let missing = Workload::start(&WorkloadSpec::new(vec!["/nonexistent/prog".into()]));
        let Err(GuestMessage::WorkloadFailed { reason, not_found }) = missing else {
            panic!("{missing:?}")
        };
        assert!(
            not_found && reason.contains("link it statically"),
            "{reason}"
        );
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let not_exec = Workload::start(&WorkloadSpec::new(vec![manifest.into()]));
        assert!(matches!(
            not_exec,
            Err(GuestMessage::WorkloadFailed {
                not_found: false,
                ..
            })
        ));
        let mut bad_cwd = spec("true");
        bad_cwd.cwd = Some("/nonexistent".into());
        assert!(Workload::start(&bad_cwd).is_err());
        assert!(Workload::start(&WorkloadSpec::new(Vec::new())).is_err());
    }

    #[test]
    fn descriptions_load_or_are_absent() {
        let dir = std::env::temp_dir().join(format!("workload-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workload.json");
        assert_eq!(load(&path), Ok(None));
        std::fs::write(&path, spec("true").to_json()).unwrap();
        assert_eq!(load(&path), Ok(Some(spec("true"))));
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path).unwrap_err().contains("malformed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
