//! DMA commands and asynchronous disk completions on an IDE channel: the
//! bus-master engine resolves the PRD table when both the command and the
//! start bit are there (either order), the disk request runs off the vCPU
//! thread, and its completion finishes the command (SFF-8038i Table 2 for
//! the bus-master status bits).

use std::collections::VecDeque;

use platter_block::{BlockError, Request, RequestOp, SgList};
use vm_memory::Bytes;

use super::*;
use crate::ata::dsm::{parse_trim, TrimRange};
use crate::ide::bus_master::{PrdError, BM_STATUS_ACTIVE, BM_STATUS_ERROR};
use crate::scsi::sense::key;

/// What a DMA command moves once the bus master starts.
#[derive(Debug)]
pub(super) enum DmaOp {
    /// Disk to memory.
    Read { offset: u64, len: usize },
    /// Memory to disk.
    Write { offset: u64, len: usize },
    /// A device buffer (ATAPI data-in) to memory.
    Buffer(Vec<u8>),
    /// TRIM ranges from memory, then discards.
    Trim { len: usize },
}

impl DmaOp {
    pub(super) fn len(&self) -> usize {
        match self {
            DmaOp::Read { len, .. } | DmaOp::Write { len, .. } | DmaOp::Trim { len } => *len,
            DmaOp::Buffer(b) => b.len(),
        }
    }
}

/// What finishes when the in-flight disk request completes.
#[derive(Debug)]
pub(super) enum Then {
    Flush,
    Dma {
        exhausted: bool,
        read: bool,
    },
    Trim {
        rest: VecDeque<TrimRange>,
        exhausted: bool,
    },
}

/// The channel's outstanding command beyond the register interface.
#[derive(Debug)]
pub(super) enum Pending {
    /// A DMA command waits for the guest to start the bus master.
    DmaWaiting { drive: usize, op: DmaOp },
    /// A disk request tagged `tag` is in flight for `drive`.
    InFlight { drive: usize, tag: u64, then: Then },
}

/// How a DMA command ended.
pub(super) enum DmaEnd {
    Ok,
    /// The disk failed the request (a read: UNC; otherwise ABRT).
    DiskError {
        read: bool,
    },
    /// PCI master abort: a PRD table or region outside guest RAM.
    MasterAbort,
    /// The PRD table ended before the transfer.
    PrdShort,
    /// The TRIM payload named sectors past the end.
    BadTrim,
}

impl IdeChannel {
    pub(super) fn queue_dma(&mut self, index: usize, op: DmaOp) {
        self.drive(index).status = status::BSY | status::DRDY;
        self.pending = Some(Pending::DmaWaiting { drive: index, op });
        self.try_start_dma();
    }

    pub(super) fn try_start_dma(&mut self) {
        if !self.bm.active() || !self.bus_master_enabled {
            return;
        }
        if !matches!(self.pending, Some(Pending::DmaWaiting { .. })) {
            return;
        }
        let Some(Pending::DmaWaiting { drive: index, op }) = self.pending.take() else {
            return;
        };
        let prd = match self.bm.walk(&self.mem, op.len()) {
            Ok(prd) => prd,
            Err(PrdError::MasterAbort) => return self.end_dma(index, DmaEnd::MasterAbort, false),
            Err(PrdError::Short) => return self.end_dma(index, DmaEnd::PrdShort, false),
        };
        let exhausted = prd.exhausted;
        match op {
            DmaOp::Read { offset, .. } | DmaOp::Write { offset, .. } => {
                let read = matches!(op, DmaOp::Read { .. });
                let Ok(buf) = SgList::from_guest(&self.mem, &prd.segments) else {
                    return self.end_dma(index, DmaEnd::MasterAbort, exhausted);
                };
                let req = if read {
                    RequestOp::Read { offset, buf }
                } else {
                    RequestOp::Write { offset, buf }
                };
                self.submit(index, req, Then::Dma { exhausted, read });
            }
            DmaOp::Buffer(v) => {
                let mut at = 0;
                for &(addr, len) in &prd.segments {
                    if self.mem.write_slice(&v[at..at + len], addr).is_err() {
                        return self.end_dma(index, DmaEnd::MasterAbort, exhausted);
                    }
                    at += len;
                }
                self.end_dma(index, DmaEnd::Ok, exhausted);
            }
            DmaOp::Trim { len } => {
                let mut payload = vec![0u8; len];
                let mut at = 0;
                for &(addr, n) in &prd.segments {
                    if self.mem.read_slice(&mut payload[at..at + n], addr).is_err() {
                        return self.end_dma(index, DmaEnd::MasterAbort, exhausted);
                    }
                    at += n;
                }
                let sectors = self.drive(index).ata.sectors();
                let Ok(ranges) = parse_trim(&payload, sectors) else {
                    return self.end_dma(index, DmaEnd::BadTrim, exhausted);
                };
                let mut rest: VecDeque<_> = ranges.into();
                match rest.pop_front() {
                    None => self.end_dma(index, DmaEnd::Ok, exhausted),
                    Some(r) => self.submit(
                        index,
                        RequestOp::Discard {
                            offset: r.offset,
                            len: r.len,
                        },
                        Then::Trim { rest, exhausted },
                    ),
                }
            }
        }
    }

