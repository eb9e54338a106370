//! The vCPU machinery on a real /dev/kvm with tiny real-mode guests:
//! create, run, exit dispatch, kick, bounded join, and reuse of a stopped
//! vCPU. Small code snippets run on any KVM, including PVM, so this runs
//! on every machine with /dev/kvm. The vCPU threads run under the vCPU
//! seccomp filter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::bus::Bus;
use vmm::devices::BusDevice;
use vmm::events::{EventReceiver, EventSender};
use vmm::memory::{create_guest_memory, register_with_kvm, GuestRam};
use vmm::vcpu::{Vcpu, VcpuContext, VcpuState};
use vmm::VcpuId;

/// Records every byte written to it, with the writer's value.
#[derive(Default)]
struct Recorder(Vec<u8>);

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0.extend_from_slice(data);
    }
}

/// Counts the writes to it.
#[derive(Default)]
struct Counter(Arc<AtomicU64>);

impl BusDevice for Counter {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

const PORT: u8 = 0x10;
const SPIN_PORT: u8 = 0x14;
const CODE: u64 = 0x1000;

/// Per vCPU `n`: `mov al, n; out PORT, al; in al, PORT; out PORT, al; hlt; jmp hlt`.
fn program(n: u8) -> Vec<u8> {
    vec![
        0xb0, n, 0xe6, PORT, 0xe4, PORT, 0xe6, PORT, 0xf4, 0xeb, 0xfd,
    ]
}

/// `out SPIN_PORT, al; jmp back`: a VM exit every two instructions.
fn spin_program() -> Vec<u8> {
    vec![0xe6, SPIN_PORT, 0xeb, 0xfc]
}

/// The tests of this file run one at a time: `stop_all` and the registry
/// count see every vCPU thread of the process.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fixture {
    _serial: std::sync::MutexGuard<'static, ()>,
    vm: VmFd,
    _mem: GuestRam,
    recorder: Arc<Mutex<Recorder>>,
    spins: Arc<AtomicU64>,
    ctx: VcpuContext,
    events: EventReceiver,
}

/// Every vCPU thread of these tests runs under the `vmm` binary's vCPU
/// filter, enforced: a system call outside its list ends this test
/// process with status 7 and a line naming it.
fn enforce_seccomp() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| vmm::seccomp::configure(Default::default()).unwrap());
}

fn fixture() -> Option<Fixture> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    enforce_seccomp();
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("E2E-SKIP: /dev/kvm unusable here ({e}); vCPU machinery not exercised");
            return None;
        }
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem = create_guest_memory(32 << 20).unwrap();
    register_with_kvm(&vm, &mem).unwrap();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(u64::from(PORT), 1, recorder.clone()).unwrap();
    let spins = Arc::new(AtomicU64::new(0));
    pio.insert(
        u64::from(SPIN_PORT),
        1,
        Arc::new(Mutex::new(Counter(spins.clone()))),
    )
    .unwrap();
    let (sender, events) = EventSender::new(64).unwrap();
    Some(Fixture {
        _serial: serial,
        vm,
        _mem: mem,
        recorder,
        spins,
        ctx: VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            events: sender,
        },
        events,
    })
}

fn load(f: &Fixture, vcpu: &Vcpu, n: u8) {
    load_code(f, vcpu, CODE + u64::from(n) * 0x100, &program(n));
}

fn load_code(f: &Fixture, vcpu: &Vcpu, code: u64, bytes: &[u8]) {
    f._mem.write_slice(bytes, GuestAddress(code)).unwrap();
    let fd = vcpu.fd();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = code;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .unwrap();
}

fn wait_for(pred: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn vcpus_run_dispatch_exits_stop_and_are_reused() {
    let Some(f) = fixture() else { return };
    let ids = [0u32, 1, 2];
    let mut handles = Vec::new();
    for &id in &ids {
        let vcpu = Vcpu::create(&f.vm, VcpuId::new(id)).unwrap();
        assert_eq!(vcpu.id(), VcpuId::new(id));
        load(&f, &vcpu, u8::try_from(id).unwrap() + 1);
        handles.push(vcpu.start(f.ctx.clone()).unwrap());
    }
    // Each vCPU writes n, reads 0x5a, writes it back: 2 bytes out per vCPU.
    assert!(
        wait_for(|| f.recorder.lock().unwrap().0.len() == 2 * ids.len()),
        "port writes seen: {:?}",
        f.recorder.lock().unwrap().0
    );
    let mut seen = f.recorder.lock().unwrap().0.clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3, 0x5a, 0x5a, 0x5a]);
    assert!(handles.iter().all(|h| h.state() == VcpuState::Running));

    // They now sit in HLT inside KVM: only the kick gets them out.
    let mut stopped = Vec::new();
    for h in handles {
        let t = Instant::now();
        let vcpu = h.stop(Duration::from_secs(5)).expect("bounded join");
        println!("vCPU {} stopped in {:?}", vcpu.id(), t.elapsed());
        stopped.push(vcpu);
    }
    assert!(f.events.try_next().is_none(), "no VM event expected");

    // Reuse the same fds (no KVM_CREATE_VCPU): they run again.
    f.recorder.lock().unwrap().0.clear();
    let mut handles = Vec::new();
    for vcpu in stopped {
        let n = u8::try_from(vcpu.id().get()).unwrap() + 10;
        load(&f, &vcpu, n);
        handles.push(vcpu.start(f.ctx.clone()).unwrap());
    }
    assert!(wait_for(|| f.recorder.lock().unwrap().0.len() == 6));
    for h in handles {
        h.stop(Duration::from_secs(5)).unwrap();
    }
    // Re-creating an existing id is refused by KVM: the reason fds are kept.
    assert!(Vcpu::create(&f.vm, VcpuId::new(1)).is_err());
}

