//! virtio-blk on a real disk (raw image in a temporary file, cache=writeback,
//! aio=threads) driven through virtio-queue's `MockSplitQueue`: the request
//! path with the worker driven by hand, and once through the I/O thread.

#![allow(clippy::cast_possible_truncation, clippy::type_complexity)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platter_block::Disk;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Worker;
use super::*;
use crate::virtio::{VirtQueue, VirtioDevice, VirtioInterrupt};

mod hostile;
mod merge;

const MEM_SIZE: usize = 0x80_0000;
const DISK_SIZE: u64 = 4 << 20;
const CAPACITY: u64 = DISK_SIZE / SECTOR_SIZE;
const QUEUE_SIZE: u16 = 64;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Guest addresses the tests put things at (the mock rings live below 0x1000).
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const DATA2: u64 = 0x12_0000;
const STATUS: u64 = 0x13_0000;
const INDIRECT: u64 = 0x14_0000;
const OUTSIDE_RAM: u64 = MEM_SIZE as u64 + 0x1000;

const OK: u8 = blk_status::OK;
const IOERR: u8 = blk_status::IOERR;
const UNSUPP: u8 = blk_status::UNSUPP;
/// What a status byte holds before the device writes it.
const UNTOUCHED: u8 = 0xaa;

use crate::testutil::TempFile;

