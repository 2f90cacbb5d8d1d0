//! virtio-blk (VIRTIO 1.2 §5.2) on Platter's block layer.
//!
//! ```text
//!  device.rs    VirtioBlk: features (§5.2.3), configuration space (§5.2.4),
//!               activate / reset of the I/O thread
//!  request.rs   one descriptor chain -> a checked request (§5.2.6, §2.7.4)
//!  worker.rs    queues + disk: pops chains, submits, completes, notifies (§2.7.7)
//!  merge.rs     adjacent reads or writes of one batch joined into one disk request
//!  port.rs      the disk, owned by one worker or shared by several I/O threads
//!  (served on an I/O thread, ../io_thread.rs: notify eventfds and disk completions)
//! ```

mod device;
mod merge;
mod port;
mod request;
mod worker;

#[cfg(test)]
mod tests;

pub use device::VirtioBlk;

use crate::virtio::MAX_QUEUE_SIZE;

/// Feature bits of the block device (§5.2.3).
pub mod features {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Bytes in a virtio-blk sector, whatever the block size (§5.2.4).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID answer (§5.2.6).
pub const ID_BYTES: usize = 20;
/// Most queues a block device offers here.
pub const MAX_BLK_QUEUES: u16 = 64;

/// What the VMM configures for one virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Answer to GET_ID, at most 20 bytes; none answers with zeroes.
    pub serial: Option<String>,
    /// Request queues (MQ is offered when more than one).
    pub num_queues: u16,
    /// Size of each queue: a power of two from 4 to 1024.
    pub queue_size: u16,
    /// Offer DISCARD and WRITE_ZEROES (only if the disk can discard).
    pub discard: bool,
    /// Present the disk read-only (also when the disk was opened read-only).
    pub readonly: bool,
    /// Join reads or writes of one batch that continue each other into one disk request
    /// (QEMU's `request-merging`, on by default there too); see `merge.rs`.
    pub request_merging: bool,
    /// Logical block size the guest sees (BLK_SIZE); none takes the disk's.
    /// Reads and writes must be aligned to it.
    pub logical_block_size: Option<u32>,
    /// Physical block size the guest sees (TOPOLOGY); none takes the disk's.
    pub physical_block_size: Option<u32>,
}

impl Default for BlkConfig {
    fn default() -> Self {
        Self {
            serial: None,
            num_queues: 1,
            queue_size: 256,
            discard: true,
            readonly: false,
            request_merging: true,
            logical_block_size: None,
            physical_block_size: None,
        }
    }
}

/// A [`BlkConfig`] the device cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlkConfigError {
    #[error("virtio-blk serial {0:?} is longer than 20 bytes; shorten it")]
    SerialTooLong(String),
    #[error("virtio-blk num_queues {0} is invalid; use 1 to {MAX_BLK_QUEUES}")]
    NumQueues(u16),
    #[error("virtio-blk queue_size {0} is invalid; use a power of two from 4 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("virtio-blk block sizes {logical}/{physical} are invalid; use powers of two from 512 to 65536 with physical >= logical")]
    BlockSize { logical: u32, physical: u32 },
}

impl BlkConfig {
    /// Check the values; every rejection names the accepted range.
    pub fn validate(&self) -> Result<(), BlkConfigError> {
        if let Some(s) = &self.serial {
            if s.len() > ID_BYTES {
                return Err(BlkConfigError::SerialTooLong(s.clone()));
            }
        }
        if self.num_queues == 0 || self.num_queues > MAX_BLK_QUEUES {
            return Err(BlkConfigError::NumQueues(self.num_queues));
        }
        let q = self.queue_size;
        if !(4..=MAX_QUEUE_SIZE).contains(&q) || !q.is_power_of_two() {
            return Err(BlkConfigError::QueueSize(q));
        }
        let logical = self.logical_block_size.unwrap_or(512);
        let physical = self.physical_block_size.unwrap_or(logical);
        let ok = |v: u32| v.is_power_of_two() && (512..=65536).contains(&v);
        if !ok(logical) || !ok(physical) || physical < logical {
            return Err(BlkConfigError::BlockSize { logical, physical });
        }
        Ok(())
    }
}

/// Request types (§5.2.6).
pub(super) mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values (§5.2.6).
pub(super) mod blk_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// What the worker needs to know about the device, fixed at activation: the request checks,
/// and whether requests may be joined.
#[derive(Clone, Debug)]
pub(super) struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size: reads and writes are aligned to it.
    pub logical_block: u64,
    pub readonly: bool,
    /// Most data descriptors in a read or write.
    pub seg_max: u32,
    /// Largest data descriptor.
    pub size_max: u32,
    /// DISCARD / WRITE_ZEROES negotiated.
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// GET_ID answer, zero padded.
    pub id: [u8; ID_BYTES],
    /// [`BlkConfig::request_merging`].
    pub merging: bool,
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn every_rejection() {
        assert!(BlkConfig::default().validate().is_ok());
        let c = |f: &dyn Fn(&mut BlkConfig)| {
            let mut c = BlkConfig::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(
            c(&|c| c.serial = Some("x".repeat(21))),
            Err(BlkConfigError::SerialTooLong("x".repeat(21)))
        );
        assert!(c(&|c| c.serial = Some("x".repeat(20))).is_ok());
        assert_eq!(c(&|c| c.num_queues = 0), Err(BlkConfigError::NumQueues(0)));
        assert_eq!(
            c(&|c| c.num_queues = 65),
            Err(BlkConfigError::NumQueues(65))
        );
        for q in [0, 2, 3, 100, 2048] {
            assert_eq!(c(&|c| c.queue_size = q), Err(BlkConfigError::QueueSize(q)));
        }
        assert!(c(&|c| c.queue_size = 1024).is_ok());
    }
}
