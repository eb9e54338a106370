//! The VM's devices, wired: which model sits where on which bus, which
//! interrupt it raises, and where its actions go.
//!
//! The models (in `crate::devices`) do no I/O; the thin adapters here turn
//! their results into irqfd writes and events for the VMM thread.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::agent::{AgentSink, Mailbox};
use crate::bus::{Bus, BusError};
use crate::config::SerialOutput;
use crate::devices::cmos::Cmos;
use crate::devices::cpu_hotplug::{CpuHotplugController, HotplugAction, STATUS_OFFSET};
use crate::devices::ged::{Ged, EVENT_CPU_HOTPLUG};
use crate::devices::power::{AcpiPowerDevice, I8042Reset, PowerAction, PowerBus, PowerRegisters};
use crate::devices::serial::SerialDevice;
use crate::devices::BusDevice;
use crate::events::{EventSender, VmEvent};
use crate::layout;
use crate::vm::console::{Console, ConsoleSink, CONSOLE_BUFFER, FLUSH_BOUND};

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// Creating an eventfd failed.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("cannot route GSI {0} through an irqfd")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// Two devices overlap.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// The serial output file cannot be created.
    #[error("cannot open the serial output file")]
    SerialFile(#[source] std::io::Error),
    /// The console writer (stdout duplicate, thread) cannot be set up.
    #[error("cannot set up the console output")]
    Console(#[source] std::io::Error),
}

/// A power-register model on the bus; its actions become VM events.
fn power_device<D: PowerRegisters + Send + 'static>(
    model: D,
    events: &EventSender,
) -> Arc<Mutex<dyn BusDevice>> {
    let events = events.clone();
    Arc::new(Mutex::new(PowerBus::new(model, move |action| {
        events.send(match action {
            PowerAction::PowerOff => VmEvent::PowerOff,
            PowerAction::Reset => VmEvent::Reset,
        })
    })))
}

/// The CPU hotplug register block on the bus: ejects and insert
/// acknowledgements become VM events for the vCPU manager.
#[derive(Debug)]
pub struct HotplugAdapter {
    /// The register model; the vCPU manager drives it through this lock.
    pub controller: CpuHotplugController,
    events: EventSender,
    /// The model's ignored accesses plus refused ejects, published after
    /// every guest access, so the VMM thread reads them for the metrics
    /// without this adapter's lock: a guest hammering the registers takes
    /// it again on every exit, and a waiter on a std mutex can be passed
    /// over for a long time (GET /metrics waited up to 195 ms).
    ignored: Arc<AtomicU64>,
}

impl HotplugAdapter {
    /// The register block `controller`, its guest-driven events queued on
    /// `events`, as [`Devices::new`] places it (the fuzz targets build one
    /// without KVM).
    #[doc(hidden)]
    pub fn new(controller: CpuHotplugController, events: EventSender) -> Self {
        Self {
            controller,
            events,
            ignored: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The model's ignored accesses plus refused ejects, readable without
    /// the adapter's lock.
    pub fn ignored_accesses(&self) -> Arc<AtomicU64> {
        self.ignored.clone()
    }

    fn publish_ignored(&self) {
        let ignored = self.controller.ignored_accesses() + self.controller.rejected_ejects();
        self.ignored.store(ignored, Ordering::Relaxed);
    }
}

impl BusDevice for HotplugAdapter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.controller.read(offset, data);
        self.publish_ignored();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let selected = self.controller.selector();
        let was_inserting =
            offset == STATUS_OFFSET && self.controller.slot(selected).is_some_and(|s| s.inserting);
        match self.controller.write(offset, data) {
            Some(HotplugAction::Eject(id)) => self.events.send(VmEvent::Ejected(id)),
            Some(HotplugAction::EjectRefused(id)) => self.events.send(VmEvent::EjectRefused(id)),
            None => {}
        }
        if was_inserting && self.controller.slot(selected).is_some_and(|s| !s.inserting) {
            self.events.send(VmEvent::InsertAcked(selected));
        }
        self.publish_ignored();
    }
}

/// The Generic Event Device with its interrupt.
#[derive(Debug)]
pub struct GedAdapter {
    model: Ged,
    irq: EventFd,
    /// Interrupts that could not be raised.
    pub irq_errors: u64,
}

impl GedAdapter {
    /// A GED raising `irq`, as [`Devices::new`] places it (the fuzz
    /// targets build one without KVM).
    #[doc(hidden)]
    pub fn new(irq: EventFd) -> Self {
        Self {
            model: Ged::new(),
            irq,
            irq_errors: 0,
        }
    }

    /// Records a CPU hotplug event and raises the GED interrupt.
    pub fn notify_cpu_change(&mut self) {
        if self.model.notify(EVENT_CPU_HOTPLUG) && self.irq.write(1).is_err() {
            self.irq_errors += 1;
        }
    }

    /// The model (for its counters).
    pub fn model(&self) -> &Ged {
        &self.model
    }
}

impl BusDevice for GedAdapter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.model.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.model.write(offset, data);
    }
}

