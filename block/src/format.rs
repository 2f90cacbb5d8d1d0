//! The format seam: what a disk image looks like to the request pipeline.
//!
//! A driver tells the pipeline the guest-visible geometry and maps guest ranges to host
//! ranges ([`FormatDriver::map`]): a mapped range goes to the engine at its host offset.
//! Ranges that do not map to one contiguous, writable host range (qcow2 holes, zero,
//! compressed and backing-file clusters, allocating writes) take the driver's synchronous
//! path; raw maps everything (guest offset `x` is host offset `x`).

use std::io;
use std::os::fd::RawFd;

use crate::options::Format;

/// A disk image format as seen by [`crate::Disk`].
pub trait FormatDriver: Send {
    /// Which format this is.
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Host descriptor that holds the guest data.
    fn data_fd(&self) -> RawFd;
    /// Guest-visible logical block size.
    fn logical_block_size(&self) -> u32;
    /// Guest-visible physical block size.
    fn physical_block_size(&self) -> u32;
    /// Whether discard can free host space.
    fn supports_discard(&self) -> bool;
    /// Whether discard and write-zeroes are host fallocates at the mapped offset (raw).
    fn falloc_passthrough(&self) -> bool {
        false
    }
    /// Host offset of guest `offset` when `[offset, offset+len)` is one contiguous host range
    /// the engine may read (or, with `write`, overwrite in place); `None` sends the request to
    /// the synchronous path.
    fn map(&mut self, offset: u64, len: u64, write: bool) -> io::Result<Option<u64>>;
    /// Synchronous read of guest bytes.
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Synchronous write of guest bytes (allocating as needed).
    fn write_sync(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Synchronous zeroing; `unmap` allows releasing host space.
    fn zero_sync(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Whether a completed write may stay volatile until the next flush (the guest's write
    /// cache is on, or flushes are ignored). When off, every write must be durable at
    /// completion, engine writes included, so [`FormatDriver::map`] must not hand out a
    /// host range whose mapping is only cached. Off until the pipeline says otherwise.
    fn set_volatile_writes(&mut self, _on: bool) {}
    /// Write metadata the driver caches back to the file, ordered so that the data
    /// fdatasync the caller issues next leaves the image consistent and every completed
    /// write durable. Called for each guest flush before that fdatasync.
    fn flush_metadata(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Make everything written through the synchronous path durable, cached metadata
    /// included (called after each synchronous-path request while the write cache is off).
    fn sync(&mut self) -> io::Result<()>;
    /// Give back host space the driver took ahead of need (the machine is stopping; the
    /// image stays usable).
    fn trim_tail(&mut self) -> io::Result<()> {
        Ok(())
    }
}
