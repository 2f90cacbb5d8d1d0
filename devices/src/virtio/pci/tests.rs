//! The PCI transport driven as a guest driver would, with a fake device
//! behind it and a router that records MSI-X traffic.

#![allow(clippy::cast_possible_truncation, clippy::type_complexity)]

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::interrupt::{InterruptLine, MsiMessage, MsiRouter};
use crate::virtio::{ActivateError, NO_VECTOR};

const NUM_QUEUES: u16 = 2;
const MAX_SIZE: u16 = 256;
const DEV_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << 9;

// Common configuration offsets (§4.1.4.3).
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

#[derive(Default)]
struct Log {
    /// (features, [(index, size, event_idx, desc table)])
    activations: Vec<(u64, Vec<(u16, u16, bool, u64)>)>,
    resets: usize,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail: bool,
}

struct FakeDevice(Arc<Mutex<Log>>);

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u16 {
        crate::virtio::TYPE_BLOCK
    }
    fn num_queues(&self) -> u16 {
        NUM_QUEUES
    }
    fn queue_max_size(&self) -> u16 {
        MAX_SIZE
    }
    fn features(&self) -> u64 {
        DEV_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (o, b) in (offset..).zip(data.iter_mut()) {
            *b = (o & 0xff) as u8 ^ 0x5a;
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<VirtQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut log = self.0.lock().unwrap();
        if log.fail {
            return Err(ActivateError::BackendLost);
        }
        let qs = queues
            .iter()
            .map(|q| {
                (
                    q.index,
                    q.queue.size(),
                    q.queue.event_idx_enabled(),
                    q.queue.desc_table(),
                )
            })
            .collect();
        log.activations.push((features, qs));
        log.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Route(u16, bool),
    Trigger(u16),
}

#[derive(Default)]
struct Router(Mutex<Vec<Call>>);

impl Router {
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl MsiRouter for Router {
    fn route(&self, vector: u16, _msg: MsiMessage, masked: bool) -> io::Result<()> {
        self.0.lock().unwrap().push(Call::Route(vector, masked));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.0.lock().unwrap().push(Call::Trigger(vector));
        Ok(())
    }
}

#[derive(Default)]
struct Line(Mutex<usize>);

impl InterruptLine for Line {
    fn trigger(&self) -> io::Result<()> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

struct Rig {
    dev: VirtioPciDevice,
    log: Arc<Mutex<Log>>,
    router: Arc<Router>,
}

fn rig_with(intx: Option<Arc<dyn InterruptLine>>) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let router = Arc::new(Router::default());
    let dev =
        VirtioPciDevice::new(Box::new(FakeDevice(log.clone())), mem, router.clone(), intx).unwrap();
    Rig { dev, log, router }
}

fn rig() -> Rig {
    rig_with(None)
}

impl Rig {
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn wr(&mut self, off: u64, val: u64, len: usize) {
        self.dev.write_bar(BAR, off, &val.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.rd(DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, s: u8) {
        self.wr(DEVICE_STATUS, u64::from(s), 1);
    }

    fn negotiate(&mut self, features: u64) -> bool {
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.wr(DRIVER_FEATURE_SELECT, 0, 4);
        self.wr(DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.wr(DRIVER_FEATURE_SELECT, 1, 4);
        self.wr(DRIVER_FEATURE, features >> 32, 4);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status() & status::FEATURES_OK != 0
    }

    /// Set up queue `q` of `size` at `base` the way Linux does (split
    /// 64-bit writes) and enable it.
    fn setup_queue(&mut self, q: u16, size: u16, base: u64) {
        self.wr(QUEUE_SELECT, u64::from(q), 2);
        self.wr(QUEUE_SIZE, u64::from(size), 2);
        for (reg, addr) in [
            (QUEUE_DESC, base),
            (QUEUE_DRIVER, base + 0x1000),
            (QUEUE_DEVICE, base + 0x2000),
        ] {
            self.wr(reg, addr & 0xffff_ffff, 4);
            self.wr(reg + 4, addr >> 32, 4);
        }
        self.wr(QUEUE_ENABLE, 1, 2);
    }

    fn driver_ok(&mut self) {
        let s = self.status() | status::DRIVER_OK;
        self.set_status(s);
    }

    fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.log.lock().unwrap().interrupt.clone().unwrap()
    }

    fn msix_cap(&self) -> usize {
        self.dev.config().find_capability(0x11).unwrap()
    }

    /// Enable MSI-X and unmask vectors 0..=NUM_QUEUES.
    fn enable_msix(&mut self) {
        for v in 0..=u64::from(NUM_QUEUES) {
            let entry = MSIX_TABLE_OFFSET + 16 * v;
            self.wr(entry, 0xfee0_0000, 4);
            self.wr(entry + 8, 0x30 + v, 4);
            self.wr(entry + 12, 0, 4);
        }
        let cap = self.msix_cap();
        self.dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
        self.router.take();
    }

    /// Vendor capabilities: (offset, cfg_type).
    fn virtio_caps(&self) -> Vec<(usize, u8)> {
        let c = self.dev.config();
        c.capabilities()
            .filter(|&(id, _)| id == 0x09)
            .map(|(_, o)| (o, (c.u32_at(o) >> 24) as u8))
            .collect()
    }
}

#[test]
fn identity_bar_and_capabilities() {
    let r = rig();
    let c = r.dev.config();
    assert_eq!(c.vendor_id(), 0x1af4);
    assert_eq!(c.device_id(), 0x1042);
    assert_eq!(c.u32_at(0x08), 0x0100_0001, "class 01/00/00, revision 1");
    assert_eq!(c.u32_at(0x2c), 0x1100_1af4, "subsystem");
    assert_eq!(c.u32_at(0x3c) >> 8 & 0xff, 0, "no INTx pin without a line");
    let bar = c.bar(BAR).unwrap();
    assert_eq!(bar.size, BAR_SIZE);
    assert_eq!(
        bar.kind,
        BarKind::Memory64 {
            prefetchable: false
        }
    );

    let caps = r.virtio_caps();
    let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
    assert_eq!(types, [1, 3, 4, 2, 5]);
    let expect = [
        (COMMON_OFFSET, REGION_LEN),
        (ISR_OFFSET, REGION_LEN),
        (DEVICE_OFFSET, REGION_LEN),
        (NOTIFY_OFFSET, 4 * u64::from(NUM_QUEUES)),
    ];
    for (&(o, _), (offset, len)) in caps.iter().zip(expect) {
        assert_eq!(c.u32_at(o + 4) & 0xff, 0, "BAR");
        assert_eq!(u64::from(c.u32_at(o + 8)), offset);
        assert_eq!(u64::from(c.u32_at(o + 12)), len);
    }
    let notify = caps[3].0;
    assert_eq!(c.u32_at(notify) >> 16 & 0xff, 20, "cap_len");
    assert_eq!(c.u32_at(notify + 16), 4, "notify_off_multiplier");

    let msix = r.msix_cap();
    assert_eq!(
        c.u16_at(msix + 2) & 0x7ff,
        NUM_QUEUES,
        "config + one per queue"
    );
    assert_eq!(u64::from(c.u32_at(msix + 4)), MSIX_TABLE_OFFSET);
    assert_eq!(u64::from(c.u32_at(msix + 8)), MSIX_PBA_OFFSET);
}

#[test]
fn driver_init_activates_with_the_enabled_queues() {
    let mut r = rig();
    assert_eq!(r.rd(0x04, 4), 1 << 29 | 1 << 9);
    assert_eq!(r.rd(0x12, 2), u64::from(NUM_QUEUES));
    let want = features::VERSION_1 | features::RING_EVENT_IDX;
    assert!(r.negotiate(want));
    r.setup_queue(0, 128, 0x4_0000);
    // Queue 1 is left disabled, as Linux does with fewer CPUs than queues.
    r.driver_ok();
    let log = r.log.lock().unwrap();
    assert_eq!(log.activations, [(want, vec![(0, 128, true, 0x4_0000)])]);
    drop(log);
    assert_eq!(
        r.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    // Queue setup is frozen while running.
    r.wr(QUEUE_SELECT, 1, 2);
    r.wr(QUEUE_ENABLE, 1, 2);
    assert_eq!(r.rd(QUEUE_ENABLE, 2), 0);
}

#[test]
fn driver_without_version_1_gets_no_features_ok() {
    let mut r = rig();
    assert!(!r.negotiate(features::RING_EVENT_IDX));
    r.setup_queue(0, 128, 0x4_0000);
    r.driver_ok();
    assert!(r.log.lock().unwrap().activations.is_empty());
    assert_eq!(r.status() & status::DRIVER_OK, 0);
}

#[test]
fn bad_rings_or_failed_activation_need_reset() {
    let mut r = rig();
    r.enable_msix();
    r.wr(CONFIG_MSIX_VECTOR, 2, 2);
    assert!(r.negotiate(features::VERSION_1));
    // Rings beyond guest RAM.
    r.setup_queue(0, 128, 0x10_0000_0000);
    r.driver_ok();
    assert!(r.log.lock().unwrap().activations.is_empty());
    assert_ne!(r.status() & status::NEEDS_RESET, 0);
    assert_eq!(
        r.router.take(),
        [Call::Trigger(2)],
        "config change interrupt"
    );
    assert_eq!(r.rd(ISR_OFFSET, 1), 2);

    // The device refusing to start.
    r.set_status(0);
    assert_eq!(r.status(), 0);
    r.log.lock().unwrap().fail = true;
    assert!(r.negotiate(features::VERSION_1));
    r.setup_queue(0, 128, 0x4_0000);
    r.driver_ok();
    assert_ne!(r.status() & status::NEEDS_RESET, 0);
}

#[test]
fn reset_forgets_everything_and_allows_a_second_start() {
    let mut r = rig();
    assert!(r.negotiate(features::VERSION_1));
    r.wr(QUEUE_MSIX_VECTOR, 1, 2);
    r.setup_queue(0, 64, 0x4_0000);
    r.driver_ok();
    r.set_status(0);
    assert_eq!(r.log.lock().unwrap().resets, 1);
    assert_eq!(r.status(), 0);
    r.wr(QUEUE_SELECT, 0, 2);
    assert_eq!(r.rd(QUEUE_SIZE, 2), u64::from(MAX_SIZE));
    assert_eq!(r.rd(QUEUE_ENABLE, 2), 0);
    assert_eq!(r.rd(QUEUE_DESC, 8), 0);
    assert_eq!(r.rd(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    r.wr(DRIVER_FEATURE_SELECT, 1, 4);
    assert_eq!(r.rd(DRIVER_FEATURE, 4), 0);

    assert!(r.negotiate(features::VERSION_1));
    r.setup_queue(1, 32, 0x8_0000);
    r.driver_ok();
    let log = r.log.lock().unwrap();
    assert_eq!(log.activations.len(), 2);
    assert_eq!(log.activations[1].1, [(1, 32, false, 0x8_0000)]);
}

#[test]
fn msix_vector_per_queue_and_config() {
    let mut r = rig();
    r.enable_msix();
    assert!(r.negotiate(features::VERSION_1));
    r.wr(CONFIG_MSIX_VECTOR, 0, 2);
    r.wr(QUEUE_SELECT, 0, 2);
    r.wr(QUEUE_MSIX_VECTOR, 1, 2);
    r.wr(QUEUE_SELECT, 1, 2);
    r.wr(QUEUE_MSIX_VECTOR, 3, 2); // beyond the table: refused
    assert_eq!(r.rd(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    r.setup_queue(0, 64, 0x4_0000);
    r.setup_queue(1, 64, 0x8_0000);
    r.driver_ok();
    let irq = r.interrupt();

    irq.signal_queue(0);
    irq.signal_config();
    assert_eq!(r.router.take(), [Call::Trigger(1), Call::Trigger(0)]);
    // NO_VECTOR: nothing is sent; ISR still records it.
    irq.signal_queue(1);
    assert!(r.router.take().is_empty());
    assert_eq!(r.rd(ISR_OFFSET, 1), 3);
    assert_eq!(r.rd(ISR_OFFSET, 1), 0, "reading ISR clears it");

    // A masked vector is latched in the PBA and sent on unmask.
    r.wr(MSIX_TABLE_OFFSET + 16 + 12, 1, 4);
    r.router.take();
    irq.signal_queue(0);
    assert!(r.router.take().is_empty());
    assert_eq!(r.rd(MSIX_PBA_OFFSET, 8), 0b10);
    r.wr(MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
    assert_eq!(r.router.take(), [Call::Route(1, false), Call::Trigger(1)]);
}

#[test]
fn intx_when_msix_is_off() {
    let line = Arc::new(Line::default());
    let mut r = rig_with(Some(line.clone()));
    assert_eq!(r.dev.config().u32_at(0x3c) >> 8 & 0xff, 1, "INTA");
    assert!(r.negotiate(features::VERSION_1));
    r.setup_queue(0, 64, 0x4_0000);
    r.driver_ok();
    r.interrupt().signal_queue(0);
    assert_eq!(*line.0.lock().unwrap(), 1);
    assert_eq!(r.rd(ISR_OFFSET, 1), 1);
    assert!(r.router.take().is_empty());
}

#[test]
fn notify_writes_reach_the_queue_eventfds() {
    let mut r = rig();
    let offsets: Vec<u64> = r.dev.notify_eventfds().iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [0x3000, 0x3004]);
    assert_eq!(VirtioPciDevice::notify_bar(), BAR);
    // Linux writes the queue index, 16 bits wide.
    r.wr(0x3004, 1, 2);
    let fds = r.dev.notify_eventfds();
    assert_eq!(fds[1].1.read().unwrap(), 1);
    assert!(fds[0].1.read().is_err(), "queue 0 was not notified");
    // Past the last queue: ignored.
    drop(fds);
    r.wr(0x3008, 2, 2);
}

#[test]
fn device_config_is_forwarded_after_features_ok() {
    let mut r = rig();
    assert_eq!(r.rd(DEVICE_OFFSET + 4, 2), 0x5f5e);
    r.wr(DEVICE_OFFSET + 0x20, 0, 1);
    assert!(r.log.lock().unwrap().config_writes.is_empty());
    assert!(r.negotiate(features::VERSION_1));
    r.wr(DEVICE_OFFSET + 0x20, 0, 1);
    assert_eq!(r.log.lock().unwrap().config_writes, [(0x20, vec![0])]);
    // Other BARs and past the BAR read as all ones.
    let mut b = [0u8; 4];
    r.dev.read_bar(1, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    r.dev.read_bar(BAR, BAR_SIZE, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Holes inside the BAR read as zero.
    r.dev.read_bar(BAR, 0x1800, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mut r = rig();
    let cap = r.virtio_caps()[4].0;
    let set_window = |r: &mut Rig, offset: u32, len: u32| {
        r.dev.write_config(cap + 4, &[BAR as u8]);
        r.dev.write_config(cap + 8, &offset.to_le_bytes());
        r.dev.write_config(cap + 12, &len.to_le_bytes());
    };
    set_window(&mut r, DEVICE_STATUS as u32, 1);
    r.dev
        .write_config(cap + 16, &[status::ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(r.status(), status::ACKNOWLEDGE);
    set_window(&mut r, 0x12, 2);
    let mut b = [0u8; 4];
    r.dev.read_config(cap + 16, &mut b);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), NUM_QUEUES);
    // A length other than 1, 2 or 4, or a misaligned offset: no access.
    set_window(&mut r, DEVICE_STATUS as u32, 3);
    r.dev.write_config(cap + 16, &[0, 0, 0, 0]);
    assert_eq!(r.status(), status::ACKNOWLEDGE);
    set_window(&mut r, 0x13, 2);
    r.dev.write_config(cap + 16, &[0, 0, 0, 0]);
    assert_eq!(r.status(), status::ACKNOWLEDGE);
}

#[test]
fn bad_devices_are_refused() {
    struct Bad(u16, u16);
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u16 {
            2
        }
        fn num_queues(&self) -> u16 {
            self.0
        }
        fn queue_max_size(&self) -> u16 {
            self.1
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: u64,
            _: Vec<VirtQueue>,
            _: Arc<dyn VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let router = Arc::new(Router::default());
    for (q, s) in [(0, 256), (MAX_QUEUES + 1, 256), (1, 0), (1, 100), (1, 2048)] {
        let r = VirtioPciDevice::new(Box::new(Bad(q, s)), mem.clone(), router.clone(), None);
        assert!(r.is_err(), "{q} queues of {s}");
    }
    let r = VirtioPciDevice::new(Box::new(Bad(MAX_QUEUES, 1024)), mem, router, None);
    assert!(r.is_ok());
}
