//! The user's hook: a command run on every CPU event (`--hook CMD`, or
//! `agent.hook=` on the kernel command line).
//!
//! Each CPU uevent the agent handles (`add`, `online`, `offline`,
//! `remove`) becomes one run of `/bin/sh -c CMD` with the event in its
//! environment:
//!
//! | variable        | value                                                  |
//! |-----------------|--------------------------------------------------------|
//! | `VMM_CPU_EVENT` | `add`, `online`, `offline` or `remove`                 |
//! | `VMM_CPU`       | Linux's logical number (`1` for `cpu1`)                |
//! | `VMM_VCPU_ID`   | the vCPU id (the VMM's and the API's); unset if unknown |
//!
//! plus the agent's own environment (and a standard `PATH` when the agent
//! has none, as PID 1 does). stdin is `/dev/null`; stdout and stderr are
//! the agent's (the console as PID 1, the journal under systemd). Each run
//! is its own process group.
//!
//! The runner never blocks the agent's loop: it spawns, and the loop tells
//! it which children were reaped ([`HookRunner::on_exit`]). At most
//! [`Limits::running`] hooks run at once; further events wait in a queue of
//! at most [`Limits::queued`], and an event beyond that is dropped and
//! counted (one `GUEST-WARN` line per drop, with the running total). The
//! events of one CPU run one after another, in the order they happened;
//! different CPUs' hooks run side by side. A hook still running after
//! [`Limits::timeout`] has its process group killed (`SIGKILL`) and is
//! counted as timed out, so a hung hook holds a slot for that long at
//! most. A hook that fails (non-zero status, a signal) is reported on the
//! console and otherwise ignored: the agent's own work does not wait for,
//! or depend on, any hook.

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smpboot::CpuEventKind;

/// The shell hooks run with.
pub const SHELL: &str = "/bin/sh";
/// `PATH` given to hooks when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which CPU event a hook run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEventKind {
    /// The CPU device appeared (hot-add); it is still offline.
    Add,
    /// The CPU came online.
    Online,
    /// The CPU went offline.
    Offline,
    /// The CPU device disappeared (hot-remove).
    Remove,
}

impl HookEventKind {
    /// The value of `VMM_CPU_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Remove => "remove",
        }
    }
}

impl From<CpuEventKind> for HookEventKind {
    fn from(kind: CpuEventKind) -> Self {
        match kind {
            CpuEventKind::Added => Self::Add,
            CpuEventKind::Online => Self::Online,
            CpuEventKind::Offline => Self::Offline,
            CpuEventKind::Removed => Self::Remove,
        }
    }
}

/// One CPU event for the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookEvent {
    /// What happened.
    pub kind: HookEventKind,
    /// Linux's logical number.
    pub cpu: u32,
    /// The vCPU id, when the agent knows it.
    pub vcpu: Option<u32>,
}

impl HookEvent {
    /// The variables a run for this event gets (besides the agent's).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("VMM_CPU_EVENT", self.kind.name().to_owned()),
            ("VMM_CPU", self.cpu.to_string()),
        ];
        if let Some(id) = self.vcpu {
            env.push(("VMM_VCPU_ID", id.to_string()));
        }
        env
    }

    /// `event=add cpu=1 vcpu=6` (`vcpu=?` when unknown), for console lines.
    pub fn describe(&self) -> String {
        let vcpu = self.vcpu.map_or_else(|| "?".to_owned(), |v| v.to_string());
        format!("event={} cpu={} vcpu={vcpu}", self.kind.name(), self.cpu)
    }
}

/// The runner's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Hooks running at once.
    pub running: usize,
    /// Events waiting for a slot; more are dropped.
    pub queued: usize,
    /// How long one run may take before its process group is killed.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            running: 4,
            queued: 64,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A hook that was started and not reaped yet.
#[derive(Debug)]
struct Running {
    pid: libc::pid_t,
    event: HookEvent,
    deadline: Instant,
    killed: bool,
}

/// Counts of what the runner did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HookStats {
    /// Runs started.
    pub started: u64,
    /// Runs that exited with status 0.
    pub succeeded: u64,
    /// Runs that failed (non-zero status, a signal, or could not start).
    pub failed: u64,
    /// Runs killed at their timeout (also counted as failed).
    pub timed_out: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
}

/// Runs the hook command for CPU events (see the module docs).
#[derive(Debug)]
pub struct HookRunner {
    command: String,
    limits: Limits,
    queue: VecDeque<HookEvent>,
    running: Vec<Running>,
    stats: HookStats,
    notes: Vec<String>,
}

