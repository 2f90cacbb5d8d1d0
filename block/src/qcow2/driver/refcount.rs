//! qcow2 refcounts: reading and setting counts of any width (1..64 bits), allocating and
//! freeing host clusters, and growing the refcount table when the file outgrows it.
//!
//! ```text
//!  refcount table (header: offset, clusters) ── entry i ──▶ refcount block i
//!  refcount block i: cluster*8/width counts, for host clusters [i*per_block, (i+1)*per_block)
//! ```
//!
//! Growing the table (the image has more clusters than its table can name blocks for) places
//! the new refcount blocks and the new, larger table at the end of the file, as a unit that
//! counts itself:
//!
//! ```text
//!  ... old coverage ...│ new refcount blocks │ new refcount table │ (free)
//!                      start                 start + blocks
//! ```
//!
//! Crash safety: the new blocks and table are written and flushed before the header points at
//! the new table; the header update (offset and cluster count, 12 contiguous bytes in the
//! first sector) is flushed before the old table's clusters are freed. A crash at any point
//! leaves either the old table in force (the new clusters are leaked: unreferenced but
//! harmless) or the new one with the old table leaked.

use std::io;

use super::{punch, Qcow2Driver, FILE_GROW_STEP, OFFSET_MASK};
use crate::qcow2::MAX_REFTABLE_BYTES;

/// Header offset of refcount_table_offset (u64), followed by refcount_table_clusters (u32).
const HEADER_REFTABLE: u64 = 48;

