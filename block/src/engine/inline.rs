//! Buffered writes on the submitting thread, for the engines that serve page-cache files
//! (`aio=threads` and `aio=io_uring` with `cache=writeback|writethrough|unsafe`).
//!
//! A buffered write is a copy into the page cache under the file's inode lock, which ext4 and
//! XFS take exclusively, so writes to one image never run in parallel whichever thread issues
//! them. Handing one elsewhere only adds two wake-ups and a fight for the lock:
//! - threads: 100k random 4 KiB writes at depth 32 took 0.47-0.52 s on the workers, 0.21-0.22 s
//!   inline (qemu-img bench 0.86-0.92 s); at depth 1 2.8-3.1 s on the workers, 0.30 s inline
//!   (qemu-img bench 2.3 s, fio psync 0.54 s); 20000 128 KiB writes at depth 8 0.91-1.11 s,
//!   0.64-0.70 s inline; 2000 1 MiB writes at depth 4 0.56-0.63 s, 0.52-0.55 s.
//! - io_uring: ext4 cannot do a buffered write without blocking (io_uring's first, nonblocking
//!   try fails), so the kernel punts every one to an io-wq worker thread and back: 50000
//!   random 4 KiB writes at depth 1 took 3.6-3.8 s through the ring (qemu-img bench with
//!   aio=io_uring 3.6-4.7 s, fio's io_uring engine 2.7 s), 0.2 s inline.
//!
//! Durable writes (RWF_DSYNC: writethrough, and qcow2's synchronous path) wait for the device
//! and stay asynchronous. ext4 refuses RWF_NOWAIT for buffered writes, so an inline one can
//! block, in dirty-page throttling or behind a journal commit; one that takes over
//! [`INLINE_WRITE_SLOW`] sends writes the asynchronous way for [`INLINE_WRITE_BACKOFF`], so a
//! throttled page cache costs the submitting thread (which serves other queues and disks
//! too) one stall a second at most.

use std::io;
use std::time::{Duration, Instant};

use super::{run_blocking, EngineOp, OpKind};

/// Largest buffered write run inline: larger ones would hold the submitting thread for
/// longer than its other queues and disks should wait.
pub const INLINE_WRITE_MAX: usize = 1 << 20;
/// An inline write slower than this pauses inline writes (see the module docs).
const INLINE_WRITE_SLOW: Duration = Duration::from_millis(1);
/// How long that pause lasts.
const INLINE_WRITE_BACKOFF: Duration = Duration::from_secs(1);

/// When a buffered write may run on the submitting thread.
#[derive(Debug)]
pub(crate) struct InlineWrites {
    /// The file is served through the page cache (never with O_DIRECT, where a write waits
    /// for the device).
    enabled: bool,
    /// Inline writes are paused until then, after a slow one.
    paused_until: Option<Instant>,
}

impl InlineWrites {
    /// The policy for a file opened with (`page_cache`) or without the host page cache.
    pub(crate) fn new(page_cache: bool) -> InlineWrites {
        InlineWrites {
            enabled: page_cache,
            paused_until: None,
        }
    }

    /// Whether any write may run inline.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Run `op` on this thread if it is a buffered write of at most [`INLINE_WRITE_MAX`] and
    /// inline writes are not paused; its result, or None when it must go the asynchronous way.
    pub(crate) fn try_run(&mut self, op: &EngineOp) -> Option<io::Result<usize>> {
        let OpKind::Write {
            iovecs,
            dsync: false,
            ..
        } = &op.kind
        else {
            return None;
        };
        if !self.enabled || iovecs.total() > INLINE_WRITE_MAX {
            return None;
        }
        if let Some(until) = self.paused_until {
            if Instant::now() < until {
                return None;
            }
            self.paused_until = None;
        }
        let start = Instant::now();
        let result = run_blocking(op);
        let took = start.elapsed();
        if took > INLINE_WRITE_SLOW {
            log::debug!(
                "block: an inline buffered write took {took:?}; writes go the asynchronous way for a while"
            );
            self.paused_until = Some(Instant::now() + INLINE_WRITE_BACKOFF);
        }
        Some(result)
    }

    /// Pause (or, with a past instant, end the pause of) inline writes, as a slow one does.
    #[cfg(test)]
    pub(crate) fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{file_with, read_op, write_op};

    /// Buffered writes up to the limit run (and land); durable, larger, O_DIRECT-file and
    /// paused ones are left alone.
    #[test]
    fn only_small_buffered_writes_run_and_a_pause_holds() {
        let dir = crate::testutil::TempDir::new("inline-writes");
        let (f, _) = file_with(&dir, 4096);
        let path = dir.path().join("f");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let small = vec![0x5au8; 4096];
        let mut w = InlineWrites::new(true);
        assert_eq!(
            w.try_run(&write_op(fd, 0, 0, &small, false))
                .unwrap()
                .unwrap(),
            4096
        );
        assert_eq!(std::fs::read(&path).unwrap(), small);
        assert!(
            w.try_run(&write_op(fd, 0, 0, &small, true)).is_none(),
            "RWF_DSYNC"
        );
        let large = vec![1u8; INLINE_WRITE_MAX + 1];
        assert!(
            w.try_run(&write_op(fd, 0, 0, &large, false)).is_none(),
            "too large"
        );
        let mut read = vec![0u8; 4096];
        let op = read_op(fd, 0, 0, &mut read);
        assert!(w.try_run(&op).is_none(), "reads are not its business");
        w.pause_until(Instant::now() + Duration::from_secs(60));
        assert!(
            w.try_run(&write_op(fd, 0, 0, &small, false)).is_none(),
            "paused"
        );
        w.pause_until(Instant::now());
        assert!(
            w.try_run(&write_op(fd, 0, 0, &small, false)).is_some(),
            "pause over"
        );
        assert!(InlineWrites::new(false)
            .try_run(&write_op(fd, 0, 0, &small, false))
            .is_none());
    }
}
