//! Operations on the submitting thread, for the engines that hand work to the kernel or to
//! workers. Two cases, with one pause between them:
//!
//! **Small buffered writes** (`cache=writeback|writethrough|unsafe`). A buffered write is a
//! copy into the page cache under the file's inode lock, which ext4 and XFS take
//! exclusively, so writes to one image never run in parallel whichever thread issues them.
//! Handing one elsewhere only adds two wake-ups and a fight for the lock:
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
//! and stay asynchronous.
//!
//! **A lone request** (any engine, any cache mode). When the submitting thread serves this
//! one disk and nothing else ([`Inline::set_alone`]), a batch of exactly one read or write of
//! at most [`LONE_MAX`] with nothing else in flight is a guest at queue depth 1: the thread
//! would only wait for its completion, so it may as well wait for it where it submits.
//! `aio=threads` does the system call itself and spares the hand-off to a worker and back
//! (two wake-ups; about 36 µs on the PVM hosts here, where fio psync reads 4 KiB with
//! O_DIRECT in 57 µs and the hand-off made it 93 µs); `aio=io_uring` submits and waits in one
//! io_uring_enter and `aio=native` waits in io_getevents after its io_submit, instead of a
//! trip through the event loop and the completion eventfd. A thread that serves other disks
//! or queues never does this: one of them would wait behind the request.
//!
//! Either way an inline operation can block (ext4 refuses RWF_NOWAIT for buffered writes:
//! dirty-page throttling, a journal commit; a slow device under O_DIRECT): one that takes
//! over [`INLINE_SLOW`] (a buffered write) or [`LONE_SLOW`] (a lone request) sends everything
//! the asynchronous way for [`INLINE_BACKOFF`], so a slow disk costs the submitting thread one
//! stall a second at most.

use std::io;
use std::time::{Duration, Instant};

use super::{run_blocking, EngineOp, OpKind};

/// Largest buffered write run inline: larger ones would hold the submitting thread for
/// longer than its other queues and disks should wait.
pub const INLINE_WRITE_MAX: usize = 1 << 20;
/// Largest lone read or write run inline: a 64 KiB transfer takes about as long as the
/// hand-off it spares; for larger ones the hand-off is lost in the transfer.
pub const LONE_MAX: usize = 64 << 10;
/// An inline buffered write slower than this pauses inline operations (see the module docs).
const INLINE_SLOW: Duration = Duration::from_millis(1);
/// A lone request slower than this does. Far above [`INLINE_SLOW`]: device latency varies
/// (1 ms happens a few times in 20000 O_DIRECT reads here, and each pause lost a second of
/// inline reads), and a lone request keeps nothing else waiting; only a device that stalls
/// should give the thread back to the hand-off.
const LONE_SLOW: Duration = Duration::from_millis(20);
/// How long that pause lasts.
const INLINE_BACKOFF: Duration = Duration::from_secs(1);

/// When an operation may run on the submitting thread.
#[derive(Debug)]
pub(crate) struct Inline {
    /// The file is served through the page cache, so buffered writes are copies into memory
    /// (never with O_DIRECT, where a write waits for the device).
    page_cache: bool,
    /// The submitting thread serves this engine only ([`Inline::set_alone`]).
    alone: bool,
    /// Inline operations are paused until then, after a slow one.
    paused_until: Option<Instant>,
}

impl Inline {
    /// The policy for a file opened with (`page_cache`) or without the host page cache.
    pub(crate) fn new(page_cache: bool) -> Inline {
        Inline {
            page_cache,
            alone: false,
            paused_until: None,
        }
    }

    /// Whether any buffered write may run inline.
    pub(crate) fn writes_enabled(&self) -> bool {
        self.page_cache
    }

    /// Whether lone requests may run inline: the submitting thread serves nothing else.
    pub(crate) fn set_alone(&mut self, alone: bool) {
        self.alone = alone;
    }

    /// Run `op` on this thread if it is a buffered write of at most [`INLINE_WRITE_MAX`] and
    /// inline operations are not paused; its result, or None when it must go the
    /// asynchronous way.
    pub(crate) fn try_run(&mut self, op: &EngineOp) -> Option<io::Result<usize>> {
        let OpKind::Write {
            iovecs,
            dsync: false,
            ..
        } = &op.kind
        else {
            return None;
        };
        if !self.page_cache || iovecs.total() > INLINE_WRITE_MAX {
            return None;
        }
        self.run(op, INLINE_SLOW)
    }

