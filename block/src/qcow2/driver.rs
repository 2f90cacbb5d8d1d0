//! qcow2 guest I/O: the L1/L2 mapping with an L2 cache, cluster allocation with refcounts,
//! backing files, zero and compressed clusters, discard.
//!
//! ```text
//!  guest offset ─┬─ l1 index = off >> (cluster_bits + l2_bits)   L1 (in memory, write-back)
//!                ├─ l2 index = (off >> cluster_bits) & (l2 entries - 1)   L2 (write-back cache)
//!                └─ in-cluster offset
//!  L2 entry: bit 63 COPIED (refcount 1) · bit 62 compressed · bits 9..55 host offset · bit 0 zero
//!  compressed: bits 0..x-1 host byte offset, x..61 (512-byte sectors - 1), x = 62 - (cluster_bits - 8)
//! ```
//!
//! Requests over allocated data clusters (exclusively owned, COPIED, for writes) go to the
//! engine at their host offsets ([`FormatDriver::map_extents`]), one engine operation per
//! run of host-contiguous clusters; reads of holes and zero clusters (no backing file) are
//! zero extents the pipeline fills itself; writes that allocate clusters which read as
//! zeroes (no backing file) while the guest's write cache is on go to the engine too: the
//! mapping allocates a zeroed cluster and the engine writes into it. Other allocating writes
//! (copy-on-write of the rest of the cluster from the backing file) are planned here and
//! carried out by the engine, the new clusters linked once their data is written (`cow.rs`).
//! Everything else runs synchronously here: reads of compressed clusters (and of backing
//! data a backing qcow2 cannot map), discard and write-zeroes, and the allocating writes a
//! plan cannot take (unaligned for O_DIRECT, or keeping data from a compressed cluster).
//! Metadata (L2 tables, refcount blocks, L1 entries) is cached and written back at flush
//! points or on eviction, ordered so that a crash leaks clusters at worst and never leaves a
//! reference to an unowned one (`writeback.rs`); no lazy refcounts, so the dirty bit is never
//! set by us.
//!
//! Refused, with a message: read-write opens of images marked corrupt or dirty (their
//! refcounts need `qemu-img check -r all`), or with internal snapshots; extended L2 entries,
//! external data files, encryption and zstd compression in any mode. Detected corruption
//! (misaligned or out-of-file metadata offsets) sets the corrupt bit, as the spec asks.
//!
//! Refcounts, cluster allocation and growing the refcount table live in `refcount.rs`, the
//! metadata cache in `cache.rs`, write-back and its ordering rules in `writeback.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::{
    resolve_backing, Qcow2Header, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
};
use crate::format::{CowPlan, Extent, FormatDriver};
use crate::options::Format;
use crate::raw::DEFAULT_LOGICAL_BLOCK_SIZE;
use crate::BlockError;

mod cache;
mod cow;
mod host;
mod refcount;
mod writeback;

use cache::MetaCache;
use host::{punch, HostFile};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const HEADER_INCOMPAT: u64 = 72;
const HEADER_AUTOCLEAR: u64 = 88;
/// Default L2 cache size (QEMU's default maximum on Linux).
pub const DEFAULT_L2_CACHE_SIZE: u64 = 32 << 20;
/// The refcount block cache gets a quarter of the L2 cache's bytes (QEMU's ratio when only
/// the L2 size is given): each block counts far more clusters than an L2 table maps, and
/// allocation walks them in order, so few blocks are ever hot.
const RC_CACHE_RATIO: u64 = 4;
/// Smallest refcount block cache (QEMU's minimum), so that tiny L2 caches still work.
const MIN_RC_CACHE_BLOCKS: u64 = 4;
/// The file grows ahead of allocation in steps this large: `ftruncate` waits for all direct
/// I/O in flight, so growing by one cluster per allocation stalled the pipeline.
const FILE_GROW_STEP: u64 = 2 << 20;

/// Most engine operations one request becomes; a request over more scattered clusters than
/// this takes the synchronous path instead.
const MAX_EXTENTS: usize = 1024;

/// What one guest cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Not allocated here: backing file or zeroes.
    Unallocated,
    /// Reads as zeroes; may keep a preallocated host cluster.
    Zero { host: Option<u64>, copied: bool },
    /// Data at `host`; `copied` means we own it alone and may write in place.
    Data { host: u64, copied: bool },
    /// Deflate stream of `len` bytes at host byte `off`.
    Compressed { off: u64, len: u64 },
}

