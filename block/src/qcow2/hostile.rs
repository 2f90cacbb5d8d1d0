//! Untrusted images: one routine that opens an image the ways Platter does (probe, header
//! parse, `img info`, the qcow2 driver, the [`Disk`](crate::Disk) pipeline) and reads, writes
//! and zeroes a little of it. The fuzz target (`block/fuzz`, `open_image`) and the mutation
//! test below both drive it, so they exercise the same code.
//!
//! Any `Ok` or `Err` is an acceptable outcome for a hostile image; a panic, an abort (for
//! example an allocation sized from the image) or a hang is a bug.

use std::fs::OpenOptions;
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{Qcow2Driver, Qcow2Header};
use crate::format::FormatDriver;
use crate::options::{AioMode, CacheMode, DiskOptions, Format};
use crate::{open_disk, BlockError, Request, RequestOp, SgList};

/// Bytes each access touches: a few sectors, enough to cross a 512-byte cluster.
const ACCESS_LEN: u64 = 2048;
/// L2 cache for the driver: small, so hostile images also exercise eviction.
const L2_CACHE: u64 = 64 << 10;
/// How long one request through the pipeline may take before it counts as a hang.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Guest offsets to access on a disk of `size` bytes: start, middle, end, each clipped.
fn probe_ranges(size: u64) -> impl Iterator<Item = (u64, u64)> {
    [0, size / 2, size.saturating_sub(ACCESS_LEN / 2)]
        .into_iter()
        .filter(move |&off| off < size)
        .map(move |off| (off, ACCESS_LEN.min(size - off)))
}

/// Open the image at `path` (which the caller lets us modify) every way Platter opens images
/// and access a few ranges. Returns the first error of the pipeline open or read, or `Ok`.
///
/// # Panics
/// Only on a bug: a request through the pipeline that does not complete within 10 s.
pub fn open_and_access(path: &Path) -> Result<(), BlockError> {
    let format = crate::img::probe_format(path)?;
    let _ = crate::img::info(path);
    if format == Format::Qcow2 {
        let _ = Qcow2Header::read_path(path);
        let _ = driver_access(path, false);
        let _ = driver_access(path, true);
    }
    pipeline_read(path)
}

/// Through the driver directly: read, and when writable also write, zero and discard.
fn driver_access(path: &Path, readonly: bool) -> Result<(), BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut drv = Qcow2Driver::open(path, file, readonly, L2_CACHE, 1, 0)?;
    let size = drv.size();
    let mut buf = vec![0u8; ACCESS_LEN as usize];
    let pattern: Vec<u8> = (0..ACCESS_LEN).map(|i| i as u8 | 1).collect();
    for (off, len) in probe_ranges(size) {
        let len = len as usize;
        let _ = drv.map(off, len as u64, !readonly);
        let _ = drv.read_sync(off, &mut buf[..len]);
        if readonly {
            continue;
        }
        let _ = drv.write_sync(off, &pattern[..len]);
        let _ = drv.read_sync(off, &mut buf[..len]);
        let _ = drv.zero_sync(off, len as u64, false);
        let _ = drv.zero_sync(off, len as u64, true);
    }
    // No drv.sync(): durability is not what is under test, and fdatasync per image would
    // make the mutation test disk-bound.
    Ok(())
}

