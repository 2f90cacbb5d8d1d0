//! The PIIX IDE function driven through its registers, as a guest driver
//! would, on raw images in temporary files (cache=writeback, aio=threads):
//! ATA PIO and DMA here, hostile input in `hostile`, ATAPI in `atapi`.

#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::FileExt;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use platter_block::Disk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::ata::identify::{ata_string, word};
use crate::ata::{cmd, error, status};
use crate::pci::PciDevice;

mod atapi;
mod hostile;

const MEM_SIZE: usize = 0x40_0000;
const DISK_SIZE: u64 = 4 << 20;
const CAPACITY: u64 = DISK_SIZE / 512;
const PRD_TABLE: u64 = 0x1000;
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x20_0000;
const OUTSIDE_RAM: u64 = MEM_SIZE as u64 + 0x10_0000;

/// Command block registers.
const DATA: u64 = 0;
const ERROR: u64 = 1;
const FEATURES: u64 = 1;
const COUNT: u64 = 2;
const LBA_LOW: u64 = 3;
const LBA_MID: u64 = 4;
const LBA_HIGH: u64 = 5;
const DEVICE: u64 = 6;
const STATUS: u64 = 7;
const COMMAND: u64 = 7;
/// Bus-master registers.
const BM_COMMAND: u64 = 0;
const BM_STATUS: u64 = 2;
const BM_PRDT: u64 = 4;

const READY: u8 = status::DRDY | status::DSC;

pub(super) use crate::testutil::TempFile;

/// A raw image of `size` bytes whose byte i holds `fill(i)`.
pub(super) fn image(size: u64, readonly: bool, fill: Option<fn(u64) -> u8>) -> (TempFile, Disk) {
    crate::testutil::raw_image(size, readonly, fill)
}

#[derive(Default)]
pub(super) struct MockIrq {
    level: AtomicBool,
    rises: AtomicUsize,
}

impl IrqLevel for MockIrq {
    fn set(&self, level: bool) {
        if level && !self.level.swap(true, Ordering::SeqCst) {
            self.rises.fetch_add(1, Ordering::SeqCst);
        } else if !level {
            self.level.store(false, Ordering::SeqCst);
        }
    }
}

pub(super) struct Rig {
    pub ide: PiixIde,
    pub mem: GuestMemoryMmap,
    pub irqs: [Arc<MockIrq>; 2],
    pub files: Vec<TempFile>,
}

impl Rig {
    /// Primary master: an ATA disk of `size` bytes.
    pub fn disk(size: u64) -> Self {
        let (f, disk) = image(size, false, None);
        let cfg = IdeDriveConfig::new(disk, Media::Disk, "PLATTER HARDDISK", "PL0001");
        Self::with([[Some(cfg), None], [None, None]], vec![f])
    }

    pub fn with(drives: [[Option<IdeDriveConfig>; 2]; 2], files: Vec<TempFile>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irqs = [Arc::new(MockIrq::default()), Arc::new(MockIrq::default())];
        let lines: [Arc<dyn IrqLevel>; 2] = [irqs[0].clone(), irqs[1].clone()];
        let mut ide = PiixIde::new(PiixVariant::Piix3, mem.clone(), drives, lines).unwrap();
        // I/O decoding and bus mastering on, as the guest's PCI driver does.
        ide.write_config(0x04, &[0x05, 0x00]);
        Self {
            ide,
            mem,
            irqs,
            files,
        }
    }

    pub fn outb(&mut self, ch: usize, reg: u64, v: u8) {
        self.ide.write_legacy(ch, LegacyBlock::Command, reg, &[v]);
    }

    pub fn inb(&mut self, ch: usize, reg: u64) -> u8 {
        let mut b = [0];
        self.ide.read_legacy(ch, LegacyBlock::Command, reg, &mut b);
        b[0]
    }

    pub fn alt_status(&mut self, ch: usize) -> u8 {
        let mut b = [0];
        self.ide.read_legacy(ch, LegacyBlock::Control, 0, &mut b);
        b[0]
    }

    pub fn control(&mut self, ch: usize, v: u8) {
        self.ide.write_legacy(ch, LegacyBlock::Control, 0, &[v]);
    }

    /// Read `len` bytes from the data port, `width` bytes at a time.
    pub fn read_data(&mut self, ch: usize, len: usize, width: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for chunk in out.chunks_mut(width) {
            self.ide.read_legacy(ch, LegacyBlock::Command, DATA, chunk);
        }
        out
    }

