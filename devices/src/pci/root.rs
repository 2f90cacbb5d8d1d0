//! The PCI root: bus 0 with a host bridge at 00:00.0, and configuration
//! mechanism #1 on I/O ports 0xCF8..0xCFF (PCI Local Bus Specification 3.0,
//! §3.2.2.3.2).
//!
//! ```text
//!  0xCF8 CONFIG_ADDRESS (32-bit accesses only)
//!   31     30..24    23..16   15..11   10..8     7..2      1..0
//!  enable  reserved   bus     device  function  register    00
//!
//!  0xCFC..0xCFF CONFIG_DATA: byte n is register byte (register + n) of the
//!  function CONFIG_ADDRESS selects, while the enable bit is set.
//! ```
//!
//! Reads of absent functions, of buses other than 0, and with the enable bit
//! clear return all ones, which is how a guest learns nothing is there.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::{
    BarMove, ClassCode, PciConfiguration, PciDevice, PciError, PciHeader, SharedPciDevice,
};
use crate::bus::BusDevice;

/// Where the VMM inserts the root on its PIO bus.
pub const CONFIG_IO_BASE: u64 = 0xcf8;
/// Length of the CONFIG_ADDRESS/CONFIG_DATA range.
pub const CONFIG_IO_LEN: u64 = 8;

const CONFIG_ADDRESS: u64 = 0;
const CONFIG_DATA: u64 = 4;
const ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state; 30..24 are reserved and 1..0
/// read as zero.
const ADDRESS_BITS: u32 = ENABLE | 0x00ff_fffc;

const DEVICES_PER_BUS: u8 = 32;
const FUNCTIONS_PER_DEVICE: u8 = 8;

/// Device and function number on bus 0, packed as in CONFIG_ADDRESS bits
/// 15..8: device in bits 7..3, function in 2..0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevFn(u8);

impl DevFn {
    /// `device` below 32 and `function` below 8.
    pub fn new(device: u8, function: u8) -> Option<Self> {
        (device < DEVICES_PER_BUS && function < FUNCTIONS_PER_DEVICE)
            .then_some(Self(device << 3 | function))
    }

    pub fn from_raw(devfn: u8) -> Self {
        Self(devfn)
    }

    pub fn raw(self) -> u8 {
        self.0
    }

    pub fn device(self) -> u8 {
        self.0 >> 3
    }

    pub fn function(self) -> u8 {
        self.0 & 0x7
    }
}

impl fmt::Display for DevFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00:{:02x}.{}", self.device(), self.function())
    }
}

/// Told of every BAR a guest moves, with the function that owns it. Called
/// on the vCPU thread inside the root's `write`, with the root locked but
/// the function not: it must not lock the root, nor the bus the vCPU is
/// dispatching on unless that bus releases its lock before calling devices.
pub type BarMoveHandler = Box<dyn Fn(BarMove, DevFn) + Send>;

/// Q35's host bridge: identity only, no BARs.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x29c0,
                class_code: ClassCode::HOST_BRIDGE,
                ..PciHeader::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// PCI bus 0 and its configuration mechanism #1 ports.
