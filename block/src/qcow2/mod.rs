//! qcow2 headers: reading with validation of hostile input. Creating images (empty or
//! preallocated): [`create()`] in `create.rs`. Guest data I/O: [`driver`].
//!
//! Spec: QEMU docs/interop/qcow2.txt.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::BlockError;

mod create;
pub mod driver;
pub mod hostile;

pub use create::{create, Qcow2CreateParams};
pub use driver::Qcow2Driver;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size (bits).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size (bits).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// QEMU's limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
const V3_HEADER_LEN: u32 = 104;
const V2_HEADER_LEN: u32 = 72;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table clusters.
    pub refcount_table_clusters: u32,
    /// Snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// Backing file name, as stored.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
    /// External data file name, when the image has one.
    pub data_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether the image is marked dirty (lazy refcounts, not closed cleanly).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether the image uses extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Read and validate the header of the image at `path`.
    pub fn read_path(path: &Path) -> Result<Qcow2Header, BlockError> {
        let mut f = File::open(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read(&mut f, path)
    }

    /// Read and validate the header from `file`; `path` names it in errors.
    pub fn read(file: &mut File, path: &Path) -> Result<Qcow2Header, BlockError> {
        let io = |source| BlockError::ImageIo {
            path: path.to_path_buf(),
            source,
        };
        let file_len = file.metadata().map_err(io)?.len();
        // The header, its extensions and the backing name all live in the first cluster.
        let want = file_len.min(1 << MAX_CLUSTER_BITS) as usize;
        let mut buf = vec![0u8; want];
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        Self::parse(&buf, file_len, path)
    }

    /// Validate `buf` (the start of the file, up to one maximal cluster) as a qcow2 header of a
    /// file `file_len` bytes long. Never panics on any input.
    pub fn parse(buf: &[u8], file_len: u64, path: &Path) -> Result<Qcow2Header, BlockError> {
        let bad = |reason: String| BlockError::InvalidQcow2 {
            path: path.to_path_buf(),
            reason,
        };
        let unsupported = |feature: String| BlockError::UnsupportedQcow2 {
            path: path.to_path_buf(),
            feature,
        };
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(bad(format!(
                "file too short for a header ({} bytes)",
                buf.len()
            )));
        }
        if be32(buf, 0) != QCOW2_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        let mut h = Qcow2Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            data_file: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(bad("file too short for a v3 header".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length % 8 != 0 {
                return Err(bad(format!("header_length {} invalid", h.header_length)));
            }
            if u64::from(h.header_length) > cluster.min(buf.len() as u64) {
                return Err(bad(format!(
                    "header_length {} larger than the first cluster",
                    h.header_length
                )));
            }
            let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(unsupported(format!(
                    "incompatible feature bits {unknown:#x}"
                )));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} > 6", h.refcount_order)));
        }
        // Guest size: QEMU caps it at 2^63 - 512 (and the L1 limit bounds it far below that).
        let l2_entries = cluster / 8;
        let bytes_per_l1 = cluster
            .checked_mul(l2_entries)
            .ok_or_else(|| bad("overflow".into()))?;
        let needed_l1 = h.size.div_ceil(bytes_per_l1);
        if u64::from(h.l1_size) < needed_l1 {
            return Err(bad(format!(
                "L1 table ({} entries) too small for virtual size {}",
                h.l1_size, h.size
            )));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {} entries is absurd", h.l1_size)));
        }
        let in_file = |what: &str, off: u64, len: u64| -> Result<(), BlockError> {
            if off == 0 {
                return Err(bad(format!("{what} overlaps the header")));
            }
            if off % cluster != 0 {
                return Err(bad(format!("{what} offset {off:#x} not cluster aligned")));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(bad(format!(
                    "{what} [{off:#x}, +{len:#x}) is past the end of the file ({file_len} bytes)"
                ))),
            }
        };
        if h.l1_size > 0 {
            in_file("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8)?;
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount table of {} clusters is absurd",
                h.refcount_table_clusters
            )));
        }
        in_file("refcount table", h.refcount_table_offset, rt_bytes)?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!("{} snapshots is absurd", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 {
            // Each snapshot header is at least 40 bytes.
            in_file(
                "snapshot table",
                h.snapshots_offset,
                u64::from(h.nb_snapshots) * 40,
            )?;
        }
        // Header extensions: between header_length and the end of the first cluster.
        let limit = (cluster as usize).min(buf.len());
        let backing_off = be64(buf, 8);
        let backing_len = be32(buf, 16);
        if version == 3 {
            let mut at = h.header_length as usize;
            loop {
                if at + 8 > limit {
                    return Err(bad("header extensions run past the first cluster".into()));
                }
                let typ = be32(buf, at);
                let len = be32(buf, at + 4) as usize;
                at += 8;
                if typ == EXT_END {
                    break;
                }
                let end = at.checked_add(len).filter(|&e| e <= limit).ok_or_else(|| {
                    bad(format!(
                        "header extension {typ:#x} runs past the first cluster"
                    ))
                })?;
                let data = &buf[at..end];
                match typ {
                    EXT_BACKING_FORMAT => {
                        h.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                    }
                    EXT_DATA_FILE => h.data_file = Some(String::from_utf8_lossy(data).into_owned()),
                    _ => {}
                }
                at = end.div_ceil(8) * 8;
            }
        }
        if backing_off != 0 {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(bad(format!(
                    "backing file name length {backing_len} invalid"
                )));
            }
            let end = backing_off
                .checked_add(u64::from(backing_len))
                .filter(|&e| e <= limit as u64)
                .ok_or_else(|| bad("backing file name outside the first cluster".into()))?;
            let name = &buf[backing_off as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
            return Err(bad("external data file bit set without its name".into()));
        }
        Ok(h)
    }
}