fn disk(readonly: bool) -> (TempFile, Disk) {
    crate::testutil::raw_image(DISK_SIZE, readonly, None)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

#[derive(Default)]
struct MockInterrupt {
    queues: Mutex<Vec<u16>>,
    configs: AtomicUsize,
    needs_reset: AtomicBool,
}

impl MockInterrupt {
    fn queue_signals(&self) -> usize {
        self.queues.lock().unwrap().len()
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.queues.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {
        self.configs.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

fn blk_config() -> BlkConfig {
    BlkConfig {
        serial: Some("platter-disk-serial0".into()),
        queue_size: QUEUE_SIZE,
        ..BlkConfig::default()
    }
}

/// One descriptor: address, length, flags (F_NEXT is added as needed).
type D = (u64, u32, u16);

/// A driver with one queue in front of a worker driven by hand.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    worker: Worker,
    irq: Arc<MockInterrupt>,
    next_desc: u16,
    _file: TempFile,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, cfg: BlkConfig) -> Self {
        Self::with(mem, cfg, false, false)
    }

    fn with(mem: &'a GuestMemoryMmap, cfg: BlkConfig, readonly: bool, event_idx: bool) -> Self {
        let (file, disk) = disk(readonly);
        Self::build(mem, cfg, event_idx, file, disk)
    }

    /// In front of a disk of the test's own making (kept until the rig is dropped).
    fn on_disk(mem: &'a GuestMemoryMmap, cfg: BlkConfig, file: TempFile, disk: Disk) -> Self {
        Self::build(mem, cfg, false, file, disk)
    }

    fn build(
        mem: &'a GuestMemoryMmap,
        cfg: BlkConfig,
        event_idx: bool,
        file: TempFile,
        disk: Disk,
    ) -> Self {
        let mut blk = VirtioBlk::new(disk, cfg).unwrap();
        let (disk, limits, wce) = blk.test_parts();
        let mock = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(event_idx);
        let irq = Arc::new(MockInterrupt::default());
        let vq = VirtQueue {
            index: 0,
            queue,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let worker = Worker::new(
            super::port::DiskPort::Own(disk),
            mem.clone(),
            vec![vq],
            irq.clone(),
            limits,
            wce,
        );
        mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        Self {
            mem,
            mock,
            worker,
            irq,
            next_desc: 0,
            _file: file,
        }
    }

    /// Make a chain available; NEXT links are filled in.
    fn push(&mut self, descs: &[D]) {
        let start = self.next_desc;
        let raw: Vec<RawDescriptor> = (0u16..)
            .zip(descs)
            .map(|(i, &(addr, len, flags))| {
                let last = usize::from(i) + 1 == descs.len();
                let (flags, next) = if last {
                    (flags, 0)
                } else {
                    (flags | F_NEXT, start + i + 1)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, start).unwrap();
        self.next_desc += u16::try_from(descs.len()).unwrap();
    }

    /// Serve everything and wait for the disk.
    fn run(&mut self) {
        self.worker.process_queue(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.worker.in_flight() > 0 {
            assert!(Instant::now() < deadline, "requests stuck in flight");
            std::thread::sleep(Duration::from_millis(1));
            self.worker.handle_completions();
        }
        self.worker.signal_used();
    }

    fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// (head, len) of used element `i`.
    fn used(&self, i: usize) -> (u32, u32) {
        let e = self.mock.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Push `descs`, serve it, and return (status byte, used length).
    fn request(&mut self, descs: &[D]) -> (u8, u32) {
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        let before = self.used_idx();
        self.push(descs);
        self.run();
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "chain not returned"
        );
        (self.status(), self.used(usize::from(before)).1)
    }
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_mem(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn status_desc() -> D {
    (STATUS, 1, F_WRITE)
}

#[test]
fn write_then_read_back() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    let data = pattern(4096, 7);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&mem, req_type::OUT, 8);
    // Header split over two descriptors, data over two: no framing assumed.
    let out = [
        (HEADER, 4, 0),
        (HEADER + 4, 12, 0),
        (DATA, 1024, 0),
        (DATA + 1024, 3072, 0),
        status_desc(),
    ];
    assert_eq!(rig.request(&out), (OK, 1));

    header(&mem, req_type::IN, 8);
    let read = [(HEADER, 16, 0), (DATA2, 4096, F_WRITE), status_desc()];
    assert_eq!(rig.request(&read), (OK, 4097));
    assert_eq!(read_mem(&mem, DATA2, 4096), data);

    // Data and status sharing the last descriptor.
    mem.write_slice(&[0u8; 1024], GuestAddress(DATA2)).unwrap();
    let before = rig.used_idx();
    rig.push(&[(HEADER, 16, 0), (DATA2, 1025, F_WRITE)]);
    rig.run();
    assert_eq!(
        rig.used(usize::from(before)),
        (u32::from(rig.next_desc) - 2, 1025)
    );
    assert_eq!(read_mem(&mem, DATA2 + 1024, 1), [OK]);
    assert_eq!(read_mem(&mem, DATA2, 1024), data[..1024]);
    assert_eq!(rig.irq.queue_signals(), 3, "one interrupt per batch");
}

#[test]
fn batch_of_requests_is_one_interrupt() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::IN, 0);
    for i in 0..4u64 {
        rig.push(&[
            (HEADER, 16, 0),
            (DATA + i * 512, 512, F_WRITE),
            (STATUS + 16 * i, 1, F_WRITE),
        ]);
    }
    rig.run();
    assert_eq!(rig.used_idx(), 4);
    assert_eq!(rig.irq.queue_signals(), 1);
    for i in 0..4u64 {
        assert_eq!(read_mem(&mem, STATUS + 16 * i, 1), [OK]);
    }
}

/// Completions interrupt the driver as soon as they are collected, not at the end of the
/// thread's wake-up, where the submissions of the same wake-up would delay them.
#[test]
fn completions_interrupt_before_the_wake_up_ends() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::IN, 0);
    rig.push(&[(HEADER, 16, 0), (DATA, 4096, F_WRITE), status_desc()]);
    rig.worker.process_queue(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.used_idx() == 0 {
        assert!(Instant::now() < deadline, "request stuck in flight");
        std::thread::sleep(Duration::from_millis(1));
        rig.worker.handle_completions();
    }
    assert_eq!(rig.irq.queue_signals(), 1, "interrupt without after_batch");
    assert_eq!(rig.status(), OK);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mem = memory();
    let mut rig = Rig::with(&mem, blk_config(), false, true);
    // used_event lives after the avail ring entries.
    let used_event = GuestAddress(rig.mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE));
    mem.write_obj(5u16, used_event).unwrap();
    header(&mem, req_type::FLUSH, 0);
    for _ in 0..3 {
        assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
    }
    assert_eq!(rig.irq.queue_signals(), 0, "used_event 5 not reached");
    mem.write_obj(3u16, used_event).unwrap();
    assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
    assert_eq!(rig.irq.queue_signals(), 1);
    // The device asked to be kicked at the next avail index (avail_event).
    let avail_event = GuestAddress(rig.mock.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 4);
}

/// Whether the driver, having published `old..new` with `avail_event` at
/// `event`, must kick (VIRTIO 1.2 §2.7.10, Linux's vring_need_event).
fn driver_kicks(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[test]
fn polling_serves_requests_the_driver_did_not_kick_for() {
    use crate::virtio::io_thread::IoWork;
    for event_idx in [false, true] {
        let mem = memory();
        let mut rig = Rig::with(&mem, blk_config(), false, event_idx);
        let avail_event = GuestAddress(rig.mock.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE));
        let used_flags = GuestAddress(rig.mock.used_addr().0);
        header(&mem, req_type::FLUSH, 0);
        assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
        // The driver wants an interrupt for the next used buffer.
        let used_event = GuestAddress(rig.mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE));
        mem.write_obj(1u16, used_event).unwrap();

        rig.worker.poll_begin();
        // What the driver sees while the device polls: no kick wanted.
        if event_idx {
            let event: u16 = mem.read_obj(avail_event).unwrap();
            assert!(!driver_kicks(event, 2, 1), "event_idx: avail_event {event}");
            assert!(!driver_kicks(event, 1 + QUEUE_SIZE, 1));
        } else {
            assert_eq!(
                mem.read_obj::<u16>(used_flags).unwrap(),
                1,
                "VRING_USED_F_NO_NOTIFY"
            );
        }
        assert!(!rig.worker.poll(), "nothing to find yet");
        rig.push(&[(HEADER, 16, 0), status_desc()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.used_idx() != 2 {
            assert!(
                Instant::now() < deadline,
                "polling never completed the request"
            );
            rig.worker.poll();
        }
        rig.worker.after_batch();
        assert_eq!(rig.status(), OK);
        assert_eq!(
            rig.irq.queue_signals(),
            2,
            "completion found by polling is signalled"
        );

        rig.worker.poll_end();
        if event_idx {
            let event: u16 = mem.read_obj(avail_event).unwrap();
            assert!(
                driver_kicks(event, 3, 2),
                "after polling the next request kicks"
            );
        } else {
            assert_eq!(mem.read_obj::<u16>(used_flags).unwrap(), 0);
        }
        // A request published just before polling ends is served, not left waiting.
        rig.worker.poll_begin();
        rig.push(&[(HEADER, 16, 0), status_desc()]);
        rig.worker.poll_end();
        rig.run();
        assert_eq!(rig.used_idx(), 3, "event_idx {event_idx}");
    }
}

#[test]
fn flush() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::FLUSH, 0);
    assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
}

#[test]
fn get_id_answers_the_serial() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    header(&mem, req_type::GET_ID, 0);
    let r = rig.request(&[(HEADER, 16, 0), (DATA, 20, F_WRITE), status_desc()]);
    assert_eq!(r, (OK, 21));
    assert_eq!(read_mem(&mem, DATA, 20), b"platter-disk-serial0");

    // Shorter serial: zero padded. No serial: zeroes.
    for (serial, want) in [(Some("abc"), &b"abc"[..]), (None, &b""[..])] {
        let mem = memory();
        let cfg = BlkConfig {
            serial: serial.map(String::from),
            ..blk_config()
        };
        let mut rig = Rig::new(&mem, cfg);
        mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
        header(&mem, req_type::GET_ID, 0);
        let r = rig.request(&[(HEADER, 16, 0), (DATA, 20, F_WRITE), status_desc()]);
        assert_eq!(r, (OK, 21));
        let mut expect = want.to_vec();
        expect.resize(20, 0);
        assert_eq!(read_mem(&mem, DATA, 20), expect);
    }
}

