//! Creating qcow2 v3 images (refcount order 4): empty, or with every guest cluster
//! preallocated (`preallocation=metadata|falloc|full`, as qemu-img means them).
//!
//! Layout, cluster size C; every region starts on a cluster boundary and the regions follow
//! one another with no gaps:
//!
//! ```text
//!  0        header (104 bytes) · extensions (backing format) · backing file name
//!  rt_off   refcount table   rt clusters, one 8-byte entry per refcount block
//!  rb_off   refcount blocks  rb clusters, C*8/16 16-bit counts each, covering every cluster
//!                            of the file (counts 1 for [0, total), 0 after)
//!  l1_off   L1 table         ceil(l1_size*8 / C) clusters
//!  ---- preallocated images only ----
//!  l2_off   L2 tables        one per L1 entry, contiguous: guest cluster k's entry sits at
//!                            l2_off + 8k, so the L2 region is written as one stream
//!  data_off data clusters    guest cluster k at data_off + k*C (contiguous in guest order,
//!                            so any guest range maps to one host range: the engine path)
//! ```
//!
//! Metadata preallocation points every L2 entry at its data cluster with COPIED set and
//! refcount 1, and makes the file long enough to hold the data without writing it: a sparse
//! file reads as zeroes, so the image reads as zeroes and writes never allocate. `falloc`
//! additionally reserves the data area with fallocate, `full` writes zeroes over it.
//!
//! The refcount table and blocks count themselves, so their sizes are a fixed point: start
//! from one of each and grow until the counts cover everything including themselves.
//!
//! Large images are written in bounded chunks ([`CHUNK`]): a 1 TiB image with 64 KiB
//! clusters has 128 MiB of L2 tables and 32 MiB of refcount blocks.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    EXT_BACKING_FORMAT, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS, QCOW2_MAGIC, V3_HEADER_LEN,
};
use crate::img::{fallocate_range, write_zeroes, Preallocation};
use crate::BlockError;

/// L2 entry flag: the cluster's refcount is exactly one (writable in place).
const COPIED: u64 = 1 << 63;
/// Refcount width written by [`create`]: 2^4 = 16 bits.
const REFCOUNT_ORDER: u32 = 4;
/// Highest host offset an L2 entry can hold (bits 9..55).
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Bytes generated and written at a time for the refcount block and L2 regions.
const CHUNK: u64 = 1 << 20;

/// What [`create`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2CreateParams {
    /// Virtual size.
    pub size: u64,
    /// Cluster size (power of two, 512 .. 2 MiB).
    pub cluster_size: u64,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing format name.
    pub backing_format: Option<String>,
    /// What to allocate up front.
    pub preallocation: Preallocation,
}

impl Qcow2CreateParams {
    /// A sparse image of `size` bytes with the default cluster size and no backing file.
    pub fn new(size: u64) -> Qcow2CreateParams {
        Qcow2CreateParams {
            size,
            cluster_size: super::DEFAULT_CLUSTER_SIZE,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
        }
    }
}

/// Where everything goes, in clusters unless named `_off` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    cluster: u64,
    l1_size: u64,
    rt_off: u64,
    rt_clusters: u64,
    rb_off: u64,
    rb_count: u64,
    l1_off: u64,
    l2_off: u64,
    l2_count: u64,
    data_off: u64,
    data_clusters: u64,
    /// Clusters in the file; all of them have refcount 1.
    total: u64,
}

impl Layout {
    /// Lay out an image of `size` bytes; `prealloc` adds every L2 table and data cluster.
    /// `Err` says why the combination is impossible.
    fn new(size: u64, cluster: u64, prealloc: bool) -> Result<Layout, String> {
        let l2_entries = cluster / 8;
        let l1_size = size.div_ceil(cluster * l2_entries).max(1);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(format!(
                "size {size} too large for cluster_size {cluster} (L1 table over {MAX_L1_BYTES} bytes); use a larger cluster_size"
            ));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cluster);
        let (data_clusters, l2_count) = if prealloc {
            let d = size.div_ceil(cluster);
            (d, d.div_ceil(l2_entries))
        } else {
            (0, 0)
        };
        // Bounded above by the L1 limit: at most 2^22 L2 tables of 2^18 entries.
        let fixed = 1 + l1_clusters + l2_count + data_clusters;
        let refs_per_block = cluster * 8 / (1 << REFCOUNT_ORDER);
        let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
        loop {
            let total = fixed + rt_clusters + rb_count;
            let rb = total.div_ceil(refs_per_block);
            let rt = (rb * 8).div_ceil(cluster);
            if rb == rb_count && rt == rt_clusters {
                break;
            }
            // Both only grow, so this converges (in a handful of rounds).
            rb_count = rb.max(rb_count);
            rt_clusters = rt.max(rt_clusters);
        }
        if rt_clusters * cluster > MAX_REFTABLE_BYTES {
            return Err(format!(
                "size {size} needs a refcount table over {MAX_REFTABLE_BYTES} bytes at cluster_size {cluster}; use a larger cluster_size"
            ));
        }
        let total = fixed + rt_clusters + rb_count;
        let fits = matches!(total.checked_mul(cluster), Some(end) if end <= MAX_HOST_OFFSET);
        if !fits {
            return Err(format!(
                "size {size} preallocated needs more than {MAX_HOST_OFFSET} bytes of file"
            ));
        }
        let rt_off = cluster;
        let rb_off = rt_off + rt_clusters * cluster;
        let l1_off = rb_off + rb_count * cluster;
        let l2_off = l1_off + l1_clusters * cluster;
        let data_off = l2_off + l2_count * cluster;
        Ok(Layout {
            cluster,
            l1_size,
            rt_off,
            rt_clusters,
            rb_off,
            rb_count,
            l1_off,
            l2_off,
            l2_count,
            data_off,
            data_clusters,
            total,
        })
    }

    fn file_len(&self) -> u64 {
        self.total * self.cluster
    }
}

