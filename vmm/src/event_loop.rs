//! The VMM thread: one epoll loop (event-manager) that reacts to vCPU and
//! device events, answers control requests from the API thread, and ends
//! when the guest powers off, resets or fails, or the VMM is signalled.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use vmm_sys_util::timerfd::TimerFd;

use crate::agent::AgentLink;
use crate::api_server::{self, ApiMetrics, ApiServerHandle, ServerOptions};
use crate::bus::lock;
use crate::config::VmConfig;
use crate::control::{self, ControlReceiver};
use crate::cpu_manager::CpuManager;
use crate::events::{EventReceiver, EventSender, VmEvent, DEFAULT_CAPACITY, EVENTS_PER_TURN};
use crate::hotplug::session::{AgentSession, Outlet};
use crate::hotplug::{Coordinator, GuestEvent, VmFacts};
use crate::vcpu::VcpuContext;
use crate::vm::{Vm, VmError};
use crate::VcpuId;

pub use crate::exit::ExitReason;

/// Errors of the VMM run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Building the VM failed.
    #[error("cannot build the VM")]
    Vm(#[from] VmError),
    /// Starting the boot vCPUs failed.
    #[error("cannot start the boot vCPUs")]
    Cpus(#[from] crate::cpu_manager::CpuError),
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// Creating an eventfd or the event queue failed.
    #[error("cannot create the VMM's event queue")]
    Io(#[from] std::io::Error),
    /// The control channel to the API could not be created.
    #[error("cannot create the control channel")]
    Control(#[from] control::ControlError),
    /// The API server could not start.
    #[error("cannot start the API server")]
    Api(#[from] api_server::ApiServerError),
    /// `--user`: the privileges could not be dropped.
    #[error("cannot drop privileges")]
    Privileges(#[from] crate::privileges::PrivilegeError),
}

/// The state the event loop works on.
pub struct Vmm {
    vm: Vm,
    hotplug: Coordinator<CpuManager>,
    events: EventReceiver,
    terminate: EventFd,
    control: ControlReceiver,
    api: Option<ApiServerHandle>,
    deadlines: TimerFd,
    exit: Option<ExitReason>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Builds the VM of `cfg`, starts the API server, drops privileges
    /// (`cfg.user`) and starts the boot vCPUs; the VM ends when
    /// `terminate` (`signals::TerminateSignal::eventfd`) becomes readable.
    pub fn start(cfg: &VmConfig, terminate: EventFd) -> Result<Self, RunError> {
        let (sender, events) = EventSender::new(DEFAULT_CAPACITY)?;
        let vm = Vm::create(cfg, &sender)?;
        let ctx = VcpuContext {
            pio: vm.devices.pio.clone(),
            mmio: vm.devices.mmio.clone(),
            events: sender,
        };
        let mut cpus = CpuManager::new(
            vm.fd.clone(),
            vm.supported_cpuid.clone(),
            cfg.cpus.max,
            ctx,
            vm.devices.hotplug.clone(),
            vm.devices.ged.clone(),
        );
        let (control_tx, control) = control::channel()?;
        let api = match &cfg.api_socket {
            Some(path) => {
                let options = ServerOptions {
                    test_hooks: cfg.test_hooks,
                    ..ServerOptions::default()
                };
                let metrics = Arc::new(ApiMetrics::default());
                let handle = api_server::start_with(path, control_tx, metrics, options)?;
                Some(handle)
            }
            None => None,
        };
        // Everything is open (/dev/kvm, the images, the API socket) and no
        // vCPU runs yet.
        if let Some(user) = cfg.user {
            crate::privileges::drop_to(user, cfg.api_socket.as_deref())?;
        }
        cpus.boot(cfg.cpus.boot, &vm.mem, &vm.boot_entry)?;
        let uart = vm.devices.agent_uart.clone();
        let outlet: Outlet = Box::new(move |b: &[u8]| lock(&uart).enqueue_input(b));
        let link = AgentLink::new().with_mailbox(vm.devices.agent_mailbox.clone());
        let mut hotplug = Coordinator::new(
            cpus,
            cfg.cpus.max,
            VmFacts {
                boot_vcpus: cfg.cpus.boot,
                memory_mib: cfg.memory >> 20,
            },
            AgentSession::new(link, outlet),
        )
        .with_timeouts(cfg.timeouts)
        .with_guest_ram(vm.mem.clone())
        .with_test_hooks(cfg.test_hooks);
        // Started now, with the other threads: lines of a workload, if the
        // guest runs one, go to stderr through it.
        hotplug
            .workload_mut()
            .output_mut()
            .start_writer(Box::new(|b: &[u8]| {
                std::io::Write::write_all(&mut std::io::stderr().lock(), b)
            }))?;
        log::info!(
            "VM started: {} of {} vCPUs, {} MiB",
            cfg.cpus.boot,
            cfg.cpus.max,
            cfg.memory >> 20
        );
        Ok(Self {
            vm,
            hotplug,
            events,
            terminate,
            control,
            api,
            deadlines: TimerFd::new().map_err(|e| RunError::Io(e.into()))?,
            exit: None,
        })
    }

    fn handle_event(&mut self, event: VmEvent) {
        match event {
            VmEvent::PowerOff => self.finish(ExitReason::PowerOff),
            VmEvent::Reset => self.finish(ExitReason::Reset),
            VmEvent::Failed { vcpu, reason } => {
                log::error!("vCPU {vcpu} failed: {reason}");
                self.finish(ExitReason::GuestFailed(format!("vCPU {vcpu}: {reason}")));
            }
            VmEvent::Ejected(id) => self.guest(GuestEvent::Ejected(VcpuId::new(id))),
            VmEvent::EjectRefused(id) => self.guest(GuestEvent::EjectRefused(VcpuId::new(id))),
            VmEvent::InsertAcked(id) => self.guest(GuestEvent::InsertAcked(VcpuId::new(id))),
            VmEvent::AgentLine(line) => self.guest(GuestEvent::AgentLine(line)),
        }
    }

    fn guest(&mut self, event: GuestEvent) {
        self.hotplug.on_event(event, Instant::now());
        if let Some(reason) = self.hotplug.agent_failure() {
            let reason = reason.to_owned();
            self.finish(ExitReason::AgentFailed(reason));
        }
    }

    fn handle_control(&mut self) {
        self.hotplug.set_events_dropped(self.events.dropped());
        let requests: Vec<_> = self.control.drain().collect();
        for request in requests {
            self.hotplug.handle(request, Instant::now());
        }
    }

    /// Runs the coordinator's deadlines and arms the timer for the next.
    fn arm_deadlines(&mut self) {
        let now = Instant::now();
        let next = self.hotplug.tick(now);
        let armed = match next {
            Some(at) => self.deadlines.reset(
                at.saturating_duration_since(now)
                    .max(std::time::Duration::from_millis(1)),
                None,
            ),
            None => self.deadlines.clear(),
        };
        if let Err(e) = armed {
            log::error!("cannot arm the hotplug deadline timer: {e}");
        }
    }

    fn finish(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            log::info!("VM ends: {reason:?}");
            self.exit = Some(reason);
        }
    }

    /// Runs the event loop until the VM ends; stops every vCPU.
    pub fn run(mut self) -> Result<ExitReason, RunError> {
        // A signal during start-up wins over whatever the guest did since.
        if self.terminate.read().is_ok() {
            self.finish(ExitReason::Signalled);
        }
        let vmm = Arc::new(Mutex::new(self));
        let mut manager: EventManager<Arc<Mutex<Vmm>>> =
            EventManager::new().map_err(RunError::EventLoop)?;
        manager.add_subscriber(vmm.clone());
        loop {
            let mut v = crate::bus::lock(&vmm);
            if let Some(reason) = v.exit.clone() {
                v.hotplug.stop();
                if let Some(api) = v.api.take() {
                    if let Err(e) = api.shutdown() {
                        log::warn!("API server shutdown: {e}");
                    }
                }
                let t = std::time::Instant::now();
                let stuck = v.hotplug.machine_mut().shutdown();
                if stuck.is_empty() {
                    log::debug!("all vCPU threads joined in {:?}", t.elapsed());
                } else {
                    log::warn!("vCPUs {stuck:?} did not stop in time");
                }
                v.vm.devices.flush_console();
                if !v.hotplug.workload_mut().output_mut().flush(WORKLOAD_FLUSH) {
                    log::warn!("the workload's last lines were not all written in time");
                }
                for (name, bus) in [("pio", &v.vm.devices.pio), ("mmio", &v.vm.devices.mmio)] {
                    log::debug!("{name} bus accesses: {:x?}", bus.stats());
                }
                return Ok(reason);
            }
            drop(v);
            manager.run().map_err(RunError::EventLoop)?;
        }
    }
}

/// How long the exit waits for the workload's last lines to reach stderr
/// (its reader may be a slow serial line, inside the emulated host).
const WORKLOAD_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

const TAG_EVENTS: u32 = 1;
const TAG_TERMINATE: u32 = 2;
const TAG_CONTROL: u32 = 3;
const TAG_DEADLINES: u32 = 4;

impl MutEventSubscriber for Vmm {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TAG_EVENTS => {
                // A bounded batch; the eventfd stays readable for the rest.
                for event in self.events.take_batch(EVENTS_PER_TURN) {
                    self.handle_event(event);
                }
            }
            TAG_TERMINATE => {
                let _ = self.terminate.read();
                self.finish(ExitReason::Signalled);
            }
            TAG_CONTROL => self.handle_control(),
            TAG_DEADLINES => {
                let _ = self.deadlines.wait();
            }
            _ => {}
        }
        self.arm_deadlines();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, tag) in [
            (self.events.wake_fd().as_raw_fd(), TAG_EVENTS),
            (self.terminate.as_raw_fd(), TAG_TERMINATE),
            (self.control.wake_fd().as_raw_fd(), TAG_CONTROL),
            (self.deadlines.as_raw_fd(), TAG_DEADLINES),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e:?}");
            }
        }
    }
}
