//! Parallel ATA (IDE): the PIIX3/PIIX4 IDE function with two legacy-mode
//! channels, ATA disks and ATAPI CD-ROMs, PIO and bus-master DMA.
//!
//! ```text
//!  port I/O 0x1F0-7, 0x3F6 (IRQ 14)     port I/O 0x170-7, 0x376 (IRQ 15)
//!            │ IdeLegacyPort                        │ IdeLegacyPort
//!            ▼                                      ▼
//!   PiixIde (piix.rs): PCI function 8086:7010/7111, class 01 01 80,
//!   BAR4 = 16 bytes of bus-master registers (8 per channel)
//!            │                                      │
//!     IdeChannel (channel.rs) ×2: task file, device control, data port,
//!     BusMaster (bus_master.rs), up to two Drives (drive.rs)
//!            │
//!     Drive: ata::AtaDevice decodes commands; scsi::Cdrom runs packets;
//!     platter_block::Disk moves the data
//! ```
//!
//! The channel is a register state machine; the VMM wires it:
//! * put [`PiixIde`] on the PCI root, its BAR4 window on the PIO bus, and
//!   the four [`IdeLegacyPort`]s from [`legacy_ports`] at their fixed ports;
//! * give each channel an [`IrqLevel`] for ISA IRQ 14 / 15 (KVM_IRQ_LINE),
//!   or an [`EdgeIrq`] around an edge [`InterruptLine`];
//! * poll [`PiixIde::completion_fds`] and call
//!   [`PiixIde::process_completions`] when one is readable: DMA and flushes
//!   finish there. PIO runs synchronously on the vCPU thread.

#![deny(clippy::cast_possible_truncation)]

mod bus_master;
mod channel;
mod drive;
mod piix;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use platter_block::Disk;

pub use bus_master::{
    prd_entry, BusMaster, BM_CMD_START, BM_CMD_WRITE_MEMORY, BM_STATUS_ACTIVE, BM_STATUS_ERROR,
    BM_STATUS_INTERRUPT,
};
pub use channel::{IdeChannel, CONTROL_HOB, CONTROL_NIEN, CONTROL_SRST};
pub use piix::{
    legacy_ports, IdeLegacyPort, LegacyBlock, PiixIde, PiixVariant, BM_BAR, BM_BAR_SIZE,
    COMMAND_BLOCK_LEN, CONTROL_BLOCK_LEN, PRIMARY_COMMAND, PRIMARY_CONTROL, PRIMARY_IRQ,
    SECONDARY_COMMAND, SECONDARY_CONTROL, SECONDARY_IRQ,
};

use crate::ata::{AtaDevice, Identity, IdentityError};
use crate::interrupt::InterruptLine;
use crate::scsi::{Cdrom, CdromIdentity, Interface};
use drive::Drive;

/// A level-sensitive view of an interrupt line: the channel calls `set`
/// when its INTRQ level changes (nIEN, selected device, pending state).
/// The VMM backs it with KVM_IRQ_LINE for ISA IRQ 14 / 15.
pub trait IrqLevel: Send + Sync {
    fn set(&self, level: bool);
}

/// Drives an edge-triggered line from level changes: each rise is one
/// trigger. Enough for the IOAPIC's edge-triggered ISA pins.
pub struct EdgeIrq(pub Arc<dyn InterruptLine>);

impl IrqLevel for EdgeIrq {
    fn set(&self, level: bool) {
        if level {
            if let Err(e) = self.0.trigger() {
                log::error!("IDE: cannot raise interrupt: {e}");
            }
        }
    }
}

/// What a device position holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// An ATA disk.
    Disk,
    /// An ATAPI CD-ROM reading 2048-byte blocks of an ISO image.
    Cdrom,
}

/// One device to attach: its disk, kind and IDENTIFY strings.
pub struct IdeDriveConfig {
    pub disk: Disk,
    pub media: Media,
    /// Model number (40 ASCII characters at most; for a CD-ROM, the first
    /// 16 are also its INQUIRY product).
    pub model: String,
    /// Serial number (20 at most).
    pub serial: String,
    /// Firmware revision (8 at most; a CD-ROM's first 4 are its INQUIRY
    /// revision).
    pub firmware: String,
    /// Physical sector size IDENTIFY reports (word 106); none takes the
    /// disk's. Logical sectors are always 512 bytes.
    pub physical_block_size: Option<u32>,
}

impl IdeDriveConfig {
    /// Firmware revision reported when none is given.
    pub const DEFAULT_FIRMWARE: &'static str = "1.0";

    pub fn new(disk: Disk, media: Media, model: &str, serial: &str) -> Self {
        Self {
            disk,
            media,
            model: model.to_string(),
            serial: serial.to_string(),
            firmware: Self::DEFAULT_FIRMWARE.to_string(),
            physical_block_size: None,
        }
    }

    fn build(self) -> Result<Drive, IdeError> {
        let identity = Identity::new(&self.model, &self.serial, &self.firmware)?;
        let disk = self.disk;
        Ok(match self.media {
            Media::Disk => {
                let ata = AtaDevice::disk(
                    identity,
                    disk.size(),
                    self.physical_block_size
                        .unwrap_or_else(|| disk.physical_block_size()),
                    disk.is_readonly(),
                    disk.supports_discard(),
                    disk.wce(),
                );
                Drive::new(ata, None, disk)
            }
            Media::Cdrom => {
                if !disk.is_readonly() {
                    return Err(IdeError::CdromWritable);
                }
                let unit = Cdrom::new(
                    CdromIdentity::new("PLATTER", &self.model, &self.firmware),
                    Interface::Atapi,
                    disk.size(),
                );
                Drive::new(AtaDevice::packet(identity), Some(unit), disk)
            }
        })
    }
}

/// Why an IDE controller could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IdeError {
    #[error("invalid IDE drive identity")]
    Identity(#[from] IdentityError),
    #[error("a CD-ROM image must be opened read-only: set readonly in its disk options")]
    CdromWritable,
    #[error("cannot set up the IDE PCI function")]
    Pci(#[source] crate::pci::PciError),
}