/// Something readable that backs an image.
trait Backing: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Where `[off, off+len)` of the backing image lives, for the engine to read it (past
    /// the backing image's end it reads as zeroes); `None` when part of it needs
    /// `read_at`.
    fn map_read(&mut self, off: u64, len: u64) -> io::Result<Option<Vec<Extent>>>;
}

/// `len` bytes from `off` of an image of `size` bytes: the part inside it, mapped by `inside`,
/// then zeroes.
fn clamp_to_size(
    off: u64,
    len: u64,
    size: u64,
    inside: impl FnOnce(u64) -> io::Result<Option<Vec<Extent>>>,
) -> io::Result<Option<Vec<Extent>>> {
    let avail = size.saturating_sub(off).min(len);
    let mut out = if avail > 0 {
        match inside(avail)? {
            Some(x) => x,
            None => return Ok(None),
        }
    } else {
        Vec::new()
    };
    if avail < len {
        out.push(Extent::Zero { len: len - avail });
    }
    Ok(Some(out))
}

/// Append `e` to `out`, merged into the last extent when it continues it; false when `out`
/// already holds [`MAX_EXTENTS`] and `e` would be a new one.
fn push_extent(out: &mut Vec<Extent>, e: Extent) -> bool {
    let full = out.len() == MAX_EXTENTS;
    match (out.last_mut(), e) {
        (
            Some(Extent::Host {
                fd: f0,
                host: h0,
                len: l0,
            }),
            Extent::Host { fd, host, len },
        ) if *f0 == fd && *h0 + *l0 == host => *l0 += len,
        (Some(Extent::Zero { len: l0 }), Extent::Zero { len }) => *l0 += len,
        _ if full => return false,
        _ => out.push(e),
    }
    true
}

struct RawBacking {
    file: HostFile,
    size: u64,
}

impl Backing for RawBacking {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_at(off, buf)
    }
    fn map_read(&mut self, off: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        let fd = self.file.as_raw_fd();
        clamp_to_size(off, len, self.size, |n| {
            Ok(Some(vec![Extent::Host {
                fd,
                host: off,
                len: n,
            }]))
        })
    }
}

impl Backing for Qcow2Driver {
    fn size(&self) -> u64 {
        self.header.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_sync(off, buf)
    }
    fn map_read(&mut self, off: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        let size = self.header.size;
        clamp_to_size(off, len, size, |n| self.map_extents(off, n, false))
    }
}

