//! `platter img create` and `platter img info`: image creation and inspection that
//! interoperate with QEMU's tools.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::options::Format;
use crate::qcow2::{self, Qcow2CreateParams, Qcow2Header, QCOW2_MAGIC};
use crate::BlockError;

/// Deepest backing chain `info` follows (and, later, `open_disk` accepts).
pub const MAX_BACKING_CHAIN: usize = 16;

/// `-o preallocation=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse.
    #[default]
    Off,
    /// qcow2 only: every L1/L2 table, refcount block and data cluster allocated, the file
    /// extended over the data but the data not written (sparse).
    Metadata,
    /// Space reserved with fallocate (qcow2: metadata as above, then the data area).
    Falloc,
    /// Every byte written (qcow2: metadata as above, then zeroes over the data area).
    Full,
}

impl FromStr for Preallocation {
    type Err = BlockError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(BlockError::CreateOptions(format!(
                    "preallocation {s:?}: expected off|metadata|falloc|full"
                )))
            }
        })
    }
}

/// `-o` options of `img create`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateOptions {
    /// preallocation=
    pub preallocation: Preallocation,
    /// cluster_size= (qcow2; default 64 KiB)
    pub cluster_size: Option<u64>,
    /// backing_file= (qcow2)
    pub backing_file: Option<String>,
    /// backing_fmt= (qcow2)
    pub backing_format: Option<Format>,
}

