//! The MSI capability (PCI Local Bus Specification 3.0, §6.8.1), in its
//! 64-bit address form, with 1 to 32 vectors and optional per-vector masking.
//!
//! ```text
//!  +0x00  message control            | next      | id 0x05
//!  +0x04  message address [31:2]                   (bits 1:0 zero)
//!  +0x08  message upper address [63:32]
//!  +0x0c  reserved                   | message data
//!  +0x10  mask bits     (per-vector masking only; bit n masks vector n)
//!  +0x14  pending bits  (per-vector masking only; read-only to the guest)
//!
//!  message control: 0 enable, 3:1 multiple message capable (log2),
//!  6:4 multiple message enable (log2), 7 64-bit, 8 per-vector masking
//! ```
//!
//! The registers live in the [`PciConfiguration`]; this type knows where,
//! turns them into [`MsiMessage`]s and tells the [`MsiRouter`] when a
//! vector's message or mask changes. With N vectors enabled, vector n sends
//! the message data with its low log2(N) bits replaced by n.

use std::io;
use std::sync::Arc;

use super::{PciConfiguration, PciError};
use crate::interrupt::{MsiMessage, MsiRouter};

/// Capability id of MSI.
pub const MSI_CAPABILITY_ID: u8 = 0x05;

const CONTROL: usize = 0x02;
const ADDRESS_LO: usize = 0x04;
const ADDRESS_HI: usize = 0x08;
const DATA: usize = 0x0c;
const MASK_BITS: usize = 0x10;
const PENDING_BITS: usize = 0x14;

const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Bits the guest may write: enable and multiple message enable.
const CONTROL_WRITABLE: u16 = CONTROL_ENABLE | 0x7 << 4;

/// A function's MSI capability.
pub struct MsiCapability {
    offset: usize,
    /// Vectors the function can use (multiple message capable).
    vectors: u16,
    per_vector_mask: bool,
    router: Arc<dyn MsiRouter>,
    /// What the router last heard for each vector; starts masked.
    routed: Vec<(MsiMessage, bool)>,
}

impl MsiCapability {
    /// Add an MSI capability with `vectors` (1, 2, 4, 8, 16 or 32) to
    /// `config`. The router starts with every vector masked.
    pub fn add_to(
        config: &mut PciConfiguration,
        vectors: u16,
        per_vector_mask: bool,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, PciError> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(PciError::MsiVectorsInvalid(vectors));
        }
        let capable = u16::try_from(vectors.trailing_zeros()).unwrap_or(0);
        let mut control = capable << 1 | CONTROL_64BIT;
        if per_vector_mask {
            control |= CONTROL_PER_VECTOR_MASK;
        }
        let body_len = if per_vector_mask { 0x16 } else { 0x0e };
        let mut body = vec![0; body_len];
        body[..2].copy_from_slice(&control.to_le_bytes());
        let offset = config.add_capability(MSI_CAPABILITY_ID, &body)?;

        config.set_write_mask(offset + CONTROL, &CONTROL_WRITABLE.to_le_bytes())?;
        config.set_write_mask(offset + ADDRESS_LO, &0xffff_fffc_u32.to_le_bytes())?;
        config.set_write_mask(offset + ADDRESS_HI, &u32::MAX.to_le_bytes())?;
        config.set_write_mask(offset + DATA, &u16::MAX.to_le_bytes())?;
        if per_vector_mask {
            let mask = u32::MAX >> (32 - u32::from(vectors));
            config.set_write_mask(offset + MASK_BITS, &mask.to_le_bytes())?;
        }
        Ok(Self {
            offset,
            vectors,
            per_vector_mask,
            router,
            routed: vec![(MsiMessage::default(), true); usize::from(vectors)],
        })
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The guest set the MSI enable bit.
    pub fn enabled(&self, config: &PciConfiguration) -> bool {
        config.u16_at(self.offset + CONTROL) & CONTROL_ENABLE != 0
    }

