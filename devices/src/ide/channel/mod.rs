//! One IDE channel: two device positions behind one set of task-file
//! registers (ATA/ATAPI-6 §7), the device control register, the PIO data
//! port, and the channel's bus-master DMA engine.
//!
//! Protocols (ATA/ATAPI-6 §9), as status register states:
//!
//! ```text
//!  non-data      cmd ─▶ DRDY + INTRQ
//!  PIO data-in   cmd ─▶ DRQ + INTRQ ─(block read)─▶ DRQ + INTRQ ... ─▶ DRDY
//!  PIO data-out  cmd ─▶ DRQ ─(block written)─▶ DRQ + INTRQ ... ─▶ DRDY + INTRQ
//!  DMA           cmd ─▶ BSY ─(BM start)─▶ disk I/O ─(completion)─▶ DRDY + INTRQ,
//!                                                    BM interrupt (+ active off)
//!  PACKET        cmd ─▶ DRQ, ireason CoD ─(12-byte CDB)─▶ data-in DRQ blocks of
//!                at most the byte count limit, each with INTRQ and ireason IO,
//!                or DMA ─▶ DRDY + INTRQ, ireason IO|CoD
//! ```
//!
//! Errors finish with DRDY|ERR and the error register (ATAPI: sense key in
//! bits 7:4). A command written while the device is BSY or DRQ is ignored,
//! except DEVICE RESET to a PACKET device; SRST in the device control
//! register always resets both devices.
//!
//! DMA faults, following SFF-8038i Table 2: a PRD table or region outside
//! RAM is a PCI master abort (BM error, active off); the device then ends
//! the command with ABRT and interrupts, so the host need not wait for a
//! timeout. A table shorter than the transfer stops the engine with
//! interrupt and active both clear, the spec's error combination, and the
//! device ends the command with ABRT without interrupting. Nothing moves
//! in either case.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use platter_block::RequestOp;
use vm_memory::GuestMemoryMmap;

use super::bus_master::{BmEvent, BusMaster, BM_STATUS_INTERRUPT};
use super::drive::{Drive, Pio, PioKind, DEVICE_OBSOLETE, IREASON_COD, IREASON_IO};
use super::{IdeDriveConfig, IdeError, IrqLevel};
use crate::ata::{cmd, error, status, AtaAction, DeviceKind, Protocol, SECTOR_SIZE};
use crate::scsi::{Sense, CD_BLOCK_SIZE};

/// Device control register: interrupts disabled (nIEN).
pub const CONTROL_NIEN: u8 = 0x02;
/// Device control register: software reset.
pub const CONTROL_SRST: u8 = 0x04;
/// Device control register: read the previous (48-bit high order) bytes.
pub const CONTROL_HOB: u8 = 0x80;

/// Command block register offsets.
const REG_DATA: u64 = 0;
const REG_ERROR: u64 = 1;
const REG_DEVICE: u64 = 6;
const REG_STATUS: u64 = 7;

/// Bytes of an ATAPI command packet (IDENTIFY PACKET DEVICE word 0, 1:0 = 0).
const PACKET_LEN: usize = 12;
/// Sectors a PIO read fetches from the disk at a time.
const PIO_CHUNK_SECTORS: u32 = 256;
/// CD blocks an ATAPI PIO read fetches at a time.
const CD_CHUNK_BLOCKS: u32 = 16;

const READY: u8 = status::DRDY | status::DSC;

mod atapi;
mod dma;

use dma::{DmaOp, Pending, Then};

/// One IDE channel with up to two devices and its bus-master registers.
pub struct IdeChannel {
    drives: [Option<Drive>; 2],
    selected: usize,
    /// Last device register value written (what reads return).
    select: u8,
    control: u8,
    bm: BusMaster,
    pending: Option<Pending>,
    bus_master_enabled: bool,
    mem: GuestMemoryMmap,
    irq: Arc<dyn IrqLevel>,
    irq_level: bool,
}

impl IdeChannel {
    /// A channel with devices 0 and 1 as given. Bus mastering starts enabled
    /// (the PCI function turns it off and on with its command register).
    pub fn new(
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLevel>,
        drives: [Option<IdeDriveConfig>; 2],
    ) -> Result<Self, IdeError> {
        let [d0, d1] = drives;
        let build = |c: Option<IdeDriveConfig>| c.map(|c| c.build()).transpose();
        Ok(Self {
            drives: [build(d0)?, build(d1)?],
            selected: 0,
            select: DEVICE_OBSOLETE,
            control: 0,
            bm: BusMaster::default(),
            pending: None,
            bus_master_enabled: true,
            mem,
            irq,
            irq_level: false,
        })
    }

