//! The common configuration structure (VIRTIO 1.2 §4.1.4.3): feature
//! negotiation, device status and per-queue setup.
//!
//! ```text
//!  0x00 le32 device_feature_select    0x16 le16 queue_select
//!  0x04 le32 device_feature    (ro)   0x18 le16 queue_size
//!  0x08 le32 driver_feature_select    0x1a le16 queue_msix_vector
//!  0x0c le32 driver_feature           0x1c le16 queue_enable
//!  0x10 le16 config_msix_vector       0x1e le16 queue_notify_off (ro)
//!  0x12 le16 num_queues        (ro)   0x20 le64 queue_desc
//!  0x14 u8   device_status            0x28 le64 queue_driver (avail ring)
//!  0x15 u8   config_generation (ro)   0x30 le64 queue_device (used ring)
//!                                     0x38 le16 queue_notif_config_data (ro, 0)
//!                                     0x3a le16 queue_reset (ro, 0: not offered)
//! ```
//!
//! Status, as the driver walks it (§3.1.1); writing 0 resets from anywhere:
//!
//! ```text
//!  0 -> ACKNOWLEDGE -> DRIVER -> (write driver_feature) -> FEATURES_OK
//!    -> (re-read: still set? else features refused) -> queue setup -> DRIVER_OK
//! ```
//!
//! Drivers should use each field's natural width, but nothing stops a byte
//! or a split 64-bit access: every write is applied as a read-modify-write
//! of the fields it touches, so any width works.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::interrupt::Shared;
use crate::virtio::{features, status, NO_VECTOR};

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Bytes of the structure (through `queue_reset`).
pub(super) const COMMON_CFG_LEN: u64 = 0x3c;

/// Every field: offset and width in bytes.
const FIELDS: [(u64, u64); 16] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (CONFIG_MSIX_VECTOR, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC, 8),
    (QUEUE_DRIVER, 8),
    (QUEUE_DEVICE, 8),
];

/// What the driver set up for one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct QueueSetup {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// What a status write asks the transport to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StatusAction {
    None,
    /// The driver wrote 0.
    Reset,
    /// DRIVER_OK was just set: start the device.
    Activate,
}

/// The common configuration registers of one function.
pub(super) struct CommonConfig {
    device_features: u64,
    driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    /// MSI-X table size: vectors at or above it are refused.
    msix_vectors: u16,
    /// Status and vector numbers, shared with the interrupt path.
    shared: Arc<Shared>,
}