    /// Run `op`, the only operation submitted and nothing else in flight, on this thread if
    /// the thread serves this engine alone and it is a read or write of at most
    /// [`LONE_MAX`]; its result, or None when it must go the asynchronous way.
    pub(crate) fn try_lone(&mut self, op: &EngineOp) -> Option<io::Result<usize>> {
        if !self.lone_allowed(op) {
            return None;
        }
        Some(self.timed(LONE_SLOW, || run_blocking(op)))
    }

    /// Whether the submitting thread may wait for `op`, the only operation submitted and
    /// nothing else in flight, itself: it serves this engine alone, `op` is a read or write
    /// of at most [`LONE_MAX`], and lone requests are not paused. The engines that hand work
    /// to the kernel wait with their own call (io_uring_enter, io_getevents) and then
    /// report with [`Inline::lone_took`].
    pub(crate) fn lone_allowed(&mut self, op: &EngineOp) -> bool {
        let (OpKind::Read { iovecs, .. } | OpKind::Write { iovecs, .. }) = &op.kind else {
            return false;
        };
        self.alone && iovecs.total() <= LONE_MAX && !self.paused()
    }

    /// A lone request was waited for in `took`: pause lone requests if that was slow.
    pub(crate) fn lone_took(&mut self, took: Duration) {
        self.note(took, LONE_SLOW);
    }

    /// Run `op` here unless paused, and pause if it takes longer than `slow`.
    fn run(&mut self, op: &EngineOp, slow: Duration) -> Option<io::Result<usize>> {
        if self.paused() {
            return None;
        }
        Some(self.timed(slow, || run_blocking(op)))
    }

    /// Whether inline operations are paused after a slow one (ending a pause that is over).
    fn paused(&mut self) -> bool {
        match self.paused_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.paused_until = None;
                false
            }
            None => false,
        }
    }

    /// Run `f`, pausing inline operations if it takes longer than `slow`.
    fn timed<T>(&mut self, slow: Duration, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.note(start.elapsed(), slow);
        out
    }

    fn note(&mut self, took: Duration, slow: Duration) {
        if took > slow {
            log::debug!(
                "block: an inline operation took {took:?}; operations go the asynchronous way for a while"
            );
            self.paused_until = Some(Instant::now() + INLINE_BACKOFF);
        }
    }

    /// Pause (or, with a past instant, end the pause of) inline operations, as a slow one
    /// does.
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
        let mut w = Inline::new(true);
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
        assert!(Inline::new(false)
            .try_run(&write_op(fd, 0, 0, &small, false))
            .is_none());
    }

    /// A lone read or write up to LONE_MAX runs only when the thread serves the engine
    /// alone, with or without the page cache; larger ones, flushes and paused ones do not.
    #[test]
    fn lone_requests_run_only_when_alone() {
        let dir = crate::testutil::TempDir::new("inline-lone");
        let (f, data) = file_with(&dir, 2 * LONE_MAX);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut buf = vec![0u8; 4096];
        let mut w = Inline::new(false);
        assert!(
            w.try_lone(&read_op(fd, 0, 0, &mut buf)).is_none(),
            "not alone"
        );
        w.set_alone(true);
        let got = w
            .try_lone(&read_op(fd, 0, 4096, &mut buf))
            .unwrap()
            .unwrap();
        assert_eq!(got, 4096);
        assert_eq!(buf, data[4096..8192]);
        let src = vec![0x42u8; 4096];
        assert!(
            w.try_lone(&write_op(fd, 0, 0, &src, true)).is_some(),
            "durable write"
        );
        assert!(
            w.try_run(&write_op(fd, 0, 0, &src, false)).is_none(),
            "no page cache: no buffered-write rule"
        );
        let mut large = vec![0u8; LONE_MAX + 1];
        assert!(
            w.try_lone(&read_op(fd, 0, 0, &mut large)).is_none(),
            "too large"
        );
        let flush = EngineOp {
            id: 0,
            fd,
            kind: OpKind::Fdatasync,
        };
        assert!(w.try_lone(&flush).is_none(), "flushes wait on the workers");
        w.pause_until(Instant::now() + Duration::from_secs(60));
        assert!(w.try_lone(&read_op(fd, 0, 0, &mut buf)).is_none(), "paused");
    }
}
