//! The launcher's workload options (`launch --add ... --run ... --churn
//! ...`, flattened into its command line) and its run mode: the
//! workload's stdout on stdout, its stderr on stderr, the launcher's own
//! lines on stderr as `launch: ...`, the exit status of [`super::status`].

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use api::workload::WorkloadSpec;

use super::args::{self, ArgError, Churn};
use super::{run, status, Config, RunError, Sink};
use crate::VmSpec;

/// Options of the run mode.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkloadArgs {
    /// Put a host file or directory in the guest, at GUEST (default
    /// /bin/NAME for a file, /NAME for a directory; GUEST ending in / puts
    /// it inside; a directory at / merges into the root). Repeatable.
    /// A dynamically linked program brings its shared libraries (ldd).
    #[arg(long = "add", value_name = "HOST[:GUEST]")]
    pub add: Vec<String>,
    /// Run CMD in the guest beside the agent (split into words like a
    /// shell, no expansion) and exit with its status: its stdout on
    /// stdout, its stderr on stderr, the launcher's own lines on stderr.
    #[arg(long, value_name = "CMD")]
    pub run: Option<String>,
    /// Environment variable for the workload (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The workload's working directory (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Resize the VM while the workload runs: `0.5s:4,1s:1,...` (at 0.5 s
    /// after its start resize to 4 vCPUs, at 1 s to 1, ...) or `random`.
    #[arg(long, value_name = "SCHEDULE|random")]
    pub churn: Option<String>,
    /// Seed of `--churn random` (default: drawn, and printed).
    #[arg(long, value_name = "N")]
    pub churn_seed: Option<u64>,
    /// Largest vCPU count `--churn random` draws (default: the max of --cpus).
    #[arg(long, value_name = "M")]
    pub churn_max: Option<u32>,
    /// Time between two `--churn random` steps.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub churn_interval: String,
    /// Number of `--churn random` steps (default: until the workload ends).
    #[arg(long, value_name = "N")]
    pub churn_steps: Option<u32>,
    /// Also show the guest console and the VMM's log (on stderr).
    #[arg(long)]
    pub console: bool,
}

impl WorkloadArgs {
    /// Whether any workload option was given (the run mode).
    pub fn wanted(&self) -> bool {
        self.run.is_some()
            || !self.add.is_empty()
            || !self.env.is_empty()
            || self.cwd.is_some()
            || self.churn.is_some()
    }

    /// The run's configuration, for a VM of `spec`.
    pub fn config(&self, spec: VmSpec, timeout: Option<Duration>) -> Result<Config, ArgError> {
        let Some(run) = &self.run else {
            return Err(ArgError(
                "--add, --env, --cwd and --churn go with --run".into(),
            ));
        };
        let mut workload = WorkloadSpec::new(args::split_command(run)?);
        workload.env = self.env.clone();
        workload.cwd = self.cwd.clone();
        workload
            .validate()
            .map_err(|e| ArgError(format!("--run/--env/--cwd: {e}")))?;
        let adds = self
            .add
            .iter()
            .map(|a| args::parse_add(a, Path::is_dir))
            .collect::<Result<_, _>>()?;
        let max = spec.max_vcpus;
        let churn = match self.churn.as_deref() {
            None => None,
            Some("random") => {
                let churn_max = self.churn_max.unwrap_or(max);
                if churn_max == 0 || churn_max > max {
                    return Err(ArgError(format!(
                        "--churn-max {churn_max}: between 1 and {max} (--cpus max)"
                    )));
                }
                Some(Churn::Random {
                    seed: self.churn_seed.unwrap_or_else(drawn_seed),
                    max: churn_max,
                    interval: args::parse_duration(&self.churn_interval)
                        .map_err(|e| ArgError(format!("--churn-interval: {e}")))?,
                    steps: self.churn_steps,
                })
            }
            Some(schedule) => Some(Churn::Schedule(args::parse_schedule(schedule, max)?)),
        };
        Ok(Config {
            spec,
            adds,
            workload,
            churn,
            timeout,
        })
    }
}

fn drawn_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_secs().rotate_left(32) ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())
}

/// The launcher's terminal: see the module docs.
#[derive(Debug)]
pub struct Terminal {
    /// Show the console lines too.
    pub console: bool,
}

