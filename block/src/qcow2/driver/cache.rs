//! A write-back cache of metadata clusters (L2 tables, refcount blocks) keyed by host offset.
//!
//! Each entry remembers the byte range of its on-disk cluster that differs from the file
//! (`dirty`); the driver writes that range, widened to the I/O alignment, straight from the
//! cached copy, so a metadata write never needs a read-modify-write. The cache itself never
//! writes: when it is full, [`MetaCache::victim`] names the entry to evict and the driver
//! writes it back first if it is dirty, honouring the ordering rules in `writeback.rs`.
//!
//! ```text
//!  map: host offset ─▶ Slot { table, dirty: Option<byte range> }
//!  order: CLOCK (second chance), QEMU evicts the least recently used table: a table used
//!         since it last reached the front goes to the back once instead of out; FIFO
//!         evicted the hot tables of a working set larger than the cache as readily as cold
//!  dirty: sorted set of dirty offsets (write-back goes out in file order)
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};

struct Slot<T> {
    table: T,
    dirty: Option<(usize, usize)>,
    /// Used since it last came round in `victim`.
    referenced: bool,
}

pub(super) struct MetaCache<T> {
    map: HashMap<u64, Slot<T>>,
    order: VecDeque<u64>,
    dirty: BTreeSet<u64>,
    cap: usize,
}

impl<T> MetaCache<T> {
    pub(super) fn new(cap: usize) -> Self {
        MetaCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            dirty: BTreeSet::new(),
            cap: cap.max(1),
        }
    }

    pub(super) fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    /// The cached table; callers that change it must call [`MetaCache::mark_dirty`].
    pub(super) fn get(&mut self, off: u64) -> Option<&mut T> {
        self.map.get_mut(&off).map(|s| {
            s.referenced = true;
            &mut s.table
        })
    }

    /// Record that bytes `[lo, hi)` of the cluster at `off` differ from the file.
    pub(super) fn mark_dirty(&mut self, off: u64, lo: usize, hi: usize) {
        if let Some(s) = self.map.get_mut(&off) {
            s.dirty = Some(match s.dirty {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
            self.dirty.insert(off);
        }
    }

    /// Clear the dirty mark of `off`, returning the range the caller must now write.
    pub(super) fn take_dirty(&mut self, off: u64) -> Option<(usize, usize)> {
        self.dirty.remove(&off);
        self.map.get_mut(&off).and_then(|s| s.dirty.take())
    }

    pub(super) fn is_dirty(&self, off: u64) -> bool {
        self.dirty.contains(&off)
    }

    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Dirty offsets in file order.
    pub(super) fn dirty_offsets(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    /// When the cache is full: the entry the next insertion should evict. The caller writes
    /// it back if dirty, then [`MetaCache::remove`]s it.
    pub(super) fn victim(&mut self) -> Option<u64> {
        if self.map.len() < self.cap {
            return None;
        }
        // Ends within two turns: each pass clears the marks it passes over.
        while let Some(&old) = self.order.front() {
            match self.map.get_mut(&old) {
                // Stale: removed earlier.
                None => {
                    self.order.pop_front();
                }
                Some(s) if s.referenced => {
                    s.referenced = false;
                    self.order.pop_front();
                    self.order.push_back(old);
                }
                Some(_) => return Some(old),
            }
        }
        None
    }

    pub(super) fn remove(&mut self, off: u64) {
        if self.order.front() == Some(&off) {
            self.order.pop_front();
        }
        self.dirty.remove(&off);
        self.map.remove(&off);
    }

    /// Insert a table the caller has made room for (see [`MetaCache::victim`]).
    pub(super) fn insert(&mut self, off: u64, table: T, dirty: Option<(usize, usize)>) {
        self.order.push_back(off);
        if dirty.is_some() {
            self.dirty.insert(off);
        }
        self.map.insert(
            off,
            Slot {
                table,
                dirty,
                referenced: false,
            },
        );
    }

    /// Forget every dirty mark (the tables stay cached); for tests that simulate a crash.
    #[cfg(test)]
    pub(super) fn forget_dirty(&mut self) {
        for off in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.map.get_mut(&off) {
                s.dirty = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table used since it was loaded outlives one loaded after it and never used.
    #[test]
    fn used_tables_get_a_second_chance() {
        let mut c = MetaCache::new(3);
        c.insert(10, 'a', None);
        c.insert(20, 'b', None);
        c.insert(30, 'c', None);
        assert!(c.get(10).is_some());
        assert_eq!(c.victim(), Some(20));
        c.remove(20);
        c.insert(40, 'd', None);
        // 10's mark was spent on the last turn: it goes next unless used again.
        assert!(c.get(30).is_some());
        assert_eq!(c.victim(), Some(10));
        assert!(c.get(10).is_some() && c.get(40).is_some());
        // 10 and 40 used again go round once more; 30, its mark spent, goes.
        assert_eq!(c.victim(), Some(30));
    }

    #[test]
    fn evicts_in_insertion_order_and_tracks_dirty_ranges() {
        let mut c = MetaCache::new(2);
        c.insert(10, 'a', None);
        c.insert(20, 'b', None);
        c.mark_dirty(20, 8, 16);
        c.mark_dirty(20, 0, 4);
        assert_eq!(c.dirty_offsets(), vec![20]);
        assert_eq!(c.victim(), Some(10));
        c.remove(10);
        assert_eq!(c.victim(), None);
        c.insert(30, 'c', Some((0, 8)));
        assert_eq!(c.victim(), Some(20));
        assert_eq!(c.dirty_offsets(), vec![20, 30]);
        assert_eq!(c.take_dirty(20), Some((0, 16)));
        assert_eq!(c.take_dirty(20), None);
        assert!(c.has_dirty());
        c.remove(30);
        assert!(!c.has_dirty());
        // Marking an uncached offset is a no-op.
        c.mark_dirty(99, 0, 8);
        assert!(!c.has_dirty());
    }
}
