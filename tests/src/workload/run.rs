//! One run of a workload: build its initramfs, boot the VM (directly or in
//! the emulated host, [`crate::launch`]), follow the console for the VMM's
//! `VMM-WORKLOAD-*` lines (see the `vmm` crate's `hotplug::workload`),
//! start the churn at the workload's start, and end with the exit status
//! of the table in [`super::status`].

use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::workload::WorkloadSpec;

use super::args::{Add, Churn};
use super::churn::{self, ChurnEvent};
use super::image::{self, ImageError};
use super::status;
use crate::{Echo, HostKind, RunningVm, VmSpec};

/// After the workload's exit, how long the guest has to power off before
/// the launcher stops it (the workload's status stands either way).
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// After a failed churn step, how long the launcher waits to see whether
/// the workload had just ended (then the step failed because the VM was
/// going away, and the workload's status stands).
const CHURN_GRACE: Duration = Duration::from_secs(5);
/// Console lines shown when the VM failed and the console was not echoed.
const TAIL_LINES: usize = 40;

/// Where a run's lines go.
pub trait Sink {
    /// A line the workload wrote on its stdout.
    fn out(&mut self, line: &str);
    /// A line the workload wrote on its stderr.
    fn err(&mut self, line: &str);
    /// The launcher's own line (progress, churn steps, the end).
    fn note(&mut self, line: &str);
    /// Any other console line: the guest's console and the VMM's log.
    fn console(&mut self, line: &str);
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The VM (its `initramfs` and `echo` are set by [`run`]).
    pub spec: VmSpec,
    /// The user's files.
    pub adds: Vec<Add>,
    /// The workload.
    pub workload: WorkloadSpec,
    /// The CPU churn, if any.
    pub churn: Option<Churn>,
    /// Stop the VM after this long (exit [`status::VM_FAILED`]).
    pub timeout: Option<Duration>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The launcher's exit status ([`super::status`]).
    pub status: i32,
    /// One line saying why.
    pub summary: String,
    /// The workload's status (`VMM-WORKLOAD-EXIT`), if it ended.
    pub workload_status: Option<i32>,
    /// Churn steps that succeeded.
    pub steps_done: u32,
    /// The whole console log (tests print it on failure).
    pub console_log: String,
    /// In the emulated host, a failure of the nested guest its nested
    /// virtualization causes (tests retry such a run once).
    pub nested_failure: Option<String>,
    /// The emulated host itself failed (a reset, a lockup): tests retry
    /// such a run once.
    pub host_failure: Option<String>,
}

/// Why a run could not even start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The user's files are unusable (exit [`status::USAGE`]).
    #[error("{0}")]
    Input(String),
    /// The harness failed: image, VMM build, host (exit [`status::VM_FAILED`]).
    #[error(transparent)]
    Harness(#[from] crate::Error),
}

