//! [`DiskPort`]: how a worker reaches its disk. A device whose queues all sit on one I/O
//! thread owns the [`Disk`] outright; a device whose queues are spread over several I/O
//! threads (`iothread = ["a", "b"]`, QEMU's iothread-vq-mapping) has one worker per thread,
//! and they share the disk through a [`Hub`]:
//!
//! ```text
//!  worker on thread a ─┐  submit: tag | port << 48     ┌─ disk completion eventfd
//!                      ├─▶ Mutex<Hub { disk, ... }> ◀──┤  (watched by every worker)
//!  worker on thread b ─┘  completions: whoever drains  └─ port eventfds: "completions
//!                         routes them by port                 routed to you"
//! ```
//!
//! The disk stays one request pipeline (one engine, one range lock, one qcow2 metadata
//! cache), so overlapping requests from different queues are ordered as within one queue;
//! what the threads do in parallel is the virtio side (popping and parsing chains, guest
//! memory, used rings and interrupts) and waiting in the engine.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use platter_block::{Completion, Disk, DiskStats, Request, SubmitError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Port numbers ride in the disk tags above the worker's own tag bits.
const PORT_SHIFT: u32 = 48;
const TAG_MASK: u64 = (1 << PORT_SHIFT) - 1;

/// The disk and what its ports have not collected yet.
struct Hub {
    disk: Disk,
    /// Completions of each port's requests drained by another port.
    routed: Vec<VecDeque<Completion>>,
    /// Each port's eventfd, written when something is routed to it.
    wake: Vec<EventFd>,
    /// Requests each port submitted and has not collected.
    in_flight: Vec<usize>,
}

/// One worker's way to a disk shared with workers on other threads.
pub(super) struct SharedPort {
    hub: Arc<Mutex<Hub>>,
    me: usize,
    wake: EventFd,
}

/// What a worker submits to and collects from. Not boxed: the owned disk is the common case
/// and the port is moved only when a worker is made or taken apart.
#[allow(clippy::large_enum_variant)]
pub(super) enum DiskPort {
    Own(Disk),
    Shared(SharedPort),
}

impl SharedPort {
    /// `n` ports onto `disk`; the disk comes back with the error if they can't be made.
    #[allow(clippy::result_large_err)]
    pub(super) fn split(disk: Disk, n: usize) -> Result<Vec<SharedPort>, (io::Error, Disk)> {
        let fds = (0..n)
            .map(|_| {
                let e = EventFd::new(EFD_NONBLOCK)?;
                Ok((e.try_clone()?, e))
            })
            .collect::<io::Result<Vec<_>>>();
        let (theirs, mine): (Vec<_>, Vec<_>) = match fds {
            Ok(f) => f.into_iter().unzip(),
            Err(e) => return Err((e, disk)),
        };
        let hub = Arc::new(Mutex::new(Hub {
            disk,
            routed: (0..n).map(|_| VecDeque::new()).collect(),
            wake: theirs,
            in_flight: vec![0; n],
        }));
        Ok(mine
            .into_iter()
            .enumerate()
            .map(|(me, wake)| SharedPort {
                hub: hub.clone(),
                me,
                wake,
            })
            .collect())
    }

    /// The disk back from every port of one split (in any order); `None` if one is missing.
    pub(super) fn join(ports: Vec<SharedPort>) -> Option<Disk> {
        let hub = ports.first()?.hub.clone();
        drop(ports);
        let hub = Arc::try_unwrap(hub).ok()?;
        Some(hub.into_inner().unwrap_or_else(|e| e.into_inner()).disk)
    }

    fn hub(&self) -> MutexGuard<'_, Hub> {
        // A worker that panicked holding the lock left the pipeline as it was between
        // two calls; the others can go on.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DiskPort {
    pub(super) fn submit(&mut self, mut req: Request) -> Result<(), Box<SubmitError>> {
        let p = match self {
            DiskPort::Own(d) => return d.submit(req),
            DiskPort::Shared(p) => p,
        };
        req.tag |= (p.me as u64) << PORT_SHIFT;
        let mut hub = p.hub();
        match hub.disk.submit(req) {
            Ok(()) => {
                hub.in_flight[p.me] += 1;
                Ok(())
            }
            Err(mut e) => {
                e.request.tag &= TAG_MASK;
                Err(e)
            }
        }
    }

