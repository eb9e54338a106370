//! `cpu-follower`: see the library's docs. Run in the guest as a workload:
//!
//! ```text
//! launch --add target/static/x86_64-unknown-linux-gnu/release/cpu-follower \
//!     --run "cpu-follower --changes 10 --timeout 300" --churn random --churn-seed 1
//! ```

use std::sync::Arc;

use cpu_follower::{status, Follower, Options, Outcome, USAGE};
use guest::sysfs::Sysfs;
use guest::topology::{GuestPlacement, SysfsTopology};
use guest::uevent::UeventSocket;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let opts = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cpu-follower: {e}\n{USAGE}");
            std::process::exit(status::USAGE);
        }
    };
    // Listen first, then read the state: no change falls in between.
    let topology = UeventSocket::open()
        .map_err(|e| format!("uevent socket: {e}"))
        .and_then(|socket| {
            // Read-only: the guest agent brings CPUs up and down, not us.
            SysfsTopology::new(Sysfs::new(), Box::new(socket), true)
                .map_err(|e| format!("CPU topology: {}", guest::error_chain(&e)))
        });
    let outcome = match topology {
        Ok(topo) => match Follower::new(&topo, Arc::new(GuestPlacement)) {
            Ok(follower) => follower.run(&opts, &mut |line| println!("{line}")),
            Err(e) => Outcome::Failed(e),
        },
        Err(e) => Outcome::Failed(e),
    };
    match &outcome {
        Outcome::Done { changes, checks } => {
            println!("cpu-follower: done changes={changes} checks={checks}");
        }
        Outcome::Broken(why) => {
            println!("cpu-follower: BROKEN {why}");
            eprintln!("cpu-follower: broken invariant: {why}");
        }
        Outcome::TimedOut { changes } => {
            eprintln!("cpu-follower: timed out after {changes} changes");
        }
        Outcome::Failed(e) => eprintln!("cpu-follower: {e}"),
    }
    std::process::exit(outcome.exit_code(&opts));
}
