//! `GET /api/v1/vm`: the VM as a whole.

use serde::{Deserialize, Serialize};

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built, guest not yet running.
    Starting,
    /// The guest is running.
    Running,
    /// The VMM is tearing the VM down.
    Stopping,
}

impl VmState {
    /// Every variant.
    pub const ALL: [VmState; 3] = [Self::Starting, Self::Running, Self::Stopping];
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
        })
    }
}

/// The answer to `GET /api/v1/vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Where the VM is in its life.
    pub state: VmState,
    /// vCPUs present at boot.
    pub boot_vcpus: u32,
    /// The most vCPUs the VM can have (ids `0..max_vcpus`).
    pub max_vcpus: u32,
    /// vCPUs present now (including those being removed).
    pub present_vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Whether the guest agent is connected; absent while unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_connected: Option<bool>,
    /// The guest agent's version, once it has said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The user's workload, when the guest runs one (`launch --run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadInfo>,
}

/// Where the user's workload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    /// Started by the guest agent, not ended yet.
    Running,
    /// It ended (`exit_status`, and `signal` if one killed it).
    Exited,
    /// It could not be started (`error` says why).
    Failed,
}

impl WorkloadState {
    /// Every variant.
    pub const ALL: [WorkloadState; 3] = [Self::Running, Self::Exited, Self::Failed];
}

impl std::fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Exited => "exited",
            Self::Failed => "failed",
        })
    }
}

/// The user's workload in `GET /api/v1/vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Where it is in its life.
    pub state: WorkloadState,
    /// Its process id in the guest, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Once ended, the status a shell would give: its exit status, 128 +
    /// the signal that killed it, 127 (not found) or 126 (could not start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it could not be started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Lines of its output (stdout and stderr) the VMM received so far.
    pub output_lines: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_agent_fields_are_omitted() {
        let vm = VmInfo {
            state: VmState::Running,
            boot_vcpus: 1,
            max_vcpus: 4,
            present_vcpus: 2,
            memory_mib: 256,
            agent_connected: None,
            agent_version: None,
            workload: None,
        };
        let json = serde_json::to_value(&vm).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"state": "running", "boot_vcpus": 1, "max_vcpus": 4,
                "present_vcpus": 2, "memory_mib": 256})
        );
        let back: VmInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, vm);
        let with = VmInfo {
            workload: Some(WorkloadInfo {
                state: WorkloadState::Exited,
                pid: Some(97),
                exit_status: Some(137),
                signal: Some(9),
                error: None,
                output_lines: 4,
            }),
            ..vm
        };
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(
            json["workload"],
            serde_json::json!({"state": "exited", "pid": 97, "exit_status": 137,
                "signal": 9, "output_lines": 4})
        );
        assert_eq!(serde_json::from_value::<VmInfo>(json).unwrap(), with);
    }
}
