//! A SCSI command layer shared by the transports that carry CDBs: ATAPI
//! (IDE PACKET), and later virtio-scsi and USB mass storage.
//!
//! A logical unit takes a CDB and answers with a [`ScsiOutcome`]: status
//! GOOD with or without data-in bytes, a read of medium blocks the transport
//! performs against its disk (so the bytes never pass through here), or
//! CHECK CONDITION with sense data the unit also keeps for REQUEST SENSE.
//!
//! ```text
//!  transport ──CDB──▶ unit.execute() ──▶ Good | DataIn(bytes) | Read{lba, blocks}
//!      │                                   | CheckCondition(sense)
//!      └── transport-side failure (disk I/O error) ──▶ unit.set_sense()
//! ```
//!
//! * [`sense`]: sense keys, additional sense codes and fixed-format sense
//!   data (SPC-4 §4.5.3).
//! * [`cdrom`]: an MMC-6 CD/DVD-ROM logical unit backed by an ISO image.

#![deny(clippy::cast_possible_truncation)]

pub mod cdrom;
pub mod sense;

pub use cdrom::{Cdrom, CdromIdentity, Interface, CD_BLOCK_SIZE};
pub use sense::Sense;

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScsiOutcome {
    /// GOOD, no data.
    Good,
    /// GOOD with these data-in bytes (already cut to the allocation length).
    DataIn(Vec<u8>),
    /// GOOD once the transport has read `blocks` medium blocks from `lba`
    /// into the host's buffer; a failed read becomes CHECK CONDITION with
    /// [`Sense::UNRECOVERED_READ_ERROR`], set with `set_sense`.
    Read { lba: u64, blocks: u32 },
    /// CHECK CONDITION; the same sense is kept for REQUEST SENSE.
    CheckCondition(Sense),
}

/// Operation codes (SPC-4, SBC-3, MMC-6).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const SEEK_10: u8 = 0x2b;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_12: u8 = 0xa8;
    pub const SET_CD_SPEED: u8 = 0xbb;
}

/// Big-endian 16 bits of `cdb` at `at` (0 past the end).
pub(crate) fn be16(cdb: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([byte(cdb, at), byte(cdb, at + 1)])
}

/// Big-endian 32 bits of `cdb` at `at` (0 past the end).
pub(crate) fn be32(cdb: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        byte(cdb, at),
        byte(cdb, at + 1),
        byte(cdb, at + 2),
        byte(cdb, at + 3),
    ])
}

/// Byte `at` of `cdb` (0 past the end: transports pad short CDBs).
pub(crate) fn byte(cdb: &[u8], at: usize) -> u8 {
    cdb.get(at).copied().unwrap_or(0)
}
