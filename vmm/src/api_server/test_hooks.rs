//! `/api/v1/test/faults` (test hook; the router serves it only with
//! `ServerOptions::test_hooks`).

use api::FaultRequest;

use super::parse::{Parsed, RequestError, RequestParts};
use crate::control::Action;

/// `POST /api/v1/test/faults` with `{"fault": KIND, "cpu": N}`.
pub(super) fn parse_fault(req: &RequestParts) -> Result<Parsed, RequestError> {
    req.no_query()?;
    let FaultRequest { fault, cpu } = req.json()?;
    Ok(Parsed::new(Action::InjectFault { fault, cpu }))
}

#[cfg(test)]
mod tests {
    use api::{ErrorCode, FaultKind};
    use hyper::body::Bytes;

    use super::*;

    fn body(json: &'static str) -> RequestParts {
        RequestParts {
            content_type: Some("application/json".into()),
            body: Bytes::from_static(json.as_bytes()),
            ..Default::default()
        }
    }

    #[test]
    fn fault_bodies() {
        assert_eq!(
            parse_fault(&body(r#"{"fault": "ignore_removal", "cpu": 2}"#))
                .unwrap()
                .action,
            Action::InjectFault {
                fault: FaultKind::IgnoreRemoval,
                cpu: Some(2)
            }
        );
        assert_eq!(
            parse_fault(&body(r#"{"fault": "agent_silence"}"#))
                .unwrap()
                .action,
            Action::InjectFault {
                fault: FaultKind::AgentSilence,
                cpu: None
            }
        );
        for bad in [
            r#"{"fault": "agent_refuse_offline"}"#,
            r#"{"fault": "ignore_removal", "cpu": 2, "now": true}"#,
            r#"{"fault": "nope"}"#,
            "",
        ] {
            let e = parse_fault(&body(bad)).unwrap_err();
            assert_eq!(e.to_api_error().code, ErrorCode::MalformedRequest, "{bad}");
        }
        let mut with_query = body(r#"{"fault": "agent_silence"}"#);
        with_query.query = Some("wait=1".into());
        assert!(parse_fault(&with_query).is_err());
    }
}