    /// Whether any device is attached.
    pub fn has_drives(&self) -> bool {
        self.drives.iter().any(Option::is_some)
    }

    /// The bus-master registers.
    pub fn bus_master(&self) -> &BusMaster {
        &self.bm
    }

    /// The disk behind device `index`, if attached.
    pub fn disk(&self, index: usize) -> Option<&platter_block::Disk> {
        self.drives.get(index)?.as_ref().map(|d| &d.disk)
    }

    /// The level the channel drives on its interrupt line.
    pub fn irq_level(&self) -> bool {
        self.irq_level
    }

    /// The completion eventfds of the attached disks: when one is readable,
    /// call [`Self::process_completions`].
    pub fn completion_fds(&self) -> Vec<RawFd> {
        self.drives
            .iter()
            .flatten()
            .map(|d| d.disk.as_raw_fd())
            .collect()
    }

    /// Finish whatever the disks completed.
    pub fn process_completions(&mut self) {
        for index in 0..2 {
            let Some(drive) = self.drives[index].as_mut() else {
                continue;
            };
            let mut done: Vec<_> = drive.stash.drain(..).collect();
            done.extend(drive.disk.completions());
            for (tag, result) in done {
                self.on_completion(index, tag, result);
            }
        }
    }

    /// The machine stops: let each drive's requests finish and flush its disk.
    pub fn shutdown(&mut self) {
        for drive in self.drives.iter_mut().flatten() {
            if let Err(e) = drive.disk.drain_and_flush(crate::pci::SHUTDOWN_TIMEOUT) {
                log::error!("IDE: flushing a disk at shutdown: {e}");
            }
        }
    }

    /// The PCI command register's bus master enable changed.
    pub fn set_bus_master_enabled(&mut self, on: bool) {
        self.bus_master_enabled = on;
        self.try_start_dma();
    }

    // ---- register interface ------------------------------------------------

