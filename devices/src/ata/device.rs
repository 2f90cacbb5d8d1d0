//! One ATA device's command decoding and settable state (ATA8-ACS §7):
//! multiple count, transfer mode, write cache, power mode.
//!
//! [`AtaDevice::decode`] checks a command against the device (opcode,
//! addressing, range, parameters) and says what the transport must do. The
//! checks follow ATA8-ACS: an unknown opcode or parameter aborts (ABRT), an
//! address past the last sector is ID NOT FOUND (IDNF), and a PACKET device
//! aborts ATA-only commands with its signature in the LBA registers so a
//! host probing with IDENTIFY DEVICE learns what it is talking to.

use super::identify::{self, MAX_DSM_BLOCKS};
use super::{
    cmd, error, Outputs, Taskfile, DEVICE_LBA, LBA48_LIMIT, MAX_MULTIPLE, MAX_SECTORS_28,
    MAX_SECTORS_48, SECTOR_SIZE,
};

/// What is behind the registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An ATA disk.
    Disk,
    /// An ATAPI (PACKET) CD-ROM.
    Packet,
}

/// How a data command moves its sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// PIO, `block` sectors per DRQ data block (1, or the multiple count).
    Pio { block: u32 },
    /// DMA (bus-master IDE or an AHCI PRDT).
    Dma,
}

/// What the transport does with a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtaAction {
    /// Done: ready, no error, with these output registers.
    Complete(Outputs),
    /// Failed: ready with ERR, `error` in the error register.
    Abort { error: u8, outputs: Outputs },
    /// PIO data-in of this buffer (IDENTIFY data), one DRQ block.
    DataIn(Vec<u8>),
    /// Read `sectors` sectors from `lba` to the host.
    Read {
        lba: u64,
        sectors: u32,
        protocol: Protocol,
    },
    /// Write `sectors` sectors from the host to `lba`.
    Write {
        lba: u64,
        sectors: u32,
        protocol: Protocol,
    },
    /// Make written data durable, then complete.
    Flush,
    /// The host switched the volatile write cache; apply it to the backing
    /// disk, then complete.
    SetWriteCache(bool),
    /// DMA-out `blocks` 512-byte blocks of TRIM ranges, parse them with
    /// [`super::dsm::parse_trim`] and discard them.
    Trim { blocks: u32 },
    /// Run diagnostics on both devices of the channel: signatures, error 01h,
    /// interrupt.
    ExecuteDiagnostic,
    /// DEVICE RESET of a PACKET device: signature, no interrupt.
    DeviceReset,
    /// A PACKET command: take a command packet; `dma` moves its data by DMA.
    Packet { dma: bool },
}

impl AtaAction {
    fn abort(error: u8) -> Self {
        AtaAction::Abort {
            error,
            outputs: Outputs::NONE,
        }
    }
}

/// A DMA transfer mode selected with SET FEATURES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaMode {
    Multiword(u8),
    Ultra(u8),
}

/// Model, serial and firmware strings of IDENTIFY data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    model: String,
    serial: String,
    firmware: String,
}

/// Why IDENTIFY strings were refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("ATA {field} {value:?} is longer than {max} characters; shorten it")]
    TooLong {
        field: &'static str,
        value: String,
        max: usize,
    },
    #[error("ATA {field} {value:?} has characters outside printable ASCII; use only those")]
    NotAscii { field: &'static str, value: String },
}

fn check_string(field: &'static str, value: &str, max: usize) -> Result<String, IdentityError> {
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(IdentityError::NotAscii {
            field,
            value: value.to_string(),
        });
    }
    if value.len() > max {
        return Err(IdentityError::TooLong {
            field,
            value: value.to_string(),
            max,
        });
    }
    Ok(value.to_string())
}

