//! Platter's devices. Nothing here knows about KVM: devices see guest memory
//! through `vm-memory`, raise interrupts through the small traits in
//! [`interrupt`], and are put on a [`bus::Bus`] by the VMM.

pub mod ata;
pub mod bus;
pub mod ide;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod scsi;
#[cfg(test)]
pub(crate) mod testutil;
pub mod virtio;
