//! The i8042 keyboard controller, reduced to what a guest without a keyboard
//! needs: answer the driver's probe sanely and pulse the CPU reset line on
//! command 0xFE (how Linux reboots with `reboot=k`, and what the FADT reset
//! register points at).
//!
//! ```text
//! offset 0 (port 0x60): data     offset 4 (port 0x64): status / command
//! ```

use std::collections::VecDeque;
use std::sync::Arc;

use super::{PowerEvent, PowerSink};
use crate::bus::BusDevice;

/// Bytes the device spans from port 0x60.
pub const LEN: u64 = 5;
const STATUS_OBF: u8 = 1;
const STATUS_SYS: u8 = 1 << 2;
const STATUS_CMD: u8 = 1 << 3;
/// Keyboard not inhibited (no keylock).
const STATUS_UNLOCKED: u8 = 1 << 4;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_IFACE_TEST: u8 = 0xab;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
/// Pulse output line 0: CPU reset.
pub const CMD_RESET: u8 = 0xfe;
const SELF_TEST_OK: u8 = 0x55;

/// The controller.
pub struct I8042 {
    ctr: u8,
    out: VecDeque<u8>,
    pending: Option<u8>,
    last_was_cmd: bool,
    sink: Arc<dyn PowerSink>,
}

impl I8042 {
    /// A controller that reports reset to `sink`.
    pub fn new(sink: Arc<dyn PowerSink>) -> Self {
        Self {
            ctr: 0,
            out: VecDeque::new(),
            pending: None,
            last_was_cmd: false,
            sink,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.out.push_back(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.out.push_back(SELF_TEST_OK),
            CMD_IFACE_TEST => self.out.push_back(0),
            CMD_READ_OUTPORT => self.out.push_back(0x01),
            CMD_RESET => self.sink.power(PowerEvent::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.out.pop_front().unwrap_or(0),
            4 => {
                let obf = if self.out.is_empty() { 0 } else { STATUS_OBF };
                let cmd = if self.last_was_cmd { STATUS_CMD } else { 0 };
                obf | STATUS_SYS | STATUS_UNLOCKED | cmd
            }
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
            0 => {
                self.last_was_cmd = false;
                match self.pending.take() {
                    Some(CMD_WRITE_CTR) => self.ctr = v,
                    // Output port bit 0 low holds the CPU in reset.
                    Some(CMD_WRITE_OUTPORT) if v & 1 == 0 => self.sink.power(PowerEvent::Reset),
                    _ => {}
                }
            }
            4 => {
                self.last_was_cmd = true;
                self.command(v);
            }
            _ => {}
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
    fn reset_command_pulses_reset() {
        let rec = Arc::new(Rec::default());
        let mut k = I8042::new(rec.clone());
        k.write(4, &[CMD_RESET]);
        assert_eq!(*rec.0.lock().unwrap(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn probe_answers_like_a_controller() {
        let mut k = I8042::new(Arc::new(Rec::default()));
        let mut b = [0u8];
        k.write(4, &[CMD_SELF_TEST]);
        k.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        k.read(0, &mut b);
        assert_eq!(b[0], SELF_TEST_OK);
        k.write(4, &[CMD_WRITE_CTR]);
        k.write(0, &[0x47]);
        k.write(4, &[CMD_READ_CTR]);
        k.read(0, &mut b);
        assert_eq!(b[0], 0x47);
        k.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OBF, 0);
        k.write(0, &[]);
        k.read(3, &mut b);
    }
}
