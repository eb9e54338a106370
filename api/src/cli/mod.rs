//! `vmmctl`: the command line over [`crate::client::BlockingClient`].
//!
//! Lives in the library so tests can run it in-process against a server
//! and read what it prints; `src/bin/vmmctl.rs` only calls [`run`].
//!
//! Exit status: 0 success; 1 the server refused the request or the
//! operation failed; 2 bad usage; 3 `--wait` ran out with the operation
//! still running; 4 the server could not be reached or answered nonsense.
//!
//! The socket: `--socket`, else `$VMM_SOCKET`, else the default path
//! ([`crate::socket::default_path`]). Text from the server, which may come
//! from the guest, is printed with its control characters escaped, in the
//! human output and in `--json` alike (`escape`).

pub mod escape;
mod render;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::client::{BlockingClient, Client, ClientError, MutationOutcome};
use crate::{FaultKind, OperationStatus};

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: the server refused the request or the operation failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit status: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: `--wait` ran out, operation still running.
pub const EXIT_TIMEOUT: i32 = 3;
/// Exit status: no usable answer from the server.
pub const EXIT_UNREACHABLE: i32 = 4;

/// Control a running VMM through its API socket.
#[derive(Debug, Parser)]
#[command(name = "vmmctl", version)]
pub struct Cli {
    /// The VMM's API socket (its --api-socket) [default: $VMM_SOCKET, else
    /// $XDG_RUNTIME_DIR/vmm.sock, else /run/vmm/vmm.sock as root or
    /// $TMPDIR/vmm-UID/vmm.sock]
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// For resize, add and remove: wait up to SECONDS for the guest to
    /// confirm.
    #[arg(long, short = 'w', global = true, value_name = "SECONDS",
          value_parser = parse_seconds)]
    pub wait: Option<Duration>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// The VM: state, vCPU counts, memory, guest agent.
    Status,
    /// Every possible vCPU and its state.
    Vcpus,
    /// Make N vCPUs present (adds the lowest absent ids, removes the highest).
    Resize {
        /// How many vCPUs should be present.
        count: u32,
    },
    /// Hot-add one vCPU.
    Add {
        /// The vCPU id.
        id: u32,
    },
    /// Hot-remove one vCPU.
    Remove {
        /// The vCPU id.
        id: u32,
    },
    /// Show an operation started by resize, add or remove.
    Operation {
        /// The operation id.
        id: u64,
    },
    /// The VMM's counters in Prometheus text format.
    Metrics,
    /// The guest's worker threads (per CPU) and work done, as its agent
    /// last reported them.
    Workers,
    /// Test hook (VMM started with --test-hooks): make the guest agent or
    /// the VMM misbehave. KIND: agent_refuse_offline CPU,
    /// agent_force_offline CPU, agent_silence, ignore_removal CPU.
    Fault {
        /// What to break.
        kind: FaultKind,
        /// The vCPU it applies to (all but agent_silence need one).
        cpu: Option<u32>,
    },
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(0.0..=crate::routes::MAX_WAIT_SECONDS).contains(&seconds) {
        return Err(format!(
            "must be between 0 and {} seconds",
            crate::routes::MAX_WAIT_SECONDS
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parse `args` (program name first), run the command, print to `out` and
/// `err`, and return the exit status.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            if e.use_stderr() {
                let _ = err.write_all(text.as_bytes());
                return EXIT_USAGE;
            }
            let _ = out.write_all(text.as_bytes());
            return EXIT_OK;
        }
    };
    if let Some(problem) = usage_problem(&cli.command) {
        let _ = writeln!(err, "vmmctl: {problem}");
        return EXIT_USAGE;
    }
    let socket = cli.socket.clone().unwrap_or_else(crate::socket::from_env);
    let client = match BlockingClient::from_client(Client::new(socket)) {
        Ok(client) => client,
        Err(e) => return report(&e, cli.json, out, err),
    };
    match execute(&cli, &client, out) {
        Ok(code) => code,
        Err(e) => report(&e, cli.json, out, err),
    }
}

/// What clap cannot check: a fault that applies to one CPU needs it.
fn usage_problem(command: &Command) -> Option<String> {
    match command {
        Command::Fault { kind, cpu: None } if kind.needs_cpu() => Some(format!(
            "{kind} applies to one vCPU: vmmctl fault {kind} CPU"
        )),
        _ => None,
    }
}

