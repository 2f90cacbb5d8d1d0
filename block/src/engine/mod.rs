//! I/O engines: they run host file operations asynchronously and signal completions on an
//! eventfd.
//!
//! ```text
//!  Disk ──submit(EngineOp)──▶ engine ──▶ preadv2/pwritev2/fdatasync/fallocate on the host fd
//!   ▲                                       │
//!   └──── pop_completion() ◀── eventfd ◀────┘
//! ```
//!
//! An operation's iovecs point at memory the caller keeps alive until the operation completes;
//! the engine keeps the iovec array itself alive.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::eventfd::EventFd;

use crate::options::{AioMode, DiskOptions};
use crate::BlockError;

mod inline;
pub mod native;
#[cfg(test)]
mod testing;
pub mod threads;
pub mod uring;

pub use inline::{INLINE_WRITE_MAX, LONE_MAX};

/// Host iovecs of one operation.
#[derive(Debug)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the iovecs point at memory that the submitter keeps valid and untouched until the
// operation completes (see the module documentation); the array itself is owned.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Total bytes.
    pub fn total(&self) -> usize {
        self.0.iter().map(|v| v.iov_len).sum()
    }

    /// preadv2 from `fd` at `offset` into these iovecs (the first UIO_MAXIOV of them); the
    /// system call's return value.
    pub(crate) fn preadv2(&self, fd: RawFd, offset: u64, flags: libc::c_int) -> isize {
        let cnt = self.0.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs point at memory valid for writes until the operation completes
        // (module contract); `cnt` does not exceed the array length.
        unsafe { libc::preadv2(fd, self.0.as_ptr(), cnt, offset as i64, flags) }
    }
}

/// One host file operation.
#[derive(Debug)]
pub enum OpKind {
    /// preadv at `offset`.
    Read {
        /// Host file offset.
        offset: u64,
        /// Destination.
        iovecs: IoVecs,
    },
    /// pwritev at `offset`, with RWF_DSYNC when `dsync`.
    Write {
        /// Host file offset.
        offset: u64,
        /// Source.
        iovecs: IoVecs,
        /// Make this write durable before completing (writethrough semantics).
        dsync: bool,
    },
    /// fdatasync.
    Fdatasync,
    /// fallocate(mode, offset, len).
    Fallocate {
        /// FALLOC_FL_* flags.
        mode: i32,
        /// Host file offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl OpKind {
    /// A read, or a write (with RWF_DSYNC when `dsync`), of `iovecs` at `offset`.
    pub fn transfer(write: bool, offset: u64, iovecs: IoVecs, dsync: bool) -> OpKind {
        if write {
            OpKind::Write {
                offset,
                iovecs,
                dsync,
            }
        } else {
            OpKind::Read { offset, iovecs }
        }
    }
}

/// A host operation on one file descriptor, tagged with the submitter's id.
#[derive(Debug)]
pub struct EngineOp {
    /// Submitter's id, returned with the completion (need not be unique).
    pub id: u64,
    /// File descriptor; the submitter keeps it open until the operation completes.
    pub fd: RawFd,
    /// What to do.
    pub kind: OpKind,
}

/// A finished operation: bytes transferred (0 for sync and fallocate) or the OS error.
#[derive(Debug)]
pub struct EngineCompletion {
    /// The operation's `id`.
    pub id: u64,
    /// Result.
    pub result: io::Result<usize>,
}

/// An asynchronous engine. Completions are announced by writing to the eventfd given at
/// construction; dropping the engine waits for every operation in flight.
///
/// One signal may stand for several completions, and no new signal comes for a completion
/// that arrives while the eventfd is still readable from an earlier one: after the eventfd
/// fires, the consumer reads (resets) it first, then calls [`Engine::rearm`], then
/// [`Engine::pop_completion`] until it returns None. A consumer may also pop without
/// resetting (after a submission, say); the eventfd then stays readable until it does.
pub trait Engine: Send {
    /// Which engine this is.
    fn mode(&self) -> AioMode;
    /// Start `op`. On failure the operation is handed back untouched.
    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)>;
    /// Take the next finished operation, if any.
    fn pop_completion(&mut self) -> Option<EngineCompletion>;
    /// The consumer has just reset the eventfd: signal again for the next completion.
    /// (Engines whose completions the kernel signals, each one, have nothing to do.)
    fn rearm(&mut self) {}
    /// Whether a finished operation can be taken now, known without a system call (false
    /// when the engine cannot tell that cheaply).
    fn ready(&mut self) -> bool {
        false
    }
    /// Hold operations submitted from now on in user space until [`Engine::unplug`], so a
    /// batch reaches the kernel in one system call (engines that cannot batch ignore it).
    fn plug(&mut self) {}
    /// Hand the held operations to the kernel and stop holding.
    fn unplug(&mut self) {}
    /// Whether the submitting thread serves this engine and nothing else: then an unplugged
    /// batch of one request with nothing else in flight (a guest at queue depth 1) may run,
    /// or be waited for, on that thread within [`Engine::unplug`] instead of through the
    /// eventfd (`inline.rs`).
    fn set_alone(&mut self, _alone: bool) {}
}

/// Build the engine `opts.aio` names, signalling on `evt`.
pub fn new_engine(opts: &DiskOptions, evt: EventFd) -> Result<Box<dyn Engine>, BlockError> {
    Ok(match opts.aio {
        AioMode::Threads => Box::new(threads::ThreadsEngine::new(
            evt,
            opts.threads,
            !opts.cache.direct(),
        )?),
        AioMode::IoUring => Box::new(uring::UringEngine::new(
            evt,
            opts.uring_entries,
            !opts.cache.direct(),
        )?),
        AioMode::Native if !opts.cache.direct() => return Err(BlockError::NativeAioNeedsDirect),
        AioMode::Native => Box::new(native::NativeEngine::new(evt, opts.uring_entries)?),
    })
}

/// Run one operation synchronously on this thread (the threads engine's worker body).
pub(crate) fn run_blocking(op: &EngineOp) -> io::Result<usize> {
    loop {
        let ret: isize = match &op.kind {
            OpKind::Read { offset, iovecs } => iovecs.preadv2(op.fd, *offset, 0),
            OpKind::Write {
                offset,
                iovecs,
                dsync,
            } => {
                let cnt = iovecs.0.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
                let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                // SAFETY: the iovecs point at memory valid for reads until completion.
                unsafe { libc::pwritev2(op.fd, iovecs.0.as_ptr(), cnt, *offset as i64, flags) }
            }
            // SAFETY: plain syscall on a descriptor the submitter keeps open.
            OpKind::Fdatasync => unsafe { libc::fdatasync(op.fd) as isize },
            OpKind::Fallocate { mode, offset, len } => {
                // SAFETY: plain syscall on a descriptor the submitter keeps open.
                unsafe { libc::fallocate64(op.fd, *mode, *offset as i64, *len as i64) as isize }
            }
        };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