/// One discard / write-zeroes segment.
fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    let data = pattern(8192, 3);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&mem, req_type::OUT, 0);
    let write = [(HEADER, 16, 0), (DATA, 8192, 0), status_desc()];
    assert_eq!(rig.request(&write), (OK, 1));

    // Write zeroes, two segments, one unmapping: sectors 0..2 and 8..10.
    header(&mem, req_type::WRITE_ZEROES, 0);
    segment(&mem, DATA2, 0, 2, 1);
    segment(&mem, DATA2 + 16, 8, 2, 0);
    let wz = [(HEADER, 16, 0), (DATA2, 32, 0), status_desc()];
    assert_eq!(rig.request(&wz), (OK, 1));
    header(&mem, req_type::IN, 0);
    let read = [(HEADER, 16, 0), (DATA, 8192, F_WRITE), status_desc()];
    assert_eq!(rig.request(&read), (OK, 8193));
    let back = read_mem(&mem, DATA, 8192);
    let mut expect = data.clone();
    expect[..1024].fill(0);
    expect[4096..5120].fill(0);
    assert_eq!(back, expect);

    // Discard: fine; with the unmap flag or unknown flags: UNSUPP.
    header(&mem, req_type::DISCARD, 0);
    segment(&mem, DATA2, 4, 4, 0);
    let discard = [(HEADER, 16, 0), (DATA2, 16, 0), status_desc()];
    assert_eq!(rig.request(&discard), (OK, 1));
    segment(&mem, DATA2, 4, 4, 1);
    assert_eq!(rig.request(&discard), (UNSUPP, 1));
    header(&mem, req_type::WRITE_ZEROES, 0);
    segment(&mem, DATA2, 4, 4, 2);
    assert_eq!(rig.request(&discard), (UNSUPP, 1));
    // Out of range, too long, torn segment table, too many segments: IOERR.
    segment(&mem, DATA2, CAPACITY - 1, 2, 0);
    assert_eq!(rig.request(&discard), (IOERR, 1));
    segment(&mem, DATA2, 0, u32::MAX, 0);
    assert_eq!(rig.request(&discard), (IOERR, 1));
    let torn = [(HEADER, 16, 0), (DATA2, 15, 0), status_desc()];
    assert_eq!(rig.request(&torn), (IOERR, 1));
    for i in 0..33 {
        segment(&mem, DATA2 + 16 * i, i, 1, 0);
    }
    let many = [(HEADER, 16, 0), (DATA2, 33 * 16, 0), status_desc()];
    assert_eq!(rig.request(&many), (IOERR, 1));
}

