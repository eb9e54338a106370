//! The agent's I/O loop: one thread polling the uevent socket, the
//! signalfd and the VMM channel, feeding the [`Agent`] and draining its
//! [`Outbox`](crate::agent::Outbox) to the console and the channel.
//!
//! With a workload ([`crate::workload`]) the loop also polls its output
//! pipes, forwards its lines, reaps it, and powers off once it ended.
//!
//! With a hook ([`crate::hooks`]) the loop hands it every CPU event the
//! agent saw, reaps its runs and kills the ones past their timeout.
//!
//! Writing a CPU's `online` file blocks until the kernel is done with it,
//! which orders the agent's reports after the kernel's work. Everything
//! else is non-blocking; the channel's queued output is written as the
//! tty takes it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::agent::{encode, GuestMessage};

use crate::agent::{Agent, AgentConfig, AgentError, Exit};
use crate::channel::{self, Channel};
use crate::cmdline::{Options, PowerOffWhen};
use crate::console::say;
use crate::hooks::{HookRunner, Limits};
use crate::init::{self, Signal, Signals};
use crate::kmsg;
use crate::last_words;
use crate::mailbox::GuestMailbox;
use crate::sysfs::Sysfs;
use crate::topology::{GuestPlacement, SysfsTopology};
use crate::uevent::UeventSocket;
use crate::workload::{self, Workload};

/// How long the agent waits for its last messages (the workload's exit)
/// to leave the guest before it powers off.
const DRAIN_BEFORE_POWEROFF: Duration = Duration::from_secs(5);

/// How the agent was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the guest (its `/init`): mounts the kernel file systems,
    /// talks to the VMM on ttyS1, runs the workload, powers off at the end.
    Init,
    /// A service of a guest with its own init (`--service`): mounts
    /// nothing, talks to the VMM on ttyS1 (or `--channel`), onlines CPUs,
    /// runs no load unless `agent.load=` asks (default 0), and exits with
    /// status 0 on SIGTERM/SIGINT instead of powering off.
    Service,
    /// Run by hand: mounts nothing, opens no channel unless given one,
    /// writes nothing to sysfs unless the options say so
    /// (`agent.autoonline=0 agent.readonly=1` come first).
    Hand,
}

impl Mode {
    /// `Init` as PID 1, else `Service` if asked for, else `Hand`.
    pub fn detect(service: bool) -> Self {
        if init::is_pid1() {
            Mode::Init
        } else if service {
            Mode::Service
        } else {
            Mode::Hand
        }
    }

    /// Options put before the command line's (a later option overrides).
    pub fn default_options(self) -> &'static str {
        match self {
            Mode::Init => "",
            // The guest's own work runs there: no synthetic load.
            Mode::Service => "agent.load=0 ",
            // On a host, touch no CPU unless asked.
            Mode::Hand => "agent.autoonline=0 agent.readonly=1 ",
        }
    }
}

/// What [`run`] is told besides the kernel command line.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig<'a> {
    /// How the agent was started.
    pub mode: Mode,
    /// `agent.*` options instead of `/proc/cmdline`'s.
    pub cmdline: Option<&'a str>,
    /// The VMM channel instead of the mode's default.
    pub channel: Option<&'a Path>,
    /// The hook command (overrides `agent.hook=`).
    pub hook: Option<&'a str>,
}

/// Which descriptors were readable.
#[derive(Debug, Default, Clone, Copy)]
struct Ready {
    uevents: bool,
    signals: bool,
    channel: bool,
}

/// Waits up to `timeout` (`None`: forever) for any of `fds`; returns their
/// `revents`.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = timeout.map_or(-1, |t| {
        // Round up so a deadline 0.4 ms away does not spin.
        libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    });
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: fds is a live slice of initialised pollfd structures and n
    // is its length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

