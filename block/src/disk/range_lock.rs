//! Per-disk byte-range lock that keeps read-modify-write and cluster freeing correct under
//! concurrency.
//!
//! An O_DIRECT write that is not aligned reads the blocks around it, patches them and writes
//! them back. Any other write to those blocks in between would be lost, so an RMW takes its
//! aligned range *exclusively*; plain writes, discards and write-zeroes take theirs *shared*
//! (they may overlap each other, as the guest allows). On qcow2, discard and write-zeroes free
//! clusters the next allocation reuses, so they take whole clusters exclusively and reads
//! take theirs shared (`Disk::lock_range`). Waiters are served in arrival order: a request
//! also waits behind an earlier waiter it conflicts with, so nothing starves.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub id: u64,
    pub start: u64,
    pub end: u64,
    pub exclusive: bool,
}

impl Range {
    fn conflicts(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end && (self.exclusive || other.exclusive)
    }
}

#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Vec<Range>,
    waiting: VecDeque<Range>,
}

impl RangeLock {
    /// Take `r` now (true) or queue it (false).
    pub fn lock(&mut self, r: Range) -> bool {
        if self
            .held
            .iter()
            .chain(self.waiting.iter())
            .any(|h| h.conflicts(&r))
        {
            self.waiting.push_back(r);
            false
        } else {
            self.held.push(r);
            true
        }
    }

    /// Release `id`'s range; returns the ids of waiters that now hold theirs, in order.
    pub fn unlock(&mut self, id: u64) -> Vec<u64> {
        self.held.retain(|h| h.id != id);
        let mut granted = Vec::new();
        let mut still = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            let blocked = self.held.iter().any(|h| h.conflicts(&w))
                || still.iter().any(|s: &Range| s.conflicts(&w));
            if blocked {
                still.push_back(w);
            } else {
                self.held.push(w);
                granted.push(w.id);
            }
        }
        self.waiting = still;
        granted
    }

    /// The ids of the requests waiting, in order.
    pub fn waiting_ids(&self) -> Vec<u64> {
        self.waiting.iter().map(|w| w.id).collect()
    }

    /// Change what a waiting request waits for (its id is `r.id`); it keeps its place.
    /// Takes effect at the next [`RangeLock::unlock`].
    pub fn rewait(&mut self, r: Range) {
        if let Some(w) = self.waiting.iter_mut().find(|w| w.id == r.id) {
            *w = r;
        }
    }

    #[cfg(test)]
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: u64, start: u64, end: u64, exclusive: bool) -> Range {
        Range {
            id,
            start,
            end,
            exclusive,
        }
    }

    #[test]
    fn shared_ranges_overlap_freely() {
        let mut l = RangeLock::default();
        assert!(l.lock(r(1, 0, 4096, false)));
        assert!(l.lock(r(2, 0, 8192, false)));
    }

    #[test]
    fn exclusive_waits_and_is_granted_in_order() {
        let mut l = RangeLock::default();
        assert!(l.lock(r(1, 0, 4096, false)));
        assert!(!l.lock(r(2, 0, 4096, true)));
        // A later shared request behind the exclusive waiter must wait too (no starvation).
        assert!(!l.lock(r(3, 0, 512, false)));
        // A disjoint one goes through.
        assert!(l.lock(r(4, 4096, 8192, true)));
        assert_eq!(l.unlock(1), vec![2]);
        assert_eq!(l.unlock(2), vec![3]);
        assert!(l.unlock(3).is_empty());
        assert!(l.unlock(4).is_empty());
        assert!(l.is_idle());
    }

    #[test]
    fn a_waiter_that_asks_for_less_goes_sooner() {
        let mut l = RangeLock::default();
        assert!(l.lock(r(1, 0, 65536, true)));
        assert!(!l.lock(r(2, 0, 65536, true)));
        assert!(!l.lock(r(3, 0, 65536, true)));
        assert_eq!(l.waiting_ids(), vec![2, 3]);
        // Both now want only their own block, shared: both go when 1 is done.
        l.rewait(r(2, 0, 4096, false));
        l.rewait(r(3, 4096, 8192, false));
        assert_eq!(l.unlock(1), vec![2, 3]);
    }

    #[test]
    fn adjacent_ranges_do_not_conflict() {
        let mut l = RangeLock::default();
        assert!(l.lock(r(1, 0, 4096, true)));
        assert!(l.lock(r(2, 4096, 8192, true)));
    }
}