#[test]
fn without_discard_the_commands_are_unsupported() {
    let mem = memory();
    let cfg = BlkConfig {
        discard: false,
        ..blk_config()
    };
    let mut rig = Rig::new(&mem, cfg);
    segment(&mem, DATA2, 0, 1, 0);
    for kind in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        header(&mem, kind, 0);
        let r = rig.request(&[(HEADER, 16, 0), (DATA2, 16, 0), status_desc()]);
        assert_eq!(r, (UNSUPP, 1));
    }
}

#[test]
fn read_only_refuses_writes() {
    for (cfg_ro, disk_ro) in [(true, false), (false, true)] {
        let mem = memory();
        let cfg = BlkConfig {
            readonly: cfg_ro,
            ..blk_config()
        };
        let mut rig = Rig::with(&mem, cfg, disk_ro, false);
        header(&mem, req_type::OUT, 0);
        assert_eq!(
            rig.request(&[(HEADER, 16, 0), (DATA, 512, 0), status_desc()]),
            (IOERR, 1)
        );
        header(&mem, req_type::IN, 0);
        assert_eq!(
            rig.request(&[(HEADER, 16, 0), (DATA, 512, F_WRITE), status_desc()]),
            (OK, 513)
        );
        header(&mem, req_type::FLUSH, 0);
        assert_eq!(rig.request(&[(HEADER, 16, 0), status_desc()]), (OK, 1));
    }
}

#[test]
fn config_space_and_features() {
    let (_f, d) = disk(false);
    let cfg = BlkConfig {
        num_queues: 4,
        ..blk_config()
    };
    let mut blk = VirtioBlk::new(d, cfg).unwrap();
    let f = blk.features();
    for bit in [
        features::SIZE_MAX,
        features::SEG_MAX,
        features::BLK_SIZE,
        features::TOPOLOGY,
        features::FLUSH,
        features::CONFIG_WCE,
        features::MQ,
        features::DISCARD,
        features::WRITE_ZEROES,
        crate::virtio::features::VERSION_1,
        crate::virtio::features::RING_EVENT_IDX,
        crate::virtio::features::RING_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x}");
    }
    assert_eq!(f & features::RO, 0);
    assert_eq!(blk.num_queues(), 4);
    assert_eq!(blk.queue_max_size(), QUEUE_SIZE);
    let rd = |blk: &VirtioBlk, off: u64, len: usize| {
        let mut b = vec![0u8; len];
        blk.read_config(off, &mut b);
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(&b);
        u64::from_le_bytes(w)
    };
    assert_eq!(rd(&blk, 0x00, 8), CAPACITY);
    assert_eq!(rd(&blk, 0x08, 4), 1 << 20);
    assert_eq!(rd(&blk, 0x0c, 4), u64::from(QUEUE_SIZE) - 2);
    assert_eq!(rd(&blk, 0x14, 4), 512);
    assert_eq!(rd(&blk, 0x22, 2), 4);
    assert_eq!(rd(&blk, 0x28, 4), 32);
    assert_eq!(rd(&blk, 0x38, 1), 1);
    // Byte-wise read of the capacity.
    assert_eq!(rd(&blk, 0x01, 1), CAPACITY >> 8);
    assert_eq!(rd(&blk, 0x100, 4), 0);
    // Writeback: cache=writeback starts on; the driver turns it off.
    assert_eq!(rd(&blk, 0x20, 1), 1);
    blk.write_config(0x20, &[0]);
    assert_eq!(rd(&blk, 0x20, 1), 0);
    // Nothing else is writable.
    blk.write_config(0x00, &[0xff; 8]);
    assert_eq!(rd(&blk, 0x00, 8), CAPACITY);
    blk.reset();
    assert_eq!(rd(&blk, 0x20, 1), 1, "reset restores the write cache");

    let (_f, d) = disk(true);
    let blk = VirtioBlk::new(d, blk_config()).unwrap();
    let f = blk.features();
    assert_ne!(f & features::RO, 0);
    assert_eq!(
        f & (features::DISCARD | features::WRITE_ZEROES | features::MQ),
        0
    );
}

