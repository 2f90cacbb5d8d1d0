//! `aio=threads`: a pool of workers doing blocking preadv2/pwritev2/fdatasync/fallocate.
//!
//! Like QEMU's thread pool, workers start on demand: a submission that finds more queued jobs
//! than idle workers starts another, up to the limit, so the pool grows to the queue depth the
//! device actually uses (a fixed small pool capped 4 KiB O_DIRECT reads at depth 32 to 0.75x
//! of qemu-img bench). Workers stay until the engine is dropped.
//!
//! With the host page cache (no O_DIRECT), a read is first tried on the submitting thread with
//! RWF_NOWAIT: when its data is cached the kernel copies it at once and no worker is woken, the
//! way io_uring serves cached reads inline. Handing a cached 4 KiB read to a worker and back
//! cost 30-40 µs of wake-ups against 2 µs of copying (`scripts/bench-img.sh`, rr4k-d1
//! writeback: 0.07x of fio psync). A read that would block, or comes back short, goes to a
//! worker whole. Reads above [`INLINE_MAX`] stay on the workers: copying 1 MiB takes longer
//! than a hand-off, and on the submitting thread the copies of a deep queue run one at a time
//! instead of on several workers, which buffered reads can (4000 cached 1 MiB reads at depth
//! 4: 0.25 s inline, 0.20 s on the workers, qemu-img bench 0.22-0.26 s).
//!
//! Buffered writes (not RWF_DSYNC) up to [`INLINE_WRITE_MAX`] run on the submitting thread
//! too, as a plain pwritev2, at any queue depth; `inline.rs` says why and what it measured.
//! So does a lone request (a plugged batch of one read or write up to 64 KiB with nothing
//! else on the workers) when the submitting thread serves this disk alone
//! ([`Engine::set_alone`]): a guest at queue depth 1 then costs no hand-off.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::inline::Inline;
#[cfg(doc)]
use super::INLINE_WRITE_MAX;
use super::{run_blocking, Engine, EngineCompletion, EngineOp, OpKind};
use crate::options::AioMode;
use crate::BlockError;

/// Largest read tried inline: about as long to copy as a hand-off to a worker takes.
pub const INLINE_MAX: usize = 64 << 10;
struct Queue {
    jobs: VecDeque<EngineOp>,
    shutdown: bool,
    /// Workers waiting for a job.
    idle: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    done: Mutex<VecDeque<EngineCompletion>>,
    evt: EventFd,
    /// The eventfd was written and the consumer has not reset it since ([`Engine::rearm`]):
    /// it is still readable, so a later completion needs no write of its own.
    raised: AtomicBool,
    /// Operations handed to the workers and not finished yet.
    busy: AtomicUsize,
}

/// The thread-pool engine.
pub struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    max_threads: usize,
    /// Try reads inline with RWF_NOWAIT (page-cache files only; cleared when the file
    /// system refuses the flag).
    inline_reads: bool,
    /// When a buffered write or a lone request runs inline.
    inline: Inline,
    /// Operations are held until [`Engine::unplug`].
    plugged: bool,
    /// What was submitted while plugged.
    held: Vec<EngineOp>,
    /// Reads and writes completed inline so far.
    inline_done: u64,
}

