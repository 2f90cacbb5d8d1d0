//! [`VirtioBlk`]: what a virtio-blk device offers (VIRTIO 1.2 §5.2.3), its
//! configuration space (§5.2.4) and its lifecycle (§5.2.5).
//!
//! ```text
//!  0x00 le64 capacity (512-byte sectors)   0x20 u8   writeback (CONFIG_WCE, rw)
//!  0x08 le32 size_max                      0x22 le16 num_queues
//!  0x0c le32 seg_max                       0x24 le32 max_discard_sectors
//!  0x10 geometry (not offered, 0)          0x28 le32 max_discard_seg
//!  0x14 le32 blk_size                      0x2c le32 discard_sector_alignment
//!  0x18 u8 physical_block_exp              0x30 le32 max_write_zeroes_sectors
//!  0x19 u8 alignment_offset                0x34 le32 max_write_zeroes_seg
//!  0x1a le16 min_io_size                   0x38 u8   write_zeroes_may_unmap
//!  0x1c le32 opt_io_size                   0x3c      (secure erase, zoned: 0)
//! ```
//!
//! ```text
//!  new ──▶ idle (owns Disk) ──activate──▶ running (I/O thread owns Disk)
//!            ▲                                  │
//!            └──────── reset: thread drains ◀───┘
//! ```
//!
//! With several I/O threads (`set_io_threads`), queue `i` is served on thread `i mod n`, as
//! QEMU's iothread-vq-mapping does round robin: one worker per thread that got queues, the
//! disk shared between them (`port.rs`), and back in one piece at reset.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use platter_block::Disk;
use vm_memory::GuestMemoryMmap;

use super::port::{DiskPort, SharedPort};
use super::worker::Worker;
use super::{features as blk, BlkConfig, BlkConfigError, Limits, ID_BYTES, SECTOR_SIZE};
use crate::virtio::io_thread::IoThread;
use crate::virtio::{
    features, ActivateError, VirtQueue, VirtioDevice, VirtioInterrupt, TYPE_BLOCK,
};

const CONFIG_LEN: usize = 0x3c;
const WRITEBACK: usize = 0x20;
/// Largest data descriptor accepted (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes range: what fits in 32 bits of bytes.
const MAX_RANGE_SECTORS: u32 = u32::MAX >> 9;
/// Segments in one discard / write-zeroes request.
const MAX_RANGE_SEGS: u32 = 32;

/// A virtio-blk device on a [`Disk`].
pub struct VirtioBlk {
    /// Here while idle; the I/O thread holds it while running.
    disk: Option<Disk>,
    /// The threads that serve the queues: named in the config (maybe shared with
    /// other devices), else one made at the first activation and kept for the
    /// device's life.
    io_threads: Vec<Arc<IoThread>>,
    /// Running workers: (index in `io_threads`, slot in that thread).
    attached: Vec<(usize, usize)>,
    features: u64,
    num_queues: u16,
    queue_size: u16,
    /// Configuration space as offered, writeback byte aside.
    config: [u8; CONFIG_LEN],
    limits: Limits,
    initial_wce: bool,
    wce: Arc<AtomicBool>,
}