    /// This worker's finished requests; those of other ports found on the way go to them.
    pub(super) fn completions(&mut self) -> Vec<Completion> {
        let p = match self {
            DiskPort::Own(d) => return d.completions().collect(),
            DiskPort::Shared(p) => p,
        };
        let _ = p.wake.read();
        let mut hub = p.hub();
        let mut mine: Vec<Completion> = hub.routed[p.me].drain(..).collect();
        let mut others = vec![false; hub.routed.len()];
        for (tag, r) in hub.disk.completions().collect::<Vec<_>>() {
            let port = (tag >> PORT_SHIFT) as usize;
            let c = (tag & TAG_MASK, r);
            if port == p.me {
                mine.push(c);
            } else if let Some(q) = hub.routed.get_mut(port) {
                q.push_back(c);
                others[port] = true;
            } else {
                log::error!("virtio-blk: disk completion for unknown port {port}");
            }
        }
        hub.in_flight[p.me] = hub.in_flight[p.me].saturating_sub(mine.len());
        for (port, _) in others.iter().enumerate().filter(|(_, o)| **o) {
            if let Err(e) = hub.wake[port].write(1) {
                log::error!("virtio-blk: cannot wake the worker of port {port}: {e}");
            }
        }
        mine
    }

    /// Whether [`DiskPort::completions`] would find something without waiting.
    pub(super) fn ready(&mut self) -> bool {
        match self {
            DiskPort::Own(d) => d.ready(),
            DiskPort::Shared(p) => {
                let me = p.me;
                let mut hub = p.hub();
                !hub.routed[me].is_empty() || hub.disk.ready()
            }
        }
    }

    /// Hold submissions to the kernel until [`DiskPort::unplug`] (one system call for the
    /// batch). On a shared disk this holds the other workers' submissions too, for as long
    /// as this one takes to pop its batch; each plug is paired with an unplug by its worker,
    /// so nothing stays held.
    pub(super) fn plug(&mut self) {
        match self {
            DiskPort::Own(d) => d.plug(),
            DiskPort::Shared(p) => p.hub().disk.plug(),
        }
    }

    /// Whether this worker's thread serves it alone: then a lone request may run on that
    /// thread ([`Disk::set_alone`]). Never for a shared disk, whose other workers would wait
    /// for the hub meanwhile.
    pub(super) fn set_alone(&mut self, alone: bool) {
        if let DiskPort::Own(d) = self {
            d.set_alone(alone);
        }
    }

    /// Submit what was held since [`DiskPort::plug`].
    pub(super) fn unplug(&mut self) {
        match self {
            DiskPort::Own(d) => d.unplug(),
            DiskPort::Shared(p) => p.hub().disk.unplug(),
        }
    }

    /// Requests of this worker not yet collected.
    pub(super) fn in_flight(&self) -> usize {
        match self {
            DiskPort::Own(d) => d.in_flight(),
            DiskPort::Shared(p) => p.hub().in_flight[p.me],
        }
    }

    /// The disk's statistics (the worker counts the requests it joined there).
    pub(super) fn stats(&self) -> Arc<DiskStats> {
        match self {
            DiskPort::Own(d) => d.stats(),
            DiskPort::Shared(p) => p.hub().disk.stats(),
        }
    }

    pub(super) fn wce(&self) -> bool {
        match self {
            DiskPort::Own(d) => d.wce(),
            DiskPort::Shared(p) => p.hub().disk.wce(),
        }
    }

    pub(super) fn set_wce(&mut self, on: bool) {
        match self {
            DiskPort::Own(d) => d.set_wce(on),
            DiskPort::Shared(p) => p.hub().disk.set_wce(on),
        }
    }

    /// Start requests held back by throttling now (a reset does not wait out the limits).
    pub(super) fn release_throttled(&mut self) {
        match self {
            DiskPort::Own(d) => d.release_throttled(),
            DiskPort::Shared(p) => p.hub().disk.release_throttled(),
        }
    }

    /// Fds that say completions may be waiting: the disk's, and a shared port's own.
    pub(super) fn completion_fds(&self) -> Vec<RawFd> {
        match self {
            DiskPort::Own(d) => vec![d.completion_fd().as_raw_fd()],
            DiskPort::Shared(p) => {
                vec![p.hub().disk.completion_fd().as_raw_fd(), p.wake.as_raw_fd()]
            }
        }
    }
}
