//! The agent proper: announce readiness, then follow CPU uevents, bringing
//! hot-added CPUs online and reporting every change of the online set.
//!
//! [`Agent`] holds the state and decides what to do and say; it touches
//! only sysfs, so it is tested against a fake sysfs tree. [`run`] is the
//! I/O loop around it: one thread polling the uevent socket and the
//! signalfd.
//!
//! Console lines (all short, see [`crate::console`]):
//! - `GUEST-READY nproc=2 online=0-1 present=0-1 possible=0-7 up=1.52`
//! - `GUEST-CPU online=0-2` when the online set changed
//! - `GUEST-ERROR ...` when something failed but the agent goes on
//! - `GUEST-TRACE up=12.34 ...` per CPU event with `agent.trace`
//! - `GUEST-POWEROFF ...` / `GUEST-FATAL ...` on the way out

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use thiserror::Error;

use crate::cmdline::{Options, PowerOffWhen};
use crate::init::{self, MountError, Signal, Signals};
use crate::sysfs::{CpuList, Sysfs, SysfsError};
use crate::uevent::{CpuEvent, CpuEventKind, Received, UeventSocket};

/// Why the agent stopped working.
#[derive(Debug, Error)]
pub enum AgentError {
    /// PID 1 could not mount the kernel file systems.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// `/proc/cmdline` could not be read.
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    /// The CPU lists could not be read at start.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The uevent socket failed.
    #[error("uevent socket")]
    Uevent(#[source] io::Error),
    /// The signalfd failed.
    #[error("signal handling")]
    Signals(#[source] io::Error),
    /// poll(2) failed.
    #[error("poll")]
    Poll(#[source] io::Error),
}

/// Why the agent's loop ended normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Power off; the text is the reason (`reason=ready`, `signal=SIGTERM`).
    PowerOff(String),
}

/// The agent's state: options and the online set last reported.
#[derive(Debug)]
pub struct Agent {
    sysfs: Sysfs,
    opts: Options,
    reported: Option<CpuList>,
}

fn uptime() -> Option<String> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// `GUEST-TRACE up=<uptime> <what>`.
fn trace_line(what: &str) -> String {
    format!("GUEST-TRACE up={} {what}", uptime().unwrap_or_default())
}

impl Agent {
    /// An agent working on `sysfs` with `opts`.
    pub fn new(sysfs: Sysfs, opts: Options) -> Self {
        Self {
            sysfs,
            opts,
            reported: None,
        }
    }

    /// The options in force.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Brings present but offline CPUs online (unless `agent.autoonline=0`:
    /// they may have been hot-added before the agent listened) and returns
    /// the lines to print, the ready line last.
    pub fn start(&mut self) -> Result<Vec<String>, AgentError> {
        let mut lines = Vec::new();
        if !self.opts.unknown.is_empty() {
            lines.push(format!(
                "GUEST-ERROR unknown options {}",
                self.opts.unknown.join(",")
            ));
        }
        let present = self.sysfs.present()?;
        if self.opts.autoonline {
            let offline = present.difference(&self.sysfs.online()?);
            lines.extend(offline.iter().filter_map(|cpu| self.bring_online(cpu)));
        }
        let online = self.sysfs.online()?;
        let possible = self.sysfs.possible()?;
        let mut ready = format!(
            "GUEST-READY nproc={} online={online} present={present} possible={possible}",
            online.len()
        );
        if let Some(up) = uptime() {
            ready.push_str(&format!(" up={up}"));
        }
        lines.push(ready);
        self.reported = Some(online);
        Ok(lines)
    }

    /// Writes 1 to the CPU's online file; returns an error line on failure.
    fn bring_online(&self, cpu: u32) -> Option<String> {
        match self.sysfs.set_online(cpu, true) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "GUEST-ERROR cpu={cpu} online errno={}",
                e.errno().unwrap_or(0)
            )),
        }
    }

    /// A `GUEST-CPU` line if the online set differs from the one last
    /// reported (`agent.quiet` suppresses it).
    fn report_change(&mut self) -> Option<String> {
        let online = match self.sysfs.online() {
            Ok(online) => online,
            Err(e) => return Some(format!("GUEST-ERROR {e}")),
        };
        if self.reported.as_ref() == Some(&online) {
            return None;
        }
        let line = format!("GUEST-CPU online={online}");
        self.reported = Some(online);
        (!self.opts.quiet).then_some(line)
    }

    /// Reacts to one CPU event; returns the lines to print.
    pub fn on_cpu_event(&mut self, event: CpuEvent) -> Vec<String> {
        let mut lines = Vec::new();
        if self.opts.trace {
            lines.push(trace_line(&format!("{:?} cpu={}", event.kind, event.cpu)));
        }
        if event.kind == CpuEventKind::Add && self.opts.autoonline {
            // Linux does not online a hot-added CPU by itself.
            match self.sysfs.is_online(event.cpu) {
                Ok(true) => {}
                Ok(false) => {
                    lines.extend(self.bring_online(event.cpu));
                    if self.opts.trace {
                        lines.push(trace_line(&format!("onlined cpu={}", event.cpu)));
                    }
                }
                Err(e) => lines.push(format!("GUEST-ERROR {e}")),
            }
        }
        lines.extend(self.report_change());
        lines
    }

    /// After lost events: online whatever is present and offline, and
    /// report the online set if it changed.
    pub fn resync(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.opts.autoonline {
            match (self.sysfs.present(), self.sysfs.online()) {
                (Ok(present), Ok(online)) => {
                    let offline = present.difference(&online);
                    lines.extend(offline.iter().filter_map(|cpu| self.bring_online(cpu)));
                }
                (Err(e), _) | (_, Err(e)) => lines.push(format!("GUEST-ERROR {e}")),
            }
        }
        lines.extend(self.report_change());
        lines
    }
}

