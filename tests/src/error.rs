//! The harness's error type.

use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::host::SelectError;

/// Any error a scenario step can return (the harness's or a test's own).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result of the harness's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure of the harness, the emulated host, the VMM or the guest.
#[derive(Debug, Error)]
pub enum Error {
    /// No host can run the VMM here.
    #[error("cannot choose a host")]
    Select(#[from] SelectError),
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Building or fetching an artifact (kernel, binary, image) failed.
    #[error("cannot prepare {what}")]
    Artifact {
        /// Which artifact.
        what: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The emulated host itself failed (reset, soft lockup): retried once.
    #[error("the emulated host failed: {0}")]
    HostFailed(String),
    /// The emulated host (or the nested guest under it) failed in a
    /// classified way again on the one retry: the test fails with both
    /// classifications and what the scenario saw.
    #[error("the emulated host failed again on the retry, not retried twice: {second} (the first attempt: {first})")]
    HostFailedAgain {
        /// The first attempt's classification (the one `E2E-RETRY:` announced).
        first: String,
        /// The retry's classification.
        second: String,
        /// What the scenario saw.
        #[source]
        scenario: BoxError,
    },
    /// `testhost-init` reported an error of its own.
    #[error("testhost-init: {0}")]
    Testhost(String),
    /// A step did not finish in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// The VMM (or the emulated host) exited while something was awaited.
    #[error("exited while waiting for {0}")]
    Exited(String),
    /// A resource of one VM (its API socket) belongs to another running VM.
    #[error("{0}")]
    InUse(String),
    /// A scenario step failed.
    #[error("scenario failed")]
    Scenario(#[source] BoxError),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// Why the test cannot run on this machine at all (no KVM host, or no
    /// way to fetch the kernel), as opposed to a failure: tests print it as
    /// an `E2E-SKIP:` line.
    pub fn skip_reason(&self) -> Option<String> {
        match self {
            Error::Select(SelectError::Unavailable(why)) => Some(why.clone()),
            Error::Artifact { what, source } => source
                .downcast_ref::<resources::Error>()
                .filter(|e| e.is_apt_unavailable())
                .map(|e| format!("cannot prepare {what}: {e}")),
            _ => None,
        }
    }

    /// True when the emulated host itself failed: the one case retried.
    pub fn is_host_failure(&self) -> bool {
        matches!(self, Error::HostFailed(_))
    }
}

/// What a failed scenario attempt leads to under the retry policy.
#[derive(Debug)]
pub enum AfterFailure {
    /// The emulated host (or the nested guest under it) failed in a
    /// classified way on the first attempt: boot once more.
    Retry(String),
    /// The test fails with this error.
    Fail(Error),
}

/// The retry policy for a scenario that returned `scenario`: `host_failed`
/// is the classified failure of the emulated host or nested guest seen on
/// the console, if any; `first` the classified failure an earlier attempt
/// was retried for, if there was one. A classified failure is retried once; a second
/// one fails the test with both classifications in the message; anything
/// else is the scenario's own failure.
pub fn after_failure(
    host_failed: Option<String>,
    first: Option<&str>,
    scenario: BoxError,
) -> AfterFailure {
    match (host_failed, first) {
        (Some(f), None) => AfterFailure::Retry(f),
        (Some(second), Some(first)) => AfterFailure::Fail(Error::HostFailedAgain {
            first: first.to_string(),
            second,
            scenario,
        }),
        (None, _) => AfterFailure::Fail(Error::Scenario(scenario)),
    }
}

/// `error: cause: cause ...`, the whole source chain on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reports a test that cannot run here: prints one `E2E-SKIP: reason`
/// line, or panics when `E2E_REQUIRE` is set (CI, where tests must run).
pub fn skip(reason: &str) {
    if std::env::var_os("E2E_REQUIRE").is_some() {
        panic!("E2E_REQUIRE is set but the test cannot run: {reason}");
    }
    // Straight to the process's stdout, past the test runner's capture,
    // so that the skip shows even when the test passes.
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "E2E-SKIP: {reason}");
}

/// Ends a test on a harness result: passes on `Ok`, prints the skip line
/// for [`Error::skip_reason`], panics with the error chain otherwise.
pub fn conclude<T>(name: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => match e.skip_reason() {
            Some(why) => {
                skip(&why);
                None
            }
            None => panic!("{name} failed: {}", chain(&e)),
        },
    }
}

/// Runs `scenario` on a VM of `spec` ([`crate::run`]), prints
/// `E2E-TIME test=<name> ms=<elapsed>` when it passes, and ends like
/// [`conclude`]: the skip line, or a panic with the error chain.
pub fn run_test(
    name: &str,
    spec: &crate::VmSpec,
    scenario: impl FnMut(&mut crate::RunningVm) -> std::result::Result<(), crate::BoxError>,
) {
    let start = std::time::Instant::now();
    if conclude(name, crate::run(spec, scenario)).is_some() {
        println!("E2E-TIME test={name} ms={}", start.elapsed().as_millis());
    }
}

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    /// Wraps the error with what was being done.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario_error() -> BoxError {
        "cycle 3: resize 8->1: no answer within 120s".into()
    }

    #[test]
    fn a_classified_failure_is_retried_once_then_named_in_the_failure() {
        let first = after_failure(Some("soft lockup".into()), None, scenario_error());
        assert!(matches!(first, AfterFailure::Retry(ref f) if f == "soft lockup"));
        let first = "the emulated host failed: triple fault";
        let AfterFailure::Fail(e) = after_failure(
            Some("host: BUG: soft lockup".into()),
            Some(first),
            scenario_error(),
        ) else {
            panic!("a second classified failure is not retried");
        };
        let text = chain(&e);
        assert!(!e.is_host_failure(), "{text}");
        for part in [
            "failed again on the retry",
            "host: BUG: soft lockup",
            "the first attempt: the emulated host failed: triple fault)",
            "no answer within 120s",
        ] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
    }

    #[test]
    fn an_unclassified_failure_is_the_scenarios() {
        for first in [None, Some("the emulated host failed: x")] {
            let AfterFailure::Fail(e) = after_failure(None, first, scenario_error()) else {
                panic!("never retried");
            };
            assert!(matches!(e, Error::Scenario(_)));
        }
    }
}
