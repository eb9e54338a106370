//! API operations as the end-to-end scenarios run them: each finished
//! operation printed as an `E2E-TIME step=...` line (its id, status,
//! duration and reason), so a log shows every step's figures.

use api::client::{ClientError, MutationOutcome};
use api::{Operation, OperationStatus};

use crate::BoxError;

/// The operation of `r`, printed; an error if the request itself failed.
pub fn logged(what: &str, r: Result<MutationOutcome, ClientError>) -> Result<Operation, BoxError> {
    let op = r.map_err(|e| format!("{what}: {e}"))?.operation().clone();
    println!(
        "E2E-TIME step={what:?} op={} status={} ms={:?} reason={:?}",
        op.id, op.status, op.duration_ms, op.reason
    );
    Ok(op)
}

/// [`logged`], and an error unless the operation succeeded.
pub fn succeeded(
    what: &str,
    r: Result<MutationOutcome, ClientError>,
) -> Result<Operation, BoxError> {
    let op = logged(what, r)?;
    if op.status != OperationStatus::Succeeded {
        return Err(format!("{what}: {op:?}").into());
    }
    Ok(op)
}