fn wait(
    uevents: Option<BorrowedFd<'_>>,
    signals: BorrowedFd<'_>,
    channel: Option<&Channel>,
    workload: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Ready> {
    let mut fds = vec![pollfd(signals, libc::POLLIN)];
    if let Some(fd) = uevents {
        fds.push(pollfd(fd, libc::POLLIN));
    }
    if let Some(ch) = channel {
        let mut events = libc::POLLIN;
        if ch.wants_write() {
            events |= libc::POLLOUT;
        }
        fds.push(pollfd(ch.as_fd(), events));
    }
    // The workload's pipes only wake the loop, which reads them each turn.
    fds.extend(workload.iter().map(|fd| pollfd(*fd, libc::POLLIN)));
    poll_fds(&mut fds, timeout)?;
    let any = libc::POLLIN | libc::POLLOUT | libc::POLLERR | libc::POLLHUP;
    let hit = |i: usize| fds.get(i).is_some_and(|p| p.revents & any != 0);
    let mut next = 1;
    let mut ready = Ready {
        signals: hit(0),
        ..Ready::default()
    };
    if uevents.is_some() {
        ready.uevents = hit(next);
        next += 1;
    }
    if channel.is_some() {
        ready.channel = hit(next);
    }
    Ok(ready)
}

/// Sends the agent's messages, then prints its console lines: the VMM is
/// waiting on the messages (an operation completes on them), while a
/// console line costs ~15 ms of UART exits when nested. Then hands the
/// CPU events to the hook, if there is one.
fn drain(agent: &mut Agent, channel: &mut Option<Channel>, hooks: &mut Option<HookRunner>) {
    let out = agent.take_output();
    if let Some(ch) = channel {
        for msg in &out.host {
            ch.queue(&encode(msg));
        }
    }
    flush(channel);
    for line in &out.console {
        say(line);
    }
    if let Some(runner) = hooks {
        let now = Instant::now();
        for event in out.hooks {
            runner.submit(event, now);
        }
        say_hook_notes(runner);
    }
}

fn say_hook_notes(runner: &mut HookRunner) {
    for line in runner.take_notes() {
        say(&line);
    }
}

/// Writes what the channel can take; drops the channel if it broke.
fn flush(channel: &mut Option<Channel>) {
    if let Some(ch) = channel {
        if let Err(e) = ch.flush() {
            say(&format!("GUEST-ERROR channel write: {e}"));
            *channel = None;
            return;
        }
        last_words::set_partial(ch.queued() > 0);
    }
}

/// Reads the VMM's lines; `Some` if one asks the agent to stop.
/// Each line's answer goes out before the next line is acted on: the VMM
/// may have sent several prepare requests, each offline takes a while, and
/// the VMM times every answer.
fn receive(
    agent: &mut Agent,
    channel: &mut Option<Channel>,
    hooks: &mut Option<HookRunner>,
) -> Option<Exit> {
    let ch = channel.as_mut()?;
    match ch.read_lines() {
        Ok(incoming) => {
            for line in incoming.lines {
                if let Some(exit) = agent.on_host_line(line) {
                    return Some(exit);
                }
                drain(agent, channel, hooks);
            }
            if incoming.closed {
                say("GUEST-ERROR channel closed");
                *channel = None;
            }
        }
        Err(e) => {
            say(&format!("GUEST-ERROR channel read: {e}"));
            *channel = None;
        }
    }
    None
}

/// The VMM channel: `path` if given, else `/dev/ttyS1` for PID 1 and a
/// service, else none (a hand-run agent never touches the host's serial
/// ports).
fn open_channel(path: Option<&Path>, mode: Mode) -> (Option<Channel>, Option<String>) {
    let path = match path {
        Some(p) => p,
        None if mode != Mode::Hand => Path::new(channel::DEFAULT_PATH),
        None => return (None, None),
    };
    match Channel::open_tty(path) {
        Ok(ch) => (Some(ch), None),
        Err(e) => (None, Some(crate::error_chain(&e))),
    }
}

/// Starts the workload of [`workload::SPEC_PATH`], if there is one (PID 1
/// only): `Err` with the power-off when it cannot start (the VMM was told).
fn start_workload(channel: &mut Option<Channel>) -> Result<Option<Workload>, Exit> {
    if !init::is_pid1() {
        return Ok(None);
    }
    let started = match workload::load(Path::new(workload::SPEC_PATH)) {
        Ok(None) => return Ok(None),
        Ok(Some(spec)) => {
            for problem in workload::prepare_environment() {
                say(&format!(
                    "GUEST-WARN workload environment: {}",
                    problem.escape_debug()
                ));
            }
            Workload::start(&spec)
        }
        Err(e) => Err(workload::failure(e, false)),
    };
    let (msg, result) = match started {
        Ok(w) => (GuestMessage::WorkloadStarted { pid: w.pid() }, Ok(Some(w))),
        Err(failed) => {
            let text = match &failed {
                GuestMessage::WorkloadFailed { reason, .. } => reason.escape_debug().to_string(),
                _ => String::new(),
            };
            say(&format!("GUEST-WORKLOAD failed {text}"));
            (failed, Err(Exit::PowerOff("workload=failed".into())))
        }
    };
    if let Some(ch) = channel {
        ch.queue(&encode(&msg));
    }
    if let Ok(Some(w)) = &result {
        say(&format!("GUEST-WORKLOAD started pid={}", w.pid()));
    } else {
        drain_before_poweroff(channel);
    }
    result
}

/// One turn of the workload: forward its output, acknowledge locally what
/// no VMM will (no channel); `Some` with the power-off once it ended and
/// `workload_exit` went out.
fn step_workload(
    w: &mut Workload,
    agent: &mut Agent,
    channel: &mut Option<Channel>,
    now: Instant,
) -> Option<Exit> {
    w.on_ack(agent.take_workload_acks());
    w.read();
    match channel {
        Some(ch) => {
            // Room for the agent's own messages too.
            let room = channel::MAX_QUEUED.saturating_sub(ch.queued() + 4096);
            for line in w.take_lines(now, room) {
                ch.queue(&line);
            }
        }
        None => {
            let sent = w.take_lines(now, usize::MAX).len();
            w.on_ack(u32::try_from(sent).unwrap_or(u32::MAX));
        }
    }
    let exit = w.finished(now)?;
    let GuestMessage::WorkloadExit { status, signal } = exit else {
        return None;
    };
    let status = agent_proto::workload::shell_status(status, signal, false);
    say(&format!(
        "GUEST-WORKLOAD exit status={status} lines={} lost={}",
        w.lines(),
        w.lost()
    ));
    if let Some(ch) = channel {
        ch.queue(&encode(&exit));
    }
    drain_before_poweroff(channel);
    Some(Exit::PowerOff(format!("workload status={status}")))
}

/// Pushes what the channel holds out of the guest (bounded), so that the
/// VMM reads it before the power-off.
/// Tells the VMM a service agent is stopping ([`GuestMessage::Stopping`]),
/// waiting at most [`DRAIN_BEFORE_POWEROFF`] for it to leave.
fn say_stopping(channel: &mut Option<Channel>, reason: &str) {
    if let Some(ch) = channel.as_mut() {
        ch.queue(&encode(&GuestMessage::Stopping {
            reason: reason.to_owned(),
        }));
    }
    drain_before_poweroff(channel);
}

fn drain_before_poweroff(channel: &mut Option<Channel>) {
    let Some(ch) = channel else { return };
    if let Err(e) = ch.drain(Instant::now() + DRAIN_BEFORE_POWEROFF) {
        say(&format!("GUEST-ERROR channel drain: {e}"));
    }
}

/// Everything the agent does: mount (PID 1 only), read the options
/// (`cmdline` overrides `/proc/cmdline`, after the mode's
/// [defaults](Mode::default_options)), listen for uevents, open the
/// channel (`channel`, else ttyS1 for PID 1 and a service), start, then
/// loop until a stop is requested. A panic in any thread, and an error
/// once the channel is open (see `main`), is sent to the VMM as `fatal`
/// ([`last_words`]), except by a service: the VMM ends on `fatal`, while
/// a service's manager restarts it (a panic ends the whole process).
pub fn run(cfg: RunConfig<'_>) -> Result<Exit, AgentError> {
    let mode = cfg.mode;
    let channel_path = cfg.channel;
    init::install_panic_hook(mode == Mode::Service);
    if mode == Mode::Init {
        init::mount_filesystems()?;
    }
    // Before any thread exists, so every later thread inherits the mask.
    let signals = Signals::new().map_err(AgentError::Signals)?;
    let mut text = match cfg.cmdline {
        Some(c) => c.to_owned(),
        None => std::fs::read_to_string("/proc/cmdline").map_err(AgentError::Cmdline)?,
    };
    text.insert_str(0, mode.default_options());
    let opts = Options::parse(&text);
    let mut hooks = cfg
        .hook
        .map(str::to_owned)
        .or_else(|| opts.hook.clone())
        .map(|cmd| HookRunner::new(cmd, Limits::default()));
    // Listen first, then look: no hot-add falls between the two.
    let socket = UeventSocket::open().map_err(AgentError::Uevent)?;
    let topo = Arc::new(SysfsTopology::new(
        Sysfs::new(),
        Box::new(socket),
        opts.readonly,
    )?);
    let (mut channel, mut channel_error) = open_channel(channel_path, mode);
    if let Some(ch) = channel.as_ref().filter(|_| mode != Mode::Service) {
        // So that a failure anywhere still reaches the VMM as `fatal`.
        if let Err(e) = last_words::arm(ch.as_fd()) {
            channel_error = Some(format!("no last words: {e}"));
        }
    }
    let mut preface: Vec<String> = kmsg::smpboot_line().into_iter().collect();
    // The mailbox only beside the VMM's own UART (not a test's socket).
    let vmm_uart = channel_path.is_none_or(|p| p == Path::new(channel::DEFAULT_PATH));
    let mailbox_error = match channel.as_mut() {
        Some(ch) if opts.mailbox && vmm_uart => match GuestMailbox::open() {
            Ok(Some(mailbox)) => {
                ch.attach_mailbox(mailbox);
                None
            }
            Ok(None) => Some("the VMM serves no mailbox".to_owned()),
            Err(e) => Some(format!("cannot map {}: {e}", crate::mailbox::DEV_MEM)),
        },
        _ => None,
    };
    if mode == Mode::Service {
        // Always said: a service without its channel is not doing its job.
        preface.extend(
            channel_error
                .take()
                .map(|e| format!("GUEST-ERROR channel: {e}")),
        );
        if let Some(runner) = &hooks {
            preface.push(format!("GUEST-HOOK {:?}", runner.command()));
        }
    }
    if opts.trace {
        preface.extend(channel_error.map(|e| format!("GUEST-TRACE channel: {e}")));
        preface.extend(mailbox_error.map(|e| format!("GUEST-TRACE mailbox: {e}")));
    }
    let poweroff = opts.poweroff;
    let cfg = AgentConfig {
        placement: Arc::new(GuestPlacement),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        channel: channel.is_some(),
        mailbox: channel.as_ref().is_some_and(Channel::uses_mailbox),
        preface,
    };
    let mut agent = Agent::start(Arc::clone(&topo), opts, cfg)?;
    agent.tick(Instant::now());
    drain(&mut agent, &mut channel, &mut hooks);
    if poweroff == Some(PowerOffWhen::Ready) {
        return Ok(Exit::PowerOff("reason=ready".into()));
    }
    let mut workload = match start_workload(&mut channel) {
        Ok(w) => w,
        Err(exit) => return Ok(exit),
    };
    loop {
        let now = Instant::now();
        let timeout = [
            agent.next_timeout(now),
            channel.as_ref().and_then(Channel::retry_after),
            workload.as_ref().and_then(|w| w.next_timeout(now)),
            hooks.as_ref().and_then(|h| h.next_timeout(now)),
        ]
        .into_iter()
        .flatten()
        .min();
        let pipes = workload
            .as_ref()
            .map(Workload::poll_fds)
            .unwrap_or_default();
        let ready = wait(
            topo.poll_fd(),
            signals.as_fd(),
            channel.as_ref(),
            &pipes,
            timeout,
        )
        .map_err(AgentError::Poll)?;
        drop(pipes);
        if ready.signals {
            for signal in signals.read().map_err(AgentError::Signals)? {
                match signal {
                    Signal::Child => {
                        for (pid, status) in init::reap_children() {
                            let now = Instant::now();
                            if hooks.as_mut().is_some_and(|h| h.on_exit(pid, status, now)) {
                                continue;
                            }
                            if let Some(w) = workload.as_mut() {
                                w.on_reaped(pid, status, now);
                            }
                        }
                    }
                    Signal::Stop(sig) => {
                        let reason = format!("signal={}", init::signal_name(sig));
                        if mode == Mode::Service {
                            // Gone on purpose: the VMM stops waiting at once.
                            say_stopping(&mut channel, &reason);
                        }
                        return Ok(Exit::PowerOff(reason));
                    }
                }
            }
        }
        if ready.uevents {
            agent.on_uevents()?;
        }
        if ready.channel {
            if let Some(exit) = receive(&mut agent, &mut channel, &mut hooks) {
                drain(&mut agent, &mut channel, &mut hooks);
                return Ok(exit);
            }
        }
        agent.tick(Instant::now());
        drain(&mut agent, &mut channel, &mut hooks);
        if let Some(runner) = hooks.as_mut() {
            runner.tick(Instant::now());
            say_hook_notes(runner);
        }
        if let Some(w) = workload.as_mut() {
            if let Some(exit) = step_workload(w, &mut agent, &mut channel, Instant::now()) {
                return Ok(exit);
            }
            flush(&mut channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_times_out_and_sees_readable_fds() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let start = Instant::now();
        let mut fds = [pollfd(a.as_fd(), libc::POLLIN)];
        poll_fds(&mut fds, Some(Duration::from_millis(20))).unwrap();
        assert_eq!(fds[0].revents, 0);
        assert!(start.elapsed() >= Duration::from_millis(15));
        std::io::Write::write_all(&mut b, b"x").unwrap();
        poll_fds(&mut fds, None).unwrap();
        assert_ne!(fds[0].revents & libc::POLLIN, 0);
    }

    #[test]
    fn a_stopping_service_tells_the_vmm() {
        use std::io::BufRead;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // The VMM's side reads while the agent drains (the drain waits for
        // the bytes to be taken).
        let vmm = std::thread::spawn(move || {
            let mut line = String::new();
            std::io::BufReader::new(b).read_line(&mut line).unwrap();
            line
        });
        let mut channel = Some(Channel::from_fd(a.into()).unwrap());
        let start = Instant::now();
        say_stopping(&mut channel, "signal=SIGTERM");
        assert!(
            start.elapsed() < DRAIN_BEFORE_POWEROFF,
            "drained, not timed out"
        );
        let line = vmm.join().unwrap();
        assert_eq!(
            agent_proto::agent::decode::<GuestMessage>(line.as_bytes()).unwrap(),
            GuestMessage::Stopping {
                reason: "signal=SIGTERM".into()
            }
        );
        // Without a channel there is nobody to tell, and nothing fails.
        say_stopping(&mut None, "signal=INT");
    }

    #[test]
    fn a_hand_run_agent_opens_no_channel() {
        let (ch, err) = open_channel(None, Mode::Hand);
        assert!(ch.is_none() && err.is_none());
        let (ch, err) = open_channel(Some(Path::new("/nonexistent/tty")), Mode::Hand);
        assert!(ch.is_none());
        assert!(err.unwrap().contains("/nonexistent/tty"));
    }

    #[test]
    fn modes_and_their_defaults() {
        // Tests never run as PID 1.
        assert_eq!(Mode::detect(false), Mode::Hand);
        assert_eq!(Mode::detect(true), Mode::Service);
        let parse = |mode: Mode, cmdline: &str| {
            Options::parse(&format!("{}{cmdline}", mode.default_options()))
        };
        let service = parse(Mode::Service, "console=ttyS0");
        assert_eq!(
            (service.load, service.autoonline, service.readonly),
            (0, true, false)
        );
        assert_eq!(parse(Mode::Service, "agent.load=5").load, 5);
        let hand = parse(Mode::Hand, "");
        assert!(!hand.autoonline && hand.readonly);
        assert_eq!(parse(Mode::Init, ""), Options::default());
    }
}
