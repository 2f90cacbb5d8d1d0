//! Base address registers (PCI Local Bus Specification 3.0, §6.2.5.1): what
//! a BAR decodes, how its register encodes that, and the move a guest makes
//! by reprogramming it.
//!
//! ```text
//!  I/O BAR     31..16 zero (64 KiB of ports) | 15..2 address | 1 0 | 0 = 1
//!  memory BAR  31..4 address | 3 prefetchable | 2..1 type (00 32-bit,
//!              10 64-bit: the next register holds address bits 63..32) | 0 = 0
//! ```
//!
//! Address bits below the size read as zero, so a guest that writes all ones
//! reads back `!(size - 1)` with the type bits: that is how it sizes a BAR.

const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;
/// I/O BARs hardwire address bits 31:16 to zero: x86 has 64 KiB of ports
/// (§6.2.5.1 allows this for functions that decode only 16 bits).
const BAR_IO_ADDRESS: u32 = 0x0000_fffc;
const BAR_MEM_ADDRESS: u32 = 0xffff_fff0;

/// What a BAR decodes (§6.2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O, 4 to 256 bytes.
    Io,
    /// Memory anywhere below 4 GiB.
    Memory32 { prefetchable: bool },
    /// Memory anywhere in 64 bits; takes this BAR register and the next.
    Memory64 { prefetchable: bool },
}

impl BarKind {
    /// Port I/O rather than memory.
    pub fn is_io(self) -> bool {
        self == BarKind::Io
    }

    /// Smallest and largest size the BAR type can describe. The 256-byte
    /// I/O limit is §6.2.5.1's; memory BARs have four type bits below the
    /// address.
    pub(super) fn size_limits(self) -> (u64, u64) {
        match self {
            BarKind::Io => (4, 256),
            BarKind::Memory32 { .. } => (16, 1 << 31),
            BarKind::Memory64 { .. } => (16, 1 << 63),
        }
    }

    /// First address past what the BAR can reach.
    pub(super) fn address_limit(self) -> u64 {
        match self {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 { .. } => 1 << 32,
            BarKind::Memory64 { .. } => u64::MAX,
        }
    }

    /// Read-only low bits of the (lower) BAR register.
    pub(super) fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Memory32 { prefetchable } => prefetchable_bit(prefetchable),
            BarKind::Memory64 { prefetchable } => BAR_MEM_64 | prefetchable_bit(prefetchable),
        }
    }

    pub(super) fn address_bits(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_ADDRESS,
            _ => BAR_MEM_ADDRESS,
        }
    }
}

fn prefetchable_bit(prefetchable: bool) -> u32 {
    if prefetchable {
        BAR_MEM_PREFETCHABLE
    } else {
        0
    }
}

/// A registered BAR and where it is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    pub kind: BarKind,
    pub size: u64,
    /// Where the VMM last placed it, or the guest last moved it to.
    pub address: u64,
}

/// A guest configuration write moved BAR `bar` from `old` to `new`: the VMM
/// should move the BAR's `len`-byte window on the bus `kind` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old: u64,
    pub new: u64,
    pub len: u64,
    pub kind: BarKind,
}
