//! `aio=native`: Linux AIO (io_setup / io_submit / io_getevents) through raw syscalls.
//!
//! Reads and writes go to the kernel as IOCB_CMD_PREADV / IOCB_CMD_PWRITEV with
//! IOCB_FLAG_RESFD, so every completion bumps the disk's eventfd. Completions are reaped from
//! the AIO ring the kernel maps at the context address (as libaio and QEMU do), falling back to
//! io_getevents when the ring header is not the known layout. fdatasync and fallocate have no
//! useful Linux AIO form, so, like QEMU, they run on a small thread pool that signals the same
//! eventfd.
//!
//! Between [`Engine::plug`] and [`Engine::unplug`] reads and writes are held and then go in
//! one io_submit (a device popping a batch from its ring), as QEMU's linux-aio does.
//!
//! A lone request (a plugged batch of one read or write, nothing else in flight) on a thread
//! that serves this disk alone is submitted and then waited for in io_getevents (`inline.rs`):
//! the thread would only sleep in its event loop until the eventfd woke it.
//!
//! Linux AIO is only asynchronous with O_DIRECT (buffered io_submit blocks in the caller), so
//! [`super::new_engine`] refuses it without O_DIRECT, as QEMU does.
//!
//! ```text
//!  iocb ABI (64 bytes, little endian)      aio ring at ctx (mapped by the kernel)
//!  0  aio_data      u64                    0  id, nr, head, tail       u32 each
//!  8  aio_key       u32                    16 magic 0xa10a10a1, compat, incompat
//!  12 aio_rw_flags  u32 (RWF_*)            28 header_length
//!  16 opcode u16 · reqprio i16             32 io_event[nr]: data, obj, res, res2 (u64 each)
//!  20 aio_fildes    u32
//!  24 aio_buf (iovec array) · 32 nbytes (iovec count) · 40 offset
//!  48 reserved · 56 aio_flags u32 · 60 aio_resfd u32
//! ```

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::inline::Inline;
use super::threads::ThreadsEngine;
use super::{Engine, EngineCompletion, EngineOp, OpKind};
use crate::options::AioMode;
use crate::BlockError;

const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;
/// Threads serving fdatasync and fallocate.
const SYNC_THREADS: usize = 2;

/// `struct iocb` from <linux/aio_abi.h> (x86-64 / little-endian layout).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// Header of the ring the kernel maps at the context address (fs/aio.c `struct aio_ring`).
#[repr(C)]
struct AioRing {
    id: u32,
    nr: u32,
    head: AtomicU32,
    tail: AtomicU32,
    magic: u32,
    compat_features: u32,
    incompat_features: u32,
    header_length: u32,
}

type AioContext = libc::c_ulong;

fn io_setup(nr: u32) -> io::Result<AioContext> {
    let mut ctx: AioContext = 0;
    // SAFETY: io_setup writes the context id to the valid pointer.
    let r = unsafe { libc::syscall(libc::SYS_io_setup, nr as libc::c_long, &mut ctx) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ctx)
}

