//! A type-0 PCI configuration space: the 256 bytes a function shows through
//! configuration cycles (PCI Local Bus Specification 3.0, §6.1 to §6.2.5 and
//! §6.7 for the capability list).
//!
//! ```text
//!  0x00  device id      | vendor id
//!  0x04  status (RW1C)  | command
//!  0x08  class code (class, subclass, prog-if) | revision
//!  0x0c  BIST | header type | latency timer | cache line size
//!  0x10  BAR0 .. 0x24 BAR5          (a 64-bit BAR takes two registers)
//!  0x2c  subsystem id   | subsystem vendor id
//!  0x30  expansion ROM (not implemented: reads 0, so sizing finds nothing)
//!  0x34  capabilities pointer
//!  0x3c  max_lat | min_gnt | interrupt pin | interrupt line
//!  0x40  capabilities, each: id | next | body ..., linked from 0x34
//! ```
//!
//! Every byte has a guest-writable mask and a write-one-to-clear mask, so a
//! guest write can only change what the spec lets it change. BAR address
//! masks are `!(size - 1)`, which is what makes the sizing protocol work: the
//! guest writes all ones and reads back the size mask with the type bits.

use super::bar::{BarKind, BarMove, PciBar};
use super::{hi32, lo32, PciError};

/// Size of a conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Base address registers in a type-0 header.
pub const NUM_BARS: usize = 6;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const PROG_IF: usize = 0x09;
const SUBCLASS: usize = 0x0a;
const CLASS: usize = 0x0b;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// Start of the device-specific area, where capabilities live.
const DEVICE_SPECIFIC: usize = 0x40;

/// Command register: respond to I/O space accesses.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: respond to memory space accesses.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx assertion disabled.
pub const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
/// Command bits a guest may change: the four above plus parity error
/// response (6) and SERR# enable (8).
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | 1 << 6
    | 1 << 8
    | COMMAND_INTERRUPT_DISABLE;

/// Status register: INTx pending (read-only, set by the device).
const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status register: the capabilities pointer is valid.
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status error bits the guest clears by writing one: master data parity
/// error (8), signaled target abort (11), received target/master abort
/// (12, 13), signaled system error (14), detected parity error (15).
const STATUS_W1C: u16 = 1 << 8 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15;

const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Class, subclass and programming interface (§6.2.1, appendix D).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCode {
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
}

impl ClassCode {
    /// Host bridge (06/00/00).
    pub const HOST_BRIDGE: Self = Self::new(0x06, 0x00, 0x00);

    pub const fn new(class: u8, subclass: u8, prog_if: u8) -> Self {
        Self {
            class,
            subclass,
            prog_if,
        }
    }
}

/// The interrupt pin register (§6.2.4): which INTx# the function uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InterruptPin {
    #[default]
    None = 0,
    IntA = 1,
    IntB = 2,
    IntC = 3,
    IntD = 4,
}

/// The read-only identity of a function, fixed when it is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class_code: ClassCode,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// Header type bit 7: the device has functions other than 0.
    pub multifunction: bool,
    pub interrupt_pin: InterruptPin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Free,
    Region(PciBar),
    /// Upper half of the 64-bit BAR in the register before it.
    Upper,
}

/// A function's configuration space with its write masks and BAR map.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    write_one_to_clear: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    /// Where the next capability goes.
    next_capability: usize,
    last_capability: Option<usize>,
}

fn bar_register(index: usize) -> usize {
    BAR0 + 4 * index
}

/// A configuration transaction is one dword with byte enables (§3.2.2.3.2),
/// so an access must stay inside one aligned dword.
fn access_valid(offset: usize, len: usize) -> bool {
    (1..=4).contains(&len)
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= CONFIG_SPACE_SIZE && offset / 4 == (end - 1) / 4)
}