impl Qcow2Driver {
    fn rc_per_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.header.refcount_order
    }

    fn rc_block(&mut self, off: u64) -> io::Result<&mut Vec<u8>> {
        if !self.rc_cache.contains(off) {
            let mut raw = vec![0u8; self.cluster as usize];
            self.meta.read_at(off, &mut raw)?;
            self.rc_make_room()?;
            self.rc_cache.insert(off, raw, None);
        }
        Ok(self.rc_cache.get(off).expect("just inserted"))
    }

    fn rc_get_in(block: &[u8], i: u64, order: u32) -> u64 {
        let bits = 1u64 << order;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            block[at..at + n]
                .iter()
                .fold(0u64, |a, &b| (a << 8) | u64::from(b))
        } else {
            let per = 8 / bits;
            let byte = block[(i / per) as usize];
            // Sub-byte refcounts are packed starting at the least significant bit.
            let shift = (i % per) * bits;
            (u64::from(byte) >> shift) & ((1 << bits) - 1)
        }
    }

    fn rc_set_in(block: &mut [u8], i: u64, order: u32, v: u64) {
        let bits = 1u64 << order;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            for (k, b) in block[at..at + n].iter_mut().enumerate() {
                *b = (v >> (8 * (n - 1 - k))) as u8;
            }
        } else {
            let per = 8 / bits;
            let at = (i / per) as usize;
            let shift = (i % per) * bits;
            let mask = ((1u64 << bits) - 1) << shift;
            block[at] = ((u64::from(block[at]) & !mask) | ((v << shift) & mask)) as u8;
        }
    }

    /// Refcount of host cluster `idx` (0 when no refcount block covers it).
    fn refcount(&mut self, idx: u64) -> io::Result<u64> {
        let per_bits = self.rc_per_block_bits();
        let ti = (idx >> per_bits) as usize;
        let Some(&rb) = self.rc_table.get(ti) else {
            return Ok(0);
        };
        let rb = rb & OFFSET_MASK;
        if rb == 0 {
            return Ok(0);
        }
        // A misaligned block would put counts over other metadata (the header, even).
        let rb = self.check_host("refcount block", rb)?;
        let order = self.header.refcount_order;
        let i = idx & ((1 << per_bits) - 1);
        Ok(Self::rc_get_in(self.rc_block(rb)?, i, order))
    }

    /// Set the refcount of `idx`, whose refcount block must exist.
    fn set_refcount(&mut self, idx: u64, v: u64) -> io::Result<()> {
        let per_bits = self.rc_per_block_bits();
        let ti = (idx >> per_bits) as usize;
        let rb = self.rc_table.get(ti).copied().unwrap_or(0) & OFFSET_MASK;
        if rb == 0 {
            return Err(self.corrupt(format!("no refcount block for cluster {idx}")));
        }
        let rb = self.check_host("refcount block", rb)?;
        let order = self.header.refcount_order;
        if v >> (1u64 << order).min(63) != 0 {
            return Err(io::Error::other("refcount overflow"));
        }
        let i = idx & ((1 << per_bits) - 1);
        Self::rc_set_in(self.rc_block(rb)?, i, order, v);
        // The bytes holding the entry; written back by `writeback.rs`.
        let lo = ((i << order) / 8) as usize;
        let hi = lo + ((1usize << order) / 8).max(1);
        self.rc_cache.mark_dirty(rb, lo, hi);
        Ok(())
    }

    /// Allocate one host cluster (refcount 1), reusing freed ones first. The cluster's
    /// contents are unspecified (holes when appended or freed by us).
    pub(super) fn alloc_cluster(&mut self) -> io::Result<u64> {
        let per_bits = self.rc_per_block_bits();
        let mut idx = self.free_hint;
        loop {
            let ti = (idx >> per_bits) as usize;
            if ti >= self.rc_table.len() {
                self.grow_refcount_table(ti)?;
                continue;
            }
            if self.rc_table[ti] & OFFSET_MASK == 0 {
                // No refcount block for this range: every cluster in it is free. Put the new
                // block in its own first free cluster, counting itself.
                // Written through (rare: one block counts thousands of clusters), the block
                // durable before the table entry that makes it count; the entry itself is
                // covered by the next barrier, before anything allocated from it is referenced.
                let block_off = idx << self.cluster_bits;
                let mut block = vec![0u8; self.cluster as usize];
                let order = self.header.refcount_order;
                Self::rc_set_in(&mut block, idx & ((1 << per_bits) - 1), order, 1);
                self.meta.write_at(block_off, &block)?;
                self.file_len = self.file_len.max(block_off + self.cluster);
                self.fresh_from = self.fresh_from.max(block_off + self.cluster);
                self.meta.sync_data()?;
                self.meta.write_at(
                    self.header.refcount_table_offset + ti as u64 * 8,
                    &block_off.to_be_bytes(),
                )?;
                self.unsynced = true;
                self.rc_table[ti] = block_off;
                self.rc_make_room()?;
                self.rc_cache.insert(block_off, block, None);
                idx += 1;
                continue;
            }
            if self.refcount(idx)? == 0 {
                self.set_refcount(idx, 1)?;
                self.free_hint = idx + 1;
                let off = idx << self.cluster_bits;
                // A free cluster inside the file may hold stale bytes; callers rely on new
                // clusters reading as zeroes (an allocating write may even be mapped to the
                // engine before its data lands, see `writeback.rs`).
                if off < self.fresh_from && !punch(&self.meta, off, self.cluster) {
                    self.meta.write_at(off, &vec![0u8; self.cluster as usize])?;
                }
                let end = off + self.cluster;
                if end > self.file_len {
                    let len = end.div_ceil(FILE_GROW_STEP) * FILE_GROW_STEP;
                    self.meta.grow(self.file_len, len)?;
                    self.file_len = len;
                }
                self.fresh_from = self.fresh_from.max(end);
                return Ok(off);
            }
            idx += 1;
        }
    }

    /// Drop one reference to host cluster `idx` once the tables that no longer point at it
    /// are durable (rule 2 in `writeback.rs`): until then it stays counted and unusable.
    pub(super) fn release(&mut self, idx: u64) -> io::Result<()> {
        if self.refcount(idx)? == 0 {
            return Err(self.corrupt(format!("freeing cluster {idx} with refcount 0")));
        }
        self.pending_free.push(idx);
        Ok(())
    }

    /// Apply a released reference: decrement, and punch the cluster when it becomes free.
    pub(super) fn apply_free(&mut self, idx: u64) -> io::Result<()> {
        let r = self.refcount(idx)?;
        if r == 0 {
            return Err(self.corrupt(format!("freeing cluster {idx} with refcount 0")));
        }
        self.set_refcount(idx, r - 1)?;
        if r == 1 {
            self.free_hint = self.free_hint.min(idx);
            // Only to give the space back; allocation zeroes the cluster again if needed.
            let _ = punch(&self.meta, idx << self.cluster_bits, self.cluster);
        }
        Ok(())
    }

    /// Replace the refcount table with a larger one that has an entry for refcount block
    /// `need` (see the module comment for the layout and the order of writes).
    fn grow_refcount_table(&mut self, need: usize) -> io::Result<()> {
        let c = self.cluster;
        let per_bits = self.rc_per_block_bits();
        let per_block = 1u64 << per_bits;
        let old_len = self.rc_table.len() as u64;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let old_off = self.header.refcount_table_offset;
        // Past everything the old table can describe and past the end of the file.
        let start = (old_len << per_bits).max(self.file_len.div_ceil(c));
        let first_block = start >> per_bits;
        // Grow by half at least, so that a filling image grows its table O(log n) times.
        let mut table_clusters = (old_clusters + old_clusters / 2).max(old_clusters + 1);
        let mut blocks = 1u64;
        loop {
            let end = start + blocks + table_clusters;
            let want_blocks = (end - 1) / per_block - first_block + 1;
            let want_entries = ((end - 1) / per_block + 1).max(need as u64 + 1);
            let want_clusters = (want_entries * 8).div_ceil(c).max(table_clusters);
            if want_blocks == blocks && want_clusters == table_clusters {
                break;
            }
            blocks = want_blocks.max(blocks);
            table_clusters = want_clusters;
        }
        if table_clusters * c > MAX_REFTABLE_BYTES {
            return Err(io::Error::other(format!(
                "{}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes; the image cannot grow further (use a larger cluster_size)",
                self.path.display()
            )));
        }
        let table_off = (start + blocks) * c;
        let end = start + blocks + table_clusters;
        let order = self.header.refcount_order;
        // New blocks, each counting the new clusters it covers.
        let mut new_blocks = Vec::with_capacity(blocks as usize);
        for k in 0..blocks {
            let b = first_block + k;
            let mut block = vec![0u8; c as usize];
            let lo = (b << per_bits).max(start);
            let hi = ((b + 1) << per_bits).min(end);
            for idx in lo..hi {
                Self::rc_set_in(&mut block, idx - (b << per_bits), order, 1);
            }
            let off = (start + k) * c;
            self.meta.write_at(off, &block)?;
            new_blocks.push((b, off, block));
        }
        let mut table = self.rc_table.clone();
        table.resize((table_clusters * c / 8) as usize, 0);
        for (b, off, _) in &new_blocks {
            table[*b as usize] = *off;
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.meta.write_at(table_off, &raw)?;
        self.file_len = self.file_len.max(end * c);
        self.fresh_from = self.fresh_from.max(end * c);
        self.meta.sync_data()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.meta.write_at(HEADER_REFTABLE, &hdr)?;
        self.meta.sync_data()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.rc_table = table;
        for (_, off, block) in new_blocks {
            self.rc_make_room()?;
            self.rc_cache.insert(off, block, None);
        }
        log::debug!(
            "{}: qcow2 refcount table grown to {table_clusters} clusters at {table_off:#x}",
            self.path.display()
        );
        // The old table is unreferenced on disk now (the header is durable), so its clusters
        // can be freed at once; a failure here only leaks them.
        for i in 0..old_clusters {
            self.apply_free((old_off >> self.cluster_bits) + i)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::path::Path;

    use super::super::DEFAULT_L2_CACHE_SIZE;
    use super::*;
    use crate::format::FormatDriver;
    use crate::img::{create, CreateOptions};
    use crate::options::Format;
    use crate::qcow2::Qcow2Header;
    use crate::testutil::{qemu_img, run_ok, Rng, TempDir};

    const CLUSTER: u64 = 512;
    const DISK: u64 = 64 << 20;
    /// Bytes written at random places: several times what a one-cluster table covers.
    const WRITTEN: u64 = 24 << 20;

    fn open_rw(p: &Path) -> Qcow2Driver {
        let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
        Qcow2Driver::open(p, f, false, DEFAULT_L2_CACHE_SIZE, 1, 0).unwrap()
    }

    /// A refcount table entry pointing into the header cluster (512-aligned, not
    /// cluster-aligned) is corruption: the allocating write fails and marks the image
    /// corrupt instead of writing counts over the header.
    #[test]
    fn misaligned_refcount_block_is_corruption() {
        let d = TempDir::new("rcalign");
        let p = d.path().join("a.qcow2");
        create(&p, Format::Qcow2, 1 << 20, &CreateOptions::default()).unwrap();
        let h = Qcow2Header::read_path(&p).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(
            &f,
            &512u64.to_be_bytes(),
            h.refcount_table_offset,
        )
        .unwrap();
        drop(f);
        let mut drv = open_rw(&p);
        assert!(drv.write_sync(0, &[1; 512]).is_err());
        drop(drv);
        let h2 = Qcow2Header::read_path(&p).unwrap();
        assert!(h2.is_corrupt());
        assert_eq!((h2.size, h2.l1_table_offset), (h.size, h.l1_table_offset));
    }

    /// Scattered writes overflow a one-cluster refcount table (512-byte clusters: 16-bit
    /// counts cover 8 MiB per table cluster, 64-bit ones 2 MiB); the table grows several
    /// times, qemu-img finds no errors, and the data reads back here (before and after
    /// reopening) and through qemu-img convert.
    #[test]
    fn refcount_table_grows_when_the_file_outgrows_it() {
        let q = qemu_img();
        let d = TempDir::new("rcgrow");
        let mut images = vec![("ours16", d.path().join("ours16.qcow2"))];
        let opts = CreateOptions {
            cluster_size: Some(CLUSTER),
            ..Default::default()
        };
        create(&images[0].1, Format::Qcow2, DISK, &opts).unwrap();
        if let Some(q) = &q {
            let p = d.path().join("qemu64.qcow2");
            let o = format!("cluster_size={CLUSTER},refcount_bits=64");
            run_ok(
                q,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &o,
                    p.to_str().unwrap(),
                    "64M",
                ],
            );
            images.push(("qemu64", p));
        }
        for (name, p) in images {
            let h = Qcow2Header::read_path(&p).unwrap();
            assert_eq!(h.refcount_table_clusters, 1, "{name}");
            let mut rng = Rng::new(5);
            let mut model = vec![0u8; DISK as usize];
            let mut drv = open_rw(&p);
            let mut written = 0;
            while written < WRITTEN {
                let len = 1 + rng.below(16 << 10);
                let off = rng.below(DISK - len);
                let byte = rng.next() as u8 | 1;
                let data = vec![byte; len as usize];
                drv.write_sync(off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                written += len;
            }
            let grown = drv.header().refcount_table_clusters;
            assert!(grown >= 3, "{name}: table only {grown} clusters");
            let mut back = vec![0u8; DISK as usize];
            drv.read_sync(0, &mut back).unwrap();
            assert!(back == model, "{name}: read back differs");
            drop(drv);
            let h = Qcow2Header::read_path(&p).unwrap();
            assert_eq!(
                h.refcount_table_clusters, grown,
                "{name}: header not updated"
            );
            let mut drv = open_rw(&p);
            back.fill(0);
            drv.read_sync(0, &mut back).unwrap();
            assert!(back == model, "{name}: differs after reopening");
            drop(drv);
            let Some(q) = &q else { continue };
            let check = run_ok(q, &["check", "-f", "qcow2", p.to_str().unwrap()]);
            assert!(check.contains("No errors"), "{name}: {check}");
            assert!(
                crate::testutil::qemu_read_qcow2(q, &p) == model,
                "{name}: qemu-img reads other data"
            );
        }
    }
}
