//! `aio=io_uring`: one ring per disk, completions announced through a registered eventfd.
//!
//! Reads and writes go in as READV / WRITEV even with one segment, as QEMU's do: the plain
//! IORING_OP_READ / WRITE (an ITER_UBUF in the kernel) saved a few percent of CPU on cached
//! 4 KiB reads, but with it the rig's L2 guest (and once L1 itself) triple-faulted three
//! boots in a row whenever its images were served by L1's 9p mount (Debian 6.1), and ran
//! clean with READV; a kernel path that mishandles a user buffer it was not written for
//! costs more than the iovec import saves.
//!
//! Operations beyond the ring's capacity wait in a local queue and enter the ring as earlier
//! ones complete, so the completion queue can never overflow.
//!
//! A lone request (a plugged batch of one read or write, nothing else in the ring) on a
//! thread that serves this disk alone is submitted and waited for in one io_uring_enter
//! (`inline.rs`): the thread would only sleep in its event loop until the completion's
//! eventfd woke it, one more system call and wake-up per request at queue depth 1.
//!
//! Small buffered writes (page-cache files) do not go through the ring: ext4 cannot do them
//! without blocking, so the kernel hands each one to an io-wq worker thread and back, 18x
//! slower at depth 1 than a plain pwritev2 on this thread (`inline.rs`). Their completions
//! are announced on the eventfd by this engine, once until the consumer rearms, as the
//! threads engine does.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::inline::Inline;
use super::{Engine, EngineCompletion, EngineOp, OpKind};
use crate::options::AioMode;
use crate::BlockError;

/// The io_uring engine.
pub struct UringEngine {
    ring: IoUring,
    /// Operations in the ring, keyed by user_data; kept so their iovec arrays stay alive.
    inflight: HashMap<u64, EngineOp>,
    next_key: u64,
    capacity: usize,
    waiting: VecDeque<EngineOp>,
    done: VecDeque<EngineCompletion>,
    /// Submission entries are queued without io_uring_enter until unplugged.
    plugged: bool,
    /// When a buffered write runs on the submitting thread instead, and when a lone request
    /// is waited for there.
    inline: Inline,
    /// Writes completed that way so far.
    inline_done: u64,
    /// Lone requests waited for in io_uring_enter so far.
    lone_waits: u64,
    /// This engine wrote the eventfd for an inline completion and the consumer has not
    /// rearmed since: the eventfd is still readable, no other write is needed.
    raised: bool,
    evt: EventFd,
}

impl UringEngine {
    /// Set up a ring of `entries` submission slots that signals `evt`; `page_cache` (the
    /// files are not opened with O_DIRECT) lets small buffered writes run inline.
    pub fn new(evt: EventFd, entries: u32, page_cache: bool) -> Result<UringEngine, BlockError> {
        let entries = entries.max(8);
        // COOP_TASKRUN: completions of work the kernel punted to its workers (buffered writes
        // on ext4, for one) reach this thread when it next enters the kernel or sleeps, instead
        // of by an IPI per completion; the IPIs cost a quarter of the CPU time of 4 KiB
        // writeback writes at depth 32 (perf, 6.18). Kernels before 5.19 refuse the flag.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(BlockError::IoUringSetup)?;
        ring.submitter()
            .register_eventfd(evt.as_raw_fd())
            .map_err(BlockError::IoUringSetup)?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(UringEngine {
            ring,
            inflight: HashMap::new(),
            next_key: 0,
            capacity,
            waiting: VecDeque::new(),
            done: VecDeque::new(),
            plugged: false,
            inline: Inline::new(page_cache),
            inline_done: 0,
            lone_waits: 0,
            raised: false,
            evt,
        })
    }

    /// Writes that completed on the submitting thread.
    pub fn inline_completions(&self) -> u64 {
        self.inline_done
    }

    /// Lone requests that the submitting thread waited for in io_uring_enter.
    pub fn lone_waits(&self) -> u64 {
        self.lone_waits
    }

    /// Whether the submission queue holds one lone request the thread may wait for itself.
    fn waits_alone(&mut self) -> bool {
        self.ring.submission().len() == 1
            && self.inflight.len() == 1
            && self.waiting.is_empty()
            && self.done.is_empty()
            && (self.inflight.values().next()).is_some_and(|op| self.inline.lone_allowed(op))
    }