/// A line of the VMM's about the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmLine<'a> {
    /// `VMM-WORKLOAD-START pid=N`.
    Start(&'a str),
    /// `VMM-WORKLOAD-OUT: text`.
    Out(&'a str),
    /// `VMM-WORKLOAD-ERR: text`.
    Err(&'a str),
    /// `VMM-WORKLOAD-EXIT status=N ...`: the status and the whole rest.
    Exit(i32, &'a str),
}

/// Recognises the VMM's workload lines.
pub fn parse_line(text: &str) -> Option<VmmLine<'_>> {
    if let Some(t) = text.strip_prefix("VMM-WORKLOAD-OUT: ") {
        return Some(VmmLine::Out(t));
    }
    if let Some(t) = text.strip_prefix("VMM-WORKLOAD-ERR: ") {
        return Some(VmmLine::Err(t));
    }
    if let Some(t) = text.strip_prefix("VMM-WORKLOAD-START ") {
        return Some(VmmLine::Start(t));
    }
    let rest = text.strip_prefix("VMM-WORKLOAD-EXIT ")?;
    let first = rest.split_whitespace().next()?;
    let code = first.strip_prefix("status=")?.parse().ok()?;
    Some(VmmLine::Exit(code, rest))
}

/// What the VMM's exit status means (its README table).
fn vmm_status_meaning(code: i32) -> &'static str {
    match code {
        0 => "the guest powered off",
        1 => "VMM error",
        2 => "the guest reset or rebooted",
        3 => "a vCPU failed",
        4 => "the VMM was signalled",
        5 => "the guest agent reported a fatal error",
        6 => "the VMM panicked",
        _ => "killed",
    }
}

#[derive(Debug, Default)]
struct State {
    started: Option<Instant>,
    exit: Option<(i32, Instant)>,
    churn_failed: Option<(String, Instant)>,
    steps_done: u32,
    driver: Option<churn::Driver>,
}

/// Runs `cfg`; lines go to `sink`; `interrupted` is polled (Ctrl-C).
pub fn run(
    cfg: &Config,
    sink: &mut dyn Sink,
    interrupted: &dyn Fn() -> bool,
) -> Result<Outcome, RunError> {
    let image =
        image::build(&cfg.adds, &cfg.workload, cfg.spec.memory_mib).map_err(|e| match e {
            ImageError::Input(msg) => RunError::Input(msg),
            ImageError::Harness(e) => RunError::Harness(e),
        })?;
    for note in &image.notes {
        sink.note(note);
    }
    let mut spec = cfg.spec.clone();
    spec.initramfs = Some(image.path.clone());
    spec.echo = Echo::Off;
    follow(cfg, crate::launch(&spec), sink, interrupted)
}

/// The run once the VM is launched (or failed to): follows `vm` to the
/// end. [`run`] after building the image; tests give it a VM of their own.
pub fn follow(
    cfg: &Config,
    vm: crate::Result<RunningVm>,
    sink: &mut dyn Sink,
    interrupted: &dyn Fn() -> bool,
) -> Result<Outcome, RunError> {
    let mut vm = vm?;
    let sock = vm.api_socket().display().to_string();
    sink.note(&match vm.host_kind() {
        HostKind::Direct => "VMM running on this machine's /dev/kvm".to_owned(),
        HostKind::Emulated => "VMM running inside the emulated KVM host".to_owned(),
    });
    sink.note(&format!("API socket: {sock}"));
    let (tx, rx) = mpsc::channel();
    let mut st = State::default();
    let mut mark = 0;
    let deadline = cfg.timeout.map(|t| Instant::now() + t);
    let mut watch = crate::launcher::HostWatch::new();
    loop {
        let follow = vm.console().follow(mark);
        mark = follow.next;
        if follow.missed > 0 {
            sink.note(&format!(
                "{} console lines were dropped before they could be read (the launcher keeps \
                 at most {} lines)",
                follow.missed,
                crate::console::KEEP_LINES
            ));
        }
        for line in &follow.lines {
            route(&line.text, cfg, &vm, &tx, &mut st, sink);
        }
        while let Ok(event) = rx.try_recv() {
            sink.note(&event.line());
            match event {
                ChurnEvent::Done { .. } => st.steps_done += 1,
                ChurnEvent::Failed { .. } => st.churn_failed = Some((event.line(), Instant::now())),
                ChurnEvent::Finished => {}
            }
        }
        let ended = match vm.try_exit() {
            Ok(Some(code)) => Some(Ok(code)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
        if let Some(ended) = ended {
            for line in vm.console().lines_from(mark) {
                route(&line.text, cfg, &vm, &tx, &mut st, sink);
            }
            return Ok(finish(&vm, st, Some(ended), sink));
        }
        if st
            .exit
            .is_some_and(|(_, at)| at.elapsed() >= POWEROFF_GRACE)
        {
            sink.note("the guest did not power off after the workload ended: stopping it");
            vm.kill();
            return Ok(finish(&vm, st, None, sink));
        }
        if st.exit.is_none()
            && st
                .churn_failed
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= CHURN_GRACE)
        {
            vm.kill();
            return Ok(finish(&vm, st, None, sink));
        }
        // A frozen emulated host never exits by itself.
        if let Some(why) = watch.failed(&mut vm) {
            return Ok(host_failed(&vm, &st, why));
        }
        if interrupted() {
            sink.note("interrupted: stopping the VM");
            vm.kill();
            return Ok(outcome(&vm, &st, status::INTERRUPTED, "interrupted".into()));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            sink.note("--timeout passed: stopping the VM");
            vm.kill();
            show_tail(&vm, sink);
            return Ok(outcome(&vm, &st, status::VM_FAILED, "timed out".into()));
        }
        if vm
            .console()
            .wait_for_after(mark, |_| true, Duration::from_millis(50))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One console line: the workload's go to out/err, its start starts the
/// churn, its exit is kept; the rest is console.
fn route(
    text: &str,
    cfg: &Config,
    vm: &RunningVm,
    tx: &mpsc::Sender<ChurnEvent>,
    st: &mut State,
    sink: &mut dyn Sink,
) {
    match parse_line(text) {
        Some(VmmLine::Out(t)) => sink.out(t),
        Some(VmmLine::Err(t)) => sink.err(t),
        Some(VmmLine::Start(pid)) if st.started.is_none() => {
            let now = Instant::now();
            st.started = Some(now);
            sink.note(&format!("workload started ({pid} in the guest)"));
            if let Some(churn) = &cfg.churn {
                st.driver = Some(churn::start(
                    vm.api_socket().to_path_buf(),
                    churn,
                    cfg.spec.boot_vcpus,
                    now,
                    tx.clone(),
                ));
            }
        }
        Some(VmmLine::Exit(code, rest)) if st.exit.is_none() => {
            st.exit = Some((code, Instant::now()));
            st.driver = None;
            sink.note(&format!("workload ended: {rest}"));
        }
        _ => sink.console(text),
    }
}

fn show_tail(vm: &RunningVm, sink: &mut dyn Sink) {
    let lines = vm.console().lines();
    let start = lines.len().saturating_sub(TAIL_LINES);
    sink.note(&format!("the last {} console lines:", lines.len() - start));
    for line in &lines[start..] {
        sink.note(&format!("  | {}", line.text));
    }
}

/// The run's end when the emulated host failed (`why`): its one line and
/// [`status::HOST_FAILED`].
fn host_failed(vm: &RunningVm, st: &State, why: String) -> Outcome {
    let mut out = outcome(
        vm,
        st,
        status::HOST_FAILED,
        crate::launcher::host_failure_line(&why),
    );
    out.host_failure.get_or_insert(why);
    out
}

fn outcome(vm: &RunningVm, st: &State, status: i32, summary: String) -> Outcome {
    Outcome {
        status,
        summary,
        workload_status: st.exit.map(|(c, _)| c),
        steps_done: st.steps_done,
        console_log: vm.console_log(),
        nested_failure: vm.nested_guest_failure(),
        host_failure: vm.host_failure(),
    }
}

/// The end: the workload's status if it ended, else the churn's failure,
/// else the VM's.
fn finish(
    vm: &RunningVm,
    st: State,
    ended: Option<crate::Result<i32>>,
    sink: &mut dyn Sink,
) -> Outcome {
    let vmm = match &ended {
        Some(Ok(code)) => format!("VMM exit status {code} ({})", vmm_status_meaning(*code)),
        Some(Err(e)) => crate::chain(e),
        None => "the VM was stopped".to_owned(),
    };
    if let Some((code, _)) = st.exit {
        if !matches!(ended, Some(Ok(0))) {
            sink.note(&format!("after the workload ended: {vmm}"));
        }
        return outcome(
            vm,
            &st,
            code,
            format!("the workload exited with status {code}"),
        );
    }
    if let Some((line, _)) = &st.churn_failed {
        return outcome(vm, &st, status::CHURN_FAILED, line.clone());
    }
    show_tail(vm, sink);
    // The emulated host's own failure (or the nested guest's, as the
    // nested emulation makes it fail) is not the VM's: its own status.
    let host = match &ended {
        Some(Err(crate::Error::HostFailed(why))) => Some(why.clone()),
        _ => vm.host_failure(),
    }
    .or_else(|| vm.nested_guest_failure());
    if let Some(why) = host {
        return host_failed(vm, &st, why);
    }
    let summary = if st.started.is_some() {
        format!("the VM ended while the workload ran: {vmm}")
    } else {
        format!("the VM ended before the workload started: {vmm}")
    };
    outcome(vm, &st, status::VM_FAILED, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_lines() {
        assert_eq!(
            parse_line("VMM-WORKLOAD-OUT: a b "),
            Some(VmmLine::Out("a b "))
        );
        assert_eq!(parse_line("VMM-WORKLOAD-OUT: "), Some(VmmLine::Out("")));
        assert_eq!(parse_line("VMM-WORKLOAD-ERR: x"), Some(VmmLine::Err("x")));
        assert_eq!(
            parse_line("VMM-WORKLOAD-START pid=97"),
            Some(VmmLine::Start("pid=97"))
        );
        assert_eq!(
            parse_line("VMM-WORKLOAD-EXIT status=137 signal=9"),
            Some(VmmLine::Exit(137, "status=137 signal=9"))
        );
        assert_eq!(
            parse_line("VMM-WORKLOAD-EXIT status=127 error=\"x y\""),
            Some(VmmLine::Exit(127, "status=127 error=\"x y\""))
        );
        for other in [
            "GUEST-READY nproc=1",
            "VMM-WORKLOAD-EXIT status=x",
            "VMM-WORKLOAD-EXIT",
            " VMM-WORKLOAD-OUT: indented",
            "VMM-WORKLOAD-OUT:no space",
        ] {
            assert_eq!(parse_line(other), None, "{other}");
        }
    }
}
