//! Unit tests of the agent's state machine (kept beside `agent.rs`):
//! a fake sysfs tree, a fake uevent source and real registry threads
//! folded onto this machine's first two CPUs. The fake "kernel" is the
//! test itself: it answers the agent's writes with list updates and
//! uevents.

use super::*;
use crate::sysfs::tests::FakeCpus;
use crate::topology::tests::FakeUevents;
use crate::workers::tests::{eventually, FoldPlacement};
use crate::workers::{worker_infos, KSOFTIRQD, RCUC, WATCHDOG};
use agent_proto::agent::{encode, Fault, WorkerInfo, MAX_LINE};
use smpboot::ThreadSnapshot;

struct Rig {
    fake: FakeCpus,
    events: FakeUevents,
    agent: Agent,
}

fn rig(tag: &str, possible: &str, present: &str, online: &str, cmdline: &str) -> Rig {
    rig_with(tag, possible, present, online, cmdline, |_| {})
}

/// A rig whose fake sysfs `edit` changes before the agent starts.
fn rig_with(
    tag: &str,
    possible: &str,
    present: &str,
    online: &str,
    cmdline: &str,
    edit: impl FnOnce(&FakeCpus),
) -> Rig {
    let fake = FakeCpus::new(tag, possible, present, online);
    edit(&fake);
    let events = FakeUevents::default();
    let topo = SysfsTopology::new(fake.sysfs(), Box::new(events.clone()), false).unwrap();
    let cfg = AgentConfig {
        placement: FoldPlacement::shared(),
        version: "9.9.9".into(),
        channel: true,
        mailbox: false,
        preface: vec!["GUEST-KMSG smpboot: Allowing 8 CPUs, 6 hotplug CPUs".into()],
    };
    let opts = Options::parse(&format!("agent.load=0 {cmdline}"));
    let agent = Agent::start(Arc::new(topo), opts, cfg).unwrap();
    Rig {
        fake,
        events,
        agent,
    }
}

/// A booted 2-of-8 guest with its start output consumed.
fn booted(tag: &str) -> Rig {
    let mut r = rig(tag, "0-7", "0-1", "0-1", "");
    r.agent.take_output();
    r
}

/// The report of cpuN as vCPU N (numbered as booted).
fn cpu_msg(cpu: u32, online: bool, requested: bool) -> GuestMessage {
    GuestMessage::Cpu {
        cpu,
        logical: Some(cpu),
        online,
        requested,
    }
}

/// A fault message without a delay.
fn fault(fault: Fault, cpu: Option<u32>) -> HostMessage {
    HostMessage::Fault {
        fault,
        cpu,
        ms: None,
    }
}

fn prepared(cpu: u32, ok: bool, reason: Option<&str>) -> GuestMessage {
    GuestMessage::Prepared {
        cpu,
        ok,
        reason: reason.map(str::to_owned),
    }
}

impl Rig {
    fn edit_list(&self, file: &str, cpu: u32, add: bool) {
        let mut list: CpuList = self.fake.get(file).parse().unwrap();
        if add {
            list.insert(cpu);
        } else {
            list.remove(cpu);
        }
        self.fake.set(file, &format!("{list}\n"));
    }

    /// ACPI hot-add of vCPU N as cpuN: the device appears offline and
    /// `add` is sent.
    fn hot_add(&self, cpu: u32) {
        self.hot_add_as(cpu, cpu);
    }

    /// ACPI hot-add of vCPU `id`, which Linux numbers `cpu{logical}`.
    fn hot_add_as(&self, logical: u32, id: u32) {
        self.fake.add_cpu(logical, id);
        self.fake.set(&format!("cpu{logical}/online"), "0\n");
        self.edit_list("present", logical, true);
        self.events.event("add", logical);
    }

    /// The kernel brought `cpu` up after the agent's write of 1.
    fn kernel_online(&self, cpu: u32) {
        assert_eq!(self.fake.get(&format!("cpu{cpu}/online")), "1");
        self.edit_list("online", cpu, true);
        self.events.event("online", cpu);
    }

