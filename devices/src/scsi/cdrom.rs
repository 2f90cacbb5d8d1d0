//! A read-only CD/DVD-ROM logical unit (MMC-6, with SPC-4 for INQUIRY,
//! REQUEST SENSE and MODE SENSE framing) backed by an ISO image of
//! 2048-byte blocks.
//!
//! The medium state is a tray: eject (START STOP UNIT with LoEj) opens it
//! unless PREVENT ALLOW MEDIUM REMOVAL locked it, load closes it again.
//! Medium access with the tray open is NOT READY / MEDIUM NOT PRESENT.
//! Images larger than a CD (MMC's 80-minute disc) report the DVD-ROM profile.

use super::sense::{Sense, FIXED_SENSE_LEN};
use super::{be16, be32, byte, opcode, ScsiOutcome};

/// Bytes in a CD-ROM mode-1 data block.
pub const CD_BLOCK_SIZE: u64 = BLOCK_LEN as u64;
const BLOCK_LEN: u32 = 2048;
/// Blocks on an 80-minute CD (80 × 60 × 75 frames); more is a DVD.
const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;

const PERIPHERAL_CDROM: u8 = 0x05;
const INQUIRY_RMB: u8 = 0x80;
/// INQUIRY version: SPC-3.
const INQUIRY_VERSION: u8 = 0x05;
const INQUIRY_RESPONSE_FORMAT: u8 = 0x02;
const INQUIRY_LEN: usize = 36;

/// MMC profiles (MMC-6 Table 93).
const PROFILE_CD_ROM: u16 = 0x0008;
const PROFILE_DVD_ROM: u16 = 0x0010;

/// Feature codes (MMC-6 Table 94).
const FEATURE_PROFILE_LIST: u16 = 0x0000;
const FEATURE_CORE: u16 = 0x0001;
const FEATURE_MORPHING: u16 = 0x0002;
const FEATURE_REMOVABLE_MEDIUM: u16 = 0x0003;
const FEATURE_RANDOM_READABLE: u16 = 0x0010;
const FEATURE_CD_READ: u16 = 0x001e;
const FEATURE_DVD_READ: u16 = 0x001f;

/// Mode pages (MMC-6 §7).
const PAGE_ERROR_RECOVERY: u8 = 0x01;
const PAGE_CAPABILITIES: u8 = 0x2a;
const PAGE_ALL: u8 = 0x3f;

/// Removable-medium bits of mode page 2Ah byte 6 and feature 0003h: tray
/// loading mechanism (7:5 = 001b), eject (3), lock state (1), lock (0).
const TRAY_EJECT_LOCK: u8 = 0x29;
const LOCKED: u8 = 0x02;

/// GET EVENT STATUS NOTIFICATION media class (MMC-6 §6.7).
const EVENT_CLASS_MEDIA: u8 = 0x04;
const EVENT_CLASSES_SUPPORTED: u8 = 1 << EVENT_CLASS_MEDIA;
const NO_EVENT_AVAILABLE: u8 = 0x80;

/// Lead-in frames before LBA 0 in MSF addresses (two seconds).
const MSF_OFFSET: u64 = 150;
const LEAD_OUT_TRACK: u8 = 0xaa;
/// TOC control nibble for a data track, ADR 1 (Q sub-channel position).
const ADR_CONTROL_DATA: u8 = 0x14;

/// The physical interface GET CONFIGURATION's Core feature names (MMC-6
/// Table 102).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    Scsi = 1,
    Atapi = 2,
    Usb = 8,
}

/// INQUIRY vendor, product and revision, space padded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CdromIdentity {
    vendor: [u8; 8],
    product: [u8; 16],
    revision: [u8; 4],
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [b' '; N];
    for (d, c) in b
        .iter_mut()
        .zip(s.bytes().filter(|c| (0x20..0x7f).contains(c)))
    {
        *d = c;
    }
    b
}

impl CdromIdentity {
    /// Strings are cut to 8, 16 and 4 characters of printable ASCII.
    pub fn new(vendor: &str, product: &str, revision: &str) -> Self {
        Self {
            vendor: padded(vendor),
            product: padded(product),
            revision: padded(revision),
        }
    }
}

