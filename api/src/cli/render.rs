//! Human-readable text for `vmmctl`'s answers. Every string the server
//! sends (much of it from the guest) goes through [`escape`] first.

use std::error::Error as _;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use super::escape::{self, field as esc};
use crate::client::{ClientError, MutationOutcome};
use crate::{
    FaultInjected, FaultTarget, GuestWorker, GuestWorkers, Operation, OperationKind,
    OperationStatus, VcpuList, VmInfo, WorkloadInfo, WorkloadState,
};

fn agent(connected: Option<bool>, version: Option<&str>) -> String {
    match (connected, version) {
        (Some(true), Some(v)) => format!("connected (version {})", esc(v)),
        (Some(true), None) => "connected".to_owned(),
        (Some(false), _) => "not connected".to_owned(),
        (None, _) => "unknown".to_owned(),
    }
}

/// The `workload:` line of `status`; `error` is the guest's text, escaped.
fn workload(w: Option<&WorkloadInfo>) -> String {
    let Some(w) = w else {
        return "none".to_owned();
    };
    let pid = w.pid.map(|p| format!("pid {p}, ")).unwrap_or_default();
    let lines = format!("{} output lines", w.output_lines);
    let status = w
        .exit_status
        .map_or_else(|| "?".to_owned(), |s| s.to_string());
    match (w.state, w.signal) {
        (WorkloadState::Running, _) => format!("running ({pid}{lines})"),
        (WorkloadState::Exited, Some(sig)) => {
            format!("killed by signal {sig}, status {status} ({pid}{lines})")
        }
        (WorkloadState::Exited, None) => format!("exited with status {status} ({pid}{lines})"),
        (WorkloadState::Failed, _) => format!(
            "could not start, status {status}: {}",
            esc(w.error.as_deref().unwrap_or("no reason given"))
        ),
    }
}

/// `status`.
pub(super) fn vm(vm: &VmInfo) -> String {
    let agent = agent(vm.agent_connected, vm.agent_version.as_deref());
    let workload = workload(vm.workload.as_ref());
    format!(
        "state:        {}\nvCPUs:        {} present ({} at boot, {} max)\nmemory:       {} MiB\nguest agent:  {agent}\nworkload:     {workload}\n",
        vm.state, vm.present_vcpus, vm.boot_vcpus, vm.max_vcpus, vm.memory_mib
    )
}

/// How many of `workers` are in each status, e.g. "2 active, 1 parked".
fn worker_summary(workers: &[GuestWorker]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for w in workers {
        match counts.iter_mut().find(|(s, _)| *s == w.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((&w.status, 1)),
        }
    }
    if counts.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", esc(s)))
        .collect();
    parts.join(", ")
}

/// One table line: every cell but the last padded to its width.
fn table_line(text: &mut String, cells: &[(&str, usize)]) {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            line.push_str(cell);
        } else {
            let _ = write!(line, "{cell:<width$} ");
        }
    }
    text.push_str(&line);
    text.push('\n');
}

/// `vcpus`: one line per vCPU, with a CPU column (Linux's `cpuN` for the
/// vCPU, which differs from the id when vCPUs were added out of order)
/// once the guest agent has told, and a WORKERS column once it has
/// reported its workers.
pub(super) fn vcpus(list: &VcpuList) -> String {
    let with_cpu = list.vcpus.iter().any(|v| v.guest_cpu.is_some());
    let with_workers = list.vcpus.iter().any(|v| v.workers.is_some());
    let columns = |id: &str, state: &str, guest: &str, cpu: &str, workers: &str| {
        let mut cells = vec![
            (id.to_owned(), 5),
            (state.to_owned(), 9),
            (guest.to_owned(), 8),
        ];
        if with_cpu {
            cells.push((cpu.to_owned(), 8));
        }
        if with_workers {
            cells.push((workers.to_owned(), 0));
        }
        cells
    };
    let mut text = String::new();
    let mut emit = |cells: Vec<(String, usize)>| {
        let cells: Vec<(&str, usize)> = cells.iter().map(|(c, w)| (c.as_str(), *w)).collect();
        table_line(&mut text, &cells);
    };
    emit(columns("ID", "STATE", "GUEST", "CPU", "WORKERS"));
    for v in &list.vcpus {
        let guest = match v.guest_online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "-",
        };
        let cpu = v
            .guest_cpu
            .map_or_else(|| "-".to_owned(), |c| format!("cpu{c}"));
        let workers = v
            .workers
            .as_deref()
            .map_or_else(|| "-".to_owned(), worker_summary);
        emit(columns(
            &v.id.to_string(),
            &v.state.to_string(),
            guest,
            &cpu,
            &workers,
        ));
    }
    let present = list.count(crate::VcpuState::Present);
    let _ = writeln!(text, "{present} of {} present", list.max_vcpus);
    text
}

