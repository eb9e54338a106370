//! vCPU hot-add and hot-remove end to end: the real Debian guest, real
//! ACPI hotplug, the HTTP API through its Unix socket (forwarded out of the
//! emulated KVM host where there is one). One guest boot for the lot.
//!
//! The guest's view is read from its console: the agent prints
//! `GUEST-CPU online=<list> vcpus=<list>` whenever the online set changes
//! (`online`: Linux's logical numbers, `vcpus`: their vCPU ids), and the
//! API's `guest_online` / `guest_cpu` must agree with it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use api::client::{BlockingClient, ClientError, MutationOutcome};
use api::{OperationStatus, VcpuState};
use e2e::guest_view::{cpu_list, parse_view, GuestView};
use e2e::RunningVm;
use hyper::Method;

type TestResult<T = ()> = Result<T, e2e::BoxError>;

const WAIT: Duration = Duration::from_secs(90);

fn present(client: &BlockingClient) -> TestResult<BTreeSet<u32>> {
    Ok(client
        .vcpus()?
        .vcpus
        .iter()
        .filter(|v| v.state == VcpuState::Present)
        .map(|v| v.id)
        .collect())
}

/// Runs one mutation that must succeed, printing its time. If the HTTP
/// exchange itself broke (not an API answer), it is asked once more and
/// said so: mutations are idempotent, so the repeat returns the same
/// operation.
fn step(what: &str, call: impl Fn() -> Result<MutationOutcome, ClientError>) -> TestResult<u64> {
    let outcome = match call() {
        Err(e @ (ClientError::Http(_) | ClientError::Connect { .. })) => {
            println!("E2E-RETRY {what}: transport error: {}", e2e::chain(&e));
            call()
        }
        other => other,
    }
    .map_err(|e| format!("{what}: {}", e2e::chain(&e)))?;
    let op = outcome.operation();
    if op.status != OperationStatus::Succeeded {
        return Err(format!("{what}: operation ended {op:?}").into());
    }
    println!(
        "E2E-TIME step={what:?} op={} ms={:?}",
        op.id, op.duration_ms
    );
    Ok(op.id)
}

/// The value of a Prometheus counter (sum over labels).
fn metric(client: &BlockingClient, name: &str) -> TestResult<u64> {
    let text = client.metrics()?;
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if key == name || key.starts_with(&format!("{name}{{")) {
            *total.get_or_insert(0) += value.trim().parse::<u64>().unwrap_or(0);
        }
    }
    total.ok_or_else(|| format!("metric {name} not served").into())
}

fn set(ids: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    ids.into_iter().collect()
}

fn expect_status(
    client: &BlockingClient,
    method: Method,
    path: &str,
    body: Option<&str>,
    want: u16,
) -> TestResult {
    let r = client.request(
        method.clone(),
        path,
        body.map(|b| ("application/json", b.as_bytes().to_vec())),
    )?;
    if r.status != want {
        return Err(format!(
            "{method} {path} {body:?}: HTTP {} {}, expected {want}",
            r.status,
            r.text()
        )
        .into());
    }
    if want >= 400 && !r.text().contains("\"error\"") {
        return Err(format!(
            "{method} {path}: error body without an error object: {}",
            r.text()
        )
        .into());
    }
    Ok(())
}

/// The lifecycle of the issue: 1 of 8 -> 4 -> remove 3 -> add 3 (fd
/// reused) -> 8 -> 1, every operation succeeding and the guest agreeing.
fn lifecycle(vm: &mut RunningVm) -> TestResult {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(180))?;
    let client = BlockingClient::new(vm.api_socket())?;
    e2e::guest_view::wait_guest_online(vm, &set([0]), WAIT)?;
    assert_eq!(present(&client)?, set([0]));

    step("resize 1->4", || client.resize(4, Some(WAIT)))?;
    assert_eq!(present(&client)?, set(0..4));
    e2e::guest_view::wait_guest_online(vm, &set(0..4), WAIT)?;
    let fds_after_first_adds = metric(&client, "vmm_vcpu_fds_created_total")?;

    step("remove 3", || client.remove_vcpu(3, Some(WAIT)))?;
    assert_eq!(present(&client)?, set(0..3));
    e2e::guest_view::wait_guest_online(vm, &set(0..3), WAIT)?;
    assert!(metric(&client, "vmm_vcpu_hot_removes_total")? >= 1);

    step("add 3 again", || client.add_vcpu(3, Some(WAIT)))?;
    e2e::guest_view::wait_guest_online(vm, &set(0..4), WAIT)?;
    let fds = metric(&client, "vmm_vcpu_fds_created_total")?;
    if fds != fds_after_first_adds {
        return Err(
            format!("re-adding vCPU 3 created a new fd: {fds_after_first_adds} -> {fds}").into(),
        );
    }
    assert!(metric(&client, "vmm_vcpu_fds_reused_total")? >= 1);

    step("resize 4->8", || client.resize(8, Some(WAIT)))?;
    e2e::guest_view::wait_guest_online(vm, &set(0..8), WAIT)?;
    step("resize 8->1", || client.resize(1, Some(WAIT)))?;
    assert_eq!(present(&client)?, set([0]));
    e2e::guest_view::wait_guest_online(vm, &set([0]), WAIT)?;

    // Asking for what is already true is not an error (200, no change).
    match client.resize(1, None)? {
        MutationOutcome::Unchanged(op) => assert!(op.vcpus.is_empty()),
        other => return Err(format!("resize to the current count: {other:?}").into()),
    }
    errors_without_touching_the_guest(vm, &client)?;
    concurrent_clients(vm)?;
    Ok(())
}

