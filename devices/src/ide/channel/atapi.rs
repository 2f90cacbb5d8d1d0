//! PACKET commands on an IDE channel (ATA/ATAPI-6 §8.21, §9.10-9.11): the
//! command packet goes to the SCSI layer, whose answer becomes PIO data-in
//! blocks, a DMA transfer, or status with the sense key in the error register.

use super::dma::DmaOp;
use super::*;
use crate::scsi::sense::key;
use crate::scsi::ScsiOutcome;

impl IdeChannel {
    pub(super) fn atapi_command(&mut self, index: usize, cdb: &[u8], dma: bool, limit: usize) {
        let d = self.drive(index);
        let Some(unit) = d.cdrom.as_mut() else {
            return self.finish_error(index, error::ABRT, true);
        };
        match unit.execute(cdb) {
            ScsiOutcome::Good => self.atapi_ok(index),
            ScsiOutcome::DataIn(v) if v.is_empty() => self.atapi_ok(index),
            ScsiOutcome::DataIn(v) if dma => self.queue_dma(index, DmaOp::Buffer(v)),
            ScsiOutcome::DataIn(v) => {
                let kind = PioKind::Buffer {
                    limit,
                    packet: true,
                };
                let pio = Pio::new(v, false, kind);
                self.next_in_block(index, pio);
            }
            ScsiOutcome::Read { lba, blocks } if dma => self.queue_dma(
                index,
                DmaOp::Read {
                    offset: lba * CD_BLOCK_SIZE,
                    len: cd_bytes(blocks),
                },
            ),
            ScsiOutcome::Read { lba, blocks } => {
                let kind = PioKind::CdRead {
                    lba,
                    remaining: blocks,
                    limit,
                };
                self.next_in_block(index, Pio::new(Vec::new(), false, kind));
            }
            ScsiOutcome::CheckCondition(sense) => self.atapi_error(index, sense),
        }
    }

    pub(super) fn atapi_ok(&mut self, index: usize) {
        self.drive(index).regs.count[0] = IREASON_IO | IREASON_COD;
        self.finish_ok(index);
    }

    /// CHECK CONDITION: sense key in the error register (ATA/ATAPI-6
    /// §8.21.4), sense kept for REQUEST SENSE.
    pub(super) fn atapi_error(&mut self, index: usize, sense: Sense) {
        let d = self.drive(index);
        if let Some(unit) = d.cdrom.as_mut() {
            unit.set_sense(sense);
        }
        d.regs.count[0] = IREASON_IO | IREASON_COD;
        let abrt = if sense.key == key::ILLEGAL_REQUEST || sense.key == key::ABORTED_COMMAND {
            error::ABRT
        } else {
            0
        };
        self.finish_error(index, sense.key << 4 | abrt, true);
    }
}
