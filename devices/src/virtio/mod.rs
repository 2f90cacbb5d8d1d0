//! Virtio 1.x devices (VIRTIO 1.2, OASIS committee specification 01).
//!
//! Two halves meet at the small traits below:
//!
//! ```text
//!   vCPU: BAR accesses, config cycles          I/O thread (own or shared)
//!              |                                        ^
//!   VirtioPciDevice (pci/, §4.1)              VirtioBlk (block/, §5.2)
//!   feature negotiation, status machine,      parses chains (§2.7), submits
//!   queue setup, MSI-X vectors, ISR   --activate(queues, eventfds)--> to the
//!              ^                                block layer, fills used rings
//!              +----- VirtioInterrupt::signal_queue / signal_config ---+
//! ```
//!
//! The transport owns the negotiated state and the notify eventfds; the
//! device owns its queues only between `activate` and `reset`. Neither knows
//! about KVM: the VMM registers the notify eventfds as ioeventfds and backs
//! MSI-X vectors with irqfds through [`crate::interrupt::MsiRouter`].
//!
//! Everything here parses guest-controlled values, so truncating casts are
//! denied.

#![deny(clippy::cast_possible_truncation)]

pub mod block;
pub mod io_poll;
pub mod io_thread;
pub mod pci;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{BlkConfig, BlkConfigError, VirtioBlk};
pub use io_thread::IoThread;
pub use pci::{VirtioPciDevice, VirtioPciError};

/// Device type of a block device (§5, "Device Types").
pub const TYPE_BLOCK: u16 = 2;

/// Feature bits common to all devices (§6, "Reserved Feature Bits").
pub mod features {
    /// The driver may put indirect descriptor tables in chains (§2.7.5.3).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression (§2.7.7, §2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Compliance with virtio 1.x; a modern-only transport requires it.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    /// Set by the device when it hit an error it cannot recover from.
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector` (§4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Largest queue size a device may offer here (the issue's bound; the split
/// ring format allows 32768).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// How a device raises interrupts, whatever the transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue` (§2.7.7 decides whether to call).
    fn signal_queue(&self, queue: u16);
    /// The device configuration space changed, or the status did.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from without a reset: set
    /// DEVICE_NEEDS_RESET and tell the driver (§2.1.2).
    fn set_needs_reset(&self);
}

/// One queue the driver enabled, handed to the device at DRIVER_OK.
#[derive(Debug)]
pub struct VirtQueue {
    /// Queue index on the transport (what `signal_queue` takes).
    pub index: u16,
    /// Ring state: size, addresses, ready, event index as negotiated.
    pub queue: Queue,
    /// Fires when the driver notifies this queue (a clone of the
    /// transport's eventfd, which the VMM registers as an ioeventfd).
    pub notify: EventFd,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled no queue, or one the device does not have.
    #[error("the driver enabled an unusable set of queues: {0}")]
    Queues(String),
    /// The device lost its backend in an earlier run (its I/O thread panicked).
    #[error("the device backend is gone after an I/O thread failure; restart the VM")]
    BackendLost,
    /// Setting up the I/O thread failed.
    #[error("cannot start the device I/O thread: {0}")]
    Io(#[source] std::io::Error),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// Device type (§5), e.g. [`TYPE_BLOCK`].
    fn device_type(&self) -> u16;
    /// Number of queues the device offers.
    fn num_queues(&self) -> u16;
    /// Largest size of each queue (a power of two, at most [`MAX_QUEUE_SIZE`]).
    fn queue_max_size(&self) -> u16;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Guest read of the device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write of the device-specific configuration at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` with the `features` the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<VirtQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Device reset: stop serving queues (wait for requests in flight) and
    /// drop them. The device can be activated again afterwards.
    fn reset(&mut self);
    /// The machine stops: stop serving and flush the backend
    /// ([`crate::pci::PciDevice::shutdown`]). A reset unless the device has a
    /// backend to flush.
    fn shutdown(&mut self) {
        self.reset();
    }
}