impl Sink for Terminal {
    fn out(&mut self, line: &str) {
        // A closed stdout (`| head`) is not the workload's failure.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn err(&mut self, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn note(&mut self, line: &str) {
        let _ = writeln!(std::io::stderr().lock(), "launch: {line}");
    }

    fn console(&mut self, line: &str) {
        if self.console {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }
}

/// The run mode of the launcher: runs `opts` in a VM of `spec` and
/// returns the exit status ([`super::status`]); says everything on stderr.
pub fn main(
    opts: &WorkloadArgs,
    spec: VmSpec,
    timeout: Option<Duration>,
    interrupted: &dyn Fn() -> bool,
) -> i32 {
    let mut term = Terminal {
        console: opts.console,
    };
    let cfg = match opts.config(spec, timeout) {
        Ok(c) => c,
        Err(e) => {
            term.note(&format!("error: {e}"));
            return status::USAGE;
        }
    };
    if let Some(Churn::Random { seed, max, .. }) = &cfg.churn {
        term.note(&format!(
            "churn: random, seed {seed} (--churn-seed {seed} repeats it), 1 to {max} vCPUs"
        ));
    }
    term.note(
        "preparing the guest image with your files, the static vmm and the emulated host if needed",
    );
    conclude(run(&cfg, &mut term, interrupted), &mut term)
}

/// The end of a run: its last line and the exit status ([`super::status`]).
/// A failure of the emulated KVM host is said in its own one line
/// (`crate::launcher::host_failure_line`) with [`status::HOST_FAILED`].
pub fn conclude(result: Result<super::Outcome, RunError>, sink: &mut dyn Sink) -> i32 {
    match result {
        Ok(outcome)
            if outcome.status == status::HOST_FAILED && outcome.workload_status.is_none() =>
        {
            sink.note(&outcome.summary);
            outcome.status
        }
        Ok(outcome) => {
            sink.note(&format!("{} (exit {})", outcome.summary, outcome.status));
            outcome.status
        }
        Err(RunError::Input(e)) => {
            sink.note(&format!("error: {e}"));
            status::USAGE
        }
        Err(RunError::Harness(crate::Error::HostFailed(why))) => {
            sink.note(&crate::launcher::host_failure_line(&why));
            status::HOST_FAILED
        }
        Err(RunError::Harness(e)) => {
            sink.note(&format!("error: {}", crate::chain(&e)));
            status::VM_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(run: Option<&str>) -> WorkloadArgs {
        WorkloadArgs {
            run: run.map(str::to_owned),
            churn_interval: "1s".into(),
            ..WorkloadArgs::default()
        }
    }

    #[test]
    fn configs() {
        let spec = VmSpec::new(1, 4);
        assert!(!opts(None).wanted());
        let mut o = opts(None);
        o.churn = Some("1s:2".into());
        assert!(o.wanted());
        assert!(o
            .config(spec.clone(), None)
            .unwrap_err()
            .0
            .contains("with --run"));

        let mut o = opts(Some("/bin/t --n 'a b'"));
        o.add = vec!["./t".into()];
        o.env = vec!["A=1".into()];
        o.churn = Some("random".into());
        o.churn_seed = Some(5);
        o.churn_steps = Some(3);
        let cfg = o.config(spec.clone(), None).unwrap();
        assert_eq!(cfg.workload.argv, ["/bin/t", "--n", "a b"]);
        assert_eq!(cfg.workload.env, ["A=1"]);
        assert_eq!(cfg.adds[0].guest, "/bin/t");
        assert_eq!(
            cfg.churn,
            Some(Churn::Random {
                seed: 5,
                max: 4,
                interval: Duration::from_secs(1),
                steps: Some(3)
            })
        );
        o.churn_max = Some(5);
        assert!(o
            .config(spec.clone(), None)
            .unwrap_err()
            .0
            .contains("--churn-max"));
        o.churn_max = None;
        o.churn = Some("0.5s:5".into());
        assert!(o.config(spec.clone(), None).is_err());
        o.churn = Some("0.5s:4,1s:1".into());
        assert!(matches!(
            o.config(spec.clone(), None).unwrap().churn,
            Some(Churn::Schedule(s)) if s.len() == 2
        ));
        o.env = vec!["NOEQUALS".into()];
        assert!(o.config(spec, None).unwrap_err().0.contains("NAME=value"));
    }
}
