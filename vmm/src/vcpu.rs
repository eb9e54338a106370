//! vCPU threads.
//!
//! A [`Vcpu`] owns a KVM vCPU fd. Started, it moves into its own thread
//! (`run_vcpu`) and the caller keeps a [`VcpuHandle`]. The thread's
//! life is an explicit state machine:
//!
//! ```text
//!   Created --start--> Running --stop request seen--> Stopped (Vcpu returned)
//!                         |
//!                         +--guest power off / reset / failure--> Stopped
//! ```
//!
//! Stopping is "set the stop flag, then signal the thread" ([`kick`]): the
//! signal's handler runs on the vCPU thread and sets `immediate_exit` in
//! that thread's own `kvm_run`, so whether the thread is inside KVM_RUN
//! (the signal makes it return EINTR) or about to enter it
//! (`immediate_exit` makes it return at once), it sees the flag without a
//! lost wake-up, and no other thread ever writes its `kvm_run`. The caller
//! repeats the signal every [`kick::KICK_REPEAT`] until the thread ends or
//! the join bound passes. The vCPU fd itself is never closed (KVM cannot
//! destroy a vCPU): the joined thread hands the [`Vcpu`] back for reuse.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, CpuId, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::Killable;

use crate::boot::BootEntry;
use crate::bus::Bus;
use crate::events::{EventSender, VmEvent};
use crate::memory::GuestMemoryMmap;
use crate::x86::{msrs, regs};
use crate::VcpuId;

pub mod kick;

pub use kick::{stop_all, KICK_SIGNAL_OFFSET};

