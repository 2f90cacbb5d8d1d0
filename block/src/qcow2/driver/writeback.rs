//! Write-back of qcow2 metadata: L2 tables, refcount blocks and L1 entries change in memory
//! and reach the file at flush points (guest flush, every synchronous-path request while the
//! guest's write cache is off, close) or when a dirty table is evicted from its cache.
//!
//! The on-disk image must stay consistent across a crash at any moment: an L2 or L1 entry on
//! disk may only point at a cluster whose refcount on disk is at least 1 and whose contents
//! (data, or a zeroed L2 table) are on disk. Three rules give that:
//!
//! ```text
//!  1. increments before references: dirty refcount blocks are written and fdatasync'ed
//!     (the "barrier", which also covers data written by the synchronous path and new
//!     zeroed L2 tables) before any L2 table or L1 entry is written;
//!  2. references removed before decrements: a dropped reference (discard, copy-on-write of
//!     a shared or compressed cluster, grown-over refcount table) is only queued; the
//!     decrement is applied after the L2 tables no longer pointing at the cluster are written
//!     and fdatasync'ed, and only then may the cluster be punched or handed out again;
//!  3. refcount blocks may be written at any other time (eviction): an early increment is a
//!     leak, and decrements reach the cache only once rule 2 has made them safe;
//!  4. an allocating write that `map` hands to the engine (only while completed writes may
//!     stay volatile, i.e. the guest's write cache is on) gets its L2 entry before its data
//!     lands. That is safe because the guest cluster read as zeroes and owned nothing, and
//!     the new cluster reads as zeroes (appended, punched or zero-written when allocated,
//!     made durable by the barrier): an entry that reaches the file early shows the old
//!     contents or part of a write that had not completed, both allowed; a completed write
//!     is durable at the next flush (the caller's data fdatasync). Synchronous-path writes
//!     land before their entry changes.
//!
//!  flush:  write dirty refcount blocks ─▶ fdatasync ─▶ write dirty L2 tables, L1 range
//!          ─▶ (frees queued?) fdatasync ─▶ apply frees ─▶ write dirty refcount blocks
//!          ─▶ caller's data fdatasync
//!  evict dirty L2 table:  barrier (rule 1) ─▶ write the table
//!  evict dirty refcount block:  write it
//! ```
//!
//! So a crash between flushes leaves, at worst, clusters whose refcount is higher than the
//! number of references (leaks, which `qemu-img check -r leaks` reclaims), never a reference
//! to a cluster counted 0 nor two references to a cluster counted 1: the header's dirty bit
//! (needed only by lazy refcounts) is never set. Every write is whole aligned blocks of the
//! cached table covering its dirty range, so metadata never needs a read-modify-write.

use std::io;

use super::{Qcow2Driver, COPIED};

impl Qcow2Driver {
    /// Widen the byte range `[lo, hi)` of a metadata cluster to whole I/O blocks.
    fn aligned(&self, lo: usize, hi: usize) -> (usize, usize) {
        let a = self.meta.align.max(512) as usize;
        let c = self.cluster as usize;
        (lo / a * a, hi.div_ceil(a).saturating_mul(a).min(c))
    }

    /// Write the dirty range of the refcount block at `off` (no ordering needed, rule 3).
    fn write_rc_block(&mut self, off: u64) -> io::Result<()> {
        let Some((lo, hi)) = self.rc_cache.take_dirty(off) else {
            return Ok(());
        };
        let (lo, hi) = self.aligned(lo, hi);
        let bytes = self.rc_cache.get(off).expect("dirty means cached")[lo..hi].to_vec();
        if let Err(e) = self.meta.write_at(off + lo as u64, &bytes) {
            self.rc_cache.mark_dirty(off, lo, hi);
            return Err(e);
        }
        self.unsynced = true;
        Ok(())
    }

    /// Write the dirty range of the L2 table at `off`; the caller has passed the barrier.
    fn write_l2_table(&mut self, off: u64) -> io::Result<()> {
        let Some((lo, hi)) = self.l2_cache.take_dirty(off) else {
            return Ok(());
        };
        let (lo, hi) = self.aligned(lo, hi);
        let t = self.l2_cache.get(off).expect("dirty means cached");
        let bytes: Vec<u8> = t[lo / 8..hi / 8]
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        if let Err(e) = self.meta.write_at(off + lo as u64, &bytes) {
            self.l2_cache.mark_dirty(off, lo, hi);
            return Err(e);
        }
        self.unsynced = true;
        Ok(())
    }

