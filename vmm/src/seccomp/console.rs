//! The console writer thread (`console`, `vm/console.rs`): it waits on a
//! condition variable and writes the buffered COM1 output to stdout or a
//! file; both are in the common list (`futex`, `write`), so this adds
//! nothing. With `--user` it also takes part in the set-id broadcast
//! (`rules::set_ids`).

use seccompiler::BackendError;

use super::rules::Allowed;

/// What the console thread may do beyond the common list: nothing.
pub(crate) fn allowed() -> Result<Allowed, BackendError> {
    Ok(Allowed::default())
}
