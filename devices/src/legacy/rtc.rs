//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! The clock registers read the host's current UTC time, in BCD and 24-hour mode, as a PC BIOS
//! leaves them; the update-in-progress bit never sets, so the guest's `mc146818_get_time()` never
//! waits. Writes to the clock registers are dropped (the guest cannot move the host's clock); the
//! rest of the 128 bytes of CMOS RAM keep what the guest writes. Without this device, the stock
//! kernel's `rtc_cmos` probe stalls for seconds waiting for an update that never comes.
//! Register map: MC146818A datasheet, and Linux `include/linux/mc146818rtc.h`.

use std::time::{SystemTime, UNIX_EPOCH};

use super::ByteRegisters;

/// Seconds, minutes, hours, day of week, day of month, month, year, century (MC146818A).
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
/// The century byte that ACPI's FADT and Linux's `rtc_cmos` use by default.
const REG_CENTURY: u8 = 0x32;
/// Status A: divider 010 (32.768 kHz time base), rate 0110 (1.024 kHz); UIP (bit 7) clear.
const REG_A: u8 = 0x0a;
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode (bit 1), BCD (bit 2 clear), no interrupts enabled.
const REG_B: u8 = 0x0b;
const STATUS_B: u8 = 0x02;
/// Status C: no interrupt flags pending.
const REG_C: u8 = 0x0c;
/// Status D: valid RAM and time (VRT, bit 7).
const REG_D: u8 = 0x0d;
const STATUS_D: u8 = 0x80;
/// Bits 6:0 of the index port select a register; bit 7 masks NMIs.
const INDEX_MASK: u8 = 0x7f;

/// The clock and its 128 bytes of CMOS RAM.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// A clock showing the host's time.
    pub fn new() -> Self {
        Self {
            index: 0,
            ram: [0; 128],
        }
    }

    /// The register at `index` when the time is `unix_secs` seconds past the epoch (UTC).
    fn register(&self, index: u8, unix_secs: u64) -> u8 {
        let days = unix_secs / 86_400;
        let secs_of_day = unix_secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        let bcd = |v: u64| -> u8 {
            // Every caller passes a value below 100.
            let v = u8::try_from(v % 100).unwrap_or(0);
            ((v / 10) << 4) | (v % 10)
        };
        match index {
            REG_SECONDS => bcd(secs_of_day % 60),
            REG_MINUTES => bcd(secs_of_day / 60 % 60),
            REG_HOURS => bcd(secs_of_day / 3600),
            // 1 is Sunday; 1970-01-01 was a Thursday.
            REG_DAY_OF_WEEK => bcd((days + 4) % 7 + 1),
            REG_DAY_OF_MONTH => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year % 100),
            REG_CENTURY => bcd(year / 100),
            REG_A => STATUS_A,
            REG_B => STATUS_B,
            REG_C => 0,
            REG_D => STATUS_D,
            _ => self.ram[usize::from(index & INDEX_MASK)],
        }
    }
}

/// Year, month (1-12) and day (1-31) of the day `days` after 1970-01-01 (proleptic Gregorian),
/// after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl ByteRegisters for Rtc {
    fn read_byte(&mut self, offset: u8) -> u8 {
        match offset {
            0 => self.index,
            1 => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.register(self.index, now)
            }
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u8, value: u8) {
        match offset {
            0 => self.index = value & INDEX_MASK,
            1 => match self.index {
                REG_SECONDS..=REG_YEAR | REG_CENTURY | REG_A..=REG_D => {}
                index => self.ram[usize::from(index)] = value,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn calendar_matches_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000-02-29, a leap day in a century year divisible by 400.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // 2026-11-26.
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }

    #[test]
    fn registers_are_bcd_24_hour() {
        let rtc = Rtc::new();
        // 2026-11-26 21:07:09 UTC, a Thursday.
        let t = 20_783 * 86_400 + 21 * 3600 + 7 * 60 + 9;
        assert_eq!(rtc.register(REG_SECONDS, t), 0x09);
        assert_eq!(rtc.register(REG_MINUTES, t), 0x07);
        assert_eq!(rtc.register(REG_HOURS, t), 0x21);
        assert_eq!(rtc.register(REG_DAY_OF_WEEK, t), 5);
        assert_eq!(rtc.register(REG_DAY_OF_MONTH, t), 0x26);
        assert_eq!(rtc.register(REG_MONTH, t), 0x11);
        assert_eq!(rtc.register(REG_YEAR, t), 0x26);
        assert_eq!(rtc.register(REG_CENTURY, t), 0x20);
        assert_eq!(rtc.register(REG_A, t) & 0x80, 0, "never updating");
    }

    #[test]
    fn ports_select_and_keep_cmos_ram() {
        let mut rtc = Rtc::new();
        // NMI-mask bit set in the index: still register 0x40.
        rtc.write(0, &[0x80 | 0x40]);
        rtc.write(1, &[0x5a]);
        let mut v = [0];
        rtc.read(1, &mut v);
        assert_eq!(v, [0x5a]);
        // The clock cannot be set.
        rtc.write(0, &[REG_B]);
        rtc.write(1, &[0x06]);
        rtc.read(1, &mut v);
        assert_eq!(v, [STATUS_B]);
    }
}
