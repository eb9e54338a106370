//! Agent options from the kernel command line (`/proc/cmdline`).
//!
//! Options are named `agent.*`: the kernel treats dotted parameters as
//! module parameters and neither passes them to init as arguments nor as
//! environment, so the agent reads them from `/proc/cmdline` itself.
//!
//! | option                 | effect                                              |
//! |------------------------|-----------------------------------------------------|
//! | `agent.poweroff=ready` | power off right after the ready line (boot tests)   |
//! | `agent.quiet`          | print only the ready line, errors and the power-off |
//! | `agent.autoonline=0`   | do not online hot-added (or present, offline) CPUs  |
//! | `agent.trace`          | timestamped `GUEST-TRACE` lines per CPU event (debug) |
//! | `agent.load=N`         | work items per second the load generator spreads (default 20, 0: none) |
//! | `agent.readonly`       | never write a CPU's `online` file (default when run by hand) |
//! | `agent.hook=CMD`       | run `/bin/sh -c CMD` on every CPU event (`crate::hooks`); quote it for spaces: `agent.hook="logger cpu"` |

use std::fmt;

/// Default `agent.load`: work items per second over all online CPUs.
pub const DEFAULT_LOAD: u64 = 20;
/// Largest accepted `agent.load`.
pub const MAX_LOAD: u64 = 100_000;

/// When the agent powers the guest off by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOffWhen {
    /// Right after printing the ready line.
    Ready,
}

/// The agent's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `agent.poweroff=`.
    pub poweroff: Option<PowerOffWhen>,
    /// `agent.quiet`.
    pub quiet: bool,
    /// `agent.autoonline=` (default on).
    pub autoonline: bool,
    /// `agent.trace`: print a line per CPU event with the guest's uptime.
    pub trace: bool,
    /// `agent.load=`: work items per second for the per-CPU workers.
    pub load: u64,
    /// `agent.readonly`: refuse every write to sysfs.
    pub readonly: bool,
    /// `agent.mailbox=` (default on): talk to the VMM through its shared
    /// memory mailbox when it serves one (`agent_proto::mailbox`); off: UART bytes only.
    pub mailbox: bool,
    /// `agent.hook=`: the command run on every CPU event
    /// ([`crate::hooks`]); `--hook` overrides it.
    pub hook: Option<String>,
    /// `agent.*` parameters that were not understood, verbatim.
    pub unknown: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            poweroff: None,
            quiet: false,
            autoonline: true,
            trace: false,
            load: DEFAULT_LOAD,
            readonly: false,
            mailbox: true,
            hook: None,
            unknown: Vec::new(),
        }
    }
}

/// Splits a command line into parameters like the kernel does: on
/// whitespace, except inside double quotes (which are removed).
pub fn split(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    params
}

fn parse_bool(value: Option<&str>) -> Option<bool> {
    match value {
        None | Some("1" | "y" | "yes" | "on" | "true") => Some(true),
        Some("0" | "n" | "no" | "off" | "false") => Some(false),
        Some(_) => None,
    }
}