impl VirtioBlk {
    /// A device serving `disk` as `cfg` says.
    pub fn new(disk: Disk, cfg: BlkConfig) -> Result<Self, BlkConfigError> {
        cfg.validate()?;
        let readonly = cfg.readonly || disk.is_readonly();
        let discard = cfg.discard && disk.supports_discard() && !readonly;
        let mut features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | blk::SIZE_MAX
            | blk::SEG_MAX
            | blk::BLK_SIZE
            | blk::TOPOLOGY
            | blk::FLUSH
            | blk::CONFIG_WCE;
        if cfg.num_queues > 1 {
            features |= blk::MQ;
        }
        if readonly {
            features |= blk::RO;
        }
        if discard {
            features |= blk::DISCARD | blk::WRITE_ZEROES;
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = &cfg.serial {
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let logical = cfg
            .logical_block_size
            .unwrap_or_else(|| disk.logical_block_size())
            .max(512);
        let physical = cfg
            .physical_block_size
            .unwrap_or_else(|| disk.physical_block_size())
            .max(logical);
        let seg_max = u32::from(cfg.queue_size) - 2;
        let limits = Limits {
            // Whole logical blocks only, as a guest would round down anyway.
            capacity: disk.size() / u64::from(logical) * u64::from(logical) / SECTOR_SIZE,
            logical_block: u64::from(logical),
            readonly,
            seg_max,
            size_max: SIZE_MAX,
            discard,
            write_zeroes: discard,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGE_SEGS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGE_SEGS,
            id,
            merging: cfg.request_merging,
        };

        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &limits.capacity.to_le_bytes());
        put(0x08, &SIZE_MAX.to_le_bytes());
        put(0x0c, &seg_max.to_le_bytes());
        put(0x14, &logical.to_le_bytes());
        // Both sizes are powers of two, so the exponent is exact.
        let exp = (physical / logical).trailing_zeros();
        put(0x18, &[u8::try_from(exp).unwrap_or(0), 0]);
        let min_io = u16::try_from(physical / logical).unwrap_or(1);
        put(0x1a, &min_io.to_le_bytes());
        put(0x22, &cfg.num_queues.to_le_bytes());
        if discard {
            let align = (physical / 512).max(1);
            put(0x24, &MAX_RANGE_SECTORS.to_le_bytes());
            put(0x28, &MAX_RANGE_SEGS.to_le_bytes());
            put(0x2c, &align.to_le_bytes());
            put(0x30, &MAX_RANGE_SECTORS.to_le_bytes());
            put(0x34, &MAX_RANGE_SEGS.to_le_bytes());
            // WRITE_ZEROES with the unmap flag punches holes.
            put(0x38, &[1]);
        }

        let initial_wce = disk.wce();
        Ok(Self {
            disk: Some(disk),
            io_threads: Vec::new(),
            attached: Vec::new(),
            features,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            config: c,
            limits,
            initial_wce,
            wce: Arc::new(AtomicBool::new(initial_wce)),
        })
    }

    /// Take the idle device apart to drive a worker by hand.
    #[cfg(test)]
    pub(super) fn test_parts(&mut self) -> (Disk, Limits, Arc<AtomicBool>) {
        let disk = self.disk.take().expect("device is idle");
        (disk, self.limits.clone(), self.wce.clone())
    }

    /// Serve queue `i` on `threads[i % threads.len()]` (each maybe shared with
    /// other devices); an empty list means a thread of the device's own.
    pub fn set_io_threads(&mut self, threads: Vec<Arc<IoThread>>) {
        self.io_threads = threads;
    }

    /// Take the queues back from the I/O threads once their requests are done;
    /// with `within`, give up waiting after it (the disk is then lost).
    fn stop_thread(&mut self, within: Option<std::time::Duration>) {
        let ports = self.detach_all(within);
        self.take_back(ports);
    }

    /// Detach every running worker, waiting for its requests (at most `within`).
    fn detach_all(&mut self, within: Option<std::time::Duration>) -> Vec<DiskPort> {
        let mut ports = Vec::new();
        for (t, slot) in std::mem::take(&mut self.attached) {
            let t = &self.io_threads[t];
            match t
                .detach(slot, within)
                .map(|w| w.into_any().downcast::<Worker>())
            {
                Some(Ok(w)) => ports.push(w.into_port()),
                _ => log::error!(
                    "virtio-blk: the I/O thread {} did not give the disk back",
                    t.name()
                ),
            }
        }
        ports
    }

    /// Put the disk back together from the ports of the workers that had it.
    fn take_back(&mut self, ports: Vec<DiskPort>) {
        let mut shared = Vec::new();
        for p in ports {
            match p {
                DiskPort::Own(d) => self.disk = Some(d),
                DiskPort::Shared(p) => shared.push(p),
            }
        }
        if !shared.is_empty() {
            self.disk = SharedPort::join(shared);
            if self.disk.is_none() {
                log::error!("virtio-blk: a worker kept its share of the disk");
            }
        }
    }

    /// Which of `io_threads` serves each queue (by position in `queues`); made here when
    /// the config named none.
    fn placement(&mut self, queues: &[VirtQueue]) -> std::io::Result<Vec<usize>> {
        if self.io_threads.is_empty() {
            self.io_threads.push(Arc::new(IoThread::new("virtio-blk")?));
        }
        let n = self.io_threads.len();
        Ok(queues.iter().map(|q| usize::from(q.index) % n).collect())
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (o, b) in (offset..).zip(data.iter_mut()) {
            *b = match usize::try_from(o) {
                Ok(WRITEBACK) => u8::from(self.wce.load(Ordering::SeqCst)),
                Ok(i) => self.config.get(i).copied().unwrap_or(0),
                Err(_) => 0,
            };
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only writeback is writable (CONFIG_WCE, §5.2.5); the I/O thread
        // applies it before the requests the driver sends next.
        for (o, b) in (offset..).zip(data) {
            if o == WRITEBACK as u64 {
                self.wce.store(*b != 0, Ordering::SeqCst);
                if let Some(disk) = &mut self.disk {
                    disk.set_wce(*b != 0);
                }
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<VirtQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_thread(None);
        if queues.is_empty() {
            return Err(ActivateError::Queues("no queue is enabled".into()));
        }
        if let Some(q) = queues.iter().find(|q| q.index >= self.num_queues) {
            return Err(ActivateError::Queues(format!(
                "queue {} does not exist",
                q.index
            )));
        }
        let mut disk = self.disk.take().ok_or(ActivateError::BackendLost)?;
        // Without FLUSH the driver cannot make writes durable: write through.
        if features & blk::FLUSH == 0 {
            self.wce.store(false, Ordering::SeqCst);
        }
        disk.set_wce(self.wce.load(Ordering::SeqCst));
        let mut limits = self.limits.clone();
        limits.discard &= features & blk::DISCARD != 0;
        limits.write_zeroes &= features & blk::WRITE_ZEROES != 0;
        let place = match self.placement(&queues) {
            Ok(p) => p,
            Err(e) => {
                self.disk = Some(disk);
                return Err(ActivateError::Io(e));
            }
        };
        // One worker per thread that serves at least one queue.
        let mut groups: Vec<(usize, Vec<VirtQueue>)> = Vec::new();
        for (q, t) in queues.into_iter().zip(place) {
            match groups.iter_mut().find(|(g, _)| *g == t) {
                Some((_, qs)) => qs.push(q),
                None => groups.push((t, vec![q])),
            }
        }
        let ports = if groups.len() == 1 {
            vec![DiskPort::Own(disk)]
        } else {
            match SharedPort::split(disk, groups.len()) {
                Ok(p) => p.into_iter().map(DiskPort::Shared).collect(),
                Err((e, disk)) => {
                    self.disk = Some(disk);
                    return Err(ActivateError::Io(e));
                }
            }
        };
        let mut left = Vec::new();
        let mut failed = None;
        for ((t, qs), port) in groups.into_iter().zip(ports) {
            let worker = Worker::new(
                port,
                mem.clone(),
                qs,
                interrupt.clone(),
                limits.clone(),
                self.wce.clone(),
            );
            if failed.is_some() {
                left.push(worker.into_port());
                continue;
            }
            match self.io_threads[t].attach(Box::new(worker)) {
                Ok(slot) => self.attached.push((t, slot)),
                Err(err) => {
                    let (e, work) = *err;
                    if let Some(w) = work.and_then(|w| w.into_any().downcast::<Worker>().ok()) {
                        left.push(w.into_port());
                    }
                    failed = Some(e);
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                // Nothing was served yet: take back what started and what did not.
                left.extend(self.detach_all(None));
                self.take_back(left);
                Err(ActivateError::Io(e))
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop_thread(Some(crate::pci::SHUTDOWN_TIMEOUT));
        if let Some(disk) = &mut self.disk {
            if let Err(e) = disk.drain_and_flush(crate::pci::SHUTDOWN_TIMEOUT) {
                log::error!("virtio-blk: flushing the disk at shutdown: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.stop_thread(None);
        self.wce.store(self.initial_wce, Ordering::SeqCst);
        if let Some(disk) = &mut self.disk {
            disk.set_wce(self.initial_wce);
        }
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        self.stop_thread(None);
    }
}