#[test]
fn constants_match_the_linux_headers() {
    use virtio_bindings::virtio_blk as b;
    let bit = |n: u32| 1u64 << n;
    assert_eq!(features::SIZE_MAX, bit(b::VIRTIO_BLK_F_SIZE_MAX));
    assert_eq!(features::SEG_MAX, bit(b::VIRTIO_BLK_F_SEG_MAX));
    assert_eq!(features::RO, bit(b::VIRTIO_BLK_F_RO));
    assert_eq!(features::BLK_SIZE, bit(b::VIRTIO_BLK_F_BLK_SIZE));
    assert_eq!(features::FLUSH, bit(b::VIRTIO_BLK_F_FLUSH));
    assert_eq!(features::TOPOLOGY, bit(b::VIRTIO_BLK_F_TOPOLOGY));
    assert_eq!(features::CONFIG_WCE, bit(b::VIRTIO_BLK_F_CONFIG_WCE));
    assert_eq!(features::MQ, bit(b::VIRTIO_BLK_F_MQ));
    assert_eq!(features::DISCARD, bit(b::VIRTIO_BLK_F_DISCARD));
    assert_eq!(features::WRITE_ZEROES, bit(b::VIRTIO_BLK_F_WRITE_ZEROES));
    assert_eq!(req_type::IN, b::VIRTIO_BLK_T_IN);
    assert_eq!(req_type::OUT, b::VIRTIO_BLK_T_OUT);
    assert_eq!(req_type::FLUSH, b::VIRTIO_BLK_T_FLUSH);
    assert_eq!(req_type::GET_ID, b::VIRTIO_BLK_T_GET_ID);
    assert_eq!(req_type::DISCARD, b::VIRTIO_BLK_T_DISCARD);
    assert_eq!(req_type::WRITE_ZEROES, b::VIRTIO_BLK_T_WRITE_ZEROES);
    assert_eq!(u32::from(blk_status::OK), b::VIRTIO_BLK_S_OK);
    assert_eq!(u32::from(blk_status::IOERR), b::VIRTIO_BLK_S_IOERR);
    assert_eq!(u32::from(blk_status::UNSUPP), b::VIRTIO_BLK_S_UNSUPP);
    assert_eq!(ID_BYTES as u32, b::VIRTIO_BLK_ID_BYTES);
    use crate::virtio::features as vf;
    use virtio_bindings::virtio_ring as r;
    assert_eq!(vf::RING_INDIRECT_DESC, bit(r::VIRTIO_RING_F_INDIRECT_DESC));
    assert_eq!(vf::RING_EVENT_IDX, bit(r::VIRTIO_RING_F_EVENT_IDX));
    assert_eq!(
        vf::VERSION_1,
        bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    );
}