impl CommonConfig {
    pub(super) fn new(
        device_features: u64,
        num_queues: u16,
        queue_max_size: u16,
        msix_vectors: u16,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            queues: vec![QueueSetup::new(queue_max_size); usize::from(num_queues)],
            msix_vectors,
            shared,
        }
    }

    /// Back to the reset state (§2.4): the driver must negotiate again.
    pub(super) fn reset(&mut self) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max_size);
        }
        self.shared.status.store(0, Ordering::SeqCst);
        self.shared.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in self.shared.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    pub(super) fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub(super) fn queues(&self) -> &[QueueSetup] {
        &self.queues
    }

    pub(super) fn status(&self) -> u8 {
        self.shared.status.load(Ordering::SeqCst)
    }

    fn selected(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, if the driver may still change it: the device is
    /// not running and the queue is not enabled yet (§4.1.4.3.2).
    fn selected_mut(&mut self) -> Option<&mut QueueSetup> {
        let running = self.status() & status::DRIVER_OK != 0;
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled && !running)
    }

    fn field(&self, offset: u64) -> u64 {
        let sel = |f: u64, s: u32| match s {
            0 => f & 0xffff_ffff,
            1 => f >> 32,
            _ => 0,
        };
        let queue = self.selected();
        let q = |get: fn(&QueueSetup) -> u64| queue.map_or(0, get);
        match offset {
            DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            DEVICE_FEATURE => sel(self.device_features, self.device_feature_select),
            DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            DRIVER_FEATURE => sel(self.driver_features, self.driver_feature_select),
            CONFIG_MSIX_VECTOR => u64::from(self.shared.config_vector.load(Ordering::SeqCst)),
            NUM_QUEUES => self.queues.len() as u64,
            DEVICE_STATUS => u64::from(self.status()),
            // The configuration never changes behind the driver's back.
            CONFIG_GENERATION => 0,
            QUEUE_SELECT => u64::from(self.queue_select),
            // A queue that does not exist reads size 0 (§4.1.4.3.1).
            QUEUE_SIZE => q(|q| u64::from(q.size)),
            QUEUE_MSIX_VECTOR => self
                .shared
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            QUEUE_ENABLE => q(|q| u64::from(q.enabled)),
            // notify_off_multiplier spaces the slots; queue i uses slot i.
            QUEUE_NOTIFY_OFF => queue.map_or(0, |_| u64::from(self.queue_select)),
            QUEUE_DESC => q(|q| q.desc),
            QUEUE_DRIVER => q(|q| q.driver),
            QUEUE_DEVICE => q(|q| q.device),
            _ => 0,
        }
    }

    /// Guest read of `data.len()` bytes at `offset`; unknown bytes read 0.
    pub(super) fn read(&self, offset: u64, data: &mut [u8]) {
        for (o, b) in (offset..).zip(data.iter_mut()) {
            *b = FIELDS
                .iter()
                .find(|&&(f, len)| (f..f + len).contains(&o))
                .map_or(0, |&(f, _)| self.field(f).to_le_bytes()[byte_index(o - f)]);
        }
    }

    /// Guest write of `data` at `offset`; returns what the status write, if
    /// any, asks for.
    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> StatusAction {
        let end = offset.saturating_add(data.len() as u64);
        let mut action = StatusAction::None;
        for &(f, len) in &FIELDS {
            if f >= end || f + len <= offset {
                continue;
            }
            // Merge the written bytes into the field's current value.
            let mut bytes = self.field(f).to_le_bytes();
            for (o, b) in (offset..).zip(data) {
                if (f..f + len).contains(&o) {
                    bytes[byte_index(o - f)] = *b;
                }
            }
            let value = u64::from_le_bytes(bytes);
            if let Some(a) = self.write_field(f, value) {
                action = a;
            }
        }
        action
    }

    fn write_field(&mut self, offset: u64, value: u64) -> Option<StatusAction> {
        let v32 = (value & 0xffff_ffff) as u32;
        let v16 = (value & 0xffff) as u16;
        match offset {
            DEVICE_FEATURE_SELECT => self.device_feature_select = v32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = v32,
            // Features are fixed once FEATURES_OK is set.
            DRIVER_FEATURE if self.status() & status::FEATURES_OK == 0 => {
                let v = u64::from(v32);
                match self.driver_feature_select {
                    0 => self.driver_features = self.driver_features & !0xffff_ffff | v,
                    1 => self.driver_features = self.driver_features & 0xffff_ffff | v << 32,
                    _ => {}
                }
            }
            CONFIG_MSIX_VECTOR => {
                let v = self.vector_or_none(v16);
                self.shared.config_vector.store(v, Ordering::SeqCst);
            }
            DEVICE_STATUS => return Some(self.write_status((value & 0xff) as u8)),
            QUEUE_SELECT => self.queue_select = v16,
            QUEUE_SIZE => {
                if let Some(q) = self.selected_mut() {
                    // Split rings need a power of two (§2.7); refuse others
                    // so the driver reads back the size still in force.
                    if v16 != 0 && v16.is_power_of_two() && v16 <= q.max_size {
                        q.size = v16;
                    }
                }
            }
            QUEUE_MSIX_VECTOR => {
                let v = self.vector_or_none(v16);
                if let Some(slot) = self
                    .shared
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(v, Ordering::SeqCst);
                }
            }
            // Writing 0 is not allowed (§4.1.4.3.2); only 1 counts.
            QUEUE_ENABLE if v16 == 1 => {
                if let Some(q) = self.selected_mut() {
                    q.enabled = true;
                }
            }
            QUEUE_DESC => self.set_queue_address(|q| &mut q.desc, value),
            QUEUE_DRIVER => self.set_queue_address(|q| &mut q.driver, value),
            QUEUE_DEVICE => self.set_queue_address(|q| &mut q.device, value),
            // Read-only fields.
            _ => {}
        }
        None
    }

    fn set_queue_address(&mut self, field: fn(&mut QueueSetup) -> &mut u64, value: u64) {
        if let Some(q) = self.selected_mut() {
            *field(q) = value;
        }
    }

    /// A vector the function has, or NO_VECTOR to tell the driver the
    /// mapping failed (§4.1.5.1.2).
    fn vector_or_none(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// Whether the driver's features can be accepted: only offered bits,
    /// and VERSION_1, since this transport has no legacy interface.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & features::VERSION_1 != 0
    }

    fn write_status(&mut self, value: u8) -> StatusAction {
        if value == 0 {
            return StatusAction::Reset;
        }
        let mut action = StatusAction::None;
        let update = |old: u8| {
            // NEEDS_RESET belongs to the device; the driver cannot set or clear it.
            let mut new = value & !status::NEEDS_RESET | old & status::NEEDS_RESET;
            let features_new = new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0;
            if features_new && !self.features_acceptable() {
                new &= !status::FEATURES_OK;
            }
            // DRIVER_OK without accepted features is a driver bug: ignore it.
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            }
            Some(new)
        };
        let old = self
            .shared
            .status
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, update)
            .unwrap_or_default();
        let new = self.status();
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            action = StatusAction::Activate;
        }
        action
    }
}

