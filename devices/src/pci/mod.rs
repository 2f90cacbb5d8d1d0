//! PCI: configuration space, capabilities, BARs, MSI/MSI-X and the host bridge.
//!
//! Models a conventional PCI bus 0 as the guest sees it on a PC (PCI Local
//! Bus Specification 3.0), with MSI-X as the PCI Express Base Specification
//! describes it (§7.7.2). Pieces, by responsibility:
//!
//! ```text
//!   vCPU port I/O 0xCF8..0xD00            vCPU MMIO / port I/O at a BAR
//!              |                                      |
//!        PciRoot (root.rs)                  PciBarWindow (device.rs)
//!   config mechanism #1, devices             decode check, forwards
//!   by device number, host bridge                     |
//!              |                                      v
//!              +----------> dyn PciDevice (device.rs) <----+
//!                           |  config: PciConfiguration   |
//!                           |  (config.rs: header, BARs,  |
//!                           |   capability list, masks)   |
//!                           |  MsiCapability (msi.rs)     |
//!                           |  MsixCapability (msix.rs)   |
//!                           +-----------------------------+
//! ```
//!
//! A guest write that moves a BAR comes back as a [`BarMove`]; the root hands
//! it to the VMM's callback so the VMM can move the [`PciBarWindow`] on its
//! bus. [`BarAllocator`] (allocator.rs) places BARs before boot.
//!
//! Everything here parses guest-controlled values, so truncating casts are
//! denied: conversions are checked or masked first.

#![deny(clippy::cast_possible_truncation)]

mod allocator;
mod bar;
mod config;
mod device;
mod msi;
mod msix;
mod root;

pub use allocator::{AddressAllocator, BarAllocator, PCI_IO_WINDOW};
pub use bar::{BarKind, BarMove, PciBar};
pub use config::{
    ClassCode, InterruptPin, PciConfiguration, PciHeader, COMMAND_BUS_MASTER,
    COMMAND_INTERRUPT_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE, NUM_BARS,
};
pub use device::{PciBarWindow, PciDevice, SharedPciDevice, SHUTDOWN_TIMEOUT};
pub use msi::MsiCapability;
pub use msix::{MsixCapability, MsixLocation, MSIX_MAX_VECTORS};
pub use root::{BarMoveHandler, DevFn, PciRoot, CONFIG_IO_BASE, CONFIG_IO_LEN};

/// Errors from building PCI functions and placing them.
///
/// Guest accesses never fail with these: a bad guest access is ignored or
/// reads as all ones, as on real hardware. These are wiring mistakes in the
/// VMM or in a device model.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// BAR index outside 0..=5.
    #[error("BAR index {0} is out of range; a type-0 header has BARs 0 to 5")]
    BarIndexInvalid(usize),
    /// The BAR register (or, for a 64-bit BAR, the next one) is taken.
    #[error("BAR {0} is already in use (a 64-bit BAR also takes the register after it)")]
    BarInUse(usize),
    /// Size not a power of two or outside what the BAR type can describe.
    #[error("BAR {bar} size {size:#x} is invalid: use a power of two from {min:#x} to {max:#x}")]
    BarSizeInvalid {
        bar: usize,
        size: u64,
        min: u64,
        max: u64,
    },
    /// Nothing registered at that BAR index.
    #[error("BAR {0} is not registered on this function")]
    BarNotRegistered(usize),
    /// The address is not a multiple of the BAR size or does not fit the BAR type.
    #[error("address {address:#x} does not suit BAR {bar} of size {size:#x}: it must be size-aligned and fit the BAR's address width")]
    BarAddressInvalid { bar: usize, address: u64, size: u64 },
    /// The capability does not fit in the 256-byte configuration space.
    #[error("capability {id:#04x} of {len} bytes does not fit in configuration space; drop a capability")]
    CapabilitySpaceFull { id: u8, len: usize },
    /// A device-side access outside the device-specific area 0x40..0x100.
    #[error(
        "configuration range {offset:#x}+{len} is outside the device-specific area 0x40..0x100"
    )]
    ConfigRangeInvalid { offset: usize, len: usize },
    /// MSI supports 1, 2, 4, 8, 16 or 32 vectors.
    #[error("MSI vector count {0} is invalid: use 1, 2, 4, 8, 16 or 32")]
    MsiVectorsInvalid(u16),
    /// MSI-X supports 1 to 2048 vectors.
    #[error("MSI-X vector count {0} is invalid: use 1 to 2048")]
    MsixVectorsInvalid(u16),
    /// Table or PBA offset not QWORD aligned, BAR index out of range, or
    /// offset beyond 32 bits.
    #[error("MSI-X {what} location BAR {bar} offset {offset:#x} is invalid: use BAR 0-5 and an 8-byte aligned 32-bit offset")]
    MsixLocationInvalid {
        what: &'static str,
        bar: usize,
        offset: u64,
    },
    /// The MSI-X table and PBA overlap in the same BAR.
    #[error("MSI-X table and PBA overlap in BAR {0}; move the PBA past the table")]
    MsixOverlap(usize),
    /// All 32 device numbers on bus 0 are taken.
    #[error("PCI bus 0 has no free device number; remove a device")]
    BusFull,
    /// A function is already at that address.
    #[error("PCI function {0} is already in use")]
    DevFnInUse(DevFn),
    /// The allocator window is empty or inverted.
    #[error("{window} window {start:#x}..{end:#x} is empty")]
    WindowInvalid {
        window: &'static str,
        start: u64,
        end: u64,
    },
    /// Allocation sizes are powers of two (BARs are size-aligned).
    #[error("allocation size {0:#x} is not a power of two")]
    AllocationSizeInvalid(u64),
    /// No room left in the window.
    #[error("no room for {size:#x} bytes in the {window} window {start:#x}..{end:#x}; enlarge the window or use fewer devices")]
    WindowExhausted {
        window: &'static str,
        size: u64,
        start: u64,
        end: u64,
    },
}

/// Low half of a 64-bit register value.
fn lo32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

/// High half of a 64-bit register value.
fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}