    /// Queue the completion of an operation run on this thread and make the eventfd
    /// readable, unless this engine already did since the consumer last rearmed.
    fn complete_inline(&mut self, c: EngineCompletion) {
        self.inline_done += 1;
        self.done.push_back(c);
        if !self.raised {
            self.raised = true;
            if let Err(e) = self.evt.write(1) {
                log::error!("block: cannot signal completion eventfd: {e}");
            }
        }
    }

    fn entry(op: &EngineOp) -> squeue::Entry {
        let fd = types::Fd(op.fd);
        match &op.kind {
            OpKind::Read { offset, iovecs } => {
                let cnt = iovecs.0.len().min(libc::UIO_MAXIOV as usize) as u32;
                opcode::Readv::new(fd, iovecs.0.as_ptr(), cnt)
                    .offset(*offset)
                    .build()
            }
            OpKind::Write {
                offset,
                iovecs,
                dsync,
            } => {
                let cnt = iovecs.0.len().min(libc::UIO_MAXIOV as usize) as u32;
                opcode::Writev::new(fd, iovecs.0.as_ptr(), cnt)
                    .offset(*offset)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            OpKind::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
    }

    /// Put `op` in the ring and tell the kernel.
    fn push(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        let entry = Self::entry(&op).user_data(key);
        // SAFETY: the entry's iovec array and buffers stay valid until the completion is reaped:
        // the array is owned by `op`, kept in `inflight` until then, and the buffers are kept by
        // the submitter (module contract of `engine`).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The ring is full of unsubmitted entries: hand them to the kernel and retry once.
            if let Err(e) = self.ring.submit() {
                return Err((BlockError::Submit(e), op));
            }
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                return Err((
                    BlockError::Submit(std::io::Error::other("io_uring submission queue full")),
                    op,
                ));
            }
        }
        self.inflight.insert(key, op);
        if !self.plugged {
            self.flush_submissions();
        }
        Ok(())
    }

    fn flush_submissions(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            // The entries stay in the queue and go in with the next successful submit.
            log::warn!("io_uring submit failed, will retry: {e}");
        }
    }

    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            if let Some(op) = self.inflight.remove(&cqe.user_data()) {
                let res = cqe.result();
                let result = if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                };
                self.done.push_back(EngineCompletion { id: op.id, result });
            }
        }
        while self.inflight.len() < self.capacity {
            let Some(op) = self.waiting.pop_front() else {
                break;
            };
            if let Err((e, op)) = self.push(op) {
                self.done.push_back(EngineCompletion {
                    id: op.id,
                    result: Err(std::io::Error::other(e.to_string())),
                });
            }
        }
    }
}