    pub fn write_data(&mut self, ch: usize, data: &[u8], width: usize) {
        for chunk in data.chunks(width) {
            self.ide.write_legacy(ch, LegacyBlock::Command, DATA, chunk);
        }
    }

    /// A 28-bit LBA command on device `dev` of channel `ch`.
    pub fn issue(&mut self, ch: usize, dev: u8, command: u8, count: u8, lba: u32) {
        self.outb(ch, DEVICE, 0xe0 | dev << 4 | (lba >> 24) as u8 & 0xf);
        self.outb(ch, COUNT, count);
        self.outb(ch, LBA_LOW, lba as u8);
        self.outb(ch, LBA_MID, (lba >> 8) as u8);
        self.outb(ch, LBA_HIGH, (lba >> 16) as u8);
        self.outb(ch, COMMAND, command);
    }

    /// A 48-bit command: each register written twice, high byte first.
    pub fn issue48(&mut self, ch: usize, command: u8, count: u16, lba: u64) {
        self.outb(ch, DEVICE, 0x40);
        self.outb(ch, COUNT, (count >> 8) as u8);
        self.outb(ch, LBA_LOW, (lba >> 24) as u8);
        self.outb(ch, LBA_MID, (lba >> 32) as u8);
        self.outb(ch, LBA_HIGH, (lba >> 40) as u8);
        self.outb(ch, COUNT, count as u8);
        self.outb(ch, LBA_LOW, lba as u8);
        self.outb(ch, LBA_MID, (lba >> 8) as u8);
        self.outb(ch, LBA_HIGH, (lba >> 16) as u8);
        self.outb(ch, COMMAND, command);
    }

    pub fn rises(&self, ch: usize) -> usize {
        self.irqs[ch].rises.load(Ordering::SeqCst)
    }

    pub fn irq_level(&self, ch: usize) -> bool {
        self.irqs[ch].level.load(Ordering::SeqCst)
    }

    pub fn bm_write(&mut self, ch: usize, offset: u64, data: &[u8]) {
        self.ide.write_bar(BM_BAR, 8 * ch as u64 + offset, data);
    }

    pub fn bm_status(&mut self, ch: usize) -> u8 {
        let mut b = [0];
        self.ide.read_bar(BM_BAR, 8 * ch as u64 + BM_STATUS, &mut b);
        b[0]
    }

    /// Write a PRD table at `PRD_TABLE` and point channel `ch` at it.
    pub fn prd(&mut self, ch: usize, entries: &[(u64, u32, bool)]) {
        for (i, &(addr, len, eot)) in entries.iter().enumerate() {
            let e = prd_entry(addr as u32, len, eot);
            self.mem
                .write_slice(&e, GuestAddress(PRD_TABLE + 8 * i as u64))
                .unwrap();
        }
        self.bm_write(ch, BM_PRDT, &(PRD_TABLE as u32).to_le_bytes());
    }

    /// Clear BM error/interrupt, set the direction and start the engine.
    pub fn bm_start(&mut self, ch: usize, to_memory: bool) {
        self.bm_write(ch, BM_STATUS, &[BM_STATUS_ERROR | BM_STATUS_INTERRUPT]);
        let dir = if to_memory { BM_CMD_WRITE_MEMORY } else { 0 };
        self.bm_write(ch, BM_COMMAND, &[dir]);
        self.bm_write(ch, BM_COMMAND, &[dir | BM_CMD_START]);
    }

    /// Run the event loop until channel `ch`'s selected device is not busy.
    pub fn wait_not_busy(&mut self, ch: usize) -> u8 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.alt_status(ch);
            if s & status::BSY == 0 {
                return s;
            }
            assert!(Instant::now() < deadline, "device stayed busy");
            let mut fds: Vec<libc::pollfd> = self
                .ide
                .completion_fds()
                .into_iter()
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of pollfds for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            self.ide.process_completions();
        }
    }

    pub fn file_bytes(&self, i: usize, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.files[i].0).unwrap();
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }
}

pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn identify(rig: &mut Rig) -> Vec<u8> {
    rig.issue(0, 0, cmd::IDENTIFY_DEVICE, 0, 0);
    assert_eq!(rig.alt_status(0), READY | status::DRQ);
    rig.read_data(0, 512, 2)
}

