//! Human-readable text for `vmmctl`'s answers.

use std::error::Error as _;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::client::{ClientError, MutationOutcome};
use crate::{Operation, OperationKind, OperationStatus, VcpuList, VmInfo};

/// `status`.
pub(super) fn vm(vm: &VmInfo) -> String {
    let agent = match (vm.agent_connected, &vm.agent_version) {
        (Some(true), Some(v)) => format!("connected (version {v})"),
        (Some(true), None) => "connected".to_owned(),
        (Some(false), _) => "not connected".to_owned(),
        (None, _) => "unknown".to_owned(),
    };
    format!(
        "state:        {}\nvCPUs:        {} present ({} at boot, {} max)\nmemory:       {} MiB\nguest agent:  {agent}\n",
        vm.state, vm.present_vcpus, vm.boot_vcpus, vm.max_vcpus, vm.memory_mib
    )
}

/// `vcpus`: one line per vCPU.
pub(super) fn vcpus(list: &VcpuList) -> String {
    let mut text = String::from("ID    STATE     GUEST\n");
    for v in &list.vcpus {
        let guest = match v.guest_online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "-",
        };
        let _ = writeln!(text, "{:<5} {:<9} {guest}", v.id, v.state.to_string());
    }
    let present = list.count(crate::VcpuState::Present);
    let _ = writeln!(text, "{present} of {} present", list.max_vcpus);
    text
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
        let _ = write!(text, ": {reason}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiError, ErrorCode, VcpuInfo, VcpuState, VmState};

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
                },
                VcpuInfo {
                    id: 1,
                    state: VcpuState::Adding,
                    guest_online: None,
                },
            ],
        };
        assert_eq!(
            vcpus(&list),
            "ID    STATE     GUEST\n0     present   online\n1     adding    -\n1 of 2 present\n"
        );
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
        };
        let text = vm(&info);
        assert!(text.contains("2 present (1 at boot, 8 max)"), "{text}");
        assert!(text.contains("connected (version 1.2)"), "{text}");
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