#[test]
fn stop_before_the_first_run_is_not_lost() {
    let Some(f) = fixture() else { return };
    // Never made runnable: an AP waiting for SIPI blocks inside KVM_RUN.
    let vcpu = Vcpu::create(&f.vm, VcpuId::new(1)).unwrap();
    let handle = vcpu.start(f.ctx.clone()).unwrap();
    let vcpu = handle
        .stop(Duration::from_secs(5))
        .expect("kick reaches a vCPU waiting for SIPI");
    // And immediately after a start, many times over.
    let mut vcpu = vcpu;
    for _ in 0..50 {
        let h = vcpu.start(f.ctx.clone()).unwrap();
        vcpu = h.stop(Duration::from_secs(5)).expect("no lost kick");
    }
}

/// `cli; out SPIN_PORT, al; hlt; jmp hlt`: one exit, then the vCPU sleeps
/// in KVM_RUN with interrupts off; only a kick gets it out.
fn exit_then_halt_program() -> Vec<u8> {
    vec![0xfa, 0xe6, SPIN_PORT, 0xf4, 0xeb, 0xfd]
}

#[test]
fn a_kick_racing_the_entry_into_kvm_run_is_never_lost() {
    let Some(f) = fixture() else { return };
    let mut vcpu = Vcpu::create(&f.vm, VcpuId::new(2)).unwrap();
    let code = CODE + 0x800;
    let cycles = 300;
    let mut slowest = Duration::ZERO;
    for cycle in 0..cycles {
        load_code(&f, &vcpu, code, &exit_then_halt_program());
        let before = f.spins.load(Ordering::Relaxed);
        let h = vcpu.start(f.ctx.clone()).unwrap();
        // Kick at varying points: before the first KVM_RUN, and right
        // after the port exit, while the thread goes from its stop check
        // back into KVM_RUN (where the guest halts for good).
        match cycle % 3 {
            0 => {}
            1 => std::thread::sleep(Duration::from_micros(20 * (cycle % 11))),
            _ => assert!(
                wait_for(|| f.spins.load(Ordering::Relaxed) > before),
                "cycle {cycle}: the guest does not exit to the bus"
            ),
        }
        // One kick, never repeated: it must not be lost.
        let t = Instant::now();
        h.request_stop();
        assert!(
            wait_for(|| h.state() == VcpuState::Stopped),
            "cycle {cycle}: a single kick was lost ({})",
            h.activity()
        );
        slowest = slowest.max(t.elapsed());
        vcpu = h
            .stop(Duration::from_secs(5))
            .unwrap_or_else(|(_, e)| panic!("cycle {cycle}: {e}"));
        assert_eq!(vcpu.id(), VcpuId::new(2));
    }
    println!(
        "{cycles} start/kick/join cycles, {} guest exits, slowest stop after one kick {slowest:?}",
        f.spins.load(Ordering::Relaxed)
    );
    assert!(f.spins.load(Ordering::Relaxed) > 0, "the guest never ran");
    assert!(f.events.try_next().is_none(), "no VM event expected");
    assert_eq!(vmm::vcpu::kick::running_threads(), 0);
}

#[test]
fn stop_all_stops_threads_whose_handles_are_gone() {
    let Some(f) = fixture() else { return };
    let vcpu = Vcpu::create(&f.vm, VcpuId::new(3)).unwrap();
    load_code(&f, &vcpu, CODE + 0x900, &spin_program());
    let before = f.spins.load(Ordering::Relaxed);
    let handle = vcpu.start(f.ctx.clone()).unwrap();
    assert!(wait_for(|| f.spins.load(Ordering::Relaxed) > before));
    // A panicking VMM drops its handles (the threads detach) ...
    drop(handle);
    // ... and stops the threads through the registry.
    assert_eq!(vmm::vcpu::stop_all(Duration::from_secs(5)), 0);
    let after = f.spins.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        f.spins.load(Ordering::Relaxed),
        after,
        "the guest still runs"
    );
}
