//! Mutations: 200 vs 202, idempotency, `?wait` success, failure and 504,
//! operations, metrics.

use std::time::{Duration, Instant};

use api::client::{ClientError, MutationOutcome};
use api::{OperationKind, OperationStatus, VcpuState};
use hyper::Method;

use crate::fake::{Harness, Settle, BOOT, MAX};

fn present(h: &Harness) -> Vec<u32> {
    let list = h.blocking().vcpus().unwrap();
    list.vcpus
        .iter()
        .filter(|v| v.state == VcpuState::Present)
        .map(|v| v.id)
        .collect()
}

#[test]
fn resize_adds_lowest_and_removes_highest_then_is_idempotent() {
    // Slow enough that the repeated request below finds it in flight.
    let h = Harness::start(Settle::After(Duration::from_millis(300)));
    let c = h.blocking();
    let grow = c.resize(5, None).unwrap();
    let MutationOutcome::Accepted(op) = grow else {
        panic!("{grow:?}")
    };
    assert_eq!(
        (op.kind, op.desired, op.vcpus.clone()),
        (OperationKind::Resize, Some(5), vec![2, 3, 4])
    );
    // Same request while in flight: the same operation, not an error.
    let again = c.resize(5, None).unwrap();
    assert_eq!(again.operation().id, op.id);
    assert!(matches!(again, MutationOutcome::Accepted(_)));
    // Wait for it through the operation endpoint.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.operation(op.id).unwrap().status == OperationStatus::Running {
        assert!(Instant::now() < deadline, "operation never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = c.operation(op.id).unwrap();
    assert_eq!(done.status, OperationStatus::Succeeded);
    assert!(done.duration_ms.is_some());
    assert_eq!(present(&h), vec![0, 1, 2, 3, 4]);
    // Reached: 200, nothing to do.
    let same = c.resize(5, None).unwrap();
    let MutationOutcome::Unchanged(noop) = same else {
        panic!("{same:?}")
    };
    assert!(noop.vcpus.is_empty() && noop.status == OperationStatus::Succeeded);
    // Shrink removes the highest.
    let shrink = c.resize(3, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(shrink.operation().vcpus, vec![3, 4]);
    assert_eq!(present(&h), vec![0, 1, 2]);
    // Add of a present vCPU and remove of an absent one: 200.
    assert!(matches!(
        c.add_vcpu(1, None).unwrap(),
        MutationOutcome::Unchanged(_)
    ));
    assert!(matches!(
        c.remove_vcpu(7, None).unwrap(),
        MutationOutcome::Unchanged(_)
    ));
}

#[test]
fn started_mutation_is_202_with_location() {
    let h = Harness::start(Settle::Never);
    let c = h.blocking();
    let r = c.request(Method::PUT, "/api/v1/vcpus/6", None).unwrap();
    assert_eq!(r.status, 202);
    let op: api::Operation = r.json().unwrap();
    assert_eq!(
        r.header("location"),
        Some(api::routes::operation(op.id).as_str())
    );
    assert_eq!(
        (op.kind, op.vcpus.as_slice(), op.status),
        (OperationKind::Add, &[6][..], OperationStatus::Running)
    );
    let list = c.vcpus().unwrap();
    assert_eq!(list.vcpus[6].state, VcpuState::Adding);
    assert_eq!(list.vcpus[6].guest_online, Some(false));
    // Repeating the add is the same operation.
    assert_eq!(c.add_vcpu(6, None).unwrap().operation().id, op.id);
}

#[test]
fn wait_returns_when_the_guest_confirms() {
    let h = Harness::start(Settle::After(Duration::from_millis(50)));
    let c = h.blocking();
    let started = Instant::now();
    let outcome = c.resize(MAX, Some(Duration::from_secs(10))).unwrap();
    let MutationOutcome::Finished(op) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(op.status, OperationStatus::Succeeded);
    assert_eq!(op.vcpus, (BOOT..MAX).collect::<Vec<_>>());
    let list = c.vcpus().unwrap();
    assert!(list
        .vcpus
        .iter()
        .all(|v| v.state == VcpuState::Present && v.guest_online == Some(true)));
    let removed = c.remove_vcpu(3, Some(Duration::from_secs(10))).unwrap();
    assert!(
        matches!(&removed, MutationOutcome::Finished(op) if op.status == OperationStatus::Succeeded)
    );
    assert_eq!(c.vcpus().unwrap().vcpus[3].state, VcpuState::Absent);
}

#[test]
fn wait_timeout_is_504_with_the_truthful_operation() {
    let h = Harness::start(Settle::Never);
    let c = h.blocking();
    let r = c
        .request(Method::PUT, "/api/v1/vcpus/4?wait=0.2", None)
        .unwrap();
    assert_eq!(r.status, 504);
    let op: api::Operation = r.json().unwrap();
    assert_eq!(op.status, OperationStatus::Running);
    assert_eq!(op.vcpus, vec![4]);
    // The operation is still reported as running, then as succeeded once
    // the guest confirms.
    assert_eq!(c.operation(op.id).unwrap().status, OperationStatus::Running);
    match c.add_vcpu(4, Some(Duration::from_millis(100))) {
        Err(ClientError::WaitTimedOut(again)) => assert_eq!(again.id, op.id),
        other => panic!("{other:?}"),
    }
    h.fake.settle_all();
    let done = c.operation(op.id).unwrap();
    assert_eq!(done.status, OperationStatus::Succeeded);
    // wait=0 on something already done answers at once.
    assert!(matches!(
        c.add_vcpu(4, Some(Duration::ZERO)).unwrap(),
        MutationOutcome::Unchanged(_)
    ));
}

#[test]
fn failed_operation_is_reported_with_its_reason() {
    let h = Harness::start(Settle::FailAfter(Duration::from_millis(10)));
    let c = h.blocking();
    let outcome = c.add_vcpu(2, Some(Duration::from_secs(5))).unwrap();
    let op = outcome.operation();
    assert_eq!(op.status, OperationStatus::Failed);
    assert_eq!(
        op.reason.as_deref(),
        Some("vCPU 2: the guest did not confirm it")
    );
    assert_eq!(c.operation(op.id).unwrap(), *op);
    assert_eq!(c.vcpus().unwrap().vcpus[2].state, VcpuState::Absent);
}

#[test]
fn metrics_count_hotplug_and_requests() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    c.resize(4, Some(Duration::from_secs(5))).unwrap();
    c.remove_vcpu(3, Some(Duration::from_secs(5))).unwrap();
    let _ = c.remove_vcpu(0, None).unwrap_err();
    let _ = c.request(Method::GET, "/nope", None).unwrap();
    let r = c.request(Method::GET, "/api/v1/metrics", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    for line in [
        "vmm_vcpu_hot_adds_total 2",
        "vmm_vcpu_hot_removes_total 1",
        "vmm_vcpu_hotplug_failures_total 0",
        "vmm_hotplug_ignored_register_accesses_total 0",
        "vmm_vcpu_fds_created_total 0",
        "vmm_agent_lines_dropped_total 0",
        "vmm_agent_mailbox_corrupt_total 0",
        "vmm_vcpus_stuck 0",
        "vmm_api_requests_total{status=\"200\"} 2",
        "vmm_api_requests_total{status=\"409\"} 1",
        "vmm_api_requests_total{status=\"404\"} 1",
        "vmm_api_connections_refused_total 0",
        "vmm_api_waits_over_limit_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    // The metrics request itself is counted after it is answered.
    assert_eq!(h.metrics.requests(200), 3);
    assert_eq!(
        c.metrics()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("# TYPE"))
            .count(),
        18
    );
}
