//! The guest's view (`GET /api/v1/guest/workers`, workers in
//! `GET /api/v1/vcpus`) and the test hooks (`POST /api/v1/test/faults`),
//! through real HTTP, the client and `vmmctl`.

use std::time::Duration;

use api::client::ClientError;
use api::{
    CpuWork, ErrorCode, FaultInjected, FaultKind, FaultTarget, GuestWorker, GuestWorkers, VcpuList,
};
use hyper::Method;

use crate::error_code;
use crate::fake::{Harness, Settle};

const JSON: &str = "application/json";
const FAULTS: &str = "/api/v1/test/faults";

fn worker(descriptor: &str, cpu: u32, status: &str) -> GuestWorker {
    GuestWorker {
        descriptor: descriptor.into(),
        cpu,
        status: status.into(),
        last_cpu: Some(cpu),
        setup_calls: 1,
        park_calls: 0,
        unpark_calls: 0,
        thread_fn_calls: 17,
    }
}

fn snapshot() -> GuestWorkers {
    GuestWorkers {
        agent_connected: Some(true),
        agent_version: Some("fake".into()),
        snapshot_age_ms: Some(40),
        workers: vec![
            worker("ksoftirqd", 0, "active"),
            worker("ksoftirqd", 1, "parked"),
            worker("kworker", 1, "parked"),
        ],
        work: vec![
            CpuWork {
                cpu: 0,
                items_done: 100,
            },
            CpuWork {
                cpu: 1,
                items_done: 5,
            },
        ],
    }
}

#[test]
fn workers_unknown_then_reported() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    // No agent, no snapshot: 200 with empty lists and no optional fields.
    let r = c
        .request(Method::GET, "/api/v1/guest/workers", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let json: serde_json::Value = r.json().unwrap();
    assert_eq!(json, serde_json::json!({"workers": [], "work": []}));
    let list: serde_json::Value = c
        .request(Method::GET, "/api/v1/vcpus", None)
        .unwrap()
        .json()
        .unwrap();
    assert!(list["vcpus"][0].get("workers").is_none(), "{list}");

    h.fake.lock().agent_connected = true;
    h.fake.lock().snapshot = Some(snapshot());
    let workers = c.guest_workers().unwrap();
    assert_eq!(workers, snapshot());
    assert_eq!(workers.on_cpu(1).count(), 2);
    let list: VcpuList = c.vcpus().unwrap();
    let names = |id: usize| -> Vec<(String, String)> {
        let ws = list.vcpus[id].workers.as_ref().expect("workers listed");
        ws.iter()
            .map(|w| (w.descriptor.clone(), w.status.clone()))
            .collect()
    };
    assert_eq!(names(0), vec![("ksoftirqd".into(), "active".into())]);
    assert_eq!(names(1).len(), 2);
    assert!(names(5).is_empty());
    let vm = c.vm().unwrap();
    assert_eq!(
        (vm.agent_connected, vm.agent_version.as_deref()),
        (Some(true), Some("fake"))
    );
    // GET only, and nothing in the query or body.
    let r = c
        .request(Method::PUT, "/api/v1/guest/workers", None)
        .unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    let r = c
        .request(Method::GET, "/api/v1/guest/workers?cpu=1", None)
        .unwrap();
    assert_eq!(error_code(&r), ErrorCode::MalformedRequest);
}

fn post(h: &Harness, body: &str) -> api::client::RawResponse {
    h.blocking()
        .request(Method::POST, FAULTS, Some((JSON, body.as_bytes().to_vec())))
        .unwrap()
}

