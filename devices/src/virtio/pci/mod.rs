//! The virtio 1.x PCI transport, modern interface only (VIRTIO 1.2 §4.1).
//!
//! One 64-bit memory BAR holds every structure; vendor-specific
//! capabilities (§4.1.4) tell the driver where:
//!
//! ```text
//!  BAR 0 (32 KiB)
//!  0x0000 +------------------------+  cfg_type 1  common configuration (common_cfg.rs)
//!  0x1000 +------------------------+  cfg_type 3  ISR status (read clears)
//!  0x2000 +------------------------+  cfg_type 4  device-specific configuration
//!  0x3000 +------------------------+  cfg_type 2  notifications: queue i at 0x3000 + 4 * i
//!  0x4000 +------------------------+             MSI-X table (16 bytes a vector)
//!  0x6000 +------------------------+             MSI-X PBA
//!  0x8000 +------------------------+
//! ```
//!
//! A fifth capability (cfg_type 5, §4.1.4.9) gives access to the BAR
//! through configuration space. MSI-X has one vector per queue plus one for
//! configuration changes; which is which is up to the driver.
//!
//! Notifications: the transport owns one eventfd per queue. The VMM should
//! register each as an ioeventfd at BAR address + [`VirtioPciDevice::notify_eventfds`]
//! offset so kicks never exit to userspace; a write that does exit lands in
//! [`PciDevice::write_bar`] and signals the same eventfd.

mod caps;
mod common_cfg;
mod interrupt;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::{InterruptLine, MsiRouter};
use crate::pci::{
    BarKind, BarMove, ClassCode, InterruptPin, MsixCapability, MsixLocation, PciConfiguration,
    PciDevice, PciError, PciHeader,
};
use crate::virtio::{features, status, VirtQueue, VirtioDevice, VirtioInterrupt, MAX_QUEUE_SIZE};
use caps::PciCfgCap;
use common_cfg::{CommonConfig, StatusAction, COMMON_CFG_LEN};
use interrupt::{PciInterrupt, Shared};

/// PCI vendor id of virtio devices (§4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + device type (§4.1.2.1).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id QEMU uses; non-transitional devices want 0x40 or more (§4.1.2.1).
const SUBSYSTEM_ID: u16 = 0x1100;

/// The BAR holding every structure.
pub const BAR: usize = 0;
/// Its size.
pub const BAR_SIZE: u64 = 0x8000;

const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_LEN: u64 = 0x1000;
/// Bytes between queue notify addresses.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Queues the layout has room for (MSI-X table: 512 vectors, one kept for
/// configuration; notify region: 1024 slots).
pub const MAX_QUEUES: u16 = 256;

/// Wiring mistakes when building a transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio device offers {0} queues; offer 1 to {MAX_QUEUES}")]
    QueueCount(u16),
    #[error("virtio queue size {0} is invalid; use a power of two up to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("cannot build the PCI function: {0}")]
    Pci(#[from] PciError),
    #[error("cannot create a queue notify eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device on the PCI transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    common: CommonConfig,
    shared: Arc<Shared>,
    pci_cfg: PciCfgCap,
    notify: Vec<EventFd>,
    mem: GuestMemoryMmap,
    active: bool,
}

