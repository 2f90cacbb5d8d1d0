//! COM1: vm-superio's 16550 state machine on the I/O bus, its interrupt on an
//! [`InterruptLine`], its output to the terminal or a file, its input fed by
//! the VMM's event loop.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// Bytes the UART spans.
pub const LEN: u64 = 8;

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Adapts an [`InterruptLine`] to vm-superio's trigger.
pub struct LineTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The UART.
pub struct Serial {
    inner: vm_superio::Serial<LineTrigger, NoEvents, SerialOutput>,
}

impl Serial {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: SerialOutput) -> Self {
        Self {
            inner: vm_superio::Serial::new(LineTrigger(irq), out),
        }
    }

    /// Hand bytes typed on the host to the guest; returns how many fit in the
    /// receive FIFO (the rest should be offered again later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let n = room.min(bytes.len());
        if n > 0 && self.inner.enqueue_raw_bytes(&bytes[..n]).is_err() {
            return 0;
        }
        n
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(off, b) {
                log::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl InterruptLine for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_flow() {
        let irq = Arc::new(Count::default());
        let out = Sink::default();
        let mut s = Serial::new(irq.clone(), Box::new(out.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then type.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"ls\n"), 3);
        assert!(irq.0.load(Ordering::Relaxed) > 0);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'l');
        s.read(u64::MAX, &mut b);
        s.write(300, &[]);
    }
}