/// An open qcow2 image.
pub struct Qcow2Driver {
    path: PathBuf,
    /// Metadata and the synchronous data path (same open file as `data`).
    meta: HostFile,
    /// Descriptor the engine uses (O_DIRECT with cache=none).
    data: File,
    header: Qcow2Header,
    readonly: bool,
    cluster_bits: u32,
    cluster: u64,
    l2_entries: u64,
    l1: Vec<u64>,
    /// Byte range of the L1 table that differs from the file.
    l1_dirty: Option<(usize, usize)>,
    l2_cache: MetaCache<Vec<u64>>,
    rc_table: Vec<u64>,
    rc_cache: MetaCache<Vec<u8>>,
    /// Host clusters whose reference was dropped, decremented at the next write-back.
    pending_free: Vec<u64>,
    /// Something was written since the last fdatasync.
    unsynced: bool,
    free_hint: u64,
    file_len: u64,
    /// `[fresh_from, file_len)` is the tail we grew the file by ahead of need (allocated as
    /// unwritten extents where possible): clusters there read as zeroes without punching;
    /// trimmed at close.
    fresh_from: u64,
    backing: Option<Box<dyn Backing>>,
    /// Last decompressed cluster: (host offset of the stream, data).
    decompressed: Option<(u64, Vec<u8>)>,
    physical: u32,
    /// Completed writes may stay volatile until a flush (see `set_volatile_writes`).
    volatile_writes: bool,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Qcow2Driver {
    /// Open the qcow2 image at `path`. `data` is the descriptor for engine I/O (already
    /// opened and locked by the caller; O_DIRECT when `request_align` > 1), `depth` the
    /// position in a backing chain.
    pub fn open(
        path: &Path,
        data: File,
        readonly: bool,
        l2_cache_size: u64,
        request_align: usize,
        depth: usize,
    ) -> Result<Qcow2Driver, BlockError> {
        let io = |source| BlockError::ImageIo {
            path: path.to_path_buf(),
            source,
        };
        let unsupported = |feature: &str| BlockError::UnsupportedQcow2 {
            path: path.to_path_buf(),
            feature: feature.to_string(),
        };
        // The header through a buffered descriptor (it is read before any direct I/O).
        let header = Qcow2Header::read_path(path)?;
        let meta = HostFile {
            file: data.try_clone().map_err(io)?,
            align: request_align.max(1) as u64,
        };
        if header.cluster_size() < meta.align {
            return Err(unsupported(&format!(
                "cluster_size {} below the O_DIRECT alignment {}; use cache=writeback",
                header.cluster_size(),
                meta.align
            )));
        }
        if header.crypt_method != 0 {
            return Err(unsupported("encryption"));
        }
        if header.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file"));
        }
        if header.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            return Err(unsupported("compression type other than deflate (zstd)"));
        }
        if !readonly {
            let repair = |what: &str| {
                BlockError::UnsupportedQcow2 {
                path: path.to_path_buf(),
                feature: format!(
                    "the image is marked {what}; open it read-only, or repair it with `qemu-img check -r all`"
                ),
            }
            };
            if header.is_corrupt() {
                return Err(repair("corrupt"));
            }
            if header.is_dirty() {
                return Err(repair("dirty (refcounts not up to date)"));
            }
            if header.nb_snapshots > 0 {
                return Err(unsupported(
                    "writing images with internal snapshots; open read-only",
                ));
            }
        }
        let cluster_bits = header.cluster_bits;
        let cluster = 1u64 << cluster_bits;
        let file_len = data.metadata().map_err(io)?.len();
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        meta.read_at(header.l1_table_offset, &mut raw).map_err(io)?;
        let l1 = raw.chunks(8).map(|c| be64(c, 0)).collect();
        let mut raw = vec![0u8; (u64::from(header.refcount_table_clusters) * cluster) as usize];
        meta.read_at(header.refcount_table_offset, &mut raw)
            .map_err(io)?;
        let rc_table = raw.chunks(8).map(|c| be64(c, 0)).collect();
        let backing = match &header.backing_file {
            None => None,
            Some(name) => Some(open_backing(
                path,
                name,
                header.backing_format.as_deref(),
                depth,
                (meta.align > 1).then(|| crate::raw::direct_io_alignment(&data)),
            )?),
        };
        let mut d = Qcow2Driver {
            path: path.to_path_buf(),
            meta,
            data,
            readonly,
            cluster_bits,
            cluster,
            l2_entries: cluster / 8,
            l1,
            l1_dirty: None,
            l2_cache: MetaCache::new((l2_cache_size / cluster) as usize),
            rc_table,
            rc_cache: MetaCache::new(
                (l2_cache_size / RC_CACHE_RATIO / cluster).max(MIN_RC_CACHE_BLOCKS) as usize,
            ),
            pending_free: Vec::new(),
            unsynced: false,
            free_hint: 0,
            file_len,
            fresh_from: file_len,
            backing,
            decompressed: None,
            physical: (request_align as u32).max(DEFAULT_LOGICAL_BLOCK_SIZE),
            volatile_writes: false,
            header,
        };
        if !readonly && d.header.version == 3 && d.header.autoclear_features != 0 {
            // Autoclear features we do not maintain must be cleared before we write.
            d.meta
                .write_at(HEADER_AUTOCLEAR, &0u64.to_be_bytes())
                .map_err(io)?;
            d.header.autoclear_features = 0;
        }
        Ok(d)
    }

    /// The validated header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// Mark the image corrupt (when writable) and build the error to return.
    fn corrupt(&mut self, what: String) -> io::Error {
        log::error!("{}: qcow2 metadata corrupt: {what}", self.path.display());
        if !self.readonly {
            let bits = self.header.incompatible_features | INCOMPAT_CORRUPT;
            if self
                .meta
                .write_at(HEADER_INCOMPAT, &bits.to_be_bytes())
                .is_ok()
            {
                self.header.incompatible_features = bits;
                self.readonly = true;
            }
        }
        io::Error::other(format!(
            "{}: qcow2 image is corrupt ({what}); marked corrupt, repair with `qemu-img check -r all`",
            self.path.display()
        ))
    }

    fn check_host(&mut self, what: &str, off: u64) -> io::Result<u64> {
        if off % self.cluster != 0 {
            return Err(self.corrupt(format!("{what} offset {off:#x} is not cluster aligned")));
        }
        Ok(off)
    }

    /// The cached L2 table at `l2_off`; callers that change it mark it dirty.
    fn l2_table(&mut self, l2_off: u64) -> io::Result<&mut Vec<u64>> {
        if !self.l2_cache.contains(l2_off) {
            if l2_off + self.cluster > self.file_len {
                return Err(self.corrupt(format!("L2 table at {l2_off:#x} is past the end")));
            }
            let mut raw = vec![0u8; self.cluster as usize];
            self.meta.read_at(l2_off, &mut raw)?;
            let t = raw.chunks(8).map(|c| be64(c, 0)).collect();
            self.l2_make_room()?;
            self.l2_cache.insert(l2_off, t, None);
        }
        Ok(self.l2_cache.get(l2_off).expect("just inserted"))
    }

    fn indices(&self, guest: u64) -> (usize, usize) {
        let c = guest >> self.cluster_bits;
        (
            (c / self.l2_entries) as usize,
            (c % self.l2_entries) as usize,
        )
    }

    fn l2_offset(&mut self, l1i: usize) -> io::Result<u64> {
        let e = self.l1[l1i];
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        self.check_host("L2 table", off)
    }

    fn lookup(&mut self, guest: u64) -> io::Result<Cluster> {
        let (l1i, l2i) = self.indices(guest);
        let l2_off = self.l2_offset(l1i)?;
        if l2_off == 0 {
            return Ok(Cluster::Unallocated);
        }
        let e = self.l2_table(l2_off)?[l2i];
        let copied = e & COPIED != 0;
        if e & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let off = e & ((1u64 << x) - 1);
            let sectors = ((e & !(COPIED | COMPRESSED)) >> x) + 1;
            let len = sectors * 512 - (off & 511);
            return Ok(Cluster::Compressed { off, len });
        }
        let host = e & OFFSET_MASK;
        if self.header.version >= 3 && e & ZERO != 0 {
            let host = if host == 0 {
                None
            } else {
                Some(self.check_host("zero cluster", host)?)
            };
            return Ok(Cluster::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        let host = self.check_host("data cluster", host)?;
        Ok(Cluster::Data { host, copied })
    }

    fn set_l2(&mut self, guest: u64, entry: u64) -> io::Result<()> {
        let (l1i, l2i) = self.indices(guest);
        let mut l2_off = self.l2_offset(l1i)?;
        if l2_off == 0 {
            l2_off = self.alloc_cluster()?;
            self.new_l2_table(l1i, l2_off)?;
        }
        self.l2_table(l2_off)?[l2i] = entry;
        self.l2_cache.mark_dirty(l2_off, l2i * 8, l2i * 8 + 8);
        Ok(())
    }

    /// Release what a cluster entry owned.
    fn release_cluster(&mut self, c: Cluster) -> io::Result<()> {
        match c {
            Cluster::Data { host, .. }
            | Cluster::Zero {
                host: Some(host), ..
            } => self.release(host >> self.cluster_bits),
            Cluster::Compressed { off, len } => {
                let first = off >> self.cluster_bits;
                let last = (off + len - 1) >> self.cluster_bits;
                for idx in first..=last {
                    self.release(idx)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn decompress(&mut self, off: u64, len: u64) -> io::Result<&[u8]> {
        if self.decompressed.as_ref().map(|(o, _)| *o) != Some(off) {
            let mut input = vec![0u8; len as usize];
            self.meta.read_at(off, &mut input)?;
            let out = miniz_oxide::inflate::decompress_to_vec_with_limit(
                &input,
                self.cluster as usize,
            )
            .map_err(|e| io::Error::other(format!("compressed cluster at {off:#x}: {e:?}")))?;
            let mut out = out;
            out.resize(self.cluster as usize, 0);
            self.decompressed = Some((off, out));
        }
        Ok(&self.decompressed.as_ref().expect("just set").1)
    }

    /// Read guest bytes of one cluster (`buf` does not cross a cluster boundary).
    fn read_piece(&mut self, guest: u64, buf: &mut [u8]) -> io::Result<()> {
        let within = guest & (self.cluster - 1);
        match self.lookup(guest)? {
            Cluster::Unallocated => match &mut self.backing {
                Some(b) => {
                    let bsize = b.size();
                    let n = bsize.saturating_sub(guest).min(buf.len() as u64) as usize;
                    b.read_at(guest, &mut buf[..n])?;
                    buf[n..].fill(0);
                    Ok(())
                }
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Cluster::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Cluster::Data { host, .. } => self.meta.read_at(host + within, buf),
            Cluster::Compressed { off, len } => {
                let data = self.decompress(off, len)?;
                buf.copy_from_slice(&data[within as usize..within as usize + buf.len()]);
                Ok(())
            }
        }
    }

    /// Write guest bytes of one cluster, allocating (and copying the rest of the cluster's
    /// old contents) when it is not an owned data cluster.
    fn write_piece(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        let within = guest & (self.cluster - 1);
        let cstart = guest - within;
        let old = self.lookup(guest)?;
        match old {
            Cluster::Data { host, copied: true } => {
                self.unsynced = true;
                return self.meta.write_at(host + within, data);
            }
            Cluster::Zero {
                host: Some(host),
                copied: true,
            } => {
                // Preallocated zero cluster: zero it, write, then drop the zero flag.
                let mut full = vec![0u8; self.cluster as usize];
                full[within as usize..within as usize + data.len()].copy_from_slice(data);
                self.meta.write_at(host, &full)?;
                self.unsynced = true;
                return self.set_l2(guest, host | COPIED);
            }
            _ => {}
        }
        let zero_rest = match old {
            Cluster::Unallocated => self.backing.is_none(),
            Cluster::Zero { .. } => true,
            _ => false,
        };
        let whole = data.len() as u64 == self.cluster;
        let host = self.alloc_cluster()?;
        if whole {
            self.meta.write_at(host, data)?;
        } else if zero_rest {
            // The new cluster reads as zeroes (appended or punched when freed).
            self.meta.write_at(host + within, data)?;
        } else {
            let mut full = vec![0u8; self.cluster as usize];
            self.read_piece(cstart, &mut full)?;
            full[within as usize..within as usize + data.len()].copy_from_slice(data);
            self.meta.write_at(host, &full)?;
        }
        // The data is written before the L2 entry changes in the cache; the barrier before
        // the entry reaches the file makes it durable first.
        self.unsynced = true;
        self.set_l2(guest, host | COPIED)?;
        self.release_cluster(old)
    }

    /// Zero or discard one cluster piece.
    fn zero_piece(&mut self, guest: u64, len: u64, unmap: bool) -> io::Result<()> {
        let old = self.lookup(guest)?;
        let reads_zero = match old {
            Cluster::Unallocated => self.backing.is_none(),
            Cluster::Zero { .. } => true,
            _ => false,
        };
        if reads_zero {
            return Ok(());
        }
        if len < self.cluster {
            return self.write_piece(guest, &vec![0u8; len as usize]);
        }
        let v3 = self.header.version >= 3;
        let new = match old {
            Cluster::Data { host, copied: true } if !unmap && v3 => host | COPIED | ZERO,
            _ if self.backing.is_none() => 0,
            _ if v3 => ZERO,
            // v2 has no zero flag: with a backing file the zeroes must be written.
            _ => return self.write_piece(guest, &vec![0u8; len as usize]),
        };
        self.set_l2(guest, new)?;
        if new & OFFSET_MASK == 0 {
            self.release_cluster(old)?;
        } else {
            let _ = punch(&self.meta, new & OFFSET_MASK, self.cluster);
        }
        Ok(())
    }

    /// Split `[offset, offset+len)` at cluster boundaries.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let c = self.cluster;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let n = (c - at % c).min(end - at);
            let p = (at, n);
            at += n;
            Some(p)
        })
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::other(format!(
                "{}: qcow2 image is read-only (marked corrupt?)",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Open the backing file `name` of `image`. `direct` is the O_DIRECT alignment (offset,
/// memory) of the image above when it uses O_DIRECT: the backing file then does too, as QEMU
/// applies a cache mode to the whole chain (cache=none must not fill the host page cache
/// from the base image either), unless its file system refuses O_DIRECT or needs coarser
/// alignment than the requests the pipeline lets through; then it is read buffered.
fn open_backing(
    image: &Path,
    name: &str,
    fmt: Option<&str>,
    depth: usize,
    direct: Option<(usize, usize)>,
) -> Result<Box<dyn Backing>, BlockError> {
    let path = resolve_backing(image, name);
    if depth + 1 >= crate::img::MAX_BACKING_CHAIN {
        return Err(BlockError::ChainTooDeep {
            path: image.to_path_buf(),
            limit: crate::img::MAX_BACKING_CHAIN,
        });
    }
    let format = match fmt {
        Some(f) => f
            .parse::<Format>()
            .map_err(|e| BlockError::UnsupportedQcow2 {
                path: image.to_path_buf(),
                feature: format!("backing format: {e}"),
            })?,
        None => crate::img::probe_format(&path)?,
    };
    let open_err = |source| BlockError::Open {
        path: path.clone(),
        source,
    };
    let direct_file = direct.and_then(|(offset, mem)| {
        let f = crate::raw::open_image_file(&path, true, true).ok()?;
        let (o, m) = crate::raw::direct_io_alignment(&f);
        // A qcow2 base with clusters smaller than the alignment cannot be read direct.
        let small_clusters = format == Format::Qcow2
            && Qcow2Header::read_path(&path).is_ok_and(|h| h.cluster_size() < offset as u64);
        (o <= offset && m <= mem && !small_clusters).then_some((f, offset))
    });
    let (file, align) = match direct_file {
        Some(f) => f,
        None => (
            crate::raw::open_image_file(&path, true, false).map_err(open_err)?,
            1,
        ),
    };
    Ok(match format {
        Format::Raw => {
            let size = file
                .metadata()
                .map_err(|source| BlockError::ImageIo {
                    path: path.clone(),
                    source,
                })?
                .len();
            Box::new(RawBacking {
                file: HostFile {
                    file,
                    align: align as u64,
                },
                size,
            })
        }
        Format::Qcow2 => Box::new(Qcow2Driver::open(
            &path,
            file,
            true,
            DEFAULT_L2_CACHE_SIZE,
            align,
            depth + 1,
        )?),
    })
}

impl FormatDriver for Qcow2Driver {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.header.size
    }
    fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }
    fn logical_block_size(&self) -> u32 {
        DEFAULT_LOGICAL_BLOCK_SIZE
    }
    fn physical_block_size(&self) -> u32 {
        self.physical
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn remap_granularity(&self) -> Option<u64> {
        Some(self.cluster)
    }

    fn map_extents(
        &mut self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> io::Result<Option<Vec<Extent>>> {
        if len == 0 || (write && self.readonly) {
            return Ok(None);
        }
        let mut out: Vec<Extent> = Vec::new();
        let fd = self.data.as_raw_fd();
        for (at, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            let ext = match self.lookup(at)? {
                Cluster::Data { host, copied } if copied || !write => Extent::Host {
                    fd,
                    host: host + at % self.cluster,
                    len: n,
                },
                // A cluster that reads as zeroes and owns no host cluster: allocate a zeroed
                // one and let the engine write into it (see `writeback.rs`, rule 4).
                cl @ (Cluster::Unallocated | Cluster::Zero { host: None, .. })
                    if write && self.writes_in_place(cl) =>
                {
                    let host = self.alloc_cluster()?;
                    self.set_l2(at, host | COPIED)?;
                    Extent::Host {
                        fd,
                        host: host + at % self.cluster,
                        len: n,
                    }
                }
                Cluster::Zero { .. } if !write => Extent::Zero { len: n },
                Cluster::Unallocated if !write => match &mut self.backing {
                    None => Extent::Zero { len: n },
                    // Backing data goes to the engine too, from the backing file's own
                    // descriptor (QEMU reads a chain the same way, layer by layer).
                    Some(b) => match b.map_read(at, n)? {
                        Some(x) if x.iter().all(|&e| push_extent(&mut out, e)) => continue,
                        _ => return Ok(None),
                    },
                },
                _ => return Ok(None),
            };
            if !push_extent(&mut out, ext) {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    fn allocates(&mut self, offset: u64, len: u64) -> bool {
        self.allocates_in(offset, len)
    }

    fn plan_cow(&mut self, offset: u64, len: u64) -> io::Result<Option<CowPlan>> {
        self.plan(offset, len)
    }

    fn commit_cow(&mut self, plan: &CowPlan) -> io::Result<()> {
        self.commit(plan)
    }

    fn abort_cow(&mut self, plan: &CowPlan) {
        self.give_back(&plan.clusters)
    }

    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        for (at, n) in self.pieces(offset, buf.len() as u64).collect::<Vec<_>>() {
            self.read_piece(at, &mut buf[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    fn write_sync(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        let mut done = 0usize;
        for (at, n) in self.pieces(offset, data.len() as u64).collect::<Vec<_>>() {
            self.write_piece(at, &data[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    fn zero_sync(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        for (at, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            self.zero_piece(at, n, unmap)?;
        }
        Ok(())
    }

    fn set_volatile_writes(&mut self, on: bool) {
        self.volatile_writes = on;
    }

    fn flush_metadata(&mut self) -> io::Result<()> {
        self.write_back()
    }

    fn sync(&mut self) -> io::Result<()> {
        self.write_back_and_sync()
    }

    fn trim_tail(&mut self) -> io::Result<()> {
        self.trim_fresh_tail()
    }
}