fn byte_index(i: u64) -> usize {
    // Callers pass offsets inside a field of at most 8 bytes.
    (i & 7) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::pci::interrupt::tests::shared;

    const DEV_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << 9;

    fn cfg() -> CommonConfig {
        CommonConfig::new(DEV_FEATURES, 2, 256, 3, shared(2))
    }

    fn r32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r16(c: &CommonConfig, off: u64) -> u16 {
        let mut b = [0; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn w32(c: &mut CommonConfig, off: u64, v: u32) -> StatusAction {
        c.write(off, &v.to_le_bytes())
    }

    fn w16(c: &mut CommonConfig, off: u64, v: u16) -> StatusAction {
        c.write(off, &v.to_le_bytes())
    }

    fn negotiate(c: &mut CommonConfig, features: u64) -> bool {
        c.write(DEVICE_STATUS, &[status::ACKNOWLEDGE | status::DRIVER]);
        w32(c, DRIVER_FEATURE_SELECT, 0);
        w32(c, DRIVER_FEATURE, (features & 0xffff_ffff) as u32);
        w32(c, DRIVER_FEATURE_SELECT, 1);
        w32(c, DRIVER_FEATURE, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        c.write(DEVICE_STATUS, &[s]);
        c.status() & status::FEATURES_OK != 0
    }

    #[test]
    fn device_features_read_by_halves() {
        let mut c = cfg();
        assert_eq!(r32(&c, DEVICE_FEATURE), 1 << 29 | 1 << 9);
        w32(&mut c, DEVICE_FEATURE_SELECT, 1);
        assert_eq!(r32(&c, DEVICE_FEATURE), 1);
        w32(&mut c, DEVICE_FEATURE_SELECT, 2);
        assert_eq!(r32(&c, DEVICE_FEATURE), 0);
        assert_eq!(r16(&c, NUM_QUEUES), 2);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut c = cfg();
        assert!(!negotiate(&mut c, features::RING_EVENT_IDX));
        // DRIVER_OK cannot follow refused features.
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(c.write(DEVICE_STATUS, &[s]), StatusAction::None);
        assert_eq!(c.status() & (status::FEATURES_OK | status::DRIVER_OK), 0);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let mut c = cfg();
        assert!(!negotiate(&mut c, features::VERSION_1 | 1 << 5));
    }

    #[test]
    fn features_are_frozen_after_features_ok() {
        let mut c = cfg();
        assert!(negotiate(&mut c, features::VERSION_1 | 1 << 9));
        assert_eq!(c.driver_features(), features::VERSION_1 | 1 << 9);
        w32(&mut c, DRIVER_FEATURE_SELECT, 0);
        w32(&mut c, DRIVER_FEATURE, 0);
        assert_eq!(c.driver_features(), features::VERSION_1 | 1 << 9);
        let s = c.status() | status::DRIVER_OK;
        assert_eq!(c.write(DEVICE_STATUS, &[s]), StatusAction::Activate);
        // Setting it again does not activate twice.
        assert_eq!(c.write(DEVICE_STATUS, &[s]), StatusAction::None);
        assert_eq!(c.write(DEVICE_STATUS, &[0]), StatusAction::Reset);
    }

    #[test]
    fn driver_cannot_touch_needs_reset() {
        let mut c = cfg();
        c.write(DEVICE_STATUS, &[status::ACKNOWLEDGE | status::NEEDS_RESET]);
        assert_eq!(c.status(), status::ACKNOWLEDGE);
        c.shared
            .status
            .fetch_or(status::NEEDS_RESET, Ordering::SeqCst);
        c.write(DEVICE_STATUS, &[status::ACKNOWLEDGE | status::DRIVER]);
        assert_eq!(
            c.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::NEEDS_RESET
        );
    }

    #[test]
    fn queue_size_must_be_a_power_of_two_within_max() {
        let mut c = cfg();
        w16(&mut c, QUEUE_SELECT, 1);
        assert_eq!(r16(&c, QUEUE_SIZE), 256);
        for bad in [0, 3, 100, 512, 0xffff] {
            w16(&mut c, QUEUE_SIZE, bad);
            assert_eq!(r16(&c, QUEUE_SIZE), 256, "size {bad} accepted");
        }
        w16(&mut c, QUEUE_SIZE, 64);
        assert_eq!(r16(&c, QUEUE_SIZE), 64);
        assert_eq!(c.queues()[1].size, 64);
        assert_eq!(c.queues()[0].size, 256);
        // A queue that does not exist reads as size 0 and takes nothing.
        w16(&mut c, QUEUE_SELECT, 2);
        assert_eq!(r16(&c, QUEUE_SIZE), 0);
        w16(&mut c, QUEUE_SIZE, 16);
        w16(&mut c, QUEUE_ENABLE, 1);
        assert_eq!(r16(&c, QUEUE_ENABLE), 0);
    }

    #[test]
    fn queue_is_frozen_once_enabled() {
        let mut c = cfg();
        c.write(QUEUE_DESC, &0x1000u64.to_le_bytes());
        w16(&mut c, QUEUE_ENABLE, 1);
        assert_eq!(r16(&c, QUEUE_ENABLE), 1);
        w16(&mut c, QUEUE_ENABLE, 0);
        assert_eq!(r16(&c, QUEUE_ENABLE), 1, "0 may not be written");
        c.write(QUEUE_DESC, &0x2000u64.to_le_bytes());
        w16(&mut c, QUEUE_SIZE, 16);
        assert_eq!(c.queues()[0].desc, 0x1000);
        assert_eq!(c.queues()[0].size, 256);
        c.reset();
        assert_eq!(c.queues()[0], QueueSetup::new(256));
    }

    #[test]
    fn accesses_of_any_width() {
        let mut c = cfg();
        // Split 64-bit address as Linux writes it: two dwords.
        w32(&mut c, QUEUE_DRIVER, 0x8765_4320);
        w32(&mut c, QUEUE_DRIVER + 4, 0x1);
        assert_eq!(c.queues()[0].driver, 0x1_8765_4320);
        // Byte writes into a word and a quad.
        c.write(QUEUE_DEVICE + 1, &[0x30]);
        c.write(QUEUE_DEVICE + 5, &[0x02]);
        assert_eq!(c.queues()[0].device, 0x0200_0000_3000);
        let mut q = [0u8; 8];
        c.read(QUEUE_DEVICE, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0200_0000_3000);
        // A byte read of a dword field, and a dword spanning several fields.
        let mut b = [0u8; 1];
        c.read(NUM_QUEUES, &mut b);
        assert_eq!(b, [2]);
        c.write(DEVICE_STATUS, &[status::ACKNOWLEDGE]);
        w16(&mut c, QUEUE_SELECT, 1);
        let mut d = [0u8; 4];
        c.read(DEVICE_STATUS, &mut d);
        assert_eq!(d, [status::ACKNOWLEDGE, 0, 1, 0]);
        // A dword write at 0x14 sets status and queue_select together.
        c.write(
            DEVICE_STATUS,
            &[status::ACKNOWLEDGE | status::DRIVER, 0, 0, 0],
        );
        assert_eq!(c.status(), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(r16(&c, QUEUE_SELECT), 0);
        // Past the structure: reads zero, writes ignored.
        c.write(0x40, &[0xff; 4]);
        c.read(0x3c, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn msix_vectors_are_checked_per_queue_and_config() {
        let mut c = cfg();
        assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
        w16(&mut c, CONFIG_MSIX_VECTOR, 0);
        assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), 0);
        w16(&mut c, QUEUE_MSIX_VECTOR, 1);
        w16(&mut c, QUEUE_SELECT, 1);
        w16(&mut c, QUEUE_MSIX_VECTOR, 3);
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), NO_VECTOR, "beyond the table");
        w16(&mut c, QUEUE_MSIX_VECTOR, 2);
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), 2);
        assert_eq!(c.shared.queue_vectors[0].load(Ordering::SeqCst), 1);
        assert_eq!(c.shared.queue_vectors[1].load(Ordering::SeqCst), 2);
        assert_eq!(r16(&c, QUEUE_NOTIFY_OFF), 1);
        c.reset();
        assert_eq!(c.shared.queue_vectors[1].load(Ordering::SeqCst), NO_VECTOR);
        assert_eq!(r16(&c, CONFIG_MSIX_VECTOR), NO_VECTOR);
    }
}
