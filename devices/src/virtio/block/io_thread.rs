//! The I/O thread of one virtio-blk device: requests are served here, off
//! the vCPU threads, from activation until reset.
//!
//! ```text
//!          epoll
//!  token 0..n   queue notify eventfds (ioeventfds) -> process that queue
//!  token n      disk completion eventfd             -> complete requests
//!  token n + 1  kill eventfd (reset)                -> wait for the disk, exit
//!  after each wakeup: one interrupt per queue with new used buffers
//! ```
//!
//! The thread owns the disk while it runs and hands it back on exit, so the
//! device can be activated again after a reset.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use platter_block::Disk;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::Worker;

/// Why the thread did not start, with the disk unless it was lost.
pub(super) type SpawnError = Box<(io::Error, Option<Disk>)>;

/// A running I/O thread.
pub(super) struct IoThread {
    kill: EventFd,
    handle: JoinHandle<Disk>,
}

/// Start serving `worker`'s queues. On failure the disk comes back unless
/// the thread itself could not start.
pub(super) fn spawn(worker: Worker) -> Result<IoThread, SpawnError> {
    let (epoll, kill, kill_thread) = match setup(&worker) {
        Ok(s) => s,
        Err(e) => return Err(Box::new((e, Some(worker.into_disk())))),
    };
    let handle = std::thread::Builder::new()
        .name("virtio-blk".into())
        .spawn(move || run(worker, epoll, kill_thread))
        .map_err(|e| Box::new((e, None)))?;
    Ok(IoThread { kill, handle })
}

/// The epoll set and the kill eventfd (and its clone for the thread).
fn setup(worker: &Worker) -> io::Result<(Epoll, EventFd, EventFd)> {
    let kill = EventFd::new(EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    let n = worker.num_queues() as u64;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for pos in 0..worker.num_queues() {
        add(worker.notify_fd(pos).as_raw_fd(), pos as u64)?;
    }
    add(worker.disk().completion_fd().as_raw_fd(), n)?;
    add(kill.as_raw_fd(), n + 1)?;
    let kill_thread = kill.try_clone()?;
    Ok((epoll, kill, kill_thread))
}

impl IoThread {
    /// Stop the thread once the disk has finished what it has; `None` if the
    /// thread panicked and took the disk with it.
    pub(super) fn stop(self) -> Option<Disk> {
        if let Err(e) = self.kill.write(1) {
            log::error!("virtio-blk: cannot stop the I/O thread: {e}");
        }
        match self.handle.join() {
            Ok(disk) => Some(disk),
            Err(_) => {
                log::error!("virtio-blk: the I/O thread panicked; the disk is lost");
                None
            }
        }
    }
}

fn run(mut worker: Worker, epoll: Epoll, kill: EventFd) -> Disk {
    let n = worker.num_queues();
    let completion = n as u64;
    let stop = completion + 1;
    // The driver may have queued requests before DRIVER_OK.
    for pos in 0..n {
        worker.process_queue(pos);
    }
    worker.signal_used();
    let mut events = vec![EpollEvent::default(); n + 2];
    'serve: loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-blk: epoll failed: {e}; waiting for a reset");
                while kill.read().is_err() {
                    wait_readable(&kill);
                }
                break 'serve;
            }
        };
        for ev in &events[..count] {
            match ev.data() {
                t if t == stop => break 'serve,
                t if t == completion => worker.handle_completions(),
                t => {
                    let pos = usize::try_from(t).unwrap_or(usize::MAX);
                    if pos < n {
                        let _ = worker.notify_fd(pos).read();
                        worker.process_queue(pos);
                    }
                }
            }
        }
        worker.signal_used();
    }
    let _ = kill.read();
    worker.drain_disk(|disk| wait_readable(disk.completion_fd()));
    worker.into_disk()
}

/// Block until `fd` is readable (it is non-blocking, so poll for it).
fn wait_readable(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the
    // count passed is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, 100) };
    if r < 0 {
        // EINTR or worse: the caller loops and asks again.
        std::thread::yield_now();
    }
}
