//! Interrupts of the PCI transport (VIRTIO 1.2 §4.1.4.5 ISR status,
//! §4.1.5.1.2 MSI-X vector configuration, §4.1.5.4 notification of used
//! buffers and §4.1.5.5 of configuration changes).
//!
//! ```text
//!  signal_queue(q) --> ISR |= 1 --> MSI-X enabled? --yes--> vector = queue_msix_vector[q]
//!  signal_config() --> ISR |= 2          |                  NO_VECTOR: nothing
//!                                        no                 else msix.trigger(vector)
//!                                        v                  (latched in the PBA if masked)
//!                                 INTx line, if wired
//! ```
//!
//! The state lives in [`Shared`], held by the transport (which the vCPUs
//! reach) and by the device's I/O thread through [`PciInterrupt`].

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::interrupt::InterruptLine;
use crate::pci::MsixCapability;
use crate::virtio::{status, VirtioInterrupt, NO_VECTOR};

/// ISR bit: a queue has used buffers.
pub(super) const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub(super) const ISR_CONFIG: u8 = 2;

/// Transport state the interrupt path needs.
pub(crate) struct Shared {
    pub(super) isr: AtomicU8,
    pub(super) status: AtomicU8,
    pub(super) config_vector: AtomicU16,
    pub(super) queue_vectors: Box<[AtomicU16]>,
    pub(super) msix: Option<Mutex<MsixCapability>>,
    pub(super) intx: Option<Arc<dyn InterruptLine>>,
}

impl Shared {
    pub(super) fn new(
        num_queues: u16,
        msix: Option<MsixCapability>,
        intx: Option<Arc<dyn InterruptLine>>,
    ) -> Self {
        Self {
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix: msix.map(Mutex::new),
            intx,
        }
    }

    /// Run `f` on the MSI-X capability, if the function has one.
    pub(super) fn with_msix<R>(&self, f: impl FnOnce(&mut MsixCapability) -> R) -> Option<R> {
        self.msix
            .as_ref()
            .map(|m| f(&mut m.lock().expect("MSI-X lock poisoned")))
    }

    fn notify(&self, isr_bit: u8, vector: u16) {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        let sent = self.with_msix(|msix| {
            if !msix.enabled() {
                return false;
            }
            if vector != NO_VECTOR {
                if let Err(e) = msix.trigger(vector) {
                    log::warn!("virtio: MSI-X vector {vector} delivery failed: {e}");
                }
            }
            true
        });
        if sent != Some(true) {
            if let Some(line) = &self.intx {
                if let Err(e) = line.trigger() {
                    log::warn!("virtio: INTx delivery failed: {e}");
                }
            }
        }
    }
}

/// The transport's [`VirtioInterrupt`], handed to the device at activation.
pub(crate) struct PciInterrupt(pub(super) Arc<Shared>);

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        let vector = self
            .0
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.0.notify(ISR_QUEUE, vector);
    }

    fn signal_config(&self) {
        let vector = self.0.config_vector.load(Ordering::SeqCst);
        self.0.notify(ISR_CONFIG, vector);
    }

    fn set_needs_reset(&self) {
        let old = self
            .0
            .status
            .fetch_or(status::NEEDS_RESET, Ordering::SeqCst);
        // Only a running device reports it; tell the driver once.
        if old & status::DRIVER_OK != 0 && old & status::NEEDS_RESET == 0 {
            log::warn!("virtio: device needs reset");
            self.signal_config();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Transport state without MSI-X or INTx, for register tests.
    pub(crate) fn shared(num_queues: u16) -> Arc<Shared> {
        Arc::new(Shared::new(num_queues, None, None))
    }
}
