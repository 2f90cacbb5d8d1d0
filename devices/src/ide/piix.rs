//! The PIIX3 / PIIX4 IDE function (82371SB function 1, 82371AB function 1
//! datasheets, "IDE Configuration Registers") in legacy ("compatibility")
//! mode: both channels at the ISA ports and IRQs, bus-master registers in
//! BAR4.
//!
//! ```text
//!  config 0x09  prog-if 80h: bus master, both channels legacy, fixed mode
//!  config 0x20  BAR4 (BMIBA): 16 bytes of I/O, channel n at +8n
//!  config 0x40  IDETIM primary, 0x42 secondary: bit 15 = decode enable
//!  config 0x44  SIDETIM, 0x48 UDMACTL, 0x4A UDMATIM (PIIX4): timings,
//!               kept for the guest and otherwise ignored
//! ```
//!
//! There is no firmware to turn decoding on, so IDETIM starts with both
//! decode enables set, as a BIOS leaves them; a guest that clears one
//! hides that channel's legacy ports.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::{IdeChannel, IdeDriveConfig, IdeError, IrqLevel};
use crate::bus::BusDevice;
use crate::pci::{BarKind, BarMove, ClassCode, PciConfiguration, PciDevice, PciHeader};

/// The bus-master BAR.
pub const BM_BAR: usize = 4;
/// Bytes of bus-master registers (8 per channel).
pub const BM_BAR_SIZE: u64 = 16;
/// Legacy command block ports and length.
pub const PRIMARY_COMMAND: u64 = 0x1f0;
pub const SECONDARY_COMMAND: u64 = 0x170;
pub const COMMAND_BLOCK_LEN: u64 = 8;
/// Legacy control block ports (alternate status / device control) and
/// length. 0x3F7/0x377 belong to the floppy controller.
pub const PRIMARY_CONTROL: u64 = 0x3f6;
pub const SECONDARY_CONTROL: u64 = 0x376;
pub const CONTROL_BLOCK_LEN: u64 = 1;
/// ISA IRQs of the legacy channels.
pub const PRIMARY_IRQ: u32 = 14;
pub const SECONDARY_IRQ: u32 = 15;

const VENDOR_INTEL: u16 = 0x8086;
/// Class 01h (mass storage), subclass 01h (IDE), prog-if 80h.
const CLASS_IDE_LEGACY: ClassCode = ClassCode::new(0x01, 0x01, 0x80);
const IDETIM: usize = 0x40;
/// IDETIM bit 15: IDE decode enable.
const IDETIM_DECODE: u16 = 0x8000;
const SIDETIM: usize = 0x44;
const UDMACTL: usize = 0x48;
const UDMATIM: usize = 0x4a;
/// Bytes per channel in BAR4.
const BM_CHANNEL_STRIDE: u64 = 8;

/// Which PIIX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PiixVariant {
    /// 82371SB, 8086:7010 (multiword DMA).
    #[default]
    Piix3,
    /// 82371AB, 8086:7111 (adds Ultra DMA/33).
    Piix4,
}

impl PiixVariant {
    fn device_id(self) -> u16 {
        match self {
            PiixVariant::Piix3 => 0x7010,
            PiixVariant::Piix4 => 0x7111,
        }
    }
}

/// The IDE function: PCI configuration plus both channels.
pub struct PiixIde {
    config: PciConfiguration,
    channels: [IdeChannel; 2],
}

