//! The ACPI CPU hotplug register block, as a pure state machine.
//!
//! The guest's AML (see `acpi::cpu_aml`) drives this block through an
//! OperationRegion at `layout::CPU_HOTPLUG_MMIO_BASE`:
//!
//! | offset | width  | read                                   | write                     |
//! |--------|--------|----------------------------------------|---------------------------|
//! | 0      | 32-bit | selected vCPU                          | select a vCPU             |
//! | 4      | 8-bit  | bit0 enabled, bit1 inserting, bit2 removing | 1 in bit1 acks the insert, bit2 acks the removal, bit3 ejects |
//!
//! Anything else (another width, another offset, a status access while the
//! selector points past the last vCPU) is ignored and counted in
//! [`CpuHotplugController::ignored_accesses`]. Ignored reads return all ones
//! (like an empty bus), except the status register with an out-of-range
//! selector, which reads 0: "no such vCPU, not present".
//!
//! # Removal protocol
//! [`CpuHotplugController::begin_remove`] sets the *removing* bit (what the
//! guest's scan sees and acknowledges) and a separate *pending-removal*
//! state. The guest acknowledges the removal before it offlines the CPU and
//! calls `_EJ0`, so the eject is honoured against the pending-removal
//! state, never against the *removing* bit. An accepted eject clears the
//! *enabled* bit at once (Linux reads `_STA` right after `_EJ0` and warns if
//! the CPU is still there) and is reported as [`HotplugAction::Eject`]; the
//! owner stops the vCPU and then calls
//! [`CpuHotplugController::complete_removal`].
//!
//! # Locking
//! The controller has no lock of its own. Its owner (the vCPU manager)
//! wraps it in one mutex shared with the bus; with the hotplug bus adapter (`vm::devices`) the
//! action callback runs under that mutex, so it must only queue the action
//! (channel send, eventfd write), never lock the controller or wait for a
//! vCPU.

use log::{debug, info};
use thiserror::Error;

/// Offset of the 32-bit selector register.
pub const SELECTOR_OFFSET: u64 = 0;
/// Offset of the 8-bit status (read) / control (write) register.
pub const STATUS_OFFSET: u64 = 4;
/// Bytes of the block the AML's OperationRegion covers (QEMU's command and
/// data registers at offsets 5 and 8 are declared but not implemented).
pub const REGISTER_BLOCK_LEN: u64 = 12;
/// Status bit: the selected vCPU is present.
pub const STATUS_ENABLED: u8 = 1 << 0;
/// Status bit: the selected vCPU was hot-added and the guest has not
/// acknowledged it yet. Writing it acknowledges the insert.
pub const STATUS_INSERTING: u8 = 1 << 1;
/// Status bit: the VMM asked for the selected vCPU's removal and the guest
/// has not acknowledged it yet. Writing it acknowledges the removal.
pub const STATUS_REMOVING: u8 = 1 << 2;
/// Control bit (write only): eject the selected vCPU.
pub const CONTROL_EJECT: u8 = 1 << 3;

/// What the owner must do after a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugAction {
    /// The guest ejected this vCPU: stop its thread, keep its fd, then call
    /// [`CpuHotplugController::complete_removal`].
    Eject(u32),
    /// The guest tried to eject this present vCPU without a removal
    /// pending (refused; the owner decides whether the guest dropped it).
    EjectRefused(u32),
}

/// Where a vCPU is in the removal protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Removal {
    /// No removal requested.
    #[default]
    None,
    /// The VMM asked for the removal; the guest has not ejected yet.
    Pending,
    /// The guest ejected the vCPU; the VMM has not completed the removal.
    Ejected,
}

/// The hotplug state of one vCPU slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// The guest sees the vCPU (`_STA` = 0xF).
    pub present: bool,
    /// Insert event not yet acknowledged by the guest.
    pub inserting: bool,
    /// Removal event not yet acknowledged by the guest.
    pub removing: bool,
    /// Removal progress, independent of the guest's acknowledgement.
    pub removal: Removal,
}

