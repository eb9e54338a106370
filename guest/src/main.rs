//! `guest-agent`: the guest's `/init`. See the `guest` library for what it
//! does; this file only picks the mode.

use std::path::PathBuf;
use std::sync::Arc;

use agent_proto::agent::encode;
use guest::agent::{Agent, AgentConfig, Exit};
use guest::cmdline::Options;
use guest::console::say;
use guest::event_loop::{Mode, RunConfig};
use guest::sysfs::Sysfs;
use guest::topology::{GuestPlacement, SysfsTopology};
use guest::uevent::UeventSocket;
use guest::{error_chain, event_loop, init, kmsg, last_words};

const USAGE: &str = "usage: guest-agent [--service] [--selftest] [--cmdline 'agent.OPTION ...']
                   [--channel TTY] [--hook CMD]

As PID 1 (the guest's /init) arguments are ignored, options come from
/proc/cmdline and the VMM channel is /dev/ttyS1. Run by hand it mounts
nothing, opens no channel unless given one, writes nothing to sysfs
(agent.readonly=1 agent.autoonline=0 unless overridden) and exits instead
of powering off.
  --service         run as a service of a guest with its own init: mount
                    nothing, talk to the VMM on /dev/ttyS1, online
                    hot-added CPUs, no synthetic load (agent.load=0 unless
                    overridden); exit with status 0 on SIGTERM or SIGINT
  --selftest        print what the agent sees on this machine and exit
  --cmdline STRING  take agent.* options from STRING, not /proc/cmdline
  --channel TTY     talk the agent protocol on TTY (raw mode is set)
  --hook CMD        run /bin/sh -c CMD on every CPU add, online, offline and
                    remove, with VMM_CPU_EVENT, VMM_CPU and VMM_VCPU_ID set
                    (overrides agent.hook=)";

/// Starts the agent read-only on this machine, prints what it would say
/// and exits.
fn selftest(cmdline: Option<&str>) -> Result<(), String> {
    let text = match cmdline {
        Some(c) => c.to_owned(),
        None => {
            std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?
        }
    };
    let mut opts = Options::parse(&text);
    // Read-only: never touch the host's CPUs.
    opts.autoonline = false;
    opts.readonly = true;
    opts.load = 0;
    say(&format!(
        "selftest pid={} pid1={}",
        std::process::id(),
        init::is_pid1()
    ));
    say(&format!("options {opts}"));
    say(&kmsg::smpboot_line().unwrap_or_else(|| "no smpboot line in the kernel log".into()));
    let socket = UeventSocket::open().map_err(|e| format!("uevent socket: {e}"))?;
    let topo =
        SysfsTopology::new(Sysfs::new(), Box::new(socket), true).map_err(|e| error_chain(&e))?;
    let cfg = AgentConfig {
        placement: Arc::new(GuestPlacement),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        channel: false,
        mailbox: false,
        preface: Vec::new(),
    };
    let mut agent = Agent::start(Arc::new(topo), opts, cfg).map_err(|e| error_chain(&e))?;
    agent.tick(std::time::Instant::now());
    let out = agent.take_output();
    for line in &out.console {
        say(line);
    }
    for msg in &out.host {
        print!("host: {}", encode(msg));
    }
    Ok(())
}

fn main() {
    let mut cmdline = None;
    let mut channel = None;
    let mut hook = None;
    let mut selftest_mode = false;
    let mut service = false;
    if !init::is_pid1() {
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--selftest" => selftest_mode = true,
                "--service" => service = true,
                "--cmdline" | "--channel" | "--hook" => match args.next() {
                    Some(v) if arg == "--cmdline" => cmdline = Some(v),
                    Some(v) if arg == "--hook" => hook = Some(v),
                    Some(v) => channel = Some(PathBuf::from(v)),
                    None => {
                        eprintln!("{arg} needs a value\n{USAGE}");
                        std::process::exit(2);
                    }
                },
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return;
                }
                other => {
                    eprintln!("unknown argument {other:?}\n{USAGE}");
                    std::process::exit(2);
                }
            }
        }
    }
    if selftest_mode {
        if let Err(e) = selftest(cmdline.as_deref()) {
            say(&format!("GUEST-FATAL {e}"));
            std::process::exit(1);
        }
        return;
    }
    let mode = Mode::detect(service);
    let cfg = RunConfig {
        mode,
        cmdline: cmdline.as_deref(),
        channel: channel.as_deref(),
        hook: hook.as_deref(),
    };
    match event_loop::run(cfg) {
        // A service leaves the machine to its init: it only ends itself.
        Ok(Exit::PowerOff(reason)) if mode == Mode::Service => {
            say(&format!("GUEST-AGENT-EXIT {reason}"));
            std::process::exit(0)
        }
        Ok(Exit::PowerOff(reason)) => init::power_off(&reason, true),
        Err(e) => {
            let reason = error_chain(&e);
            say(&format!("GUEST-FATAL {reason}"));
            if mode == Mode::Service {
                // Its manager restarts it (Restart=on-failure); the VMM
                // sees it fall silent, not fail (no `fatal`: the VMM
                // would end).
                std::process::exit(1);
            }
            last_words::send(&reason);
            init::power_off("reason=fatal", false)
        }
    }
}
