//! Virtio vendor-specific PCI capabilities (VIRTIO 1.2 §4.1.4).
//!
//! ```text
//!  struct virtio_pci_cap (16 bytes; the notify capability adds
//!  le32 notify_off_multiplier, the PCI configuration access one
//!  u8 pci_cfg_data[4])
//!  +0 cap_vndr 0x09 | +1 cap_next | +2 cap_len | +3 cfg_type
//!  +4 bar | +5 id | +6 padding[2]
//!  +8 le32 offset (in the BAR)
//!  +12 le32 length
//! ```

use super::{
    COMMON_OFFSET, DEVICE_OFFSET, ISR_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, REGION_LEN,
};
use crate::pci::{PciConfiguration, PciError};

/// Capability id of vendor-specific capabilities.
const VENDOR_CAPABILITY_ID: u8 = 0x09;

const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const CFG_TYPE_PCI: u8 = 5;

const CAP_LEN: u8 = 16;
const CAP_LEN_EXTENDED: u8 = 20;

/// Offsets inside a capability.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
const CAP_PCI_CFG_DATA: usize = 16;

/// The capability body after the id and next bytes.
fn body(cfg_type: u8, bar: usize, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() {
        CAP_LEN_EXTENDED
    } else {
        CAP_LEN
    };
    // The layout constants keep all of these far below the field limits.
    let bar = u8::try_from(bar).unwrap_or(0);
    let offset = u32::try_from(offset).unwrap_or(0);
    let length = u32::try_from(length).unwrap_or(0);
    let mut b = vec![len, cfg_type, bar, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// Add the common, ISR, device and notify capabilities for BAR 0.
pub(super) fn add_virtio_caps(
    config: &mut PciConfiguration,
    num_queues: u16,
) -> Result<(), PciError> {
    let bar = super::BAR;
    let id = VENDOR_CAPABILITY_ID;
    config.add_capability(
        id,
        &body(CFG_TYPE_COMMON, bar, COMMON_OFFSET, REGION_LEN, None),
    )?;
    config.add_capability(id, &body(CFG_TYPE_ISR, bar, ISR_OFFSET, REGION_LEN, None))?;
    config.add_capability(
        id,
        &body(CFG_TYPE_DEVICE, bar, DEVICE_OFFSET, REGION_LEN, None),
    )?;
    let notify_len = u64::from(num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER);
    config.add_capability(
        id,
        &body(
            CFG_TYPE_NOTIFY,
            bar,
            NOTIFY_OFFSET,
            notify_len,
            Some(NOTIFY_OFF_MULTIPLIER),
        ),
    )?;
    Ok(())
}

/// The PCI configuration access capability (§4.1.4.9): a window onto the
/// BARs for drivers that cannot map them. The driver sets bar, offset and
/// length, then reads or writes `pci_cfg_data`.
pub(super) struct PciCfgCap {
    offset: usize,
}

impl PciCfgCap {
    pub(super) fn add_to(config: &mut PciConfiguration) -> Result<Self, PciError> {
        let offset =
            config.add_capability(VENDOR_CAPABILITY_ID, &body(CFG_TYPE_PCI, 0, 0, 0, Some(0)))?;
        config.set_write_mask(offset + CAP_BAR, &[0xff])?;
        config.set_write_mask(offset + CAP_OFFSET, &[0xff; 12])?;
        Ok(Self { offset })
    }

    /// The BAR access a configuration access at `reg_offset..+len` makes,
    /// if it touches `pci_cfg_data` and the window is valid: `(bar, offset,
    /// length)` with length 1, 2 or 4 and offset aligned to it.
    pub(super) fn access(
        &self,
        config: &PciConfiguration,
        reg_offset: usize,
        len: usize,
    ) -> Option<(usize, u64, usize)> {
        let data = self.offset + CAP_PCI_CFG_DATA;
        if reg_offset >= data + 4 || reg_offset.saturating_add(len) <= data {
            return None;
        }
        let bar = usize::from(config.u16_at(self.offset + CAP_BAR) & 0xff);
        let offset = config.u32_at(self.offset + CAP_OFFSET);
        let length = config.u32_at(self.offset + CAP_LENGTH);
        let length = usize::try_from(length)
            .ok()
            .filter(|&l| matches!(l, 1 | 2 | 4))?;
        let offset = u64::from(offset);
        (offset % length as u64 == 0).then_some((bar, offset, length))
    }

    /// What the driver left in `pci_cfg_data`.
    pub(super) fn data(&self, config: &PciConfiguration) -> [u8; 4] {
        config.u32_at(self.offset + CAP_PCI_CFG_DATA).to_le_bytes()
    }

    /// Put the result of a BAR read in `pci_cfg_data`.
    pub(super) fn set_data(&self, config: &mut PciConfiguration, data: [u8; 4]) {
        if let Err(e) = config.set_bytes(self.offset + CAP_PCI_CFG_DATA, &data) {
            log::error!("virtio: PCI configuration access capability misplaced: {e}");
        }
    }
}
