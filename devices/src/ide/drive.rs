//! One device on an IDE channel: its copy of the command block registers
//! (both devices latch every register write, ATA/ATAPI-6 §5.2), its status
//! and error, the ATA (and for a CD-ROM, SCSI) command layer, the backing
//! disk and the PIO transfer in progress.
//!
//! PIO data moves synchronously through the disk on the vCPU thread (IDE is
//! the slow path): submit, then wait on the disk's completion eventfd.

use std::collections::VecDeque;

use platter_block::{BlockError, Completion, Disk, Request, RequestOp, SgList};

use crate::ata::{status, AtaDevice, DeviceKind, Outputs, Taskfile};
use crate::scsi::Cdrom;

/// Device register bits that always read as one (obsolete bits 7 and 5).
pub(super) const DEVICE_OBSOLETE: u8 = 0xa0;

/// Command block registers with their 48-bit "previous" bytes (a write
/// pushes the current byte into the previous slot).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TaskRegs {
    pub feature: [u8; 2],
    pub count: [u8; 2],
    pub lba_low: [u8; 2],
    pub lba_mid: [u8; 2],
    pub lba_high: [u8; 2],
    pub device: u8,
}

fn push(reg: &mut [u8; 2], v: u8) {
    reg[1] = reg[0];
    reg[0] = v;
}

impl TaskRegs {
    /// Guest write of register `reg` (1 to 5 of the command block).
    pub fn write(&mut self, reg: u64, v: u8) {
        match reg {
            1 => push(&mut self.feature, v),
            2 => push(&mut self.count, v),
            3 => push(&mut self.lba_low, v),
            4 => push(&mut self.lba_mid, v),
            5 => push(&mut self.lba_high, v),
            _ => {}
        }
    }

    /// Register `reg` (2 to 5), current or previous (HOB) byte.
    pub fn read(&self, reg: u64, hob: bool) -> u8 {
        let i = usize::from(hob);
        match reg {
            2 => self.count[i],
            3 => self.lba_low[i],
            4 => self.lba_mid[i],
            5 => self.lba_high[i],
            _ => 0,
        }
    }

    pub fn taskfile(&self, command: u8) -> Taskfile {
        let w = |r: [u8; 2]| u16::from_le_bytes(r);
        let lba = [self.lba_low, self.lba_mid, self.lba_high]
            .iter()
            .enumerate()
            .fold(0u64, |a, (i, r)| {
                a | u64::from(r[0]) << (8 * i) | u64::from(r[1]) << (24 + 8 * i)
            });
        Taskfile {
            command,
            features: w(self.feature),
            count: w(self.count),
            lba,
            device: self.device,
        }
    }

    /// Load the registers a command reports.
    pub fn apply(&mut self, out: &Outputs) {
        if let Some(c) = out.count {
            self.count = c.to_le_bytes();
        }
        if let Some(lba) = out.lba {
            let b = lba.to_le_bytes();
            self.lba_low = [b[0], b[3]];
            self.lba_mid = [b[1], b[4]];
            self.lba_high = [b[2], b[5]];
        }
    }

    /// ATAPI byte count limit (LBA mid/high at PACKET time), made even and
    /// non-zero as ATA/ATAPI-6 §8.21 requires of hosts.
    pub fn byte_count_limit(&self) -> usize {
        let limit = usize::from(u16::from_le_bytes([self.lba_mid[0], self.lba_high[0]]));
        match limit & !1 {
            0 => 0xfffe,
            l => l,
        }
    }

    pub fn set_byte_count(&mut self, n: usize) {
        let [lo, hi] = u16::try_from(n).unwrap_or(0xfffe).to_le_bytes();
        self.lba_mid[0] = lo;
        self.lba_high[0] = hi;
    }
}

/// ATAPI interrupt reason (sector count register): command/data, I/O.
pub(super) const IREASON_COD: u8 = 0x01;
pub(super) const IREASON_IO: u8 = 0x02;