    /// Guest read of the command block (offset 0 to 7).
    pub fn read_command(&mut self, offset: u64, data: &mut [u8]) {
        if offset == REG_DATA {
            return self.read_data(data);
        }
        let value = self.read_register(offset);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn read_register(&mut self, reg: u64) -> u8 {
        if !self.has_drives() {
            // Nothing drives the bus: it floats high.
            return 0xff;
        }
        if reg == REG_DEVICE {
            return self.select;
        }
        let hob = self.control & CONTROL_HOB != 0;
        let selected = self.selected;
        let Some(drive) = self.drives[selected].as_mut() else {
            // Device 0 answers for an absent device 1 with zeroes.
            return 0;
        };
        match reg {
            REG_ERROR => drive.error,
            REG_STATUS => {
                let s = drive.status;
                log::trace!("IDE status read {s:#04x} (selected {selected})");
                drive.intrq = false;
                self.update_irq();
                s
            }
            r => drive.regs.read(r, hob),
        }
    }

    /// Guest write of the command block (offset 0 to 7).
    pub fn write_command(&mut self, offset: u64, data: &[u8]) {
        if offset == REG_DATA {
            return self.write_data(data);
        }
        let Some(&v) = data.first() else {
            return;
        };
        if offset == REG_STATUS {
            return self.command(v);
        }
        if self.selected_busy() {
            return;
        }
        self.control &= !CONTROL_HOB;
        for drive in self.drives.iter_mut().flatten() {
            if offset == REG_DEVICE {
                drive.regs.device = v;
            } else {
                drive.regs.write(offset, v);
            }
        }
        if offset == REG_DEVICE {
            self.select = v | DEVICE_OBSOLETE;
            self.selected = usize::from(v & crate::ata::DEVICE_DEV != 0);
            self.update_irq();
        }
    }

    /// Guest read of the control block: alternate status (no side effects).
    pub fn read_control(&mut self, data: &mut [u8]) {
        let value = if !self.has_drives() {
            0xff
        } else {
            self.drives[self.selected].as_ref().map_or(0, |d| d.status)
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    /// Guest write of the control block: device control.
    pub fn write_control(&mut self, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        let old = self.control;
        self.control = v & (CONTROL_NIEN | CONTROL_SRST | CONTROL_HOB);
        if v & CONTROL_SRST != 0 && old & CONTROL_SRST == 0 {
            // Reset asserted: devices go busy, anything outstanding is
            // dropped (a disk request in flight completes unheard).
            self.pending = None;
            for drive in self.drives.iter_mut().flatten() {
                drive.pio = None;
                drive.intrq = false;
                drive.status = status::BSY;
            }
        } else if v & CONTROL_SRST == 0 && old & CONTROL_SRST != 0 {
            for drive in self.drives.iter_mut().flatten() {
                drive.reset();
            }
            self.select = DEVICE_OBSOLETE;
            self.selected = 0;
        }
        self.update_irq();
    }

    /// Guest read of this channel's bus-master registers (offset 0 to 7).
    pub fn read_bm(&mut self, offset: u64, data: &mut [u8]) {
        self.bm.read(offset, data);
    }

    /// Guest write of this channel's bus-master registers.
    pub fn write_bm(&mut self, offset: u64, data: &[u8]) {
        if self.bm.write(offset, data) == BmEvent::Started {
            self.try_start_dma();
        }
    }

    fn selected_busy(&self) -> bool {
        self.drives[self.selected]
            .as_ref()
            .is_some_and(|d| d.status & (status::BSY | status::DRQ) != 0)
    }

    // ---- interrupts ----------------------------------------------------------

    fn update_irq(&mut self) {
        let level = self.control & CONTROL_NIEN == 0
            && self.drives[self.selected].as_ref().is_some_and(|d| d.intrq);
        if level != self.irq_level {
            log::debug!("IDE irq {} (selected {})", level, self.selected);
            self.irq_level = level;
            self.irq.set(level);
        }
    }

    fn raise(&mut self, index: usize) {
        if let Some(d) = self.drives[index].as_mut() {
            d.intrq = true;
            self.bm.set_status_bits(BM_STATUS_INTERRUPT);
        }
        self.update_irq();
    }

    fn drive(&mut self, index: usize) -> &mut Drive {
        self.drives[index]
            .as_mut()
            .expect("commands only run on attached devices")
    }

    fn finish_ok(&mut self, index: usize) {
        let d = self.drive(index);
        d.status = READY;
        d.error = 0;
        d.pio = None;
        self.raise(index);
    }

    fn finish_error(&mut self, index: usize, error_bits: u8, interrupt: bool) {
        let d = self.drive(index);
        d.status = READY | status::ERR;
        d.error = error_bits;
        d.pio = None;
        if interrupt {
            self.raise(index);
        }
    }

    // ---- commands --------------------------------------------------------------

    fn command(&mut self, v: u8) {
        let index = self.selected;
        let Some(drive) = self.drives[index].as_mut() else {
            if v == cmd::EXECUTE_DEVICE_DIAGNOSTIC && self.has_drives() {
                self.diagnostic();
            }
            return;
        };
        let busy = drive.status & (status::BSY | status::DRQ) != 0;
        let reset = v == cmd::DEVICE_RESET && drive.kind() == DeviceKind::Packet;
        if busy && !reset {
            return;
        }
        if reset
            && matches!(self.pending, Some(Pending::DmaWaiting { drive, .. } | Pending::InFlight { drive, .. }) if drive == index)
        {
            self.pending = None;
        }
        let drive = self.drive(index);
        drive.intrq = false;
        drive.pio = None;
        let tf = drive.regs.taskfile(v);
        let action = drive.ata.decode(&tf);
        log::debug!("IDE drive {index} command {v:#04x} -> {action:?}");
        self.update_irq();
        self.run(index, action);
    }

    fn run(&mut self, index: usize, action: AtaAction) {
        match action {
            AtaAction::Complete(out) => {
                self.drive(index).regs.apply(&out);
                self.finish_ok(index);
            }
            AtaAction::Abort { error, outputs } => {
                self.drive(index).regs.apply(&outputs);
                self.finish_error(index, error, true);
            }
            AtaAction::DataIn(buf) => {
                let kind = PioKind::Buffer {
                    limit: buf.len(),
                    packet: false,
                };
                self.start_pio(index, Pio::new(buf, false, kind));
            }
            AtaAction::Read {
                lba,
                sectors,
                protocol: Protocol::Pio { block },
            } => {
                let kind = PioKind::Sectors {
                    lba,
                    remaining: sectors,
                    block,
                };
                self.start_pio(index, Pio::new(Vec::new(), false, kind));
            }
            AtaAction::Write {
                lba,
                sectors,
                protocol: Protocol::Pio { block },
            } => {
                let n = block.min(sectors);
                let kind = PioKind::Sectors {
                    lba,
                    remaining: sectors - n,
                    block,
                };
                let buf = vec![0; sectors_bytes(n)];
                self.start_pio(index, Pio::new(buf, true, kind));
            }
            AtaAction::Read {
                lba,
                sectors,
                protocol: Protocol::Dma,
            } => self.queue_dma(
                index,
                DmaOp::Read {
                    offset: lba * SECTOR_SIZE,
                    len: sectors_bytes(sectors),
                },
            ),
            AtaAction::Write {
                lba,
                sectors,
                protocol: Protocol::Dma,
            } => self.queue_dma(
                index,
                DmaOp::Write {
                    offset: lba * SECTOR_SIZE,
                    len: sectors_bytes(sectors),
                },
            ),
            AtaAction::Trim { blocks } => {
                let len = sectors_bytes(blocks);
                self.queue_dma(index, DmaOp::Trim { len });
            }
            AtaAction::Flush => self.submit(index, RequestOp::Flush, Then::Flush),
            AtaAction::SetWriteCache(on) => {
                self.drive(index).disk.set_wce(on);
                self.finish_ok(index);
            }
            AtaAction::ExecuteDiagnostic => self.diagnostic(),
            AtaAction::DeviceReset => {
                self.drive(index).reset();
                self.update_irq();
            }
            AtaAction::Packet { dma } => {
                let d = self.drive(index);
                let limit = d.regs.byte_count_limit();
                d.regs.count[0] = IREASON_COD;
                let mut pio = Pio::new(vec![0; PACKET_LEN], true, PioKind::Packet { dma, limit });
                pio.block_end = PACKET_LEN;
                d.pio = Some(pio);
                d.status = status::DRDY | status::DRQ;
            }
        }
    }

    /// EXECUTE DEVICE DIAGNOSTIC: both devices post signatures and pass;
    /// device 0 selected, interrupt.
    fn diagnostic(&mut self) {
        self.pending = None;
        for d in self.drives.iter_mut().flatten() {
            d.reset();
        }
        self.select = DEVICE_OBSOLETE;
        self.selected = usize::from(self.drives[0].is_none());
        let index = self.selected;
        self.raise(index);
    }

    // ---- PIO -------------------------------------------------------------------

    /// Begin a PIO transfer: data-in fetches and offers its first block with
    /// an interrupt; data-out asks for its first block without one.
    fn start_pio(&mut self, index: usize, mut pio: Pio) {
        if pio.out {
            pio.block_end = pio.buf.len();
            let d = self.drive(index);
            d.pio = Some(pio);
            d.status = READY | status::DRQ;
            return;
        }
        self.next_in_block(index, pio);
    }

    /// Offer the next data-in block of `pio` (fetching more from the disk
    /// when the buffer is drained), or end the transfer.
    fn next_in_block(&mut self, index: usize, mut pio: Pio) {
        if pio.pos == pio.buf.len() {
            match self.refill(index, &mut pio) {
                Ok(true) => {}
                Ok(false) => return self.pio_in_done(index, &pio.kind),
                Err(()) => return,
            }
        }
        let left = pio.buf.len() - pio.pos;
        let block = match pio.kind {
            PioKind::Buffer { limit, .. } | PioKind::CdRead { limit, .. } => limit.min(left),
            PioKind::Sectors { block, .. } => sectors_bytes(block).min(left),
            PioKind::Packet { .. } => left,
        };
        pio.block_end = pio.pos + block;
        let packet = is_packet_transfer(&pio.kind);
        let d = self.drive(index);
        if packet {
            d.regs.set_byte_count(block);
            d.regs.count[0] = IREASON_IO;
        }
        d.pio = Some(pio);
        d.status = READY | status::DRQ;
        self.raise(index);
    }

    /// Fetch the next chunk of a disk-backed data-in transfer into the
    /// buffer. `Ok(false)`: nothing left. `Err`: the command failed (and
    /// has been finished).
    fn refill(&mut self, index: usize, pio: &mut Pio) -> Result<bool, ()> {
        let (offset, len) = match &mut pio.kind {
            PioKind::Sectors { lba, remaining, .. } if *remaining > 0 => {
                let n = (*remaining).min(PIO_CHUNK_SECTORS);
                let at = *lba * SECTOR_SIZE;
                *lba += u64::from(n);
                *remaining -= n;
                (at, sectors_bytes(n))
            }
            PioKind::CdRead { lba, remaining, .. } if *remaining > 0 => {
                let n = (*remaining).min(CD_CHUNK_BLOCKS);
                let at = *lba * CD_BLOCK_SIZE;
                *lba += u64::from(n);
                *remaining -= n;
                (at, cd_bytes(n))
            }
            _ => return Ok(false),
        };
        pio.buf.clear();
        pio.buf.resize(len, 0);
        pio.pos = 0;
        let d = self.drive(index);
        if let Err(e) = d.sync_io(false, offset, &mut pio.buf) {
            log::warn!("IDE: PIO read of {len} bytes at {offset:#x} failed: {e}");
            self.fail_read(index);
            return Err(());
        }
        Ok(true)
    }

    fn fail_read(&mut self, index: usize) {
        if self.drive(index).kind() == DeviceKind::Packet {
            self.atapi_error(index, Sense::UNRECOVERED_READ_ERROR);
        } else {
            self.finish_error(index, error::UNC, true);
        }
    }

    fn pio_in_done(&mut self, index: usize, kind: &PioKind) {
        if is_packet_transfer(kind) {
            self.atapi_ok(index);
        } else {
            // PIO data-in ends without an interrupt: the last block's
            // interrupt came when it was offered.
            let d = self.drive(index);
            d.status = READY;
            d.pio = None;
        }
    }

    fn read_data(&mut self, data: &mut [u8]) {
        data.fill(0);
        let index = self.selected;
        let Some(drive) = self.drives[index].as_mut() else {
            return;
        };
        let Some(pio) = drive.pio.as_mut().filter(|p| !p.out) else {
            return;
        };
        let n = data.len().min(pio.block_end - pio.pos);
        data[..n].copy_from_slice(&pio.buf[pio.pos..pio.pos + n]);
        pio.pos += n;
        if pio.pos == pio.block_end {
            let pio = drive.pio.take().expect("checked above");
            drive.status &= !status::DRQ;
            self.next_in_block(index, pio);
        }
    }

    fn write_data(&mut self, data: &[u8]) {
        let index = self.selected;
        let Some(drive) = self.drives[index].as_mut() else {
            return;
        };
        let Some(pio) = drive.pio.as_mut().filter(|p| p.out) else {
            return;
        };
        let n = data.len().min(pio.block_end - pio.pos);
        pio.buf[pio.pos..pio.pos + n].copy_from_slice(&data[..n]);
        pio.pos += n;
        if pio.pos == pio.block_end {
            let pio = drive.pio.take().expect("checked above");
            drive.status &= !status::DRQ;
            self.out_block_done(index, pio);
        }
    }

    /// A data-out block is full: store it (ATA) or run the packet (ATAPI).
    fn out_block_done(&mut self, index: usize, mut pio: Pio) {
        match pio.kind {
            PioKind::Packet { dma, limit } => self.atapi_command(index, &pio.buf, dma, limit),
            PioKind::Sectors {
                lba,
                remaining,
                block,
            } => {
                let d = self.drive(index);
                let offset = lba * SECTOR_SIZE;
                if let Err(e) = d.sync_io(true, offset, &mut pio.buf) {
                    log::warn!("IDE: PIO write at {offset:#x} failed: {e}");
                    return self.finish_error(index, error::ABRT, true);
                }
                if remaining == 0 {
                    return self.finish_ok(index);
                }
                let n = block.min(remaining);
                pio.kind = PioKind::Sectors {
                    lba: lba + pio.buf.len() as u64 / SECTOR_SIZE,
                    remaining: remaining - n,
                    block,
                };
                pio.buf.resize(sectors_bytes(n), 0);
                pio.pos = 0;
                pio.block_end = pio.buf.len();
                let d = self.drive(index);
                d.pio = Some(pio);
                d.status = READY | status::DRQ;
                self.raise(index);
            }
            PioKind::Buffer { .. } | PioKind::CdRead { .. } => {}
        }
    }
}

/// Data-in of a PACKET command: DRQ blocks carry a byte count and an
/// interrupt reason, and the command ends with a status interrupt.
fn is_packet_transfer(kind: &PioKind) -> bool {
    matches!(
        kind,
        PioKind::Buffer { packet: true, .. } | PioKind::CdRead { .. }
    )
}

fn sectors_bytes(n: u32) -> usize {
    // At most 65536 sectors: 32 MiB.
    usize::try_from(u64::from(n) * SECTOR_SIZE).unwrap_or(usize::MAX)
}

fn cd_bytes(n: u32) -> usize {
    usize::try_from(u64::from(n) * CD_BLOCK_SIZE).unwrap_or(usize::MAX)
}