impl Options {
    /// Parses the agent's options out of a full kernel command line.
    /// Parameters after `--` belong to init's argv and are ignored here.
    pub fn parse(cmdline: &str) -> Self {
        let mut opts = Self::default();
        for param in split(cmdline) {
            if param == "--" {
                break;
            }
            let Some(option) = param.strip_prefix("agent.") else {
                continue;
            };
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (option, None),
            };
            let understood = match key {
                "poweroff" => match value {
                    Some("ready") => {
                        opts.poweroff = Some(PowerOffWhen::Ready);
                        true
                    }
                    Some("never") => {
                        opts.poweroff = None;
                        true
                    }
                    _ => false,
                },
                "quiet" => parse_bool(value).map(|b| opts.quiet = b).is_some(),
                "autoonline" => parse_bool(value).map(|b| opts.autoonline = b).is_some(),
                "trace" => parse_bool(value).map(|b| opts.trace = b).is_some(),
                "readonly" => parse_bool(value).map(|b| opts.readonly = b).is_some(),
                "mailbox" => parse_bool(value).map(|b| opts.mailbox = b).is_some(),
                "hook" => match value {
                    Some("") => {
                        opts.hook = None;
                        true
                    }
                    Some(cmd) if !cmd.contains('\0') => {
                        opts.hook = Some(cmd.to_owned());
                        true
                    }
                    _ => false,
                },
                "load" => value
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&n| n <= MAX_LOAD)
                    .map(|n| opts.load = n)
                    .is_some(),
                _ => false,
            };
            if !understood {
                opts.unknown.push(param.clone());
            }
        }
        opts
    }

    /// Reads and parses `/proc/cmdline`.
    pub fn from_proc() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/cmdline")?))
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let poweroff = match self.poweroff {
            Some(PowerOffWhen::Ready) => "ready",
            None => "never",
        };
        write!(
            f,
            "poweroff={poweroff} quiet={} autoonline={} load={} readonly={}",
            u8::from(self.quiet),
            u8::from(self.autoonline),
            self.load,
            u8::from(self.readonly)
        )?;
        if let Some(hook) = &self.hook {
            write!(f, " hook={hook:?}")?;
        }
        if !self.unknown.is_empty() {
            write!(f, " unknown={}", self.unknown.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(split("  a b=\"c d\"  e\n"), ["a", "b=c d", "e"]);
        assert_eq!(split("x=\"\""), ["x="]);
        assert!(split("   ").is_empty());
        assert_eq!(split("\"unterminated quote"), ["unterminated quote"]);
    }

    #[test]
    fn defaults_without_agent_options() {
        let o = Options::parse("BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet console=ttyS0");
        assert_eq!(o, Options::default());
        assert!(o.autoonline);
        assert_eq!(
            o.to_string(),
            "poweroff=never quiet=0 autoonline=1 load=20 readonly=0"
        );
    }

    #[test]
    fn parses_agent_options() {
        let o = Options::parse(
            "console=ttyS0 quiet agent.poweroff=ready agent.quiet agent.autoonline=0 agent.bogus=1 agent.quiet=maybe agent.trace",
        );
        assert_eq!(o.poweroff, Some(PowerOffWhen::Ready));
        assert!(o.quiet);
        assert!(!o.autoonline);
        assert!(o.trace);
        assert_eq!(o.unknown, ["agent.bogus=1", "agent.quiet=maybe"]);
        assert!(o
            .to_string()
            .ends_with("unknown=agent.bogus=1,agent.quiet=maybe"));
    }

    #[test]
    fn parses_load_and_readonly() {
        let o = Options::parse("agent.load=0 agent.readonly");
        assert_eq!((o.load, o.readonly), (0, true));
        let o = Options::parse("agent.readonly=1 agent.readonly=0 agent.load=500");
        assert_eq!((o.load, o.readonly), (500, false));
        let o = Options::parse("agent.load=-1 agent.load=x agent.load agent.load=100001");
        assert_eq!(o.load, DEFAULT_LOAD);
        assert_eq!(o.unknown.len(), 4);
    }

    #[test]
    fn parses_the_hook() {
        let o = Options::parse("agent.hook=\"logger -t cpu\" quiet");
        assert_eq!(o.hook.as_deref(), Some("logger -t cpu"));
        assert!(o.unknown.is_empty());
        assert!(o.to_string().ends_with(" hook=\"logger -t cpu\""), "{o}");
        // A later empty value turns it off; a bare `agent.hook` is not understood.
        let o = Options::parse("agent.hook=/bin/h agent.hook= agent.hook");
        assert_eq!(o.hook, None);
        assert_eq!(o.unknown, ["agent.hook"]);
    }

    #[test]
    fn stops_at_init_arguments() {
        let o = Options::parse("agent.quiet -- agent.poweroff=ready");
        assert!(o.quiet);
        assert_eq!(o.poweroff, None);
    }
}
