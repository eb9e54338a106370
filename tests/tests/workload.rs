//! Users' own workloads end to end: the example workload
//! (`examples/cpu-follower`, built static) in the real guest, beside the
//! agent, under a seeded random vCPU churn, through the launcher's run mode
//! (`e2e::workload::run`, what `launch --run` calls); and the exit status
//! of a workload through the `launch` binary itself.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use api::workload::WorkloadSpec;
use e2e::workload::args::{Add, Churn};
use e2e::workload::{self, Config, Outcome, RunError, Sink};
use e2e::VmSpec;

/// Everything a run said, in order.
#[derive(Debug, Default)]
struct Capture {
    out: Vec<String>,
    err: Vec<String>,
    notes: Vec<String>,
}

impl Sink for Capture {
    fn out(&mut self, line: &str) {
        self.out.push(line.to_owned());
    }
    fn err(&mut self, line: &str) {
        self.err.push(line.to_owned());
    }
    fn note(&mut self, line: &str) {
        println!("launch: {line}");
        self.notes.push(line.to_owned());
    }
    fn console(&mut self, _: &str) {}
}

/// The example workload, static; `None` (a skip line) if no host can run
/// a VM here.
fn follower() -> Option<PathBuf> {
    if let Err(e) = e2e::host::select() {
        e2e::skip(&e2e::chain(&e));
        return None;
    }
    Some(resources::build_static("cpu-follower", "cpu-follower").expect("build cpu-follower"))
}

/// Runs `cfg`, once more if the emulated host or its nested guest failed
/// the way nested virtualization does (announced); `None` on a skip.
fn run_once_or_twice(cfg: &Config) -> Option<(Outcome, Capture)> {
    let mut retried = false;
    loop {
        let mut capture = Capture::default();
        match workload::run(cfg, &mut capture, &|| false) {
            Ok(outcome) if outcome.status != 0 && !retried => {
                if let Some(why) = outcome
                    .host_failure
                    .as_ref()
                    .or(outcome.nested_failure.as_ref())
                {
                    println!("E2E-RETRY: {why}; running the workload once more");
                    retried = true;
                    continue;
                }
                return Some((outcome, capture));
            }
            Ok(outcome) => return Some((outcome, capture)),
            Err(RunError::Harness(e)) if e.is_host_failure() && !retried => {
                println!("E2E-RETRY: {e}; running the workload once more");
                retried = true;
            }
            Err(RunError::Harness(e)) => match e.skip_reason() {
                Some(why) => {
                    e2e::skip(&why);
                    return None;
                }
                None => panic!("the run failed: {}", e2e::chain(&e)),
            },
            Err(RunError::Input(e)) => panic!("the run was refused: {e}"),
        }
    }
}

/// The follower's change lines as (online count), in order.
fn change_counts(out: &[String]) -> Vec<u32> {
    out.iter()
        .filter(|l| l.contains(" change="))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("count="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count in {l:?}"))
        })
        .collect()
}

#[test]
fn cpu_follower_follows_a_seeded_random_churn() {
    let Some(follower) = follower() else { return };
    let start = Instant::now();
    let (boot, max, steps) = (1, 4, 6);
    // Seed 26 draws 3, 1, 4, 1, 4, 2: the largest swings of the first 40.
    let churn = Churn::Random {
        seed: 26,
        max,
        interval: Duration::from_secs(2),
        steps: Some(steps),
    };
    let targets: Vec<u32> = churn.steps(boot).map(|s| s.vcpus).collect();
    let mut changes = 0;
    let mut current = boot;
    for &t in &targets {
        changes += current.abs_diff(t);
        current = t;
    }
    println!("churn targets {targets:?}: {changes} CPU changes");
    let argv = format!("cpu-follower --changes {changes} --timeout 240");
    let cfg = Config {
        spec: VmSpec::new(boot, max).timeout(Duration::from_secs(400)),
        adds: vec![Add {
            host: follower,
            guest: "/bin/cpu-follower".into(),
        }],
        workload: WorkloadSpec::new(argv.split(' ').map(str::to_owned).collect()),
        churn: Some(churn),
        timeout: Some(Duration::from_secs(360)),
    };
    let Some((outcome, capture)) = run_once_or_twice(&cfg) else {
        return;
    };
    let show = || {
        format!(
            "{outcome:?}\n--- workload stdout ---\n{}\n--- stderr ---\n{}\n--- console ---\n{}",
            capture.out.join("\n"),
            capture.err.join("\n"),
            outcome.console_log
        )
    };
    assert_eq!(outcome.status, 0, "{}", show());
    assert_eq!(outcome.workload_status, Some(0), "{}", show());
    assert_eq!(outcome.steps_done, steps, "{}", show());
    assert!(
        !capture.out.iter().any(|l| l.contains("BROKEN")),
        "{}",
        show()
    );
    let done = capture.out.last().cloned().unwrap_or_default();
    assert!(
        done.starts_with(&format!("cpu-follower: done changes={changes} ")),
        "{}",
        show()
    );
    // Every resize shows in the workers' own view, in order: each target is
    // reached by a change line's count, one after the other.
    let counts = change_counts(&capture.out);
    assert_eq!(counts.len(), changes as usize, "{}", show());
    let mut rest = counts.iter();
    for (i, t) in targets.iter().enumerate() {
        assert!(
            rest.any(|c| c == t),
            "step {} (to {t} vCPUs) never seen by the workers: counts {counts:?}\n{}",
            i + 1,
            show()
        );
    }
    let checks = capture
        .out
        .iter()
        .filter(|l| l.contains(" ok count="))
        .count();
    assert!(checks >= targets.len(), "{checks} checks\n{}", show());
    assert!(
        capture
            .notes
            .iter()
            .filter(|n| n.starts_with("churn step") && n.contains(": ok in "))
            .count()
            == steps as usize,
        "{}",
        show()
    );
    println!(
        "E2E-TIME test=cpu_follower_follows_a_seeded_random_churn ms={}",
        start.elapsed().as_millis()
    );
}

