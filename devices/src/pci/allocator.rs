//! Placing BARs before boot, as firmware would (PCI Local Bus Specification
//! 3.0, §6.2.5.1: a BAR is aligned to its power-of-two size).
//!
//! ```text
//!  I/O ports      0xC000 .. 0x10000         I/O BARs
//!  32-bit MMIO    PCI hole below 4 GiB      32-bit memory BARs
//!  64-bit MMIO    above the end of RAM      64-bit memory BARs
//! ```
//!
//! Each window is a bump allocator: addresses are handed out upwards and
//! never returned (guest BAR moves do not go through it). Allocating the
//! largest BARs first wastes the least to alignment, which is what
//! [`BarAllocator::place_bars`] does.

use std::ops::Range;

use super::{BarKind, PciConfiguration, PciError};

/// The conventional PC window for PCI I/O BARs.
pub const PCI_IO_WINDOW: Range<u64> = 0xc000..0x1_0000;

/// Size-aligned allocations from one address window.
#[derive(Clone, Debug)]
pub struct AddressAllocator {
    name: &'static str,
    window: Range<u64>,
    next: u64,
}

impl AddressAllocator {
    /// Allocate from `window`; `name` says which window in errors.
    pub fn new(name: &'static str, window: Range<u64>) -> Result<Self, PciError> {
        if window.is_empty() {
            return Err(PciError::WindowInvalid {
                window: name,
                start: window.start,
                end: window.end,
            });
        }
        Ok(Self {
            name,
            next: window.start,
            window,
        })
    }

    /// `size` bytes aligned to `size`, a power of two.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        if !size.is_power_of_two() {
            return Err(PciError::AllocationSizeInvalid(size));
        }
        let exhausted = PciError::WindowExhausted {
            window: self.name,
            size,
            start: self.window.start,
            end: self.window.end,
        };
        let base = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(exhausted.clone())?;
        let end = base
            .checked_add(size)
            .filter(|&end| end <= self.window.end)
            .ok_or(exhausted)?;
        self.next = end;
        Ok(base)
    }
}

/// The three BAR windows of a PC-style machine.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    io: AddressAllocator,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
}

impl BarAllocator {
    pub fn new(io: Range<u64>, mmio32: Range<u64>, mmio64: Range<u64>) -> Result<Self, PciError> {
        Ok(Self {
            io: AddressAllocator::new("PCI I/O port", io)?,
            mmio32: AddressAllocator::new("32-bit PCI MMIO", mmio32)?,
            mmio64: AddressAllocator::new("64-bit PCI MMIO", mmio64)?,
        })
    }

    /// An address for a BAR of `kind` and `size`, from the window that
    /// suits the kind.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, PciError> {
        match kind {
            BarKind::Io => self.io.allocate(size),
            BarKind::Memory32 { .. } => self.mmio32.allocate(size),
            BarKind::Memory64 { .. } => self.mmio64.allocate(size),
        }
    }

    /// Allocate and program every BAR of `config`, largest first.
    pub fn place_bars(&mut self, config: &mut PciConfiguration) -> Result<(), PciError> {
        let mut bars: Vec<_> = config.bars().collect();
        bars.sort_by_key(|(_, bar)| std::cmp::Reverse(bar.size));
        for (index, bar) in bars {
            let address = self.allocate(bar.kind, bar.size)?;
            config.set_bar_address(index, address)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciHeader;

    const MEM32: BarKind = BarKind::Memory32 {
        prefetchable: false,
    };
    const MEM64: BarKind = BarKind::Memory64 {
        prefetchable: false,
    };

    fn allocator() -> BarAllocator {
        BarAllocator::new(
            PCI_IO_WINDOW,
            0xc000_0000..0xfec0_0000,
            0x1_0000_0000..0x2_0000_0000,
        )
        .unwrap()
    }

    #[test]
    fn allocations_are_size_aligned() {
        let mut a = AddressAllocator::new("test", 0x1008..0x10000).unwrap();
        assert_eq!(a.allocate(0x8), Ok(0x1008));
        assert_eq!(a.allocate(0x100), Ok(0x1100));
        assert_eq!(a.allocate(0x4), Ok(0x1200));
        assert_eq!(a.allocate(0x1000), Ok(0x2000));
        assert_eq!(
            a.allocate(0x3000),
            Err(PciError::AllocationSizeInvalid(0x3000))
        );
        assert_eq!(a.allocate(0), Err(PciError::AllocationSizeInvalid(0)));
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = AddressAllocator::new("test", 0xc000..0x1_0000).unwrap();
        assert_eq!(a.allocate(0x4000), Ok(0xc000));
        assert!(matches!(
            a.allocate(0x4),
            Err(PciError::WindowExhausted { size: 4, .. })
        ));
        let mut a = AddressAllocator::new("top", u64::MAX - 0xfff..u64::MAX).unwrap();
        assert!(a.allocate(1 << 63).is_err());
        assert!(a.allocate(0x1000).is_err());
        assert!(AddressAllocator::new("empty", 0x10..0x10).is_err());
    }

    #[test]
    fn kinds_go_to_their_windows_largest_first() {
        let mut a = allocator();
        assert_eq!(a.allocate(BarKind::Io, 0x20), Ok(0xc000));

        let mut config = PciConfiguration::new(&PciHeader::default());
        config.add_bar(0, MEM32, 0x1000).unwrap();
        config.add_bar(1, MEM32, 0x10_0000).unwrap();
        config.add_bar(2, MEM64, 0x4000).unwrap();
        config.add_bar(4, BarKind::Io, 0x100).unwrap();
        a.place_bars(&mut config).unwrap();
        let address = |i| config.bar(i).unwrap().address;
        assert_eq!(address(1), 0xc000_0000);
        assert_eq!(address(0), 0xc010_0000);
        assert_eq!(address(2), 0x1_0000_0000);
        assert_eq!(address(4), 0xc100);
        assert_eq!(config.u32_at(0x18), 0x4);
        assert_eq!(config.u32_at(0x1c), 0x1);
    }
}