/// Resolve a backing file name relative to the image that names it, as QEMU does.
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        b.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(
        size: u64,
        cluster: u64,
        backing: Option<(&str, &str)>,
    ) -> (crate::testutil::TempDir, PathBuf) {
        create::tests::make(&Qcow2CreateParams {
            cluster_size: cluster,
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| b.1.to_string()),
            ..Qcow2CreateParams::new(size)
        })
    }

    /// Each hostile edit of a good header gives an error, never a panic.
    #[test]
    fn hostile_headers_are_rejected() {
        let (_d, p) = make(1 << 30, 65536, Some(("base.raw", "raw")));
        let good = std::fs::read(&p).unwrap();
        let len = good.len() as u64;
        let path = Path::new("x");
        type Edit = (&'static str, usize, Vec<u8>);
        let edits: Vec<Edit> = vec![
            ("magic", 0, vec![0, 0, 0, 0]),
            ("version", 4, 9u32.to_be_bytes().to_vec()),
            ("cluster_bits low", 20, 8u32.to_be_bytes().to_vec()),
            ("cluster_bits high", 20, 40u32.to_be_bytes().to_vec()),
            ("size huge", 24, u64::MAX.to_be_bytes().to_vec()),
            ("l1_size huge", 36, u32::MAX.to_be_bytes().to_vec()),
            ("l1 past eof", 40, (1u64 << 50).to_be_bytes().to_vec()),
            ("l1 unaligned", 40, 0x10001u64.to_be_bytes().to_vec()),
            (
                "reftable past eof",
                48,
                (len + 65536).to_be_bytes().to_vec(),
            ),
            (
                "reftable clusters absurd",
                56,
                u32::MAX.to_be_bytes().to_vec(),
            ),
            ("reftable zero", 56, 0u32.to_be_bytes().to_vec()),
            ("backing offset wild", 8, u64::MAX.to_be_bytes().to_vec()),
            ("backing len huge", 16, 5000u32.to_be_bytes().to_vec()),
            ("unknown incompat", 72, (1u64 << 40).to_be_bytes().to_vec()),
            ("refcount order", 96, 7u32.to_be_bytes().to_vec()),
            ("header length small", 100, 8u32.to_be_bytes().to_vec()),
            ("header length huge", 100, u32::MAX.to_be_bytes().to_vec()),
            (
                "extension length wild",
                108,
                u32::MAX.to_be_bytes().to_vec(),
            ),
            ("snapshots at the header", 60, [0, 0, 0, 1].to_vec()),
            ("snapshots absurd", 60, u32::MAX.to_be_bytes().to_vec()),
            ("l1 at the header", 40, 0u64.to_be_bytes().to_vec()),
            ("reftable at the header", 48, 0u64.to_be_bytes().to_vec()),
        ];
        for (name, at, bytes) in edits {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let r = Qcow2Header::parse(&b, len, path);
            assert!(r.is_err(), "{name} accepted: {r:?}");
        }
        // Truncations at every interesting length.
        for cut in [0, 4, 20, 71, 72, 103, 104, 110] {
            assert!(
                Qcow2Header::parse(&good[..cut], len, path).is_err(),
                "cut {cut}"
            );
        }
    }

    /// Random bytes after a valid magic and version never panic.
    #[test]
    fn random_headers_never_panic() {
        let mut rng = crate::testutil::Rng::new(7);
        for _ in 0..20_000 {
            let n = rng.below(600) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if b.len() >= 8 {
                b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&(2 + (rng.next() & 1) as u32).to_be_bytes());
            }
            if b.len() >= 24 && rng.next() & 1 == 0 {
                b[20..24].copy_from_slice(&(9 + rng.below(13) as u32).to_be_bytes());
            }
            let _ = Qcow2Header::parse(&b, rng.next() >> rng.below(64), Path::new("x"));
        }
    }
}