fn say_all(lines: &[String]) {
    for line in lines {
        crate::console::say(line);
    }
}

/// Waits until one of the descriptors is readable; returns which.
fn poll2(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a live array of two initialised pollfd structures and
    // the count passed is its length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(err);
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// Everything PID 1 (or a hand-run agent) does: mount (PID 1 only), read
/// the options (`cmdline` overrides `/proc/cmdline`; not as PID 1,
/// `agent.autoonline` defaults to off), listen for uevents, say ready, then
/// loop until a stop is requested.
pub fn run(cmdline: Option<&str>) -> Result<Exit, AgentError> {
    if init::is_pid1() {
        init::install_panic_hook();
        init::mount_filesystems()?;
    }
    // Before any thread exists, so every later thread inherits the mask.
    let signals = Signals::new().map_err(AgentError::Signals)?;
    let mut text = match cmdline {
        Some(c) => c.to_owned(),
        None => std::fs::read_to_string("/proc/cmdline").map_err(AgentError::Cmdline)?,
    };
    if !init::is_pid1() {
        // On a host, touch no CPU unless asked: a later option overrides.
        text.insert_str(0, "agent.autoonline=0 ");
    }
    let opts = Options::parse(&text);
    // Listen first, then look: no hot-add falls between the two.
    let socket = UeventSocket::open().map_err(AgentError::Uevent)?;
    let mut agent = Agent::new(Sysfs::new(), opts);
    say_all(&agent.start()?);
    if agent.options().poweroff == Some(PowerOffWhen::Ready) {
        return Ok(Exit::PowerOff("reason=ready".into()));
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (uevents, sigs) = poll2(socket.as_fd(), signals.as_fd()).map_err(AgentError::Poll)?;
        if sigs {
            for signal in signals.read().map_err(AgentError::Signals)? {
                match signal {
                    Signal::Child => {
                        init::reap_children();
                    }
                    Signal::Stop(sig) => {
                        return Ok(Exit::PowerOff(format!("signal={}", init::signal_name(sig))));
                    }
                }
            }
        }
        if uevents {
            loop {
                match socket.recv(&mut buf).map_err(AgentError::Uevent)? {
                    Received::Message(n) => {
                        if let Some(event) = CpuEvent::parse(&buf[..n]) {
                            say_all(&agent.on_cpu_event(event));
                        }
                    }
                    Received::Dropped => {}
                    Received::Overrun => say_all(&agent.resync()),
                    Received::WouldBlock => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::tests::FakeCpus;

    fn agent(fake: &FakeCpus, cmdline: &str) -> Agent {
        Agent::new(fake.sysfs(), Options::parse(cmdline))
    }

    fn add(cpu: u32) -> CpuEvent {
        CpuEvent {
            kind: CpuEventKind::Add,
            cpu,
        }
    }

    #[test]
    fn ready_line_and_autoonline_at_start() {
        let fake = FakeCpus::new("start", "0-7", "0-2", "0-1");
        let mut a = agent(&fake, "");
        let lines = a.start().unwrap();
        // The fake kernel does not update `online`, so nproc stays 2.
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("GUEST-READY nproc=2 online=0-1 present=0-2 possible=0-7"),
            "{}",
            lines[0]
        );
        assert_eq!(fake.get("cpu2/online"), "1");
    }

    #[test]
    fn no_autoonline_when_disabled() {
        let fake = FakeCpus::new("noauto", "0-3", "0-2", "0-1");
        let mut a = agent(&fake, "agent.autoonline=0 agent.foo");
        let lines = a.start().unwrap();
        assert_eq!(lines[0], "GUEST-ERROR unknown options agent.foo");
        assert_eq!(fake.get("cpu2/online"), "0");
        assert!(a.on_cpu_event(add(2)).is_empty());
        assert_eq!(fake.get("cpu2/online"), "0");
    }

    #[test]
    fn hot_add_onlines_and_reports_once() {
        let fake = FakeCpus::new("hotadd", "0-3", "0-1", "0-1");
        let mut a = agent(&fake, "");
        a.start().unwrap();
        // The kernel adds cpu2 (offline) and emits add@.
        std::fs::create_dir_all(fake.0.join("cpu2")).unwrap();
        fake.set("cpu2/online", "0\n");
        fake.set("present", "0-2\n");
        assert!(
            a.on_cpu_event(add(2)).is_empty(),
            "online set unchanged so far"
        );
        assert_eq!(fake.get("cpu2/online"), "1");
        // The kernel brings it up and emits online@.
        fake.set("online", "0-2\n");
        let online = CpuEvent {
            kind: CpuEventKind::Online,
            cpu: 2,
        };
        assert_eq!(a.on_cpu_event(online), ["GUEST-CPU online=0-2"]);
        assert!(a.on_cpu_event(online).is_empty(), "no repeat");
        // Offline and remove.
        fake.set("online", "0-1\n");
        let offline = CpuEvent {
            kind: CpuEventKind::Offline,
            cpu: 2,
        };
        assert_eq!(a.on_cpu_event(offline), ["GUEST-CPU online=0-1"]);
    }

    #[test]
    fn already_online_cpu_is_left_alone() {
        let fake = FakeCpus::new("already", "0-3", "0-2", "0-2");
        let mut a = agent(&fake, "");
        a.start().unwrap();
        fake.set("cpu2/online", "1\n");
        assert!(a.on_cpu_event(add(2)).is_empty());
        assert_eq!(fake.get("cpu2/online"), "1", "not rewritten");
    }

    #[test]
    fn failures_are_reported_not_fatal() {
        let fake = FakeCpus::new("fail", "0-3", "0-1", "0-1");
        let mut a = agent(&fake, "");
        a.start().unwrap();
        // cpu3 has no directory: the write fails with ENOENT.
        fake.set("present", "0-1,3\n");
        let lines = a.resync();
        assert_eq!(
            lines,
            [format!("GUEST-ERROR cpu=3 online errno={}", libc::ENOENT)]
        );
        fake.set("online", "bad");
        let lines = a.on_cpu_event(add(0));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines
            .iter()
            .all(|l| l.starts_with("GUEST-ERROR unexpected contents in")));
    }

    #[test]
    fn trace_lines_when_asked() {
        let fake = FakeCpus::new("trace", "0-3", "0-1", "0-1");
        let mut a = agent(&fake, "agent.trace");
        a.start().unwrap();
        std::fs::create_dir_all(fake.0.join("cpu2")).unwrap();
        fake.set("cpu2/online", "0\n");
        let lines = a.on_cpu_event(add(2));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("GUEST-TRACE up=") && lines[0].ends_with(" Add cpu=2"));
        assert!(lines[1].ends_with(" onlined cpu=2"));
    }

    #[test]
    fn quiet_suppresses_cpu_lines() {
        let fake = FakeCpus::new("quiet", "0-3", "0-2", "0-1");
        let mut a = agent(&fake, "agent.quiet agent.autoonline=0");
        a.start().unwrap();
        fake.set("online", "0-2\n");
        assert!(a.resync().is_empty());
    }
}
