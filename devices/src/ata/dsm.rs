//! DATA SET MANAGEMENT TRIM payload (ATA8-ACS §7.10.3.2): 512-byte blocks
//! of 8-byte little-endian range entries.
//!
//! ```text
//!  63          48 47                                   0
//!  | range length |              starting LBA           |
//! ```
//!
//! A range length of 0 marks an unused entry. Ranges are sectors.

use super::{error, SECTOR_SIZE};

/// Bytes in one range entry.
pub const ENTRY_SIZE: usize = 8;

/// One TRIM range in bytes, ready for a discard request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimRange {
    pub offset: u64,
    pub len: u64,
}

/// Parse the range entries of `payload` for a device of `sectors` sectors.
/// A range that reaches past the last sector fails the whole command with
/// the error register value to report (ABRT; ATA8-ACS leaves nothing
/// discarded in that case, so nothing is returned).
pub fn parse_trim(payload: &[u8], sectors: u64) -> Result<Vec<TrimRange>, u8> {
    let mut ranges = Vec::new();
    for entry in payload.chunks_exact(ENTRY_SIZE) {
        let mut b = [0u8; ENTRY_SIZE];
        b.copy_from_slice(entry);
        let v = u64::from_le_bytes(b);
        let lba = v & 0xffff_ffff_ffff;
        let len = v >> 48;
        if len == 0 {
            continue;
        }
        match lba.checked_add(len) {
            Some(end) if end <= sectors => ranges.push(TrimRange {
                offset: lba * SECTOR_SIZE,
                len: len * SECTOR_SIZE,
            }),
            _ => return Err(error::ABRT),
        }
    }
    Ok(ranges)
}

/// Encode one entry (for tests and for transports that build payloads).
pub fn entry(lba: u64, sectors: u16) -> [u8; ENTRY_SIZE] {
    (lba & 0xffff_ffff_ffff | u64::from(sectors) << 48).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_skip_empty_ones() {
        let mut p = vec![0u8; 512];
        p[..8].copy_from_slice(&entry(10, 4));
        p[16..24].copy_from_slice(&entry(100, 1));
        let r = parse_trim(&p, 200).unwrap();
        assert_eq!(
            r,
            vec![
                TrimRange {
                    offset: 5120,
                    len: 2048
                },
                TrimRange {
                    offset: 51200,
                    len: 512
                }
            ]
        );
    }

    #[test]
    fn ranges_past_the_end_abort() {
        let mut p = vec![0u8; 512];
        p[..8].copy_from_slice(&entry(199, 2));
        assert_eq!(parse_trim(&p, 200), Err(error::ABRT));
        p[..8].copy_from_slice(&entry(0xffff_ffff_ffff, 0xffff));
        assert_eq!(parse_trim(&p, 200), Err(error::ABRT));
    }
}
