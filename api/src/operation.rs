//! `/api/v1/operations/{id}`: what a mutation did or is doing.

use serde::{Deserialize, Serialize};

/// What a mutation asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// `PUT /api/v1/vcpus`.
    Resize,
    /// `PUT /api/v1/vcpus/{id}`.
    Add,
    /// `DELETE /api/v1/vcpus/{id}`.
    Remove,
}

impl OperationKind {
    /// Every variant.
    pub const ALL: [OperationKind; 3] = [Self::Resize, Self::Add, Self::Remove];
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Resize => "resize",
            Self::Add => "add",
            Self::Remove => "remove",
        })
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    /// Waiting for the guest.
    Running,
    /// The guest confirmed every change (added: online; removed: ejected
    /// and the vCPU thread joined).
    Succeeded,
    /// Something went wrong; see `reason`.
    Failed,
}

impl OperationStatus {
    /// Every variant.
    pub const ALL: [OperationStatus; 3] = [Self::Running, Self::Succeeded, Self::Failed];

    /// Whether the operation has ended (either way).
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Running)
    }
}

impl std::fmt::Display for OperationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        })
    }
}

/// One mutation: the body of `202`, of a `200` to a mutation, of a `504`
/// and of `GET /api/v1/operations/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Id for `GET /api/v1/operations/{id}`.
    pub id: u64,
    /// What was asked.
    pub kind: OperationKind,
    /// The requested count, for a resize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    /// The vCPUs this operation waits for; empty when nothing had to change.
    pub vcpus: Vec<u32>,
    /// Where it is.
    pub status: OperationStatus,
    /// Why it failed, or a note on how it was done (e.g. a removal that
    /// fell back to the plain ACPI eject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// How long it took, in milliseconds of monotonic time, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl Operation {
    /// Whether nothing had to change (the operation waited for no vCPU).
    pub fn is_noop(&self) -> bool {
        self.vcpus.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_optional_fields() {
        let op = Operation {
            id: 7,
            kind: OperationKind::Resize,
            desired: Some(4),
            vcpus: vec![2, 3],
            status: OperationStatus::Running,
            reason: None,
            started_unix_ms: 1_700_000_000_000,
            duration_ms: None,
        };
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 7, "kind": "resize", "desired": 4, "vcpus": [2, 3],
                "status": "running", "started_unix_ms": 1_700_000_000_000u64})
        );
        assert_eq!(serde_json::from_value::<Operation>(json).unwrap(), op);
        assert!(!op.is_noop());
        assert!(!op.status.is_finished());
        assert!(OperationStatus::Failed.is_finished());
    }
}