    /// The kernel took `cpu` down after a write of 0.
    fn kernel_offline(&self, cpu: u32) {
        assert_eq!(self.fake.get(&format!("cpu{cpu}/online")), "0");
        self.edit_list("online", cpu, false);
        self.events.event("offline", cpu);
    }

    /// ACPI eject: the device goes away.
    fn kernel_remove(&self, cpu: u32) {
        std::fs::remove_dir_all(self.fake.0.join(format!("cpu{cpu}"))).unwrap();
        self.edit_list("present", cpu, false);
        self.events.event("remove", cpu);
    }

    fn handle(&mut self) -> Outbox {
        self.agent.on_uevents().unwrap();
        self.agent.take_output()
    }

    fn host(&mut self, msg: HostMessage) -> Outbox {
        assert_eq!(self.agent.on_host(msg), None);
        self.agent.take_output()
    }

    fn thread(&self, name: &str, cpu: u32) -> ThreadSnapshot {
        let snap = self.agent.registry().snapshot().unwrap();
        let d = snap
            .descriptors
            .iter()
            .find(|d| d.name_pattern.starts_with(name))
            .unwrap();
        d.threads.iter().find(|t| t.cpu == cpu).unwrap().clone()
    }

    fn infos_on(&self, cpu: u32) -> Vec<WorkerInfo> {
        let snap = self.agent.registry().snapshot().unwrap();
        worker_infos(&snap)
            .into_iter()
            .filter(|i| i.cpu == cpu)
            .collect()
    }

    fn state(&self, cpu: u32) -> CpuState {
        self.agent.registry().cpu_state(cpu).unwrap()
    }

    /// Hot-adds `cpu` and brings it all the way up.
    fn add_online(&mut self, cpu: u32) -> Outbox {
        self.hot_add(cpu);
        let out = self.handle();
        assert!(out.host.is_empty(), "{out:?}");
        self.kernel_online(cpu);
        self.handle()
    }

    /// Waits until every worker of `cpu` left its initial state (ran
    /// `setup` where it has one; ksoftirqd has none).
    fn wait_setup(&self, cpu: u32) {
        for name in [RCUC, WATCHDOG] {
            eventually("setup ran", || self.thread(name, cpu).calls.setup == 1);
        }
        eventually("ksoftirqd active", || {
            self.thread(KSOFTIRQD, cpu).status == smpboot::ThreadStatus::Active
        });
    }
}

#[test]
fn start_says_ready_and_registers_the_workers() {
    let mut r = rig("start", "0-7", "0-1", "0-1", "agent.bogus");
    let out = r.agent.take_output();
    assert_eq!(
        out.host,
        [GuestMessage::Ready {
            version: "9.9.9".into(),
            online: vec![0, 1],
            cpus: vec![(0, 0), (1, 1)],
        }]
    );
    assert_eq!(out.console.len(), 3, "{:?}", out.console);
    assert!(out.console[0].starts_with("GUEST-KMSG smpboot: Allowing 8 CPUs"));
    assert_eq!(out.console[1], "GUEST-ERROR unknown options agent.bogus");
    let ready = &out.console[2];
    assert!(
        ready.starts_with("GUEST-READY nproc=2 online=0-1 present=0-1 possible=0-7"),
        "{ready}"
    );
    assert!(ready.ends_with(" agent=1 mailbox=0 workers=3"), "{ready}");
    assert_eq!(r.agent.workers().descriptors().len(), 3);
    for cpu in [0, 1] {
        assert_eq!(r.infos_on(cpu).len(), 3);
        r.wait_setup(cpu);
    }
    assert!(r.infos_on(2).is_empty(), "no threads for absent CPUs");
}

#[test]
fn present_offline_cpus_are_onlined_at_start() {
    let mut r = rig("autoonline", "0-3", "0-2", "0-1", "");
    assert_eq!(r.fake.get("cpu2/online"), "1");
    assert_eq!(r.state(2), CpuState::Prepared);
    let out = r.agent.take_output();
    assert!(
        matches!(&out.host[..], [GuestMessage::Ready { online, .. }] if online == &[0, 1]),
        "not reported before its workers run: {out:?}"
    );
    r.kernel_online(2);
    assert_eq!(r.handle().host, [cpu_msg(2, true, true)]);
    assert_eq!(r.state(2), CpuState::Online);
}