/// Every error status against the real VM; none reaches the guest.
fn errors_without_touching_the_guest(vm: &RunningVm, client: &BlockingClient) -> TestResult {
    let adds = metric(client, "vmm_vcpu_hot_adds_total")?;
    let removes = metric(client, "vmm_vcpu_hot_removes_total")?;
    let mark = vm.console_mark();
    expect_status(client, Method::DELETE, "/api/v1/vcpus/0", None, 409)?;
    expect_status(
        client,
        Method::PUT,
        "/api/v1/vcpus",
        Some("{\"desired\": 0}"),
        422,
    )?;
    expect_status(
        client,
        Method::PUT,
        "/api/v1/vcpus",
        Some("{\"desired\": 9}"),
        422,
    )?;
    expect_status(client, Method::PUT, "/api/v1/vcpus/8", None, 404)?;
    expect_status(client, Method::DELETE, "/api/v1/vcpus/4096", None, 404)?;
    expect_status(
        client,
        Method::PUT,
        "/api/v1/vcpus",
        Some("{\"desired\": \"two\"}"),
        400,
    )?;
    expect_status(
        client,
        Method::PUT,
        "/api/v1/vcpus",
        Some("{\"desired\": 2, \"x\": 1}"),
        400,
    )?;
    expect_status(client, Method::PUT, "/api/v1/vcpus", Some("{not json"), 400)?;
    expect_status(
        client,
        Method::POST,
        "/api/v1/vcpus",
        Some("{\"desired\": 2}"),
        405,
    )?;
    expect_status(client, Method::GET, "/api/v1/nothing", None, 404)?;
    expect_status(client, Method::GET, "/api/v1/operations/999999", None, 404)?;
    std::thread::sleep(Duration::from_secs(2));
    let touched: Vec<_> = vm
        .console()
        .lines_from(mark)
        .iter()
        .filter(|l| l.text.contains("GUEST-CPU"))
        .map(|l| l.text.clone())
        .collect();
    if !touched.is_empty() {
        return Err(format!("rejected requests reached the guest: {touched:?}").into());
    }
    assert_eq!(metric(client, "vmm_vcpu_hot_adds_total")?, adds);
    assert_eq!(metric(client, "vmm_vcpu_hot_removes_total")?, removes);
    assert_eq!(present(client)?, set([0]));
    Ok(())
}