#[test]
fn identify_through_the_data_port() {
    // More than 2^28 sectors (sparse).
    let sectors = (1u64 << 28) + 64;
    let mut rig = Rig::disk(sectors * 512);
    let before = rig.rises(0);
    let id = identify(&mut rig);
    assert_eq!(rig.rises(0), before + 1, "data-in block interrupt");
    assert_eq!(rig.inb(0, STATUS), READY, "DRQ drops after the last word");
    assert!(!rig.irq_level(0), "status read acknowledges");
    assert_eq!(word(&id, 60), 0xffff);
    assert_eq!(word(&id, 61), 0x0fff);
    let lba48: u64 = (0..4)
        .map(|i| u64::from(word(&id, 100 + i)) << (16 * i))
        .sum();
    assert_eq!(lba48, sectors);
    assert_ne!(word(&id, 83) & 1 << 10, 0);
    assert_ne!(word(&id, 86) & 1 << 10, 0);
    assert_eq!(word(&id, 88) & 0x3f, 0x3f);
    assert_ne!(word(&id, 82) & 1 << 5, 0);
    assert_ne!(word(&id, 85) & 1 << 5, 0, "cache=writeback: WCE on");
    assert_eq!(word(&id, 169) & 1, 1, "raw files can discard");
    assert_eq!(ata_string(&id, 27, 20), "PLATTER HARDDISK");
    assert_eq!(ata_string(&id, 10, 10), "PL0001");
    assert_eq!(&id[20..22], b"LP", "strings are byte-swapped");
}

#[test]
fn pio_write_then_read_round_trip() {
    let mut rig = Rig::disk(DISK_SIZE);
    let data = pattern(7, 3 * 512);
    rig.issue(0, 0, cmd::WRITE_SECTORS, 3, 100);
    assert_eq!(rig.alt_status(0), READY | status::DRQ);
    let before = rig.rises(0);
    rig.write_data(0, &data[..512], 2);
    assert_eq!(rig.rises(0), before + 1, "interrupt after each block");
    assert_eq!(rig.inb(0, STATUS), READY | status::DRQ);
    rig.write_data(0, &data[512..], 4);
    assert_eq!(rig.inb(0, STATUS), READY);
    assert_eq!(rig.file_bytes(0, 100 * 512, data.len()), data);

    // READ MULTIPLE: 16-sector blocks by default, 32-bit port accesses.
    rig.issue(0, 0, cmd::READ_MULTIPLE, 3, 100);
    assert_eq!(rig.inb(0, STATUS), READY | status::DRQ);
    assert_eq!(rig.read_data(0, data.len(), 4), data);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn pio_read_spans_chunks_and_blocks() {
    let mut rig = Rig::disk(DISK_SIZE);
    let data = pattern(3, 300 * 512);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.files[0].0)
        .unwrap()
        .write_all_at(&data, 10 * 512)
        .unwrap();
    // 300 sectors = a 48-bit count; more than one 256-sector chunk.
    rig.issue48(0, cmd::READ_SECTORS_EXT, 300, 10);
    let mut got = Vec::new();
    for _ in 0..300 {
        assert_eq!(rig.alt_status(0) & status::DRQ, status::DRQ);
        got.extend(rig.read_data(0, 512, 2));
    }
    assert_eq!(got, data);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn lba48_reaches_past_2_pow_28() {
    let sectors = (1u64 << 28) + 64;
    let mut rig = Rig::disk(sectors * 512);
    let lba = (1u64 << 28) + 5;
    let data = pattern(9, 1024);
    rig.issue48(0, cmd::WRITE_SECTORS_EXT, 2, lba);
    rig.write_data(0, &data, 2);
    assert_eq!(rig.inb(0, STATUS), READY);
    assert_eq!(rig.file_bytes(0, lba * 512, 1024), data);
    rig.issue48(0, cmd::READ_SECTORS_EXT, 2, lba);
    assert_eq!(rig.read_data(0, 1024, 2), data);
    // The high-order bytes read back with HOB set.
    rig.control(0, CONTROL_HOB);
    assert_eq!(rig.inb(0, LBA_LOW), (lba >> 24) as u8);
    rig.control(0, 0);
    // 28-bit commands cannot get there: LBA 2^28 - 1 is the last.
    rig.issue48(0, cmd::READ_SECTORS_EXT, 1, sectors);
    assert_eq!(rig.inb(0, STATUS), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::IDNF);
}

#[test]
fn dma_write_then_read_round_trip() {
    let mut rig = Rig::disk(DISK_SIZE);
    let data = pattern(5, 8 * 512);
    rig.mem
        .write_slice(&data[..1024], GuestAddress(BUF))
        .unwrap();
    rig.mem
        .write_slice(&data[1024..], GuestAddress(BUF2))
        .unwrap();
    rig.prd(0, &[(BUF, 1024, false), (BUF2, 3072, true)]);
    rig.issue(0, 0, cmd::WRITE_DMA, 8, 40);
    assert_eq!(rig.alt_status(0) & status::BSY, status::BSY);
    rig.bm_start(0, false);
    let before = rig.rises(0);
    assert_eq!(rig.wait_not_busy(0), READY);
    assert_eq!(rig.rises(0), before + 1);
    assert_eq!(
        rig.bm_status(0),
        BM_STATUS_INTERRUPT,
        "interrupt, PRDs exhausted so not active"
    );
    rig.bm_write(0, BM_COMMAND, &[0]);
    assert_eq!(rig.file_bytes(0, 40 * 512, data.len()), data);

    let out = 0x30_0000;
    rig.prd(0, &[(out, 8 * 512, true)]);
    rig.issue48(0, cmd::READ_DMA_EXT, 8, 40);
    rig.bm_start(0, true);
    assert_eq!(rig.wait_not_busy(0), READY);
    let mut got = vec![0; data.len()];
    rig.mem.read_slice(&mut got, GuestAddress(out)).unwrap();
    assert_eq!(got, data);
    assert_eq!(rig.inb(0, STATUS), READY);
    assert!(!rig.irq_level(0));
}

#[test]
fn bm_start_before_the_command_also_works() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.prd(0, &[(BUF, 512, true)]);
    rig.bm_start(0, true);
    assert_eq!(rig.bm_status(0), BM_STATUS_ACTIVE);
    rig.issue(0, 0, cmd::READ_DMA, 1, 0);
    assert_eq!(rig.wait_not_busy(0), READY);
    assert_eq!(rig.bm_status(0), BM_STATUS_INTERRUPT);
}

