//! The MC146818 CMOS real-time clock at ports 0x70/0x71, as PC chipsets
//! carry it: an index register and a data register over 128 bytes of CMOS,
//! whose first ten bytes are the time of day. Linux's rtc_cmos reads the
//! wall clock here (and waits for the update-in-progress bit to clear; a
//! missing RTC costs seconds of boot in that wait).
//!
//! ```text
//! 0x00 sec  0x02 min  0x04 hour  0x06 weekday  0x07 day  0x08 month
//! 0x09 year 0x0a A (UIP, divider)  0x0b B (24h, BCD)  0x0c C  0x0d D (VRT)
//! 0x32 century;  other bytes: plain CMOS storage
//! ```
//! The clock is the host's UTC plus whatever offset the guest set.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Bytes the device spans from port 0x70.
pub const LEN: u64 = 2;
const CMOS_BYTES: usize = 128;
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
/// 32.768 kHz time base, 1024 Hz periodic rate; UIP (bit 7) never set.
const REG_A_DEFAULT: u8 = 0x26;
/// 24-hour mode; BCD (bit 2 clear).
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H_BIT: u8 = 0x02;
const REG_B_SET: u8 = 0x80;
/// Valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// Bit 7 of the index port is the NMI mask, not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
    weekday: u32,
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn tm_from_unix(secs: i64) -> Tm {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Tm {
        year,
        month,
        day,
        hour: rem / 3600,
        min: rem / 60 % 60,
        sec: rem % 60,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

/// Seconds since the epoch of a civil date (inverse of `tm_from_unix`).
fn unix_from_tm(year: i64, month: u32, day: u32, hour: u32, min: u32, sec: u32) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec)
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The RTC and its CMOS bytes.
pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_BYTES],
    /// Guest time minus host time, in seconds (the guest may set its clock).
    offset: i64,
    now: fn() -> i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Rtc {
    /// An RTC reading `now` (seconds since the epoch) for the time of day.
    pub fn with_clock(now: fn() -> i64) -> Self {
        let mut cmos = [0u8; CMOS_BYTES];
        cmos[REG_A as usize] = REG_A_DEFAULT;
        cmos[REG_B as usize] = REG_B_24H;
        cmos[REG_D as usize] = REG_D_VRT;
        Self {
            index: 0,
            cmos,
            offset: 0,
            now,
        }
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B as usize] & REG_B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn time(&self) -> Tm {
        tm_from_unix((self.now)() + self.offset)
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let t = self.time();
        match reg {
            REG_SECONDS => self.encode(t.sec),
            REG_MINUTES => self.encode(t.min),
            REG_HOURS => {
                if self.cmos[REG_B as usize] & REG_B_24H_BIT != 0 {
                    self.encode(t.hour)
                } else {
                    let h12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
                    self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
                }
            }
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            REG_C => {
                // Interrupt flags: read to clear; none are ever raised.
                std::mem::take(&mut self.cmos[REG_C as usize])
            }
            r => self.cmos[usize::from(r)],
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => {
                // Setting the clock: keep every other field, move the offset.
                let t = self.time();
                let mut f = [
                    t.year.div_euclid(100),
                    t.year.rem_euclid(100),
                    i64::from(t.month),
                    i64::from(t.day),
                    i64::from(t.hour),
                    i64::from(t.min),
                    i64::from(t.sec),
                ];
                let val = i64::from(self.decode(v & if reg == REG_HOURS { 0x7f } else { 0xff }));
                let slot = match reg {
                    REG_CENTURY => 0,
                    REG_YEAR => 1,
                    REG_MONTH => 2,
                    REG_DAY => 3,
                    REG_HOURS => 4,
                    REG_MINUTES => 5,
                    _ => 6,
                };
                f[slot] = val;
                let month = f[2].clamp(1, 12) as u32;
                let day = f[3].clamp(1, 31) as u32;
                let new = unix_from_tm(
                    f[0] * 100 + f[1],
                    month,
                    day,
                    f[4].clamp(0, 23) as u32,
                    f[5].clamp(0, 59) as u32,
                    f[6].clamp(0, 59) as u32,
                );
                self.offset = new - (self.now)();
            }
            REG_A => self.cmos[REG_A as usize] = v & 0x7f,
            REG_B => self.cmos[REG_B as usize] = v & !REG_B_SET,
            REG_C | REG_D => {}
            r => self.cmos[usize::from(r)] = v,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            1 => self.read_reg(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & INDEX_MASK,
            1 => self.write_reg(self.index, v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-27 12:34:56 UTC, a Friday.
    fn fixed() -> i64 {
        1_795_782_896
    }

    fn reg(r: &mut Rtc, idx: u8) -> u8 {
        r.write(0, &[idx]);
        let mut b = [0u8];
        r.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reads_the_time_in_bcd() {
        let mut r = Rtc::with_clock(fixed);
        assert_eq!(reg(&mut r, REG_SECONDS), 0x56);
        assert_eq!(reg(&mut r, REG_MINUTES), 0x34);
        assert_eq!(reg(&mut r, REG_HOURS), 0x12);
        assert_eq!(reg(&mut r, REG_DAY), 0x27);
        assert_eq!(reg(&mut r, REG_MONTH), 0x11);
        assert_eq!(reg(&mut r, REG_YEAR), 0x26);
        assert_eq!(reg(&mut r, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut r, REG_WEEKDAY), 6, "Friday is 6 with Sunday = 1");
        assert_eq!(reg(&mut r, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(reg(&mut r, REG_D), REG_D_VRT);
        // NMI-mask bit in the index is ignored.
        assert_eq!(reg(&mut r, 0x80 | REG_MONTH), 0x11);
    }

    #[test]
    fn binary_mode_and_setting_the_clock() {
        let mut r = Rtc::with_clock(fixed);
        r.write(0, &[REG_B]);
        r.write(1, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(reg(&mut r, REG_HOURS), 12);
        r.write(0, &[REG_HOURS]);
        r.write(1, &[20]);
        assert_eq!(reg(&mut r, REG_HOURS), 20);
        assert_eq!(reg(&mut r, REG_MINUTES), 34, "other fields are kept");
        assert_eq!(r.offset, 8 * 3600);
    }

    #[test]
    fn civil_date_round_trips() {
        for s in [0, 951_782_400, 1_795_782_896, 4_102_444_800, -86_400] {
            let t = tm_from_unix(s);
            assert_eq!(
                unix_from_tm(t.year, t.month, t.day, t.hour, t.min, t.sec),
                s
            );
        }
        assert_eq!(tm_from_unix(951_782_400).day, 29, "2000-02-29");
    }

    #[test]
    fn cmos_storage_and_hostile_accesses() {
        let mut r = Rtc::with_clock(fixed);
        r.write(0, &[0x40]);
        r.write(1, &[0xab]);
        assert_eq!(reg(&mut r, 0x40), 0xab);
        let mut b = [0u8; 4];
        r.read(7, &mut b);
        r.write(1, &[]);
        r.write(0, &[0xff]);
        r.read(1, &mut b[..1]);
    }
}