impl VirtioPciDevice {
    /// Put `device` on a PCI function. `router` learns the MSI-X routes the
    /// guest programs and delivers vectors; `intx`, if given, is raised when
    /// MSI-X is off (the function then reports interrupt pin INTA).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        router: Arc<dyn MsiRouter>,
        intx: Option<Arc<dyn InterruptLine>>,
    ) -> Result<Self, VirtioPciError> {
        let num_queues = device.num_queues();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(num_queues));
        }
        let max_size = device.queue_max_size();
        if max_size == 0 || !max_size.is_power_of_two() || max_size > MAX_QUEUE_SIZE {
            return Err(VirtioPciError::QueueSize(max_size));
        }
        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            revision_id: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
            multifunction: false,
            interrupt_pin: if intx.is_some() {
                InterruptPin::IntA
            } else {
                InterruptPin::None
            },
        });
        config.add_bar(
            BAR,
            BarKind::Memory64 {
                prefetchable: false,
            },
            BAR_SIZE,
        )?;
        caps::add_virtio_caps(&mut config, num_queues)?;
        let pci_cfg = PciCfgCap::add_to(&mut config)?;
        let vectors = num_queues + 1;
        let msix = MsixCapability::add_to(
            &mut config,
            vectors,
            MsixLocation {
                bar: BAR,
                offset: MSIX_TABLE_OFFSET,
            },
            MsixLocation {
                bar: BAR,
                offset: MSIX_PBA_OFFSET,
            },
            router,
        )?;
        let notify = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let shared = Arc::new(Shared::new(num_queues, Some(msix), intx));
        let device_features = device.features() | features::VERSION_1;
        let common = CommonConfig::new(
            device_features,
            num_queues,
            max_size,
            vectors,
            shared.clone(),
        );
        Ok(Self {
            config,
            device,
            common,
            shared,
            pci_cfg,
            notify,
            mem,
            active: false,
        })
    }

    /// The BAR the VMM must allocate ([`BAR_SIZE`] bytes, 64-bit memory).
    pub fn notify_bar() -> usize {
        BAR
    }

    /// Each queue's notify eventfd with its offset in [`BAR`]: register
    /// ioeventfds (any access length, no datamatch) at BAR address + offset,
    /// and move them when the guest moves the BAR.
    pub fn notify_eventfds(&self) -> Vec<(u64, &EventFd)> {
        (0u64..)
            .zip(&self.notify)
            .map(|(i, e)| (NOTIFY_OFFSET + i * u64::from(NOTIFY_OFF_MULTIPLIER), e))
            .collect()
    }

    /// The device status byte as the driver last left it (plus NEEDS_RESET).
    pub fn device_status(&self) -> u8 {
        self.common.status()
    }

    fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        Arc::new(PciInterrupt(self.shared.clone()))
    }

    /// DRIVER_OK: hand the enabled queues to the device.
    fn activate(&mut self) {
        if self.active {
            return;
        }
        let result = self
            .build_queues()
            .map_err(|e| e.to_string())
            .and_then(|queues| {
                self.device
                    .activate(
                        self.mem.clone(),
                        self.common.driver_features(),
                        queues,
                        self.interrupt(),
                    )
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("virtio: cannot start device: {e}");
                self.interrupt().set_needs_reset();
            }
        }
    }

    fn build_queues(&self) -> Result<Vec<VirtQueue>, String> {
        let event_idx = self.common.driver_features() & features::RING_EVENT_IDX != 0;
        let mut out = Vec::new();
        for ((index, setup), notify) in (0u16..).zip(self.common.queues()).zip(&self.notify) {
            if !setup.enabled {
                continue;
            }
            let bad = |e: virtio_queue::Error| format!("queue {index}: {e}");
            let mut queue = Queue::new(setup.max_size).map_err(bad)?;
            queue.try_set_size(setup.size).map_err(bad)?;
            queue
                .try_set_desc_table_address(GuestAddress(setup.desc))
                .map_err(bad)?;
            queue
                .try_set_avail_ring_address(GuestAddress(setup.driver))
                .map_err(bad)?;
            queue
                .try_set_used_ring_address(GuestAddress(setup.device))
                .map_err(bad)?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(format!("queue {index}: rings are outside guest memory"));
            }
            let notify = notify
                .try_clone()
                .map_err(|e| format!("queue {index}: cannot clone its eventfd: {e}"))?;
            out.push(VirtQueue {
                index,
                queue,
                notify,
            });
        }
        Ok(out)
    }

    /// Status 0: stop the device and forget everything negotiated (§2.4).
    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.common.reset();
        self.shared.isr.store(0, Ordering::SeqCst);
        // Stale kicks would only make the next activation look once more.
        for e in &self.notify {
            let _ = e.read();
        }
    }

    fn read_region(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match region(offset) {
            Some((COMMON_OFFSET, o)) if o < COMMON_CFG_LEN => self.common.read(o, data),
            Some((ISR_OFFSET, 0)) => {
                // Reading ISR clears it (§4.1.4.5.1).
                data[0] = self.shared.isr.swap(0, Ordering::SeqCst);
            }
            Some((DEVICE_OFFSET, o)) => self.device.read_config(o, data),
            _ => {
                let handled = self
                    .shared
                    .with_msix(|m| m.read_bar(BAR, offset, data))
                    .unwrap_or(false);
                if !handled {
                    data.fill(0);
                }
            }
        }
    }

    fn write_region(&mut self, offset: u64, data: &[u8]) {
        match region(offset) {
            Some((COMMON_OFFSET, o)) if o < COMMON_CFG_LEN => match self.common.write(o, data) {
                StatusAction::None => {}
                StatusAction::Reset => self.reset(),
                StatusAction::Activate => self.activate(),
            },
            Some((DEVICE_OFFSET, o)) => {
                // The driver writes configuration after FEATURES_OK (§3.1.1).
                if self.common.status() & status::FEATURES_OK != 0 {
                    self.device.write_config(o, data);
                }
            }
            Some((NOTIFY_OFFSET, o)) => {
                let slot = o / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(e) = usize::try_from(slot).ok().and_then(|s| self.notify.get(s)) {
                    if let Err(err) = e.write(1) {
                        log::warn!("virtio: queue {slot} notify failed: {err}");
                    }
                }
            }
            _ => {
                self.shared.with_msix(|m| m.write_bar(BAR, offset, data));
            }
        }
    }
}

