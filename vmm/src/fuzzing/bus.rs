//! Target `bus`: the port-I/O and MMIO buses with every device of the VM
//! placed as `vm::devices` places them (serial COM1 and COM2 with the
//! agent sink, ACPI power and reset, i8042 reset, CMOS/RTC, the CPU
//! hotplug register block, the GED), driven by a guest making arbitrary
//! accesses and by the VMM thread's hotplug calls, against models of what
//! each device may do.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{install_logger, Input};
use crate::agent::AgentSink;
use crate::bus::{lock, Bus, SharedDevice};
use crate::devices::cmos::Cmos;
use crate::devices::cpu_hotplug::{
    CpuHotplugController, CpuHotplugError, Removal, SELECTOR_OFFSET, STATUS_ENABLED,
    STATUS_INSERTING, STATUS_OFFSET, STATUS_REMOVING,
};
use crate::devices::ged::EVENT_CPU_HOTPLUG;
use crate::devices::power::{AcpiPowerDevice, I8042Reset, PowerAction, PowerBus, PowerRegisters};
use crate::devices::serial::SerialDevice;
use crate::events::{EventReceiver, EventSender, VmEvent, DEFAULT_CAPACITY};
use crate::layout;
use crate::vm::devices::{GedAdapter, HotplugAdapter};

/// The largest access a vCPU exit carries: a `rep ins`/`rep outs` fills
/// at most the one page of `kvm_run`'s I/O data.
pub const MAX_ACCESS: usize = 4096;

const CMOS_PORT: u64 = 0x70;

/// Where a device sits: (MMIO?, base, length).
const PLACES: [(bool, u64, u64); 7] = [
    (false, layout::COM1_PORT as u64, 8),
    (false, layout::COM2_PORT as u64, 8),
    (false, layout::ACPI_SLEEP_CONTROL_PORT as u64, 5),
    (false, layout::I8042_COMMAND_PORT as u64, 1),
    (false, CMOS_PORT, 2),
    (
        true,
        layout::CPU_HOTPLUG_MMIO_BASE,
        layout::CPU_HOTPLUG_MMIO_SIZE,
    ),
    (true, layout::GED_MMIO_BASE, layout::GED_MMIO_SIZE),
];

/// A power-register model on the bus, its actions queued as events (as
/// `vm::devices` does).
fn power_device<D: PowerRegisters + Send + 'static>(
    model: D,
    events: &EventSender,
) -> SharedDevice {
    let events = events.clone();
    Arc::new(Mutex::new(PowerBus::new(model, move |action| {
        events.send(match action {
            PowerAction::PowerOff => VmEvent::PowerOff,
            PowerAction::Reset => VmEvent::Reset,
        })
    })))
}