impl CreateOptions {
    /// Parse a `-o` string: `key=value[,key=value...]`. Sizes accept k/M/G suffixes.
    pub fn parse(s: &str) -> Result<CreateOptions, BlockError> {
        let mut o = CreateOptions::default();
        for kv in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| BlockError::CreateOptions(format!("{kv:?} is not key=value")))?;
            match k {
                "preallocation" => o.preallocation = v.parse()?,
                "cluster_size" => o.cluster_size = Some(parse_size(v)?),
                "backing_file" => o.backing_file = Some(v.to_string()),
                "backing_fmt" => {
                    o.backing_format = Some(
                        v.parse()
                            .map_err(|e: crate::ParseOptionError| BlockError::CreateOptions(e.to_string()))?,
                    )
                }
                _ => {
                    return Err(BlockError::CreateOptions(format!(
                        "unknown option {k:?}; known: preallocation, cluster_size, backing_file, backing_fmt"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Parse `1G`, `512M`, `64k`, `4096` (binary units, like qemu-img).
pub fn parse_size(s: &str) -> Result<u64, BlockError> {
    let bad = || {
        BlockError::CreateOptions(format!(
            "size {s:?}: expected a number with optional k/M/G/T suffix"
        ))
    };
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Create an image of `size` bytes. Like qemu-img, an existing file is truncated; the CLI
/// asks before overwriting. Options are checked before the file is touched.
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    opts: &CreateOptions,
) -> Result<(), BlockError> {
    check_create_options(path, format, opts)?;
    let io = |source| BlockError::ImageIo {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    match format {
        Format::Raw => {
            file.set_len(size).map_err(io)?;
            match opts.preallocation {
                Preallocation::Off | Preallocation::Metadata => {}
                Preallocation::Falloc => fallocate_range(&file, 0, size).map_err(io)?,
                Preallocation::Full => write_zeroes(&file, 0, size).map_err(io)?,
            }
            file.sync_all().map_err(io)?;
        }
        Format::Qcow2 => qcow2::create(
            &mut file,
            path,
            &Qcow2CreateParams {
                size,
                cluster_size: opts.cluster_size.unwrap_or(qcow2::DEFAULT_CLUSTER_SIZE),
                backing_file: opts.backing_file.clone(),
                backing_format: opts.backing_format.map(|f| f.to_string()),
                preallocation: opts.preallocation,
            },
        )?,
    }
    Ok(())
}

/// Refuse option combinations that make no sense for `format`, as qemu-img does.
fn check_create_options(
    path: &Path,
    format: Format,
    opts: &CreateOptions,
) -> Result<(), BlockError> {
    let refuse = |m: &str| Err(BlockError::CreateOptions(m.into()));
    match format {
        Format::Raw => {
            if opts.backing_file.is_some() || opts.backing_format.is_some() {
                return refuse("raw images have no backing file");
            }
            if opts.cluster_size.is_some() {
                return refuse("raw images have no cluster size");
            }
            if opts.preallocation == Preallocation::Metadata {
                return refuse("preallocation=metadata is for qcow2; raw accepts off|falloc|full");
            }
        }
        Format::Qcow2 => {
            if opts.backing_format.is_some() && opts.backing_file.is_none() {
                return refuse("backing_fmt without backing_file");
            }
            if let Some(b) = &opts.backing_file {
                if opts.preallocation != Preallocation::Off {
                    // qemu-img 7.2: "Backing file and preallocation can only be used at the
                    // same time if extended_l2 is on"; we have no extended L2 entries.
                    return refuse(
                        "preallocation with a backing file needs extended L2 entries (extended_l2=on), which are not supported; use preallocation=off",
                    );
                }
                let bp = qcow2::resolve_backing(path, b);
                if !bp.exists() {
                    return Err(BlockError::CreateOptions(format!(
                        "backing file {} does not exist",
                        bp.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Reserve `[off, off+len)` of `file` with fallocate (extending it if needed).
pub(crate) fn fallocate_range(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    use std::os::fd::AsRawFd;
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate64(file.as_raw_fd(), 0, o, l) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write `len` zero bytes at `at`, a megabyte at a time.
pub(crate) fn write_zeroes(file: &File, mut at: u64, len: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK as usize];
    let end = at + len;
    while at < end {
        let n = (end - at).min(CHUNK) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Detect the format of the image at `path` by magic; anything unknown is raw.
pub fn probe_format(path: &Path) -> Result<Format, BlockError> {
    let mut f = File::open(path).map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(BlockError::ImageIo {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(if got == 4 && u32::from_be_bytes(magic) == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// What `img info` reports about one image (and its backing chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image as named.
    pub path: PathBuf,
    /// Detected format.
    pub format: Format,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Host space used (st_blocks * 512).
    pub allocated_size: u64,
    /// qcow2: cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2: header version (2 → compat 0.10, 3 → compat 1.1).
    pub qcow2_version: Option<u32>,
    /// qcow2 v3: refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// qcow2: image marked corrupt.
    pub corrupt: bool,
    /// qcow2: image marked dirty (lazy refcounts, not closed cleanly).
    pub dirty: bool,
    /// Backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// Backing format as stored in the image.
    pub backing_format: Option<String>,
    /// The backing images, nearest first.
    pub backing_chain: Vec<ImageInfo>,
}

/// Inspect the image at `path`, following its backing chain (at most [`MAX_BACKING_CHAIN`]).
pub fn info(path: &Path) -> Result<ImageInfo, BlockError> {
    let mut top = info_one(path)?;
    let mut chain = Vec::new();
    let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut cur = top.clone();
    while let Some(b) = cur.backing_file.clone() {
        if chain.len() >= MAX_BACKING_CHAIN {
            return Err(BlockError::ChainTooDeep {
                path: path.to_path_buf(),
                limit: MAX_BACKING_CHAIN,
            });
        }
        let bp = qcow2::resolve_backing(&cur.path, &b);
        let canon = std::fs::canonicalize(&bp).unwrap_or_else(|_| bp.clone());
        if seen.contains(&canon) {
            return Err(BlockError::ChainTooDeep {
                path: path.to_path_buf(),
                limit: MAX_BACKING_CHAIN,
            });
        }
        seen.push(canon);
        let next = info_one(&bp)?;
        chain.push(next.clone());
        cur = next;
    }
    top.backing_chain = chain;
    Ok(top)
}

fn info_one(path: &Path) -> Result<ImageInfo, BlockError> {
    let format = probe_format(path)?;
    let meta = std::fs::metadata(path).map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut info = ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size: meta.len(),
        allocated_size: meta.blocks() * 512,
        cluster_size: None,
        qcow2_version: None,
        refcount_bits: None,
        corrupt: false,
        dirty: false,
        backing_file: None,
        backing_format: None,
        backing_chain: Vec::new(),
    };
    if format == Format::Qcow2 {
        let h = Qcow2Header::read_path(path)?;
        info.virtual_size = h.size;
        info.cluster_size = Some(h.cluster_size());
        info.qcow2_version = Some(h.version);
        info.refcount_bits = Some(1 << h.refcount_order);
        info.corrupt = h.is_corrupt();
        info.dirty = h.is_dirty();
        info.backing_file = h.backing_file;
        info.backing_format = h.backing_format;
    }
    Ok(info)
}

/// `1 GiB`, `196 KiB`, `512 B`, the way qemu-img prints sizes.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {}", UNITS[u])
}

/// qemu-img's name for a qcow2 header version ("compat" in `qemu-img info`).
pub fn compat(version: u32) -> &'static str {
    if version == 2 {
        "0.10"
    } else {
        "1.1"
    }
}

impl fmt::Display for ImageInfo {
    /// Like `qemu-img info --backing-chain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image: {}", self.path.display())?;
        writeln!(f, "file format: {}", self.format)?;
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            human_size(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(f, "disk size: {}", human_size(self.allocated_size))?;
        if let Some(c) = self.cluster_size {
            writeln!(f, "cluster_size: {c}")?;
        }
        if let Some(b) = &self.backing_file {
            let resolved = qcow2::resolve_backing(&self.path, b);
            if Path::new(b).is_absolute() {
                writeln!(f, "backing file: {b}")?;
            } else {
                writeln!(f, "backing file: {b} (actual path: {})", resolved.display())?;
            }
        }
        if let Some(bf) = &self.backing_format {
            writeln!(f, "backing file format: {bf}")?;
        }
        if let Some(v) = self.qcow2_version {
            writeln!(f, "Format specific information:")?;
            writeln!(f, "    compat: {}", compat(v))?;
            if let Some(r) = self.refcount_bits {
                writeln!(f, "    refcount bits: {r}")?;
            }
            writeln!(f, "    corrupt: {}", self.corrupt)?;
        }
        for b in &self.backing_chain {
            writeln!(f)?;
            let mut b = b.clone();
            b.backing_chain.clear();
            write!(f, "{b}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{qemu_img, qemu_read_qcow2, run_ok, TempDir};

    #[test]
    fn sizes_parse_and_print_like_qemu_img() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(100), "100 B");
    }

    #[test]
    fn create_options_parse_and_reject() {
        let o = CreateOptions::parse(
            "preallocation=falloc,cluster_size=128k,backing_file=b.img,backing_fmt=raw",
        )
        .unwrap();
        assert_eq!(o.preallocation, Preallocation::Falloc);
        assert_eq!(o.cluster_size, Some(131072));
        assert_eq!(o.backing_format, Some(Format::Raw));
        assert!(CreateOptions::parse("preallocation=some").is_err());
        assert!(CreateOptions::parse("compression=zstd").is_err());
        assert!(CreateOptions::parse("backing_fmt=vmdk").is_err());
        assert!(CreateOptions::parse("cluster_size").is_err());
    }

    #[test]
    fn raw_create_and_info() {
        let d = TempDir::new("img");
        let sparse = d.path().join("s.raw");
        create(&sparse, Format::Raw, 64 << 20, &CreateOptions::default()).unwrap();
        let i = info(&sparse).unwrap();
        assert_eq!((i.format, i.virtual_size), (Format::Raw, 64 << 20));
        assert!(
            i.allocated_size < 1 << 20,
            "sparse image allocated {}",
            i.allocated_size
        );
        let full = d.path().join("f.raw");
        let o = CreateOptions {
            preallocation: Preallocation::Full,
            ..Default::default()
        };
        create(&full, Format::Raw, 4 << 20, &o).unwrap();
        assert!(info(&full).unwrap().allocated_size >= 4 << 20);
        let fa = d.path().join("fa.raw");
        let o = CreateOptions {
            preallocation: Preallocation::Falloc,
            ..Default::default()
        };
        create(&fa, Format::Raw, 4 << 20, &o).unwrap();
        assert!(info(&fa).unwrap().allocated_size >= 4 << 20);
        let o = CreateOptions {
            preallocation: Preallocation::Metadata,
            ..Default::default()
        };
        assert!(create(&fa, Format::Raw, 4 << 20, &o).is_err());
        // Refused before the existing image was truncated.
        assert!(info(&fa).unwrap().allocated_size >= 4 << 20);
    }

    #[test]
    fn qcow2_chain_info() {
        let d = TempDir::new("img");
        let base = d.path().join("base.raw");
        create(&base, Format::Raw, 1 << 20, &CreateOptions::default()).unwrap();
        let top = d.path().join("top.qcow2");
        let o = CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            cluster_size: Some(4096),
            ..Default::default()
        };
        create(&top, Format::Qcow2, 1 << 20, &o).unwrap();
        let i = info(&top).unwrap();
        assert_eq!(i.format, Format::Qcow2);
        assert_eq!(i.cluster_size, Some(4096));
        assert_eq!(i.backing_chain.len(), 1);
        assert_eq!(i.backing_chain[0].format, Format::Raw);
        let text = i.to_string();
        assert!(
            text.contains("virtual size: 1 MiB (1048576 bytes)"),
            "{text}"
        );
        assert!(text.contains("backing file format: raw"), "{text}");
        // A loop: the image names itself.
        let looped = d.path().join("loop.qcow2");
        let o = CreateOptions {
            backing_file: Some("base.raw".into()),
            ..Default::default()
        };
        create(&looped, Format::Qcow2, 1 << 20, &o).unwrap();
        let mut b = std::fs::read(&looped).unwrap();
        let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
        b[off..off + 8].copy_from_slice(b"loop.qco");
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        std::fs::write(d.path().join("loop.qco"), &b).unwrap();
        assert!(matches!(
            info(&d.path().join("loop.qco")),
            Err(BlockError::ChainTooDeep { .. })
        ));
        assert!(create(
            &d.path().join("x"),
            Format::Qcow2,
            1 << 20,
            &CreateOptions {
                backing_file: Some("missing".into()),
                ..Default::default()
            }
        )
        .is_err());
    }

    fn qemu_json(qemu_img: &Path, args: &[&str], path: &Path) -> String {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.push(path.as_os_str());
        run_ok(qemu_img, &all)
    }

    #[test]
    fn qemu_img_accepts_our_images() {
        let Some(q) = qemu_img() else { return };
        let d = TempDir::new("interop");
        let base = d.path().join("base.raw");
        create(&base, Format::Raw, 8 << 20, &CreateOptions::default()).unwrap();
        for (cluster, size) in [
            (65536u64, 10u64 << 30),
            (512, 64 << 20),
            (2 << 20, 3 << 30),
            (4096, 12345 * 512),
        ] {
            let p = d.path().join(format!("c{cluster}.qcow2"));
            let o = CreateOptions {
                cluster_size: Some(cluster),
                backing_file: Some("base.raw".into()),
                backing_format: Some(Format::Raw),
                ..Default::default()
            };
            create(&p, Format::Qcow2, size, &o).unwrap();
            qemu_json(&q, &["check", "-f", "qcow2"], &p);
            let j = qemu_json(&q, &["info", "--output=json", "-f", "qcow2"], &p);
            assert!(j.contains(&format!("\"virtual-size\": {size}")), "{j}");
            assert!(j.contains(&format!("\"cluster-size\": {cluster}")), "{j}");
            assert!(j.contains("\"backing-filename\": \"base.raw\""), "{j}");
            assert!(j.contains("\"backing-filename-format\": \"raw\""), "{j}");
            // qemu-io writes through our image; check again.
            qemu_json(&q, &["amend", "-f", "qcow2", "-o", "lazy_refcounts=on"], &p);
            qemu_json(&q, &["check", "-f", "qcow2"], &p);
        }
    }

    const PREALLOCATED: [Preallocation; 3] = [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ];

    /// Preallocated qcow2 images at the extreme cluster sizes and sizes that are not a
    /// multiple of the cluster: qemu-img finds no errors, reads them as zeroes (compare with
    /// an empty raw image), maps every byte to data, and the data area is sparse only for
    /// `metadata`.
    #[test]
    fn qcow2_preallocation_passes_qemu_img() {
        let Some(q) = qemu_img() else { return };
        let d = TempDir::new("prealloc");
        for (cluster, size) in [
            (65536u64, 5 << 20),
            (512, (3 << 20) + 512),
            (2 << 20, (6 << 20) + 4096),
            (4096, 12345 * 512),
        ] {
            let raw = d.path().join(format!("empty{size}.raw"));
            create(&raw, Format::Raw, size, &CreateOptions::default()).unwrap();
            for mode in PREALLOCATED {
                let p = d.path().join(format!("{mode:?}{cluster}.qcow2"));
                let o = CreateOptions {
                    cluster_size: Some(cluster),
                    preallocation: mode,
                    ..Default::default()
                };
                create(&p, Format::Qcow2, size, &o).unwrap();
                let check = qemu_json(&q, &["check", "-f", "qcow2"], &p);
                assert!(check.contains("No errors"), "{mode:?} {cluster}: {check}");
                let j = qemu_json(&q, &["info", "--output=json", "-f", "qcow2"], &p);
                assert!(j.contains(&format!("\"virtual-size\": {size}")), "{j}");
                run_ok(
                    &q,
                    &[
                        "compare".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-F".as_ref(),
                        "raw".as_ref(),
                        p.as_os_str(),
                        raw.as_os_str(),
                    ],
                );
                let map = qemu_json(&q, &["map", "--output=json", "-f", "qcow2"], &p);
                assert!(
                    !map.contains("\"data\": false"),
                    "{mode:?} {cluster}: {map}"
                );
                let used = info(&p).unwrap().allocated_size;
                match mode {
                    Preallocation::Metadata => assert!(used < size, "{cluster}: {used}"),
                    _ => assert!(used >= size, "{mode:?} {cluster}: {used}"),
                }
            }
        }
    }

    /// qemu-img 7.2 refuses preallocation with a backing file (without extended_l2); so do we,
    /// and before touching an existing file of that name.
    #[test]
    fn qcow2_preallocation_with_backing_file_is_refused() {
        let d = TempDir::new("prealloc");
        let base = d.path().join("base.raw");
        create(&base, Format::Raw, 1 << 20, &CreateOptions::default()).unwrap();
        let top = d.path().join("top.qcow2");
        std::fs::write(&top, b"keep me").unwrap();
        for mode in PREALLOCATED {
            let o = CreateOptions {
                preallocation: mode,
                backing_file: Some("base.raw".into()),
                ..Default::default()
            };
            let r = create(&top, Format::Qcow2, 1 << 20, &o);
            assert!(matches!(r, Err(BlockError::CreateOptions(_))), "{r:?}");
        }
        assert_eq!(std::fs::read(&top).unwrap(), b"keep me");
    }

    /// Our driver on a preallocated image: reads zeroes, every write is a plain data write
    /// (the whole disk maps to one host range, file length and metadata bytes unchanged), and
    /// what was written reads back here and through qemu-img afterwards.
    #[test]
    fn qcow2_preallocated_writes_do_not_allocate() {
        use crate::format::FormatDriver;
        use crate::qcow2::driver::DEFAULT_L2_CACHE_SIZE;
        use crate::qcow2::Qcow2Driver;
        let d = TempDir::new("prealloc");
        let mut rng = crate::testutil::Rng::new(11);
        for (cluster, size, mode) in [
            (512u64, (2 << 20) + 1536, Preallocation::Metadata),
            (4096, 3 << 20, Preallocation::Falloc),
            (65536, (4 << 20) + 512, Preallocation::Full),
        ] {
            let p = d.path().join(format!("w{cluster}.qcow2"));
            let o = CreateOptions {
                cluster_size: Some(cluster),
                preallocation: mode,
                ..Default::default()
            };
            create(&p, Format::Qcow2, size, &o).unwrap();
            let before = std::fs::read(&p).unwrap();
            let file = OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut drv = Qcow2Driver::open(&p, file, false, DEFAULT_L2_CACHE_SIZE, 1, 0).unwrap();
            let data_off = drv.map(0, size, true).unwrap().expect("one host range");
            let mut all = vec![0xffu8; size as usize];
            drv.read_sync(0, &mut all).unwrap();
            assert!(all.iter().all(|&b| b == 0), "{cluster}: not zeroes");
            let mut model = vec![0u8; size as usize];
            for _ in 0..64 {
                let len = 1 + rng.below(3 * cluster) as usize;
                let off = rng.below(size - len as u64);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                assert_eq!(
                    drv.map(off, len as u64, true).unwrap(),
                    Some(data_off + off)
                );
                drv.write_sync(off, &data).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            drv.sync().unwrap();
            drv.read_sync(0, &mut all).unwrap();
            assert!(all == model, "{cluster}: read back differs");
            drop(drv);
            let after = std::fs::read(&p).unwrap();
            assert_eq!(after.len(), before.len(), "{cluster}: file grew");
            let meta = data_off as usize;
            assert!(
                after[..meta] == before[..meta],
                "{cluster}: metadata changed"
            );
            assert!(
                after[meta..meta + model.len()] == model[..],
                "{cluster}: data placement"
            );
            let Some(q) = qemu_img() else { continue };
            qemu_json(&q, &["check", "-f", "qcow2"], &p);
            assert!(
                qemu_read_qcow2(&q, &p) == model,
                "{cluster}: qemu-img reads other data"
            );
        }
    }

    #[test]
    fn we_read_qemu_img_images() {
        let Some(q) = qemu_img() else { return };
        let d = TempDir::new("interop");
        let base = d.path().join("base.qcow2");
        let run = |args: &[&str]| {
            run_ok(&q, args);
        };
        let b = base.to_str().unwrap();
        run(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            b,
            "100M",
        ]);
        let top = d.path().join("top.qcow2");
        let t = top.to_str().unwrap();
        run(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t,
            "200M",
        ]);
        let raw = d.path().join("r.img");
        run(&["create", "-f", "raw", raw.to_str().unwrap(), "3M"]);
        let i = info(&top).unwrap();
        assert_eq!(i.virtual_size, 200 << 20);
        assert_eq!(i.qcow2_version, Some(3));
        assert_eq!(i.cluster_size, Some(65536));
        assert_eq!(i.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(i.backing_format.as_deref(), Some("qcow2"));
        let bi = &i.backing_chain[0];
        assert_eq!(
            (bi.qcow2_version, bi.cluster_size, bi.virtual_size),
            (Some(2), Some(4096), 100 << 20)
        );
        let st = std::fs::metadata(&top).unwrap();
        assert_eq!(i.allocated_size, st.blocks() * 512);
        let ri = info(&raw).unwrap();
        assert_eq!((ri.format, ri.virtual_size), (Format::Raw, 3 << 20));
    }
}