impl Default for CdromIdentity {
    fn default() -> Self {
        Self::new("PLATTER", "VIRTUAL CD-ROM", "1.0")
    }
}

/// Media events GET EVENT STATUS NOTIFICATION reports once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MediaEvent {
    NoChange = 0,
    NewMedia = 2,
    MediaRemoval = 3,
}

/// An MMC CD/DVD-ROM logical unit.
#[derive(Clone, Debug)]
pub struct Cdrom {
    identity: CdromIdentity,
    interface: Interface,
    blocks: u64,
    sense: Sense,
    tray_open: bool,
    locked: bool,
    event: MediaEvent,
}

fn data_in(mut v: Vec<u8>, allocation: usize) -> ScsiOutcome {
    v.truncate(allocation);
    ScsiOutcome::DataIn(v)
}

impl Cdrom {
    /// A unit holding an image of `bytes` bytes (whole 2048-byte blocks;
    /// a partial last block is not addressable).
    pub fn new(identity: CdromIdentity, interface: Interface, bytes: u64) -> Self {
        Self {
            identity,
            interface,
            blocks: bytes / CD_BLOCK_SIZE,
            sense: Sense::NO_SENSE,
            tray_open: false,
            locked: false,
            event: MediaEvent::NoChange,
        }
    }

    /// 2048-byte blocks on the medium.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether a medium is present (the tray is closed).
    pub fn medium_present(&self) -> bool {
        !self.tray_open
    }

    /// The sense REQUEST SENSE will return.
    pub fn sense(&self) -> Sense {
        self.sense
    }

    /// Record a failure the transport met (I/O error, bad DMA table) for
    /// the next REQUEST SENSE.
    pub fn set_sense(&mut self, sense: Sense) {
        self.sense = sense;
    }

    fn is_dvd(&self) -> bool {
        self.blocks > CD_MAX_BLOCKS
    }

    /// Execute one CDB (6 to 16 bytes; missing bytes read as zero).
    pub fn execute(&mut self, cdb: &[u8]) -> ScsiOutcome {
        let op = byte(cdb, 0);
        if op != opcode::REQUEST_SENSE {
            self.sense = Sense::NO_SENSE;
        }
        let outcome = match self.dispatch(op, cdb) {
            Ok(o) => o,
            Err(sense) => ScsiOutcome::CheckCondition(sense),
        };
        if let ScsiOutcome::CheckCondition(sense) = outcome {
            self.sense = sense;
        }
        outcome
    }