/// Errors of the owner-side API.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum CpuHotplugError {
    /// The id is not below the maximum vCPU count.
    #[error("vCPU {0} is beyond the maximum")]
    OutOfRange(u32),
    /// Adding a vCPU that is already there.
    #[error("vCPU {0} is already present")]
    AlreadyPresent(u32),
    /// Removing a vCPU that is not there.
    #[error("vCPU {0} is not present")]
    NotPresent(u32),
    /// vCPU 0 is never removed.
    #[error("vCPU 0 cannot be removed")]
    BootCpu,
    /// A removal of this vCPU is already under way.
    #[error("vCPU {0} has a removal in progress")]
    RemovalInProgress(u32),
    /// Completing or cancelling a removal nobody started.
    #[error("vCPU {0} has no removal in progress")]
    NoRemoval(u32),
    /// Cancelling a removal the guest already carried out.
    #[error("vCPU {0} was already ejected by the guest")]
    AlreadyEjected(u32),
}

/// The CPU hotplug register block and the per-vCPU hotplug state.
#[derive(Debug, Clone)]
pub struct CpuHotplugController {
    slots: Vec<SlotState>,
    selector: u32,
    ignored_accesses: u64,
    rejected_ejects: u64,
}

impl CpuHotplugController {
    /// A block for vCPU ids `0..max_vcpus`, none present.
    pub fn new(max_vcpus: u32) -> Self {
        Self {
            slots: vec![SlotState::default(); max_vcpus as usize],
            selector: 0,
            ignored_accesses: 0,
            rejected_ejects: 0,
        }
    }

    /// The number of vCPU slots.
    pub fn max_vcpus(&self) -> u32 {
        // `new` built the slots from a u32.
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// The state of vCPU `id`, if it exists.
    pub fn slot(&self, id: u32) -> Option<SlotState> {
        self.slots.get(id as usize).copied()
    }

    /// Whether the guest sees vCPU `id` as present.
    pub fn is_present(&self, id: u32) -> bool {
        self.slot(id).is_some_and(|s| s.present)
    }

    /// Whether vCPU `id` has a removal the VMM has not completed.
    pub fn is_removal_pending(&self, id: u32) -> bool {
        self.slot(id).is_some_and(|s| s.removal != Removal::None)
    }

    /// How many vCPUs the guest sees as present.
    pub fn present_count(&self) -> u32 {
        let n = self.slots.iter().filter(|s| s.present).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether any insert or removal event waits for the guest's scan.
    pub fn has_pending_events(&self) -> bool {
        self.slots.iter().any(|s| s.inserting || s.removing)
    }

    /// The value of the selector register.
    pub fn selector(&self) -> u32 {
        self.selector
    }

    /// Guest accesses ignored (bad width, offset or selector).
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    /// Guest eject writes refused (vCPU 0, or no removal pending).
    pub fn rejected_ejects(&self) -> u64 {
        self.rejected_ejects
    }

    fn slot_mut(&mut self, id: u32) -> Result<&mut SlotState, CpuHotplugError> {
        self.slots
            .get_mut(id as usize)
            .ok_or(CpuHotplugError::OutOfRange(id))
    }

    /// Makes absent vCPU `id` present, flagging the insertion for the
    /// guest's scan when `announce` is set.
    fn plug(&mut self, id: u32, announce: bool) -> Result<(), CpuHotplugError> {
        let slot = self.slot_mut(id)?;
        if slot.removal != Removal::None {
            return Err(CpuHotplugError::RemovalInProgress(id));
        }
        if slot.present {
            return Err(CpuHotplugError::AlreadyPresent(id));
        }
        slot.present = true;
        slot.inserting = announce;
        Ok(())
    }

    /// Marks a boot vCPU present, without an event for the guest.
    pub fn mark_present(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        self.plug(id, false)
    }

    /// Hot-adds vCPU `id`: present and inserting. The owner then raises the
    /// GED's CPU-hotplug event.
    pub fn begin_insert(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        self.plug(id, true)
    }

    /// Asks the guest to remove vCPU `id`: removing, and pending removal
    /// until [`Self::complete_removal`] or [`Self::cancel_removal`]. The
    /// owner then raises the GED's CPU-hotplug event.
    pub fn begin_remove(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        if id == 0 {
            return Err(CpuHotplugError::BootCpu);
        }
        let slot = self.slot_mut(id)?;
        if slot.removal != Removal::None {
            return Err(CpuHotplugError::RemovalInProgress(id));
        }
        if !slot.present {
            return Err(CpuHotplugError::NotPresent(id));
        }
        slot.removing = true;
        slot.removal = Removal::Pending;
        Ok(())
    }

    /// The VMM retired vCPU `id`: the slot is empty again and may be re-added.
    pub fn complete_removal(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        let slot = self.slot_mut(id)?;
        if slot.removal == Removal::None {
            return Err(CpuHotplugError::NoRemoval(id));
        }
        *slot = SlotState::default();
        Ok(())
    }

    /// The VMM gave up on removing vCPU `id` (the guest did not eject it):
    /// it stays present. Refused once the guest has ejected it.
    pub fn cancel_removal(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        let slot = self.slot_mut(id)?;
        match slot.removal {
            Removal::None => Err(CpuHotplugError::NoRemoval(id)),
            Removal::Ejected => Err(CpuHotplugError::AlreadyEjected(id)),
            Removal::Pending => {
                slot.removing = false;
                slot.removal = Removal::None;
                Ok(())
            }
        }
    }

    /// Takes back the insertion of `id` if the guest has not acknowledged
    /// it yet (the slot is empty again); returns whether it did.
    pub fn withdraw_insert(&mut self, id: u32) -> bool {
        match self.slot_mut(id) {
            Ok(slot) if slot.inserting && slot.removal == Removal::None => {
                *slot = SlotState::default();
                true
            }
            _ => false,
        }
    }

    /// Empties the slot of `id`, whatever it held (its vCPU thread was
    /// stopped). The boot vCPU is never unplugged.
    pub fn unplug(&mut self, id: u32) -> Result<(), CpuHotplugError> {
        if id == 0 {
            return Err(CpuHotplugError::BootCpu);
        }
        *self.slot_mut(id)? = SlotState::default();
        Ok(())
    }

    fn ignore(&mut self, what: &str, offset: u64, len: usize) {
        self.ignored_accesses += 1;
        debug!("cpu hotplug: ignored {what} of {len} bytes at offset {offset:#x}");
    }

    fn status_byte(slot: SlotState) -> u8 {
        let mut status = 0;
        if slot.present {
            status |= STATUS_ENABLED;
        }
        if slot.inserting {
            status |= STATUS_INSERTING;
        }
        if slot.removing {
            status |= STATUS_REMOVING;
        }
        status
    }

    /// The guest reads `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 4) => data.copy_from_slice(&self.selector.to_le_bytes()),
            (STATUS_OFFSET, 1) => match self.slot(self.selector) {
                Some(slot) => data[0] = Self::status_byte(slot),
                None => {
                    data[0] = 0;
                    self.ignore("status read (bad selector)", offset, 1);
                }
            },
            _ => {
                data.fill(0xff);
                self.ignore("read", offset, data.len());
            }
        }
    }

