//! `/api/v1/operations/{id}`.

use super::parse::{self, Parsed, RequestError, RequestParts};
use crate::control::Action;

/// `GET /api/v1/operations/{id}`.
pub(super) fn parse_get(id: &str, req: &RequestParts) -> Result<Parsed, RequestError> {
    let id = parse::id("operation", id)?;
    req.no_query()?;
    req.no_body()?;
    Ok(Parsed::new(Action::GetOperation(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let req = RequestParts::default();
        assert_eq!(
            parse_get("12", &req).unwrap().action,
            Action::GetOperation(12)
        );
        assert!(parse_get("-1", &req).is_err());
    }
}
