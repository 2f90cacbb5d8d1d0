//! How devices raise interrupts without knowing about KVM.
//!
//! The VMM backs these with irqfds: an edge line or an MSI vector is one
//! eventfd write, and KVM's GSI routing decides where it lands.

use std::io;

/// An edge-triggered interrupt line (ISA IRQ through the IOAPIC, or one
/// MSI/MSI-X vector whose route the VMM keeps).
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// A message-signalled interrupt route the guest programs: address and data
/// written into an MSI capability or an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high halves joined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Lets a PCI function tell the VMM where each of its vectors now goes.
pub trait MsiRouter: Send + Sync {
    /// Program vector `vector` of this function to `msg`; `masked` vectors
    /// must not be delivered (the device sets the pending bit instead).
    fn route(&self, vector: u16, msg: MsiMessage, masked: bool) -> io::Result<()>;
    /// Deliver vector `vector` with its current route.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}