/// All devices, placed on their buses.
pub struct Devices {
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The CPU hotplug register block.
    pub hotplug: Arc<Mutex<HotplugAdapter>>,
    /// The GED.
    pub ged: Arc<Mutex<GedAdapter>>,
    /// The console UART (COM1).
    pub console: Arc<Mutex<SerialDevice<ConsoleSink>>>,
    /// COM1's output: a bounded buffer drained by the console writer thread.
    pub console_output: Console,
    /// The guest agent's UART (COM2).
    pub agent_uart: Arc<Mutex<SerialDevice<AgentSink>>>,
    /// The guest agent's mailbox (its doorbells ring on COM2).
    pub agent_mailbox: Option<Arc<Mailbox>>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

fn irq_eventfd(vm: &VmFd, gsi: u32) -> Result<EventFd, DevicesError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DevicesError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| DevicesError::Irqfd(gsi, e))?;
    Ok(evt)
}

/// The console's output: never written by a vCPU thread directly (a
/// stdout nobody reads would block it), but by the console writer thread.
fn console_output(serial: &SerialOutput) -> Result<(Console, ConsoleSink), DevicesError> {
    let out: Box<dyn std::io::Write + Send> = match serial {
        SerialOutput::Off => return Ok(Console::discard()),
        // A duplicate of fd 1: the writer does not take std's stdout lock.
        SerialOutput::Stdout => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(DevicesError::Console)?,
        )),
        SerialOutput::File(p) => Box::new(File::create(p).map_err(DevicesError::SerialFile)?),
    };
    Console::spawn(out, CONSOLE_BUFFER).map_err(DevicesError::Console)
}

impl Devices {
    /// Creates every device, routes its interrupt and places it on a bus.
    pub fn new(
        vm: &VmFd,
        max_vcpus: u32,
        serial: &SerialOutput,
        events: &EventSender,
        agent_mailbox: Option<Arc<Mailbox>>,
    ) -> Result<Self, DevicesError> {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let (console_output, console_sink) = console_output(serial)?;
        let console = Arc::new(Mutex::new(SerialDevice::new(
            irq_eventfd(vm, layout::COM1_GSI)?,
            console_sink,
        )));
        pio.insert(u64::from(layout::COM1_PORT), 8, console.clone())?;
        let agent_uart = Arc::new(Mutex::new(SerialDevice::new(
            irq_eventfd(vm, layout::COM2_GSI)?,
            AgentSink::new(events.clone(), agent_mailbox.clone()),
        )));
        pio.insert(u64::from(layout::COM2_PORT), 8, agent_uart.clone())?;

        pio.insert(
            u64::from(crate::devices::power::POWER_PORT_BASE),
            u64::from(crate::devices::power::POWER_PORT_LEN),
            power_device(AcpiPowerDevice::new(), events),
        )?;
        pio.insert(
            u64::from(layout::I8042_COMMAND_PORT),
            1,
            power_device(I8042Reset::new(), events),
        )?;
        pio.insert(0x70, 2, Arc::new(Mutex::new(Cmos::with_system_clock())))?;

        let hotplug = Arc::new(Mutex::new(HotplugAdapter {
            controller: CpuHotplugController::new(max_vcpus),
            events: events.clone(),
            ignored: Arc::new(AtomicU64::new(0)),
        }));
        mmio.insert(
            layout::CPU_HOTPLUG_MMIO_BASE,
            layout::CPU_HOTPLUG_MMIO_SIZE,
            hotplug.clone(),
        )?;

        let ged = Arc::new(Mutex::new(GedAdapter {
            model: Ged::new(),
            irq: irq_eventfd(vm, layout::GED_GSI)?,
            irq_errors: 0,
        }));
        mmio.insert(layout::GED_MMIO_BASE, layout::GED_MMIO_SIZE, ged.clone())?;

        Ok(Self {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            hotplug,
            ged,
            console,
            console_output,
            agent_uart,
            agent_mailbox,
        })
    }

    /// Writes out the console output still buffered, waiting at most
    /// [`FLUSH_BOUND`] (the output may be a stdout nobody reads). Returns
    /// whether everything was written.
    pub fn flush_console(&self) -> bool {
        let flushed = self.console_output.flush(FLUSH_BOUND);
        if !flushed {
            log::warn!(
                "console output not written within {FLUSH_BOUND:?} (nobody reading?); {} bytes dropped in all",
                self.console_output.dropped()
            );
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::cpu_hotplug::{CONTROL_EJECT, SELECTOR_OFFSET};
    use crate::events::DEFAULT_CAPACITY;

    #[test]
    fn ignored_accesses_are_published_for_readers_without_the_lock() {
        let (events, rx) = EventSender::new(DEFAULT_CAPACITY).unwrap();
        let mut adapter = HotplugAdapter {
            controller: CpuHotplugController::new(4),
            events,
            ignored: Arc::new(AtomicU64::new(0)),
        };
        adapter.controller.mark_present(0).unwrap();
        adapter.controller.mark_present(1).unwrap();
        let published = adapter.ignored_accesses();
        // A bad width, an eject of present vCPU 1 (no removal pending), a
        // selector out of range and a status read through it.
        adapter.write(SELECTOR_OFFSET, &[1]);
        adapter.write(SELECTOR_OFFSET, &1u32.to_le_bytes());
        adapter.write(STATUS_OFFSET, &[CONTROL_EJECT]);
        adapter.write(SELECTOR_OFFSET, &9u32.to_le_bytes());
        let mut status = [0];
        adapter.read(STATUS_OFFSET, &mut status);
        let counted = adapter.controller.ignored_accesses() + adapter.controller.rejected_ejects();
        assert_eq!(counted, 4);
        assert_eq!(published.load(Ordering::Relaxed), counted);
        assert_eq!(rx.try_next(), Some(VmEvent::EjectRefused(1)));
    }
}