#[test]
fn faults_without_hooks_are_404() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let r = post(&h, r#"{"fault": "ignore_removal", "cpu": 2}"#);
    assert_eq!((r.status, error_code(&r)), (404, ErrorCode::NotFound));
    // Even a malformed body: the path does not exist.
    let r = post(&h, "{");
    assert_eq!((r.status, error_code(&r)), (404, ErrorCode::NotFound));
    match h.blocking().inject_fault(FaultKind::AgentSilence, None) {
        Err(ClientError::Api { status: 404, error }) => {
            assert_eq!(error.code, ErrorCode::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(h.fake.lock().faults.is_empty());
}

#[test]
fn faults_with_hooks() {
    let h = Harness::start_with_hooks(Settle::After(Duration::ZERO));
    let c = h.blocking();
    // VMM-side fault: needs no agent.
    let r = post(&h, r#"{"fault": "ignore_removal", "cpu": 2}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let injected: FaultInjected = r.json().unwrap();
    assert_eq!(
        injected,
        FaultInjected {
            fault: FaultKind::IgnoreRemoval,
            cpu: Some(2),
            target: FaultTarget::Vmm
        }
    );
    // Agent faults without an agent: 409 agent_unavailable.
    for body in [
        r#"{"fault": "agent_refuse_offline", "cpu": 1}"#,
        r#"{"fault": "agent_force_offline", "cpu": 1}"#,
        r#"{"fault": "agent_silence"}"#,
    ] {
        let r = post(&h, body);
        assert_eq!(
            (r.status, error_code(&r)),
            (409, ErrorCode::AgentUnavailable),
            "{body}"
        );
    }
    // With one: forwarded.
    h.fake.lock().agent_connected = true;
    let injected = c
        .inject_fault(FaultKind::AgentRefuseOffline, Some(1))
        .unwrap();
    assert_eq!(injected.target, FaultTarget::Agent);
    let injected = c.inject_fault(FaultKind::AgentSilence, None).unwrap();
    assert_eq!((injected.cpu, injected.target), (None, FaultTarget::Agent));
    // Bad bodies: 400; no JSON: 415; a vCPU beyond the maximum: 404;
    // vCPU 0 never has a removal to ignore: 409.
    for body in [
        r#"{"fault": "ignore_removal"}"#,
        r#"{"fault": "agent_force_offline"}"#,
        r#"{"fault": "ignore_removal", "cpu": 2, "times": 3}"#,
        r#"{"fault": "reboot", "cpu": 2}"#,
        r#"{"fault": "ignore_removal", "cpu": -2}"#,
        r#"{"fault": "agent_silence", "cpu": null}"#,
        r#"["ignore_removal", 2]"#,
        "{",
        "",
    ] {
        let r = post(&h, body);
        assert_eq!(
            (r.status, error_code(&r)),
            (400, ErrorCode::MalformedRequest),
            "{body}"
        );
    }
    let r = post(&h, r#"{"fault": "ignore_removal", "cpu": 2, "times": 3}"#);
    assert!(r.text().contains("unknown field `times`"), "{}", r.text());
    let r = c
        .request(
            Method::POST,
            FAULTS,
            Some(("text/plain", br#"{"fault": "agent_silence"}"#.to_vec())),
        )
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r)),
        (415, ErrorCode::UnsupportedMediaType)
    );
    let r = post(&h, r#"{"fault": "ignore_removal", "cpu": 99}"#);
    assert_eq!((r.status, error_code(&r)), (404, ErrorCode::VcpuNotFound));
    let r = post(&h, r#"{"fault": "ignore_removal", "cpu": 0}"#);
    assert_eq!(
        (r.status, error_code(&r)),
        (409, ErrorCode::Vcpu0NotRemovable)
    );
    let r = c.request(Method::GET, FAULTS, None).unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    assert_eq!(
        h.fake.lock().faults,
        vec![
            (FaultKind::IgnoreRemoval, Some(2)),
            (FaultKind::AgentRefuseOffline, Some(1)),
            (FaultKind::AgentSilence, None),
        ]
    );
}

fn vmmctl(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let socket = h.socket.to_str().unwrap();
    let mut argv = vec!["vmmctl", "--socket", socket];
    argv.extend_from_slice(args);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = api::cli::run(argv, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn vmmctl_workers_and_fault() {
    let h = Harness::start_with_hooks(Settle::After(Duration::ZERO));
    let (code, out, _) = vmmctl(&h, &["workers"]);
    assert_eq!(code, api::cli::EXIT_OK);
    assert_eq!(
        out,
        "guest agent:  unknown\nno worker snapshot from the guest agent yet\n"
    );
    h.fake.lock().agent_connected = true;
    h.fake.lock().snapshot = Some(snapshot());
    let (code, out, _) = vmmctl(&h, &["workers"]);
    assert_eq!(code, api::cli::EXIT_OK);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "guest agent:  connected (version fake)");
    assert_eq!(
        lines[3],
        "CPU   DESCRIPTOR  STATUS   LAST  SETUP  PARK  UNPARK  THREAD_FN"
    );
    assert_eq!(
        lines[4],
        "0     ksoftirqd   active   0     1      0     0       17"
    );
    assert!(
        out.ends_with("CPU   ITEMS DONE\n0     100\n1     5\n"),
        "{out}"
    );
    let (_, out, _) = vmmctl(&h, &["workers", "--json"]);
    assert_eq!(
        serde_json::from_str::<GuestWorkers>(&out).unwrap(),
        snapshot()
    );
    let (_, out, _) = vmmctl(&h, &["vcpus"]);
    assert!(
        out.starts_with("ID    STATE     GUEST    WORKERS\n0     present   online   1 active\n"),
        "{out}"
    );

    let (code, out, err) = vmmctl(&h, &["fault", "ignore_removal", "3"]);
    assert_eq!(code, api::cli::EXIT_OK, "{err}");
    assert_eq!(out, "fault ignore_removal on vCPU 3 armed in the VMM\n");
    let (code, out, _) = vmmctl(&h, &["--json", "fault", "agent_silence"]);
    assert_eq!(code, api::cli::EXIT_OK);
    let injected: FaultInjected = serde_json::from_str(&out).unwrap();
    assert_eq!(injected.target, FaultTarget::Agent);
    h.fake.lock().agent_connected = false;
    let (code, _, err) = vmmctl(&h, &["fault", "agent_force_offline", "1"]);
    assert_eq!(code, api::cli::EXIT_FAILED);
    assert!(err.contains("[agent_unavailable, HTTP 409]"), "{err}");
}