#[test]
fn hot_add_prepares_onlines_then_unparks() {
    let mut r = booted("hotadd");
    r.hot_add(2);
    let out = r.handle();
    assert!(out.host.is_empty() && out.console.is_empty(), "{out:?}");
    assert_eq!(r.fake.get("cpu2/online"), "1", "onlined");
    assert_eq!(r.state(2), CpuState::Prepared);
    let infos = r.infos_on(2);
    assert_eq!(infos.len(), 3);
    assert!(infos.iter().all(|i| i.status == "parked"), "{infos:?}");
    r.kernel_online(2);
    let out = r.handle();
    assert_eq!(out.host, [cpu_msg(2, true, true)]);
    assert_eq!(out.console, ["GUEST-CPU online=0-2 vcpus=0-2"]);
    assert!(r.infos_on(2).iter().all(|i| i.status == "active"));
    r.wait_setup(2);
    // Work queued on CPU 2 is done there.
    let work = Arc::clone(r.agent.workers().workload());
    work.queue(2, 24);
    eventually("items on cpu2", || work.done(2) == 24);
    assert_eq!(work.misplaced(2), 0);
    assert_eq!(work.done(0) + work.done(1), 0);
    eventually("rcu on cpu2", || work.rcu_invoked(2) == 3);
    work.watchdog_tick();
    eventually("heartbeat on cpu2", || work.heartbeats(2) == 1);
    // Echoes change nothing.
    r.events.event("online", 2);
    r.events.event("add", 2);
    let out = r.handle();
    assert!(out.host.is_empty() && out.console.is_empty(), "{out:?}");
}

#[test]
fn prepare_remove_parks_then_offlines_and_a_re_add_reuses_the_threads() {
    let mut r = booted("remove");
    r.add_online(2);
    r.wait_setup(2);
    let serials: Vec<_> = [KSOFTIRQD, RCUC, WATCHDOG]
        .map(|n| r.thread(n, 2).serial)
        .into();
    let out = r.host(HostMessage::PrepareRemove { cpu: 2 });
    // The answer first: the VMM's next step waits on it alone.
    assert_eq!(
        out.host,
        [prepared(2, true, None), cpu_msg(2, false, true)],
        "{out:?}"
    );
    assert_eq!(out.console, ["GUEST-CPU online=0-1 vcpus=0-1"]);
    assert_eq!(r.fake.get("cpu2/online"), "0");
    assert_eq!(r.state(2), CpuState::Offline);
    // Parked synchronously: the park callbacks already ran.
    assert!(r.infos_on(2).iter().all(|i| i.status == "parked"));
    assert_eq!(r.thread(RCUC, 2).calls.park, 1);
    assert_eq!(r.thread(WATCHDOG, 2).calls.park, 1);
    let work = Arc::clone(r.agent.workers().workload());
    assert!(!work.watchdog_enabled(2));
    // The kernel's echo and the eject change nothing more.
    r.kernel_offline(2);
    r.kernel_remove(2);
    let out = r.handle();
    assert!(out.host.is_empty() && out.console.is_empty(), "{out:?}");
    // Re-add: the same threads, unparked, set up once.
    let out = r.add_online(2);
    assert_eq!(out.host, [cpu_msg(2, true, true)]);
    let again: Vec<_> = [KSOFTIRQD, RCUC, WATCHDOG]
        .map(|n| r.thread(n, 2).serial)
        .into();
    assert_eq!(serials, again);
    eventually("watchdog unparked", || {
        r.thread(WATCHDOG, 2).calls.unpark == 1
    });
    let wd = r.thread(WATCHDOG, 2).calls;
    assert_eq!((wd.setup, wd.park, wd.unpark), (1, 1, 1));
    assert_eq!(r.thread(RCUC, 2).calls.unpark, 0, "rcuc has no unpark");
    assert!(work.watchdog_enabled(2));
}