#[test]
fn idnf_past_the_end_and_abort_on_unknown() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.issue(0, 0, cmd::READ_SECTORS, 2, CAPACITY as u32 - 1);
    assert_eq!(rig.inb(0, STATUS), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::IDNF);
    rig.issue(0, 0, cmd::READ_DMA, 1, CAPACITY as u32);
    assert_eq!(rig.inb(0, ERROR), error::IDNF);
    let before = rig.rises(0);
    rig.issue(0, 0, 0xf5, 0, 0);
    assert_eq!(rig.rises(0), before + 1);
    assert_eq!(rig.inb(0, STATUS), READY | status::ERR);
    assert_eq!(rig.inb(0, ERROR), error::ABRT);
    // The last sector is fine.
    rig.issue(0, 0, cmd::READ_VERIFY, 1, CAPACITY as u32 - 1);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn set_features_toggles_the_disk_write_cache_and_flush_completes() {
    let mut rig = Rig::disk(DISK_SIZE);
    assert!(rig.ide.channel(0).disk(0).unwrap().wce());
    rig.outb(0, FEATURES, 0x82);
    rig.issue(0, 0, cmd::SET_FEATURES, 0, 0);
    assert_eq!(rig.inb(0, STATUS), READY);
    assert!(!rig.ide.channel(0).disk(0).unwrap().wce());
    let id = identify(&mut rig);
    assert_eq!(word(&id, 85) & 1 << 5, 0);
    rig.outb(0, FEATURES, 0x02);
    rig.issue(0, 0, cmd::SET_FEATURES, 0, 0);
    assert!(rig.ide.channel(0).disk(0).unwrap().wce());

    let before = rig.rises(0);
    rig.issue(0, 0, cmd::FLUSH_CACHE_EXT, 0, 0);
    assert_eq!(rig.wait_not_busy(0), READY);
    assert_eq!(rig.rises(0), before + 1);
    rig.issue(0, 0, cmd::FLUSH_CACHE, 0, 0);
    assert_eq!(rig.wait_not_busy(0), READY);
}

#[test]
fn misc_commands() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.issue(0, 0, cmd::CHECK_POWER_MODE, 0, 0);
    assert_eq!(rig.inb(0, COUNT), 0xff);
    rig.issue(0, 0, cmd::STANDBY_IMMEDIATE, 0, 0);
    rig.issue(0, 0, cmd::CHECK_POWER_MODE, 0, 0);
    assert_eq!(rig.inb(0, COUNT), 0x00);
    rig.issue(0, 0, cmd::IDLE_IMMEDIATE, 0, 0);
    assert_eq!(rig.inb(0, STATUS), READY);
    rig.outb(0, FEATURES, 0xda);
    rig.outb(0, LBA_MID, 0x4f);
    rig.outb(0, LBA_HIGH, 0xc2);
    rig.outb(0, COMMAND, cmd::SMART);
    assert_eq!(rig.inb(0, STATUS), READY);
    assert_eq!((rig.inb(0, LBA_MID), rig.inb(0, LBA_HIGH)), (0x4f, 0xc2));
    rig.outb(0, COUNT, 4);
    rig.outb(0, COMMAND, cmd::SET_MULTIPLE_MODE);
    assert_eq!(rig.inb(0, STATUS), READY);
    rig.issue(0, 0, cmd::EXECUTE_DEVICE_DIAGNOSTIC, 0, 0);
    assert_eq!(rig.inb(0, ERROR), 0x01);
    assert_eq!(
        (rig.inb(0, COUNT), rig.inb(0, LBA_LOW), rig.inb(0, LBA_MID)),
        (1, 1, 0)
    );
}

