//! `/api/v1/guest/workers`.

use super::parse::{Parsed, RequestError, RequestParts};
use crate::control::Action;

/// `GET /api/v1/guest/workers`.
pub(super) fn parse_workers(req: &RequestParts) -> Result<Parsed, RequestError> {
    req.no_query()?;
    req.no_body()?;
    Ok(Parsed::new(Action::GetWorkers))
}

#[cfg(test)]
mod tests {
    use hyper::body::Bytes;

    use super::*;

    #[test]
    fn workers_takes_nothing() {
        assert_eq!(
            parse_workers(&RequestParts::default()).unwrap().action,
            Action::GetWorkers
        );
        let query = RequestParts {
            query: Some("cpu=1".into()),
            ..Default::default()
        };
        assert!(parse_workers(&query).is_err());
        let body = RequestParts {
            body: Bytes::from_static(b"{}"),
            ..Default::default()
        };
        assert!(parse_workers(&body).is_err());
    }
}
