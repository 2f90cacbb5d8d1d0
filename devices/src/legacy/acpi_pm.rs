//! ACPI fixed hardware PM1a event and control blocks (ACPI 6.5, 4.8.3): the
//! two registers a guest's `poweroff` touches. Writing SLP_EN with the SLP_TYP
//! the DSDT's `\_S5_` announced powers the machine off.
//!
//! ```text
//! offset 0: PM1_STS (u16, write 1 to clear)   offset 2: PM1_EN (u16)
//! offset 4: PM1_CNT (u16): bit 0 SCI_EN, bits 10-12 SLP_TYP, bit 13 SLP_EN
//! ```

use std::sync::Arc;

use super::{PowerEvent, PowerSink};
use crate::bus::BusDevice;

/// Bytes the device spans from the PM1a event block.
pub const LEN: u64 = 6;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

/// The PM1a blocks.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    s5_type: u8,
    sink: Arc<dyn PowerSink>,
}

impl AcpiPm {
    /// A PM device that reports S5 (SLP_TYP == `s5_type`) to `sink`.
    pub fn new(s5_type: u8, sink: Arc<dyn PowerSink>) -> Self {
        Self {
            status: 0,
            enable: 0,
            // Always in ACPI mode: there is no SMI handover.
            control: SCI_EN,
            s5_type,
            sink,
        }
    }

    fn regs(&self) -> [u8; LEN as usize] {
        let mut r = [0; LEN as usize];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&self.control.to_le_bytes());
        r
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.regs();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| regs.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut regs = self.regs();
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = usize::try_from(offset)
                .ok()
                .and_then(|o| regs.get_mut(o + i))
            {
                *r = *b;
            }
        }
        let touches = |lo: u64, hi: u64| offset < hi && offset + data.len() as u64 > lo;
        if touches(0, 2) {
            // Status bits are write-one-to-clear.
            self.status &= !u16::from_le_bytes([regs[0], regs[1]]);
        }
        if touches(2, 4) {
            self.enable = u16::from_le_bytes([regs[2], regs[3]]);
        }
        if touches(4, 6) {
            let v = u16::from_le_bytes([regs[4], regs[5]]);
            self.control = (v & !SLP_EN) | SCI_EN;
            let typ = (v >> SLP_TYP_SHIFT) & 0x7;
            if v & SLP_EN != 0 && typ == u16::from(self.s5_type) {
                self.sink.power(PowerEvent::PowerOff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<PowerEvent>>);
    impl PowerSink for Rec {
        fn power(&self, ev: PowerEvent) {
            self.0.lock().unwrap().push(ev);
        }
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let rec = Arc::new(Rec::default());
        let mut pm = AcpiPm::new(5, rec.clone());
        let mut b = [0; 2];
        pm.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        // SLP_TYP alone does nothing; another sleep type does nothing.
        pm.write(4, &(5u16 << 10).to_le_bytes());
        pm.write(4, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert!(rec.0.lock().unwrap().is_empty());
        pm.write(4, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(*rec.0.lock().unwrap(), vec![PowerEvent::PowerOff]);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut pm = AcpiPm::new(5, Arc::new(Rec::default()));
        let mut b = [0; 8];
        pm.read(5, &mut b);
        pm.write(5, &[0xff; 8]);
        pm.write(u64::MAX, &[1]);
        pm.read(u64::MAX, &mut b[..1]);
    }
}