impl PiixIde {
    /// `drives[channel][device]`; `irqs[channel]` for IRQ 14 and 15.
    pub fn new(
        variant: PiixVariant,
        mem: GuestMemoryMmap,
        drives: [[Option<IdeDriveConfig>; 2]; 2],
        irqs: [Arc<dyn IrqLevel>; 2],
    ) -> Result<Self, IdeError> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VENDOR_INTEL,
            device_id: variant.device_id(),
            class_code: CLASS_IDE_LEGACY,
            ..PciHeader::default()
        });
        config
            .add_bar(BM_BAR, BarKind::Io, BM_BAR_SIZE)
            .map_err(IdeError::Pci)?;
        let decode = IDETIM_DECODE.to_le_bytes();
        let timings = [
            (IDETIM, &[0xff; 4][..]),
            (SIDETIM, &[0xff][..]),
            (UDMACTL, &[0x0f][..]),
            (UDMATIM, &[0xff, 0xff][..]),
        ];
        for (offset, mask) in timings {
            config.set_write_mask(offset, mask).map_err(IdeError::Pci)?;
        }
        config
            .set_bytes(IDETIM, &[decode[0], decode[1], decode[0], decode[1]])
            .map_err(IdeError::Pci)?;
        let [primary, secondary] = drives;
        let [irq0, irq1] = irqs;
        let mut ide = Self {
            config,
            channels: [
                IdeChannel::new(mem.clone(), irq0, primary)?,
                IdeChannel::new(mem, irq1, secondary)?,
            ],
        };
        ide.sync_bus_master();
        Ok(ide)
    }

    pub fn channel(&self, index: usize) -> &IdeChannel {
        &self.channels[index]
    }

    pub fn channel_mut(&mut self, index: usize) -> &mut IdeChannel {
        &mut self.channels[index]
    }

    /// Every attached disk's completion eventfd; poll them for readability.
    pub fn completion_fds(&self) -> Vec<RawFd> {
        self.channels
            .iter()
            .flat_map(IdeChannel::completion_fds)
            .collect()
    }

    /// Finish the DMA and flush commands whose disk requests completed.
    pub fn process_completions(&mut self) {
        for c in &mut self.channels {
            c.process_completions();
        }
    }

    /// The channel whose bus-master registers hold `offset` of BAR4.
    fn bm_channel(&mut self, bar: usize, offset: u64) -> Option<&mut IdeChannel> {
        if bar != BM_BAR {
            return None;
        }
        let index = usize::try_from(offset / BM_CHANNEL_STRIDE).ok()?;
        self.channels.get_mut(index)
    }

    /// IDETIM decode enable of `channel`.
    fn decodes(&self, channel: usize) -> bool {
        self.config.u16_at(IDETIM + 2 * channel) & IDETIM_DECODE != 0
    }

    fn sync_bus_master(&mut self) {
        let on = self.config.bus_master_enabled();
        for c in &mut self.channels {
            c.set_bus_master_enabled(on);
        }
    }

    /// Guest read of a legacy port block.
    pub fn read_legacy(
        &mut self,
        channel: usize,
        block: LegacyBlock,
        offset: u64,
        data: &mut [u8],
    ) {
        if !self.decodes(channel) {
            data.fill(0xff);
            return;
        }
        let c = &mut self.channels[channel];
        match block {
            LegacyBlock::Command => c.read_command(offset, data),
            LegacyBlock::Control => c.read_control(data),
        }
    }

    /// Guest write of a legacy port block.
    pub fn write_legacy(&mut self, channel: usize, block: LegacyBlock, offset: u64, data: &[u8]) {
        if !self.decodes(channel) {
            return;
        }
        let c = &mut self.channels[channel];
        match block {
            LegacyBlock::Command => c.write_command(offset, data),
            LegacyBlock::Control => c.write_control(data),
        }
    }
}

impl PciDevice for PiixIde {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn write_config(&mut self, reg_offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(reg_offset, data);
        self.sync_bus_master();
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.bm_channel(bar, offset) {
            Some(c) => c.read_bm(offset % BM_CHANNEL_STRIDE, data),
            None => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(c) = self.bm_channel(bar, offset) {
            c.write_bm(offset % BM_CHANNEL_STRIDE, data);
        }
    }

    fn shutdown(&mut self) {
        for c in &mut self.channels {
            c.shutdown();
        }
    }
}

/// The command block (8 ports) or control block (1 port) of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyBlock {
    Command,
    Control,
}

/// Puts one legacy port block of a channel on the PIO bus.
pub struct IdeLegacyPort {
    ide: Arc<Mutex<PiixIde>>,
    channel: usize,
    block: LegacyBlock,
}

impl IdeLegacyPort {
    pub fn new(ide: Arc<Mutex<PiixIde>>, channel: usize, block: LegacyBlock) -> Self {
        Self {
            ide,
            channel,
            block,
        }
    }
}

impl BusDevice for IdeLegacyPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut ide = self.ide.lock().expect("IDE lock poisoned");
        ide.read_legacy(self.channel, self.block, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut ide = self.ide.lock().expect("IDE lock poisoned");
        ide.write_legacy(self.channel, self.block, offset, data);
    }
}

/// The four legacy port blocks with where they go: `(device, base, len)`.
pub fn legacy_ports(ide: &Arc<Mutex<PiixIde>>) -> Vec<(IdeLegacyPort, u64, u64)> {
    let port = |channel, block| IdeLegacyPort::new(ide.clone(), channel, block);
    vec![
        (
            port(0, LegacyBlock::Command),
            PRIMARY_COMMAND,
            COMMAND_BLOCK_LEN,
        ),
        (
            port(0, LegacyBlock::Control),
            PRIMARY_CONTROL,
            CONTROL_BLOCK_LEN,
        ),
        (
            port(1, LegacyBlock::Command),
            SECONDARY_COMMAND,
            COMMAND_BLOCK_LEN,
        ),
        (
            port(1, LegacyBlock::Control),
            SECONDARY_CONTROL,
            CONTROL_BLOCK_LEN,
        ),
    ]
}
