//! The format seam: what a disk image looks like to the request pipeline.
//!
//! A driver tells the pipeline the guest-visible geometry and maps guest ranges to host
//! extents ([`FormatDriver::map_extents`]): each mapped extent goes to the engine at its host
//! offset, a range that maps to several (a qcow2 image whose clusters were allocated out of
//! order, or that reads partly from its backing file) as several engine operations. Ranges
//! with a piece the engine cannot serve (compressed clusters, copy-on-write) take the
//! driver's synchronous path; raw maps everything (guest offset `x` is host offset `x`).

use std::io;
use std::os::fd::RawFd;

use crate::options::Format;

/// Where one piece of a guest range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at offset `host` of the file `fd`: the image's data file, or a file of
    /// its backing chain (read mappings only).
    Host {
        /// The file, open for as long as the driver is.
        fd: RawFd,
        /// Host file offset.
        host: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes that read as zeroes without touching the file (only in read mappings).
    Zero {
        /// Length in bytes.
        len: u64,
    },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Host { len, .. } | Extent::Zero { len } => len,
        }
    }

    /// Whether the extent has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
    /// Whether every guest range is the same range of the data file (raw), so the pipeline
    /// can skip [`FormatDriver::map_extents`] for reads and writes.
    fn identity_mapped(&self) -> bool {
        false
    }
    /// For formats whose discard and write-zeroes change where guest data lives (qcow2 frees
    /// clusters, which the next allocation may hand out again): the unit they change it in.
    /// The pipeline keeps engine reads and writes off those units while such a request runs,
    /// or an operation still in flight on a freed cluster would land in its next owner
    /// (another guest range, or an L2 table). `None`: mappings never change under the
    /// engine (raw).
    fn remap_granularity(&self) -> Option<u64> {
        None
    }
    /// The extents of guest `[offset, offset+len)` in guest order, neighbours merged, when
    /// the engine may read all of it (or, with `write`, overwrite all of it in place; write
    /// mappings hold only [`Extent::Host`]); `None` sends the request to the synchronous
    /// path.
    fn map_extents(
        &mut self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> io::Result<Option<Vec<Extent>>>;
    /// Host offset of guest `offset` when `[offset, offset+len)` is one contiguous range of
    /// the data file the engine may read (or, with `write`, overwrite in place).
    fn map(&mut self, offset: u64, len: u64, write: bool) -> io::Result<Option<u64>> {
        Ok(match self.map_extents(offset, len, write)?.as_deref() {
            Some([Extent::Host { fd, host, .. }]) if *fd == self.data_fd() => Some(*host),
            _ => None,
        })
    }
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