#[test]
fn a_failed_offline_write_rolls_back_with_the_errno() {
    let mut r = booted("rollback");
    r.add_online(2);
    r.wait_setup(2);
    // The write of 0 fails (ENOENT); reads fall back to the `online` list.
    let file = r.fake.0.join("cpu2/online");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/nonexistent/online", &file).unwrap();
    let out = r.host(HostMessage::PrepareRemove { cpu: 2 });
    assert_eq!(
        out.host,
        [prepared(
            2,
            false,
            Some("ENOENT: No such file or directory")
        )]
    );
    assert_eq!(
        out.console,
        ["GUEST-ERROR cpu=2 vcpu=2 offline: ENOENT: No such file or directory"]
    );
    assert_eq!(r.state(2), CpuState::Online, "CPU_DOWN_FAILED rollback");
    assert!(r.infos_on(2).iter().all(|i| i.status == "active"));
    eventually("unparked", || r.thread(WATCHDOG, 2).calls.unpark == 1);
    assert_eq!(r.thread(WATCHDOG, 2).calls.park, 1);
    assert!(r.agent.reported().contains(2));
}

#[test]
fn refuse_offline_fault_parks_rolls_back_once() {
    let mut r = booted("refuse");
    r.add_online(2);
    r.wait_setup(2);
    let fault = fault(Fault::RefuseOffline, Some(2));
    assert!(r.host(fault).host.is_empty());
    let out = r.host(HostMessage::PrepareRemove { cpu: 2 });
    assert_eq!(out.host, [prepared(2, false, Some(REFUSED_BY_FAULT))]);
    assert_eq!(r.fake.get("cpu2/online"), "1", "never written");
    assert_eq!(r.thread(WATCHDOG, 2).calls.park, 1, "parked first");
    assert_eq!(r.state(2), CpuState::Online);
    eventually("unparked", || r.thread(WATCHDOG, 2).calls.unpark == 1);
    // One-shot: the next one goes through.
    let out = r.host(HostMessage::PrepareRemove { cpu: 2 });
    assert_eq!(out.host, [prepared(2, true, None), cpu_msg(2, false, true)]);
}

#[test]
fn force_offline_fault_is_detected_as_forced() {
    let mut r = booted("force");
    r.add_online(2);
    r.wait_setup(2);
    let fault = fault(Fault::ForceOffline, Some(2));
    let out = r.host(fault);
    assert!(out.host.is_empty(), "reported from the uevent: {out:?}");
    assert_eq!(r.fake.get("cpu2/online"), "0", "written directly");
    assert_eq!(r.state(2), CpuState::Online, "the registry was bypassed");
    r.kernel_offline(2);
    let out = r.handle();
    assert_eq!(out.host, [cpu_msg(2, false, false)]);
    assert_eq!(
        out.console,
        ["GUEST-CPU online=0-1 vcpus=0-1 forced=2 forced_vcpu=2"]
    );
    assert_eq!(r.state(2), CpuState::Offline);
    let snap = r.agent.registry().snapshot().unwrap();
    assert_eq!(snap.forced_offlines, 1);
    assert!(r.infos_on(2).iter().all(|i| i.status == "parked"));
    // Asked to prepare now, it is down already: nothing to do.
    let out = r.host(HostMessage::PrepareRemove { cpu: 2 });
    assert_eq!(out.host, [prepared(2, true, None)]);
}

#[test]
fn stale_events_are_ignored() {
    let mut r = booted("stale");
    r.add_online(2);
    // An offline event while sysfs says online (an old one).
    r.events.event("offline", 2);
    r.events.event("remove", 1);
    // An online event for a CPU that is offline, and for an unknown one.
    r.events.event("online", 3);
    r.events.event("online", 4095);
    let out = r.handle();
    assert!(out.host.is_empty() && out.console.is_empty(), "{out:?}");
    assert_eq!(r.state(2), CpuState::Online);
}

#[test]
fn a_cpu_onlined_behind_the_agents_back_gets_workers() {
    let mut r = rig("admin-online", "0-3", "0-2", "0-1", "agent.autoonline=0");
    r.agent.take_output();
    assert_eq!(r.fake.get("cpu2/online"), "0", "autoonline off");
    r.fake.set("cpu2/online", "1\n");
    r.kernel_online(2);
    let out = r.handle();
    assert_eq!(out.host, [cpu_msg(2, true, false)]);
    assert_eq!(r.infos_on(2).len(), 3);
}