/// `workers`: the agent, then one line per worker thread (by CPU and
/// descriptor), then the work done per CPU.
pub(super) fn workers(w: &GuestWorkers) -> String {
    let mut text = format!(
        "guest agent:  {}\n",
        agent(w.agent_connected, w.agent_version.as_deref())
    );
    let Some(age) = w.snapshot_age_ms else {
        text.push_str("no worker snapshot from the guest agent yet\n");
        return text;
    };
    let _ = writeln!(text, "snapshot:     {:.1} s old", age as f64 / 1000.0);
    let mut sorted: Vec<&GuestWorker> = w.workers.iter().collect();
    sorted.sort_by(|a, b| (a.cpu, &a.descriptor).cmp(&(b.cpu, &b.descriptor)));
    let width = sorted
        .iter()
        .map(|w| esc(&w.descriptor).chars().count())
        .max()
        .unwrap_or(0)
        .max("DESCRIPTOR".len());
    let _ = writeln!(
        text,
        "\nCPU   {:<width$}  STATUS   LAST  SETUP  PARK  UNPARK  THREAD_FN",
        "DESCRIPTOR"
    );
    for w in sorted {
        let last = w.last_cpu.map_or_else(|| "-".to_owned(), |c| c.to_string());
        let _ = writeln!(
            text,
            "{:<5} {:<width$}  {:<8} {last:<5} {:<6} {:<5} {:<7} {}",
            w.cpu,
            esc(&w.descriptor),
            esc(&w.status),
            w.setup_calls,
            w.park_calls,
            w.unpark_calls,
            w.thread_fn_calls
        );
    }
    if !w.work.is_empty() {
        text.push_str("\nCPU   ITEMS DONE\n");
        let mut work = w.work.clone();
        work.sort_by_key(|c| c.cpu);
        for c in work {
            let _ = writeln!(text, "{:<5} {}", c.cpu, c.items_done);
        }
    }
    text
}

/// `fault`.
pub(super) fn fault(f: &FaultInjected) -> String {
    let on = f.cpu.map_or_else(String::new, |c| format!(" on vCPU {c}"));
    match f.target {
        FaultTarget::Agent => format!("fault {}{on} sent to the guest agent\n", f.fault),
        FaultTarget::Vmm => format!("fault {}{on} armed in the VMM\n", f.fault),
    }
}

fn ids(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    list.join(", ")
}

fn what(op: &Operation) -> String {
    match (op.kind, op.desired) {
        (OperationKind::Resize, Some(n)) => format!("resize to {n}"),
        (OperationKind::Resize, None) => "resize".to_owned(),
        (OperationKind::Add, _) => format!("add vCPU {}", ids(&op.vcpus)),
        (OperationKind::Remove, _) => format!("remove vCPU {}", ids(&op.vcpus)),
    }
}

fn ago(started_unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let ms = now.saturating_sub(u128::from(started_unix_ms));
    format!("{:.1} s ago", ms as f64 / 1000.0)
}

/// `operation ID`.
pub(super) fn operation(op: &Operation) -> String {
    let mut text = format!("operation {}: {}: {}", op.id, what(op), op.status);
    if !op.vcpus.is_empty() {
        let _ = write!(text, " (vCPUs {})", ids(&op.vcpus));
    }
    match (op.status, op.duration_ms) {
        (OperationStatus::Running, _) => {
            let _ = write!(text, ", started {}", ago(op.started_unix_ms));
        }
        (_, Some(ms)) => {
            let _ = write!(text, " in {ms} ms");
        }
        (_, None) => {}
    }
    if let Some(reason) = &op.reason {
        let _ = write!(text, ": {}", esc(reason));
    }
    text.push('\n');
    text
}

/// The answer to resize, add and remove.
pub(super) fn outcome(outcome: &MutationOutcome) -> String {
    match outcome {
        MutationOutcome::Unchanged(op) => match (op.kind, op.desired) {
            (OperationKind::Resize, Some(n)) => {
                format!("nothing to do: {n} vCPUs already present\n")
            }
            _ => format!("nothing to do (operation {})\n", op.id),
        },
        MutationOutcome::Accepted(op) if op.status.is_finished() => operation(op),
        MutationOutcome::Accepted(op) => format!(
            "operation {} started: {} (vCPUs {}); follow it with `vmmctl operation {}`\n",
            op.id,
            what(op),
            ids(&op.vcpus),
            op.id
        ),
        MutationOutcome::Finished(op) => operation(op),
    }
}