/// A number below `n`.
fn below_u32(input: &mut Input<'_>, n: u32) -> u32 {
    u32::try_from(input.below(n as usize)).unwrap_or(0)
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// What the VMM thread knows of the hotplug slots (what it asked for), and
/// what the guest did that it heard of.
#[derive(Debug, Default)]
struct Model {
    max: u32,
    /// Removals the owner started and has not completed or cancelled.
    marked: BTreeSet<u32>,
    /// vCPUs whose eject was reported and not yet completed.
    ejected: BTreeSet<u32>,
    /// Inserts not yet acknowledged (as reported).
    inserting: BTreeSet<u32>,
    selector: u32,
    ged_pending: u32,
    cmos_index: u8,
    nvram: Vec<u8>,
    /// One-byte writes to each UART's data register (an upper bound on
    /// what it can transmit).
    com1_writes: usize,
    com2_writes: usize,
    agent_lines: usize,
}

/// The devices, wired as the VM wires them (without KVM: the interrupts
/// are plain eventfds).
struct Machine {
    pio: Bus,
    mmio: Bus,
    hotplug: Arc<Mutex<HotplugAdapter>>,
    ged: Arc<Mutex<GedAdapter>>,
    console: Arc<Mutex<SerialDevice<Vec<u8>>>>,
    clock: Arc<AtomicU64>,
    rx: EventReceiver,
}

impl Machine {
    fn new(max: u32, boot: u32, now: u64) -> Self {
        let (events, rx) = EventSender::new(DEFAULT_CAPACITY).expect("event queue");
        let mut controller = CpuHotplugController::new(max);
        for id in 0..boot {
            controller.mark_present(id).expect("a boot vCPU");
        }
        let hotplug = Arc::new(Mutex::new(HotplugAdapter::new(controller, events.clone())));
        let ged = Arc::new(Mutex::new(GedAdapter::new(eventfd())));
        let console = Arc::new(Mutex::new(SerialDevice::new(eventfd(), Vec::new())));
        let agent = Arc::new(Mutex::new(SerialDevice::new(
            eventfd(),
            AgentSink::new(events.clone(), None),
        )));
        let clock = Arc::new(AtomicU64::new(now));
        let cmos = {
            let clock = Arc::clone(&clock);
            Cmos::new(Box::new(move || clock.load(Ordering::Relaxed)))
        };
        let devices: [SharedDevice; 7] = [
            console.clone(),
            agent,
            power_device(AcpiPowerDevice::new(), &events),
            power_device(I8042Reset::new(), &events),
            Arc::new(Mutex::new(cmos)),
            hotplug.clone(),
            ged.clone(),
        ];
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        for (&(is_mmio, base, len), device) in PLACES.iter().zip(devices) {
            let bus = if is_mmio { &mut mmio } else { &mut pio };
            bus.insert(base, len, device).expect("no overlap");
        }
        Self {
            pio,
            mmio,
            hotplug,
            ged,
            console,
            clock,
            rx,
        }
    }
}

/// An address: inside or just past a device, anywhere, or at the edges.
fn address(input: &mut Input<'_>) -> (bool, u64) {
    match input.below(10) {
        i @ 0..=6 => {
            let (mmio, base, len) = PLACES[i];
            let span = usize::try_from(len).unwrap_or(usize::MAX).saturating_add(8);
            (mmio, base + input.below(span) as u64)
        }
        7 => (input.bool(), input.u64()),
        8 => (input.bool(), u64::from(input.u16())),
        _ => (input.bool(), u64::MAX - input.below(2 * MAX_ACCESS) as u64),
    }
}

/// An access width: the usual ones, odd ones, up to [`MAX_ACCESS`].
fn width(input: &mut Input<'_>) -> usize {
    match input.below(8) {
        0 => 1,
        1 => 2,
        2 => 4,
        3 => 8,
        4 => 0,
        5 => 3,
        6 => input.below(MAX_ACCESS + 1),
        _ => MAX_ACCESS,
    }
}

/// Whether a device covers `[addr, addr + width)` on that bus.
fn covered(mmio: bool, addr: u64, width: usize) -> Option<(usize, u64)> {
    PLACES.iter().enumerate().find_map(|(i, &(m, base, len))| {
        let end = u128::from(addr) + width as u128;
        (m == mmio && addr >= base && end <= u128::from(base) + u128::from(len))
            .then(|| (i, addr - base))
    })
}

/// Target `bus`: see the module docs. Checked after every step: an access
/// reaches a device exactly when one covers it (else reads are all ones);
/// power off and reset only for their exact writes; the CMOS index stays
/// below 128 and its RAM reads back; the GED hands out exactly the events
/// raised; the hotplug block reads back its selector and each slot's
/// state, reports every acknowledged insert, never ejects vCPU 0 nor a
/// vCPU the VMM did not mark for removal (one eject per removal), and
/// every slot stays a consistent state; the UARTs transmit no more than
/// they were given.
pub fn bus(data: &[u8]) {
    install_logger();
    let mut input = Input::new(data);
    let max = 1 + below_u32(&mut input, 16);
    let boot = 1 + below_u32(&mut input, max);
    let vm = Machine::new(max, boot, input.u64());
    let mut model = Model {
        max,
        nvram: vec![0; 128],
        ..Model::default()
    };
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.below(4) {
            0 | 1 => access(&vm, &mut model, &mut input),
            2 => owner(&vm, &mut model, &mut input),
            _ => vm.clock.store(input.u64(), Ordering::Relaxed),
        }
        check_slots(&vm, &model);
    }
}

/// One guest access, checked against the models.
fn access(vm: &Machine, model: &mut Model, input: &mut Input<'_>) {
    let (mmio, addr) = address(input);
    let width = width(input);
    let write = input.bool();
    let bus = if mmio { &vm.mmio } else { &vm.pio };
    let hit = covered(mmio, addr, width);
    let mut data = vec![0u8; width];
    if write {
        // Small accesses byte by byte from the input, large ones a pattern.
        if width <= 8 {
            data.iter_mut().for_each(|b| *b = input.byte());
        } else {
            let (a, b) = (input.byte(), input.byte());
            data.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = if i.is_multiple_of(2) { a } else { b });
        }
        assert_eq!(
            bus.write(addr, &data),
            hit.is_some(),
            "write {addr:#x}+{width}"
        );
    } else {
        assert_eq!(
            bus.read(addr, &mut data),
            hit.is_some(),
            "read {addr:#x}+{width}"
        );
        if hit.is_none() {
            assert!(
                data.iter().all(|&b| b == 0xff),
                "an unhandled read gave data"
            );
        }
    }
    let power = match (hit, write) {
        (Some((i, offset)), true) => expect_write(model, i, offset, &data),
        (Some((i, offset)), false) => {
            check_read(vm, model, i, offset, &data);
            None
        }
        (None, _) => None,
    };
    drain(vm, model, power);
}

