//! Address-range keyed buses for port I/O and MMIO.
//!
//! A vCPU exit names an address; the bus finds the one device whose range
//! holds it and hands the device the offset into that range. Ranges may not
//! overlap: an overlap is a wiring bug, so `insert` refuses it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes on a bus.
///
/// `offset` is relative to the start of the range the device was inserted
/// with, so a device does not care where the VMM placed it.
pub trait BusDevice: Send {
    /// Fill `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Take what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from wiring devices onto a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A range of length zero holds no address.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// No device is at that base.
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len - 1)
            .ok_or(BusError::Overlap { base, len })?;
        // The nearest range starting at or below `end` is the only one that can overlap.
        if let Some((&b, e)) = self.ranges.range(..=end).next_back() {
            if b + (e.len - 1) >= base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Take the device at `base` off the bus (a guest moved a BAR).
    pub fn remove(&mut self, base: u64) -> Result<SharedDevice, BusError> {
        self.ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// The device holding `addr` and the offset of `addr` in its range.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let (&b, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - b;
        (off < e.len).then(|| (e.device.clone(), off))
    }

    /// Dispatch a read; returns false when nothing is at `addr` (the caller
    /// then reads as all ones, as an empty bus does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, off)) => {
                dev.lock().expect("device lock poisoned").read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when nothing is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, off)) => {
                dev.lock().expect("device lock poisoned").write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        bus.insert(dev(0), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(0), 0x10f, 1).is_err());
        assert!(bus.insert(dev(0), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(0), 0x0, 0x1000).is_err());
        assert_eq!(bus.insert(dev(0), 0x50, 0), Err(BusError::ZeroLength(0x50)));
        bus.insert(dev(0), 0x110, 0x10).unwrap();
        bus.insert(dev(0), 0xf0, 0x10).unwrap();
        assert!(bus.insert(dev(0), u64::MAX, 2).is_err());
    }

    #[test]
    fn dispatch_uses_offsets() {
        let mut bus = Bus::new();
        bus.insert(dev(10), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 12);
        assert!(!bus.read(0x400, &mut b));
        assert!(bus.write(0x3f8, &[1]));
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 1);
        bus.remove(0x3f8).unwrap();
        assert!(!bus.read(0x3f8, &mut b));
    }
}