#[test]
fn trim_discards_through_dma() {
    let mut rig = Rig::disk(DISK_SIZE);
    let data = pattern(1, 4096);
    rig.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    rig.prd(0, &[(BUF, 4096, true)]);
    rig.issue(0, 0, cmd::WRITE_DMA, 8, 16);
    rig.bm_start(0, false);
    rig.wait_not_busy(0);
    assert_eq!(rig.file_bytes(0, 16 * 512, 4096), data);

    let mut payload = vec![0u8; 512];
    payload[..8].copy_from_slice(&crate::ata::dsm::entry(16, 8));
    rig.mem.write_slice(&payload, GuestAddress(BUF2)).unwrap();
    rig.prd(0, &[(BUF2, 512, true)]);
    rig.outb(0, FEATURES, 0);
    rig.outb(0, FEATURES, 1);
    rig.issue48(0, cmd::DATA_SET_MANAGEMENT, 1, 0);
    rig.bm_start(0, false);
    assert_eq!(rig.wait_not_busy(0), READY);
    assert_eq!(rig.file_bytes(0, 16 * 512, 4096), vec![0; 4096]);
}

#[test]
fn srst_posts_signatures_and_absent_slave_reads_zero() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.issue(0, 0, cmd::READ_SECTORS, 1, 0);
    assert_eq!(rig.alt_status(0), READY | status::DRQ);
    rig.control(0, CONTROL_SRST);
    assert_eq!(rig.alt_status(0), status::BSY);
    rig.control(0, 0);
    assert_eq!(rig.alt_status(0), READY);
    assert_eq!(rig.inb(0, ERROR), 0x01);
    assert_eq!(
        (
            rig.inb(0, COUNT),
            rig.inb(0, LBA_LOW),
            rig.inb(0, LBA_MID),
            rig.inb(0, LBA_HIGH)
        ),
        (1, 1, 0, 0)
    );
    // The aborted transfer's data is gone.
    assert_eq!(rig.read_data(0, 2, 2), vec![0, 0]);

    rig.outb(0, DEVICE, 0xb0);
    assert_eq!(rig.inb(0, STATUS), 0);
    rig.outb(0, COUNT, 0x55);
    assert_eq!(rig.inb(0, COUNT), 0);
    // An empty channel floats.
    assert_eq!(rig.inb(1, STATUS), 0xff);
    assert_eq!(rig.alt_status(1), 0xff);
}

#[test]
fn nien_masks_the_line_and_decode_enable_hides_ports() {
    let mut rig = Rig::disk(DISK_SIZE);
    rig.control(0, CONTROL_NIEN);
    rig.issue(0, 0, cmd::CHECK_POWER_MODE, 0, 0);
    assert!(!rig.irq_level(0));
    rig.control(0, 0);
    assert!(rig.irq_level(0), "pending INTRQ shows once enabled");
    rig.inb(0, STATUS);
    assert!(!rig.irq_level(0));

    // IDETIM primary decode enable off.
    rig.ide.write_config(0x40, &[0x00, 0x00]);
    assert_eq!(rig.inb(0, STATUS), 0xff);
    rig.ide.write_config(0x40, &[0x00, 0x80]);
    assert_eq!(rig.inb(0, STATUS), READY);
}

#[test]
fn pci_identity_and_bar() {
    let rig = Rig::disk(DISK_SIZE);
    let c = rig.ide.config();
    assert_eq!((c.vendor_id(), c.device_id()), (0x8086, 0x7010));
    assert_eq!(c.u32_at(0x08) >> 8, 0x01_0180);
    let bar = c.bar(BM_BAR).unwrap();
    assert!(bar.kind.is_io());
    assert_eq!(bar.size, 16);
    let fds = rig.ide.completion_fds();
    assert_eq!(fds.len(), 1);
}