/// One line for an error, with the server's code when there is one.
pub(super) fn error(error: &ClientError) -> String {
    esc(&error_text(error)).into_owned()
}

/// [`error`] before escaping.
fn error_text(error: &ClientError) -> String {
    let mut text = match error {
        ClientError::Api { status, error } => {
            return format!("{} [{}, HTTP {status}]", error.message, error.code)
        }
        ClientError::WaitTimedOut(op) => {
            return format!(
                "timed out waiting for operation {} ({}, vCPUs {}); it is still {}",
                op.id,
                what(op),
                ids(&op.vcpus),
                op.status
            )
        }
        other => other.to_string(),
    };
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// `metrics`: the Prometheus text, lines kept.
pub(super) fn metrics(text: &str) -> String {
    escape::lines(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiError, CpuWork, ErrorCode, FaultKind, VcpuInfo, VcpuState, VmState};

    fn op(status: OperationStatus) -> Operation {
        Operation {
            id: 4,
            kind: OperationKind::Resize,
            desired: Some(3),
            vcpus: vec![1, 2],
            status,
            reason: None,
            started_unix_ms: 0,
            duration_ms: Some(12),
        }
    }

    #[test]
    fn vcpu_table() {
        let list = VcpuList {
            max_vcpus: 2,
            vcpus: vec![
                VcpuInfo {
                    id: 0,
                    state: VcpuState::Present,
                    guest_online: Some(true),
                    guest_cpu: None,
                    workers: None,
                },
                VcpuInfo {
                    id: 1,
                    state: VcpuState::Adding,
                    guest_online: None,
                    guest_cpu: None,
                    workers: None,
                },
            ],
        };
        assert_eq!(
            vcpus(&list),
            "ID    STATE     GUEST\n0     present   online\n1     adding    -\n1 of 2 present\n"
        );
    }

    #[test]
    fn vcpu_table_with_linux_numbers() {
        let vcpu = |id, state, guest_cpu: Option<u32>| VcpuInfo {
            id,
            state,
            guest_online: guest_cpu.map(|_| true),
            guest_cpu,
            workers: None,
        };
        let list = VcpuList {
            max_vcpus: 8,
            vcpus: vec![
                vcpu(0, VcpuState::Present, Some(0)),
                vcpu(1, VcpuState::Absent, None),
                vcpu(6, VcpuState::Present, Some(1)),
            ],
        };
        assert_eq!(
            vcpus(&list),
            "ID    STATE     GUEST    CPU\n\
             0     present   online   cpu0\n\
             1     absent    -        -\n\
             6     present   online   cpu1\n\
             2 of 8 present\n"
        );
    }

    fn worker(descriptor: &str, cpu: u32, status: &str) -> GuestWorker {
        GuestWorker {
            descriptor: descriptor.into(),
            cpu,
            status: status.into(),
            last_cpu: (status == "active").then_some(cpu),
            setup_calls: 1,
            park_calls: 0,
            unpark_calls: 0,
            thread_fn_calls: 42,
        }
    }

    #[test]
    fn vcpu_table_with_workers() {
        let list = VcpuList {
            max_vcpus: 2,
            vcpus: vec![
                VcpuInfo {
                    id: 0,
                    state: VcpuState::Present,
                    guest_online: Some(true),
                    guest_cpu: None,
                    workers: Some(vec![
                        worker("a", 0, "active"),
                        worker("b", 0, "active"),
                        worker("c", 0, "parked"),
                    ]),
                },
                VcpuInfo {
                    id: 1,
                    state: VcpuState::Absent,
                    guest_online: None,
                    guest_cpu: None,
                    workers: None,
                },
            ],
        };
        assert_eq!(
            vcpus(&list),
            "ID    STATE     GUEST    WORKERS\n0     present   online   2 active, 1 parked\n1     absent    -        -\n1 of 2 present\n"
        );
    }

    #[test]
    fn workers_table() {
        let mut w = GuestWorkers::unknown();
        assert_eq!(
            workers(&w),
            "guest agent:  unknown\nno worker snapshot from the guest agent yet\n"
        );
        w.agent_connected = Some(true);
        w.agent_version = Some("0.1".into());
        w.snapshot_age_ms = Some(1500);
        w.workers = vec![
            worker("ksoftirqd", 1, "parked"),
            worker("kworker", 0, "active"),
        ];
        w.work = vec![
            CpuWork {
                cpu: 1,
                items_done: 3,
            },
            CpuWork {
                cpu: 0,
                items_done: 9,
            },
        ];
        assert_eq!(
            workers(&w),
            "guest agent:  connected (version 0.1)\nsnapshot:     1.5 s old\n\n\
             CPU   DESCRIPTOR  STATUS   LAST  SETUP  PARK  UNPARK  THREAD_FN\n\
             0     kworker     active   0     1      0     0       42\n\
             1     ksoftirqd   parked   -     1      0     0       42\n\
             \nCPU   ITEMS DONE\n0     9\n1     3\n"
        );
    }

    #[test]
    fn fault_text() {
        let f = FaultInjected {
            fault: FaultKind::IgnoreRemoval,
            cpu: Some(2),
            target: FaultTarget::Vmm,
        };
        assert_eq!(
            fault(&f),
            "fault ignore_removal on vCPU 2 armed in the VMM\n"
        );
        let f = FaultInjected {
            fault: FaultKind::AgentSilence,
            cpu: None,
            target: FaultTarget::Agent,
        };
        assert_eq!(fault(&f), "fault agent_silence sent to the guest agent\n");
    }

    #[test]
    fn vm_text() {
        let info = VmInfo {
            state: VmState::Running,
            boot_vcpus: 1,
            max_vcpus: 8,
            present_vcpus: 2,
            memory_mib: 512,
            agent_connected: Some(true),
            agent_version: Some("1.2".into()),
            workload: None,
        };
        let text = vm(&info);
        assert!(text.contains("2 present (1 at boot, 8 max)"), "{text}");
        assert!(text.contains("connected (version 1.2)"), "{text}");
        assert!(text.ends_with("workload:     none\n"), "{text}");
    }

    #[test]
    fn vm_text_shows_the_workload_escaped() {
        let with = |w: WorkloadInfo| {
            vm(&VmInfo {
                state: VmState::Running,
                boot_vcpus: 1,
                max_vcpus: 4,
                present_vcpus: 1,
                memory_mib: 256,
                agent_connected: Some(true),
                agent_version: None,
                workload: Some(w),
            })
        };
        let base = WorkloadInfo {
            state: WorkloadState::Running,
            pid: Some(97),
            exit_status: None,
            signal: None,
            error: None,
            output_lines: 12,
        };
        let text = with(base.clone());
        assert!(
            text.contains("\nworkload:     running (pid 97, 12 output lines)\n"),
            "{text}"
        );
        let text = with(WorkloadInfo {
            state: WorkloadState::Exited,
            exit_status: Some(3),
            ..base.clone()
        });
        assert!(
            text.contains("workload:     exited with status 3 (pid 97, 12 output lines)\n"),
            "{text}"
        );
        let text = with(WorkloadInfo {
            state: WorkloadState::Exited,
            exit_status: Some(137),
            signal: Some(9),
            ..base.clone()
        });
        assert!(text.contains("killed by signal 9, status 137"), "{text}");
        // The guest's reason: control characters and escapes come out
        // visible, never raw, on the workload's one line.
        let text = with(WorkloadInfo {
            state: WorkloadState::Failed,
            pid: None,
            exit_status: Some(127),
            error: Some("no such file\u{1b}[2J\nfake: line\u{202e}".into()),
            ..base
        });
        assert!(
            text.contains(
                "workload:     could not start, status 127: \
                 no such file\\u{1b}[2J\\nfake: line\\u{202e}\n"
            ),
            "{text}"
        );
        assert!(!text.contains(['\u{1b}', '\u{202e}']), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn outcomes() {
        let done = outcome(&MutationOutcome::Finished(op(OperationStatus::Succeeded)));
        assert_eq!(
            done,
            "operation 4: resize to 3: succeeded (vCPUs 1, 2) in 12 ms\n"
        );
        let started = outcome(&MutationOutcome::Accepted(op(OperationStatus::Running)));
        assert!(
            started.starts_with("operation 4 started: resize to 3 (vCPUs 1, 2)"),
            "{started}"
        );
        // Accepted, but finished by the time the server answered.
        let quick = outcome(&MutationOutcome::Accepted(op(OperationStatus::Succeeded)));
        assert!(
            quick.starts_with("operation 4: resize to 3: succeeded"),
            "{quick}"
        );
        let mut noop = op(OperationStatus::Succeeded);
        noop.vcpus.clear();
        assert_eq!(
            outcome(&MutationOutcome::Unchanged(noop)),
            "nothing to do: 3 vCPUs already present\n"
        );
    }

    #[test]
    fn errors_show_the_code() {
        let e = ClientError::Api {
            status: 409,
            error: ApiError::new(ErrorCode::Vcpu0NotRemovable, "vCPU 0 cannot be removed"),
        };
        assert_eq!(
            error(&e),
            "vCPU 0 cannot be removed [vcpu0_not_removable, HTTP 409]"
        );
        let e = ClientError::WaitTimedOut(op(OperationStatus::Running));
        assert!(error(&e).contains("still running"));
    }
}