/// Runs the `launch` binary; (status, stdout, stderr). A run the emulated
/// host itself failed (status 123, said on stderr) is run once more,
/// announced.
fn launch(args: &[&str]) -> (Option<i32>, String, String) {
    let sock = std::env::temp_dir().join(format!("e2e-workload-{}.sock", std::process::id()));
    let once = || {
        let out = Command::new(env!("CARGO_BIN_EXE_launch"))
            // The suite's serialisation, which the launcher leaves off.
            .env(e2e::locks::SUITE_LOCK_ENV, "1")
            .arg("--api-socket")
            .arg(&sock)
            .args(args)
            .output()
            .expect("run launch");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let first = once();
    if first.0 == Some(workload::status::HOST_FAILED)
        && first.2.contains("launch: the emulated KVM host failed (")
    {
        println!(
            "E2E-RETRY: the emulated host failed under the launcher; once more\n{}",
            first.2
        );
        return once();
    }
    first
}

/// Lines the exit-status workload prints: about 300 KiB through the
/// agent channel, many times the credit window.
const LINES: usize = 10_000;

#[test]
fn the_launcher_exits_with_the_workloads_status() {
    let Some(follower) = follower() else { return };
    let start = Instant::now();
    let add = format!("{}:/bin/cpu-follower", follower.display());
    let (code, stdout, stderr) = launch(&[
        "--cpus",
        "boot=1,max=2",
        "--add",
        &add,
        "--run",
        &format!("cpu-follower --duration 0 --exit-code 3 --lines {LINES}"),
    ]);
    let show = || format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    assert_eq!(code, Some(3), "{}", show());
    // Stdout carries the workload's lines and nothing else, every one of
    // them in order (many times what the credit window holds).
    assert!(
        stdout.lines().all(|l| l.starts_with("cpu-follower: ")),
        "{}",
        show()
    );
    let numbered: Vec<&str> = stdout.lines().filter(|l| l.contains(" line ")).collect();
    assert_eq!(numbered.len(), LINES, "{}", show());
    for (i, l) in numbered.iter().enumerate() {
        assert_eq!(*l, format!("cpu-follower: line {} of {LINES}", i + 1));
    }
    assert!(
        stdout.contains("cpu-follower: done changes=0"),
        "{}",
        show()
    );
    assert!(
        stderr.contains("launch: workload ended: status=3"),
        "{}",
        show()
    );
    println!("E2E-TIME run=exit3 ms={}", start.elapsed().as_millis());

    // A program that is not there: 127, said on stderr.
    let t = Instant::now();
    let (code, stdout, stderr) = launch(&["--cpus", "1", "--run", "/bin/no-such-program"]);
    let show = || format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    assert_eq!(code, Some(workload::status::NOT_FOUND), "{}", show());
    assert!(stdout.is_empty(), "{}", show());
    assert!(stderr.contains("no-such-program"), "{}", show());
    println!("E2E-TIME run=not_found ms={}", t.elapsed().as_millis());
    println!(
        "E2E-TIME test=the_launcher_exits_with_the_workloads_status ms={}",
        start.elapsed().as_millis()
    );
}