/// Start of the 4 KiB region holding `offset` and the offset inside it, for
/// the four virtio structures.
fn region(offset: u64) -> Option<(u64, u64)> {
    let base = offset - offset % REGION_LEN;
    matches!(
        base,
        COMMON_OFFSET | ISR_OFFSET | DEVICE_OFFSET | NOTIFY_OFFSET
    )
    .then_some((base, offset - base))
}

/// Class code by device type; block looks like QEMU's (SCSI storage
/// controller), the rest are "other" (the spec leaves this open).
fn class_code(device_type: u16) -> ClassCode {
    match device_type {
        crate::virtio::TYPE_BLOCK => ClassCode::new(0x01, 0x00, 0x00),
        _ => ClassCode::new(0xff, 0x00, 0x00),
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, reg_offset: usize, data: &mut [u8]) {
        if let Some((bar, offset, len)) = self.pci_cfg.access(&self.config, reg_offset, data.len())
        {
            let mut buf = [0u8; 4];
            if bar == BAR
                && offset
                    .checked_add(len as u64)
                    .is_some_and(|e| e <= BAR_SIZE)
            {
                self.read_region(offset, &mut buf[..len]);
            }
            self.pci_cfg.set_data(&mut self.config, buf);
        }
        self.config.read(reg_offset, data);
    }

    fn write_config(&mut self, reg_offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(reg_offset, data);
        self.shared
            .with_msix(|m| m.config_written(&self.config, reg_offset, data.len()));
        if let Some((bar, offset, len)) = self.pci_cfg.access(&self.config, reg_offset, data.len())
        {
            let buf = self.pci_cfg.data(&self.config);
            if bar == BAR
                && offset
                    .checked_add(len as u64)
                    .is_some_and(|e| e <= BAR_SIZE)
            {
                self.write_region(offset, &buf[..len]);
            }
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == BAR && offset < BAR_SIZE {
            self.read_region(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == BAR && offset < BAR_SIZE {
            self.write_region(offset, data);
        }
    }

    fn shutdown(&mut self) {
        self.device.shutdown();
        self.active = false;
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        // Stop the I/O thread before the notify eventfds go away.
        self.device.reset();
    }
}