    /// Start a disk request that finishes asynchronously.
    pub(super) fn submit(&mut self, index: usize, op: RequestOp, then: Then) {
        let d = self.drive(index);
        d.status = status::BSY | status::DRDY;
        let tag = d.tag();
        log::debug!("IDE drive {index}: submit {tag}");
        match d.disk.submit(Request { tag, op }) {
            Ok(()) => {
                self.pending = Some(Pending::InFlight {
                    drive: index,
                    tag,
                    then,
                });
            }
            Err(e) => {
                log::warn!("IDE: disk refused a request: {}", e.error);
                self.complete(index, then, Err(e.error));
            }
        }
    }

    pub(super) fn on_completion(
        &mut self,
        index: usize,
        tag: u64,
        result: Result<usize, BlockError>,
    ) {
        let ours = matches!(
            &self.pending,
            Some(Pending::InFlight { drive, tag: t, .. }) if *drive == index && *t == tag
        );
        if !ours {
            // Dropped by a reset, or a synchronous request's.
            log::debug!("IDE drive {index}: completion {tag} dropped");
            return;
        }
        log::debug!("IDE drive {index}: completion {tag} {result:?}");
        let Some(Pending::InFlight { then, .. }) = self.pending.take() else {
            return;
        };
        self.complete(index, then, result);
    }

    pub(super) fn complete(&mut self, index: usize, then: Then, result: Result<usize, BlockError>) {
        if let Err(e) = &result {
            // The block layer has warned of it (rate-limited); this traces each one.
            log::debug!("IDE: disk request failed: {e}");
        }
        match then {
            Then::Flush => match result {
                Ok(_) => self.finish_ok(index),
                Err(_) => self.finish_error(index, error::ABRT, true),
            },
            Then::Dma { exhausted, read } => {
                let end = if result.is_ok() {
                    DmaEnd::Ok
                } else {
                    DmaEnd::DiskError { read }
                };
                self.end_dma(index, end, exhausted);
            }
            Then::Trim {
                mut rest,
                exhausted,
            } => match (result, rest.pop_front()) {
                (Err(_), _) => self.end_dma(index, DmaEnd::DiskError { read: false }, exhausted),
                (Ok(_), None) => self.end_dma(index, DmaEnd::Ok, exhausted),
                (Ok(_), Some(r)) => self.submit(
                    index,
                    RequestOp::Discard {
                        offset: r.offset,
                        len: r.len,
                    },
                    Then::Trim { rest, exhausted },
                ),
            },
        }
    }

    /// Finish a DMA command: bus-master status, then the device's.
    pub(super) fn end_dma(&mut self, index: usize, end: DmaEnd, exhausted: bool) {
        let packet = self.drive(index).kind() == DeviceKind::Packet;
        match end {
            DmaEnd::Ok => {
                if exhausted {
                    self.bm.clear_status_bits(BM_STATUS_ACTIVE);
                }
                if packet {
                    self.atapi_ok(index);
                } else {
                    self.finish_ok(index);
                }
            }
            DmaEnd::DiskError { read } => {
                if exhausted {
                    self.bm.clear_status_bits(BM_STATUS_ACTIVE);
                }
                if packet {
                    self.atapi_error(index, Sense::UNRECOVERED_READ_ERROR);
                } else {
                    self.finish_error(index, if read { error::UNC } else { error::ABRT }, true);
                }
            }
            DmaEnd::BadTrim => self.finish_error(index, error::ABRT, true),
            DmaEnd::MasterAbort => {
                self.bm.clear_status_bits(BM_STATUS_ACTIVE);
                self.bm.set_status_bits(BM_STATUS_ERROR);
                if packet {
                    self.atapi_error(index, Sense::ABORTED_COMMAND);
                } else {
                    self.finish_error(index, error::ABRT, true);
                }
            }
            DmaEnd::PrdShort => {
                self.bm.clear_status_bits(BM_STATUS_ACTIVE);
                if packet {
                    let d = self.drive(index);
                    if let Some(unit) = d.cdrom.as_mut() {
                        unit.set_sense(Sense::ABORTED_COMMAND);
                    }
                    d.regs.count[0] = IREASON_IO | IREASON_COD;
                    self.finish_error(index, key::ABORTED_COMMAND << 4 | error::ABRT, false);
                } else {
                    self.finish_error(index, error::ABRT, false);
                }
            }
        }
    }
}