impl HookRunner {
    /// A runner of `command` (run as `/bin/sh -c command`).
    pub fn new(command: impl Into<String>, limits: Limits) -> Self {
        Self {
            command: command.into(),
            limits: Limits {
                running: limits.running.max(1),
                ..limits
            },
            queue: VecDeque::new(),
            running: Vec::new(),
            stats: HookStats::default(),
            notes: Vec::new(),
        }
    }

    /// The command.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// What the runner did so far.
    pub fn stats(&self) -> HookStats {
        self.stats
    }

    /// Hooks running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Events waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing runs or waits.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty()
    }

    /// Console lines about failures, drops and kills since the last call.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Queues a run for `event` and starts what may start.
    pub fn submit(&mut self, event: HookEvent, now: Instant) {
        if self.queue.len() >= self.limits.queued {
            self.stats.dropped += 1;
            self.notes.push(format!(
                "GUEST-WARN hook queue full ({} waiting, {} running): dropped {} (dropped={})",
                self.queue.len(),
                self.running.len(),
                event.describe(),
                self.stats.dropped
            ));
            return;
        }
        self.queue.push_back(event);
        self.start_due(now);
    }

    /// A child was reaped with `status`: if it was a hook, its slot is
    /// free (and the next event starts). Returns whether it was a hook.
    pub fn on_exit(&mut self, pid: libc::pid_t, status: libc::c_int, now: Instant) -> bool {
        let Some(at) = self.running.iter().position(|r| r.pid == pid) else {
            return false;
        };
        let run = self.running.swap_remove(at);
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if ok {
            self.stats.succeeded += 1;
        } else {
            self.stats.failed += 1;
            let how = if run.killed {
                format!("killed after {} ms", self.limits.timeout.as_millis())
            } else if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exit status {}", libc::WEXITSTATUS(status))
            };
            self.notes.push(format!(
                "GUEST-WARN hook {} pid={pid} failed: {how}",
                run.event.describe()
            ));
        }
        self.start_due(now);
        true
    }

    /// Reaps this runner's own children that exited, without blocking
    /// (for a caller that does not reap every child itself).
    pub fn reap(&mut self, now: Instant) {
        let pids: Vec<libc::pid_t> = self.running.iter().map(|r| r.pid).collect();
        for pid in pids {
            let mut status = 0;
            // SAFETY: status is a live c_int the kernel writes to; pid is a
            // child this runner started and has not reaped.
            let rc = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
            if rc == pid {
                self.on_exit(pid, status, now);
            }
        }
    }

    /// Kills the runs past their deadline (their exit is reaped later).
    pub fn tick(&mut self, now: Instant) {
        for run in self.running.iter_mut().filter(|r| !r.killed) {
            if now >= run.deadline {
                run.killed = true;
                self.stats.timed_out += 1;
                // SAFETY: kill(2) takes no pointers; the negative pid names
                // the process group the hook leads (it is not reaped yet, so
                // the id cannot have been reused).
                unsafe { libc::kill(-run.pid, libc::SIGKILL) };
            }
        }
        self.start_due(now);
    }

    /// How long until [`tick`](Self::tick) has a run to kill; `None` when
    /// nothing runs (or every run was killed already).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.running
            .iter()
            .filter(|r| !r.killed)
            .map(|r| r.deadline.saturating_duration_since(now))
            .min()
    }

    /// Starts queued events while slots are free, in queue order, skipping
    /// (for now) events of a CPU whose earlier event runs or waits.
    fn start_due(&mut self, now: Instant) {
        let mut busy: BTreeSet<u32> = self.running.iter().map(|r| r.event.cpu).collect();
        let mut waiting = VecDeque::new();
        while let Some(event) = self.queue.pop_front() {
            if self.running.len() >= self.limits.running || busy.contains(&event.cpu) {
                busy.insert(event.cpu);
                waiting.push_back(event);
                continue;
            }
            busy.insert(event.cpu);
            self.spawn(event, now);
        }
        self.queue = waiting;
    }

    fn spawn(&mut self, event: HookEvent, now: Instant) {
        let mut cmd = Command::new(SHELL);
        cmd.arg("-c")
            .arg(&self.command)
            .envs(event.env())
            .stdin(Stdio::null())
            .process_group(0);
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        match cmd.spawn() {
            Ok(child) => {
                self.stats.started += 1;
                // The loop reaps by pid (`on_exit`); the handle is not kept.
                let pid = libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX);
                self.running.push(Running {
                    pid,
                    event,
                    deadline: now + self.limits.timeout,
                    killed: false,
                });
            }
            Err(e) => {
                self.stats.failed += 1;
                self.notes.push(format!(
                    "GUEST-ERROR hook {} cannot start {SHELL}: {e}",
                    event.describe()
                ));
            }
        }
    }
}

#[cfg(test)]
#[path = "hooks_tests.rs"]
mod tests;