    /// Vectors the guest enabled (multiple message enable, capped at what
    /// the function offers).
    pub fn enabled_vectors(&self, config: &PciConfiguration) -> u16 {
        let log2 = config.u16_at(self.offset + CONTROL) >> 4 & 0x7;
        (1u16 << log2).min(self.vectors)
    }

    /// The message vector `vector` sends, if it is one of the enabled ones.
    pub fn message(&self, config: &PciConfiguration, vector: u16) -> Option<MsiMessage> {
        let enabled = self.enabled_vectors(config);
        if vector >= enabled {
            return None;
        }
        let low = config.u32_at(self.offset + ADDRESS_LO);
        let high = config.u32_at(self.offset + ADDRESS_HI);
        let data = u32::from(config.u16_at(self.offset + DATA));
        Some(MsiMessage {
            address: u64::from(high) << 32 | u64::from(low),
            data: data & !u32::from(enabled - 1) | u32::from(vector),
        })
    }

    /// Vector `vector` must not be delivered now: MSI is off, the vector is
    /// not enabled, or its mask bit is set.
    pub fn masked(&self, config: &PciConfiguration, vector: u16) -> bool {
        !self.enabled(config)
            || vector >= self.enabled_vectors(config)
            || self.per_vector_mask && self.bit(config, MASK_BITS, vector)
    }

    /// Vector `vector` fired while masked and waits for its unmask.
    pub fn pending(&self, config: &PciConfiguration, vector: u16) -> bool {
        self.per_vector_mask && self.bit(config, PENDING_BITS, vector)
    }

    fn bit(&self, config: &PciConfiguration, register: usize, vector: u16) -> bool {
        vector < 32 && config.u32_at(self.offset + register) & 1 << vector != 0
    }

    fn set_pending(&self, config: &mut PciConfiguration, vector: u16, pending: bool) {
        let at = self.offset + PENDING_BITS;
        let bits = config.u32_at(at);
        let bits = if pending {
            bits | 1 << vector
        } else {
            bits & !(1 << vector)
        };
        if let Err(e) = config.set_bytes(at, &bits.to_le_bytes()) {
            log::warn!("MSI pending bits: {e}");
        }
    }

    /// Call after every guest write to `config` at `offset..offset + len`:
    /// re-routes vectors whose message or mask changed and delivers pending
    /// vectors that are now unmasked.
    pub fn config_written(&mut self, config: &mut PciConfiguration, offset: usize, len: usize) {
        let end = self.offset + if self.per_vector_mask { 0x18 } else { 0x10 };
        if offset >= end || offset.saturating_add(len) <= self.offset {
            return;
        }
        for vector in 0..self.vectors {
            let msg = self.message(config, vector).unwrap_or_default();
            let masked = self.masked(config, vector);
            let slot = &mut self.routed[usize::from(vector)];
            if *slot != (msg, masked) {
                match self.router.route(vector, msg, masked) {
                    Ok(()) => *slot = (msg, masked),
                    Err(e) => log::warn!("MSI vector {vector} route failed: {e}"),
                }
            }
            if !masked && self.pending(config, vector) {
                self.set_pending(config, vector, false);
                if let Err(e) = self.router.trigger(vector) {
                    log::warn!("MSI vector {vector} delivery failed: {e}");
                }
            }
        }
    }

