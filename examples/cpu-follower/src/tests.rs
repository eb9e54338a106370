//! The follower against smpboot's simulated topology: CPUs come and go
//! behind its back, as the guest agent makes them do in a guest.

use std::sync::Arc;
use std::time::Duration;

use smpboot::{Placement, PlacementError, SimPlacement, SimTopology};

use super::*;

fn run_with(
    topo: &SimTopology,
    placement: Arc<dyn Placement>,
    opts: &Options,
    drive: impl FnOnce() + Send,
) -> (Outcome, Vec<String>) {
    let follower = Follower::new(topo, placement).unwrap();
    let mut lines = Vec::new();
    let outcome = std::thread::scope(|s| {
        s.spawn(drive);
        follower.run(opts, &mut |l| lines.push(l.to_owned()))
    });
    (outcome, lines)
}

#[test]
fn follows_cpus_that_come_and_go() {
    let topo = SimTopology::new(4, [0]);
    let opts = Options {
        changes: Some(4),
        timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    };
    let driver = topo.clone();
    let (outcome, lines) = run_with(&topo, Arc::new(topo.placement()), &opts, move || {
        std::thread::sleep(Duration::from_millis(300));
        driver.force_online(1).unwrap();
        driver.force_online(3).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        driver.force_offline(1).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        driver.force_online(2).unwrap();
    });
    assert!(
        matches!(outcome, Outcome::Done { changes: 4, .. }),
        "{outcome:?}\n{lines:#?}"
    );
    assert_eq!(lines[0], "cpu-follower: start online=0 workers=1");
    let changes: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains(" change="))
        .map(String::as_str)
        .collect();
    assert_eq!(
        changes,
        [
            "cpu-follower: change=1 cpu=1 online count=2 online=0-1",
            "cpu-follower: change=2 cpu=3 online count=3 online=0-1,3",
            "cpu-follower: change=3 cpu=1 offline count=2 online=0,3",
            "cpu-follower: change=4 cpu=2 online count=3 online=0,2-3",
        ]
    );
    let last = lines.last().unwrap();
    assert!(
        last.contains("ok count=3 online=0,2-3 ran_on=0,2-3"),
        "{lines:#?}"
    );
    assert_eq!(outcome.exit_code(&opts), 0);
}

/// Runs the worker of CPU 1 "on CPU 0": the follower must notice.
#[derive(Debug)]
struct Misplaced(SimPlacement);

impl Placement for Misplaced {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        self.0.bind(cpu)
    }

    fn current_cpu(&self, cpu: u32) -> u32 {
        if cpu == 1 {
            0
        } else {
            self.0.current_cpu(cpu)
        }
    }
}

#[test]
fn a_worker_on_the_wrong_cpu_is_a_broken_invariant() {
    let topo = SimTopology::new(2, [0]);
    let opts = Options {
        changes: Some(5),
        settle: Duration::from_millis(500),
        exit_code: 7,
        ..Options::default()
    };
    let driver = topo.clone();
    let (outcome, lines) = run_with(
        &topo,
        Arc::new(Misplaced(topo.placement())),
        &opts,
        move || {
            std::thread::sleep(Duration::from_millis(200));
            driver.force_online(1).unwrap();
        },
    );
    let Outcome::Broken(why) = &outcome else {
        panic!("{outcome:?}\n{lines:#?}")
    };
    assert_eq!(why, "the worker of cpu 1 ran on cpu 0");
    assert_eq!(outcome.exit_code(&opts), status::BROKEN);
}

#[test]
fn a_duration_ends_the_run_and_a_timeout_fails_it() {
    let topo = SimTopology::new(2, [0, 1]);
    let placement: Arc<dyn Placement> = Arc::new(topo.placement());
    let follower = Follower::new(&topo, placement).unwrap();
    let mut lines = Vec::new();
    let opts = Options {
        duration: Some(Duration::from_millis(200)),
        exit_code: 3,
        lines: 2,
        ..Options::default()
    };
    let outcome = follower.run(&opts, &mut |l| lines.push(l.to_owned()));
    assert_eq!(
        outcome,
        Outcome::Done {
            changes: 0,
            checks: 1
        }
    );
    assert_eq!(
        lines[..2],
        ["cpu-follower: line 1 of 2", "cpu-follower: line 2 of 2"]
    );
    assert_eq!(outcome.exit_code(&opts), 3);
    let opts = Options {
        changes: Some(1),
        timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    };
    let outcome = follower.run(&opts, &mut |_| {});
    assert_eq!(outcome, Outcome::TimedOut { changes: 0 });
    assert_eq!(outcome.exit_code(&opts), status::TIMEOUT);
}

#[test]
fn options() {
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let o = Options::parse(args(
        "--changes 12 --duration 1.5 --timeout 60 --settle 2 --exit-code 3 --lines 7",
    ))
    .unwrap();
    assert_eq!(o.lines, 7);
    assert_eq!(o.changes, Some(12));
    assert_eq!(o.duration, Some(Duration::from_millis(1500)));
    assert_eq!(o.timeout, Some(Duration::from_secs(60)));
    assert_eq!(o.settle, Duration::from_secs(2));
    assert_eq!(o.exit_code, 3);
    assert_eq!(Options::parse(Vec::new()).unwrap(), Options::default());
    for bad in [
        "--changes",
        "--changes x",
        "--duration -1",
        "--exit-code 256",
        "--bogus",
    ] {
        assert!(Options::parse(args(bad)).is_err(), "{bad}");
    }
    assert_eq!(cpu_list([0, 1, 2, 5]), "0-2,5");
}
