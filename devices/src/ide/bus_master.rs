//! Bus-master IDE registers and PRD tables (SFF-8038i rev 1.0 §2, PIIX4
//! datasheet §5.2 BMICx/BMISx/BMIDTPx), one set per channel at BAR4 + 0
//! (primary) and BAR4 + 8 (secondary).
//!
//! ```text
//!  +0  command   bit 0 start/stop, bit 3 direction (1: device to memory)
//!  +2  status    bit 0 active (RO), 1 error (RWC), 2 interrupt (RWC),
//!                bits 5/6 drive 0/1 DMA capable (RW), 7 simplex (RO, 0)
//!  +4  PRD table address, dword aligned (bits 1:0 read as 0)
//!
//!  PRD entry (8 bytes, little endian), table dword aligned, never
//!  crossing a 64 KiB boundary:
//!  dword 0  memory region address (bit 0 ignored)
//!  dword 1  bits 15:0 byte count (bit 0 ignored, 0 = 64 KiB), bit 31 EOT
//! ```

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Command: start/stop bus master.
pub const BM_CMD_START: u8 = 0x01;
/// Command: transfer direction, 1 = write to memory (a device read).
pub const BM_CMD_WRITE_MEMORY: u8 = 0x08;
/// Status: the bus master is active.
pub const BM_STATUS_ACTIVE: u8 = 0x01;
/// Status: a PCI master or target abort stopped the transfer.
pub const BM_STATUS_ERROR: u8 = 0x02;
/// Status: the IDE device asserted its interrupt.
pub const BM_STATUS_INTERRUPT: u8 = 0x04;
/// Status: drive 0 and drive 1 DMA capable (software scratch bits).
const BM_STATUS_DMA_CAPABLE: u8 = 0x60;

const PRD_EOT: u64 = 1 << 63;
const PRD_ENTRY_SIZE: u64 = 8;
/// A PRD table may not cross this boundary (PIIX4 §5.7.3.1).
const PRD_TABLE_BOUNDARY: u64 = 0x1_0000;
/// A byte count of 0 in an entry means 64 KiB.
const PRD_MAX_BYTES: usize = 0x1_0000;

/// One channel's bus-master registers.
#[derive(Clone, Debug, Default)]
pub struct BusMaster {
    command: u8,
    status: u8,
    prdt: u32,
}

/// What a bus-master register write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BmEvent {
    None,
    /// The start bit went from 0 to 1.
    Started,
    /// The start bit went from 1 to 0.
    Stopped,
}

/// A PRD table resolved for one transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrdTable {
    /// Guest memory segments covering exactly the transfer.
    pub segments: Vec<(GuestAddress, usize)>,
    /// The transfer ended exactly at the end of the EOT entry, so the
    /// controller clears Active (SFF-8038i Table 2, Interrupt=1 Active=0).
    pub exhausted: bool,
}

/// Why a PRD table cannot carry a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrdError {
    /// An entry (or the table) lies outside guest RAM: a PCI master abort.
    MasterAbort,
    /// The table ended (EOT, or the 64 KiB boundary) before the transfer
    /// did.
    Short,
}

impl BusMaster {
    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn command(&self) -> u8 {
        self.command
    }

    pub fn prd_table(&self) -> u32 {
        self.prdt
    }

    /// The start bit is set and the engine has not finished.
    pub fn active(&self) -> bool {
        self.status & BM_STATUS_ACTIVE != 0
    }

    pub(crate) fn set_status_bits(&mut self, bits: u8) {
        self.status |= bits;
    }

    pub(crate) fn clear_status_bits(&mut self, bits: u8) {
        self.status &= !bits;
    }