    /// The guest writes `data` at `offset`; returns what the owner must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<HotplugAction> {
        match (offset, data) {
            (SELECTOR_OFFSET, &[a, b, c, d]) => {
                self.selector = u32::from_le_bytes([a, b, c, d]);
                if self.slot(self.selector).is_none() {
                    self.ignore("selector write (out of range)", offset, 4);
                }
                None
            }
            (STATUS_OFFSET, &[value]) => self.write_control(value),
            _ => {
                self.ignore("write", offset, data.len());
                None
            }
        }
    }

    fn write_control(&mut self, value: u8) -> Option<HotplugAction> {
        let id = self.selector;
        let Some(slot) = self.slots.get_mut(id as usize) else {
            self.ignore("control write (bad selector)", STATUS_OFFSET, 1);
            return None;
        };
        if value & STATUS_INSERTING != 0 {
            slot.inserting = false;
        }
        if value & STATUS_REMOVING != 0 {
            slot.removing = false;
        }
        if value & CONTROL_EJECT == 0 {
            return None;
        }
        if id == 0 || slot.removal != Removal::Pending {
            self.rejected_ejects += 1;
            debug!(
                "cpu hotplug: guest ejected vCPU {id} (removal state {:?}): refused",
                slot.removal
            );
            let refused = id != 0 && slot.present && slot.removal == Removal::None;
            return refused.then_some(HotplugAction::EjectRefused(id));
        }
        slot.present = false;
        slot.inserting = false;
        slot.removing = false;
        slot.removal = Removal::Ejected;
        info!("cpu hotplug: guest ejected vCPU {id}");
        Some(HotplugAction::Eject(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(c: &mut CpuHotplugController, id: u32) {
        assert_eq!(c.write(SELECTOR_OFFSET, &id.to_le_bytes()), None);
    }

    fn status(c: &mut CpuHotplugController) -> u8 {
        let mut b = [0xaa];
        c.read(STATUS_OFFSET, &mut b);
        b[0]
    }

    fn control(c: &mut CpuHotplugController, v: u8) -> Option<HotplugAction> {
        c.write(STATUS_OFFSET, &[v])
    }

    /// Boot vCPUs 0..boot present, max slots.
    fn booted(boot: u32, max: u32) -> CpuHotplugController {
        let mut c = CpuHotplugController::new(max);
        for id in 0..boot {
            c.mark_present(id).unwrap();
        }
        c
    }

    /// What the AML's CSCN does: returns (id, notify code) per event.
    fn guest_scan(c: &mut CpuHotplugController) -> Vec<(u32, u8)> {
        let mut notes = Vec::new();
        for id in 0..c.max_vcpus() {
            select(c, id);
            let s = status(c);
            if s & STATUS_INSERTING != 0 {
                notes.push((id, 1));
                assert_eq!(control(c, STATUS_INSERTING), None);
            }
            if s & STATUS_REMOVING != 0 {
                notes.push((id, 3));
                assert_eq!(control(c, STATUS_REMOVING), None);
            }
        }
        notes
    }

    /// What the AML's CSTA does.
    fn guest_sta(c: &mut CpuHotplugController, id: u32) -> u8 {
        select(c, id);
        if status(c) & STATUS_ENABLED != 0 {
            0xf
        } else {
            0
        }
    }

    /// What the AML's CEJ0 does.
    fn guest_ej0(c: &mut CpuHotplugController, id: u32) -> Option<HotplugAction> {
        select(c, id);
        control(c, CONTROL_EJECT)
    }

    #[test]
    fn selector_reads_back_all_32_bits() {
        let mut c = CpuHotplugController::new(4);
        for v in [0u32, 3, 0x1234_5678, u32::MAX] {
            c.write(SELECTOR_OFFSET, &v.to_le_bytes());
            let mut d = [0u8; 4];
            c.read(SELECTOR_OFFSET, &mut d);
            assert_eq!(u32::from_le_bytes(d), v);
            assert_eq!(c.selector(), v);
        }
        // Three of the four values were out of range.
        assert_eq!(c.ignored_accesses(), 2);
    }

    #[test]
    fn status_bits_follow_the_slot_state() {
        let mut c = booted(1, 4);
        select(&mut c, 0);
        assert_eq!(status(&mut c), STATUS_ENABLED);
        select(&mut c, 1);
        assert_eq!(status(&mut c), 0);
        c.begin_insert(1).unwrap();
        assert_eq!(status(&mut c), STATUS_ENABLED | STATUS_INSERTING);
        control(&mut c, STATUS_INSERTING);
        assert_eq!(status(&mut c), STATUS_ENABLED);
        c.begin_remove(1).unwrap();
        assert_eq!(status(&mut c), STATUS_ENABLED | STATUS_REMOVING);
        control(&mut c, STATUS_REMOVING);
        assert_eq!(status(&mut c), STATUS_ENABLED);
        assert_eq!(c.ignored_accesses(), 0);
    }

    #[test]
    fn each_control_bit_does_only_its_job() {
        let mut c = booted(2, 4);
        c.begin_insert(2).unwrap();
        c.begin_remove(1).unwrap();
        // Bit 0 and bits 4..7 are read-only / reserved: no effect.
        for v in [0x01u8, 0x10, 0x20, 0x40, 0x80, 0xf1] {
            for id in [1, 2] {
                select(&mut c, id);
                let before = status(&mut c);
                assert_eq!(control(&mut c, v), None);
                assert_eq!(status(&mut c), before, "value {v:#x} vCPU {id}");
            }
        }
        // Ack-insert touches only inserting; ack-remove only removing.
        select(&mut c, 1);
        control(&mut c, STATUS_INSERTING);
        assert_eq!(status(&mut c), STATUS_ENABLED | STATUS_REMOVING);
        select(&mut c, 2);
        control(&mut c, STATUS_REMOVING);
        assert_eq!(status(&mut c), STATUS_ENABLED | STATUS_INSERTING);
        // Acks on a slot without the event are harmless.
        select(&mut c, 0);
        control(&mut c, STATUS_INSERTING | STATUS_REMOVING);
        assert_eq!(status(&mut c), STATUS_ENABLED);
    }

    #[test]
    fn acks_are_per_selected_vcpu() {
        let mut c = booted(1, 4);
        c.begin_insert(1).unwrap();
        c.begin_insert(2).unwrap();
        select(&mut c, 1);
        control(&mut c, STATUS_INSERTING);
        assert!(!c.slot(1).unwrap().inserting);
        assert!(c.slot(2).unwrap().inserting);
    }

    #[test]
    fn wrong_widths_and_offsets_are_ignored_and_counted() {
        let mut c = booted(1, 2);
        c.begin_insert(1).unwrap();
        select(&mut c, 1);
        let snapshot = c.slot(1);
        let mut expected = 0;
        for offset in 0..16u64 {
            for len in [1usize, 2, 4, 8] {
                let valid =
                    (offset, len) == (SELECTOR_OFFSET, 4) || (offset, len) == (STATUS_OFFSET, 1);
                if valid {
                    continue;
                }
                let mut d = vec![0u8; len];
                c.read(offset, &mut d);
                assert!(d.iter().all(|&b| b == 0xff), "read {offset}/{len}");
                expected += 1;
                // Writes of all ones would ack and eject if they were honoured.
                assert_eq!(c.write(offset, &vec![0xff; len]), None);
                expected += 1;
            }
        }
        assert_eq!(c.ignored_accesses(), expected);
        assert_eq!(c.selector(), 1);
        assert_eq!(c.slot(1), snapshot);
        assert_eq!(c.rejected_ejects(), 0);
    }

    #[test]
    fn empty_accesses_never_panic() {
        let mut c = CpuHotplugController::new(1);
        c.read(STATUS_OFFSET, &mut []);
        assert_eq!(c.write(STATUS_OFFSET, &[]), None);
        c.read(u64::MAX, &mut [0; 3]);
        assert_eq!(c.ignored_accesses(), 3);
    }

    #[test]
    fn selector_beyond_max_reads_zero_and_ignores_control() {
        let mut c = booted(2, 2);
        c.begin_remove(1).unwrap();
        select(&mut c, 2);
        assert_eq!(status(&mut c), 0);
        assert_eq!(control(&mut c, 0xff), None);
        assert_eq!(c.ignored_accesses(), 3); // selector, status read, control write
        assert_eq!(c.rejected_ejects(), 0);
        assert!(c.slot(1).unwrap().removing);
    }

    #[test]
    fn eject_needs_a_pending_removal() {
        let mut c = booted(3, 4);
        // Present, no removal requested: refused, and reported.
        assert_eq!(guest_ej0(&mut c, 2), Some(HotplugAction::EjectRefused(2)));
        // Not present at all.
        assert_eq!(guest_ej0(&mut c, 3), None);
        assert_eq!(c.rejected_ejects(), 2);
        assert!(c.is_present(2));
        c.begin_remove(2).unwrap();
        assert_eq!(guest_ej0(&mut c, 2), Some(HotplugAction::Eject(2)));
        // A second eject before completion is refused.
        assert_eq!(guest_ej0(&mut c, 2), None);
        assert_eq!(c.rejected_ejects(), 3);
    }

    #[test]
    fn vcpu0_is_never_ejected() {
        let mut c = booted(2, 2);
        assert_eq!(c.begin_remove(0), Err(CpuHotplugError::BootCpu));
        assert_eq!(guest_ej0(&mut c, 0), None);
        assert_eq!(c.rejected_ejects(), 1);
        assert!(c.is_present(0));
    }

    #[test]
    fn eject_is_honoured_after_the_guest_acked_the_removal() {
        let mut c = booted(2, 2);
        c.begin_remove(1).unwrap();
        select(&mut c, 1);
        control(&mut c, STATUS_REMOVING);
        let slot = c.slot(1).unwrap();
        assert!(!slot.removing);
        assert_eq!(slot.removal, Removal::Pending);
        assert_eq!(guest_ej0(&mut c, 1), Some(HotplugAction::Eject(1)));
    }

    #[test]
    fn ack_and_eject_in_one_write() {
        let mut c = booted(2, 2);
        c.begin_remove(1).unwrap();
        select(&mut c, 1);
        assert_eq!(
            control(&mut c, STATUS_REMOVING | CONTROL_EJECT),
            Some(HotplugAction::Eject(1))
        );
        assert_eq!(c.slot(1).unwrap().removal, Removal::Ejected);
    }

    #[test]
    fn owner_api_rejects_invalid_transitions() {
        let mut c = booted(2, 3);
        assert_eq!(c.mark_present(3), Err(CpuHotplugError::OutOfRange(3)));
        assert_eq!(c.mark_present(1), Err(CpuHotplugError::AlreadyPresent(1)));
        assert_eq!(c.begin_insert(1), Err(CpuHotplugError::AlreadyPresent(1)));
        assert_eq!(c.begin_insert(9), Err(CpuHotplugError::OutOfRange(9)));
        assert_eq!(c.begin_remove(2), Err(CpuHotplugError::NotPresent(2)));
        assert_eq!(c.begin_remove(7), Err(CpuHotplugError::OutOfRange(7)));
        assert_eq!(c.complete_removal(1), Err(CpuHotplugError::NoRemoval(1)));
        assert_eq!(c.cancel_removal(1), Err(CpuHotplugError::NoRemoval(1)));
        c.begin_remove(1).unwrap();
        assert_eq!(
            c.begin_remove(1),
            Err(CpuHotplugError::RemovalInProgress(1))
        );
        assert_eq!(
            c.begin_insert(1),
            Err(CpuHotplugError::RemovalInProgress(1))
        );
        assert_eq!(
            c.mark_present(1),
            Err(CpuHotplugError::RemovalInProgress(1))
        );
        assert_eq!(guest_ej0(&mut c, 1), Some(HotplugAction::Eject(1)));
        assert_eq!(c.cancel_removal(1), Err(CpuHotplugError::AlreadyEjected(1)));
        // Until completed, the slot cannot be re-added.
        assert_eq!(
            c.begin_insert(1),
            Err(CpuHotplugError::RemovalInProgress(1))
        );
        c.complete_removal(1).unwrap();
        c.begin_insert(1).unwrap();
    }

    #[test]
    fn cancelled_removal_keeps_the_vcpu_and_refuses_a_late_eject() {
        let mut c = booted(2, 2);
        c.begin_remove(1).unwrap();
        c.cancel_removal(1).unwrap();
        assert_eq!(
            c.slot(1).unwrap(),
            SlotState {
                present: true,
                ..Default::default()
            }
        );
        assert_eq!(guest_ej0(&mut c, 1), Some(HotplugAction::EjectRefused(1)));
        assert_eq!(c.rejected_ejects(), 1);
        assert_eq!(guest_sta(&mut c, 1), 0xf);
    }

    #[test]
    fn linux_hot_add_sequence() {
        let mut c = booted(2, 8);
        assert_eq!(c.present_count(), 2);
        c.begin_insert(2).unwrap();
        c.begin_insert(5).unwrap();
        assert!(c.has_pending_events());
        // GED interrupt -> _EVT -> CSCN: notify only the changed vCPUs.
        assert_eq!(guest_scan(&mut c), vec![(2, 1), (5, 1)]);
        assert!(!c.has_pending_events());
        // Device check -> Linux evaluates _STA.
        assert_eq!(guest_sta(&mut c, 2), 0xf);
        assert_eq!(guest_sta(&mut c, 5), 0xf);
        assert_eq!(guest_sta(&mut c, 3), 0);
        assert_eq!(c.present_count(), 4);
        // A second scan finds nothing.
        assert!(guest_scan(&mut c).is_empty());
        assert_eq!(c.ignored_accesses(), 0);
    }

    #[test]
    fn linux_hot_remove_sequence() {
        let mut c = booted(4, 4);
        c.begin_remove(3).unwrap();
        // Scan: eject request for vCPU 3 only, removal acked.
        assert_eq!(guest_scan(&mut c), vec![(3, 3)]);
        assert!(!c.slot(3).unwrap().removing);
        assert!(c.is_removal_pending(3));
        // Linux offlines the CPU, then _EJ0 -> CEJ0.
        assert_eq!(guest_ej0(&mut c, 3), Some(HotplugAction::Eject(3)));
        // Linux checks _STA after _EJ0: gone.
        assert_eq!(guest_sta(&mut c, 3), 0);
        assert!(c.is_removal_pending(3));
        // The VMM stopped the vCPU.
        c.complete_removal(3).unwrap();
        assert!(!c.is_removal_pending(3));
        assert_eq!(c.present_count(), 3);
        // Re-add the same id.
        c.begin_insert(3).unwrap();
        assert_eq!(guest_scan(&mut c), vec![(3, 1)]);
        assert_eq!(guest_sta(&mut c, 3), 0xf);
        assert_eq!(c.rejected_ejects(), 0);
    }

    #[test]
    fn remove_before_the_insert_was_scanned_reports_both_events() {
        let mut c = booted(1, 2);
        c.begin_insert(1).unwrap();
        c.begin_remove(1).unwrap();
        assert_eq!(guest_scan(&mut c), vec![(1, 1), (1, 3)]);
        assert_eq!(guest_ej0(&mut c, 1), Some(HotplugAction::Eject(1)));
    }
}