impl Engine for UringEngine {
    fn mode(&self) -> AioMode {
        AioMode::IoUring
    }

    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        if let Some(result) = self.inline.try_run(&op) {
            self.complete_inline(EngineCompletion { id: op.id, result });
            return Ok(());
        }
        if self.inflight.len() >= self.capacity {
            self.waiting.push_back(op);
            return Ok(());
        }
        self.push(op)
    }

    fn pop_completion(&mut self) -> Option<EngineCompletion> {
        if self.done.is_empty() {
            self.reap();
        }
        self.done.pop_front()
    }

    fn ready(&mut self) -> bool {
        !self.done.is_empty() || !self.ring.completion().is_empty()
    }

    fn rearm(&mut self) {
        self.raised = false;
    }

    fn plug(&mut self) {
        self.plugged = true;
    }

    fn unplug(&mut self) {
        self.plugged = false;
        if self.waits_alone() {
            let start = Instant::now();
            let waited = self.ring.submit_and_wait(1);
            self.inline.lone_took(start.elapsed());
            match waited {
                Ok(_) => {
                    self.lone_waits += 1;
                    return;
                }
                // Whatever was not submitted goes below; a completion is reaped as usual.
                Err(e) => log::debug!("io_uring: waiting for a lone request: {e}"),
            }
        }
        self.flush_submissions();
    }

    fn set_alone(&mut self, alone: bool) {
        self.inline.set_alone(alone);
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.waiting.clear();
        // Buffers of operations in the ring must not be freed before the kernel is done.
        while !self.inflight.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Leaking is the only safe choice left: the kernel may still write.
                    log::error!(
                        "io_uring: cannot wait for {} operations: {e}",
                        self.inflight.len()
                    );
                    std::mem::forget(std::mem::take(&mut self.inflight));
                    break;
                }
            }
            for cqe in self.ring.completion() {
                self.inflight.remove(&cqe.user_data());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{
        check_lone_waits, completed_ids, file_with, filled, submit_reads, write_op,
    };
    use crate::sg::AlignedBuf;
    use crate::testutil::TempDir;

    /// Plugged operations stay in the submission queue (no completion can come) until
    /// unplug hands them to the kernel in one go; unplugged ones go at once.
    #[test]
    fn plugged_reads_wait_for_unplug() {
        let dir = TempDir::new("uring-plug");
        let file = filled(&dir, 0x3c, 64 << 10, false);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = UringEngine::new(evt.try_clone().unwrap(), 32, false).unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(4096, 4096)).collect();
        let fd = file.as_raw_fd();
        e.plug();
        submit_reads(&mut e, fd, &mut bufs[..15], 0);
        assert_eq!(e.ring.submission().len(), 15, "held in user space");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!e.ready() && e.pop_completion().is_none());
        e.unplug();
        assert!(e.ring.submission().is_empty());
        submit_reads(&mut e, fd, &mut bufs[15..], 15);
        assert!(
            e.ring.submission().is_empty(),
            "unplugged: submitted at once"
        );
        assert!(completed_ids(&mut e, 16, 4096) == (0..16).collect::<Vec<u64>>());
        drop(e);
        assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 0x3c)));
    }

    /// A small buffered write completes inside `submit`, announced on the eventfd once until
    /// the consumer rearms; a large one goes through the ring; so does every write when the
    /// file is not served through the page cache.
    #[test]
    fn small_buffered_writes_complete_inline_and_signal_once() {
        let dir = TempDir::new("uring-inline");
        let (f, _) = file_with(&dir, 4 << 20);
        let path = dir.path().join("f");
        let fd = f.as_raw_fd();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = UringEngine::new(evt.try_clone().unwrap(), 32, true).unwrap();
        let a = vec![0xa1u8; 4096];
        let b = vec![0xb2u8; 4096];
        e.submit(write_op(fd, 1, 0, &a, false)).unwrap();
        e.submit(write_op(fd, 2, 4096, &b, false)).unwrap();
        assert_eq!(e.inline_completions(), 2);
        assert!(e.ready());
        assert_eq!(evt.read().unwrap(), 1, "one signal for both");
        e.rearm();
        assert!(completed_ids(&mut e, 2, 4096) == [1, 2]);
        let c = std::fs::read(&path).unwrap();
        assert!(c[..4096] == a[..] && c[4096..8192] == b[..]);

        let large = vec![0x3cu8; crate::engine::INLINE_WRITE_MAX + 4096];
        e.submit(write_op(fd, 3, 0, &large, false)).unwrap();
        assert_eq!(
            e.inline_completions(),
            2,
            "the large write went through the ring"
        );
        assert!(completed_ids(&mut e, 1, large.len()) == [3]);

        let mut direct = UringEngine::new(evt.try_clone().unwrap(), 32, false).unwrap();
        direct.submit(write_op(fd, 4, 0, &a, false)).unwrap();
        assert!(completed_ids(&mut direct, 1, 4096) == [4]);
        assert_eq!(direct.inline_completions(), 0);
    }

    /// A lone request is submitted and waited for in one io_uring_enter on a thread that
    /// serves the engine alone (`testing::check_lone_waits`).
    #[test]
    fn a_lone_request_is_waited_for_in_unplug() {
        let dir = TempDir::new("uring-lone");
        let file = filled(&dir, 0x4d, 64 << 10, true);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = UringEngine::new(evt.try_clone().unwrap(), 32, false).unwrap();
        check_lone_waits(
            &mut e,
            UringEngine::lone_waits,
            &evt,
            file.as_raw_fd(),
            0x4d,
        );
    }
}