/// Errors of vCPU set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    Create(VcpuId, #[source] kvm_ioctls::Error),
    /// A KVM_SET_* call failed while configuring.
    #[error("cannot set {what} of vCPU {id}")]
    Configure {
        /// vCPU.
        id: VcpuId,
        /// Which state.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures failed.
    #[error("cannot prepare the boot vCPU")]
    Boot(#[source] regs::RegsError),
    /// Spawning the thread failed.
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(VcpuId, #[source] std::io::Error),
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread did not stop within the bound.
    #[error("vCPU {0} thread did not stop within {1:?}")]
    JoinTimeout(VcpuId, Duration),
    /// The thread ended without handing back its vCPU (it panicked outside the guarded loop).
    #[error("vCPU {0} thread was lost")]
    Lost(VcpuId),
}

/// A KVM vCPU, not running.
#[derive(Debug)]
pub struct Vcpu {
    id: VcpuId,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` (its APIC ID) in `vm`.
    pub fn create(vm: &VmFd, id: VcpuId) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        Ok(Self { id, fd })
    }

    /// The vCPU id (= APIC ID).
    pub fn id(&self) -> VcpuId {
        self.id
    }

    /// The KVM vCPU fd, for state inspection (tests, diagnostics).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn cfg<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Configure {
            id: self.id,
            what,
            source,
        })
    }

    /// Sets the state every vCPU needs: CPUID, MSRs, FPU, LAPIC LINT pins.
    pub fn configure(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.cfg("CPUID", self.fd.set_cpuid2(cpuid))?;
        self.cfg("MSRs", self.fd.set_msrs(&msrs::boot_msrs()).map(|_| ()))?;
        self.cfg("FPU", self.fd.set_fpu(&regs::boot_fpu()))?;
        let mut lapic = self.cfg("LAPIC", self.fd.get_lapic())?;
        regs::configure_lint(&mut lapic);
        self.cfg("LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Makes this the boot vCPU entering the kernel at `entry`.
    pub fn configure_boot(
        &self,
        mem: &GuestMemoryMmap,
        entry: &BootEntry,
    ) -> Result<(), VcpuError> {
        let sregs = self.cfg("special registers", self.fd.get_sregs())?;
        let sregs = regs::boot_sregs(mem, entry.mode, sregs).map_err(VcpuError::Boot)?;
        self.cfg("special registers", self.fd.set_sregs(&sregs))?;
        let r = regs::boot_regs(entry.mode, entry.entry, entry.boot_info);
        self.cfg("registers", self.fd.set_regs(&r))
    }

    /// Puts an application processor back into wait-for-SIPI, as a
    /// re-added vCPU must be: the guest's INIT-SIPI-SIPI starts it.
    pub fn wait_for_sipi(&self) -> Result<(), VcpuError> {
        let state = kvm_mp_state {
            mp_state: KVM_MP_STATE_UNINITIALIZED,
        };
        self.cfg("MP state", self.fd.set_mp_state(state))
    }

    /// Starts the vCPU's thread.
    pub fn start(self, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        kick::install_handler().map_err(VcpuError::Signal)?;
        let id = self.id;
        let control = Arc::new(Control {
            stop: Arc::new(AtomicBool::new(false)),
            dump: AtomicBool::new(false),
            state: AtomicU8::new(VcpuState::Created as u8),
            exits: AtomicU64::new(0),
            handling: AtomicU64::new(0),
            probe: AtomicU8::new(PROBE_IDLE),
            started: AtomicBool::new(false),
        });
        let (done_tx, done_rx) = mpsc::channel();
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // Before the first KVM_RUN.
                crate::seccomp::enter(crate::seccomp::ThreadClass::Vcpu);
                let _done = DoneGuard(done_tx);
                run_vcpu(self, &ctx, &thread_control)
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            control,
            thread,
            done: done_rx,
        })
    }
}

/// What a running vCPU needs from the VM.
#[derive(Clone, Debug)]
pub struct VcpuContext {
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report VM-level events.
    pub events: EventSender,
}

/// Observable state of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Spawned, not yet in KVM_RUN.
    Created = 0,
    /// In its run loop.
    Running = 1,
    /// Left its loop.
    Stopped = 2,
}

#[derive(Debug)]
struct Control {
    /// Shared with the registry of running threads ([`kick::stop_all`]).
    stop: Arc<AtomicBool>,
    /// Asks the thread to log its registers at its next exit.
    dump: AtomicBool,
    state: AtomicU8,
    /// Exits handled so far.
    exits: AtomicU64,
    /// The exit being handled outside KVM_RUN: 0 = none, else
    /// [`Handling::encode`].
    handling: AtomicU64,
    /// Whether the guest started this vCPU: asked ([`PROBE_ASKED`]) by the
    /// VMM thread, answered ([`PROBE_ANSWERED`]) by the vCPU thread from its
    /// own MP state, into `started`.
    probe: AtomicU8,
    /// The vCPU left wait-for-SIPI (valid once answered).
    started: AtomicBool,
}

const PROBE_IDLE: u8 = 0;
const PROBE_ASKED: u8 = 1;
const PROBE_ANSWERED: u8 = 2;

/// What a vCPU thread is doing outside KVM_RUN, packed into one atomic so
/// a diagnosis can read it without stopping the thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// A port-I/O read or write of this port.
    Pio(u16),
    /// An MMIO read or write of this address.
    Mmio(u64),
}

impl Handling {
    const PIO: u64 = 1 << 62;
    const MMIO: u64 = 2 << 62;
    const ADDR: u64 = (1 << 62) - 1;

    fn encode(self) -> u64 {
        match self {
            Self::Pio(port) => Self::PIO | u64::from(port),
            Self::Mmio(addr) => Self::MMIO | (addr & Self::ADDR),
        }
    }

    fn decode(v: u64) -> Option<Self> {
        match v & !Self::ADDR {
            Self::PIO => u16::try_from(v & Self::ADDR).ok().map(Self::Pio),
            Self::MMIO => Some(Self::Mmio(v & Self::ADDR)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Handling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pio(port) => write!(f, "port {port:#x}"),
            Self::Mmio(addr) => write!(f, "MMIO {addr:#x}"),
        }
    }
}

/// A vCPU thread's activity, readable while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// The thread's state.
    pub state: VcpuState,
    /// Exits handled so far.
    pub exits: u64,
    /// The device access being handled, if the thread is outside KVM_RUN in one.
    pub handling: Option<Handling>,
}

impl std::fmt::Display for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}, {} exits", self.state, self.exits)?;
        if let Some(h) = self.handling {
            write!(f, ", handling {h}")?;
        }
        Ok(())
    }
}

/// Sends on drop, so the handle learns the thread ended even on panic.
struct DoneGuard(Sender<()>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The caller's side of a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: VcpuId,
    control: Arc<Control>,
    thread: JoinHandle<Vcpu>,
    done: Receiver<()>,
}

impl VcpuHandle {
    /// The vCPU id.
    pub fn id(&self) -> VcpuId {
        self.id
    }

    /// The thread's state.
    pub fn state(&self) -> VcpuState {
        match self.control.state.load(Ordering::Acquire) {
            0 => VcpuState::Created,
            1 => VcpuState::Running,
            _ => VcpuState::Stopped,
        }
    }

    /// The thread's activity: state, exits handled, device access in progress.
    pub fn activity(&self) -> Activity {
        Activity {
            state: self.state(),
            exits: self.control.exits.load(Ordering::Relaxed),
            handling: Handling::decode(self.control.handling.load(Ordering::Relaxed)),
        }
    }

    /// Asks the thread to stop and kicks it out of KVM_RUN. Returns at once.
    pub fn request_stop(&self) {
        self.control.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Asks the thread to log the guest's registers, MP state and pending
    /// interrupts the next time it is out of KVM_RUN, and kicks it out.
    /// Diagnosis only: the guest runs on afterwards. A thread stuck outside
    /// KVM_RUN (in a device) logs nothing; [`Self::activity`] shows where.
    pub fn request_dump(&self) {
        self.control.dump.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether the guest started this vCPU (it left wait-for-SIPI), as its
    /// thread read its own MP state: `None` until the thread has answered
    /// (the first call asks and kicks it; call again shortly).
    pub fn probe_started(&self) -> Option<bool> {
        match self.control.probe.load(Ordering::Acquire) {
            PROBE_ANSWERED => {
                self.control.probe.store(PROBE_IDLE, Ordering::Release);
                Some(self.control.started.load(Ordering::Acquire))
            }
            _ => {
                self.control.probe.store(PROBE_ASKED, Ordering::Release);
                self.kick();
                None
            }
        }
    }

    /// Signals the thread; its handler sets `immediate_exit` in the
    /// thread's own `kvm_run` (see [`kick`]). Never writes `kvm_run` here.
    fn kick(&self) {
        if self.state() != VcpuState::Stopped {
            // The JoinHandle keeps the thread id valid until joined; a
            // thread that already ended answers ESRCH, which is fine.
            let _ = self.thread.kill(kick::kick_signal());
        }
    }

    /// Stops the thread and joins it within `timeout`, returning the vCPU
    /// for reuse. The kick is repeated every [`kick::KICK_REPEAT`] until
    /// the thread ends. On timeout the handle comes back with the error
    /// (the caller may try again); if the thread ended without its vCPU
    /// there is no handle left to return.
    pub fn stop(self, timeout: Duration) -> Result<Vcpu, (Option<Box<VcpuHandle>>, VcpuError)> {
        self.control.stop.store(true, Ordering::Release);
        let id = self.id;
        let deadline = Instant::now() + timeout;
        loop {
            self.kick();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(kick::KICK_REPEAT.min(left)) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if left.is_zero() => {
                    return Err((Some(Box::new(self)), VcpuError::JoinTimeout(id, timeout)));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        match self.thread.join() {
            Ok(vcpu) => Ok(vcpu),
            Err(_) => Err((None, VcpuError::Lost(id))),
        }
    }
}

/// What the loop does after one exit.
enum Next {
    Continue,
    Stop,
}

/// Runs `body` with this thread's `immediate_exit` published to the kick
/// signal's handler ([`kick::publish`]); unpublished when `body` returns
/// or unwinds, before the vCPU can leave the thread.
fn with_kick_target<R>(vcpu: &mut Vcpu, body: impl FnOnce(&mut Vcpu) -> R) -> R {
    let immediate_exit: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    // SAFETY: the byte is in the kvm_run mapping of `vcpu.fd`, which stays
    // mapped while `vcpu` lives; `vcpu` is borrowed for this whole call and
    // the guard is dropped at its end, on this thread.
    let _published = unsafe { kick::publish(immediate_exit) };
    body(vcpu)
}

/// The vCPU thread body: run until asked to stop or the VM ends. Returns
/// the vCPU for reuse (a panic while handling an exit is caught and reported).
fn run_vcpu(mut vcpu: Vcpu, ctx: &VcpuContext, control: &Control) -> Vcpu {
    // Registered (for `stop_all`) and published before the first stop
    // check: a kick sent from now on reaches KVM_RUN.
    let registration = kick::register(control.stop.clone());
    control
        .state
        .store(VcpuState::Running as u8, Ordering::Release);
    let id = vcpu.id;
    let outcome = with_kick_target(&mut vcpu, |vcpu| {
        catch_unwind(AssertUnwindSafe(|| {
            while !control.stop.load(Ordering::Acquire) {
                if let Next::Stop = run_once(vcpu, ctx, control) {
                    break;
                }
            }
        }))
    });
    if outcome.is_err() {
        ctx.events.send(VmEvent::Failed {
            vcpu: id.get(),
            reason: "vCPU thread panicked while handling an exit".into(),
        });
    }
    drop(registration);
    control
        .state
        .store(VcpuState::Stopped as u8, Ordering::Release);
    vcpu
}

/// Marks a device access in progress for [`VcpuHandle::activity`].
fn handling<R>(control: &Control, what: Handling, access: impl FnOnce() -> R) -> R {
    control.handling.store(what.encode(), Ordering::Relaxed);
    let r = access();
    control.handling.store(0, Ordering::Relaxed);
    r
}

/// One KVM_RUN and the handling of its exit.
fn run_once(vcpu: &mut Vcpu, ctx: &VcpuContext, control: &Control) -> Next {
    let id = vcpu.id;
    let fail = |reason: String| {
        ctx.events.send(VmEvent::Failed {
            vcpu: id.get(),
            reason,
        });
        Next::Stop
    };
    let result = vcpu.fd.run();
    control.exits.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, data) => {
                handling(control, Handling::Pio(port), || {
                    ctx.pio.read(u64::from(port), data)
                });
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => {
                handling(control, Handling::Pio(port), || {
                    ctx.pio.write(u64::from(port), data)
                });
                Next::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                handling(control, Handling::Mmio(addr), || ctx.mmio.read(addr, data));
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                handling(control, Handling::Mmio(addr), || ctx.mmio.write(addr, data));
                Next::Continue
            }
            VcpuExit::Hlt | VcpuExit::Intr => Next::Continue,
            VcpuExit::Shutdown => {
                log::info!(
                    "vCPU {id}: triple fault, the guest resets; {}",
                    describe_guest_state(&vcpu.fd)
                );
                ctx.events.send(VmEvent::Reset);
                Next::Stop
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    ctx.events.send(VmEvent::PowerOff);
                    Next::Stop
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    ctx.events.send(VmEvent::Reset);
                    Next::Stop
                }
                other => fail(format!("system event {other}")),
            },
            VcpuExit::FailEntry(reason, cpu) => fail(format!(
                "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
            )),
            VcpuExit::InternalError => {
                let r = vcpu.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                // the `internal` member of the union is the one KVM wrote.
                let suberror = unsafe { r.__bindgen_anon_1.internal.suberror };
                fail(format!(
                    "KVM internal error (suberror {suberror}, 1 = instruction emulation failure)"
                ))
            }
            other => {
                log::warn!("vCPU {id}: unexpected exit {other:?}");
                Next::Continue
            }
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // Kicked (the handler set it on this thread): clear it before
            // the stop check, so a kick after the check still counts.
            vcpu.fd.set_kvm_immediate_exit(0);
            if control.dump.swap(false, Ordering::AcqRel) {
                log::warn!("vCPU {id}: {}", describe_guest_state(&vcpu.fd));
            }
            if control.probe.load(Ordering::Acquire) == PROBE_ASKED {
                let started = vcpu
                    .fd
                    .get_mp_state()
                    .map_or(true, |m| m.mp_state != KVM_MP_STATE_UNINITIALIZED);
                control.started.store(started, Ordering::Release);
                control.probe.store(PROBE_ANSWERED, Ordering::Release);
            }
            Next::Continue
        }
        Err(e) => fail(format!("KVM_RUN failed: {e}")),
    }
}

/// The vectors set in one of the LAPIC's 256-bit registers (ISR, IRR),
/// eight 32-bit words 16 bytes apart from `base`.
fn lapic_vectors(regs: &[std::os::raw::c_char], base: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for word in 0..8 {
        let at = base + word * 16;
        let Some(bytes) = regs.get(at..at + 4) else {
            break;
        };
        let v = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        out.extend((0..32).filter(|b| v & (1 << b) != 0).map(|b| word * 32 + b));
    }
    out
}

/// One line of a stopped-in-place vCPU's state, for diagnosing a guest CPU
/// that stopped answering: where it is, whether it can take interrupts,
/// which are pending.
fn describe_guest_state(fd: &VcpuFd) -> String {
    let mut parts = Vec::new();
    match fd.get_regs() {
        Ok(r) => parts.push(format!(
            "rip={:#x} rsp={:#x} rflags={:#x} (IF={})",
            r.rip,
            r.rsp,
            r.rflags,
            (r.rflags >> 9) & 1
        )),
        Err(e) => parts.push(format!("registers: {e}")),
    }
    match fd.get_sregs() {
        Ok(s) => parts.push(format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.idt.base, s.idt.limit, s.gdt.base, s.gdt.limit
        )),
        Err(e) => parts.push(format!("special registers: {e}")),
    }
    match fd.get_mp_state() {
        Ok(m) => parts.push(format!("mp_state={}", m.mp_state)),
        Err(e) => parts.push(format!("MP state: {e}")),
    }
    match fd.get_vcpu_events() {
        Ok(ev) => parts.push(format!(
            "exception injected={} nr={} error code={:#x}, interrupt injected={} nr={} shadow={}, nmi pending={} masked={}",
            ev.exception.injected,
            ev.exception.nr,
            ev.exception.error_code,
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.interrupt.shadow,
            ev.nmi.pending,
            ev.nmi.masked
        )),
        Err(e) => parts.push(format!("events: {e}")),
    }
    match fd.get_lapic() {
        Ok(l) => parts.push(format!(
            "LAPIC TPR={:#x} ISR={:?} IRR={:?}",
            l.regs.get(0x80).map_or(0, |b| *b as u8),
            lapic_vectors(&l.regs, 0x100),
            lapic_vectors(&l.regs, 0x200)
        )),
        Err(e) => parts.push(format!("LAPIC: {e}")),
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handling_round_trips_through_its_atomic_encoding() {
        for h in [
            Handling::Pio(0),
            Handling::Pio(0x3f8),
            Handling::Pio(u16::MAX),
            Handling::Mmio(0xfed0_0000),
            Handling::Mmio(0),
        ] {
            assert_eq!(Handling::decode(h.encode()), Some(h));
        }
        assert_eq!(Handling::decode(0), None);
        assert_eq!(Handling::Pio(0x2f8).to_string(), "port 0x2f8");
    }

    #[test]
    fn lapic_vectors_reads_each_32_bit_word() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x200] = 1; // IRR vector 0
        regs[0x200 + 16] = 0b10; // vector 33
        regs[0x200 + 7 * 16 + 3] = 0x80_u8 as std::os::raw::c_char; // vector 255
        assert_eq!(lapic_vectors(&regs, 0x200), vec![0, 33, 255]);
        assert!(lapic_vectors(&regs, 0x100).is_empty());
    }

    /// Sends the kick signal to the calling thread; the handler has run
    /// when this returns (a signal to oneself is delivered before `raise`
    /// returns).
    fn kick_this_thread() {
        // SAFETY: raise(3) with the kick signal, whose handler is installed.
        let rc = unsafe { libc::raise(kick::kick_signal()) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_kick_between_the_stop_check_and_kvm_run_makes_kvm_run_return() {
        use vm_memory::{Bytes, GuestAddress};
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("no usable /dev/kvm: skipped");
            return;
        };
        kick::install_handler().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        crate::memory::register_with_kvm(&vm, &mem).unwrap();
        // cli; hlt; jmp hlt: inside KVM_RUN it never exits by itself.
        mem.write_slice(&[0xfa, 0xf4, 0xeb, 0xfd], GuestAddress(0x1000))
            .unwrap();
        let mut vcpu = Vcpu::create(&vm, VcpuId::new(0)).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        let mut r = vcpu.fd.get_regs().unwrap();
        r.rip = 0x1000;
        r.rflags = 2;
        vcpu.fd.set_regs(&r).unwrap();

        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let first = with_kick_target(&mut vcpu, |vcpu| {
                // The kick lands after the stop check, before KVM_RUN.
                kick_this_thread();
                vcpu.fd.run().map(|_| ()).map_err(|e| e.errno())
            });
            // Handed back: the kick no longer touches kvm_run.
            vcpu.fd.set_kvm_immediate_exit(0);
            kick_this_thread();
            let after = vcpu.fd.get_kvm_run().immediate_exit;
            let _ = tx.send((first, after));
        });
        let (first, after) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("KVM_RUN did not return: the kick was lost");
        assert_eq!(first, Err(libc::EINTR));
        assert_eq!(
            after, 0,
            "a kick wrote kvm_run after the vCPU left its thread"
        );
    }
}