fn execute(cli: &Cli, client: &BlockingClient, out: &mut dyn Write) -> Result<i32, ClientError> {
    let text = match &cli.command {
        Command::Status => {
            let vm = client.vm()?;
            output(cli.json, &vm, || render::vm(&vm))
        }
        Command::Vcpus => {
            let list = client.vcpus()?;
            output(cli.json, &list, || render::vcpus(&list))
        }
        Command::Resize { count } => return mutation(cli, client.resize(*count, cli.wait), out),
        Command::Add { id } => return mutation(cli, client.add_vcpu(*id, cli.wait), out),
        Command::Remove { id } => return mutation(cli, client.remove_vcpu(*id, cli.wait), out),
        Command::Operation { id } => {
            let op = client.operation(*id)?;
            let text = output(cli.json, &op, || render::operation(&op));
            let _ = out.write_all(text.as_bytes());
            return Ok(status_exit(op.status));
        }
        Command::Metrics => render::metrics(&client.metrics()?),
        Command::Workers => {
            let workers = client.guest_workers()?;
            output(cli.json, &workers, || render::workers(&workers))
        }
        Command::Fault { kind, cpu } => {
            let injected = client.inject_fault(*kind, *cpu)?;
            output(cli.json, &injected, || render::fault(&injected))
        }
    };
    let _ = out.write_all(text.as_bytes());
    Ok(EXIT_OK)
}

fn mutation(
    cli: &Cli,
    outcome: Result<MutationOutcome, ClientError>,
    out: &mut dyn Write,
) -> Result<i32, ClientError> {
    let outcome = outcome?;
    let op = outcome.operation();
    let text = output(cli.json, op, || render::outcome(&outcome));
    let _ = out.write_all(text.as_bytes());
    Ok(status_exit(op.status))
}

fn status_exit(status: OperationStatus) -> i32 {
    match status {
        OperationStatus::Failed => EXIT_FAILED,
        OperationStatus::Running | OperationStatus::Succeeded => EXIT_OK,
    }
}

fn output<T: Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) -> String {
    if json {
        let mut text = escape::json(serde_json::to_string_pretty(value).unwrap_or_default());
        text.push('\n');
        text
    } else {
        human()
    }
}

/// Print an error: JSON on `out` if asked (the server's body), a sentence
/// on `err` always. Returns the exit status.
fn report(error: &ClientError, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let (code, json_value) = match error {
        ClientError::Api { error: api, .. } => (
            EXIT_FAILED,
            Some(serde_json::to_value(crate::ErrorBody::from(api.clone()))),
        ),
        ClientError::WaitTimedOut(op) => (EXIT_TIMEOUT, Some(serde_json::to_value(op))),
        _ => (EXIT_UNREACHABLE, None),
    };
    if json {
        if let Some(Ok(value)) = json_value {
            let text = escape::json(serde_json::to_string_pretty(&value).unwrap_or_default());
            let _ = writeln!(out, "{text}");
        }
    }
    let _ = writeln!(err, "vmmctl: {}", render::error(error));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(args.iter().copied(), &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn usage_errors_exit_2() {
        let (code, _, err) = run_args(&["vmmctl", "-s", "x", "resize", "many"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("many"), "{err}");
        let (code, _, err) = run_args(&["vmmctl", "-s", "x", "--wait", "-1", "add", "1"]);
        assert_eq!(code, EXIT_USAGE, "{err}");
    }

    #[test]
    fn help_goes_to_stdout() {
        let (code, out, _) = run_args(&["vmmctl", "--help"]);
        assert_eq!(code, EXIT_OK);
        assert!(out.contains("resize"), "{out}");
    }

    #[test]
    fn unreachable_server_exit_4() {
        let (code, out, err) = run_args(&["vmmctl", "-s", "/nonexistent/sock", "--json", "vcpus"]);
        assert_eq!(code, EXIT_UNREACHABLE);
        assert!(out.is_empty());
        assert!(err.contains("cannot connect to /nonexistent/sock"), "{err}");
    }

    #[test]
    fn fault_arguments() {
        let cli =
            Cli::try_parse_from(["vmmctl", "-s", "x", "fault", "ignore_removal", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Fault {
                kind: FaultKind::IgnoreRemoval,
                cpu: Some(3)
            }
        ));
        let (code, _, err) = run_args(&["vmmctl", "-s", "x", "fault", "ignore_removal"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("applies to one vCPU"), "{err}");
        let (code, _, err) = run_args(&["vmmctl", "-s", "x", "fault", "reboot"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("unknown fault `reboot`"), "{err}");
        // agent_silence needs no CPU: it gets as far as connecting.
        let (code, _, _) = run_args(&["vmmctl", "-s", "/nonexistent/s", "fault", "agent_silence"]);
        assert_eq!(code, EXIT_UNREACHABLE);
    }

    #[test]
    fn wait_parses_fractions() {
        let cli =
            Cli::try_parse_from(["vmmctl", "-s", "x", "resize", "3", "--wait", "1.5"]).unwrap();
        assert_eq!(cli.wait, Some(Duration::from_millis(1500)));
        assert!(matches!(cli.command, Command::Resize { count: 3 }));
    }
}