/// The header cluster: header, extensions, backing file name.
fn header_cluster(p: &Qcow2CreateParams, l: &Layout) -> Result<Vec<u8>, BlockError> {
    let cluster = l.cluster;
    let mut hdr = vec![0u8; cluster as usize];
    let mut ext = Vec::new();
    if let Some(fmt) = &p.backing_format {
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        ext.extend_from_slice(fmt.as_bytes());
        ext.resize(ext.len().div_ceil(8) * 8, 0);
    }
    ext.extend_from_slice(&[0u8; 8]); // end of extensions
    let backing_off = V3_HEADER_LEN as usize + ext.len();
    let backing = p.backing_file.as_deref().unwrap_or("").as_bytes();
    if backing_off + backing.len() > cluster as usize {
        return Err(BlockError::CreateOptions(
            "backing file name does not fit in the header cluster; use a larger cluster_size"
                .into(),
        ));
    }
    put32(&mut hdr, 0, QCOW2_MAGIC);
    put32(&mut hdr, 4, 3);
    if !backing.is_empty() {
        put64(&mut hdr, 8, backing_off as u64);
        put32(&mut hdr, 16, backing.len() as u32);
    }
    put32(&mut hdr, 20, cluster.trailing_zeros());
    put64(&mut hdr, 24, p.size);
    put32(&mut hdr, 32, 0);
    put32(&mut hdr, 36, l.l1_size as u32);
    put64(&mut hdr, 40, l.l1_off);
    put64(&mut hdr, 48, l.rt_off);
    put32(&mut hdr, 56, l.rt_clusters as u32);
    put32(&mut hdr, 96, REFCOUNT_ORDER);
    put32(&mut hdr, 100, V3_HEADER_LEN);
    hdr[V3_HEADER_LEN as usize..backing_off].copy_from_slice(&ext);
    hdr[backing_off..backing_off + backing.len()].copy_from_slice(backing);
    Ok(hdr)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Write `count` big-endian entries of `width` bytes (2 or 8) at `off`, entry `k` being
/// `value(k)`, [`CHUNK`] bytes at a time.
fn write_entries(
    file: &File,
    off: u64,
    count: u64,
    width: u64,
    value: impl Fn(u64) -> u64,
) -> std::io::Result<()> {
    let per_chunk = CHUNK / width;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut k = 0;
    while k < count {
        let n = (count - k).min(per_chunk);
        let bytes = &mut buf[..(n * width) as usize];
        for (i, e) in bytes.chunks_exact_mut(width as usize).enumerate() {
            let v = value(k + i as u64);
            e.copy_from_slice(&v.to_be_bytes()[(8 - width) as usize..]);
        }
        file.write_all_at(bytes, off + k * width)?;
        k += n;
    }
    Ok(())
}

/// Write a qcow2 v3 image to `file` (truncating it), preallocated as `p.preallocation` asks.
pub fn create(file: &mut File, path: &Path, p: &Qcow2CreateParams) -> Result<(), BlockError> {
    let opt = BlockError::CreateOptions;
    if !p.cluster_size.is_power_of_two()
        || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&p.cluster_size)
    {
        return Err(opt(format!(
            "cluster_size {} must be a power of two between 512 and 2M",
            p.cluster_size
        )));
    }
    if let Some(b) = &p.backing_file {
        if b.is_empty() || b.len() > MAX_BACKING_NAME as usize {
            return Err(opt("backing file name must be 1..1023 bytes".into()));
        }
        if p.preallocation != Preallocation::Off {
            // qemu-img refuses this too unless extended_l2=on, which we do not support:
            // a preallocated cluster would hide the backing file's data.
            return Err(opt(
                "preallocation with a backing file needs extended L2 entries (extended_l2=on), which are not supported; use preallocation=off"
                    .into(),
            ));
        }
    }
    let prealloc = p.preallocation != Preallocation::Off;
    let l = Layout::new(p.size, p.cluster_size, prealloc).map_err(opt)?;
    let hdr = header_cluster(p, &l)?;

    let io = |source| BlockError::ImageIo {
        path: path.to_path_buf(),
        source,
    };
    let c = l.cluster;
    file.set_len(0).map_err(io)?;
    file.set_len(l.file_len()).map_err(io)?;
    write_entries(file, l.rt_off, l.rb_count, 8, |i| l.rb_off + i * c).map_err(io)?;
    let refs_per_block = c * 8 / (1 << REFCOUNT_ORDER);
    write_entries(file, l.rb_off, l.rb_count * refs_per_block, 2, |k| {
        u64::from(k < l.total)
    })
    .map_err(io)?;
    write_entries(file, l.l1_off, l.l2_count, 8, |i| {
        (l.l2_off + i * c) | COPIED
    })
    .map_err(io)?;
    write_entries(file, l.l2_off, l.data_clusters, 8, |k| {
        (l.data_off + k * c) | COPIED
    })
    .map_err(io)?;
    let data_len = l.data_clusters * c;
    match p.preallocation {
        Preallocation::Off | Preallocation::Metadata => {}
        Preallocation::Falloc => fallocate_range(file, l.data_off, data_len).map_err(io)?,
        Preallocation::Full => write_zeroes(file, l.data_off, data_len).map_err(io)?,
    }
    // The header last: until it is written the file is not a qcow2 image at all.
    file.write_all_at(&hdr, 0).map_err(io)?;
    file.flush().map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::qcow2::Qcow2Header;
    use crate::testutil::TempDir;

    /// Create `p` as `a.qcow2` in a new temporary directory.
    pub(crate) fn make(p: &Qcow2CreateParams) -> (TempDir, PathBuf) {
        let d = TempDir::new("qcow2");
        let path = d.path().join("a.qcow2");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        create(&mut f, &path, p).unwrap();
        (d, path)
    }

    fn params(size: u64, cluster: u64) -> Qcow2CreateParams {
        Qcow2CreateParams {
            cluster_size: cluster,
            ..Qcow2CreateParams::new(size)
        }
    }

    #[test]
    fn created_header_reads_back() {
        let (_d, p) = make(&Qcow2CreateParams {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Qcow2CreateParams::new(10 << 30)
        });
        let h = Qcow2Header::read_path(&p).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 10 << 30);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.l1_size, 20);
    }

    #[test]
    fn small_clusters_need_many_refcount_blocks() {
        let (_d, p) = make(&params(1 << 30, 512));
        let h = Qcow2Header::read_path(&p).unwrap();
        assert_eq!(h.cluster_bits, 9);
        assert_eq!(h.l1_size, 32768);
    }

    #[test]
    fn bad_cluster_sizes_are_refused() {
        let d = TempDir::new("qcow2");
        let p = d.path().join("x");
        let mut f = File::create(&p).unwrap();
        for c in [0, 256, 3000, 4 << 20] {
            let r = create(&mut f, &p, &params(1 << 20, c));
            assert!(matches!(r, Err(BlockError::CreateOptions(_))), "{c}");
        }
    }

    /// Every layout covers every cluster it uses with refcounts, including the refcount
    /// structures themselves, and places regions back to back.
    #[test]
    fn layouts_cover_themselves() {
        for cluster in [512u64, 4096, 65536, 2 << 20] {
            for size in [0u64, 1, 512, 12345 * 512, 1 << 30, 100 << 30, 1 << 40] {
                for prealloc in [false, true] {
                    let Ok(l) = Layout::new(size, cluster, prealloc) else {
                        continue;
                    };
                    let refs_per_block = cluster * 8 / 16;
                    assert!(l.rb_count * refs_per_block >= l.total, "{l:?}");
                    assert!(l.rt_clusters * cluster / 8 >= l.rb_count, "{l:?}");
                    assert!(l.l1_size * (cluster / 8) * cluster >= size, "{l:?}");
                    if prealloc {
                        assert_eq!(l.data_off + l.data_clusters * cluster, l.file_len());
                        assert!(l.data_clusters * cluster >= size);
                        assert!(l.l2_count * (cluster / 8) >= l.data_clusters);
                    } else {
                        assert_eq!(l.l2_off, l.file_len());
                    }
                }
            }
        }
        // 2 TiB at 512-byte clusters does not fit QEMU's table limits.
        assert!(Layout::new(2 << 40, 512, true).is_err());
        assert!(Layout::new(1 << 40, 65536, true).is_ok());
    }

    #[test]
    fn preallocation_with_backing_file_is_refused() {
        let d = TempDir::new("qcow2");
        let p = d.path().join("x");
        let mut f = File::create(&p).unwrap();
        let r = create(
            &mut f,
            &p,
            &Qcow2CreateParams {
                backing_file: Some("b".into()),
                preallocation: Preallocation::Metadata,
                ..Qcow2CreateParams::new(1 << 20)
            },
        );
        assert!(matches!(r, Err(BlockError::CreateOptions(_))), "{r:?}");
    }
}