/// Through `open_disk` (format probed, read-only, no locking) and the threads engine.
fn pipeline_read(path: &Path) -> Result<(), BlockError> {
    let opts = DiskOptions {
        readonly: true,
        locking: false,
        cache: CacheMode::Writeback,
        aio: AioMode::Threads,
        l2_cache_size: L2_CACHE,
        ..DiskOptions::new(path)
    };
    let mut disk = open_disk(&opts)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ACCESS_LEN as usize)])
        .map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))?;
    let mut first_err = None;
    for (tag, (off, len)) in probe_ranges(disk.size()).enumerate() {
        let buf = SgList::from_guest(&mem, &[(GuestAddress(0), len as usize)])?;
        let req = Request {
            tag: tag as u64,
            op: RequestOp::Read { offset: off, buf },
        };
        if let Err(e) = disk.submit(req) {
            first_err.get_or_insert(e.error);
            continue;
        }
        loop {
            let fired = disk.wait_completions(Some(REQUEST_TIMEOUT));
            assert!(
                !matches!(fired, Ok(false)),
                "{}: read at {off} hung",
                path.display()
            );
            let done: Vec<_> = disk.completions().collect();
            if let Some((_, res)) = done.into_iter().next() {
                if let Err(e) = res {
                    first_err.get_or_insert(e);
                }
                break;
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::time::Instant;

    use super::*;
    use crate::img::{create, CreateOptions};
    use crate::testutil::{qemu_img, run_ok, Rng, TempDir};

    /// Mutated images per seed by default; `PLATTER_FUZZ_ROUNDS` and `PLATTER_FUZZ_SEED`
    /// make a longer or different run.
    const ROUNDS: usize = 800;

    /// Valid small images to mutate: ours with 512-byte clusters holding data and zero
    /// clusters, ours with 4 KiB clusters over a raw backing file, and (with qemu-img) a
    /// compressed one and a v2 one.
    fn seeds(d: &TempDir) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let small = d.path().join("seed512.qcow2");
        let o = CreateOptions {
            cluster_size: Some(512),
            ..Default::default()
        };
        create(&small, Format::Qcow2, 64 << 10, &o).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&small)
            .unwrap();
        let mut drv = Qcow2Driver::open(&small, f, false, L2_CACHE, 1, 0).unwrap();
        for i in 0..16u64 {
            drv.write_sync(i * 3000, &[i as u8 + 1; 700]).unwrap();
        }
        drv.zero_sync(0, 1024, false).unwrap();
        drop(drv);
        out.push(small.clone());
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0x5a; 40 << 10]).unwrap();
        let top = d.path().join("seed4k.qcow2");
        let o = CreateOptions {
            cluster_size: Some(4096),
            backing_file: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        };
        create(&top, Format::Qcow2, 64 << 10, &o).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&top)
            .unwrap();
        let mut drv = Qcow2Driver::open(&top, f, false, L2_CACHE, 1, 0).unwrap();
        drv.write_sync(5000, &[7; 9000]).unwrap();
        drop(drv);
        out.push(top);
        if let Some(q) = qemu_img() {
            let comp = d.path().join("seedcomp.qcow2");
            let v2 = d.path().join("seedv2.qcow2");
            let (s, c, v) = (
                small.to_str().unwrap(),
                comp.to_str().unwrap(),
                v2.to_str().unwrap(),
            );
            let o = "cluster_size=1024";
            run_ok(&q, &["convert", "-c", "-O", "qcow2", "-o", o, s, c]);
            run_ok(&q, &["convert", "-O", "qcow2", "-o", "compat=0.10", s, v]);
            out.push(comp);
            out.push(v2);
        }
        out
    }

    /// Byte offsets worth hitting in `img`: the header, and the first bytes of the L1 table,
    /// the refcount table, the first refcount block and the first L2 table.
    fn hot_spots(img: &[u8]) -> Vec<usize> {
        let h = Qcow2Header::parse(img, img.len() as u64, Path::new("seed")).unwrap();
        let word = |at: u64| {
            let at = at as usize;
            u64::from_be_bytes(img[at..at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
        };
        let rb = word(h.refcount_table_offset);
        let l2 = word(h.l1_table_offset);
        let mut spots = vec![0, h.l1_table_offset, h.refcount_table_offset];
        spots.extend([rb, l2].into_iter().filter(|&o| o != 0));
        spots.into_iter().map(|o| o as usize).collect()
    }

    /// Values that tend to break parsers: extremes, flags, offsets at and past the end.
    fn nasty_word(rng: &mut Rng, len: u64) -> u64 {
        let cluster_ish = 1u64 << (9 + rng.below(13));
        match rng.below(9) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << 63 | (rng.below(len.max(1)) & !511),
            3 => len,
            4 => len + cluster_ish,
            5 => 1 << 62 | rng.next() >> 8,
            6 => rng.next() & 0x00ff_ffff_ffff_fe00,
            7 => rng.below(len.max(1)) | 1,
            _ => rng.next(),
        }
    }

    /// Apply 1 to 4 random edits near the hot spots (or anywhere), and sometimes truncate.
    fn mutate(rng: &mut Rng, good: &[u8], spots: &[usize]) -> Vec<u8> {
        let mut b = good.to_vec();
        let len = b.len() as u64;
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(4) == 0 {
                rng.below(len) as usize
            } else {
                let s = spots[rng.below(spots.len() as u64) as usize];
                s + rng.below(128) as usize
            };
            match rng.below(3) {
                0 if at < b.len() => b[at] ^= 1 << rng.below(8),
                1 if at < b.len() => b[at] = rng.next() as u8,
                _ => {
                    let at = at & !7;
                    if at + 8 <= b.len() {
                        let w = nasty_word(rng, len);
                        b[at..at + 8].copy_from_slice(&w.to_be_bytes());
                    }
                }
            }
        }
        if rng.below(16) == 0 {
            b.truncate(rng.below(len) as usize);
        }
        b
    }

    /// A few thousand deterministic mutations of valid images through the open-and-access
    /// path never panic (a panic fails the test) and finish quickly.
    #[test]
    fn hostile_fuzz_smoke() {
        let d = TempDir::new("hostile");
        let t0 = Instant::now();
        let target = d.path().join("mutant.qcow2");
        // Rewritten in place, never truncated to zero: ext4 flushes a file truncated to zero
        // when it is closed (auto_da_alloc), which would make this test disk-bound.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .unwrap();
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let rounds = env("PLATTER_FUZZ_ROUNDS", ROUNDS as u64);
        let mut rng = Rng::new(env("PLATTER_FUZZ_SEED", 0x5eed));
        let mut outcomes = [0usize; 2];
        for seed in seeds(&d) {
            let good = std::fs::read(&seed).unwrap();
            open_and_access(&seed).unwrap();
            let spots = hot_spots(&good);
            for _ in 0..rounds {
                let bad = mutate(&mut rng, &good, &spots);
                file.set_len(bad.len() as u64).unwrap();
                file.write_all_at(&bad, 0).unwrap();
                outcomes[usize::from(open_and_access(&target).is_ok())] += 1;
            }
        }
        eprintln!(
            "hostile_fuzz_smoke: {} accepted, {} refused, {:?}",
            outcomes[1],
            outcomes[0],
            t0.elapsed()
        );
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }
}