impl Identity {
    /// Model (40 characters at most), serial (20) and firmware revision (8),
    /// printable ASCII.
    pub fn new(model: &str, serial: &str, firmware: &str) -> Result<Self, IdentityError> {
        Ok(Self {
            model: check_string("model", model, 40)?,
            serial: check_string("serial", serial, 20)?,
            firmware: check_string("firmware revision", firmware, 8)?,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn firmware(&self) -> &str {
        &self.firmware
    }
}

/// The CHS geometry reported in IDENTIFY words 1-6 and 54-58, and used for
/// commands with the LBA bit clear: 16 heads, 63 sectors a track, as many
/// cylinders as fit (at most 16383, the ATA limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    const HEADS: u8 = 16;
    const SECTORS: u8 = 63;
    const MAX_CYLINDERS: u64 = 16383;

    fn for_sectors(total: u64) -> Self {
        let per_cylinder = u64::from(Self::HEADS) * u64::from(Self::SECTORS);
        let cylinders = (total / per_cylinder).min(Self::MAX_CYLINDERS);
        Self {
            cylinders: u16::try_from(cylinders).unwrap_or(0),
            heads: Self::HEADS,
            sectors: Self::SECTORS,
        }
    }

    /// Sectors reachable through CHS.
    pub fn capacity(&self) -> u32 {
        u32::from(self.cylinders) * u32::from(self.heads) * u32::from(self.sectors)
    }
}

/// One ATA or ATAPI device's identity and state.
#[derive(Clone, Debug)]
pub struct AtaDevice {
    kind: DeviceKind,
    identity: Identity,
    sectors: u64,
    physical_sector_exponent: u8,
    readonly: bool,
    trim: bool,
    wce: bool,
    look_ahead: bool,
    smart: bool,
    multiple: u8,
    dma_mode: Option<DmaMode>,
    standby: bool,
    geometry: Geometry,
}

impl AtaDevice {
    /// An ATA disk of `bytes` bytes (whole sectors; a partial last sector is
    /// not addressable). `physical_block` is the backing's physical block
    /// size in bytes; `wce` the write cache state at power-on.
    pub fn disk(
        identity: Identity,
        bytes: u64,
        physical_block: u32,
        readonly: bool,
        trim: bool,
        wce: bool,
    ) -> Self {
        let sectors = (bytes / SECTOR_SIZE).min(LBA48_LIMIT - 1);
        let ratio = (u64::from(physical_block) / SECTOR_SIZE).max(1);
        // Word 106 holds the exponent in four bits.
        let exponent = u8::try_from(ratio.ilog2().min(15)).unwrap_or(0);
        Self {
            kind: DeviceKind::Disk,
            identity,
            sectors,
            physical_sector_exponent: exponent,
            readonly,
            trim,
            wce,
            look_ahead: true,
            smart: true,
            multiple: MAX_MULTIPLE,
            dma_mode: Some(DmaMode::Multiword(2)),
            standby: false,
            geometry: Geometry::for_sectors(sectors),
        }
    }

    /// An ATAPI device; its medium is the SCSI layer's business.
    pub fn packet(identity: Identity) -> Self {
        Self {
            kind: DeviceKind::Packet,
            identity,
            sectors: 0,
            physical_sector_exponent: 0,
            readonly: true,
            trim: false,
            wce: false,
            look_ahead: false,
            smart: false,
            multiple: 0,
            dma_mode: Some(DmaMode::Multiword(2)),
            standby: false,
            geometry: Geometry::for_sectors(0),
        }
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Addressable 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn physical_sector_exponent(&self) -> u8 {
        self.physical_sector_exponent
    }

    /// DATA SET MANAGEMENT TRIM is offered.
    pub fn trim(&self) -> bool {
        self.trim
    }

    /// The volatile write cache is enabled.
    pub fn wce(&self) -> bool {
        self.wce
    }

    pub fn look_ahead(&self) -> bool {
        self.look_ahead
    }

    pub fn smart_enabled(&self) -> bool {
        self.smart
    }

    /// Sectors per READ/WRITE MULTIPLE block; 0 while disabled.
    pub fn multiple(&self) -> u8 {
        self.multiple
    }

    pub fn dma_mode(&self) -> Option<DmaMode> {
        self.dma_mode
    }

    /// Decode one command. Settings commands take effect here; data,
    /// flush and reset commands are left to the transport.
    pub fn decode(&mut self, tf: &Taskfile) -> AtaAction {
        let action = match self.kind {
            DeviceKind::Disk => self.decode_disk(tf),
            DeviceKind::Packet => self.decode_packet(tf),
        };
        if let AtaAction::Abort { outputs, .. } = &action {
            if self.kind == DeviceKind::Packet && outputs.lba.is_none() {
                // ATA/ATAPI-6 §9.12: a PACKET device that aborts an ATA
                // command shows its signature, so hosts can tell it apart.
                return AtaAction::Abort {
                    error: error::ABRT,
                    outputs: Outputs::signature(DeviceKind::Packet),
                };
            }
        }
        action
    }

    fn decode_packet(&mut self, tf: &Taskfile) -> AtaAction {
        match tf.command {
            cmd::PACKET => AtaAction::Packet {
                dma: tf.features & 1 != 0,
            },
            cmd::IDENTIFY_PACKET_DEVICE => {
                AtaAction::DataIn(identify::identify_packet_device(self))
            }
            cmd::DEVICE_RESET => AtaAction::DeviceReset,
            cmd::EXECUTE_DEVICE_DIAGNOSTIC => AtaAction::ExecuteDiagnostic,
            cmd::SET_FEATURES => self.set_features(tf),
            cmd::CHECK_POWER_MODE | cmd::IDLE_IMMEDIATE | cmd::STANDBY_IMMEDIATE | cmd::SLEEP => {
                self.power(tf.command)
            }
            _ => AtaAction::abort(error::ABRT),
        }
    }

    fn decode_disk(&mut self, tf: &Taskfile) -> AtaAction {
        use cmd::*;
        match tf.command {
            READ_SECTORS | READ_SECTORS_NORETRY => self.rw(tf, false, false, Some(1)),
            READ_SECTORS_EXT => self.rw(tf, false, true, Some(1)),
            READ_MULTIPLE => self.rw(tf, false, false, self.multiple_block()),
            READ_MULTIPLE_EXT => self.rw(tf, false, true, self.multiple_block()),
            READ_DMA | READ_DMA_NORETRY => self.rw(tf, false, false, None),
            READ_DMA_EXT => self.rw(tf, false, true, None),
            WRITE_SECTORS | WRITE_SECTORS_NORETRY => self.rw(tf, true, false, Some(1)),
            WRITE_SECTORS_EXT => self.rw(tf, true, true, Some(1)),
            WRITE_MULTIPLE => self.rw(tf, true, false, self.multiple_block()),
            WRITE_MULTIPLE_EXT => self.rw(tf, true, true, self.multiple_block()),
            WRITE_DMA | WRITE_DMA_NORETRY => self.rw(tf, true, false, None),
            WRITE_DMA_EXT => self.rw(tf, true, true, None),
            READ_VERIFY | READ_VERIFY_NORETRY => self.verify(tf, false),
            READ_VERIFY_EXT => self.verify(tf, true),
            FLUSH_CACHE | FLUSH_CACHE_EXT => AtaAction::Flush,
            IDENTIFY_DEVICE => AtaAction::DataIn(identify::identify_device(self)),
            SET_FEATURES => self.set_features(tf),
            SET_MULTIPLE_MODE => self.set_multiple(tf),
            DATA_SET_MANAGEMENT => self.dsm(tf),
            EXECUTE_DEVICE_DIAGNOSTIC => AtaAction::ExecuteDiagnostic,
            SMART => self.smart(tf),
            CHECK_POWER_MODE | IDLE | IDLE_IMMEDIATE | STANDBY | STANDBY_IMMEDIATE | SLEEP => {
                self.power(tf.command)
            }
            // Obsolete positioning commands: nothing to position.
            SEEK | INITIALIZE_DEVICE_PARAMETERS => AtaAction::Complete(Outputs::NONE),
            c if c & 0xf0 == RECALIBRATE => AtaAction::Complete(Outputs::NONE),
            // NOP always aborts (ATA8-ACS §7.21); so do PACKET commands and
            // anything unknown.
            _ => AtaAction::abort(error::ABRT),
        }
    }

    fn multiple_block(&self) -> Option<u32> {
        match self.multiple {
            // READ/WRITE MULTIPLE before SET MULTIPLE MODE abort (§7.30).
            0 => Some(0),
            m => Some(u32::from(m)),
        }
    }

    /// The first sector a 28- or 48-bit command addresses.
    fn address(&self, tf: &Taskfile, ext: bool) -> Option<u64> {
        if ext {
            return Some(tf.lba & (LBA48_LIMIT - 1));
        }
        if tf.device & DEVICE_LBA != 0 {
            return Some(tf.lba & 0xff_ffff | u64::from(tf.device & 0xf) << 24);
        }
        // CHS: sector numbers start at 1.
        let sector = tf.lba & 0xff;
        let cylinder = tf.lba >> 8 & 0xffff;
        let head = u64::from(tf.device & 0xf);
        let g = self.geometry;
        if sector == 0 || sector > u64::from(g.sectors) || head >= u64::from(g.heads) {
            return None;
        }
        Some((cylinder * u64::from(g.heads) + head) * u64::from(g.sectors) + sector - 1)
    }

    fn count(tf: &Taskfile, ext: bool) -> u32 {
        match (ext, tf.count) {
            (true, 0) => MAX_SECTORS_48,
            (true, n) => u32::from(n),
            (false, n) => match n & 0xff {
                0 => MAX_SECTORS_28,
                n => u32::from(n),
            },
        }
    }

    /// Address and length of a media command, or IDNF.
    fn range(&self, tf: &Taskfile, ext: bool) -> Result<(u64, u32), AtaAction> {
        let sectors = Self::count(tf, ext);
        let lba = self.address(tf, ext).ok_or(AtaAction::abort(error::IDNF))?;
        match lba.checked_add(u64::from(sectors)) {
            Some(end) if end <= self.sectors => Ok((lba, sectors)),
            _ => Err(AtaAction::abort(error::IDNF)),
        }
    }

    fn rw(&mut self, tf: &Taskfile, write: bool, ext: bool, pio: Option<u32>) -> AtaAction {
        if pio == Some(0) || (write && self.readonly) {
            return AtaAction::abort(error::ABRT);
        }
        let (lba, sectors) = match self.range(tf, ext) {
            Ok(r) => r,
            Err(a) => return a,
        };
        self.standby = false;
        let protocol = match pio {
            Some(block) => Protocol::Pio { block },
            None => Protocol::Dma,
        };
        if write {
            AtaAction::Write {
                lba,
                sectors,
                protocol,
            }
        } else {
            AtaAction::Read {
                lba,
                sectors,
                protocol,
            }
        }
    }

    fn verify(&mut self, tf: &Taskfile, ext: bool) -> AtaAction {
        match self.range(tf, ext) {
            Ok(_) => {
                self.standby = false;
                AtaAction::Complete(Outputs::NONE)
            }
            Err(a) => a,
        }
    }

    fn set_features(&mut self, tf: &Taskfile) -> AtaAction {
        const ENABLE_WRITE_CACHE: u8 = 0x02;
        const SET_TRANSFER_MODE: u8 = 0x03;
        const DISABLE_LOOK_AHEAD: u8 = 0x55;
        const REVERT_TO_DEFAULTS_OFF: u8 = 0x66;
        const DISABLE_WRITE_CACHE: u8 = 0x82;
        const ENABLE_LOOK_AHEAD: u8 = 0xaa;
        const REVERT_TO_DEFAULTS_ON: u8 = 0xcc;
        let disk = self.kind == DeviceKind::Disk;
        match (tf.features & 0xff) as u8 {
            ENABLE_WRITE_CACHE if disk => {
                self.wce = true;
                AtaAction::SetWriteCache(true)
            }
            DISABLE_WRITE_CACHE if disk => {
                self.wce = false;
                AtaAction::SetWriteCache(false)
            }
            SET_TRANSFER_MODE => self.set_transfer_mode((tf.count & 0xff) as u8),
            ENABLE_LOOK_AHEAD if disk => {
                self.look_ahead = true;
                AtaAction::Complete(Outputs::NONE)
            }
            DISABLE_LOOK_AHEAD if disk => {
                self.look_ahead = false;
                AtaAction::Complete(Outputs::NONE)
            }
            REVERT_TO_DEFAULTS_OFF | REVERT_TO_DEFAULTS_ON => AtaAction::Complete(Outputs::NONE),
            _ => AtaAction::abort(error::ABRT),
        }
    }

    /// SET FEATURES 03h: the count register names the mode (ATA8-ACS
    /// Table 47): 00h/01h PIO default, 08h+n PIO n, 20h+n MWDMA n, 40h+n UDMA n.
    fn set_transfer_mode(&mut self, value: u8) -> AtaAction {
        let mode = value & 0x07;
        match value >> 3 {
            0 if mode <= 1 => {}
            1 if mode <= 4 => {}
            4 if mode <= 2 => self.dma_mode = Some(DmaMode::Multiword(mode)),
            8 if mode <= 5 => self.dma_mode = Some(DmaMode::Ultra(mode)),
            _ => return AtaAction::abort(error::ABRT),
        }
        AtaAction::Complete(Outputs::NONE)
    }

    fn set_multiple(&mut self, tf: &Taskfile) -> AtaAction {
        let n = (tf.count & 0xff) as u8;
        if n != 0 && (!n.is_power_of_two() || n > MAX_MULTIPLE) {
            return AtaAction::abort(error::ABRT);
        }
        self.multiple = n;
        AtaAction::Complete(Outputs::NONE)
    }

    fn dsm(&mut self, tf: &Taskfile) -> AtaAction {
        const TRIM: u16 = 1;
        let blocks = Self::count(tf, true);
        if !self.trim || self.readonly || tf.features & TRIM == 0 {
            return AtaAction::abort(error::ABRT);
        }
        if blocks > u32::from(MAX_DSM_BLOCKS) {
            return AtaAction::abort(error::ABRT);
        }
        AtaAction::Trim { blocks }
    }

    /// SMART (ATA8-ACS §7.52): only the status and on/off subcommands; the
    /// LBA mid/high key must be 4Fh/C2h.
    fn smart(&mut self, tf: &Taskfile) -> AtaAction {
        const RETURN_STATUS: u8 = 0xda;
        const ENABLE: u8 = 0xd8;
        const DISABLE: u8 = 0xd9;
        const KEY: u64 = 0xc2_4f00;
        if tf.lba & 0xff_ff00 != KEY {
            return AtaAction::abort(error::ABRT);
        }
        match (tf.features & 0xff) as u8 {
            ENABLE => {
                self.smart = true;
                AtaAction::Complete(Outputs::NONE)
            }
            DISABLE => {
                self.smart = false;
                AtaAction::Complete(Outputs::NONE)
            }
            // No threshold exceeded: the key comes back unchanged (a failing
            // device would answer 2Ch/F4h).
            RETURN_STATUS if self.smart => AtaAction::Complete(Outputs {
                count: None,
                lba: Some(tf.lba & 0xff | KEY),
            }),
            _ => AtaAction::abort(error::ABRT),
        }
    }

    fn power(&mut self, command: u8) -> AtaAction {
        match command {
            cmd::CHECK_POWER_MODE => {
                let count = if self.standby { 0x00 } else { 0xff };
                return AtaAction::Complete(Outputs {
                    count: Some(count),
                    lba: None,
                });
            }
            cmd::STANDBY | cmd::STANDBY_IMMEDIATE | cmd::SLEEP => self.standby = true,
            _ => self.standby = false,
        }
        AtaAction::Complete(Outputs::NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::super::identify::{ata_string, word};
    use super::super::{cmd, error, DEVICE_LBA};
    use super::*;

    fn disk(bytes: u64) -> AtaDevice {
        let id = Identity::new("PLATTER HARDDISK", "SN123", "1.0").unwrap();
        AtaDevice::disk(id, bytes, 4096, false, true, true)
    }

    fn tf(command: u8, count: u16, lba: u64) -> Taskfile {
        Taskfile {
            command,
            features: 0,
            count,
            lba,
            device: DEVICE_LBA,
        }
    }

    #[test]
    fn identify_reports_capacity_features_and_strings() {
        let sectors = (1u64 << 28) + 1000;
        let mut d = disk(sectors * 512);
        let AtaAction::DataIn(id) = d.decode(&tf(cmd::IDENTIFY_DEVICE, 0, 0)) else {
            panic!("IDENTIFY gives data")
        };
        assert_eq!(id.len(), 512);
        assert_eq!(
            u32::from(word(&id, 60)) | u32::from(word(&id, 61)) << 16,
            0x0fff_ffff
        );
        let lba48 = (100..104).map(|i| u64::from(word(&id, i)) << (16 * (i - 100)));
        assert_eq!(lba48.sum::<u64>(), sectors);
        assert_ne!(word(&id, 83) & 1 << 10, 0, "48-bit supported");
        assert_ne!(word(&id, 86) & 1 << 10, 0, "48-bit enabled");
        assert_ne!(word(&id, 83) & 1 << 13, 0, "FLUSH CACHE EXT");
        assert_eq!(word(&id, 88) & 0x3f, 0x3f, "UDMA 0-5");
        assert_ne!(word(&id, 82) & 1 << 5, 0, "write cache supported");
        assert_ne!(word(&id, 85) & 1 << 5, 0, "write cache enabled");
        assert_eq!(word(&id, 169) & 1, 1, "TRIM");
        assert_eq!(word(&id, 106), 0x4000 | 1 << 13 | 3, "4 KiB physical");
        assert_eq!(ata_string(&id, 27, 20), "PLATTER HARDDISK");
        assert_eq!(ata_string(&id, 10, 10), "SN123");
        assert_eq!(ata_string(&id, 23, 4), "1.0");
        // Byte-swapped: "PL" is stored as 'L', 'P'.
        assert_eq!(&id[54..56], b"LP");
        assert_eq!(word(&id, 255) & 0xff, 0xa5);
        assert_eq!(id.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
    }

    #[test]
    fn identity_strings_are_checked() {
        assert!(Identity::new(&"M".repeat(41), "s", "f").is_err());
        assert!(Identity::new("m", &"S".repeat(21), "f").is_err());
        assert!(Identity::new("m", "s", "123456789").is_err());
        assert!(matches!(
            Identity::new("m\u{e9}", "s", "f"),
            Err(IdentityError::NotAscii { .. })
        ));
        assert!(Identity::new(&"M".repeat(40), &"S".repeat(20), "12345678").is_ok());
    }

    #[test]
    fn reads_decode_with_ranges_and_count_rules() {
        let mut d = disk(1 << 20); // 2048 sectors
        assert_eq!(
            d.decode(&tf(cmd::READ_SECTORS, 0, 0)),
            AtaAction::Read {
                lba: 0,
                sectors: 256,
                protocol: Protocol::Pio { block: 1 }
            }
        );
        assert_eq!(
            d.decode(&tf(cmd::READ_DMA_EXT, 2, 2046)),
            AtaAction::Read {
                lba: 2046,
                sectors: 2,
                protocol: Protocol::Dma
            }
        );
        assert_eq!(
            d.decode(&tf(cmd::READ_DMA_EXT, 3, 2046)),
            AtaAction::abort(error::IDNF)
        );
        assert_eq!(
            d.decode(&tf(cmd::WRITE_MULTIPLE, 4, 8)),
            AtaAction::Write {
                lba: 8,
                sectors: 4,
                protocol: Protocol::Pio { block: 16 }
            }
        );
        // 28-bit commands take LBA 27:24 from the device register and ignore
        // the previous register contents.
        let mut t = tf(cmd::READ_SECTORS, 0x0101, 0xff00_0010);
        t.device = DEVICE_LBA;
        assert_eq!(
            d.decode(&t),
            AtaAction::Read {
                lba: 0x10,
                sectors: 1,
                protocol: Protocol::Pio { block: 1 }
            }
        );
        t.device = DEVICE_LBA | 0x1;
        assert_eq!(d.decode(&t), AtaAction::abort(error::IDNF));
    }

    #[test]
    fn chs_addressing_uses_the_reported_geometry() {
        let mut d = disk(16 * 63 * 4 * 512);
        let mut t = tf(cmd::READ_SECTORS, 1, 1 | 2 << 8); // cylinder 2, sector 1
        t.device = 3; // head 3, CHS
        let lba = (2 * 16 + 3) * 63;
        assert_eq!(
            d.decode(&t),
            AtaAction::Read {
                lba,
                sectors: 1,
                protocol: Protocol::Pio { block: 1 }
            }
        );
        t.lba = 0; // sector 0 does not exist
        assert_eq!(d.decode(&t), AtaAction::abort(error::IDNF));
    }

    #[test]
    fn settings_commands() {
        let mut d = disk(1 << 20);
        let mut t = tf(cmd::SET_MULTIPLE_MODE, 0, 0);
        assert_eq!(d.decode(&t), AtaAction::Complete(Outputs::NONE));
        assert_eq!(
            d.decode(&tf(cmd::READ_MULTIPLE, 1, 0)),
            AtaAction::abort(error::ABRT),
            "multiple mode off"
        );
        t.count = 3;
        assert_eq!(d.decode(&t), AtaAction::abort(error::ABRT));
        t.count = 8;
        assert_eq!(d.decode(&t), AtaAction::Complete(Outputs::NONE));
        assert_eq!(d.multiple(), 8);

        let mut sf = tf(cmd::SET_FEATURES, 0, 0);
        sf.features = 0x82;
        assert_eq!(d.decode(&sf), AtaAction::SetWriteCache(false));
        assert!(!d.wce());
        sf.features = 0x03;
        sf.count = 0x45;
        assert_eq!(d.decode(&sf), AtaAction::Complete(Outputs::NONE));
        assert_eq!(d.dma_mode(), Some(DmaMode::Ultra(5)));
        sf.count = 0x47;
        assert_eq!(d.decode(&sf), AtaAction::abort(error::ABRT));
        sf.features = 0x05; // APM: not offered
        assert_eq!(d.decode(&sf), AtaAction::abort(error::ABRT));

        assert_eq!(
            d.decode(&tf(cmd::STANDBY_IMMEDIATE, 0, 0)),
            AtaAction::Complete(Outputs::NONE)
        );
        assert_eq!(
            d.decode(&tf(cmd::CHECK_POWER_MODE, 0, 0)),
            AtaAction::Complete(Outputs {
                count: Some(0),
                lba: None
            })
        );
        let mut smart = tf(cmd::SMART, 0, 0xc2_4f00);
        smart.features = 0xda;
        assert_eq!(
            d.decode(&smart),
            AtaAction::Complete(Outputs {
                count: None,
                lba: Some(0xc2_4f00)
            })
        );
        smart.lba = 0;
        assert_eq!(d.decode(&smart), AtaAction::abort(error::ABRT));
    }

    #[test]
    fn unknown_and_packet_commands() {
        let mut d = disk(1 << 20);
        assert_eq!(d.decode(&tf(0xf5, 0, 0)), AtaAction::abort(error::ABRT));
        assert_eq!(d.decode(&tf(cmd::NOP, 0, 0)), AtaAction::abort(error::ABRT));
        assert_eq!(
            d.decode(&tf(cmd::PACKET, 0, 0)),
            AtaAction::abort(error::ABRT)
        );

        let id = Identity::new("PLATTER CD-ROM", "CD1", "1.0").unwrap();
        let mut cd = AtaDevice::packet(id);
        assert_eq!(
            cd.decode(&tf(cmd::IDENTIFY_DEVICE, 0, 0)),
            AtaAction::Abort {
                error: error::ABRT,
                outputs: Outputs::signature(DeviceKind::Packet)
            }
        );
        let AtaAction::DataIn(id) = cd.decode(&tf(cmd::IDENTIFY_PACKET_DEVICE, 0, 0)) else {
            panic!("IDENTIFY PACKET DEVICE gives data")
        };
        assert_eq!(word(&id, 0), 0x85c0);
        let mut p = tf(cmd::PACKET, 0, 0);
        p.features = 1;
        assert_eq!(cd.decode(&p), AtaAction::Packet { dma: true });
    }

    #[test]
    fn trim_needs_support_and_a_sane_payload() {
        let mut d = disk(1 << 20);
        let mut t = tf(cmd::DATA_SET_MANAGEMENT, 1, 0);
        assert_eq!(
            d.decode(&t),
            AtaAction::abort(error::ABRT),
            "TRIM bit clear"
        );
        t.features = 1;
        assert_eq!(d.decode(&t), AtaAction::Trim { blocks: 1 });
        t.count = 0; // 65536 blocks
        assert_eq!(d.decode(&t), AtaAction::abort(error::ABRT));
        let id = Identity::new("m", "s", "f").unwrap();
        let mut no_trim = AtaDevice::disk(id, 1 << 20, 512, false, false, true);
        t.count = 1;
        assert_eq!(no_trim.decode(&t), AtaAction::abort(error::ABRT));
    }
}
