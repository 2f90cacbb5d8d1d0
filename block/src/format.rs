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

/// How a write that no cluster mapping can take in place (copy-on-write over a backing file,
/// allocation while the guest's write cache is off, a compressed or zero cluster) becomes
/// engine operations instead of the synchronous path: the driver picks the host clusters
/// ([`FormatDriver::plan_cow`]), the pipeline reads the old contents the first and last
/// cluster keep around the write, writes the whole span, and only then does the driver link
/// the new clusters ([`FormatDriver::commit_cow`]), so no mapping ever points at a cluster
/// whose data is not there yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowPlan {
    /// Guest offset of the first cluster the write touches.
    pub start: u64,
    /// Cluster size in bytes.
    pub cluster: u64,
    /// The clusters from `start` on, in guest order.
    pub clusters: Vec<CowCluster>,
    /// Where the old contents of `[start, write offset)` are read from, to be written
    /// again in the first cluster; `None`: nothing to keep (the write starts the cluster, the
    /// cluster is written in place, or it is new and those bytes read as zeroes anyway).
    pub head: Option<Vec<Extent>>,
    /// The same for `[write end, end of the last cluster)`.
    pub tail: Option<Vec<Extent>>,
}

/// One cluster of a [`CowPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowCluster {
    /// Its host offset in the data file.
    pub host: u64,
    /// Whether the mapping changes to `host` at commit (otherwise it is written in place).
    pub link: bool,
    /// Whether `host` was allocated for this write (it is given back if the write fails).
    pub allocated: bool,
}

impl CowPlan {
    /// Guest offset just past the last cluster.
    pub fn end(&self) -> u64 {
        self.start + self.clusters.len() as u64 * self.cluster
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
    /// Whether a write of `[offset, offset+len)` may need a [`CowPlan`]: the pipeline then
    /// holds the whole clusters exclusively while it runs (so no other request maps them
    /// half-way through), and only with that hold asks [`FormatDriver::plan_cow`].
    fn allocates(&mut self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// A plan for a write [`FormatDriver::map_extents`] refused, or `None` for the
    /// synchronous path. The caller holds the clusters exclusively until it commits or
    /// aborts.
    fn plan_cow(&mut self, _offset: u64, _len: u64) -> io::Result<Option<CowPlan>> {
        Ok(None)
    }
    /// The plan's data is written: link its new clusters (and release what they replace).
    fn commit_cow(&mut self, _plan: &CowPlan) -> io::Result<()> {
        Ok(())
    }
    /// The plan's write failed: give back the clusters it allocated.
    fn abort_cow(&mut self, _plan: &CowPlan) {}
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