/// Where a PIO transfer's data comes from or goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PioKind {
    /// All the data is in the buffer: IDENTIFY data, or a PACKET command's
    /// data-in (`packet`), chunked by `limit` bytes per DRQ block.
    Buffer { limit: usize, packet: bool },
    /// ATA sectors: next LBA to fetch (in) or of the buffered block (out),
    /// sectors not yet fetched or buffered, sectors per DRQ block.
    Sectors {
        lba: u64,
        remaining: u32,
        block: u32,
    },
    /// ATAPI READ: next 2048-byte block to fetch, blocks left, byte limit.
    CdRead {
        lba: u64,
        remaining: u32,
        limit: usize,
    },
    /// Receiving a 12-byte ATAPI command packet.
    Packet { dma: bool, limit: usize },
}

/// A PIO transfer between the data port and `buf`.
#[derive(Clone, Debug)]
pub(super) struct Pio {
    pub buf: Vec<u8>,
    pub pos: usize,
    /// End of the current DRQ data block in `buf`.
    pub block_end: usize,
    /// Host to device.
    pub out: bool,
    pub kind: PioKind,
}

impl Pio {
    pub fn new(buf: Vec<u8>, out: bool, kind: PioKind) -> Self {
        Self {
            buf,
            pos: 0,
            block_end: 0,
            out,
            kind,
        }
    }
}

/// One device on a channel.
pub(super) struct Drive {
    pub ata: AtaDevice,
    pub cdrom: Option<Cdrom>,
    pub disk: Disk,
    pub regs: TaskRegs,
    pub status: u8,
    pub error: u8,
    /// INTRQ pending (cleared by a status read or a new command).
    pub intrq: bool,
    pub pio: Option<Pio>,
    next_tag: u64,
    /// Completions a synchronous wait read that belong to someone else.
    pub stash: VecDeque<Completion>,
}

impl Drive {
    pub fn new(ata: AtaDevice, cdrom: Option<Cdrom>, disk: Disk) -> Self {
        let mut d = Self {
            ata,
            cdrom,
            disk,
            regs: TaskRegs::default(),
            status: 0,
            error: 0,
            intrq: false,
            pio: None,
            next_tag: 0,
            stash: VecDeque::new(),
        };
        d.reset();
        d
    }

    pub fn kind(&self) -> DeviceKind {
        self.ata.kind()
    }

    /// Reset (power-on, SRST, EXECUTE DEVICE DIAGNOSTIC, DEVICE RESET):
    /// signature in the registers, diagnostics passed, ready (ATA) or not
    /// (a PACKET device clears DRDY until IDENTIFY PACKET DEVICE).
    pub fn reset(&mut self) {
        self.pio = None;
        self.intrq = false;
        self.regs.apply(&Outputs::signature(self.kind()));
        self.regs.device = 0;
        self.error = crate::ata::error::DIAG_PASSED;
        self.status = match self.kind() {
            DeviceKind::Disk => status::DRDY | status::DSC,
            DeviceKind::Packet => 0,
        };
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    /// Read (`write` false) or write `buf` at byte `offset` of the disk and
    /// wait for it.
    pub fn sync_io(&mut self, write: bool, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let iov = platter_block::IoVec {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        };
        // SAFETY: `buf` is exclusively borrowed for this whole call, and the
        // call only returns once the disk has completed the request (the
        // loop below has no other exit after a successful submit), so the
        // segment stays valid and untouched while the request is in flight.
        let sg = unsafe { SgList::from_raw(vec![iov], None) };
        let tag = self.tag();
        let op = if write {
            RequestOp::Write { offset, buf: sg }
        } else {
            RequestOp::Read { offset, buf: sg }
        };
        self.disk.submit(Request { tag, op }).map_err(|e| e.error)?;
        let result = self.wait(tag);
        result.map(|_| ())
    }

    /// Wait for the completion of `tag`, keeping others for later.
    fn wait(&mut self, tag: u64) -> Result<usize, BlockError> {
        loop {
            let mut mine = None;
            for c in self.disk.completions() {
                if c.0 == tag {
                    mine = Some(c.1);
                } else {
                    self.stash.push_back(c);
                }
            }
            if let Some(r) = mine {
                if !self.stash.is_empty() {
                    // Reading completions reset the eventfd: fire it again
                    // so the event loop comes for the ones kept aside.
                    let _ = self.disk.completion_fd().write(1);
                }
                return r;
            }
            if let Err(e) = self.disk.wait_completions(None) {
                // The request still owns the buffer: keep waiting, gently.
                log::error!("IDE: waiting for disk completion failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