#[test]
fn silence_stops_every_message_but_not_the_workers() {
    let mut r = booted("silence");
    let out = r.host(fault(Fault::Silence, None));
    assert!(out.host.is_empty());
    assert_eq!(out.console, ["GUEST-AGENT silenced"]);
    assert!(r.agent.is_silenced());
    assert_eq!(r.agent.next_timeout(Instant::now()), None);
    r.agent.tick(Instant::now() + Duration::from_secs(60));
    assert!(r.host(HostMessage::Snapshot).host.is_empty());
    assert!(r
        .host(HostMessage::PrepareRemove { cpu: 1 })
        .host
        .is_empty());
    assert_eq!(r.state(1), CpuState::Online, "acts on nothing asked");
    // CPU events are still followed.
    let out = r.add_online(2);
    assert!(out.host.is_empty());
    assert_eq!(out.console, ["GUEST-CPU online=0-2 vcpus=0-2"]);
    r.wait_setup(2);
    let work = Arc::clone(r.agent.workers().workload());
    work.queue(2, 5);
    eventually("work goes on", || work.done(2) == 5);
}

#[test]
fn bad_host_input_is_dropped() {
    let mut r = booted("badinput");
    let lines: [&[u8]; 6] = [
        b"",
        b"not json",
        b"{\"v\":1,\"type\":\"snapshot\"}",
        b"{\"v\":2,\"type\":\"reboot\"}",
        b"{\"v\":2,\"type\":\"prepare_remove\",\"cpu\":-1}",
        b"\xff\xfe",
    ];
    for line in lines {
        assert_eq!(r.agent.on_host_line(Line::Complete(line.to_vec())), None);
    }
    assert_eq!(r.agent.on_host_line(Line::Oversized), None);
    let no_cpu = fault(Fault::ForceOffline, None);
    assert!(r.host(no_cpu).host.is_empty());
    assert_eq!(r.agent.dropped_lines(), 8);
    assert!(r.agent.take_output().host.is_empty());
    // Unknown CPUs get an answer, never a panic.
    let out = r.host(HostMessage::PrepareRemove { cpu: 4095 });
    let none = "no CPU is vCPU 4095 in the guest";
    assert_eq!(out.host, [prepared(4095, false, Some(none))]);
    let out = r.host(HostMessage::PrepareRemove { cpu: 5 });
    let none = "no CPU is vCPU 5 in the guest";
    assert_eq!(out.host, [prepared(5, false, Some(none))], "never added");
    let out = r.host(fault(Fault::ForceOffline, Some(9)));
    assert_eq!(
        out.console,
        ["GUEST-ERROR vcpu=9 force offline: no such CPU"],
        "{out:?}"
    );
    // A valid line after all that still works.
    let line = encode(&HostMessage::Poweroff);
    let exit = r
        .agent
        .on_host_line(Line::Complete(line.trim_end().as_bytes().to_vec()));
    assert_eq!(exit, Some(Exit::PowerOff("reason=host".into())));
}

