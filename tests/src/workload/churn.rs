//! The churn driver: a thread that resizes the VM through its HTTP API
//! (the `api` crate's client, `PUT /api/v1/vcpus?wait`) at the times of a
//! [`Churn`], from the workload's start, and reports each step (its
//! latency) or the first failure to the run loop, which prints them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::{BlockingClient, Client, ClientError, MutationOutcome};
use api::OperationStatus;

use super::args::{Churn, Step};

/// How long one resize may take before it counts as failed (the VMM's own
/// add and eject timeouts are 30 s).
pub const RESIZE_WAIT: Duration = Duration::from_secs(90);

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChurnEvent {
    /// A step succeeded.
    Done {
        /// Its number, from 1.
        n: u32,
        /// The step.
        step: Step,
        /// vCPUs before it.
        from: u32,
        /// How late it started behind its time.
        late: Duration,
        /// How long the resize took, request to answer.
        took: Duration,
        /// The VMM's operation id.
        operation: u64,
    },
    /// A step failed; the driver stopped.
    Failed {
        /// Its number, from 1.
        n: u32,
        /// The step.
        step: Step,
        /// What went wrong.
        why: String,
    },
    /// Every step was made.
    Finished,
}

impl ChurnEvent {
    /// The launcher's line for it.
    pub fn line(&self) -> String {
        match self {
            ChurnEvent::Done {
                n,
                step,
                from,
                late,
                took,
                operation,
            } => {
                let mut line = format!(
                    "churn step {n} at {:.2}s: {from} -> {} vCPUs: ok in {} ms (operation {operation})",
                    step.at.as_secs_f64(),
                    step.vcpus,
                    took.as_millis()
                );
                if *late >= Duration::from_millis(50) {
                    line.push_str(&format!(", started {:.2}s late", late.as_secs_f64()));
                }
                line
            }
            ChurnEvent::Failed { n, step, why } => format!(
                "churn step {n} at {:.2}s: resize to {} vCPUs FAILED: {why}",
                step.at.as_secs_f64(),
                step.vcpus
            ),
            ChurnEvent::Finished => "churn: every step made".to_owned(),
        }
    }
}

/// The running driver; dropping it asks the thread to stop (a resize in
/// flight still ends on its own).
#[derive(Debug)]
pub struct Driver {
    stop: Arc<AtomicBool>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Starts the driver: `churn`'s steps from `boot` vCPUs, timed from
/// `origin`, against the API at `socket`.
pub fn start(
    socket: PathBuf,
    churn: &Churn,
    boot: u32,
    origin: Instant,
    events: Sender<ChurnEvent>,
) -> Driver {
    let stop = Arc::new(AtomicBool::new(false));
    let steps = churn.steps(boot);
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let report = |e: ChurnEvent| events.send(e).is_ok();
        let client = match BlockingClient::from_client(
            Client::new(socket).with_timeout(Duration::from_secs(30)),
        ) {
            Ok(c) => c,
            Err(e) => {
                report(ChurnEvent::Failed {
                    n: 1,
                    step: Step {
                        at: Duration::ZERO,
                        vcpus: boot,
                    },
                    why: crate::chain(&e),
                });
                return;
            }
        };
        let mut current = boot;
        for (i, step) in steps.enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let due = origin + step.at;
            while Instant::now() < due {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                let left = due.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
            if flag.load(Ordering::Acquire) {
                return;
            }
            let late = Instant::now().saturating_duration_since(due);
            let t = Instant::now();
            let event = match resize(&client, step.vcpus) {
                Ok(operation) => ChurnEvent::Done {
                    n,
                    step,
                    from: current,
                    late,
                    took: t.elapsed(),
                    operation,
                },
                Err(why) => ChurnEvent::Failed { n, step, why },
            };
            let failed = matches!(event, ChurnEvent::Failed { .. });
            if !report(event) || failed {
                return;
            }
            current = step.vcpus;
        }
        report(ChurnEvent::Finished);
    });
    Driver { stop }
}

/// One resize that must succeed: its operation id, or why not. A broken
/// HTTP exchange (not an answer) is retried once: resizes are idempotent.
fn resize(client: &BlockingClient, vcpus: u32) -> Result<u64, String> {
    let call = || client.resize(vcpus, Some(RESIZE_WAIT));
    let outcome = match call() {
        Err(ClientError::Http(_) | ClientError::Connect { .. }) => call(),
        other => other,
    }
    .map_err(|e| crate::chain(&e))?;
    let op = match &outcome {
        MutationOutcome::Accepted(op) => {
            return Err(format!("operation {} still running after the wait", op.id))
        }
        MutationOutcome::Unchanged(op) | MutationOutcome::Finished(op) => op,
    };
    if op.status != OperationStatus::Succeeded {
        let why = op.reason.as_ref().map_or_else(
            || format!("operation {} {}", op.id, op.status),
            |r| format!("operation {} {}: {r}", op.id, op.status),
        );
        return Err(why);
    }
    Ok(op.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let step = Step {
            at: Duration::from_millis(1500),
            vcpus: 4,
        };
        let done = ChurnEvent::Done {
            n: 2,
            step,
            from: 1,
            late: Duration::from_millis(300),
            took: Duration::from_millis(412),
            operation: 7,
        };
        assert_eq!(
            done.line(),
            "churn step 2 at 1.50s: 1 -> 4 vCPUs: ok in 412 ms (operation 7), started 0.30s late"
        );
        let failed = ChurnEvent::Failed {
            n: 3,
            step,
            why: "boom".into(),
        };
        assert_eq!(
            failed.line(),
            "churn step 3 at 1.50s: resize to 4 vCPUs FAILED: boom"
        );
    }

    #[test]
    fn a_vmm_that_is_not_there_fails_the_first_step() {
        let (tx, rx) = std::sync::mpsc::channel();
        let churn = Churn::Schedule(vec![Step {
            at: Duration::ZERO,
            vcpus: 2,
        }]);
        let sock = std::env::temp_dir().join(format!("no-vmm-{}.sock", std::process::id()));
        let _driver = start(sock, &churn, 1, Instant::now(), tx);
        let event = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(
            matches!(&event, ChurnEvent::Failed { n: 1, why, .. } if why.contains("connect")),
            "{event:?}"
        );
    }
}