/// What a write should do to the models; the power action it must raise.
fn expect_write(model: &mut Model, device: usize, offset: u64, data: &[u8]) -> Option<VmEvent> {
    match (device, offset, data) {
        (0, 0, &[_]) => model.com1_writes += 1,
        (1, 0, &[_]) => model.com2_writes += 1,
        (2, 0, &[v]) if v & 0x20 != 0 && (v >> 2) & 7 == 5 => return Some(VmEvent::PowerOff),
        (2, 4, &[layout::ACPI_RESET_VALUE]) | (3, 0, &[0xfe]) => return Some(VmEvent::Reset),
        (4, 0, &[v]) => model.cmos_index = v & 0x7f,
        (4, 1, &[v]) => {
            let reg = model.cmos_index;
            if !(reg <= 0x0d || reg == 0x32) {
                model.nvram[usize::from(reg)] = v;
            }
        }
        (5, SELECTOR_OFFSET, &[a, b, c, d]) => model.selector = u32::from_le_bytes([a, b, c, d]),
        _ => {}
    }
    None
}

/// A read's data against the models.
fn check_read(vm: &Machine, model: &mut Model, device: usize, offset: u64, data: &[u8]) {
    match (device, offset, data) {
        (2, 0 | 1, &[v]) | (3, 0, &[v]) => assert_eq!(v, 0, "power register"),
        (2 | 3, _, _) => assert!(data.iter().all(|&b| b == 0xff), "power read {data:?}"),
        (4, 0, &[v]) => assert_eq!(v, model.cmos_index, "CMOS index"),
        (4, 1, &[v]) => {
            let reg = model.cmos_index;
            if !(reg <= 0x0d || reg == 0x32) {
                assert_eq!(v, model.nvram[usize::from(reg)], "CMOS RAM {reg:#x}");
            }
        }
        (4, _, _) => assert!(data.iter().all(|&b| b == 0xff), "a CMOS read of {data:?}"),
        (5, SELECTOR_OFFSET, &[a, b, c, d]) => {
            assert_eq!(u32::from_le_bytes([a, b, c, d]), model.selector, "selector");
        }
        (5, STATUS_OFFSET, &[v]) => {
            let slot = lock(&vm.hotplug).controller.slot(model.selector);
            let want = slot.map_or(0, |s| {
                [
                    (s.present, STATUS_ENABLED),
                    (s.inserting, STATUS_INSERTING),
                    (s.removing, STATUS_REMOVING),
                ]
                .iter()
                .filter(|(set, _)| *set)
                .fold(0, |acc, (_, bit)| acc | bit)
            });
            assert_eq!(v, want, "status of vCPU {}", model.selector);
        }
        (5, _, _) => assert!(data.iter().all(|&b| b == 0xff), "hotplug read {data:?}"),
        (6, 0, [_, _, _, _]) => {
            let got = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            assert_eq!(got, std::mem::take(&mut model.ged_pending), "GED events");
        }
        (6, _, _) => assert!(data.iter().all(|&b| b == 0xff), "GED read {data:?}"),
        _ => {}
    }
}

/// Takes every event the step caused and checks each.
fn drain(vm: &Machine, model: &mut Model, power: Option<VmEvent>) {
    let mut power_seen = None;
    for event in vm.rx.take_batch(usize::MAX) {
        match event {
            VmEvent::PowerOff | VmEvent::Reset => {
                assert!(power_seen.is_none(), "two power events from one write");
                power_seen = Some(event);
            }
            VmEvent::Ejected(id) => {
                assert_ne!(id, 0, "vCPU 0 ejected");
                assert!(model.marked.contains(&id), "vCPU {id} ejected unasked");
                assert!(model.ejected.insert(id), "vCPU {id} ejected twice");
                model.inserting.remove(&id);
            }
            VmEvent::EjectRefused(id) => {
                assert!(id != 0 && id < model.max, "eject refused for vCPU {id}");
                assert!(!model.marked.contains(&id));
            }
            VmEvent::InsertAcked(id) => {
                // An eject also ends an insert the guest never acknowledged.
                assert!(
                    model.inserting.remove(&id) || model.ejected.contains(&id),
                    "vCPU {id}: an ack of no insert"
                );
            }
            VmEvent::AgentLine(_) => model.agent_lines += 1,
            VmEvent::Failed { .. } => panic!("a device reported {event:?}"),
        }
    }
    assert_eq!(power_seen, power, "power events");
    assert!(
        model.agent_lines <= model.com2_writes,
        "agent lines out of nothing"
    );
    let console = lock(&vm.console).output_mut().len();
    assert!(
        console <= model.com1_writes,
        "the console sent {console} bytes"
    );
}