/// Wait until the used index reaches `n`.
fn wait_used(mock: &MockSplitQueue<'_, GuestMemoryMmap>, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.used().idx().load() != n {
        assert!(Instant::now() < deadline, "I/O thread did not complete");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Activate `blk` on queue `index` of `mock` (served by its I/O thread); returns the
/// eventfd that kicks it.
fn activate_on(
    blk: &mut VirtioBlk,
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    index: u16,
    irq: Arc<dyn VirtioInterrupt>,
) -> EventFd {
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let vq = VirtQueue {
        index,
        queue: mock.create_queue().unwrap(),
        notify,
    };
    let features = blk.features();
    blk.activate(mem.clone(), features, vec![vq], irq).unwrap();
    kick
}

#[test]
fn io_thread_serves_kicks_and_survives_reset() {
    let mem = memory();
    let (_f, d) = disk(false);
    let mut blk = VirtioBlk::new(d, blk_config()).unwrap();
    let irq = Arc::new(MockInterrupt::default());
    let data = pattern(2048, 9);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();

    let start = |blk: &mut VirtioBlk, mock: &MockSplitQueue<'_, GuestMemoryMmap>| {
        activate_on(blk, &mem, mock, 0, irq.clone())
    };

    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = start(&mut blk, &mock);
    header(&mem, req_type::OUT, 100);
    let write = |at: u16| {
        [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, at + 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 2048, F_NEXT, at + 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE, 0)),
        ]
    };
    mock.add_desc_chains(&write(0), 0).unwrap();
    kick.write(1).unwrap();
    wait_used(&mock, 1);
    assert_eq!(read_mem(&mem, STATUS, 1), [OK]);
    // The interrupt follows the used ring update.
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq.queue_signals() == 0 {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(irq.queues.lock().unwrap()[0], 0);

    // Reset hands the disk back; a second activation reads the data.
    blk.reset();
    let mem2_mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    // Chains made available before DRIVER_OK are served without a kick.
    header(&mem, req_type::IN, 100);
    let read = [
        RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA2, 2048, F_WRITE | F_NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE, 0)),
    ];
    mem2_mock.add_desc_chains(&read, 0).unwrap();
    let _kick = start(&mut blk, &mem2_mock);
    wait_used(&mem2_mock, 1);
    assert_eq!(read_mem(&mem, DATA2, 2048), data);
    blk.reset();
    assert!(!irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn activation_needs_a_queue_it_has() {
    let mem = memory();
    let (_f, d) = disk(false);
    let mut blk = VirtioBlk::new(d, blk_config()).unwrap();
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(MockInterrupt::default());
    let err = blk.activate(mem.clone(), blk.features(), vec![], irq.clone());
    assert!(matches!(err, Err(crate::virtio::ActivateError::Queues(_))));
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let vq = VirtQueue {
        index: 1,
        queue: mock.create_queue().unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let err = blk.activate(mem.clone(), blk.features(), vec![vq], irq.clone());
    assert!(matches!(err, Err(crate::virtio::ActivateError::Queues(_))));
    // The disk is still there for a good activation.
    let vq = VirtQueue {
        index: 0,
        queue: mock.create_queue().unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    blk.activate(mem.clone(), blk.features(), vec![vq], irq)
        .unwrap();
    blk.reset();
}

#[test]
fn two_devices_share_one_io_thread_and_reset_independently() {
    let mem = memory();
    let thread = Arc::new(crate::virtio::IoThread::new("iothread-test").unwrap());
    let irq = Arc::new(MockInterrupt::default());
    let (_f1, d1) = disk(false);
    let (_f2, d2) = disk(false);
    let mut a = VirtioBlk::new(d1, blk_config()).unwrap();
    let mut b = VirtioBlk::new(d2, blk_config()).unwrap();
    a.set_io_threads(vec![thread.clone()]);
    b.set_io_threads(vec![thread.clone()]);
    // Rings of the two devices at different places; each device its own status byte.
    let mock_a = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let mock_b = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
    let activate = |blk: &mut VirtioBlk, mock: &MockSplitQueue<'_, GuestMemoryMmap>, index| {
        activate_on(blk, &mem, mock, index, irq.clone())
    };
    let kick_a = activate(&mut a, &mock_a, 0);
    let kick_b = activate(&mut b, &mock_b, 0);
    let data = pattern(512, 3);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&mem, req_type::OUT, 8);
    let write = |status: u64| {
        [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_NEXT, 2)),
            RawDescriptor::from(SplitDescriptor::new(status, 1, F_WRITE, 0)),
        ]
    };
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS + 1)).unwrap();
    mock_a.add_desc_chains(&write(STATUS), 0).unwrap();
    mock_b.add_desc_chains(&write(STATUS + 1), 0).unwrap();
    kick_a.write(1).unwrap();
    kick_b.write(1).unwrap();
    wait_used(&mock_a, 1);
    wait_used(&mock_b, 1);
    assert_eq!(read_mem(&mem, STATUS, 2), [OK, OK]);

    // Resetting one device leaves the other served by the same thread.
    a.reset();
    header(&mem, req_type::IN, 8);
    let read = [
        RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 4)),
        RawDescriptor::from(SplitDescriptor::new(DATA2, 512, F_WRITE | F_NEXT, 5)),
        RawDescriptor::from(SplitDescriptor::new(STATUS + 1, 1, F_WRITE, 0)),
    ];
    mock_b.add_desc_chains(&read, 3).unwrap();
    kick_b.write(1).unwrap();
    wait_used(&mock_b, 2);
    assert_eq!(read_mem(&mem, DATA2, 512), data);
    b.reset();
    drop(a);
    drop(b);
    // The devices hold the thread too; with them gone this is the last handle.
    assert_eq!(Arc::strong_count(&thread), 1);
}

/// An I/O work that blocks its thread in `on_event` until told to go on.
struct Blocker {
    kick: EventFd,
    go: std::sync::mpsc::Receiver<()>,
}

