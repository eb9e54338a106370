//! A minimal MC146818 CMOS RTC at ports 0x70/0x71: the time of day from a
//! clock the owner supplies, binary 24-hour mode, never "update in
//! progress". Without it Linux's rtc_cmos driver spends seconds polling a
//! clock that is not there; with it the guest also reads its wall clock.
//! The other CMOS bytes are plain NVRAM.

use super::BusDevice;

/// Index register offset (port 0x70).
pub const INDEX_OFFSET: u64 = 0;
/// Data register offset (port 0x71).
pub const DATA_OFFSET: u64 = 1;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Register B: 24-hour mode, binary (not BCD) values.
const B_24H_BINARY: u8 = 0x02 | 0x04;
/// Register D: valid RAM and time.
const D_VRT: u8 = 0x80;

/// Seconds since the Unix epoch, supplied by the owner.
pub type Clock = Box<dyn Fn() -> u64 + Send>;

/// The RTC (see the module docs).
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    clock: Clock,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// An RTC reading `clock`.
    pub fn new(clock: Clock) -> Self {
        Self {
            index: 0,
            nvram: [0; 128],
            clock,
        }
    }

    /// The RTC backed by the host's system clock.
    pub fn with_system_clock() -> Self {
        Self::new(Box::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }))
    }

    fn register(&self, reg: u8) -> u8 {
        let now = (self.clock)();
        let days = i64::try_from(now / 86_400).unwrap_or(0);
        let secs = now % 86_400;
        let (year, month, day) = civil_from_days(days);
        let byte = |v: i64| u8::try_from(v.rem_euclid(256)).unwrap_or(0);
        match reg {
            REG_SECONDS => byte(i64::try_from(secs % 60).unwrap_or(0)),
            REG_MINUTES => byte(i64::try_from(secs / 60 % 60).unwrap_or(0)),
            REG_HOURS => byte(i64::try_from(secs / 3600).unwrap_or(0)),
            REG_WEEKDAY => byte((days + 4).rem_euclid(7) + 1),
            REG_DAY => byte(i64::from(day)),
            REG_MONTH => byte(i64::from(month)),
            REG_YEAR => byte(year % 100),
            REG_CENTURY => byte(year / 100),
            REG_A => 0x26, // 32.768 kHz time base, 1024 Hz rate, UIP clear
            REG_B => B_24H_BINARY,
            REG_C => 0,
            REG_D => D_VRT,
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            INDEX_OFFSET => self.index,
            DATA_OFFSET => self.register(self.index),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        match offset {
            // Bit 7 of the index port masks NMIs; the index is 7 bits.
            INDEX_OFFSET => self.index = value & 0x7f,
            DATA_OFFSET => {
                let reg = self.index;
                let is_clock = matches!(reg, REG_SECONDS..=REG_D | REG_CENTURY);
                if !is_clock {
                    self.nvram[usize::from(reg)] = value;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(INDEX_OFFSET, &[reg | 0x80]);
        let mut d = [0u8];
        c.read(DATA_OFFSET, &mut d);
        d[0]
    }

    #[test]
    fn reports_the_clock_in_binary_24h_without_update_in_progress() {
        // 2026-11-23 03:31:11 UTC, a Monday.
        let mut c = Cmos::new(Box::new(|| 1_795_404_671));
        assert_eq!(read(&mut c, REG_SECONDS), 11);
        assert_eq!(read(&mut c, REG_MINUTES), 31);
        assert_eq!(read(&mut c, REG_HOURS), 3);
        assert_eq!(read(&mut c, REG_DAY), 23);
        assert_eq!(read(&mut c, REG_MONTH), 11);
        assert_eq!(read(&mut c, REG_YEAR), 26);
        assert_eq!(read(&mut c, REG_CENTURY), 20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 2, "Monday is day 2 (Sunday = 1)");
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&mut c, REG_B), B_24H_BINARY);
        assert_eq!(read(&mut c, REG_D), D_VRT);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
    }

    #[test]
    fn nvram_is_kept_and_clock_registers_are_read_only() {
        let mut c = Cmos::new(Box::new(|| 0));
        c.write(INDEX_OFFSET, &[0x40]);
        c.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(INDEX_OFFSET, &[REG_SECONDS]);
        c.write(DATA_OFFSET, &[42]);
        assert_eq!(read(&mut c, REG_SECONDS), 0);
        // Bad widths and offsets are ignored.
        c.write(DATA_OFFSET, &[1, 2]);
        let mut d = [0u8; 2];
        c.read(INDEX_OFFSET, &mut d);
        assert_eq!(d, [0, 0]);
        let mut d = [0u8];
        c.read(5, &mut d);
        assert_eq!(d[0], 0xff);
    }
}
