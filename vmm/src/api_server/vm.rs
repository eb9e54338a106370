//! `/api/v1/vm`.

use super::parse::{Parsed, RequestError, RequestParts};
use crate::control::Action;

/// `GET /api/v1/vm`.
pub(super) fn parse_get(req: &RequestParts) -> Result<Parsed, RequestError> {
    req.no_query()?;
    req.no_body()?;
    Ok(Parsed::new(Action::GetVm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_takes_nothing() {
        assert_eq!(
            parse_get(&RequestParts::default()).unwrap().action,
            Action::GetVm
        );
        let query = RequestParts {
            query: Some("wait=1".into()),
            ..Default::default()
        };
        assert!(parse_get(&query).is_err());
    }
}