impl crate::virtio::io_thread::IoWork for Blocker {
    fn serve_fds(&self) -> Vec<(std::os::fd::RawFd, u8)> {
        use std::os::fd::AsRawFd;
        vec![(self.kick.as_raw_fd(), 0)]
    }
    fn drain_fds(&self) -> Vec<(std::os::fd::RawFd, u8)> {
        Vec::new()
    }
    fn start(&mut self) {}
    fn on_event(&mut self, _local: u8) {
        let _ = self.kick.read();
        let _ = self.go.recv();
    }
    fn after_batch(&mut self) {}
    fn begin_drain(&mut self) {}
    fn poll_drained(&mut self) -> bool {
        true
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// Two queues on two I/O threads (`iothread = ["a", "b"]`): each queue is served by its
/// own thread, so queue 1 goes on while queue 0's thread is stuck; data written through
/// one queue reads back through the other; a reset puts the disk back together for the
/// next activation.
#[test]
fn queues_spread_over_io_threads() {
    let mem = memory();
    let threads: Vec<_> = ["vq-a", "vq-b"]
        .iter()
        // Polling as QEMU does: the same requests must complete with it.
        .map(|n| {
            Arc::new(
                crate::virtio::IoThread::with_poll_max(n, crate::virtio::io_poll::QEMU_POLL_MAX_NS)
                    .unwrap(),
            )
        })
        .collect();
    let (_f, d) = disk(false);
    let cfg = BlkConfig {
        num_queues: 2,
        ..blk_config()
    };
    let mut blk = VirtioBlk::new(d, cfg).unwrap();
    blk.set_io_threads(threads.clone());
    let irq = Arc::new(MockInterrupt::default());
    let mocks = [
        MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE),
        MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE),
    ];
    let mut kicks = Vec::new();
    let vqs = mocks
        .iter()
        .zip(0u16..)
        .map(|(m, index)| {
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(notify.try_clone().unwrap());
            VirtQueue {
                index,
                queue: m.create_queue().unwrap(),
                notify,
            }
        })
        .collect();
    blk.activate(mem.clone(), blk.features(), vqs, irq.clone())
        .unwrap();

    // Stop thread a (queue 0) inside another work's event.
    let (go, wait) = std::sync::mpsc::channel();
    let stuck = EventFd::new(EFD_NONBLOCK).unwrap();
    let blocker = Blocker {
        kick: stuck.try_clone().unwrap(),
        go: wait,
    };
    let Ok(blocker_slot) = threads[0].attach(Box::new(blocker)) else {
        panic!("cannot attach the blocker");
    };
    stuck.write(1).unwrap();

    let data = pattern(4096, 5);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS + 1)).unwrap();
    // A chain in descriptors at, at+1, at+2.
    let chain = |at: u16, hdr: u64, data: u64, flags: u16, status: u64| {
        [
            RawDescriptor::from(SplitDescriptor::new(hdr, 16, F_NEXT, at + 1)),
            RawDescriptor::from(SplitDescriptor::new(data, 4096, flags | F_NEXT, at + 2)),
            RawDescriptor::from(SplitDescriptor::new(status, 1, F_WRITE, 0)),
        ]
    };
    // Queue 0: a write of sector 16, which thread a cannot take yet.
    header(&mem, req_type::OUT, 16);
    mocks[0]
        .add_desc_chains(&chain(0, HEADER, DATA, 0, STATUS), 0)
        .unwrap();
    kicks[0].write(1).unwrap();
    // Queue 1: a write of sector 48 through thread b, done while a is stuck.
    let hdr2 = HEADER + 0x100;
    mem.write_obj(req_type::OUT, GuestAddress(hdr2)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr2 + 4)).unwrap();
    mem.write_obj(48u64, GuestAddress(hdr2 + 8)).unwrap();
    mocks[1]
        .add_desc_chains(&chain(0, hdr2, DATA, 0, STATUS + 1), 0)
        .unwrap();
    kicks[1].write(1).unwrap();
    wait_used(&mocks[1], 1);
    assert_eq!(read_mem(&mem, STATUS + 1, 1), [OK]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        mocks[0].used().idx().load(),
        0,
        "queue 0 served by thread b"
    );
    assert_eq!(read_mem(&mem, STATUS, 1), [UNTOUCHED]);

    go.send(()).unwrap();
    wait_used(&mocks[0], 1);
    assert_eq!(read_mem(&mem, STATUS, 1), [OK]);
    assert!(threads[0].detach(blocker_slot, None).is_some());

    // Read sector 16 (written through queue 0) back through queue 1.
    mem.write_obj(req_type::IN, GuestAddress(hdr2)).unwrap();
    mem.write_obj(16u64, GuestAddress(hdr2 + 8)).unwrap();
    mocks[1]
        .add_desc_chains(&chain(3, hdr2, DATA2, F_WRITE, STATUS + 1), 3)
        .unwrap();
    kicks[1].write(1).unwrap();
    wait_used(&mocks[1], 2);
    assert_eq!(read_mem(&mem, STATUS + 1, 1), [OK]);
    assert!(
        read_mem(&mem, DATA2, 4096) == data,
        "sector 16 read back wrong"
    );

    // Reset joins the disk again: one queue, its own thread list unchanged, sector 48 reads.
    blk.reset();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), QUEUE_SIZE);
    header(&mem, req_type::IN, 48);
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA2)).unwrap();
    mock.add_desc_chains(&chain(0, HEADER, DATA2, F_WRITE, STATUS), 0)
        .unwrap();
    let _kick = activate_on(&mut blk, &mem, &mock, 0, irq.clone());
    wait_used(&mock, 1);
    assert!(
        read_mem(&mem, DATA2, 4096) == data,
        "sector 48 read back wrong"
    );
    blk.reset();
    assert!(!irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn configured_block_sizes_are_offered_and_enforced() {
    let mem = memory();
    let cfg = BlkConfig {
        logical_block_size: Some(4096),
        physical_block_size: Some(8192),
        ..blk_config()
    };
    let (_f, d) = disk(false);
    let blk = VirtioBlk::new(d, cfg.clone()).unwrap();
    let mut c = [0u8; 0x1c];
    blk.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c[0x14..0x18].try_into().unwrap()), 4096);
    assert_eq!(c[0x18], 1, "physical_block_exp: 8192 = 2^1 x 4096");
    assert_eq!(u16::from_le_bytes([c[0x1a], c[0x1b]]), 2, "min_io_size");

    let mut rig = Rig::new(&mem, cfg);
    // A whole logical block at a block boundary works.
    header(&mem, req_type::OUT, 8);
    assert_eq!(
        rig.request(&[(HEADER, 16, 0), (DATA, 4096, 0), status_desc()]),
        (OK, 1)
    );
    // Less than a block, or off a block boundary, is an I/O error.
    assert_eq!(
        rig.request(&[(HEADER, 16, 0), (DATA, 512, 0), status_desc()]),
        (IOERR, 1)
    );
    header(&mem, req_type::IN, 9);
    assert_eq!(
        rig.request(&[(HEADER, 16, 0), (DATA2, 4096, F_WRITE), status_desc()]),
        (IOERR, 1)
    );
    for (l, p) in [(1000, None), (4096, Some(512)), (131072, None)] {
        let bad = BlkConfig {
            logical_block_size: Some(l),
            physical_block_size: p,
            ..blk_config()
        };
        assert!(matches!(
            bad.validate(),
            Err(BlkConfigError::BlockSize { .. })
        ));
    }
}