impl ThreadsEngine {
    /// A pool of at most `max_threads` workers (at least one) that signal `evt` after each
    /// completion. One worker starts at once, the others on demand. `page_cache` (the files
    /// are not opened with O_DIRECT) lets cached reads and buffered writes (up to
    /// [`INLINE_MAX`] and [`INLINE_WRITE_MAX`]) complete on
    /// the submitting thread; it must be false with O_DIRECT, where an RWF_NOWAIT read still
    /// waits for the device and no write is a copy into memory.
    pub fn new(
        evt: EventFd,
        max_threads: usize,
        page_cache: bool,
    ) -> Result<ThreadsEngine, BlockError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
                idle: 0,
            }),
            work: Condvar::new(),
            done: Mutex::new(VecDeque::new()),
            evt,
            raised: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
        });
        let mut engine = ThreadsEngine {
            shared,
            workers: Vec::new(),
            max_threads: max_threads.max(1),
            inline_reads: page_cache,
            inline: Inline::new(page_cache),
            plugged: false,
            held: Vec::new(),
            inline_done: 0,
        };
        engine.spawn()?;
        Ok(engine)
    }

    fn spawn(&mut self) -> Result<(), BlockError> {
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name(format!("platter-blk-{}", self.workers.len()))
            .spawn(move || worker(&shared))
            .map_err(BlockError::ThreadSpawn)?;
        self.workers.push(handle);
        Ok(())
    }

    /// Workers started so far.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Reads and writes that completed on the submitting thread.
    pub fn inline_completions(&self) -> u64 {
        self.inline_done
    }

    /// Complete `op` here if it is a read of at most [`INLINE_MAX`] whose data is all in
    /// the page cache, or a buffered write of at most [`INLINE_WRITE_MAX`]
    /// (`try_inline_write`). Returns the operation back when a worker
    /// has to do it.
    fn try_inline(&mut self, op: EngineOp) -> Option<EngineOp> {
        let (offset, iovecs) = match &op.kind {
            OpKind::Read { offset, iovecs }
                if self.inline_reads && iovecs.total() <= INLINE_MAX =>
            {
                (offset, iovecs)
            }
            OpKind::Write { .. } => return self.try_inline_write(op),
            _ => return Some(op),
        };
        let ret = iovecs.preadv2(op.fd, *offset, libc::RWF_NOWAIT);
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
                self.inline_reads = false;
            }
            return Some(op);
        }
        if ret as usize != iovecs.total() {
            // Partly cached, or the end of the file: the worker reads it all and reports
            // exactly what a plain preadv would.
            return Some(op);
        }
        self.inline_done += 1;
        self.shared.complete(EngineCompletion {
            id: op.id,
            result: Ok(ret as usize),
        });
        None
    }

    /// Run a small buffered write here (`inline.rs`).
    fn try_inline_write(&mut self, op: EngineOp) -> Option<EngineOp> {
        let Some(result) = self.inline.try_run(&op) else {
            return Some(op);
        };
        self.inline_done += 1;
        self.shared.complete(EngineCompletion { id: op.id, result });
        None
    }

    /// Whether operations handed to the workers have not finished yet.
    pub(crate) fn busy(&self) -> bool {
        self.shared.busy.load(Ordering::Acquire) > 0
    }

    /// Queue `ops` for the workers under one lock, wake as many idle ones and start more
    /// while the queue outgrows them.
    fn hand_off(&mut self, ops: impl Iterator<Item = EngineOp>) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let before = q.jobs.len();
        for op in ops {
            self.shared.busy.fetch_add(1, Ordering::AcqRel);
            q.jobs.push_back(op);
        }
        let added = q.jobs.len() - before;
        if added == 0 {
            return;
        }
        let want = q.jobs.len().saturating_sub(q.idle);
        let grow = want.min(self.max_threads.saturating_sub(self.workers.len()));
        // A busy worker looks at the queue before it waits again; only a waiting one needs
        // the wake-up (a futex system call even with no waiter).
        let wake = added.min(q.idle);
        drop(q);
        for _ in 0..wake {
            self.shared.work.notify_one();
        }
        for _ in 0..grow {
            if let Err(e) = self.spawn() {
                // The workers already running will get to the jobs.
                log::warn!("block: {e}");
                break;
            }
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let op = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(op) = q.jobs.pop_front() {
                    break op;
                }
                if q.shutdown {
                    return;
                }
                q.idle += 1;
                q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle -= 1;
            }
        };
        let result = run_blocking(&op);
        shared.complete(EngineCompletion { id: op.id, result });
        shared.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Queue a finished operation, and signal the eventfd unless it is still readable from
    /// an earlier signal the consumer has not reset (see [`Engine`]): the one signal stands
    /// for every completion queued until the consumer resets the eventfd and rearms, as
    /// QEMU's thread pool has one completion bottom half. At depth 32 that saves most of the
    /// eventfd writes and the consumer's wake-ups; for a consumer that takes completions
    /// without resetting the eventfd while it finds some after each submission
    /// ([`crate::Disk::take_ready`], as `platter img bench` does), completions on the
    /// submitting thread cost no write at all (a fifth of a cached 4 KiB read's time).
    fn complete(&self, c: EngineCompletion) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(c);
        // AcqRel: the consumer's rearm (a swap too) then sees this push when it pops.
        if !self.raised.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.evt.write(1) {
                log::error!("block: cannot signal completion eventfd: {e}");
            }
        }
    }

    /// The consumer has reset the eventfd: the next completion signals again.
    fn rearm(&self) {
        self.raised.swap(false, Ordering::AcqRel);
    }
}

