//! The seam between a PCI function and the rest of the VMM: configuration
//! cycles (PCI Local Bus Specification 3.0, §6.1) and accesses to its BARs
//! (§6.2.5).
//!
//! A function model owns a [`PciConfiguration`] and implements
//! [`PciDevice`]; the root reaches its configuration space by device number
//! and the VMM puts one [`PciBarWindow`] per BAR on its PIO or MMIO bus. The
//! window drops accesses while the command register disables decoding.

use std::sync::{Arc, Mutex};

use super::{BarMove, PciConfiguration};
use crate::bus::BusDevice;

/// A PCI function as the root and the BAR windows see it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;

    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Guest configuration read at `reg_offset` (1 to 4 bytes in a dword).
    fn read_config(&mut self, reg_offset: usize, data: &mut [u8]) {
        self.config().read(reg_offset, data);
    }

    /// Guest configuration write; returns the BAR move it made, if any.
    /// Functions with MSI or MSI-X override this to also call their
    /// capability's `config_written`.
    fn write_config(&mut self, reg_offset: usize, data: &[u8]) -> Option<BarMove> {
        self.config_mut().write(reg_offset, data)
    }

    /// Guest read at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Guest write at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The machine is stopping and its vCPUs no longer run: finish the I/O in
    /// flight and flush backends, so images are consistent when the process
    /// ends. Nothing is delivered to the guest any more.
    fn shutdown(&mut self) {}
}

/// How long [`PciDevice::shutdown`] waits for a disk's requests in flight.
pub const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A PCI function shared between the root, its BAR windows and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Puts one BAR of a function on a bus: insert it at the BAR's address with
/// the BAR's size, and move it when the root reports a [`BarMove`].
pub struct PciBarWindow {
    device: SharedPciDevice,
    bar: usize,
}

impl PciBarWindow {
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut device = self.device.lock().expect("PCI device lock poisoned");
        if device.config().bar_decoded(self.bar) {
            device.read_bar(self.bar, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut device = self.device.lock().expect("PCI device lock poisoned");
        if device.config().bar_decoded(self.bar) {
            device.write_bar(self.bar, offset, data);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pci::{BarKind, PciHeader, COMMAND_MEMORY_SPACE};

    /// A function with one 4 KiB memory BAR 0 of scratch registers.
    pub(crate) struct ScratchDevice {
        pub(crate) config: PciConfiguration,
        pub(crate) scratch: [u8; 16],
    }

    impl ScratchDevice {
        pub(crate) fn new(device_id: u16) -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id,
                ..PciHeader::default()
            });
            config
                .add_bar(
                    0,
                    BarKind::Memory32 {
                        prefetchable: false,
                    },
                    0x1000,
                )
                .unwrap();
            Self {
                config,
                scratch: [0; 16],
            }
        }
    }

    impl PciDevice for ScratchDevice {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            for (o, b) in (offset..).zip(data) {
                *b = usize::try_from(o)
                    .ok()
                    .and_then(|o| self.scratch.get(o))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            for (o, b) in (offset..).zip(data) {
                if let Some(s) = usize::try_from(o)
                    .ok()
                    .and_then(|o| self.scratch.get_mut(o))
                {
                    *s = *b;
                }
            }
        }
    }

    #[test]
    fn window_forwards_only_while_decoded() {
        let device = Arc::new(Mutex::new(ScratchDevice::new(1)));
        let mut window = PciBarWindow::new(device.clone(), 0);
        let mut b = [0; 2];
        window.write(4, &[1, 2]);
        window.read(4, &mut b);
        assert_eq!(b, [0xff, 0xff], "memory decoding is off after reset");

        let command = COMMAND_MEMORY_SPACE.to_le_bytes();
        device.lock().unwrap().write_config(0x04, &command);
        window.write(4, &[1, 2]);
        window.read(4, &mut b);
        assert_eq!(b, [1, 2]);
        assert_eq!(device.lock().unwrap().scratch[4..6], [1, 2]);

        // A window on a BAR the function does not have never decodes.
        let mut none = PciBarWindow::new(device, 3);
        none.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
