//! Guest-initiated power off and reset, as pure state machines.
//!
//! [`AcpiPowerDevice`] sits on the port-I/O bus at [`POWER_PORT_BASE`] and
//! backs the hardware-reduced FADT's registers (all 8-bit):
//! - sleep control (`layout::ACPI_SLEEP_CONTROL_PORT`): Linux powers off by
//!   writing `SLP_TYP << 2 | SLP_EN` with the `SLP_TYP` of the DSDT's
//!   `\_S5_` package ([`S5_SLEEP_TYPE`]);
//! - sleep status (`layout::ACPI_SLEEP_STATUS_PORT`): reads 0 (no wake
//!   event), writes (clearing `WAK_STS`) are accepted and dropped;
//! - reset (`layout::ACPI_RESET_PORT`): `layout::ACPI_RESET_VALUE` resets.
//!
//! [`I8042Reset`] answers the keyboard controller's command port
//! (`layout::I8042_COMMAND_PORT`): `0xFE` resets, the path Linux tries
//! after the ACPI reset register (or first with `reboot=k`). Its status
//! reads 0 ("input buffer empty") so the guest does not spin waiting.
//!
//! Neither does I/O: `write` returns a [`PowerAction`] for the owner (the
//! event loop) to carry out. [`PowerBus`] puts either on the bus.

use log::{debug, info};

use super::BusDevice;
use crate::layout;

/// First port of [`AcpiPowerDevice`].
pub const POWER_PORT_BASE: u16 = layout::ACPI_SLEEP_CONTROL_PORT;
/// Ports covered by [`AcpiPowerDevice`], from [`POWER_PORT_BASE`].
pub const POWER_PORT_LEN: u16 = layout::ACPI_RESET_PORT - POWER_PORT_BASE + 1;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = (layout::ACPI_SLEEP_CONTROL_PORT - POWER_PORT_BASE) as u64;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = (layout::ACPI_SLEEP_STATUS_PORT - POWER_PORT_BASE) as u64;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = (layout::ACPI_RESET_PORT - POWER_PORT_BASE) as u64;
/// Sleep control: SLP_EN, start the transition.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: position of the 3-bit SLP_TYP field.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP of S5 (soft off); the DSDT's `\_S5_` package carries it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// i8042 command that pulses the reset line.
pub const I8042_RESET_COMMAND: u8 = 0xfe;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Stop the VM (ACPI S5).
    PowerOff,
    /// Reset the VM.
    Reset,
}

/// A register block whose writes may request a power action.
pub trait PowerRegisters {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<PowerAction>;
}

/// The FADT's sleep control, sleep status and reset registers.
#[derive(Debug, Clone, Default)]
pub struct AcpiPowerDevice {
    ignored_accesses: u64,
}

impl AcpiPowerDevice {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accesses without effect (bad width or offset, unsupported sleep
    /// state, wrong reset value).
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    fn ignore(&mut self, what: &str, offset: u64, data: &[u8]) {
        self.ignored_accesses += 1;
        debug!("acpi power: ignored {what} ({data:x?}) at offset {offset:#x}");
    }
}

impl PowerRegisters for AcpiPowerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET, 1) => data[0] = 0,
            _ => {
                data.fill(0xff);
                self.ignore("read", offset, &[]);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<PowerAction> {
        match (offset, data) {
            (SLEEP_CONTROL_OFFSET, &[v]) => {
                let sleep_type = (v >> SLP_TYP_SHIFT) & 0x7;
                if v & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    info!("guest requested power off (ACPI S5)");
                    return Some(PowerAction::PowerOff);
                }
                self.ignore("sleep control write", offset, data);
                None
            }
            // Clearing WAK_STS before sleeping: nothing to clear.
            (SLEEP_STATUS_OFFSET, &[_]) => None,
            (RESET_OFFSET, &[v]) if v == layout::ACPI_RESET_VALUE => {
                info!("guest requested reset (ACPI reset register)");
                Some(PowerAction::Reset)
            }
            _ => {
                self.ignore("write", offset, data);
                None
            }
        }
    }
}

/// The i8042 command/status port, only as far as reset goes.
#[derive(Debug, Clone, Default)]
pub struct I8042Reset {
    ignored_accesses: u64,
}

impl I8042Reset {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accesses without effect.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }
}

impl PowerRegisters for I8042Reset {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 1 {
            data[0] = 0;
        } else {
            data.fill(0xff);
            self.ignored_accesses += 1;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<PowerAction> {
        if offset == 0 && data == [I8042_RESET_COMMAND] {
            info!("guest requested reset (i8042)");
            return Some(PowerAction::Reset);
        }
        self.ignored_accesses += 1;
        debug!("i8042: ignored write {data:x?} at offset {offset:#x}");
        None
    }
}

/// A [`PowerRegisters`] device on the bus: actions go to `on_action`,
/// which runs under the device mutex (queue the action, do not block).
pub struct PowerBus<D, F> {
    device: D,
    on_action: F,
}

impl<D: std::fmt::Debug, F> std::fmt::Debug for PowerBus<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerBus")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl<D: PowerRegisters, F: FnMut(PowerAction)> PowerBus<D, F> {
    /// Wraps `device`; `on_action` receives every action.
    pub fn new(device: D, on_action: F) -> Self {
        Self { device, on_action }
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }
}