pub struct PciRoot {
    functions: BTreeMap<DevFn, SharedPciDevice>,
    config_address: u32,
    on_bar_move: Option<BarMoveHandler>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        Self {
            functions: BTreeMap::from([(DevFn(0), bridge)]),
            config_address: 0,
            on_bar_move: None,
        }
    }

    /// Have `handler` told of BAR moves from now on.
    pub fn set_bar_move_handler(&mut self, handler: BarMoveHandler) {
        self.on_bar_move = Some(handler);
    }

    /// Every function on the bus, for the VMM to shut them down.
    pub fn functions(&self) -> Vec<SharedPciDevice> {
        self.functions.values().cloned().collect()
    }

    /// Put `device` at function 0 of the lowest free device number.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<DevFn, PciError> {
        let devfn = (1..DEVICES_PER_BUS)
            .filter_map(|d| DevFn::new(d, 0))
            .find(|d| !self.functions.keys().any(|f| f.device() == d.device()))
            .ok_or(PciError::BusFull)?;
        self.functions.insert(devfn, device);
        Ok(devfn)
    }

    /// Put `device` at `devfn`. Function 0 of a device with more functions
    /// must set the multifunction bit in its header, or guests never look
    /// past it.
    pub fn add_device_at(&mut self, devfn: DevFn, device: SharedPciDevice) -> Result<(), PciError> {
        if self.functions.contains_key(&devfn) {
            return Err(PciError::DevFnInUse(devfn));
        }
        self.functions.insert(devfn, device);
        Ok(())
    }

    /// The function at `devfn`.
    pub fn device(&self, devfn: DevFn) -> Option<SharedPciDevice> {
        self.functions.get(&devfn).cloned()
    }

    /// Configuration read of `devfn` on bus 0; all ones if absent.
    pub fn read_config(&self, devfn: DevFn, reg_offset: usize, data: &mut [u8]) {
        match self.functions.get(&devfn) {
            Some(f) => lock(f).read_config(reg_offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write of `devfn` on bus 0; a BAR it moves goes to the
    /// handler, after the function is unlocked.
    pub fn write_config(&self, devfn: DevFn, reg_offset: usize, data: &[u8]) {
        let Some(f) = self.functions.get(&devfn) else {
            return;
        };
        let moved = lock(f).write_config(reg_offset, data);
        if let (Some(mv), Some(handler)) = (moved, &self.on_bar_move) {
            handler(mv, devfn);
        }
    }

    /// The function and register CONFIG_ADDRESS selects, with `port_offset`
    /// (0..4) added, if it is enabled and on bus 0.
    fn selected(&self, port_offset: u64) -> Option<(DevFn, usize)> {
        let a = self.config_address;
        let bus = a >> 16 & 0xff;
        if a & ENABLE == 0 || bus != 0 {
            return None;
        }
        let devfn = DevFn::from_raw(u8::try_from(a >> 8 & 0xff).ok()?);
        let register = usize::try_from(a & 0xfc).ok()?;
        Some((devfn, register + usize::try_from(port_offset).ok()?))
    }

    /// Offset into CONFIG_DATA of a 1, 2 or 4-byte access that stays inside it.
    fn data_offset(offset: u64, len: usize) -> Option<u64> {
        let o = offset.checked_sub(CONFIG_DATA)?;
        let fits = matches!(len, 1 | 2 | 4) && o + u64::try_from(len).ok()? <= 4;
        fits.then_some(o)
    }
}

fn lock(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().expect("PCI device lock poisoned")
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
            return;
        }
        match Self::data_offset(offset, data.len()).and_then(|o| self.selected(o)) {
            Some((devfn, register)) => self.read_config(devfn, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CONFIG_ADDRESS {
            // Only dword writes latch; narrower ones are other ports' business.
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(b) & ADDRESS_BITS;
            }
            return;
        }
        if let Some((devfn, register)) =
            Self::data_offset(offset, data.len()).and_then(|o| self.selected(o))
        {
            self.write_config(devfn, register, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::device::tests::ScratchDevice;

    fn address(bus: u32, device: u32, function: u32, register: u32) -> [u8; 4] {
        (ENABLE | bus << 16 | device << 11 | function << 8 | register).to_le_bytes()
    }

    fn read(root: &mut PciRoot, port: u64, len: usize) -> u32 {
        let mut b = [0; 4];
        root.read(port - CONFIG_IO_BASE, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn root_with_scratch() -> (PciRoot, Arc<Mutex<ScratchDevice>>) {
        let mut root = PciRoot::new();
        let device = Arc::new(Mutex::new(ScratchDevice::new(0x11)));
        assert_eq!(
            root.add_device(device.clone()),
            DevFn::new(1, 0).ok_or(PciError::BusFull)
        );
        (root, device)
    }

    #[test]
    fn address_latch_takes_dword_writes_only() {
        let mut root = PciRoot::new();
        root.write(0, &0xffff_ffff_u32.to_le_bytes());
        assert_eq!(read(&mut root, 0xcf8, 4), 0x80ff_fffc);
        root.write(0, &[0, 0]);
        root.write(1, &[0]);
        assert_eq!(read(&mut root, 0xcf8, 4), 0x80ff_fffc);
        assert_eq!(read(&mut root, 0xcf8, 2), 0xffff);
        assert_eq!(read(&mut root, 0xcf9, 1), 0xff);
    }

    #[test]
    fn host_bridge_answers_at_00_00_0() {
        let mut root = PciRoot::new();
        root.write(0, &address(0, 0, 0, 0));
        assert_eq!(read(&mut root, 0xcfc, 4), 0x29c0_8086);
        root.write(0, &address(0, 0, 0, 8));
        assert_eq!(read(&mut root, 0xcfc, 4) >> 8, 0x06_0000);
    }

    #[test]
    fn data_port_takes_byte_word_and_dword_accesses() {
        let (mut root, _) = root_with_scratch();
        root.write(0, &address(0, 1, 0, 0));
        assert_eq!(read(&mut root, 0xcfc, 4), 0x0011_1234);
        assert_eq!(read(&mut root, 0xcfc, 2), 0x1234);
        assert_eq!(read(&mut root, 0xcfe, 2), 0x0011);
        assert_eq!(read(&mut root, 0xcfd, 1), 0x12);
        assert_eq!(read(&mut root, 0xcff, 1), 0x00);
        // Accesses running past 0xCFF, or of odd widths, read all ones.
        assert_eq!(read(&mut root, 0xcfe, 4), 0xffff_ffff);
        let mut three = [0; 3];
        root.read(4, &mut three);
        assert_eq!(three, [0xff; 3]);

        // Interrupt line at 0x3c: byte writes at 0xCFC, word at 0xCFE.
        root.write(0, &address(0, 1, 0, 0x3c));
        root.write(4, &[0x0b]);
        assert_eq!(read(&mut root, 0xcfc, 4), 0x0000_000b);
        root.write(0, &address(0, 1, 0, 0x0c));
        root.write(6, &[0x20, 0x00]);
        root.write(5, &[0x40]);
        assert_eq!(read(&mut root, 0xcfc, 4) & 0xff_ffff, 0x00_4000);
    }

    #[test]
    fn absent_functions_and_other_buses_read_all_ones() {
        let (mut root, _) = root_with_scratch();
        for (bus, device, function) in [(0, 2, 0), (0, 1, 1), (0, 31, 7), (1, 0, 0), (255, 1, 0)] {
            root.write(0, &address(bus, device, function, 0));
            assert_eq!(read(&mut root, 0xcfc, 4), 0xffff_ffff);
            assert_eq!(read(&mut root, 0xcfe, 2), 0xffff);
            root.write(4, &[0; 4]);
        }
        // Enable bit clear: nothing is selected.
        root.write(0, &0x0000_0800_u32.to_le_bytes());
        assert_eq!(read(&mut root, 0xcfc, 4), 0xffff_ffff);
        // Ports past the range are out of the root's hands.
        assert_eq!(read(&mut root, 0xd00, 1), 0xff);
    }

    #[test]
    fn bar_moves_reach_the_handler() {
        let (mut root, device) = root_with_scratch();
        device
            .lock()
            .unwrap()
            .config
            .set_bar_address(0, 0xc000_0000)
            .unwrap();
        let moves = Arc::new(Mutex::new(Vec::new()));
        let seen = moves.clone();
        root.set_bar_move_handler(Box::new(move |mv, devfn| {
            seen.lock().unwrap().push((mv, devfn));
        }));
        root.write(0, &address(0, 1, 0, 0x10));
        // Sizing is not a move.
        root.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(read(&mut root, 0xcfc, 4), 0xffff_f000);
        root.write(4, &0xc000_0000_u32.to_le_bytes());
        assert!(moves.lock().unwrap().is_empty());

        root.write(4, &0xd000_0000_u32.to_le_bytes());
        let mv = BarMove {
            bar: 0,
            old: 0xc000_0000,
            new: 0xd000_0000,
            len: 0x1000,
            kind: crate::pci::BarKind::Memory32 {
                prefetchable: false,
            },
        };
        assert_eq!(*moves.lock().unwrap(), [(mv, DevFn::new(1, 0).unwrap())]);
    }

    #[test]
    fn device_numbers_run_out_cleanly() {
        let mut root = PciRoot::new();
        for n in 1..32 {
            let devfn = root
                .add_device(Arc::new(Mutex::new(ScratchDevice::new(n))))
                .unwrap();
            assert_eq!(
                (devfn.device(), devfn.function()),
                (u8::try_from(n).unwrap(), 0)
            );
        }
        let extra = Arc::new(Mutex::new(ScratchDevice::new(0)));
        assert_eq!(root.add_device(extra.clone()), Err(PciError::BusFull));
        let at = DevFn::new(3, 0).unwrap();
        assert_eq!(
            root.add_device_at(at, extra.clone()),
            Err(PciError::DevFnInUse(at))
        );
        assert!(root.add_device_at(DevFn::new(3, 1).unwrap(), extra).is_ok());
        assert_eq!(DevFn::new(32, 0), None);
        assert_eq!(DevFn::new(0, 8), None);
        assert_eq!(DevFn::new(0x1f, 7).unwrap().to_string(), "00:1f.7");
    }
}