/// io_getevents into `evs` (again when interrupted): how many came. With `min` = 0 it returns
/// at once; otherwise it blocks until at least `min` operations finished.
fn io_getevents(ctx: AioContext, min: usize, evs: &mut [IoEvent]) -> io::Result<usize> {
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let timeout: *const libc::timespec = if min == 0 { &zero } else { std::ptr::null() };
    loop {
        // SAFETY: valid event array of the given length; the timeout is null (block) or
        // points at `zero`, which outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx,
                min as libc::c_long,
                evs.len() as libc::c_long,
                evs.as_mut_ptr(),
                timeout,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The Linux AIO engine.
pub struct NativeEngine {
    ctx: AioContext,
    /// Operations in the kernel, keyed by aio_data; kept so their iovec arrays stay alive.
    inflight: HashMap<u64, EngineOp>,
    next_key: u64,
    capacity: usize,
    waiting: VecDeque<EngineOp>,
    done: VecDeque<EngineCompletion>,
    /// fdatasync and fallocate.
    pool: ThreadsEngine,
    evt: EventFd,
    /// Whether completions can be read straight from the mapped ring.
    user_ring: bool,
    /// Reads and writes are held in `held` until unplugged, then go in one io_submit.
    plugged: bool,
    held: Vec<EngineOp>,
    /// When a lone request is waited for on the submitting thread.
    inline: Inline,
    /// Lone requests finished when `unplug` returned (found in the ring after io_submit,
    /// or waited for in io_getevents) so far.
    lone_waits: u64,
}

impl NativeEngine {
    /// Set up an AIO context for `entries` operations in flight that signals `evt`.
    pub fn new(evt: EventFd, entries: u32) -> Result<NativeEngine, BlockError> {
        let entries = entries.max(8);
        let ctx = io_setup(entries).map_err(BlockError::NativeAioSetup)?;
        // SAFETY: a successful io_setup maps the ring header at `ctx`; it is only read here.
        let (magic, incompat, hdr) = unsafe {
            let ring = ctx as *const AioRing;
            (
                (*ring).magic,
                (*ring).incompat_features,
                (*ring).header_length,
            )
        };
        let user_ring = magic == AIO_RING_MAGIC
            && incompat == 0
            && hdr as usize == std::mem::size_of::<AioRing>();
        let pool = ThreadsEngine::new(
            evt.try_clone().map_err(BlockError::EventFd)?,
            SYNC_THREADS,
            false,
        )?;
        Ok(NativeEngine {
            ctx,
            inflight: HashMap::new(),
            next_key: 0,
            capacity: entries as usize,
            waiting: VecDeque::new(),
            done: VecDeque::new(),
            pool,
            evt,
            user_ring,
            plugged: false,
            held: Vec::new(),
            inline: Inline::new(false),
            lone_waits: 0,
        })
    }

    /// Lone requests that had finished when `unplug` returned.
    pub fn lone_waits(&self) -> u64 {
        self.lone_waits
    }

    /// Whether the held batch is one lone request the thread may wait for itself.
    fn waits_alone(&mut self) -> bool {
        matches!(self.held.as_slice(), [op] if self.inline.lone_allowed(op))
            && self.inflight.is_empty()
            && self.waiting.is_empty()
            && self.done.is_empty()
            && !self.pool.busy()
    }

    /// Block until at least one operation in the kernel finishes and take what finished.
    fn wait_one(&mut self) -> io::Result<()> {
        let mut evs = [IoEvent::default(); 8];
        let n = io_getevents(self.ctx, 1, &mut evs)?;
        for ev in &evs[..n] {
            self.take_event(*ev);
        }
        Ok(())
    }

    /// Submit the held operations with one io_submit (more if the kernel takes part of
    /// them). They were accepted by `submit` already, so a refusal becomes their completion.
    fn submit_held(&mut self) {
        let mut ops = std::mem::take(&mut self.held);
        while !ops.is_empty() {
            let mut iocbs: Vec<Iocb> = ops.iter().map(|op| self.iocb(op)).collect();
            match self.io_submit(&mut iocbs) {
                Ok(taken) => {
                    for (op, iocb) in ops.drain(..taken.min(ops.len())).zip(&iocbs) {
                        self.inflight.insert(iocb.aio_data, op);
                    }
                }
                // The context is full: the rest waits for slots, in order.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && !self.inflight.is_empty() => {
                    for op in ops.drain(..).rev() {
                        self.waiting.push_front(op);
                    }
                }
                // The first one is refused; the others may still go.
                Err(e) => {
                    let op = ops.remove(0);
                    self.done.push_back(EngineCompletion {
                        id: op.id,
                        result: Err(e),
                    });
                }
            }
        }
    }

    /// io_submit of `iocbs` (again when interrupted): how many the kernel took, at least one.
    fn io_submit(&self, iocbs: &mut [Iocb]) -> io::Result<usize> {
        let mut list: Vec<*mut Iocb> = iocbs.iter_mut().map(|i| i as *mut Iocb).collect();
        loop {
            // SAFETY: `list` points at valid iocbs that outlive the call; their iovec arrays
            // are owned by the operations, which the caller keeps in `inflight` for as long
            // as the kernel has them, and the buffers are kept by the submitter (module
            // contract of `engine`).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    list.len() as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            if r > 0 {
                return Ok(r as usize);
            }
            let e = if r < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other("io_submit accepted no request")
            };
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// The iocb for `op`, under a fresh key (its aio_data).
    fn iocb(&mut self, op: &EngineOp) -> Iocb {
        let (opcode, offset, iovecs, rw_flags) = match &op.kind {
            OpKind::Read { offset, iovecs } => (IOCB_CMD_PREADV, *offset, iovecs, 0),
            OpKind::Write {
                offset,
                iovecs,
                dsync,
            } => (
                IOCB_CMD_PWRITEV,
                *offset,
                iovecs,
                if *dsync { libc::RWF_DSYNC } else { 0 },
            ),
            OpKind::Fdatasync | OpKind::Fallocate { .. } => unreachable!("sent to the pool"),
        };
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        let cnt = iovecs.0.len().min(libc::UIO_MAXIOV as usize);
        Iocb {
            aio_data: key,
            aio_rw_flags: rw_flags,
            aio_lio_opcode: opcode,
            aio_fildes: op.fd as u32,
            aio_buf: iovecs.0.as_ptr() as u64,
            aio_nbytes: cnt as u64,
            aio_offset: offset as i64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.evt.as_raw_fd() as u32,
            ..Default::default()
        }
    }

    fn push(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        let mut iocb = [self.iocb(&op)];
        match self.io_submit(&mut iocb) {
            Ok(_) => {
                self.inflight.insert(iocb[0].aio_data, op);
                Ok(())
            }
            // The context is full: wait for a slot.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && !self.inflight.is_empty() => {
                self.waiting.push_front(op);
                Ok(())
            }
            Err(e) => Err((BlockError::Submit(e), op)),
        }
    }

    fn take_event(&mut self, ev: IoEvent) {
        if let Some(op) = self.inflight.remove(&ev.data) {
            let result = if ev.res < 0 {
                Err(io::Error::from_raw_os_error(-ev.res as i32))
            } else {
                Ok(ev.res as usize)
            };
            self.done.push_back(EngineCompletion { id: op.id, result });
        }
    }

    /// Collect finished operations without blocking.
    fn reap(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        if self.user_ring {
            let ring = self.ctx as *const AioRing;
            // SAFETY: the kernel keeps the ring mapped at `ctx` until io_destroy; head and tail
            // are accessed atomically, events between head and tail are complete (the kernel
            // publishes tail after writing them, hence the acquire load).
            unsafe {
                let nr = (*ring).nr;
                let tail = (*ring).tail.load(Ordering::Acquire);
                let mut head = (*ring).head.load(Ordering::Relaxed);
                let events =
                    (ring as *const u8).add(std::mem::size_of::<AioRing>()) as *const IoEvent;
                while head != tail {
                    let ev = std::ptr::read_volatile(events.add(head as usize));
                    head = (head + 1) % nr;
                    self.take_event(ev);
                }
                fence(Ordering::Release);
                (*ring).head.store(head, Ordering::Release);
            }
        } else {
            let mut evs = [IoEvent::default(); 64];
            // An error leaves the events where they are, for the next reap.
            while let Ok(n) = io_getevents(self.ctx, 0, &mut evs) {
                for ev in &evs[..n] {
                    self.take_event(*ev);
                }
                if n < evs.len() {
                    break;
                }
            }
        }
        while self.inflight.len() < self.capacity {
            let Some(op) = self.waiting.pop_front() else {
                break;
            };
            let before = self.waiting.len();
            if let Err((e, op)) = self.push(op) {
                self.done.push_back(EngineCompletion {
                    id: op.id,
                    result: Err(io::Error::other(e.to_string())),
                });
            } else if self.waiting.len() > before {
                break; // EAGAIN: try again after the next completion
            }
        }
    }
}