#[test]
fn heartbeat_and_debounced_snapshots() {
    let mut r = booted("timers");
    r.wait_setup(0);
    r.wait_setup(1);
    let t0 = Instant::now();
    r.agent.tick(t0);
    let out = r.agent.take_output();
    assert!(
        matches!(&out.host[..], [GuestMessage::Workers { workers, .. }] if workers.len() == 6),
        "{out:?}"
    );
    assert!(r.agent.next_timeout(t0).unwrap() <= WORKERS_DEBOUNCE);
    // Nothing changed, nothing due.
    r.agent.tick(t0 + Duration::from_millis(600));
    assert!(r.agent.take_output().host.is_empty());
    // Idle for a heartbeat period: one heartbeat.
    r.agent.tick(t0 + Duration::from_millis(HEARTBEAT_MS + 100));
    assert_eq!(r.agent.take_output().host, [GuestMessage::Heartbeat]);
    // A change goes out at once when the last snapshot is old enough...
    r.hot_add(2);
    r.handle();
    let t2 = t0 + Duration::from_millis(HEARTBEAT_MS + 200);
    r.agent.tick(t2);
    let workers_of = |o: &Outbox| match &o.host[..] {
        [GuestMessage::Workers { workers, .. }] => workers.clone(),
        other => panic!("{other:?}"),
    };
    let w = workers_of(&r.agent.take_output());
    assert_eq!(w.iter().filter(|i| i.status == "parked").count(), 3);
    // ...and a second one waits out the debounce.
    r.kernel_online(2);
    assert_eq!(r.handle().host, [cpu_msg(2, true, true)]);
    r.agent.tick(t2 + Duration::from_millis(100));
    let out = r.agent.take_output();
    assert!(out.host.is_empty(), "debounced: {out:?}");
    let left = r.agent.next_timeout(t2 + Duration::from_millis(100));
    assert_eq!(left, Some(Duration::from_millis(400)));
    r.agent.tick(t2 + WORKERS_DEBOUNCE);
    let w = workers_of(&r.agent.take_output());
    assert!(w.iter().all(|i| i.status == "active"), "{w:?}");
    // Asked for, it comes at once even if unchanged.
    let out = r.host(HostMessage::Snapshot);
    assert!(matches!(&out.host[..], [GuestMessage::Workers { .. }]));
}

#[test]
fn a_full_snapshot_stays_small() {
    let mut r = rig("size", "0-7", "0-7", "0-7", "");
    r.agent.take_output();
    r.agent.on_host(HostMessage::Snapshot);
    let out = r.agent.take_output();
    let line = encode(&out.host[0]);
    assert!(line.len() < 1600, "{} bytes: {line}", line.len());
    // Worst case: every thread of 8 CPUs with large counters.
    let workers: Vec<WorkerInfo> = (0..8u32)
        .flat_map(|cpu| {
            [KSOFTIRQD, RCUC, WATCHDOG].map(|d| WorkerInfo {
                descriptor: d.into(),
                cpu,
                status: "parked".into(),
                last_cpu: Some(cpu),
                counts: [1, 99_999, 99_999, 9_999_999_999],
            })
        })
        .collect();
    let done = (0..8).map(|c| (c, 9_999_999_999)).collect();
    let msg = GuestMessage::Workers { workers, done };
    let line = encode(&msg);
    assert!(line.len() < 2100, "{} bytes", line.len());
    assert!(line.len() <= MAX_LINE);
    let back: GuestMessage = decode(line.trim_end().as_bytes()).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn reasons_name_the_errno() {
    let io = |errno| TopologyError::Io {
        path: "cpu2/online".into(),
        source: io::Error::from_raw_os_error(errno),
    };
    assert_eq!(reason(&io(libc::EBUSY)), "EBUSY: Device or resource busy");
    assert_eq!(reason(&io(libc::EROFS)), "EROFS: Read-only file system");
    assert!(reason(&io(libc::E2BIG)).starts_with("errno 7: "));
    assert_eq!(
        reason(&TopologyError::OfflineRefused(3)),
        "CPU 3 did not go down"
    );
}

#[path = "agent_ids_tests.rs"]
mod ids;

#[test]
fn every_cpu_event_goes_to_the_hook_with_its_vcpu_id() {
    use crate::hooks::HookEventKind as K;
    let mut r = booted("hookevents");
    let hook = |kind, cpu, vcpu| HookEvent {
        kind,
        cpu,
        vcpu: Some(vcpu),
    };
    // vCPU 6 arrives as cpu2.
    r.hot_add_as(2, 6);
    assert_eq!(r.handle().hooks, [hook(K::Add, 2, 6)]);
    r.kernel_online(2);
    assert_eq!(r.handle().hooks, [hook(K::Online, 2, 6)]);
    // The VMM's removal: the agent's own offline shows as the uevent.
    let out = r.host(HostMessage::PrepareRemove { cpu: 6 });
    assert!(out.hooks.is_empty(), "{out:?}");
    r.kernel_offline(2);
    assert_eq!(r.handle().hooks, [hook(K::Offline, 2, 6)]);
    // The id is still known when the device is gone.
    r.kernel_remove(2);
    assert_eq!(r.handle().hooks, [hook(K::Remove, 2, 6)]);
}