/// The machine stops after the guest wrote to a qcow2 disk and discarded it all, with no
/// flush after: shutdown takes the queues back from the I/O thread and flushes the disk, so
/// the discarded clusters are given back to the host and the tables are on disk.
#[test]
fn shutdown_flushes_a_qcow2_disk_the_guest_never_flushed() {
    use std::os::unix::fs::MetadataExt;
    let mem = memory();
    let path = std::env::temp_dir().join(format!("platter-shutdown-{}.qcow2", std::process::id()));
    let _f = TempFile(path.clone());
    platter_block::img::create(
        &path,
        platter_block::Format::Qcow2,
        DISK_SIZE,
        &Default::default(),
    )
    .unwrap();
    let mut opts = platter_block::DiskOptions::new(&path);
    opts.locking = false;
    let mut blk = VirtioBlk::new(platter_block::open_disk(&opts).unwrap(), blk_config()).unwrap();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = activate_on(&mut blk, &mem, &mock, 0, Arc::new(MockInterrupt::default()));

    // 1 MiB of data, then a discard of the whole disk; no flush.
    let len = 1u32 << 20;
    mem.write_slice(&vec![0x5a; len as usize], GuestAddress(DATA))
        .unwrap();
    header(&mem, req_type::OUT, 0);
    let write = [
        RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, len, F_NEXT, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE, 0)),
    ];
    mock.add_desc_chains(&write, 0).unwrap();
    kick.write(1).unwrap();
    wait_used(&mock, 1);
    let written = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(written >= u64::from(len), "{written} bytes after the write");
    header(&mem, req_type::DISCARD, 0);
    segment(&mem, DATA2, 0, CAPACITY as u32, 0);
    let discard = [
        RawDescriptor::from(SplitDescriptor::new(HEADER, 16, F_NEXT, 4)),
        RawDescriptor::from(SplitDescriptor::new(DATA2, 16, F_NEXT, 5)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_WRITE, 0)),
    ];
    mock.add_desc_chains(&discard, 3).unwrap();
    kick.write(1).unwrap();
    wait_used(&mock, 2);
    assert_eq!(read_mem(&mem, STATUS, 1), [OK]);

    blk.shutdown();
    let left = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        left < u64::from(len) / 2,
        "{left} bytes left after shutdown"
    );
}