impl Engine for ThreadsEngine {
    fn mode(&self) -> AioMode {
        AioMode::Threads
    }

    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        let op = if self.inline_reads || self.inline.writes_enabled() {
            match self.try_inline(op) {
                Some(op) => op,
                None => return Ok(()),
            }
        } else {
            op
        };
        if self.plugged {
            self.held.push(op);
        } else {
            self.hand_off(std::iter::once(op));
        }
        Ok(())
    }

    fn plug(&mut self) {
        self.plugged = true;
    }

    fn unplug(&mut self) {
        self.plugged = false;
        if let [op] = self.held.as_slice() {
            if !self.busy() {
                if let Some(result) = self.inline.try_lone(op) {
                    let id = op.id;
                    self.held.clear();
                    self.inline_done += 1;
                    self.shared.complete(EngineCompletion { id, result });
                    return;
                }
            }
        }
        if self.held.is_empty() {
            return;
        }
        // Handed back empty, the vector keeps its capacity for the next batch.
        let mut held = std::mem::take(&mut self.held);
        self.hand_off(held.drain(..));
        self.held = held;
    }

    fn set_alone(&mut self, alone: bool) {
        self.inline.set_alone(alone);
    }

    fn ready(&mut self) -> bool {
        !self
            .shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn rearm(&mut self) {
        self.shared.rearm();
    }

    fn pop_completion(&mut self) -> Option<EngineCompletion> {
        self.shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

impl Drop for ThreadsEngine {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.hand_off(held.into_iter());
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.shared.work.notify_all();
        // Workers drain the queue before exiting, so no operation outlives its buffers.
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{completed_ids, file_with, next, read_op, submit, write_op};
    use crate::engine::{INLINE_WRITE_MAX, LONE_MAX};
    use crate::testutil::TempDir;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn engine(threads: usize, page_cache: bool) -> ThreadsEngine {
        ThreadsEngine::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            threads,
            page_cache,
        )
        .unwrap()
    }

    /// Completions that pile up before the consumer resets the eventfd cost one signal; the
    /// first one after a reset and rearm signals again; a consumer that pops without
    /// resetting gets no more writes, and the eventfd stays readable for it.
    #[test]
    fn one_signal_stands_for_the_completions_until_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = ThreadsEngine::new(evt.try_clone().unwrap(), 1, false).unwrap();
        let done = |id| EngineCompletion { id, result: Ok(0) };
        e.shared.complete(done(1));
        e.shared.complete(done(2));
        e.shared.complete(done(3));
        assert_eq!(evt.read().unwrap(), 1, "one signal for three");
        e.rearm();
        assert!(e.ready());
        let ids: Vec<u64> = std::iter::from_fn(|| e.pop_completion().map(|c| c.id)).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(evt.read().is_err(), "nothing signalled since the read");
        e.shared.complete(done(4));
        assert_eq!(e.pop_completion().map(|c| c.id), Some(4));
        // Not reset: the eventfd is readable still, so these write nothing.
        e.shared.complete(done(5));
        e.shared.complete(done(6));
        assert_eq!(evt.read().unwrap(), 1, "the one signal of completion 4");
        e.rearm();
        e.shared.complete(done(7));
        assert_eq!(evt.read().unwrap(), 1, "reset and rearmed: signals again");
    }

    /// A read of cached data completes before `submit` returns; the data is the file's.
    #[test]
    fn cached_reads_complete_inline() {
        let dir = TempDir::new("threads-inline");
        let (f, data) = file_with(&dir, 64 << 10);
        let mut e = engine(4, true);
        let mut buf = vec![0u8; 8192];
        submit(&mut e, read_op(f.as_raw_fd(), 7, 4096, &mut buf));
        assert_eq!(e.inline_completions(), 1);
        let c = e.pop_completion().expect("completed inline");
        assert_eq!((c.id, c.result.unwrap()), (7, 8192));
        assert_eq!(buf, data[4096..12288]);
    }

    /// A cached read above INLINE_MAX still goes to a worker.
    #[test]
    fn large_reads_go_to_a_worker() {
        let dir = TempDir::new("threads-large");
        let (f, data) = file_with(&dir, 2 * INLINE_MAX);
        let mut e = engine(4, true);
        let mut buf = vec![0u8; INLINE_MAX + 4096];
        submit(&mut e, read_op(f.as_raw_fd(), 1, 0, &mut buf));
        assert_eq!(next(&mut e).result.unwrap(), buf.len());
        assert_eq!(buf, data[..INLINE_MAX + 4096]);
        assert_eq!(e.inline_completions(), 0);
    }

    /// Reads that the page cache cannot serve whole (past the end of the file, or evicted)
    /// go to a worker and give exactly what a plain preadv gives.
    #[test]
    fn short_and_uncached_reads_go_to_a_worker() {
        let dir = TempDir::new("threads-worker");
        let (f, data) = file_with(&dir, 64 << 10);
        let mut e = engine(4, true);
        let mut tail = vec![0u8; 8192];
        submit(
            &mut e,
            read_op(f.as_raw_fd(), 1, (64 << 10) - 4096, &mut tail),
        );
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(tail[..4096], data[(64 << 10) - 4096..]);

        f.sync_all().unwrap();
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let mut buf = vec![0u8; 4096];
        submit(&mut e, read_op(f.as_raw_fd(), 2, 32 << 10, &mut buf));
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(buf, data[32 << 10..(32 << 10) + 4096]);
        assert_eq!(e.inline_completions(), 0);
    }

    /// Without the page cache (O_DIRECT files) every operation goes to a worker, writes too.
    #[test]
    fn direct_engines_never_run_inline() {
        let dir = TempDir::new("threads-direct");
        let (f, data) = file_with(&dir, 16 << 10);
        let mut direct = engine(2, false);
        let mut buf = vec![0u8; 4096];
        submit(&mut direct, read_op(f.as_raw_fd(), 1, 0, &mut buf));
        assert_eq!(next(&mut direct).result.unwrap(), 4096);
        assert_eq!(buf, data[..4096]);
        let src = vec![0x3cu8; 4096];
        submit(&mut direct, write_op(f.as_raw_fd(), 2, 0, &src, false));
        assert_eq!(next(&mut direct).result.unwrap(), 4096);
        assert_eq!(direct.inline_completions(), 0);
    }

    /// On a thread that serves the engine alone, a batch of one small read or write with
    /// nothing else in flight completes on unplug, on the submitting thread, O_DIRECT-style
    /// engines included; a batch of two, a request while another is in flight, a large one,
    /// or any request on a shared thread go to the workers.
    #[test]
    fn a_lone_request_runs_on_the_submitting_thread_when_alone() {
        let dir = TempDir::new("threads-lone");
        let (f, data) = file_with(&dir, 256 << 10);
        let fd = f.as_raw_fd();
        let mut e = engine(2, false);
        let mut buf = vec![0u8; 4096];

        let lone = |e: &mut ThreadsEngine, op| {
            e.plug();
            submit(e, op);
            e.unplug();
        };
        lone(&mut e, read_op(fd, 1, 4096, &mut buf));
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(e.inline_completions(), 0, "not alone: handed off");

        e.set_alone(true);
        e.plug();
        submit(&mut e, read_op(fd, 2, 8192, &mut buf));
        assert!(e.pop_completion().is_none(), "held until unplug");
        e.unplug();
        assert_eq!(e.inline_completions(), 1);
        let c = e.pop_completion().expect("completed on unplug");
        assert_eq!((c.id, c.result.unwrap()), (2, 4096));
        assert_eq!(buf, data[8192..12288]);
        let src = vec![0x6bu8; 4096];
        lone(&mut e, write_op(fd, 3, 0, &src, true));
        assert_eq!(
            e.inline_completions(),
            2,
            "writes too, durable ones included"
        );
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert!(std::fs::read(dir.path().join("f")).unwrap()[..4096] == src[..]);

        let mut other = vec![0u8; 4096];
        e.plug();
        submit(&mut e, read_op(fd, 4, 0, &mut buf));
        submit(&mut e, read_op(fd, 5, 4096, &mut other));
        e.unplug();
        assert_eq!(completed_ids(&mut e, 2, 4096), [4, 5]);
        assert_eq!(e.inline_completions(), 2, "a batch of two: handed off");

        e.shared.busy.fetch_add(1, Ordering::AcqRel);
        lone(&mut e, read_op(fd, 6, 0, &mut buf));
        assert_eq!(next(&mut e).id, 6);
        e.shared.busy.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(e.inline_completions(), 2, "another in flight: handed off");

        let mut large = vec![0u8; LONE_MAX + 4096];
        lone(&mut e, read_op(fd, 7, 0, &mut large));
        assert_eq!(next(&mut e).result.unwrap(), large.len());
        assert_eq!(e.inline_completions(), 2, "above LONE_MAX: handed off");
        assert!(large[4096..] == data[4096..LONE_MAX + 4096]);
    }

    /// Wait until every worker waits for a job.
    fn settle(e: &ThreadsEngine) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.shared.queue.lock().unwrap().idle < e.workers.len() {
            assert!(Instant::now() < deadline, "workers never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Buffered writes up to INLINE_WRITE_MAX run on the submitting thread, also while
    /// earlier ones wait to be collected; durable (RWF_DSYNC) and larger writes go to a
    /// worker, and so do small ones while inline writes are paused after a slow one.
    #[test]
    fn small_buffered_writes_run_inline() {
        let dir = TempDir::new("threads-write");
        let (f, _) = file_with(&dir, 2 << 20);
        let mut e = engine(2, true);
        let fd = f.as_raw_fd();
        let contents = || std::fs::read(dir.path().join("f")).unwrap();

        let small = vec![0xa5u8; 4096];
        settle(&e);
        submit(&mut e, write_op(fd, 1, 0, &small, false));
        assert_eq!(e.inline_completions(), 1);
        // The first completion is not collected yet: the next write runs inline all the same.
        submit(&mut e, write_op(fd, 2, 0, &small, false));
        assert_eq!(e.inline_completions(), 2);
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert!(contents()[..4096] == small[..], "the inline write landed");

        let durable = vec![0x5au8; 4096];
        settle(&e);
        submit(&mut e, write_op(fd, 3, 0, &durable, true));
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        let mid = vec![0x11u8; 128 << 10];
        submit(&mut e, write_op(fd, 7, 0, &mid, false));
        assert_eq!(
            e.inline_completions(),
            3,
            "above the reads' limit, still inline"
        );
        assert_eq!(next(&mut e).result.unwrap(), mid.len());
        let large = vec![0x77u8; INLINE_WRITE_MAX + 4096];
        settle(&e);
        submit(&mut e, write_op(fd, 4, 0, &large, false));
        assert_eq!(next(&mut e).result.unwrap(), large.len());
        assert_eq!(e.inline_completions(), 3);

        e.inline
            .pause_until(Instant::now() + Duration::from_secs(60));
        settle(&e);
        submit(&mut e, write_op(fd, 5, 0, &small, false));
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(e.inline_completions(), 3);
        e.inline.pause_until(Instant::now());
        settle(&e);
        submit(&mut e, write_op(fd, 6, 0, &small, false));
        assert_eq!(next(&mut e).result.unwrap(), 4096);
        assert_eq!(e.inline_completions(), 4, "the pause ends");
        let c = contents();
        assert!(c[..4096] == small[..], "the last small write");
        assert!(c[4096..large.len()] == large[4096..], "the large write");
    }
}
