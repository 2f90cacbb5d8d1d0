//! IDENTIFY DEVICE and IDENTIFY PACKET DEVICE data (ATA8-ACS §7.16, §7.17,
//! Tables 22 and 24): 256 little-endian words.
//!
//! ```text
//!  word  0      general configuration (ATA disk / ATAPI CD-ROM)
//!  10-19        serial number   (ATA strings: 2 chars a word, first char in
//!  23-26        firmware         the high byte, padded with spaces)
//!  27-46        model
//!  47 / 59      READ/WRITE MULTIPLE: maximum / current sectors per block
//!  49, 53       capabilities (LBA, DMA), which words are valid
//!  60-61        sectors addressable with 28-bit commands
//!  63, 88       multiword / Ultra DMA modes: supported (7:0), selected (15:8)
//!  80           major version (ATA/ATAPI-4 .. ATA8-ACS)
//!  82-87        command sets supported (82-84) and enabled (85-87)
//!  100-103      sectors addressable with 48-bit commands
//!  106          physical sector size relative to the logical one
//!  169          DATA SET MANAGEMENT TRIM supported
//!  255          integrity word: A5h and a checksum making the bytes sum to 0
//! ```

use super::device::{AtaDevice, DmaMode};
use super::{LBA28_LIMIT, MAX_MULTIPLE};

/// Words in IDENTIFY data.
pub const WORDS: usize = 256;

/// Word 0, ATA device: not removable (bit 6).
const GENERAL_ATA: u16 = 0x0040;
/// Word 0, ATAPI (bits 15:14 = 10b), CD-ROM (12:8 = 05h), removable (7), DRQ
/// within 50 µs of PACKET (6:5 = 10b), 12-byte packets (1:0 = 00b).
const GENERAL_ATAPI_CDROM: u16 = 0x85c0;
/// Word 49: IORDY supported (11), LBA (9), DMA (8).
const CAPABILITIES: u16 = 1 << 11 | 1 << 9 | 1 << 8;
/// Words 50, 83, 84, 87, 93, 106, 209: bit 14 set, bit 15 clear says the
/// word is valid.
const VALID: u16 = 0x4000;
/// Word 53: words 54-58 (0), 64-70 (1) and 88 (2) are valid.
const FIELDS_VALID: u16 = 0x0007;
/// Word 80: ATA/ATAPI-4 to ATA8-ACS (bits 4 to 8).
const MAJOR_VERSION: u16 = 0x01f0;
/// Word 82 / 85: SMART (0), power management (3), write cache (5),
/// look-ahead (6).
const SMART: u16 = 1 << 0;
const POWER_MANAGEMENT: u16 = 1 << 3;
const PACKET_FEATURE: u16 = 1 << 4;
const WRITE_CACHE: u16 = 1 << 5;
const LOOK_AHEAD: u16 = 1 << 6;
const DEVICE_RESET: u16 = 1 << 9;
/// Word 83 / 86: 48-bit address (10), FLUSH CACHE (12), FLUSH CACHE EXT (13).
const LBA48: u16 = 1 << 10;
const FLUSH_CACHE: u16 = 1 << 12;
const FLUSH_CACHE_EXT: u16 = 1 << 13;
/// Word 69: deterministic read after TRIM (14), which reads zeroes (5).
const DRAT: u16 = 1 << 14;
const RZAT: u16 = 1 << 5;
/// Word 106: several logical sectors per physical one (13), exponent in 3:0.
const MULTIPLE_LOGICAL: u16 = 1 << 13;
/// Word 64: PIO modes 3 and 4.
const PIO_MODES: u16 = 0x0003;
/// Word 63: multiword DMA modes 0 to 2.
const MWDMA_MODES: u16 = 0x0007;
/// Word 88: Ultra DMA modes 0 to 5.
const UDMA_MODES: u16 = 0x003f;
/// Words 65-68: cycle times in ns for the fastest PIO and MWDMA modes.
const CYCLE_TIME_NS: u16 = 120;
/// Word 93: hardware reset result, device 0 passed diagnostics, 80-wire cable.
const RESET_RESULT: u16 = VALID | 1 << 13 | 1 << 3 | 1;
/// Word 105: most 512-byte blocks of TRIM ranges in one DSM command.
pub const MAX_DSM_BLOCKS: u16 = 8;
/// Integrity word signature (low byte of word 255).
const INTEGRITY_SIGNATURE: u16 = 0xa5;

/// IDENTIFY data being built.
struct Words([u16; WORDS]);

impl Words {
    fn string(&mut self, first: usize, words: usize, s: &str) {
        let mut bytes = s.as_bytes().iter().copied().chain(std::iter::repeat(b' '));
        for w in &mut self.0[first..first + words] {
            let hi = bytes.next().unwrap_or(b' ');
            let lo = bytes.next().unwrap_or(b' ');
            *w = u16::from(hi) << 8 | u16::from(lo);
        }
    }

    fn dword(&mut self, first: usize, v: u32) {
        let [a, b, c, d] = v.to_le_bytes();
        self.0[first] = u16::from_le_bytes([a, b]);
        self.0[first + 1] = u16::from_le_bytes([c, d]);
    }

