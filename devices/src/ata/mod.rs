//! The ATA command layer shared by the IDE and AHCI transports (ATA/ATAPI-6
//! §6 register semantics, ATA8-ACS §7 commands).
//!
//! A transport hands a [`Taskfile`] (the command block registers as the
//! device latched them, with the 48-bit "previous" bytes) to
//! [`AtaDevice::decode`] and gets back one [`AtaAction`]: what to move and
//! where, or how to finish. The layer never touches a disk, guest memory or
//! an interrupt; the transport does, so IDE (PIO + bus-master DMA) and AHCI
//! (FIS + PRDT) drive the same decisions.
//!
//! ```text
//!   transport (ide/, ahci/)                         ata/
//!   registers or H2D FIS ──Taskfile──▶ AtaDevice::decode ──▶ AtaAction
//!        ▲                                                     │
//!        └── status/error/outputs, data through Disk ◀─────────┘
//! ```
//!
//! * [`identify`]: IDENTIFY DEVICE and IDENTIFY PACKET DEVICE data.
//! * [`device`]: command decoding and the device's settable state.
//! * [`dsm`]: DATA SET MANAGEMENT (TRIM) range entries.

#![deny(clippy::cast_possible_truncation)]

mod device;
pub mod dsm;
pub mod identify;

pub use device::{
    AtaAction, AtaDevice, DeviceKind, DmaMode, Geometry, Identity, IdentityError, Protocol,
};

/// Bytes in an ATA logical sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest sector count of one 28-bit command (a count of 0 means this).
pub const MAX_SECTORS_28: u32 = 256;
/// Largest sector count of one 48-bit command (a count of 0 means this).
pub const MAX_SECTORS_48: u32 = 65536;
/// Sectors addressable with 28-bit LBAs.
pub const LBA28_LIMIT: u64 = 1 << 28;
/// Sectors addressable with 48-bit LBAs.
pub const LBA48_LIMIT: u64 = 1 << 48;
/// Largest READ/WRITE MULTIPLE block this device offers (IDENTIFY word 47).
pub const MAX_MULTIPLE: u8 = 16;

/// Status register bits (ATA/ATAPI-6 §7.15.6).
pub mod status {
    /// Error: the error register says what went wrong.
    pub const ERR: u8 = 0x01;
    /// Data request: the device is ready to move a PIO data block.
    pub const DRQ: u8 = 0x08;
    /// Device seek complete (obsolete; set while ready, as drives do).
    pub const DSC: u8 = 0x10;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// Device ready to accept commands.
    pub const DRDY: u8 = 0x40;
    /// Busy: the other bits are not valid.
    pub const BSY: u8 = 0x80;
}

/// Error register bits (ATA/ATAPI-6 §7.9).
pub mod error {
    /// After reset or EXECUTE DEVICE DIAGNOSTIC: device 0 passed.
    pub const DIAG_PASSED: u8 = 0x01;
    /// Command aborted: unsupported command or parameter, or failed write.
    pub const ABRT: u8 = 0x04;
    /// ID not found: the address is outside the device.
    pub const IDNF: u8 = 0x10;
    /// Uncorrectable data error (a read failed on the host).
    pub const UNC: u8 = 0x40;
}

/// Command opcodes this layer knows (ATA8-ACS Table B.2).
pub mod cmd {
    pub const NOP: u8 = 0x00;
    pub const DATA_SET_MANAGEMENT: u8 = 0x06;
    pub const DEVICE_RESET: u8 = 0x08;
    pub const RECALIBRATE: u8 = 0x10;
    pub const READ_SECTORS: u8 = 0x20;
    pub const READ_SECTORS_NORETRY: u8 = 0x21;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_NORETRY: u8 = 0x31;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY_NORETRY: u8 = 0x41;
    pub const READ_VERIFY_EXT: u8 = 0x42;
    pub const SEEK: u8 = 0x70;
    pub const EXECUTE_DEVICE_DIAGNOSTIC: u8 = 0x90;
    pub const INITIALIZE_DEVICE_PARAMETERS: u8 = 0x91;
    pub const PACKET: u8 = 0xa0;
    pub const IDENTIFY_PACKET_DEVICE: u8 = 0xa1;
    pub const SMART: u8 = 0xb0;
    pub const READ_MULTIPLE: u8 = 0xc4;
    pub const WRITE_MULTIPLE: u8 = 0xc5;
    pub const SET_MULTIPLE_MODE: u8 = 0xc6;
    pub const READ_DMA: u8 = 0xc8;
    pub const READ_DMA_NORETRY: u8 = 0xc9;
    pub const WRITE_DMA: u8 = 0xca;
    pub const WRITE_DMA_NORETRY: u8 = 0xcb;
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    pub const STANDBY: u8 = 0xe2;
    pub const IDLE: u8 = 0xe3;
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    pub const SLEEP: u8 = 0xe6;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY_DEVICE: u8 = 0xec;
    pub const SET_FEATURES: u8 = 0xef;
}

/// The command block registers of one command, as the device latched them.
///
/// 48-bit commands use the "previous" contents too: bits 15:8 of `features`
/// and `count`, bits 47:24 of `lba`. For 28-bit commands the device register
/// holds LBA bits 27:24 (or the CHS head) and the upper halves are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taskfile {
    pub command: u8,
    pub features: u16,
    pub count: u16,
    /// LBA low/mid/high in bits 7:0, 15:8, 23:16; their previous contents
    /// in bits 31:24, 39:32, 47:40.
    pub lba: u64,
    pub device: u8,
}

/// Device register: LBA (rather than CHS) addressing.
pub const DEVICE_LBA: u8 = 0x40;
/// Device register: device 1 selected.
pub const DEVICE_DEV: u8 = 0x10;

/// Registers a command leaves for the host besides status and error (the
/// D2H FIS fields on AHCI). `None` leaves a register as the host wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Sector count (bits 15:8: its previous contents).
    pub count: Option<u16>,
    /// LBA registers, laid out as in [`Taskfile::lba`].
    pub lba: Option<u64>,
}

impl Outputs {
    /// Nothing to report.
    pub const NONE: Outputs = Outputs {
        count: None,
        lba: None,
    };

    /// The signature a device posts after reset and diagnostics (ATA/ATAPI-6
    /// §9.12): count 1, LBA low 1, and 00/00 for ATA or 14h/EBh for PACKET.
    pub fn signature(kind: DeviceKind) -> Outputs {
        let (mid, high) = match kind {
            DeviceKind::Disk => (0x00, 0x00),
            DeviceKind::Packet => (0x14, 0xeb),
        };
        Outputs {
            count: Some(1),
            lba: Some(1 | mid << 8 | high << 16),
        }
    }
}