    /// Guest read of `data.len()` bytes at `offset` (0 to 7).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let prdt = self.prdt.to_le_bytes();
        for (o, b) in (offset..).zip(data.iter_mut()) {
            *b = match o {
                0 => self.command,
                2 => self.status,
                4..=7 => prdt
                    .get(usize::try_from(o - 4).unwrap_or(0))
                    .copied()
                    .unwrap_or(0),
                _ => 0,
            };
        }
    }

    /// Guest write at `offset`; says whether the start bit moved.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> BmEvent {
        let mut event = BmEvent::None;
        let mut prdt = self.prdt.to_le_bytes();
        for (o, &v) in (offset..).zip(data) {
            match o {
                0 => {
                    let was = self.command & BM_CMD_START != 0;
                    self.command = v & (BM_CMD_START | BM_CMD_WRITE_MEMORY);
                    let now = v & BM_CMD_START != 0;
                    if now && !was {
                        self.status |= BM_STATUS_ACTIVE;
                        event = BmEvent::Started;
                    } else if was && !now {
                        self.status &= !BM_STATUS_ACTIVE;
                        event = BmEvent::Stopped;
                    }
                }
                2 => {
                    let clear = v & (BM_STATUS_ERROR | BM_STATUS_INTERRUPT);
                    self.status = (self.status & !BM_STATUS_DMA_CAPABLE & !clear)
                        | (v & BM_STATUS_DMA_CAPABLE);
                }
                4..=7 => {
                    if let Some(b) = prdt.get_mut(usize::try_from(o - 4).unwrap_or(0)) {
                        *b = v;
                    }
                }
                _ => {}
            }
        }
        self.prdt = u32::from_le_bytes(prdt) & !3;
        event
    }

    /// Resolve the current PRD table for a transfer of `len` bytes.
    pub fn walk(&self, mem: &GuestMemoryMmap, len: usize) -> Result<PrdTable, PrdError> {
        let mut at = u64::from(self.prdt);
        let end = (at | (PRD_TABLE_BOUNDARY - 1)) + 1;
        let mut need = len;
        let mut segments = Vec::new();
        while at + PRD_ENTRY_SIZE <= end {
            let entry: u64 = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| PrdError::MasterAbort)?;
            let base = entry & 0xffff_fffe;
            let count = match entry >> 32 & 0xffff {
                0 => PRD_MAX_BYTES,
                c => usize::try_from(c & 0xfffe).unwrap_or(0),
            };
            let eot = entry & PRD_EOT != 0;
            let take = count.min(need);
            if take > 0 {
                segments.push((GuestAddress(base), take));
            }
            need -= take;
            if need == 0 {
                return Ok(PrdTable {
                    segments,
                    exhausted: eot && take == count,
                });
            }
            if eot {
                return Err(PrdError::Short);
            }
            at += PRD_ENTRY_SIZE;
        }
        Err(PrdError::Short)
    }
}

/// Encode one PRD entry (for tests and firmware-like setup code).
pub fn prd_entry(address: u32, bytes: u32, eot: bool) -> [u8; 8] {
    let count = u64::from(bytes & 0xffff);
    let eot = if eot { PRD_EOT } else { 0 };
    (u64::from(address) | count << 32 | eot).to_le_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap()
    }

    fn table(m: &GuestMemoryMmap, at: u64, entries: &[(u32, u32, bool)]) -> BusMaster {
        for (i, &(a, n, eot)) in entries.iter().enumerate() {
            m.write_slice(&prd_entry(a, n, eot), GuestAddress(at + 8 * i as u64))
                .unwrap();
        }
        let mut bm = BusMaster::default();
        bm.write(4, &(at as u32).to_le_bytes());
        bm
    }

    #[test]
    fn registers() {
        let mut bm = BusMaster::default();
        assert_eq!(bm.write(0, &[0x09]), BmEvent::Started);
        assert!(bm.active());
        assert_eq!(bm.write(0, &[0x09]), BmEvent::None);
        bm.set_status_bits(BM_STATUS_ERROR | BM_STATUS_INTERRUPT);
        bm.write(2, &[BM_STATUS_INTERRUPT | 0x20]);
        assert_eq!(bm.status(), BM_STATUS_ACTIVE | BM_STATUS_ERROR | 0x20);
        assert_eq!(bm.write(0, &[0x08]), BmEvent::Stopped);
        assert!(!bm.active());
        bm.write(4, &[0x07, 0x10, 0, 0]);
        let mut b = [0; 4];
        bm.read(4, &mut b);
        assert_eq!(b, [0x04, 0x10, 0, 0], "PRDT is dword aligned");
    }

    #[test]
    fn walk_covers_exactly_the_transfer() {
        let m = mem();
        let bm = table(&m, 0x1000, &[(0x2000, 512, false), (0x3000, 0, true)]);
        let t = bm.walk(&m, 512 + 1024).unwrap();
        assert_eq!(
            t.segments,
            vec![(GuestAddress(0x2000), 512), (GuestAddress(0x3000), 1024)]
        );
        assert!(!t.exhausted, "second entry is 64 KiB");
        let t = bm.walk(&m, 512 + 0x1_0000).unwrap();
        assert!(t.exhausted);
        assert_eq!(bm.walk(&m, 512 + 0x1_0002), Err(PrdError::Short));
    }

    #[test]
    fn hostile_tables() {
        let m = mem();
        let mut bm = BusMaster::default();
        bm.write(4, &0x10_0000u32.to_le_bytes());
        assert_eq!(bm.walk(&m, 512), Err(PrdError::MasterAbort));
        // No EOT anywhere: the walk stops at the 64 KiB boundary.
        let entries: Vec<_> = (0..8).map(|_| (0x2000, 2, false)).collect();
        let bm = table(&m, 0xffc0, &entries);
        assert_eq!(bm.walk(&m, 1 << 20), Err(PrdError::Short));
    }
}