    /// Write the dirty range of the L1 table; the caller has passed the barrier.
    fn write_l1(&mut self) -> io::Result<()> {
        let Some((lo, hi)) = self.l1_dirty.take() else {
            return Ok(());
        };
        // The table starts cluster aligned and owns whole clusters: bytes past its last entry
        // are padding, written as zeroes.
        let a = self.meta.align.max(512) as usize;
        let (lo, hi) = (lo / a * a, hi.div_ceil(a) * a);
        let bytes: Vec<u8> = (lo / 8..hi / 8)
            .flat_map(|i| self.l1.get(i).copied().unwrap_or(0).to_be_bytes())
            .collect();
        if let Err(e) = self
            .meta
            .write_at(self.header.l1_table_offset + lo as u64, &bytes)
        {
            self.l1_dirty = Some((lo, hi));
            return Err(e);
        }
        self.unsynced = true;
        Ok(())
    }

    pub(super) fn set_l1(&mut self, l1i: usize, entry: u64) {
        self.l1[l1i] = entry;
        let (lo, hi) = (l1i * 8, l1i * 8 + 8);
        self.l1_dirty = Some(match self.l1_dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }

    /// Rule 1: everything an L2 or L1 write may point at is durable once this returns.
    fn barrier(&mut self) -> io::Result<()> {
        for off in self.rc_cache.dirty_offsets() {
            self.write_rc_block(off)?;
        }
        if self.unsynced {
            self.meta.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Room for one more L2 table, writing back the evicted one if dirty.
    pub(super) fn l2_make_room(&mut self) -> io::Result<()> {
        if let Some(victim) = self.l2_cache.victim() {
            if self.l2_cache.is_dirty(victim) {
                self.barrier()?;
                self.write_l2_table(victim)?;
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    /// Room for one more refcount block, writing back the evicted one if dirty (rule 3).
    pub(super) fn rc_make_room(&mut self) -> io::Result<()> {
        if let Some(victim) = self.rc_cache.victim() {
            self.write_rc_block(victim)?;
            self.rc_cache.remove(victim);
        }
        Ok(())
    }

    /// Put a new, zeroed L2 table at `l2_off` for L1 entry `l1i`. The zeroes are written
    /// at once (covered by the next barrier), so the L1 entry never points at stale bytes.
    pub(super) fn new_l2_table(&mut self, l1i: usize, l2_off: u64) -> io::Result<()> {
        self.meta
            .write_at(l2_off, &vec![0u8; self.cluster as usize])?;
        self.unsynced = true;
        self.l2_make_room()?;
        self.l2_cache
            .insert(l2_off, vec![0u64; self.l2_entries as usize], None);
        self.set_l1(l1i, l2_off | COPIED);
        Ok(())
    }

    /// Whether anything cached differs from the file.
    pub(super) fn metadata_dirty(&self) -> bool {
        self.l2_cache.has_dirty()
            || self.rc_cache.has_dirty()
            || self.l1_dirty.is_some()
            || !self.pending_free.is_empty()
    }

    /// Write all cached metadata back in the order the module comment gives; a data
    /// fdatasync after this makes the image on disk match the cache.
    pub(super) fn write_back(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        if self.l2_cache.has_dirty() || self.l1_dirty.is_some() {
            self.barrier()?;
            for off in self.l2_cache.dirty_offsets() {
                self.write_l2_table(off)?;
            }
            self.write_l1()?;
        }
        if !self.pending_free.is_empty() {
            // Rule 2: the tables that dropped the references are durable first.
            self.meta.sync_data()?;
            self.unsynced = false;
            for idx in std::mem::take(&mut self.pending_free) {
                self.apply_free(idx)?;
            }
        }
        for off in self.rc_cache.dirty_offsets() {
            self.write_rc_block(off)?;
        }
        Ok(())
    }

    /// Write everything back and make it durable.
    pub(super) fn write_back_and_sync(&mut self) -> io::Result<()> {
        self.write_back()?;
        self.meta.sync_data()?;
        self.unsynced = false;
        Ok(())
    }

    /// Simulate a crash: drop the driver without writing anything cached back.
    #[cfg(test)]
    pub(crate) fn crash(mut self) {
        self.l2_cache.forget_dirty();
        self.rc_cache.forget_dirty();
        self.l1_dirty = None;
        self.pending_free.clear();
        self.fresh_from = self.file_len;
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        if self.readonly {
            return;
        }
        if self.metadata_dirty() {
            if let Err(e) = self.write_back_and_sync() {
                log::error!(
                    "{}: writing qcow2 metadata back on close failed: {e}; the image may have leaked clusters (`qemu-img check -r leaks`)",
                    self.path.display()
                );
                return;
            }
        }
        if let Err(e) = self.trim_fresh_tail() {
            log::warn!("{}: trimming the qcow2 file: {e}", self.path.display());
        }
    }
}

impl Qcow2Driver {
    /// Cut the file back to its last used cluster: nothing in the tail grown ahead
    /// (`[fresh_from, file_len)`) is referenced; a crash merely leaves it there.
    pub(super) fn trim_fresh_tail(&mut self) -> io::Result<()> {
        if self.readonly || self.file_len <= self.fresh_from {
            return Ok(());
        }
        self.meta.set_len(self.fresh_from)?;
        self.file_len = self.fresh_from;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::path::Path;

    use super::*;
    use crate::format::FormatDriver;
    use crate::img::{create, CreateOptions};
    use crate::options::Format;
    use crate::testutil::{qemu_img, Rng, TempDir};

    /// Small clusters and caches, so that tables and refcount blocks are evicted constantly.
    const CLUSTER: u64 = 512;
    const DISK: u64 = 4 << 20;
    const L2_CACHE: u64 = 8 * CLUSTER;
    const OPS: usize = 3000;

    /// A fresh image of DISK bytes with CLUSTER-sized clusters in `d`.
    fn new_image(d: &TempDir) -> std::path::PathBuf {
        let p = d.path().join("a.qcow2");
        let opts = CreateOptions {
            cluster_size: Some(CLUSTER),
            ..Default::default()
        };
        create(&p, Format::Qcow2, DISK, &opts).unwrap();
        p
    }

    fn open_rw(p: &Path) -> Qcow2Driver {
        let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
        let mut drv = Qcow2Driver::open(p, f, false, L2_CACHE, 1, 0).unwrap();
        drv.set_volatile_writes(true);
        drv
    }

    /// `qemu-img check` exit status: 0 clean, 3 leaks only (2 would be corruption).
    fn check(q: &Path, p: &Path) -> (Option<i32>, String) {
        let out = std::process::Command::new(q)
            .args(["check", "-f", "qcow2"])
            .arg(p)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    }

    /// Random writes, reads, write-zeroes and discards (which free clusters for reuse) with a
    /// flush every so often, ending with allocating writes, discards and reads (increments
    /// and frees cached, dirty tables evicted). `model` follows the guest view, the result is the view at the last
    /// flush and which bytes were written since it.
    fn churn(drv: &mut Qcow2Driver, rng: &mut Rng, model: &mut [u8]) -> (Vec<u8>, Vec<bool>) {
        let mut flushed = model.to_vec();
        let mut touched = vec![false; model.len()];
        for _ in 0..OPS {
            let len = 1 + rng.below(6 * CLUSTER);
            let off = rng.below(DISK - len);
            let r = off as usize..(off + len) as usize;
            match rng.below(100) {
                0..=14 => {
                    drv.zero_sync(off, len, rng.below(2) == 0).unwrap();
                    model[r.clone()].fill(0);
                }
                15 => {
                    drv.sync().unwrap();
                    flushed.copy_from_slice(model);
                    touched.fill(false);
                    continue;
                }
                16..=35 => {
                    // Reads load tables, evicting dirty ones.
                    let mut back = vec![0u8; len as usize];
                    drv.read_sync(off, &mut back).unwrap();
                    assert!(back[..] == model[r], "read at {off} differs");
                    continue;
                }
                _ => {
                    let data = vec![rng.next() as u8 | 1; len as usize];
                    // Half the writes go where the pipeline would send them: to the engine
                    // at the mapped host offset (allocating, rule 4) when `map` allows.
                    match rng.below(2) {
                        0 => match drv.map(off, len, true).unwrap() {
                            Some(host) => drv.meta.write_at(host, &data).unwrap(),
                            None => drv.write_sync(off, &data).unwrap(),
                        },
                        _ => drv.write_sync(off, &data).unwrap(),
                    }
                    model[r.clone()].copy_from_slice(&data);
                }
            }
            touched[r].fill(true);
        }
        for _ in 0..16 {
            let off = rng.below(DISK - 4 * CLUSTER);
            let data = vec![rng.next() as u8 | 1; 4 * CLUSTER as usize];
            drv.write_sync(off, &data).unwrap();
            let r = off as usize..(off + 4 * CLUSTER) as usize;
            model[r.clone()].copy_from_slice(&data);
            touched[r].fill(true);
        }
        for _ in 0..4 {
            let off = rng.below(DISK / CLUSTER - 32) * CLUSTER;
            drv.zero_sync(off, 32 * CLUSTER, true).unwrap();
            model[off as usize..(off + 32 * CLUSTER) as usize].fill(0);
            touched[off as usize..(off + 32 * CLUSTER) as usize].fill(true);
        }
        for _ in 0..4 {
            let off = rng.below(DISK - (64 << 10));
            let mut back = vec![0u8; 64 << 10];
            drv.read_sync(off, &mut back).unwrap();
        }
        (flushed, touched)
    }

    /// Rule 1 on its own: evicting a dirty L2 table that points at a new cluster writes the
    /// cluster's refcount first, so a crash right after the eviction is consistent.
    #[test]
    fn evicting_a_table_writes_refcounts_first() {
        let Some(q) = qemu_img() else { return };
        let d = TempDir::new("wbevict");
        let p = new_image(&d);
        let per_table = CLUSTER / 8 * CLUSTER;
        let tables = L2_CACHE / CLUSTER + 1;
        let mut drv = open_rw(&p);
        for t in 0..tables {
            drv.write_sync(t * per_table, &[1; 512]).unwrap();
        }
        drop(drv);
        let mut drv = open_rw(&p);
        // Allocates a cluster in table 0 (first in the cache), then fills the cache.
        drv.write_sync(CLUSTER, &[2; 512]).unwrap();
        for t in 1..tables {
            drv.read_sync(t * per_table, &mut [0; 512]).unwrap();
        }
        assert!(!drv.l2_cache.contains(drv.l1[0] & super::super::OFFSET_MASK));
        drv.crash();
        let (code, out) = check(&q, &p);
        assert_eq!(code, Some(0), "{out}");
        let mut drv = open_rw(&p);
        let mut back = [0u8; 512];
        drv.read_sync(CLUSTER, &mut back).unwrap();
        assert_eq!(back, [2; 512]);
    }

    /// A crash between flushes (nothing cached is written back) leaves an image `qemu-img
    /// check` finds consistent, with leaked clusters at most, and every byte not written
    /// since the last flush reads back as it was then. Closing normally afterwards leaves no
    /// leaks either, and reopened data matches.
    #[test]
    fn crash_between_flushes_leaks_at_most() {
        let q = qemu_img();
        let d = TempDir::new("wbcrash");
        let p = new_image(&d);
        let mut model = vec![0u8; DISK as usize];
        for seed in 1..4 {
            let mut rng = Rng::new(seed);
            let mut drv = open_rw(&p);
            let (flushed, touched) = churn(&mut drv, &mut rng, &mut model);
            drv.crash();
            if let Some(q) = &q {
                let (code, out) = check(q, &p);
                assert!(matches!(code, Some(0 | 3)), "seed {seed}: {code:?} {out}");
            }
            let mut drv = open_rw(&p);
            let mut back = vec![0u8; DISK as usize];
            drv.read_sync(0, &mut back).unwrap();
            for (i, t) in touched.iter().enumerate() {
                assert!(
                    *t || back[i] == flushed[i],
                    "seed {seed}: byte {i} flushed as {} reads {}",
                    flushed[i],
                    back[i]
                );
            }
            // Continue from what the disk holds now; leaked clusters stay leaked.
            model.copy_from_slice(&back);
            let _ = churn(&mut drv, &mut rng, &mut model);
            drop(drv);
            let mut drv = open_rw(&p);
            drv.read_sync(0, &mut back).unwrap();
            assert!(back == model, "seed {seed}: differs after a clean close");
            drv.crash();
        }
        if let Some(q) = &q {
            // Repair the leaks of the crashes; then a clean session leaves no new ones.
            crate::testutil::run_ok(q, &["check", "-q", "-r", "leaks", p.to_str().unwrap()]);
            let mut drv = open_rw(&p);
            let _ = churn(&mut drv, &mut Rng::new(99), &mut model);
            drop(drv);
            let (code, out) = check(q, &p);
            assert_eq!(code, Some(0), "{out}");
        }
    }
}