    /// Signal vector `vector`: delivered now, latched in the pending bits if
    /// masked, dropped if MSI is off or the vector is not enabled (the
    /// function should use INTx then).
    pub fn trigger(&mut self, config: &mut PciConfiguration, vector: u16) -> io::Result<()> {
        if !self.enabled(config) || vector >= self.enabled_vectors(config) {
            return Ok(());
        }
        if self.masked(config, vector) {
            self.set_pending(config, vector, true);
            return Ok(());
        }
        self.router.trigger(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::MockRouter;
    use crate::pci::msix::tests::RouterCall::{Route, Trigger};
    use crate::pci::PciHeader;

    fn setup(vectors: u16, pvm: bool) -> (PciConfiguration, MsiCapability, Arc<MockRouter>) {
        let mut config = PciConfiguration::new(&PciHeader::default());
        let router = Arc::new(MockRouter::default());
        let msi = MsiCapability::add_to(&mut config, vectors, pvm, router.clone()).unwrap();
        (config, msi, router)
    }

    fn write(config: &mut PciConfiguration, msi: &mut MsiCapability, offset: usize, data: &[u8]) {
        config.write(offset, data);
        msi.config_written(config, offset, data.len());
    }

    #[test]
    fn registers_and_multiple_message() {
        let (mut c, mut msi, router) = setup(4, false);
        let o = msi.offset();
        assert_eq!(c.find_capability(MSI_CAPABILITY_ID), Some(o));
        // 64-bit, 4 vectors capable, nothing enabled.
        assert_eq!(c.u16_at(o + CONTROL), 0x0084);
        write(
            &mut c,
            &mut msi,
            o + ADDRESS_LO,
            &0xfee0_0003_u32.to_le_bytes(),
        );
        write(&mut c, &mut msi, o + ADDRESS_HI, &1u32.to_le_bytes());
        write(&mut c, &mut msi, o + DATA, &0xffff_4023_u32.to_le_bytes());
        assert_eq!(c.u32_at(o + DATA), 0x4023);
        // While MSI is off the router follows the message, masked.
        let route = |address, data| Route(0, MsiMessage { address, data }, true);
        assert_eq!(
            router.take(),
            [
                route(0xfee0_0000, 0),
                route(0x1_fee0_0000, 0),
                route(0x1_fee0_0000, 0x4023)
            ]
        );

        // Enable with 8 vectors requested: capped at the 4 offered.
        write(&mut c, &mut msi, o + CONTROL, &[0x31, 0xff]);
        assert_eq!(c.u16_at(o + CONTROL), 0x00b5);
        assert!(msi.enabled(&c));
        assert_eq!(msi.enabled_vectors(&c), 4);
        let msg = |data| MsiMessage {
            address: 0x1_fee0_0000,
            data,
        };
        assert_eq!(msi.message(&c, 2), Some(msg(0x4022)));
        assert_eq!(msi.message(&c, 4), None);
        assert_eq!(
            router.take(),
            [
                Route(0, msg(0x4020), false),
                Route(1, msg(0x4021), false),
                Route(2, msg(0x4022), false),
                Route(3, msg(0x4023), false)
            ]
        );
        msi.trigger(&mut c, 3).unwrap();
        msi.trigger(&mut c, 4).unwrap();
        assert_eq!(router.take(), [Trigger(3)]);
    }

    #[test]
    fn per_vector_mask_latches_pending() {
        let (mut c, mut msi, router) = setup(2, true);
        let o = msi.offset();
        write(
            &mut c,
            &mut msi,
            o + ADDRESS_LO,
            &0xfee0_0000_u32.to_le_bytes(),
        );
        write(
            &mut c,
            &mut msi,
            o + MASK_BITS,
            &0xffff_ffff_u32.to_le_bytes(),
        );
        assert_eq!(c.u32_at(o + MASK_BITS), 0b11);
        write(&mut c, &mut msi, o + CONTROL, &[0x11]);
        assert!(router
            .take()
            .iter()
            .all(|call| matches!(call, Route(_, _, true))));

        msi.trigger(&mut c, 1).unwrap();
        assert!(msi.pending(&c, 1));
        assert_eq!(c.u32_at(o + PENDING_BITS), 0b10);
        // The guest cannot clear pending bits itself.
        write(&mut c, &mut msi, o + PENDING_BITS, &[0]);
        assert!(msi.pending(&c, 1));
        assert!(router.take().is_empty());

        write(&mut c, &mut msi, o + MASK_BITS, &[0b01]);
        assert!(!msi.pending(&c, 1));
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 1,
        };
        assert_eq!(router.take(), [Route(1, msg, false), Trigger(1)]);
    }

    #[test]
    fn bad_vector_counts_are_refused() {
        let mut c = PciConfiguration::new(&PciHeader::default());
        let router = Arc::new(MockRouter::default());
        for n in [0, 3, 64] {
            assert!(MsiCapability::add_to(&mut c, n, false, router.clone()).is_err());
        }
    }
}