    fn dispatch(&mut self, op: u8, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        use opcode::*;
        match op {
            TEST_UNIT_READY => self.medium().map(|()| ScsiOutcome::Good),
            REQUEST_SENSE => {
                let sense = std::mem::replace(&mut self.sense, Sense::NO_SENSE);
                Ok(data_in(sense.fixed().to_vec(), usize::from(byte(cdb, 4))))
            }
            INQUIRY => self.inquiry(cdb),
            READ_CAPACITY_10 => {
                self.medium()?;
                // READ CAPACITY(10) saturates: all ones says "use the 16-byte form".
                let last = u32::try_from(self.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                let mut v = Vec::with_capacity(8);
                v.extend_from_slice(&last.to_be_bytes());
                v.extend_from_slice(&BLOCK_LEN.to_be_bytes());
                Ok(ScsiOutcome::DataIn(v))
            }
            READ_10 => self.read(u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
            READ_12 => self.read(u64::from(be32(cdb, 2)), be32(cdb, 6)),
            SEEK_10 => {
                self.medium()?;
                if u64::from(be32(cdb, 2)) >= self.blocks {
                    return Err(Sense::LBA_OUT_OF_RANGE);
                }
                Ok(ScsiOutcome::Good)
            }
            MODE_SENSE_6 => self.mode_sense(cdb, false),
            MODE_SENSE_10 => self.mode_sense(cdb, true),
            GET_CONFIGURATION => Ok(self.get_configuration(cdb)),
            READ_TOC => self.read_toc(cdb),
            READ_DISC_INFORMATION => self.read_disc_information(cdb),
            GET_EVENT_STATUS_NOTIFICATION => self.event_status(cdb),
            START_STOP_UNIT => self.start_stop(cdb),
            PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.locked = byte(cdb, 4) & 1 != 0;
                Ok(ScsiOutcome::Good)
            }
            SET_CD_SPEED => Ok(ScsiOutcome::Good),
            _ => Err(Sense::INVALID_OPCODE),
        }
    }

    fn medium(&self) -> Result<(), Sense> {
        if self.tray_open {
            Err(Sense::MEDIUM_NOT_PRESENT)
        } else {
            Ok(())
        }
    }

    fn read(&mut self, lba: u64, blocks: u32) -> Result<ScsiOutcome, Sense> {
        self.medium()?;
        if lba + u64::from(blocks) > self.blocks {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        if blocks == 0 {
            return Ok(ScsiOutcome::Good);
        }
        Ok(ScsiOutcome::Read { lba, blocks })
    }

    /// INQUIRY (SPC-4 §6.4): standard data, or VPD page 00h.
    fn inquiry(&self, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        let evpd = byte(cdb, 1) & 1 != 0;
        let page = byte(cdb, 2);
        let allocation = usize::from(be16(cdb, 3));
        if evpd {
            const SUPPORTED_PAGES: u8 = 0x00;
            if page != SUPPORTED_PAGES {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let v = vec![PERIPHERAL_CDROM, SUPPORTED_PAGES, 0, 1, SUPPORTED_PAGES];
            return Ok(data_in(v, allocation));
        }
        if page != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut v = vec![
            PERIPHERAL_CDROM,
            INQUIRY_RMB,
            INQUIRY_VERSION,
            INQUIRY_RESPONSE_FORMAT,
            // Additional length: bytes 5 to 35.
            31,
            0,
            0,
            0,
        ];
        v.extend_from_slice(&self.identity.vendor);
        v.extend_from_slice(&self.identity.product);
        v.extend_from_slice(&self.identity.revision);
        debug_assert_eq!(v.len(), INQUIRY_LEN);
        Ok(data_in(v, allocation))
    }

    /// MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12) with pages 01h and 2Ah.
    fn mode_sense(&self, cdb: &[u8], ten: bool) -> Result<ScsiOutcome, Sense> {
        const CHANGEABLE: u8 = 1;
        const SAVED: u8 = 3;
        let control = byte(cdb, 2) >> 6;
        let page = byte(cdb, 2) & 0x3f;
        let allocation = if ten {
            usize::from(be16(cdb, 7))
        } else {
            usize::from(byte(cdb, 4))
        };
        if control == SAVED {
            return Err(Sense::SAVING_NOT_SUPPORTED);
        }
        let pages: &[u8] = match page {
            PAGE_ERROR_RECOVERY => &[PAGE_ERROR_RECOVERY],
            PAGE_CAPABILITIES => &[PAGE_CAPABILITIES],
            PAGE_ALL => &[PAGE_ERROR_RECOVERY, PAGE_CAPABILITIES],
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut body = Vec::new();
        for &p in pages {
            let mut page = self.mode_page(p);
            if control == CHANGEABLE {
                // Nothing is changeable: every field reads as zero.
                page[2..].fill(0);
            }
            body.extend_from_slice(&page);
        }
        let mut v = if ten {
            // Mode data length counts the bytes after itself.
            let len = u16::try_from(body.len() + 6).unwrap_or(u16::MAX);
            let [hi, lo] = len.to_be_bytes();
            vec![hi, lo, 0, 0, 0, 0, 0, 0]
        } else {
            vec![u8::try_from(body.len() + 3).unwrap_or(u8::MAX), 0, 0, 0]
        };
        v.extend_from_slice(&body);
        Ok(data_in(v, allocation))
    }

    fn mode_page(&self, page: u8) -> Vec<u8> {
        /// 4x CD speed in kB/s (MMC's 1x is 176 kB/s).
        const SPEED: u16 = 4 * 176;
        const BUFFER_KIB: u16 = 512;
        match page {
            // Read retry count 5, no other recovery parameters.
            PAGE_ERROR_RECOVERY => vec![PAGE_ERROR_RECOVERY, 0x06, 0x00, 0x05, 0, 0, 0, 0],
            _ => {
                let lock = if self.locked { LOCKED } else { 0 };
                let [s_hi, s_lo] = SPEED.to_be_bytes();
                let [b_hi, b_lo] = BUFFER_KIB.to_be_bytes();
                vec![
                    PAGE_CAPABILITIES,
                    0x14,
                    // Reads CD-R, CD-RW, DVD-ROM, DVD-R, DVD-RAM.
                    0x3b,
                    0x00,
                    // Mode 2 form 1 and 2, multi-session.
                    0x70,
                    0x00,
                    TRAY_EJECT_LOCK | lock,
                    0x00,
                    s_hi,
                    s_lo,
                    0,
                    0,
                    b_hi,
                    b_lo,
                    s_hi,
                    s_lo,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ]
            }
        }
    }

    /// GET CONFIGURATION (MMC-6 §6.6): profile list, core, morphing,
    /// removable medium, random readable, CD/DVD read.
    fn get_configuration(&self, cdb: &[u8]) -> ScsiOutcome {
        const RT_ALL: u8 = 0;
        const RT_CURRENT: u8 = 1;
        const RT_ONE: u8 = 2;
        let rt = byte(cdb, 1) & 3;
        let start = be16(cdb, 2);
        let allocation = usize::from(be16(cdb, 7));
        let present = self.medium_present();
        let (profile, read_feature) = if self.is_dvd() {
            (PROFILE_DVD_ROM, FEATURE_DVD_READ)
        } else {
            (PROFILE_CD_ROM, FEATURE_CD_READ)
        };
        let current_profile = if present { profile } else { 0 };

        let profile_entry = |p: u16| {
            let [hi, lo] = p.to_be_bytes();
            [hi, lo, u8::from(p == current_profile), 0]
        };
        let mut profiles = Vec::new();
        profiles.extend_from_slice(&profile_entry(PROFILE_DVD_ROM));
        profiles.extend_from_slice(&profile_entry(PROFILE_CD_ROM));
        let [i0, i1, i2, i3] = (self.interface as u32).to_be_bytes();
        let [b0, b1, b2, b3] = BLOCK_LEN.to_be_bytes();
        // (code, version, persistent, current, data)
        let features: Vec<(u16, u8, bool, bool, Vec<u8>)> = vec![
            (FEATURE_PROFILE_LIST, 0, true, true, profiles),
            // Core: interface, DBE.
            (
                FEATURE_CORE,
                1,
                true,
                true,
                vec![i0, i1, i2, i3, 1, 0, 0, 0],
            ),
            // Morphing: OCEvent (GET EVENT STATUS NOTIFICATION polling).
            (FEATURE_MORPHING, 1, true, true, vec![0x02, 0, 0, 0]),
            (
                FEATURE_REMOVABLE_MEDIUM,
                0,
                true,
                true,
                vec![TRAY_EJECT_LOCK & !LOCKED, 0, 0, 0],
            ),
            // Random readable: block size, blocking 1.
            (
                FEATURE_RANDOM_READABLE,
                0,
                false,
                present,
                vec![b0, b1, b2, b3, 0, 1, 0, 0],
            ),
            (read_feature, 0, false, present, vec![0, 0, 0, 0]),
        ];
        let [p_hi, p_lo] = current_profile.to_be_bytes();
        let mut v = vec![0, 0, 0, 0, 0, 0, p_hi, p_lo];
        for (code, version, persistent, current, data) in features {
            let wanted = match rt {
                RT_ALL => code >= start,
                RT_CURRENT => current && code >= start,
                RT_ONE => code == start,
                _ => false,
            };
            if !wanted {
                continue;
            }
            let [c_hi, c_lo] = code.to_be_bytes();
            let flags = version << 2 | u8::from(persistent) << 1 | u8::from(current);
            v.extend_from_slice(&[c_hi, c_lo, flags, u8::try_from(data.len()).unwrap_or(0)]);
            v.extend_from_slice(&data);
        }
        let len = u32::try_from(v.len() - 4).unwrap_or(u32::MAX);
        v[..4].copy_from_slice(&len.to_be_bytes());
        data_in(v, allocation)
    }

    fn address(lba: u64, msf: bool) -> [u8; 4] {
        if msf {
            let frames = lba + MSF_OFFSET;
            let m = u8::try_from(frames / (60 * 75)).unwrap_or(u8::MAX);
            let s = u8::try_from(frames / 75 % 60).unwrap_or(0);
            let f = u8::try_from(frames % 75).unwrap_or(0);
            [0, m, s, f]
        } else {
            u32::try_from(lba).unwrap_or(u32::MAX).to_be_bytes()
        }
    }

    /// READ TOC/PMA/ATIP (MMC-6 §6.26), formats 0 (TOC) and 1 (session info)
    /// of a single-track, single-session data disc.
    fn read_toc(&self, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        self.medium()?;
        let msf = byte(cdb, 1) & 2 != 0;
        let mut format = byte(cdb, 2) & 0x0f;
        if format == 0 {
            // Older ATAPI drivers put the format in the control byte.
            format = byte(cdb, 9) >> 6;
        }
        let track = byte(cdb, 6);
        let allocation = usize::from(be16(cdb, 7));
        let mut v = vec![0, 0, 1, 1];
        match format {
            0 => {
                if track > 1 && track != LEAD_OUT_TRACK {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                if track <= 1 {
                    v.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
                    v.extend_from_slice(&Self::address(0, msf));
                }
                v.extend_from_slice(&[0, ADR_CONTROL_DATA, LEAD_OUT_TRACK, 0]);
                v.extend_from_slice(&Self::address(self.blocks, msf));
            }
            1 => {
                v.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
                v.extend_from_slice(&Self::address(0, msf));
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        }
        let len = u16::try_from(v.len() - 2).unwrap_or(u16::MAX);
        v[..2].copy_from_slice(&len.to_be_bytes());
        Ok(data_in(v, allocation))
    }

    /// READ DISC INFORMATION (MMC-6 §6.22), standard disc information of a
    /// finalized single-session disc.
    fn read_disc_information(&self, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        self.medium()?;
        if byte(cdb, 1) & 7 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let allocation = usize::from(be16(cdb, 7));
        let mut v = vec![0u8; 34];
        v[1] = 32;
        // Last session complete (3:2 = 11b), disc finalized (1:0 = 10b).
        v[2] = 0x0e;
        v[3] = 1; // first track on disc
        v[4] = 1; // sessions
        v[5] = 1; // first track in last session
        v[6] = 1; // last track in last session
        Ok(data_in(v, allocation))
    }

    /// GET EVENT STATUS NOTIFICATION (MMC-6 §6.7), polled, media class only.
    fn event_status(&mut self, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        const POLLED: u8 = 1;
        if byte(cdb, 1) & POLLED == 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let requested = byte(cdb, 4);
        let allocation = usize::from(be16(cdb, 7));
        if requested & EVENT_CLASSES_SUPPORTED == 0 {
            let v = vec![0, 2, NO_EVENT_AVAILABLE, EVENT_CLASSES_SUPPORTED];
            return Ok(data_in(v, allocation));
        }
        let event = std::mem::replace(&mut self.event, MediaEvent::NoChange);
        let status = if self.tray_open { 0x01 } else { 0x02 };
        let v = vec![
            0,
            6,
            EVENT_CLASS_MEDIA,
            EVENT_CLASSES_SUPPORTED,
            event as u8,
            status,
            0,
            0,
        ];
        Ok(data_in(v, allocation))
    }

    /// START STOP UNIT (SBC-3 §5.25 as MMC-6 uses it): LoEj with Start
    /// clear ejects, with Start set loads.
    fn start_stop(&mut self, cdb: &[u8]) -> Result<ScsiOutcome, Sense> {
        let b = byte(cdb, 4);
        let (start, loej, power_condition) = (b & 1 != 0, b & 2 != 0, b >> 4);
        if power_condition != 0 || !loej {
            return Ok(ScsiOutcome::Good);
        }
        if start {
            if self.tray_open {
                self.tray_open = false;
                self.event = MediaEvent::NewMedia;
            }
        } else {
            if self.locked {
                return Err(Sense::MEDIUM_REMOVAL_PREVENTED);
            }
            if !self.tray_open {
                self.tray_open = true;
                self.event = MediaEvent::MediaRemoval;
            }
        }
        Ok(ScsiOutcome::Good)
    }
}

/// Bytes REQUEST SENSE returns at most.
pub const REQUEST_SENSE_LEN: usize = FIXED_SENSE_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::key;

    fn cd(blocks: u64) -> Cdrom {
        Cdrom::new(
            CdromIdentity::default(),
            Interface::Atapi,
            blocks * CD_BLOCK_SIZE,
        )
    }

    fn cdb(bytes: &[u8]) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn data(o: ScsiOutcome) -> Vec<u8> {
        match o {
            ScsiOutcome::DataIn(v) => v,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn inquiry_and_capacity() {
        let mut u = cd(1000);
        let v = data(u.execute(&cdb(&[0x12, 0, 0, 0, 96])));
        assert_eq!(v.len(), 36);
        assert_eq!(v[0], 0x05);
        assert_eq!(v[1], 0x80);
        assert_eq!(&v[8..16], b"PLATTER ");
        assert_eq!(&v[16..32], b"VIRTUAL CD-ROM  ");
        let v = data(u.execute(&cdb(&[0x12, 0, 0, 0, 5])));
        assert_eq!(v.len(), 5, "cut to the allocation length");
        let v = data(u.execute(&cdb(&[0x25])));
        assert_eq!(v, [0, 0, 0x03, 0xe7, 0, 0, 0x08, 0]);
    }

    #[test]
    fn reads_are_range_checked() {
        let mut u = cd(100);
        assert_eq!(
            u.execute(&cdb(&[0x28, 0, 0, 0, 0, 98, 0, 0, 2])),
            ScsiOutcome::Read { lba: 98, blocks: 2 }
        );
        assert_eq!(
            u.execute(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 2])),
            ScsiOutcome::CheckCondition(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            u.execute(&cdb(&[0xa8, 0, 0, 0, 0, 1, 0, 0, 0, 3])),
            ScsiOutcome::Read { lba: 1, blocks: 3 }
        );
        assert_eq!(
            u.execute(&cdb(&[0x28, 0, 0, 0, 0, 1, 0, 0, 0])),
            ScsiOutcome::Good
        );
    }

    #[test]
    fn unknown_opcode_sets_sense_until_request_sense() {
        let mut u = cd(100);
        assert_eq!(
            u.execute(&cdb(&[0xff])),
            ScsiOutcome::CheckCondition(Sense::INVALID_OPCODE)
        );
        let v = data(u.execute(&cdb(&[0x03, 0, 0, 0, 18])));
        assert_eq!(v[0], 0x70);
        assert_eq!(v[2], key::ILLEGAL_REQUEST);
        assert_eq!((v[12], v[13]), (0x20, 0x00));
        let v = data(u.execute(&cdb(&[0x03, 0, 0, 0, 18])));
        assert_eq!(v[2], key::NO_SENSE, "REQUEST SENSE consumed it");
    }

    #[test]
    fn eject_lock_and_load() {
        let mut u = cd(100);
        assert_eq!(u.execute(&cdb(&[0x00])), ScsiOutcome::Good);
        assert_eq!(u.execute(&cdb(&[0x1e, 0, 0, 0, 1])), ScsiOutcome::Good);
        assert_eq!(
            u.execute(&cdb(&[0x1b, 0, 0, 0, 2])),
            ScsiOutcome::CheckCondition(Sense::MEDIUM_REMOVAL_PREVENTED)
        );
        u.execute(&cdb(&[0x1e, 0, 0, 0, 0]));
        assert_eq!(u.execute(&cdb(&[0x1b, 0, 0, 0, 2])), ScsiOutcome::Good);
        assert_eq!(
            u.execute(&cdb(&[0x00])),
            ScsiOutcome::CheckCondition(Sense::MEDIUM_NOT_PRESENT)
        );
        let ev = data(u.execute(&cdb(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])));
        assert_eq!(ev, [0, 6, 4, 0x10, 3, 0x01, 0, 0]);
        assert_eq!(u.execute(&cdb(&[0x1b, 0, 0, 0, 3])), ScsiOutcome::Good);
        assert_eq!(u.execute(&cdb(&[0x00])), ScsiOutcome::Good);
        let ev = data(u.execute(&cdb(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])));
        assert_eq!(ev[4..6], [2, 0x02]);
        assert_eq!(
            u.execute(&cdb(&[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8])),
            ScsiOutcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB),
            "asynchronous notification is not offered"
        );
    }

    #[test]
    fn toc_in_lba_and_msf() {
        let mut u = cd(1000);
        let v = data(u.execute(&cdb(&[0x43, 0, 0, 0, 0, 0, 1, 0, 100])));
        assert_eq!(v.len(), 20);
        assert_eq!(&v[..4], &[0, 18, 1, 1]);
        assert_eq!(&v[4..12], &[0, 0x14, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&v[12..20], &[0, 0x14, 0xaa, 0, 0, 0, 0x03, 0xe8]);
        let v = data(u.execute(&cdb(&[0x43, 2, 0, 0, 0, 0, 0, 0, 100])));
        // LBA 1000 + 150 frames = 0:15:25.
        assert_eq!(&v[16..20], &[0, 0, 15, 25]);
        assert_eq!(
            u.execute(&cdb(&[0x43, 0, 0, 0, 0, 0, 2, 0, 100])),
            ScsiOutcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB)
        );
        let v = data(u.execute(&cdb(&[0x43, 0, 1, 0, 0, 0, 0, 0, 100])));
        assert_eq!(v.len(), 12);
    }

    #[test]
    fn configuration_and_mode_pages() {
        let mut u = cd(1000);
        let v = data(u.execute(&cdb(&[0x46, 0, 0, 0, 0, 0, 0, 0x04, 0])));
        assert_eq!(&v[6..8], &[0x00, 0x08], "CD-ROM profile current");
        assert_eq!(&v[8..10], &[0, 0], "profile list first");
        let v = data(u.execute(&cdb(&[0x46, 2, 0, 1, 0, 0, 0, 0x04, 0])));
        assert_eq!(v.len(), 8 + 12, "only the core feature");
        assert_eq!(&v[8..12], &[0, 1, 0x07, 8]);
        assert_eq!(&v[12..16], &[0, 0, 0, 2], "ATAPI");
        let big = cd(CD_MAX_BLOCKS + 1).execute(&cdb(&[0x46, 0, 0, 0, 0, 0, 0, 0x04, 0]));
        assert_eq!(&data(big)[6..8], &[0x00, 0x10], "DVD-ROM profile");

        let v = data(u.execute(&cdb(&[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 255])));
        assert_eq!(v.len(), 8 + 22);
        assert_eq!(&v[..2], &[0, 28]);
        assert_eq!(v[8], 0x2a);
        let v = data(u.execute(&cdb(&[0x1a, 0, 0x3f, 0, 255])));
        assert_eq!(v.len(), 4 + 8 + 22);
        assert_eq!(
            u.execute(&cdb(&[0x5a, 0, 0xea, 0, 0, 0, 0, 0, 255])),
            ScsiOutcome::CheckCondition(Sense::SAVING_NOT_SUPPORTED)
        );
        assert_eq!(
            u.execute(&cdb(&[0x5a, 0, 0x05, 0, 0, 0, 0, 0, 255])),
            ScsiOutcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB)
        );
    }
}
