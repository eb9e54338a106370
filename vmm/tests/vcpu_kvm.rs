//! The vCPU machinery on a real /dev/kvm with tiny real-mode guests:
//! create, run, exit dispatch, kick, bounded join, and reuse of a stopped
//! vCPU. Small code snippets run on any KVM, including PVM, so this runs
//! on every machine with /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::bus::Bus;
use vmm::devices::BusDevice;
use vmm::events::{EventSender, VmEvent};
use vmm::memory::{create_guest_memory, register_with_kvm, GuestRam};
use vmm::vcpu::{Vcpu, VcpuContext, VcpuState};

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

const PORT: u8 = 0x10;
const CODE: u64 = 0x1000;

/// Per vCPU `n`: `mov al, n; out PORT, al; in al, PORT; out PORT, al; hlt; jmp hlt`.
fn program(n: u8) -> Vec<u8> {
    vec![
        0xb0, n, 0xe6, PORT, 0xe4, PORT, 0xe6, PORT, 0xf4, 0xeb, 0xfd,
    ]
}

struct Fixture {
    vm: VmFd,
    _mem: GuestRam,
    recorder: Arc<Mutex<Recorder>>,
    ctx: VcpuContext,
    events: std::sync::mpsc::Receiver<VmEvent>,
}

fn fixture() -> Option<Fixture> {
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
    let (sender, events, _wake) = EventSender::new().unwrap();
    Some(Fixture {
        vm,
        _mem: mem,
        recorder,
        ctx: VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            events: sender,
        },
        events,
    })
}

fn load(f: &Fixture, vcpu: &Vcpu, n: u8) {
    let code = CODE + u64::from(n) * 0x100;
    f._mem.write_slice(&program(n), GuestAddress(code)).unwrap();
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
        let vcpu = Vcpu::create(&f.vm, id).unwrap();
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
    assert!(f.events.try_recv().is_err(), "no VM event expected");

    // Reuse the same fds (no KVM_CREATE_VCPU): they run again.
    f.recorder.lock().unwrap().0.clear();
    let mut handles = Vec::new();
    for vcpu in stopped {
        let n = u8::try_from(vcpu.id()).unwrap() + 10;
        load(&f, &vcpu, n);
        handles.push(vcpu.start(f.ctx.clone()).unwrap());
    }
    assert!(wait_for(|| f.recorder.lock().unwrap().0.len() == 6));
    for h in handles {
        h.stop(Duration::from_secs(5)).unwrap();
    }
    // Re-creating an existing id is refused by KVM: the reason fds are kept.
    assert!(Vcpu::create(&f.vm, 1).is_err());
}

#[test]
fn stop_before_the_first_run_is_not_lost() {
    let Some(f) = fixture() else { return };
    // Never made runnable: an AP waiting for SIPI blocks inside KVM_RUN.
    let vcpu = Vcpu::create(&f.vm, 1).unwrap();
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