/// 8 clients at once issuing conflicting requests; afterwards the API and
/// the guest agree.
fn concurrent_clients(vm: &RunningVm) -> TestResult {
    let socket = vm.api_socket().to_path_buf();
    let threads: Vec<_> = (0..8u32)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || -> Result<Vec<u16>, String> {
                let client = BlockingClient::new(&socket).map_err(|e| e.to_string())?;
                let mut statuses = Vec::new();
                for step in 0..4u32 {
                    let n = (i * 3 + step * 5) % 8;
                    let r = match (i + step) % 3 {
                        0 => client.resize(n + 1, None),
                        1 => client.add_vcpu(n, None),
                        _ => client.remove_vcpu(n, None),
                    };
                    statuses.push(match r {
                        Ok(MutationOutcome::Accepted(_)) => 202,
                        Ok(_) => 200,
                        Err(ClientError::Api { status, .. }) => status,
                        Err(e) => return Err(format!("client {i}: {e}")),
                    });
                }
                Ok(statuses)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        let statuses = t.join().map_err(|_| "client thread panicked")??;
        all.extend(statuses);
    }
    println!("concurrent statuses: {all:?}");
    if let Some(bad) = all.iter().find(|s| ![200, 202, 409].contains(*s)) {
        return Err(format!("unexpected status {bad} among {all:?}").into());
    }
    // Settle: no vCPU in flight, then the guest agrees with the API.
    let client = BlockingClient::new(&socket)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = client.vcpus()?;
        if list.vcpus.iter().all(|v| !v.state.in_flight()) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("vCPUs still in flight: {list:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let want = present(&client)?;
    e2e::guest_view::wait_guest_online(vm, &want, WAIT)?;
    println!("after the concurrent clients: present {want:?}, guest agrees");
    Ok(())
}

#[test]
fn vcpu_hotplug_lifecycle() {
    let spec = e2e::VmSpec::new(1, 8).timeout(Duration::from_secs(600));
    e2e::run_test("vcpu_hotplug_lifecycle", &spec, lifecycle);
}

/// Whole-VM resizes back to back, as a user scaling a guest up and down
/// would do: 1 -> 8 -> 1 repeatedly in one boot, the shrink starting the
/// moment the growth is confirmed (the just-onlined CPUs are the first to
/// be taken down). `E2E_CHURN_CYCLES` sets the number of cycles (default
/// 2: enough for the fd reuse check; every cycle is 14 hot-adds and
/// removals, each a chance for the emulated host's nested virtualization
/// to fail under it, so endurance is the soak's job, not CI's).
fn churn(vm: &mut RunningVm) -> TestResult {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(180))?;
    let client = BlockingClient::new(vm.api_socket())?;
    e2e::guest_view::wait_guest_online(vm, &set([0]), WAIT)?;
    let cycles: u32 = std::env::var("E2E_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut fds_after_first = None;
    for cycle in 1..=cycles {
        let up = format!("cycle {cycle}: resize 1->8");
        step(&up, || client.resize(8, Some(WAIT)))?;
        let down = format!("cycle {cycle}: resize 8->1");
        step(&down, || client.resize(1, Some(WAIT)))?;
        assert_eq!(present(&client)?, set([0]));
        e2e::guest_view::wait_guest_online(vm, &set([0]), WAIT)?;
        let created = metric(&client, "vmm_vcpu_fds_created_total")?;
        // Later cycles reuse the fds the first one created.
        if *fds_after_first.get_or_insert(created) != created {
            return Err(format!(
                "cycle {cycle} created new vCPU fds: {fds_after_first:?} -> {created}"
            )
            .into());
        }
    }
    // What the VMM and the guest kernel complained about on the way, if
    // anything (slow steps are diagnosed from these).
    for line in vm
        .console()
        .lines()
        .iter()
        .filter(|l| !l.text.starts_with("host:"))
    {
        if ["WARN", "rcu:", "triple fault", "GUEST-ERROR"]
            .iter()
            .any(|w| line.text.contains(w))
        {
            println!("E2E-NOTE {}", line.text);
        }
    }
    Ok(())
}

#[test]
fn vcpu_resize_churn() {
    let spec = e2e::VmSpec::new(1, 8).timeout(Duration::from_secs(900));
    e2e::run_test("vcpu_resize_churn", &spec, churn);
}

/// vCPUs added in an order Linux does not number them by. Linux gives a
/// hot-added CPU the next free logical number, so with vCPU 0 booted, vCPU
/// 6 becomes cpu1: the agent must report it as vCPU 6 (it once said "cpu 1
/// online", the add of vCPU 6 timed out and the guest wedged). After every
/// step the API and the guest agree on which vCPUs are online and on
/// Linux's number for each (see [`Numbering::check`]).
fn ids_out_of_order(vm: &mut RunningVm) -> TestResult {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(180))?;
    let client = BlockingClient::new(vm.api_socket())?;
    let mut numbering = Numbering(e2e::guest_view::wait_guest_online(vm, &set([0]), WAIT)?);
    if numbering.0.get(&0) != Some(&0) {
        return Err(format!("vCPU 0 is not cpu0: {:?}", numbering.0).into());
    }
    for (id, want) in [
        (6, set([0, 6])),
        (3, set([0, 3, 6])),
        (1, set([0, 1, 3, 6])),
    ] {
        step(&format!("add {id}"), || client.add_vcpu(id, Some(WAIT)))?;
        numbering.check(vm, &client, &want, Some(id))?;
    }
    let before = numbering.0.clone();
    step("remove 3", || client.remove_vcpu(3, Some(WAIT)))?;
    numbering.check(vm, &client, &set([0, 1, 6]), None)?;
    step("add 3 again", || client.add_vcpu(3, Some(WAIT)))?;
    numbering.check(vm, &client, &set([0, 1, 3, 6]), Some(3))?;
    if numbering.0.get(&3) != before.get(&3) {
        println!(
            "E2E-NOTE vCPU 3 came back as cpu{:?}, was cpu{:?}",
            numbering.0.get(&3),
            before.get(&3)
        );
    }
    step("remove 6", || client.remove_vcpu(6, Some(WAIT)))?;
    numbering.check(vm, &client, &set([0, 1, 3]), None)?;
    // The lowest absent id: vCPU 2.
    step("resize 3->4", || client.resize(4, Some(WAIT)))?;
    numbering.check(vm, &client, &set(0..4), Some(2))?;
    step("resize 4->1", || client.resize(1, Some(WAIT)))?;
    numbering.check(vm, &client, &set([0]), None)?;
    Ok(())
}

