//! `POST /api/v1/test/faults`: test hooks that make the guest agent or the
//! VMM misbehave on purpose, for the end-to-end tests. Served only by a
//! VMM started with `--test-hooks`; any other VMM answers `404` as for an
//! unknown path.

use serde::{Deserialize, Serialize};

use crate::agent::Fault;

/// What to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The agent answers the next prepare-remove of `cpu` with failure
    /// (after parking its workers, which it then unparks again).
    AgentRefuseOffline,
    /// The agent offlines `cpu` itself, bypassing its registry, as an
    /// administrator writing 0 to `online` would.
    AgentForceOffline,
    /// The agent stops talking (no heartbeats, no answers).
    AgentSilence,
    /// The VMM reserves the next removal of `cpu` (it shows `removing`)
    /// but never tells the guest: neither the agent nor the ACPI eject.
    /// One-shot; a later `DELETE` of the vCPU while it is still removing
    /// sends the request for real.
    IgnoreRemoval,
    /// The VMM lets the agent prepare the next removal of `cpu` (workers
    /// parked, CPU offline) but never raises its ACPI eject: the removal
    /// times out, and the VMM must bring the CPU back online through the
    /// agent before it counts as present again. One-shot.
    IgnoreEject,
    /// The agent onlines the next hot-added CPU at once but holds its
    /// online report back until after the VMM's add timeout. Not per CPU.
    AgentDelayReport,
}

impl FaultKind {
    /// Every variant.
    pub const ALL: [FaultKind; 6] = [
        Self::AgentRefuseOffline,
        Self::AgentForceOffline,
        Self::AgentSilence,
        Self::IgnoreRemoval,
        Self::IgnoreEject,
        Self::AgentDelayReport,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentRefuseOffline => "agent_refuse_offline",
            Self::AgentForceOffline => "agent_force_offline",
            Self::AgentSilence => "agent_silence",
            Self::IgnoreRemoval => "ignore_removal",
            Self::IgnoreEject => "ignore_eject",
            Self::AgentDelayReport => "agent_delay_report",
        }
    }

    /// Whether the fault applies to one CPU (then `cpu` is required).
    pub fn needs_cpu(self) -> bool {
        !matches!(self, Self::AgentSilence | Self::AgentDelayReport)
    }

    /// The agent's fault this is forwarded as; `None` for VMM-side faults.
    pub fn agent_fault(self) -> Option<Fault> {
        match self {
            Self::AgentRefuseOffline => Some(Fault::RefuseOffline),
            Self::AgentForceOffline => Some(Fault::ForceOffline),
            Self::AgentSilence => Some(Fault::Silence),
            Self::AgentDelayReport => Some(Fault::DelayReport),
            Self::IgnoreRemoval | Self::IgnoreEject => None,
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`FaultKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown fault `{0}`: expected one of agent_refuse_offline, agent_force_offline, agent_silence, ignore_removal, ignore_eject, agent_delay_report")]
pub struct UnknownFault(pub String);

impl std::str::FromStr for FaultKind {
    type Err = UnknownFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownFault(s.to_owned()))
    }
}

/// The body of `POST /api/v1/test/faults`: a JSON object with `fault` and,
/// for faults that apply to one CPU, `cpu`; nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultRequest {
    /// What to break.
    pub fault: FaultKind,
    /// The vCPU it applies to (required unless the fault concerns no CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
}

impl<'de> Deserialize<'de> for FaultRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Strict {
            fault: FaultKind,
            #[serde(default, deserialize_with = "present_u32")]
            cpu: Option<u32>,
        }
        // `cpu` may be left out, but not given as null.
        fn present_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
            u32::deserialize(d).map(Some)
        }
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = FaultRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object like {\"fault\": \"ignore_removal\", \"cpu\": 2}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let Strict { fault, cpu } =
                    Strict::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if fault.needs_cpu() && cpu.is_none() {
                    return Err(serde::de::Error::custom(format!(
                        "`cpu` is required for {fault}"
                    )));
                }
                Ok(FaultRequest { fault, cpu })
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

/// Who carries a fault out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// Forwarded to the guest agent (which acts when it reads it).
    Agent,
    /// Armed in the VMM.
    Vmm,
}

impl FaultTarget {
    /// Every variant.
    pub const ALL: [FaultTarget; 2] = [Self::Agent, Self::Vmm];
}

/// The answer (`200`) to `POST /api/v1/test/faults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultInjected {
    /// The fault.
    pub fault: FaultKind,
    /// The vCPU it applies to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Who carries it out.
    pub target: FaultTarget,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in FaultKind::ALL {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, serde_json::Value::from(kind.as_str()));
            assert_eq!(kind.as_str().parse::<FaultKind>(), Ok(kind));
            let global = [FaultKind::AgentSilence, FaultKind::AgentDelayReport];
            assert_eq!(kind.needs_cpu(), !global.contains(&kind));
            let vmm = [FaultKind::IgnoreRemoval, FaultKind::IgnoreEject];
            assert_eq!(kind.agent_fault().is_none(), vmm.contains(&kind));
        }
        assert!("silence".parse::<FaultKind>().is_err());
    }

    #[test]
    fn request_is_strict() {
        let ok: FaultRequest =
            serde_json::from_str(r#"{"fault": "ignore_removal", "cpu": 3}"#).unwrap();
        assert_eq!(
            ok,
            FaultRequest {
                fault: FaultKind::IgnoreRemoval,
                cpu: Some(3)
            }
        );
        let silence: FaultRequest = serde_json::from_str(r#"{"fault": "agent_silence"}"#).unwrap();
        assert_eq!(silence.cpu, None);
        assert_eq!(
            serde_json::to_string(&silence).unwrap(),
            r#"{"fault":"agent_silence"}"#
        );
        let err = serde_json::from_str::<FaultRequest>(r#"{"fault": "agent_force_offline"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("`cpu` is required"), "{err}");
        for bad in [
            r#"{"fault": "ignore_removal", "cpu": 1, "x": 1}"#,
            r#"{"fault": "reboot", "cpu": 1}"#,
            r#"{"fault": "ignore_removal", "cpu": -1}"#,
            r#"{"fault": "ignore_removal", "cpu": "1"}"#,
            r#"{"cpu": 1}"#,
            r#"{"fault": "agent_silence", "cpu": null}"#,
            r#"["ignore_removal", 1]"#,
            r#"{}"#,
            r#"null"#,
        ] {
            assert!(serde_json::from_str::<FaultRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answer_shape() {
        let a = FaultInjected {
            fault: FaultKind::AgentRefuseOffline,
            cpu: Some(1),
            target: FaultTarget::Agent,
        };
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::json!({"fault": "agent_refuse_offline", "cpu": 1, "target": "agent"})
        );
    }
}
