//! `aio=threads`: a pool of workers doing blocking preadv2/pwritev2/fdatasync/fallocate.
//!
//! Like QEMU's thread pool, workers start on demand: a submission that finds more queued jobs
//! than idle workers starts another, up to the limit, so the pool grows to the queue depth the
//! device actually uses (a fixed small pool capped 4 KiB O_DIRECT reads at depth 32 to 0.75x
//! of qemu-img bench). Workers stay until the engine is dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{run_blocking, Engine, EngineCompletion, EngineOp};
use crate::options::AioMode;
use crate::BlockError;

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
}

impl ThreadsEngine {
    /// A pool of at most `max_threads` workers (at least one) that signal `evt` after each
    /// completion. One worker starts at once, the others on demand.
    pub fn new(evt: EventFd, max_threads: usize) -> Result<ThreadsEngine, BlockError> {
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
        shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(EngineCompletion { id: op.id, result });
        if let Err(e) = shared.evt.write(1) {
            log::error!("block worker: cannot signal completion eventfd: {e}");
        }
    }
}

impl Engine for ThreadsEngine {
    fn mode(&self) -> AioMode {
        AioMode::Threads
    }

    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(op);
        let grow = q.jobs.len() > q.idle && self.workers.len() < self.max_threads;
        drop(q);
        self.shared.work.notify_one();
        if grow {
            if let Err(e) = self.spawn() {
                // The workers already running will get to the job.
                log::warn!("block: {e}");
            }
        }
        Ok(())
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
