//! `/api/v1/vcpus`: every possible vCPU and the resize request.

use serde::{Deserialize, Serialize};

use crate::guest::GuestWorker;

/// The life of one vCPU slot as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuState {
    /// Not plugged in.
    Absent,
    /// Hot-add requested; the guest has not yet brought it online.
    Adding,
    /// Plugged in.
    Present,
    /// Hot-remove requested; the guest has not yet ejected it.
    Removing,
    /// Its thread did not stop when asked (after an eject, or undoing an
    /// add): the VMM cannot reuse it until a later request (an add or a
    /// removal of this id) retries the join.
    Stuck,
}

impl VcpuState {
    /// Every variant.
    pub const ALL: [VcpuState; 5] = [
        Self::Absent,
        Self::Adding,
        Self::Present,
        Self::Removing,
        Self::Stuck,
    ];

    /// Whether an operation on this vCPU is in flight.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Adding | Self::Removing)
    }
}

impl std::fmt::Display for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Absent => "absent",
            Self::Adding => "adding",
            Self::Present => "present",
            Self::Removing => "removing",
            Self::Stuck => "stuck",
        })
    }
}

/// One possible vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    /// vCPU id (= APIC ID = KVM vCPU id = the ACPI processor's `_UID`).
    pub id: u32,
    /// What the VMM is doing with it.
    pub state: VcpuState,
    /// Whether the guest has it online; absent until the guest has said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_online: Option<bool>,
    /// Linux's logical number for it in the guest (`cpuN`), which differs
    /// from `id` when vCPUs were added out of order; absent while unknown
    /// (no agent, or not present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cpu: Option<u32>,
    /// The guest's worker threads for this CPU, from the agent's last
    /// snapshot; absent until the agent has sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<GuestWorker>>,
}

/// The answer to `GET /api/v1/vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuList {
    /// The most vCPUs the VM can have.
    pub max_vcpus: u32,
    /// Every possible vCPU, by ascending id.
    pub vcpus: Vec<VcpuInfo>,
}

impl VcpuList {
    /// How many vCPUs are in `state`.
    pub fn count(&self, state: VcpuState) -> usize {
        self.vcpus.iter().filter(|v| v.state == state).count()
    }
}

/// The body of `PUT /api/v1/vcpus`. Only a JSON object with exactly this
/// field is accepted (not an array, no other fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResizeRequest {
    /// How many vCPUs should be present (1 to `max_vcpus`).
    pub desired: u32,
}

impl<'de> Deserialize<'de> for ResizeRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Strict {
            desired: u32,
        }
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = ResizeRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object like {\"desired\": 2}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let Strict { desired } =
                    Strict::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ResizeRequest { desired })
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_request_is_strict() {
        let ok: ResizeRequest = serde_json::from_str(r#"{"desired": 3}"#).unwrap();
        assert_eq!(ok.desired, 3);
        let err = serde_json::from_str::<ResizeRequest>(r#"{"desired": 3, "x": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
        for bad in [
            r#"{"desired": 3, "extra": 1}"#,
            r#"{"desired": "3"}"#,
            r#"{"desired": -1}"#,
            r#"{"desired": 1.5}"#,
            r#"{"desired": 4294967296}"#,
            r#"{}"#,
            r#"[3]"#,
            r#"3"#,
            r#"null"#,
        ] {
            assert!(serde_json::from_str::<ResizeRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vcpu_info_guest_online_optional() {
        let v: VcpuInfo = serde_json::from_str(r#"{"id": 2, "state": "adding"}"#).unwrap();
        assert_eq!(v.guest_online, None);
        assert_eq!(v.guest_cpu, None);
        assert_eq!(v.workers, None);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"id":2,"state":"adding"}"#
        );
        let v: VcpuInfo = serde_json::from_str(
            r#"{"id": 6, "state": "present", "guest_online": true, "guest_cpu": 1}"#,
        )
        .unwrap();
        assert_eq!(v.guest_cpu, Some(1));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"id":6,"state":"present","guest_online":true,"guest_cpu":1}"#
        );
        assert!(VcpuState::Adding.in_flight());
        assert!(!VcpuState::Present.in_flight());
    }
}