impl Engine for NativeEngine {
    fn mode(&self) -> AioMode {
        AioMode::Native
    }

    fn submit(&mut self, op: EngineOp) -> Result<(), (BlockError, EngineOp)> {
        if matches!(op.kind, OpKind::Fdatasync | OpKind::Fallocate { .. }) {
            return self.pool.submit(op);
        }
        if self.inflight.len() + self.held.len() >= self.capacity || !self.waiting.is_empty() {
            self.waiting.push_back(op);
            return Ok(());
        }
        if self.plugged {
            self.held.push(op);
            return Ok(());
        }
        self.push(op)
    }

    fn pop_completion(&mut self) -> Option<EngineCompletion> {
        if self.done.is_empty() {
            self.reap();
        }
        self.done.pop_front().or_else(|| self.pool.pop_completion())
    }

    fn ready(&mut self) -> bool {
        if self.done.is_empty() && self.user_ring {
            // Reading the mapped ring costs no system call.
            self.reap();
        }
        !self.done.is_empty() || self.pool.ready()
    }

    fn rearm(&mut self) {
        self.pool.rearm();
    }

    fn plug(&mut self) {
        self.plugged = true;
    }

    fn unplug(&mut self) {
        self.plugged = false;
        if !self.waits_alone() {
            return self.submit_held();
        }
        self.submit_held();
        if self.inflight.len() == 1 && self.user_ring {
            // Often finished within io_submit already (a fast device; reading the ring
            // costs no system call).
            self.reap();
        }
        if self.inflight.len() == 1 {
            let start = Instant::now();
            let waited = self.wait_one();
            self.inline.lone_took(start.elapsed());
            if let Err(e) = waited {
                // The completion is reaped as usual when the eventfd fires.
                log::debug!("aio: waiting for a lone request: {e}");
            }
        }
        if self.inflight.is_empty() {
            self.lone_waits += 1;
        }
    }