/// One call of the VMM thread on the hotplug block (or the GED).
fn owner(vm: &Machine, model: &mut Model, input: &mut Input<'_>) {
    let id = below_u32(input, model.max + 2);
    let mut notify = false;
    {
        let mut adapter = lock(&vm.hotplug);
        let c = &mut adapter.controller;
        match input.below(6) {
            0 => {
                if c.begin_insert(id).is_ok() {
                    model.inserting.insert(id);
                    notify = true;
                }
            }
            1 => match c.begin_remove(id) {
                Ok(()) => {
                    assert_ne!(id, 0);
                    model.marked.insert(id);
                    notify = true;
                }
                Err(CpuHotplugError::BootCpu) => assert_eq!(id, 0),
                Err(_) => {}
            },
            2 => {
                if c.complete_removal(id).is_ok() {
                    assert!(model.marked.remove(&id), "completed an unknown removal");
                    model.ejected.remove(&id);
                    model.inserting.remove(&id);
                }
            }
            3 => match c.cancel_removal(id) {
                Ok(()) => {
                    assert!(!model.ejected.contains(&id), "cancelled an ejected vCPU");
                    assert!(model.marked.remove(&id));
                }
                Err(CpuHotplugError::AlreadyEjected(_)) => {
                    assert!(model.ejected.contains(&id));
                }
                Err(_) => {}
            },
            4 => {
                if c.withdraw_insert(id) {
                    assert!(!model.marked.contains(&id));
                    assert!(model.inserting.remove(&id));
                }
            }
            _ => match c.unplug(id) {
                Ok(()) => {
                    assert_ne!(id, 0, "vCPU 0 unplugged");
                    model.marked.remove(&id);
                    model.ejected.remove(&id);
                    model.inserting.remove(&id);
                }
                Err(CpuHotplugError::BootCpu) => assert_eq!(id, 0),
                Err(_) => {}
            },
        }
    }
    // As the VMM thread: the block's lock released before the GED's.
    let raise_anyway = input.below(8) == 0;
    if notify || raise_anyway {
        lock(&vm.ged).notify_cpu_change();
        model.ged_pending |= EVENT_CPU_HOTPLUG;
    }
    drain(vm, model, None);
}

/// Every slot is a consistent state, and agrees with what the VMM asked
/// and heard.
fn check_slots(vm: &Machine, model: &Model) {
    let adapter = lock(&vm.hotplug);
    let c = &adapter.controller;
    assert_eq!(c.max_vcpus(), model.max);
    assert_eq!(c.selector(), model.selector);
    assert!(c.present_count() <= model.max);
    let zero = c.slot(0).expect("slot 0");
    assert!(
        zero.present && zero.removal == Removal::None,
        "vCPU 0: {zero:?}"
    );
    for id in 0..model.max {
        let s = c.slot(id).expect("a slot below max");
        match s.removal {
            Removal::None => assert!(!model.marked.contains(&id), "vCPU {id}: {s:?}"),
            Removal::Pending => {
                assert!(s.present, "vCPU {id}: {s:?}");
                assert!(model.marked.contains(&id) && !model.ejected.contains(&id));
            }
            Removal::Ejected => {
                assert!(
                    !s.present && !s.inserting && !s.removing,
                    "vCPU {id}: {s:?}"
                );
                assert!(model.ejected.contains(&id));
            }
        }
        if s.removing {
            assert_eq!(s.removal, Removal::Pending, "vCPU {id}: {s:?}");
        }
        if s.inserting {
            assert!(s.present, "vCPU {id}: {s:?}");
        }
        assert_eq!(
            s.inserting,
            model.inserting.contains(&id),
            "vCPU {id}: an insert acknowledged without a report, or the reverse ({s:?})"
        );
    }
    drop(adapter);
    let pending = lock(&vm.ged).model().pending();
    assert_eq!(pending, model.ged_pending, "GED pending events");
}