/// vCPU id -> Linux's logical number, as last checked.
struct Numbering(BTreeMap<u32, u32>);

impl Numbering {
    /// After a step: the vCPUs `want` are present, the guest and the API
    /// agree on them and their Linux numbers ([`wait_guest_online`]),
    /// every present vCPU has its `guest_cpu` (absent ones none), the
    /// numbers of vCPUs that stayed did not change, and the one vCPU just
    /// `added` has the number that newly appeared on the guest's console
    /// (so it differs from the id wherever Linux renumbered).
    fn check(
        &mut self,
        vm: &RunningVm,
        client: &BlockingClient,
        want: &BTreeSet<u32>,
        added: Option<u32>,
    ) -> TestResult {
        assert_eq!(&present(client)?, want);
        let now = e2e::guest_view::wait_guest_online(vm, want, WAIT)?;
        for v in client.vcpus()?.vcpus {
            let known = v.guest_cpu.is_some();
            if known != (v.state == VcpuState::Present) {
                return Err(
                    format!("vCPU {} {} with guest_cpu {:?}", v.id, v.state, v.guest_cpu).into(),
                );
            }
        }
        for (id, cpu) in &now {
            if let Some(old) = self.0.get(id).filter(|old| *old != cpu) {
                return Err(
                    format!("vCPU {id} moved from cpu{old} to cpu{cpu} while present").into(),
                );
            }
        }
        if let Some(id) = added {
            let stayed: BTreeSet<u32> = self
                .0
                .iter()
                .filter(|(i, _)| now.contains_key(i))
                .map(|(_, c)| *c)
                .collect();
            let fresh: Vec<u32> = now
                .values()
                .copied()
                .filter(|c| !stayed.contains(c))
                .collect();
            if fresh != [now[&id]] {
                return Err(format!(
                    "vCPU {id} added: the API says cpu{}, the guest's new CPUs are {fresh:?}",
                    now[&id]
                )
                .into());
            }
        }
        let renumbered: Vec<String> = now
            .iter()
            .filter(|(id, cpu)| id != cpu)
            .map(|(id, cpu)| format!("{id}->cpu{cpu}"))
            .collect();
        println!("E2E-NOTE vCPUs {want:?}; renumbered by Linux: {renumbered:?}");
        self.0 = now;
        Ok(())
    }
}

#[test]
fn vcpu_ids_out_of_order() {
    let spec = e2e::VmSpec::new(1, 8).timeout(Duration::from_secs(600));
    e2e::run_test("vcpu_ids_out_of_order", &spec, ids_out_of_order);
}

#[test]
fn guest_view_parsing() {
    let view = |online: &[u32], vcpus: Option<&[u32]>| GuestView {
        online: set(online.iter().copied()),
        vcpus: vcpus.map(|v| set(v.iter().copied())),
    };
    assert_eq!(
        parse_view("GUEST-CPU online=0-2 vcpus=0,3,6"),
        Some(view(&[0, 1, 2], Some(&[0, 3, 6])))
    );
    assert_eq!(
        parse_view("GUEST-CPU online=0-1 vcpus=0,6 forced=2 forced_vcpu=3"),
        Some(view(&[0, 1], Some(&[0, 6])))
    );
    assert_eq!(
        parse_view("GUEST-READY nproc=1 online=0 present=0 possible=0-7 vcpus=0 up=1.2"),
        Some(view(&[0], Some(&[0])))
    );
    assert_eq!(
        parse_view("GUEST-CPU online=0-1[vmm 12.7s INFO ] x"),
        Some(view(&[0, 1], None))
    );
    assert_eq!(parse_view("GUEST-ERROR cpu=1"), None);
}

#[test]
fn cpu_list_parsing() {
    assert_eq!(cpu_list("0-3,5"), set([0, 1, 2, 3, 5]));
    assert_eq!(cpu_list("0[vmm 12.7s INFO ] x"), set([0]));
    assert_eq!(cpu_list("0-2 forced=3"), set([0, 1, 2]));
    assert_eq!(cpu_list("0"), set([0]));
    assert_eq!(cpu_list(""), set([]));
}