impl PciConfiguration {
    /// A function with identity `header`, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut c = Self {
            regs: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            write_one_to_clear: [0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Free; NUM_BARS],
            next_capability: DEVICE_SPECIFIC,
            last_capability: None,
        };
        c.put_u16(VENDOR_ID, header.vendor_id);
        c.put_u16(DEVICE_ID, header.device_id);
        c.regs[REVISION_ID] = header.revision_id;
        c.regs[PROG_IF] = header.class_code.prog_if;
        c.regs[SUBCLASS] = header.class_code.subclass;
        c.regs[CLASS] = header.class_code.class;
        c.regs[HEADER_TYPE] = if header.multifunction {
            HEADER_TYPE_MULTIFUNCTION
        } else {
            0
        };
        c.put_u16(SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        c.put_u16(SUBSYSTEM_ID, header.subsystem_id);
        c.regs[INTERRUPT_PIN] = header.interrupt_pin as u8;

        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.write_one_to_clear[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        c.writable[CACHE_LINE_SIZE] = 0xff;
        c.writable[LATENCY_TIMER] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Guest read of `data.len()` bytes at `offset`. Accesses that are not
    /// 1 to 4 bytes inside one dword read as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if access_valid(offset, data.len()) {
            data.copy_from_slice(&self.regs[offset..offset + data.len()]);
        } else {
            data.fill(0xff);
        }
    }

    /// Guest write at `offset`, through the write masks. Returns the BAR
    /// move this write completes, if any. Invalid accesses are ignored.
    ///
    /// Writes that leave a BAR register holding all its address bits set are
    /// the sizing protocol, not a move, and are not reported; nor is any
    /// write while either half of a 64-bit BAR is in that state. A guest that
    /// moves a 64-bit BAR across a 4 GiB boundary writes the halves one at a
    /// time, so it produces two moves, the first to an intermediate address.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        if !access_valid(offset, data.len()) {
            return None;
        }
        for (at, &value) in (offset..).zip(data) {
            let writable = self.writable[at];
            let clear = self.write_one_to_clear[at] & value;
            self.regs[at] = ((self.regs[at] & !writable) | (value & writable)) & !clear;
        }
        let register = offset & !3;
        let index = register
            .checked_sub(BAR0)
            .map(|o| o / 4)
            .filter(|&i| i < NUM_BARS)?;
        self.detect_bar_move(index)
    }

    fn detect_bar_move(&mut self, index: usize) -> Option<BarMove> {
        let index = match self.bars[index] {
            BarSlot::Free => return None,
            BarSlot::Upper => index.checked_sub(1)?,
            BarSlot::Region(_) => index,
        };
        let BarSlot::Region(bar) = self.bars[index] else {
            return None;
        };
        let lower = bar_register(index);
        if self.sizing(lower) {
            return None;
        }
        let mut new = u64::from(self.dword(lower) & bar.kind.address_bits());
        if let BarKind::Memory64 { .. } = bar.kind {
            let upper = bar_register(index + 1);
            if self.sizing(upper) {
                return None;
            }
            new |= u64::from(self.dword(upper)) << 32;
        }
        if new == bar.address {
            return None;
        }
        self.bars[index] = BarSlot::Region(PciBar {
            address: new,
            ..bar
        });
        Some(BarMove {
            bar: index,
            old: bar.address,
            new,
            len: bar.size,
            kind: bar.kind,
        })
    }

    /// The register holds all its writable bits: the guest is sizing it.
    fn sizing(&self, register: usize) -> bool {
        let mask = self.dword_of(&self.writable, register);
        mask != 0 && self.dword(register) & mask == mask
    }

    /// Register BAR `index` (§6.2.5.1). `size` must be a power of two the
    /// type can describe. The BAR starts at address 0 until
    /// [`Self::set_bar_address`] places it.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), PciError> {
        let slots = if let BarKind::Memory64 { .. } = kind {
            2
        } else {
            1
        };
        let last = index + slots - 1;
        if index >= NUM_BARS || last >= NUM_BARS {
            return Err(PciError::BarIndexInvalid(last));
        }
        if self.bars[index..=last].iter().any(|s| *s != BarSlot::Free) {
            return Err(PciError::BarInUse(index));
        }
        let (min, max) = kind.size_limits();
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSizeInvalid {
                bar: index,
                size,
                min,
                max,
            });
        }
        let size_mask = !(size - 1);
        let lower = bar_register(index);
        self.put_dword(lower, kind.type_bits());
        self.put_mask(lower, lo32(size_mask) & kind.address_bits());
        if slots == 2 {
            self.put_mask(bar_register(last), hi32(size_mask));
            self.bars[last] = BarSlot::Upper;
        }
        self.bars[index] = BarSlot::Region(PciBar {
            kind,
            size,
            address: 0,
        });
        Ok(())
    }

    /// Place BAR `index` at `address` (the VMM's initial assignment; not
    /// reported as a move).
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::BarNotRegistered(index))?;
        let fits = address
            .checked_add(bar.size)
            .is_some_and(|end| end <= bar.kind.address_limit());
        // Sizes are powers of two.
        if address & (bar.size - 1) != 0 || !fits {
            return Err(PciError::BarAddressInvalid {
                bar: index,
                address,
                size: bar.size,
            });
        }
        let lower = bar_register(index);
        self.put_dword(lower, lo32(address) | bar.kind.type_bits());
        if let BarKind::Memory64 { .. } = bar.kind {
            self.put_dword(lower + 4, hi32(address));
        }
        self.bars[index] = BarSlot::Region(PciBar { address, ..bar });
        Ok(())
    }

    /// BAR `index`, if one starts there (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        match self.bars.get(index)? {
            BarSlot::Region(bar) => Some(*bar),
            _ => None,
        }
    }

    /// Every registered BAR with its index.
    pub fn bars(&self) -> impl Iterator<Item = (usize, PciBar)> + '_ {
        (0..NUM_BARS).filter_map(|i| Some((i, self.bar(i)?)))
    }

    /// The command register lets BAR `index` decode accesses (I/O or memory
    /// space enable, §6.2.2).
    pub fn bar_decoded(&self, index: usize) -> bool {
        let Some(bar) = self.bar(index) else {
            return false;
        };
        let enable = if bar.kind.is_io() {
            COMMAND_IO_SPACE
        } else {
            COMMAND_MEMORY_SPACE
        };
        self.command() & enable != 0
    }

    /// Append a capability (§6.7) with `id` and `body` (the bytes after the
    /// id and next-pointer bytes); returns its offset. The body is read-only
    /// until [`Self::set_write_mask`] opens bits of it.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let start = self.next_capability;
        let full = PciError::CapabilitySpaceFull { id, len };
        let end = start
            .checked_add(len)
            .filter(|&e| e <= CONFIG_SPACE_SIZE)
            .ok_or(full)?;
        let pointer = u8::try_from(start).map_err(|_| PciError::CapabilitySpaceFull { id, len })?;
        self.regs[start] = id;
        self.regs[start + 1] = 0;
        self.regs[start + 2..end].copy_from_slice(body);
        match self.last_capability {
            None => self.regs[CAPABILITIES_POINTER] = pointer,
            Some(previous) => self.regs[previous + 1] = pointer,
        }
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
        self.put_u16(STATUS, status);
        self.last_capability = Some(start);
        // Capabilities are dword aligned (§6.7).
        self.next_capability = end.next_multiple_of(4);
        Ok(start)
    }

    /// Offset of the first capability with `id`, walking from 0x34.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        self.capabilities().find(|&(i, _)| i == id).map(|(_, o)| o)
    }

    /// `(id, offset)` of each capability in list order.
    pub fn capabilities(&self) -> impl Iterator<Item = (u8, usize)> + '_ {
        let first = usize::from(self.regs[CAPABILITIES_POINTER]);
        std::iter::successors(Some(first), |&o| {
            self.regs.get(o + 1).map(|&n| usize::from(n))
        })
        // The list only points into the device-specific area; the bound
        // stops a loop should a device model build one.
        .take_while(|&o| (DEVICE_SPECIFIC..CONFIG_SPACE_SIZE - 1).contains(&o))
        .take((CONFIG_SPACE_SIZE - DEVICE_SPECIFIC) / 4)
        .map(|o| (self.regs[o], o))
    }

    /// Let the guest write the bits set in `mask` at `offset` (device-specific
    /// area only: the header's masks are fixed by the spec).
    pub fn set_write_mask(&mut self, offset: usize, mask: &[u8]) -> Result<(), PciError> {
        let range = Self::device_specific(offset, mask.len())?;
        self.writable[range].copy_from_slice(mask);
        Ok(())
    }

    /// Device-side write of registers in the device-specific area, bypassing
    /// the masks (e.g. pending bits a guest can only read).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) -> Result<(), PciError> {
        let range = Self::device_specific(offset, data.len())?;
        self.regs[range].copy_from_slice(data);
        Ok(())
    }

    fn device_specific(offset: usize, len: usize) -> Result<std::ops::Range<usize>, PciError> {
        offset
            .checked_add(len)
            .filter(|&end| offset >= DEVICE_SPECIFIC && end <= CONFIG_SPACE_SIZE)
            .map(|end| offset..end)
            .ok_or(PciError::ConfigRangeInvalid { offset, len })
    }

    /// Little-endian 16 bits at `offset` (all ones past the end).
    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut b = [0xff; 2];
        if let Some(s) = self.regs.get(offset..offset.saturating_add(2)) {
            b.copy_from_slice(s);
        }
        u16::from_le_bytes(b)
    }

    /// Little-endian 32 bits at `offset` (all ones past the end).
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0xff; 4];
        if let Some(s) = self.regs.get(offset..offset.saturating_add(4)) {
            b.copy_from_slice(s);
        }
        u32::from_le_bytes(b)
    }

    pub fn vendor_id(&self) -> u16 {
        self.u16_at(VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.u16_at(DEVICE_ID)
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// The guest let the function master the bus (needed for DMA and MSI).
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// The guest disabled INTx for this function.
    pub fn interrupt_disabled(&self) -> bool {
        self.command() & COMMAND_INTERRUPT_DISABLE != 0
    }

    /// Reflect INTx assertion in status bit 3 (§6.2.3).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let status = self.u16_at(STATUS);
        let status = if asserted {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.put_u16(STATUS, status);
    }

    /// Interrupt line register: the IRQ the platform routed INTx to.
    pub fn interrupt_line(&self) -> u8 {
        self.regs[INTERRUPT_LINE]
    }

    pub fn set_interrupt_line(&mut self, line: u8) {
        self.regs[INTERRUPT_LINE] = line;
    }

    fn dword(&self, offset: usize) -> u32 {
        self.dword_of(&self.regs, offset)
    }

    fn dword_of(&self, bytes: &[u8; CONFIG_SPACE_SIZE], offset: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    fn put_dword(&mut self, offset: usize, value: u32) {
        self.regs[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn put_mask(&mut self, offset: usize, mask: u32) {
        self.writable[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    }

    fn put_u16(&mut self, offset: usize, value: u16) {
        self.regs[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: BarKind = BarKind::Memory32 {
        prefetchable: false,
    };
    const MEM64_PF: BarKind = BarKind::Memory64 { prefetchable: true };

    fn config() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: ClassCode::new(0x01, 0x06, 0x01),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0002,
            multifunction: true,
            interrupt_pin: InterruptPin::IntA,
        })
    }

    fn read32(c: &PciConfiguration, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(c: &mut PciConfiguration, offset: usize, v: u32) -> Option<BarMove> {
        c.write(offset, &v.to_le_bytes())
    }

    #[test]
    fn header_fields_read_back() {
        let c = config();
        assert_eq!(read32(&c, 0x00), 0x1042_1af4);
        assert_eq!(read32(&c, 0x08), 0x0106_0101);
        assert_eq!(read32(&c, 0x0c) >> 16 & 0xff, 0x80);
        assert_eq!(read32(&c, 0x2c), 0x0002_1af4);
        assert_eq!(read32(&c, 0x3c) >> 8 & 0xff, 1);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = config();
        let before: Vec<u32> = (0..64).map(|r| read32(&c, r * 4)).collect();
        for r in [0x00, 0x08, 0x2c, 0x30, 0x34] {
            write32(&mut c, r, 0xffff_ffff);
            assert_eq!(read32(&c, r), before[r / 4], "register {r:#x}");
        }
        // Header type is read-only; cache line size and latency timer are not.
        write32(&mut c, 0x0c, 0xffff_ffff);
        assert_eq!(read32(&c, 0x0c), 0x0080_ffff);
        // Only the defined command bits stick.
        c.write(0x04, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // Interrupt line is writable, pin is not.
        write32(&mut c, 0x3c, 0xffff_ffff);
        assert_eq!(read32(&c, 0x3c), 0x0000_01ff);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut c = config();
        c.put_u16(STATUS, STATUS_W1C | STATUS_INTERRUPT);
        c.write(0x06, &(1u16 << 13).to_le_bytes());
        assert_eq!(
            c.u16_at(STATUS),
            (STATUS_W1C & !(1 << 13)) | STATUS_INTERRUPT
        );
        c.write(0x06, &[0xff, 0xff]);
        assert_eq!(c.u16_at(STATUS), STATUS_INTERRUPT);
    }

    #[test]
    fn accesses_crossing_a_dword_are_refused() {
        let mut c = config();
        let mut b = [0; 2];
        c.read(0x03, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut b = [0; 8];
        c.read(0x00, &mut b);
        assert_eq!(b, [0xff; 8]);
        let mut b = [0; 1];
        c.read(0x100, &mut b);
        assert_eq!(b, [0xff]);
        c.read(usize::MAX, &mut b);
        assert_eq!(c.write(0x3b, &[0xff, 0xff]), None);
        assert_eq!(c.interrupt_line(), 0);
        assert_eq!(c.write(usize::MAX, &[1]), None);
        assert_eq!(c.write(0x04, &[]), None);
    }

    #[test]
    fn io_bar_sizing_reads_back_the_size_mask() {
        let mut c = config();
        c.add_bar(0, BarKind::Io, 0x20).unwrap();
        c.set_bar_address(0, 0xc040).unwrap();
        assert_eq!(read32(&c, 0x10), 0xc041);
        assert_eq!(write32(&mut c, 0x10, 0xffff_ffff), None);
        // Address bits 31:16 are hardwired to zero; bit 0 says I/O.
        assert_eq!(read32(&c, 0x10), 0x0000_ffe1);
        assert_eq!(write32(&mut c, 0x10, 0xc041), None);
        assert_eq!(c.bar(0).unwrap().address, 0xc040);
    }

    #[test]
    fn mem32_bar_sizing_reads_back_the_size_mask() {
        let mut c = config();
        c.add_bar(1, BarKind::Memory32 { prefetchable: true }, 0x1000)
            .unwrap();
        c.set_bar_address(1, 0xc000_0000).unwrap();
        assert_eq!(read32(&c, 0x14), 0xc000_0008);
        assert_eq!(write32(&mut c, 0x14, 0xffff_ffff), None);
        assert_eq!(read32(&c, 0x14), 0xffff_f008);
        assert_eq!(write32(&mut c, 0x14, 0xc000_0000), None);
    }

    #[test]
    fn mem64_bar_sizing_covers_both_halves() {
        let mut c = config();
        c.add_bar(2, MEM64_PF, 1 << 33).unwrap();
        c.set_bar_address(2, 0x40_0000_0000).unwrap();
        assert_eq!(read32(&c, 0x18), 0x0000_000c);
        assert_eq!(read32(&c, 0x1c), 0x40);
        // Halves sized one after the other, in either order.
        assert_eq!(write32(&mut c, 0x18, 0xffff_ffff), None);
        assert_eq!(write32(&mut c, 0x1c, 0xffff_ffff), None);
        assert_eq!(read32(&c, 0x18), 0x0000_000c);
        assert_eq!(read32(&c, 0x1c), 0xffff_fffe);
        assert_eq!(write32(&mut c, 0x18, 0x0000_000c), None);
        assert_eq!(write32(&mut c, 0x1c, 0x40), None);

        let mut c = config();
        c.add_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0x4000,
        )
        .unwrap();
        write32(&mut c, 0x10, 0xffff_ffff);
        write32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(read32(&c, 0x10), 0xffff_c004);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
    }

    #[test]
    fn guest_moves_are_reported() {
        let mut c = config();
        c.add_bar(0, BarKind::Io, 0x10).unwrap();
        c.add_bar(1, MEM, 0x1000).unwrap();
        c.add_bar(2, MEM64_PF, 0x4000).unwrap();
        c.set_bar_address(0, 0xc000).unwrap();
        c.set_bar_address(1, 0xc000_0000).unwrap();
        c.set_bar_address(2, 0x1_0000_0000).unwrap();

        assert_eq!(
            write32(&mut c, 0x10, 0xd001),
            Some(BarMove {
                bar: 0,
                old: 0xc000,
                new: 0xd000,
                len: 0x10,
                kind: BarKind::Io
            })
        );
        // A byte write to the top of a 32-bit BAR moves it too.
        let mv = c.write(0x17, &[0xd0]).unwrap();
        assert_eq!(
            (mv.bar, mv.old, mv.new, mv.kind),
            (1, 0xc000_0000, 0xd000_0000, MEM)
        );
        // Low bits below the size are not address bits.
        assert_eq!(write32(&mut c, 0x14, 0xd000_0fff), None);

        // 64-bit: the low half moves within the 4 GiB page, then the high half.
        let mv = write32(&mut c, 0x18, 0x8000_0000).unwrap();
        assert_eq!((mv.bar, mv.old, mv.new), (2, 0x1_0000_0000, 0x1_8000_0000));
        let mv = write32(&mut c, 0x1c, 0x2).unwrap();
        assert_eq!(
            (mv.bar, mv.old, mv.new, mv.len),
            (2, 0x1_8000_0000, 0x2_8000_0000, 0x4000)
        );
        assert_eq!(c.bar(2).unwrap().address, 0x2_8000_0000);
        assert_eq!(write32(&mut c, 0x1c, 0x2), None);
    }

    #[test]
    fn command_register_gates_decoding() {
        let mut c = config();
        c.add_bar(0, BarKind::Io, 0x10).unwrap();
        c.add_bar(1, MEM, 0x1000).unwrap();
        assert!(!c.bar_decoded(0) && !c.bar_decoded(1));
        c.write(0x04, &COMMAND_IO_SPACE.to_le_bytes());
        assert!(c.bar_decoded(0) && !c.bar_decoded(1));
        c.write(0x04, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert!(!c.bar_decoded(0) && c.bar_decoded(1));
        assert!(!c.bar_decoded(2) && !c.bar_decoded(99));
    }

    #[test]
    fn bar_registration_is_checked() {
        let mut c = config();
        assert!(matches!(
            c.add_bar(0, MEM, 0x1800),
            Err(PciError::BarSizeInvalid { .. })
        ));
        assert!(matches!(
            c.add_bar(0, MEM, 8),
            Err(PciError::BarSizeInvalid { .. })
        ));
        assert!(matches!(
            c.add_bar(0, BarKind::Io, 512),
            Err(PciError::BarSizeInvalid { .. })
        ));
        assert_eq!(c.add_bar(6, MEM, 0x1000), Err(PciError::BarIndexInvalid(6)));
        assert_eq!(
            c.add_bar(5, MEM64_PF, 0x1000),
            Err(PciError::BarIndexInvalid(6))
        );
        c.add_bar(1, MEM64_PF, 0x1000).unwrap();
        assert_eq!(c.add_bar(2, MEM, 0x1000), Err(PciError::BarInUse(2)));
        assert_eq!(c.add_bar(0, MEM64_PF, 0x1000), Err(PciError::BarInUse(0)));
        assert_eq!(c.bar(2), None);
        assert!(matches!(
            c.set_bar_address(1, 0x1800),
            Err(PciError::BarAddressInvalid { .. })
        ));
        assert_eq!(c.set_bar_address(3, 0), Err(PciError::BarNotRegistered(3)));
        c.add_bar(3, MEM, 0x1000).unwrap();
        assert!(c.set_bar_address(3, 0xffff_f000).is_ok());
        assert!(c.set_bar_address(3, 0x1_0000_0000).is_err());
        assert_eq!(c.bars().map(|(i, _)| i).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn capability_list_walks_from_0x34() {
        let mut c = config();
        assert_eq!(c.u16_at(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = c.add_capability(0x05, &[1, 2, 3]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        let d = c.add_capability(0x09, &[]).unwrap();
        assert_eq!((a, b, d), (0x40, 0x48, 0x54));
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES_LIST, 0);

        // Walk it as a guest would, with byte reads.
        let mut seen = Vec::new();
        let mut p = [0u8];
        c.read(0x34, &mut p);
        while p[0] != 0 {
            let at = usize::from(p[0]);
            let mut id = [0u8];
            c.read(at, &mut id);
            seen.push((id[0], at));
            c.read(at + 1, &mut p);
        }
        assert_eq!(seen, [(0x05, 0x40), (0x11, 0x48), (0x09, 0x54)]);
        assert_eq!(c.capabilities().collect::<Vec<_>>(), seen);
        assert_eq!(c.find_capability(0x11), Some(0x48));
        assert_eq!(c.find_capability(0x10), None);
        assert_eq!(c.u32_at(0x40) >> 16, 0x0201);

        // Bodies are read-only until opened.
        write32(&mut c, 0x40, 0xffff_ffff);
        assert_eq!(c.u32_at(0x40), 0x0201_4805);
        c.set_write_mask(0x42, &[0x0f]).unwrap();
        write32(&mut c, 0x40, 0xffff_ffff);
        assert_eq!(c.u32_at(0x40), 0x020f_4805);
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut c = config();
        c.add_capability(0x09, &[0; 180]).unwrap();
        assert_eq!(
            c.add_capability(0x09, &[0; 20]),
            Err(PciError::CapabilitySpaceFull { id: 0x09, len: 22 })
        );
        assert_eq!(c.add_capability(0x09, &[0; 6]), Ok(0xf8));
        assert!(c.add_capability(0x09, &[]).is_err());
        assert!(c.set_write_mask(0x3c, &[0xff]).is_err());
        assert!(c.set_bytes(0xff, &[0, 0]).is_err());
        assert!(c.set_bytes(usize::MAX, &[0]).is_err());
    }
}
