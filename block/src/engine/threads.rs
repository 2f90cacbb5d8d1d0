//! `aio=threads`: a fixed pool of workers doing blocking preadv2/pwritev2/fdatasync/fallocate.

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
}

impl ThreadsEngine {
    /// Start `threads` workers (at least one) that signal `evt` after each completion.
    pub fn new(evt: EventFd, threads: usize) -> Result<ThreadsEngine, BlockError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Mutex::new(VecDeque::new()),
            evt,
        });
        let mut engine = ThreadsEngine {
            shared,
            workers: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&engine.shared);
            let handle = std::thread::Builder::new()
                .name(format!("platter-blk-{i}"))
                .spawn(move || worker(&shared))
                .map_err(BlockError::ThreadSpawn)?;
            engine.workers.push(handle);
        }
        Ok(engine)
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
                q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
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
        drop(q);
        self.shared.work.notify_one();
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