    fn set_alone(&mut self, alone: bool) {
        self.inline.set_alone(alone);
    }
}

impl Drop for NativeEngine {
    fn drop(&mut self) {
        self.waiting.clear();
        self.held.clear();
        // Buffers of operations in the kernel must not be freed before it is done with them.
        let mut evs = [IoEvent::default(); 64];
        while !self.inflight.is_empty() {
            match io_getevents(self.ctx, 1, &mut evs) {
                Ok(n) => {
                    for ev in &evs[..n] {
                        self.inflight.remove(&ev.data);
                    }
                }
                Err(e) => {
                    log::error!(
                        "aio: cannot wait for {} operations: {e}",
                        self.inflight.len()
                    );
                    std::mem::forget(std::mem::take(&mut self.inflight));
                    return; // leak the context too: the kernel may still write
                }
            }
        }
        // SAFETY: no operation is in flight; the context is ours.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{check_lone_waits, completed_ids, filled, submit_reads};
    use crate::sg::AlignedBuf;
    use crate::testutil::TempDir;

    /// Both ways of reaping (the mapped ring and io_getevents) return every completion.
    #[test]
    fn ring_and_syscall_reaping_agree() {
        let dir = TempDir::new("aio");
        let file = filled(&dir, 0x5a, 1 << 20, true);
        for user_ring in [true, false] {
            let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut e = NativeEngine::new(evt.try_clone().unwrap(), 8).unwrap();
            assert!(
                e.user_ring,
                "the kernel's AIO ring layout is not the known one"
            );
            e.user_ring = user_ring;
            let mut bufs: Vec<AlignedBuf> = (0..32).map(|_| AlignedBuf::new(4096, 4096)).collect();
            submit_reads(&mut e, file.as_raw_fd(), &mut bufs, 0);
            assert!(completed_ids(&mut e, 32, 4096) == (0..32).collect::<Vec<u64>>());
            drop(e);
            assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 0x5a)));
        }
    }

    /// Plugged reads wait in user space and go in one io_submit at unplug, every one
    /// completing with its data.
    #[test]
    fn plugged_operations_go_in_one_submit() {
        let dir = TempDir::new("aio-plug");
        let file = filled(&dir, 0x6b, 1 << 20, true);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = NativeEngine::new(evt.try_clone().unwrap(), 16).unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..24).map(|_| AlignedBuf::new(4096, 4096)).collect();
        e.plug();
        submit_reads(&mut e, file.as_raw_fd(), &mut bufs, 0);
        assert_eq!(
            (e.held.len(), e.inflight.len()),
            (16, 0),
            "held up to the capacity"
        );
        assert_eq!(e.waiting.len(), 8);
        e.unplug();
        assert_eq!((e.held.len(), e.inflight.len()), (0, 16));
        assert!(completed_ids(&mut e, 24, 4096) == (0..24).collect::<Vec<u64>>());
        drop(e);
        assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 0x6b)));
    }

    /// A lone request is waited for in io_getevents on a thread that serves the engine
    /// alone (`testing::check_lone_waits`).
    #[test]
    fn a_lone_request_is_waited_for_in_unplug() {
        let dir = TempDir::new("aio-lone");
        let file = filled(&dir, 0x4e, 64 << 10, true);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut e = NativeEngine::new(evt.try_clone().unwrap(), 8).unwrap();
        check_lone_waits(
            &mut e,
            NativeEngine::lone_waits,
            &evt,
            file.as_raw_fd(),
            0x4e,
        );
    }
}