    fn qword(&mut self, first: usize, v: u64) {
        let b = v.to_le_bytes();
        for (w, pair) in self.0[first..first + 4].iter_mut().zip(b.chunks_exact(2)) {
            *w = u16::from_le_bytes([pair[0], pair[1]]);
        }
    }

    /// Little-endian bytes with the integrity word filled in.
    fn finish(mut self) -> Vec<u8> {
        self.0[255] = INTEGRITY_SIGNATURE;
        let mut bytes: Vec<u8> = self.0.iter().flat_map(|w| w.to_le_bytes()).collect();
        let sum = bytes[..511].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        bytes[511] = 0u8.wrapping_sub(sum);
        bytes
    }
}

fn common(dev: &AtaDevice, w: &mut Words) {
    let id = dev.identity();
    w.string(10, 10, id.serial());
    w.string(23, 4, id.firmware());
    w.string(27, 20, id.model());
    w.0[49] = CAPABILITIES;
    w.0[50] = VALID;
    w.0[64] = PIO_MODES;
    w.0[65..=68].fill(CYCLE_TIME_NS);
    w.0[80] = MAJOR_VERSION;
    w.0[84] = VALID;
    w.0[87] = VALID;
    w.0[93] = RESET_RESULT;
    let (mwdma, udma) = match dev.dma_mode() {
        Some(DmaMode::Multiword(m)) => (1 << (8 + u16::from(m)), 0),
        Some(DmaMode::Ultra(m)) => (0, 1 << (8 + u16::from(m))),
        None => (0, 0),
    };
    w.0[63] = MWDMA_MODES | mwdma;
    w.0[88] = UDMA_MODES | udma;
}

/// IDENTIFY DEVICE data of an ATA disk.
pub fn identify_device(dev: &AtaDevice) -> Vec<u8> {
    let mut w = Words([0; WORDS]);
    common(dev, &mut w);
    let sectors = dev.sectors();
    let geo = dev.geometry();
    w.0[0] = GENERAL_ATA;
    w.0[1] = geo.cylinders;
    w.0[3] = u16::from(geo.heads);
    w.0[6] = u16::from(geo.sectors);
    w.0[47] = 0x8000 | u16::from(MAX_MULTIPLE);
    w.0[53] = FIELDS_VALID;
    w.0[54] = geo.cylinders;
    w.0[55] = u16::from(geo.heads);
    w.0[56] = u16::from(geo.sectors);
    w.dword(57, geo.capacity());
    w.0[59] = match dev.multiple() {
        0 => 0,
        m => 0x0100 | u16::from(m),
    };
    w.dword(60, u32::try_from(sectors.min(LBA28_LIMIT - 1)).unwrap_or(0));
    if dev.trim() {
        w.0[69] = DRAT | RZAT;
        w.0[105] = MAX_DSM_BLOCKS;
        w.0[169] = 1;
    }
    let supported = SMART | POWER_MANAGEMENT | WRITE_CACHE | LOOK_AHEAD;
    w.0[82] = supported;
    w.0[83] = VALID | LBA48 | FLUSH_CACHE | FLUSH_CACHE_EXT;
    let on = |bit: u16, enabled: bool| if enabled { bit } else { 0 };
    w.0[85] = on(SMART, dev.smart_enabled())
        | POWER_MANAGEMENT
        | on(WRITE_CACHE, dev.wce())
        | on(LOOK_AHEAD, dev.look_ahead());
    w.0[86] = LBA48 | FLUSH_CACHE | FLUSH_CACHE_EXT;
    w.qword(100, sectors);
    let exp = dev.physical_sector_exponent();
    w.0[106] = VALID
        | if exp > 0 {
            MULTIPLE_LOGICAL | u16::from(exp)
        } else {
            0
        };
    w.0[209] = VALID;
    w.finish()
}

/// IDENTIFY PACKET DEVICE data of an ATAPI CD-ROM.
pub fn identify_packet_device(dev: &AtaDevice) -> Vec<u8> {
    let mut w = Words([0; WORDS]);
    common(dev, &mut w);
    w.0[0] = GENERAL_ATAPI_CDROM;
    w.0[53] = FIELDS_VALID & !1;
    let supported = POWER_MANAGEMENT | PACKET_FEATURE | DEVICE_RESET;
    w.0[82] = supported;
    w.0[83] = VALID;
    w.0[85] = supported;
    w.finish()
}

/// Decode an ATA string (`words` words from byte offset `2 * first`),
/// trailing spaces removed. For tests and for logs.
pub fn ata_string(data: &[u8], first: usize, words: usize) -> String {
    let mut s = String::new();
    for w in data[2 * first..2 * (first + words)].chunks_exact(2) {
        s.push(char::from(w[1]));
        s.push(char::from(w[0]));
    }
    s.trim_end().to_string()
}

/// Word `i` of IDENTIFY data.
pub fn word(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([data[2 * i], data[2 * i + 1]])
}
