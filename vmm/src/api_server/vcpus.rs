//! `/api/v1/vcpus` and `/api/v1/vcpus/{id}`.

use api::ResizeRequest;

use super::parse::{self, Parsed, RequestError, RequestParts};
use crate::control::Action;

/// `GET /api/v1/vcpus`.
pub(super) fn parse_get(req: &RequestParts) -> Result<Parsed, RequestError> {
    req.no_query()?;
    req.no_body()?;
    Ok(Parsed::new(Action::GetVcpus))
}

/// `PUT /api/v1/vcpus` with `{"desired": N}`.
pub(super) fn parse_resize(req: &RequestParts) -> Result<Parsed, RequestError> {
    let wait = req.wait()?;
    let ResizeRequest { desired } = req.json()?;
    Ok(Parsed {
        action: Action::Resize { desired },
        wait,
    })
}

/// `PUT /api/v1/vcpus/{id}`.
pub(super) fn parse_add(id: &str, req: &RequestParts) -> Result<Parsed, RequestError> {
    let id = parse::id("vCPU", id)?;
    let wait = req.wait()?;
    req.no_body()?;
    Ok(Parsed {
        action: Action::AddVcpu(id),
        wait,
    })
}

/// `DELETE /api/v1/vcpus/{id}`.
pub(super) fn parse_remove(id: &str, req: &RequestParts) -> Result<Parsed, RequestError> {
    let id = parse::id("vCPU", id)?;
    let wait = req.wait()?;
    req.no_body()?;
    Ok(Parsed {
        action: Action::RemoveVcpu(id),
        wait,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::body::Bytes;

    use super::*;

    #[test]
    fn resize_with_wait() {
        let req = RequestParts {
            query: Some("wait=1.5".into()),
            content_type: Some("application/json".into()),
            body: Bytes::from_static(br#"{"desired": 4}"#),
        };
        let parsed = parse_resize(&req).unwrap();
        assert_eq!(parsed.action, Action::Resize { desired: 4 });
        assert_eq!(parsed.wait, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn add_and_remove_ids() {
        let req = RequestParts::default();
        assert_eq!(parse_add("3", &req).unwrap().action, Action::AddVcpu(3));
        assert_eq!(
            parse_remove("0", &req).unwrap().action,
            Action::RemoveVcpu(0)
        );
        assert!(parse_add("x", &req).is_err());
        let with_body = RequestParts {
            body: Bytes::from_static(b"{}"),
            ..Default::default()
        };
        assert!(parse_remove("1", &with_body).is_err());
    }
}
