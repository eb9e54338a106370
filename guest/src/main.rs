//! `guest-agent`: the guest's `/init`. See the `guest` library for what it
//! does; this file only picks the mode.

use guest::agent::{self, Agent, Exit};
use guest::cmdline::Options;
use guest::console::say;
use guest::init;
use guest::sysfs::Sysfs;
use guest::uevent::UeventSocket;

const USAGE: &str = "usage: guest-agent [--selftest] [--cmdline 'agent.OPTION ...']

As PID 1 (the guest's /init) arguments are ignored and options come from
/proc/cmdline. Run by hand it mounts nothing and exits instead of powering
off; CPUs are only onlined if agent.autoonline=1 is given.
  --selftest        print what the agent sees on this machine and exit
  --cmdline STRING  take agent.* options from STRING, not /proc/cmdline";

/// Reads the host's CPU state read-only and prints it.
fn selftest(cmdline: Option<&str>) -> Result<(), String> {
    let text = match cmdline {
        Some(c) => c.to_owned(),
        None => {
            std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?
        }
    };
    let mut opts = Options::parse(&text);
    // Read-only: never online the host's CPUs.
    opts.autoonline = false;
    say(&format!(
        "selftest pid={} pid1={}",
        std::process::id(),
        init::is_pid1()
    ));
    say(&format!("options {opts}"));
    let mut agent = Agent::new(Sysfs::new(), opts);
    for line in agent.start().map_err(|e| error_chain(&e))? {
        say(&line);
    }
    match UeventSocket::open() {
        Ok(_) => say("uevent socket ok"),
        Err(e) => return Err(format!("uevent socket: {e}")),
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn main() {
    let mut cmdline = None;
    let mut selftest_mode = false;
    if !init::is_pid1() {
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--selftest" => selftest_mode = true,
                "--cmdline" => match args.next() {
                    Some(c) => cmdline = Some(c),
                    None => {
                        eprintln!("--cmdline needs a value\n{USAGE}");
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
    match agent::run(cmdline.as_deref()) {
        Ok(Exit::PowerOff(reason)) => init::power_off(&reason, true),
        Err(e) => {
            say(&format!("GUEST-FATAL {}", error_chain(&e)));
            init::power_off("reason=fatal", false)
        }
    }
}
