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
//! worker whole. Buffered writes stay on the workers: ext4 refuses RWF_NOWAIT for them, and a
//! write can block in dirty-page throttling. So do reads above [`INLINE_MAX`]: copying 1 MiB
//! takes longer than a hand-off, and on the submitting thread the copies of a deep queue run
//! one at a time instead of on several workers (4000 cached 1 MiB reads at depth 4: 0.25 s
//! inline, 0.20 s on the workers, qemu-img bench 0.22-0.26 s).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

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
}

/// The thread-pool engine.
pub struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    max_threads: usize,
    /// Try reads inline with RWF_NOWAIT (page-cache files only; cleared when the file
    /// system refuses the flag).
    inline_reads: bool,
    /// Reads completed inline so far.
    inline_done: u64,
}

impl ThreadsEngine {
    /// A pool of at most `max_threads` workers (at least one) that signal `evt` after each
    /// completion. One worker starts at once, the others on demand. `inline_reads` lets
    /// cached reads complete on the submitting thread; it must be false when the files are
    /// opened with O_DIRECT, where an RWF_NOWAIT read still waits for the device.
    pub fn new(
        evt: EventFd,
        max_threads: usize,
        inline_reads: bool,
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
        });
        let mut engine = ThreadsEngine {
            shared,
            workers: Vec::new(),
            max_threads: max_threads.max(1),
            inline_reads,
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

    /// Reads that completed on the submitting thread.
    pub fn inline_completions(&self) -> u64 {
        self.inline_done
    }

    /// Complete `op` here if it is a read whose data is all in the page cache. Returns the
    /// operation back when a worker has to do it.
    fn try_inline(&mut self, op: EngineOp) -> Option<EngineOp> {
        let OpKind::Read { offset, iovecs } = &op.kind else {
            return Some(op);
        };
        if iovecs.total() > INLINE_MAX {
            return Some(op);
        }
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
    }
}

impl Shared {
    /// Queue a finished operation and signal the eventfd.
    fn complete(&self, c: EngineCompletion) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(c);
        if let Err(e) = self.evt.write(1) {
            log::error!("block: cannot signal completion eventfd: {e}");
        }
    }
}

impl Engine for ThreadsEngine {
    fn mode(&self) -> AioMode {
        AioMode::Threads
    }

    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        let op = if self.inline_reads {
            match self.try_inline(op) {
                Some(op) => op,
                None => return Ok(()),
            }
        } else {
            op
        };
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(op);
        let grow = q.jobs.len() > q.idle && self.workers.len() < self.max_threads;
        // A busy worker looks at the queue before it waits again; only a waiting one needs
        // the wake-up (a futex system call even with no waiter).
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.shared.work.notify_one();
        }
        if grow {
            if let Err(e) = self.spawn() {
                // The workers already running will get to the job.
                log::warn!("block: {e}");
            }
        }
        Ok(())
    }

    fn ready(&mut self) -> bool {
        !self
            .shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
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
    use crate::engine::IoVecs;
    use crate::testutil::TempDir;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn read_op(fd: i32, id: u64, offset: u64, buf: &mut [u8]) -> EngineOp {
        EngineOp {
            id,
            fd,
            kind: OpKind::Read {
                offset,
                iovecs: IoVecs(vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }]),
            },
        }
    }

    fn engine(threads: usize, inline_reads: bool) -> ThreadsEngine {
        ThreadsEngine::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            threads,
            inline_reads,
        )
        .unwrap()
    }

    fn submit(e: &mut ThreadsEngine, op: EngineOp) {
        e.submit(op).map_err(|(e, _)| e).unwrap();
    }

    /// Wait (up to 5 s) for the next completion.
    fn next(e: &mut ThreadsEngine) -> EngineCompletion {
        for _ in 0..5000 {
            if let Some(c) = e.pop_completion() {
                return c;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no completion within 5 s");
    }

    fn file_with(dir: &TempDir, len: usize) -> (std::fs::File, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, data)
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

    /// Without inline reads (O_DIRECT files) and for writes, every operation goes to a worker.
    #[test]
    fn writes_and_direct_engines_never_run_inline() {
        let dir = TempDir::new("threads-direct");
        let (f, data) = file_with(&dir, 16 << 10);
        let mut direct = engine(2, false);
        let mut buf = vec![0u8; 4096];
        submit(&mut direct, read_op(f.as_raw_fd(), 1, 0, &mut buf));
        assert_eq!(next(&mut direct).result.unwrap(), 4096);
        assert_eq!(buf, data[..4096]);
        assert_eq!(direct.inline_completions(), 0);

        let mut cached = engine(2, true);
        let src = vec![0xa5u8; 4096];
        let write = EngineOp {
            id: 3,
            fd: f.as_raw_fd(),
            kind: OpKind::Write {
                offset: 0,
                iovecs: IoVecs(vec![libc::iovec {
                    iov_base: src.as_ptr() as *mut libc::c_void,
                    iov_len: src.len(),
                }]),
                dsync: false,
            },
        };
        submit(&mut cached, write);
        assert_eq!(next(&mut cached).result.unwrap(), 4096);
        assert_eq!(cached.inline_completions(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap()[..4096],
            src[..]
        );
    }
}
