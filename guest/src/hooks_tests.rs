use super::*;

use std::path::PathBuf;

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("guest-hooks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ev(kind: HookEventKind, cpu: u32, vcpu: Option<u32>) -> HookEvent {
    HookEvent { kind, cpu, vcpu }
}

/// Reaps and ticks until the runner is idle (or panics after 10 s).
fn run_to_idle(runner: &mut HookRunner) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runner.is_idle() {
        assert!(
            Instant::now() < deadline,
            "hooks did not finish: {runner:?}"
        );
        runner.reap(Instant::now());
        runner.tick(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn event_names_and_environment() {
    let kinds = [
        (CpuEventKind::Added, "add"),
        (CpuEventKind::Online, "online"),
        (CpuEventKind::Offline, "offline"),
        (CpuEventKind::Removed, "remove"),
    ];
    for (kind, name) in kinds {
        assert_eq!(HookEventKind::from(kind).name(), name);
    }
    let e = ev(HookEventKind::Add, 1, Some(6));
    assert_eq!(
        e.env(),
        [
            ("VMM_CPU_EVENT", "add".to_owned()),
            ("VMM_CPU", "1".to_owned()),
            ("VMM_VCPU_ID", "6".to_owned()),
        ]
    );
    assert_eq!(e.describe(), "event=add cpu=1 vcpu=6");
    let unknown = ev(HookEventKind::Remove, 3, None);
    assert!(unknown.env().iter().all(|(k, _)| *k != "VMM_VCPU_ID"));
    assert_eq!(unknown.describe(), "event=remove cpu=3 vcpu=?");
}

#[test]
fn a_hook_sees_its_event_in_the_environment() {
    let _children = crate::workload::tests::children();
    let dir = Scratch::new("env");
    let out = dir.file("out");
    let cmd = format!(
        "echo \"$VMM_CPU_EVENT|$VMM_CPU|${{VMM_VCPU_ID-unset}}|${{PATH:+path}}\" >> {}",
        out.display()
    );
    let mut runner = HookRunner::new(cmd, Limits::default());
    let now = Instant::now();
    runner.submit(ev(HookEventKind::Add, 2, Some(7)), now);
    runner.submit(ev(HookEventKind::Remove, 5, None), now);
    run_to_idle(&mut runner);
    let mut got = lines(&out);
    got.sort();
    assert_eq!(got, ["add|2|7|path", "remove|5|unset|path"]);
    let stats = runner.stats();
    assert_eq!((stats.started, stats.succeeded, stats.failed), (2, 2, 0));
    assert!(runner.take_notes().is_empty());
}

#[test]
fn one_cpus_events_run_in_order_while_cpus_run_side_by_side() {
    let _children = crate::workload::tests::children();
    let dir = Scratch::new("order");
    let out = dir.file("out");
    // Each run takes a while, so a run started out of order would show.
    let cmd = format!(
        "sleep 0.05; echo \"$VMM_CPU $VMM_CPU_EVENT\" >> {}",
        out.display()
    );
    let mut runner = HookRunner::new(cmd, Limits::default());
    let now = Instant::now();
    let kinds = [
        HookEventKind::Add,
        HookEventKind::Online,
        HookEventKind::Offline,
        HookEventKind::Remove,
    ];
    for kind in kinds {
        runner.submit(ev(kind, 1, Some(1)), now);
        runner.submit(ev(kind, 2, Some(2)), now);
    }
    // One run per CPU at a time: two running, the rest waiting.
    assert_eq!((runner.running(), runner.queued()), (2, 6));
    run_to_idle(&mut runner);
    let got = lines(&out);
    assert_eq!(got.len(), 8, "{got:?}");
    for cpu in ["1", "2"] {
        let order: Vec<&str> = got
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{cpu} ")))
            .collect();
        assert_eq!(order, ["add", "online", "offline", "remove"], "cpu {cpu}");
    }
    assert_eq!(runner.stats().succeeded, 8);
}

#[test]
fn beyond_the_bound_events_are_dropped_and_counted() {
    let _children = crate::workload::tests::children();
    let limits = Limits {
        running: 2,
        queued: 3,
        timeout: Duration::from_secs(10),
    };
    let mut runner = HookRunner::new("sleep 0.2", limits);
    let now = Instant::now();
    for cpu in 0..7 {
        runner.submit(ev(HookEventKind::Add, cpu, Some(cpu)), now);
    }
    assert_eq!(runner.running(), 2);
    assert_eq!(runner.queued(), 3);
    assert_eq!(runner.stats().dropped, 2);
    let notes = runner.take_notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("GUEST-WARN hook queue full"));
    assert!(
        notes[1].contains("event=add cpu=6 vcpu=6 (dropped=2)"),
        "{notes:?}"
    );
    run_to_idle(&mut runner);
    let stats = runner.stats();
    assert_eq!((stats.started, stats.succeeded, stats.dropped), (5, 5, 2));
}

#[test]
fn a_hung_hook_is_killed_at_its_timeout_and_the_next_one_runs() {
    let _children = crate::workload::tests::children();
    let dir = Scratch::new("hang");
    let out = dir.file("out");
    let limits = Limits {
        running: 1,
        queued: 8,
        timeout: Duration::from_millis(300),
    };
    // cpu 0's hook hangs (with a child of its own: the group is killed);
    // cpu 1's writes a line.
    let cmd = format!(
        "if [ \"$VMM_CPU\" = 0 ]; then sleep 60 & wait; else echo ran >> {}; fi",
        out.display()
    );
    let mut runner = HookRunner::new(cmd, limits);
    let start = Instant::now();
    runner.submit(ev(HookEventKind::Add, 0, Some(0)), start);
    runner.submit(ev(HookEventKind::Add, 1, Some(1)), start);
    assert_eq!((runner.running(), runner.queued()), (1, 1));
    let next = runner.next_timeout(start).unwrap();
    assert!(next <= limits.timeout, "{next:?}");
    run_to_idle(&mut runner);
    let took = start.elapsed();
    assert!(took >= limits.timeout, "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(lines(&out), ["ran"]);
    let stats = runner.stats();
    assert_eq!((stats.timed_out, stats.failed, stats.succeeded), (1, 1, 1));
    let notes = runner.take_notes();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("event=add cpu=0") && n.contains("killed after 300 ms")),
        "{notes:?}"
    );
}

#[test]
fn a_failing_hook_is_reported_and_children_of_others_are_not_ours() {
    let _children = crate::workload::tests::children();
    let mut runner = HookRunner::new("exit 3", Limits::default());
    let now = Instant::now();
    runner.submit(ev(HookEventKind::Offline, 4, Some(9)), now);
    assert!(!runner.on_exit(-5, 0, now), "not a hook's pid");
    run_to_idle(&mut runner);
    let notes = runner.take_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("GUEST-WARN hook event=offline cpu=4 vcpu=9 pid=")
            && notes[0].ends_with(" failed: exit status 3"),
        "{notes:?}"
    );
    assert_eq!(runner.stats().failed, 1);
}
