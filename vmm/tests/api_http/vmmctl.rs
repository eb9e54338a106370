//! `vmmctl`'s output, human and `--json`, and its exit statuses, run
//! in-process (`api::cli::run`) against the real server and the fake VMM.

use std::time::Duration;

use api::cli::{self, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_UNREACHABLE};
use api::{ErrorBody, ErrorCode, Operation, OperationStatus, VcpuList, VmInfo};

use crate::fake::{Harness, Settle, BOOT, MAX};

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn vmmctl(h: &Harness, args: &[&str]) -> Run {
    let socket = h.socket.to_str().unwrap();
    let mut argv = vec!["vmmctl", "--socket", socket];
    argv.extend_from_slice(args);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(argv, &mut out, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

#[test]
fn status_and_vcpus() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let run = vmmctl(&h, &["status"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.err);
    assert_eq!(
        run.out,
        format!("state:        running\nvCPUs:        {BOOT} present ({BOOT} at boot, {MAX} max)\nmemory:       512 MiB\nguest agent:  unknown\nworkload:     none\n")
    );
    let run = vmmctl(&h, &["--json", "status"]);
    let vm: VmInfo = serde_json::from_str(&run.out).unwrap();
    assert_eq!(vm.max_vcpus, MAX);

    let run = vmmctl(&h, &["vcpus"]);
    assert_eq!(run.code, EXIT_OK);
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(lines[0], "ID    STATE     GUEST");
    assert_eq!(lines[1], "0     present   online");
    assert_eq!(lines[3], "2     absent    -");
    assert_eq!(
        lines.last(),
        Some(&format!("{BOOT} of {MAX} present").as_str())
    );
    let run = vmmctl(&h, &["vcpus", "--json"]);
    let list: VcpuList = serde_json::from_str(&run.out).unwrap();
    assert_eq!(list.vcpus.len(), MAX as usize);
}

#[test]
fn mutations_human_and_json() {
    let h = Harness::start(Settle::After(Duration::from_millis(10)));
    let run = vmmctl(&h, &["resize", "4", "--wait", "5"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.err);
    assert!(
        run.out
            .starts_with("operation 1: resize to 4: succeeded (vCPUs 2, 3) in "),
        "{}",
        run.out
    );
    let run = vmmctl(&h, &["resize", "4"]);
    assert_eq!(run.out, "nothing to do: 4 vCPUs already present\n");
    // The guest holds changes back, so they are reported as started.
    h.set_settle(Settle::Never);
    let run = vmmctl(&h, &["--json", "add", "6"]);
    assert_eq!(run.code, EXIT_OK);
    let op: Operation = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        (op.status, op.vcpus.as_slice()),
        (OperationStatus::Running, &[6][..])
    );
    let run = vmmctl(&h, &["add", "7"]);
    assert!(
        run.out.starts_with(
            "operation 4 started: add vCPU 7 (vCPUs 7); follow it with `vmmctl operation 4`"
        ),
        "{}",
        run.out
    );
    h.fake.settle_all();
    h.set_settle(Settle::After(Duration::from_millis(10)));
    let run = vmmctl(&h, &["remove", "3", "-w", "5"]);
    assert!(run.out.contains("remove vCPU 3: succeeded"), "{}", run.out);
    let run = vmmctl(&h, &["operation", "1"]);
    assert!(
        run.out.starts_with("operation 1: resize to 4: succeeded"),
        "{}",
        run.out
    );
    let run = vmmctl(&h, &["operation", "1", "--json"]);
    assert_eq!(serde_json::from_str::<Operation>(&run.out).unwrap().id, 1);
    let run = vmmctl(&h, &["metrics"]);
    assert!(run.out.contains("vmm_vcpu_hot_adds_total "), "{}", run.out);
}

#[test]
fn errors_show_the_server_code_and_exit_non_zero() {
    let h = Harness::start(Settle::Never);
    let run = vmmctl(&h, &["remove", "0"]);
    assert_eq!(run.code, EXIT_FAILED);
    assert!(run.out.is_empty());
    assert_eq!(
        run.err,
        "vmmctl: vCPU 0 cannot be removed [vcpu0_not_removable, HTTP 409]\n"
    );
    let run = vmmctl(&h, &["--json", "resize", "99"]);
    assert_eq!(run.code, EXIT_FAILED);
    let body: ErrorBody = serde_json::from_str(&run.out).unwrap();
    assert_eq!(body.error.code, ErrorCode::InvalidVcpuCount);
    assert!(
        run.err.contains("[invalid_vcpu_count, HTTP 422]"),
        "{}",
        run.err
    );
    let run = vmmctl(&h, &["add", "8"]);
    assert!(
        run.err.contains("[vcpu_not_found, HTTP 404]"),
        "{}",
        run.err
    );
    let run = vmmctl(&h, &["operation", "77"]);
    assert_eq!(run.code, EXIT_FAILED);
    assert!(run.err.contains("operation_not_found"), "{}", run.err);

    // --wait running out: exit 3, the operation still reported.
    let run = vmmctl(&h, &["add", "5", "--wait", "0.1"]);
    assert_eq!(run.code, EXIT_TIMEOUT);
    assert!(
        run.err.contains("timed out waiting for operation"),
        "{}",
        run.err
    );
    assert!(run.err.contains("still running"), "{}", run.err);
    let run = vmmctl(&h, &["--json", "add", "5", "--wait", "0.1"]);
    assert_eq!(run.code, EXIT_TIMEOUT);
    let op: Operation = serde_json::from_str(&run.out).unwrap();
    assert_eq!(op.status, OperationStatus::Running);

    // A failed operation: exit 1 with the reason.
    h.set_settle(Settle::FailAfter(Duration::ZERO));
    let run = vmmctl(&h, &["add", "6", "--wait", "5"]);
    assert_eq!(run.code, EXIT_FAILED);
    assert!(
        run.out.contains("failed") && run.out.contains("the guest did not confirm it"),
        "{}",
        run.out
    );
}

#[test]
fn unreachable_server() {
    let mut h = Harness::start(Settle::Never);
    h.server.take().unwrap().shutdown().unwrap();
    let run = vmmctl(&h, &["vcpus"]);
    assert_eq!(run.code, EXIT_UNREACHABLE);
    assert!(
        run.err.starts_with("vmmctl: cannot connect to "),
        "{}",
        run.err
    );
}

/// Guest text with a control character and ANSI escapes (colour, clear
/// screen, window title, an 8-bit CSI) comes out visibly escaped, in the
/// human output and in `--json`, never raw.
#[test]
fn guest_text_is_escaped() {
    const EVIL: &str = "v1\u{7}\u{1b}[31mred\u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}1m\nfake: line";
    let raw_controls = |text: &str| {
        text.chars()
            .any(|c| c.is_control() && c != '\n' || c == '\u{9b}')
    };
    let h = Harness::start(Settle::Never);
    {
        let mut state = h.fake.lock();
        state.agent_connected = true;
        state.agent_version = EVIL.to_owned();
        state.snapshot = Some(api::GuestWorkers {
            agent_connected: Some(true),
            agent_version: Some(EVIL.to_owned()),
            snapshot_age_ms: Some(1),
            workers: vec![api::GuestWorker {
                descriptor: format!("ksoftirqd{EVIL}"),
                cpu: 0,
                status: format!("active{EVIL}"),
                last_cpu: Some(0),
                setup_calls: 1,
                park_calls: 0,
                unpark_calls: 0,
                thread_fn_calls: 1,
            }],
            work: vec![],
        });
    }
    let run = vmmctl(&h, &["add", "5"]);
    assert_eq!(run.code, EXIT_OK, "{}", run.err);
    h.fake
        .lock()
        .table
        .vcpu_failed(5, &format!("agent refused: {EVIL}"));
    let mut outputs = Vec::new();
    for args in [
        &["status"][..],
        &["vcpus"],
        &["workers"],
        &["operation", "1"],
        &["--json", "status"],
        &["--json", "workers"],
        &["--json", "operation", "1"],
    ] {
        let run = vmmctl(&h, args);
        assert!(
            !raw_controls(&run.out) && !raw_controls(&run.err),
            "{args:?} printed raw controls: {:?} {:?}",
            run.out,
            run.err
        );
        outputs.push((args, run.out));
    }
    let text = |n: usize| outputs[n].1.as_str();
    assert!(
        text(0).contains("connected (version v1\\u{7}\\u{1b}[31mred\\u{1b}[2J"),
        "{}",
        text(0)
    );
    // The newline in guest text cannot fake a line of output.
    assert!(
        !text(0).lines().any(|l| l.starts_with("fake:")),
        "{}",
        text(0)
    );
    assert!(text(1).contains("1 activev1\\u{7}"), "{}", text(1));
    assert!(
        text(2).contains("ksoftirqdv1\\u{7}\\u{1b}[31m"),
        "{}",
        text(2)
    );
    assert!(
        text(3).contains("agent refused: v1\\u{7}\\u{1b}[31m"),
        "{}",
        text(3)
    );
    assert!(text(3).contains("\\u{9b}1m\\nfake: line"), "{}", text(3));
    // JSON stays valid and means the same.
    let vm: VmInfo = serde_json::from_str(text(4)).unwrap();
    assert_eq!(vm.agent_version.as_deref(), Some(EVIL));
    let op: Operation = serde_json::from_str(text(6)).unwrap();
    assert!(op.reason.unwrap().ends_with(EVIL));
}