impl<D: PowerRegisters + Send, F: FnMut(PowerAction) + Send> BusDevice for PowerBus<D, F> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(action) = self.device.write(offset, data) {
            (self.on_action)(action);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_layout() {
        assert_eq!(SLEEP_CONTROL_OFFSET, 0);
        assert_eq!(SLEEP_STATUS_OFFSET, 1);
        assert_eq!(RESET_OFFSET, 4);
        assert_eq!(POWER_PORT_LEN, 5);
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let mut d = AcpiPowerDevice::new();
        // What ACPICA writes: SLP_TYP from \_S5_, shifted, plus SLP_EN.
        let v = (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(v, 0x34);
        assert_eq!(
            d.write(SLEEP_CONTROL_OFFSET, &[v]),
            Some(PowerAction::PowerOff)
        );
        // Reserved bits do not matter.
        assert_eq!(
            d.write(SLEEP_CONTROL_OFFSET, &[v | 0x83]),
            Some(PowerAction::PowerOff)
        );
        assert_eq!(d.ignored_accesses(), 0);
    }

    #[test]
    fn other_sleep_writes_do_nothing() {
        let mut d = AcpiPowerDevice::new();
        for typ in 0..8u8 {
            let v = typ << SLP_TYP_SHIFT;
            // Without SLP_EN nothing happens; other states are unsupported.
            assert_eq!(d.write(SLEEP_CONTROL_OFFSET, &[v]), None);
            if typ != S5_SLEEP_TYPE {
                assert_eq!(d.write(SLEEP_CONTROL_OFFSET, &[v | SLP_EN]), None);
            }
        }
        assert_eq!(d.ignored_accesses(), 15);
        // Wrong width.
        assert_eq!(d.write(SLEEP_CONTROL_OFFSET, &[0x34, 0]), None);
        assert_eq!(d.ignored_accesses(), 16);
    }

    #[test]
    fn sleep_status_reads_zero_and_accepts_wak_sts_clear() {
        let mut d = AcpiPowerDevice::new();
        let mut b = [0xaa];
        d.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(d.write(SLEEP_STATUS_OFFSET, &[0x80]), None);
        d.read(SLEEP_CONTROL_OFFSET, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(d.ignored_accesses(), 0);
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let mut d = AcpiPowerDevice::new();
        assert_eq!(
            d.write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE]),
            Some(PowerAction::Reset)
        );
        assert_eq!(
            d.write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE.wrapping_add(1)]),
            None
        );
        assert_eq!(d.write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE, 0]), None);
        assert_eq!(d.ignored_accesses(), 2);
    }

    #[test]
    fn unknown_ports_are_ignored() {
        let mut d = AcpiPowerDevice::new();
        for offset in [2u64, 3, 5, 100] {
            let mut b = [0u8];
            d.read(offset, &mut b);
            assert_eq!(b, [0xff]);
            assert_eq!(d.write(offset, &[0xff]), None);
        }
        let mut w = [0u8; 2];
        d.read(SLEEP_STATUS_OFFSET, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(d.ignored_accesses(), 9);
    }

    #[test]
    fn i8042_resets_on_0xfe_only() {
        let mut k = I8042Reset::new();
        let mut b = [0xaa];
        k.read(0, &mut b);
        assert_eq!(b, [0], "input buffer empty");
        for v in 0..=0xffu8 {
            let expected = (v == I8042_RESET_COMMAND).then_some(PowerAction::Reset);
            assert_eq!(k.write(0, &[v]), expected);
        }
        assert_eq!(k.write(1, &[I8042_RESET_COMMAND]), None);
        assert_eq!(k.write(0, &[I8042_RESET_COMMAND, 0]), None);
        k.read(0, &mut [0u8; 2]);
        assert_eq!(k.ignored_accesses(), 255 + 3);
    }

    #[test]
    fn bus_wrapper_forwards_actions() {
        let mut seen = Vec::new();
        {
            let mut bus = PowerBus::new(AcpiPowerDevice::new(), |a| seen.push(a));
            let dev: &mut dyn FnMut(u64, &[u8]) = &mut |o, d| BusDevice::write(&mut bus, o, d);
            dev(SLEEP_STATUS_OFFSET, &[0x80]);
            dev(SLEEP_CONTROL_OFFSET, &[0x34]);
            dev(RESET_OFFSET, &[layout::ACPI_RESET_VALUE]);
        }
        assert_eq!(seen, vec![PowerAction::PowerOff, PowerAction::Reset]);
    }
}
