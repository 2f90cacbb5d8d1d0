//! The request loop of one virtio-blk device: drains available rings into
//! the disk, and completed requests into used rings (VIRTIO 1.2 §2.7.13
//! receiving used buffers, §2.7.7 / §2.7.10 notification suppression).
//!
//! ```text
//!  notify eventfd ─▶ process_queue: disable notifications, pop every chain,
//!                    parse, submit (tag = slot in `inflight`; a read or write
//!                    that continues the one before joins it, merge.rs), re-enable
//!                    notifications and go round again if the driver added
//!                    more meanwhile (so no kick is lost)
//!  completion fd  ─▶ handle_completions: status byte, add_used, retry the
//!                    requests the disk handed back
//!  end of a batch ─▶ signal_used: one interrupt per queue that got used
//!                    buffers, if the driver's used_event asks for it
//! ```
//!
//! A request the disk hands back with `BlockError::Submit` (its engine is
//! full) waits in `pending` and goes again after the next completion; any
//! other refusal completes it with IOERR. A broken ring (avail index too far
//! ahead, a head index outside the queue) cannot be served without a reset:
//! the queue is set aside and the device reports NEEDS_RESET.

use std::any::Any;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use platter_block::{BlockError, DiskStats, Request, RequestOp};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::merge::{joinable, Held};
use super::port::DiskPort;
use super::request::{parse, Parsed};
use super::{blk_status, Limits};
use crate::virtio::io_thread::IoWork;
use crate::virtio::{VirtQueue, VirtioInterrupt};

/// Requests popped from a ring before those held are submitted: bounds how long the first
/// of a long burst waits for the rest.
const PLUG_BATCH: usize = 16;

struct ActiveQueue {
    vq: VirtQueue,
    /// Set aside after a ring error until the device is reset.
    broken: bool,
    /// Used buffers added since the last notification check.
    used_added: bool,
}

/// A virtio request in flight: possibly several disk requests (one per
/// discard segment), completed when all are.
struct InFlight {
    queue: usize,
    head: u16,
    status: GuestAddress,
    used_len: u32,
    remaining: usize,
    code: u8,
    /// The slot of the request joined after this one: the disk request that
    /// carries this one carries it too, and completes both.
    then: Option<usize>,
}

/// Queues, disk and the requests between them.
pub(super) struct Worker {
    disk: DiskPort,
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    limits: Limits,
    /// The guest's write cache setting, changed from the vCPU side.
    wce: Arc<AtomicBool>,
    inflight: Vec<Option<InFlight>>,
    free: Vec<usize>,
    pending: VecDeque<Request>,
    /// The batch's last read or write, not yet submitted: the next may join it
    /// (when `limits.merging`).
    held: Option<Held>,
    stats: Arc<DiskStats>,
}

impl Worker {
    pub(super) fn new(
        disk: DiskPort,
        mem: GuestMemoryMmap,
        queues: Vec<VirtQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        limits: Limits,
        wce: Arc<AtomicBool>,
    ) -> Self {
        let stats = disk.stats();
        Self {
            disk,
            mem,
            queues: queues
                .into_iter()
                .map(|vq| ActiveQueue {
                    vq,
                    broken: false,
                    used_added: false,
                })
                .collect(),
            interrupt,
            limits,
            wce,
            inflight: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            held: None,
            stats,
        }
    }

    /// Virtio requests not yet in a used ring.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len() - self.free.len()
    }

    /// The disk's statistics.
    #[cfg(test)]
    pub(super) fn stats(&self) -> &DiskStats {
        &self.stats
    }

    /// Give the disk (or this worker's port to it) back, with nothing of the guest's in
    /// flight.
    pub(super) fn into_port(self) -> DiskPort {
        self.disk
    }

    /// Apply a WCE change the driver made through configuration space
    /// before the requests it sent after it.
    fn sync_wce(&mut self) {
        let wce = self.wce.load(Ordering::SeqCst);
        if self.disk.wce() != wce {
            self.disk.set_wce(wce);
        }
    }

    fn broken(&mut self, pos: usize, why: &str) {
        let q = &mut self.queues[pos];
        if !q.broken {
            log::warn!(
                "virtio-blk: queue {}: {why}; the device needs a reset",
                q.vq.index
            );
            q.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    /// Serve every chain available on the queue at `pos`. Requests reach the
    /// kernel in batches of at most [`PLUG_BATCH`] (one io_uring_enter each):
    /// holding them all until the queue is drained (QEMU's io_plug) was measured
    /// in the rig at about half the random-write IOPS at depth 32 (2500 vs 5029,
    /// raw, io_uring), since the device then idles while the guest is still
    /// queueing; one system call per request cost the other way (bounded batches,
    /// 3 alternating boots each: randwrite-4k-qd32 Platter/QEMU 1.23 -> 3.06,
    /// randread-4k-qd32 1.44 -> 2.33, exits per I/O 0.44 -> 0.23).
    pub(super) fn process_queue(&mut self, pos: usize) {
        self.sync_wce();
        loop {
            if self.queues[pos].broken {
                return;
            }
            if let Err(e) = self.queues[pos].vq.queue.disable_notification(&self.mem) {
                return self.broken(pos, &format!("cannot suppress notifications: {e}"));
            }
            self.drain(pos);
            if self.queues[pos].broken {
                return;
            }
            match self.queues[pos].vq.queue.enable_notification(&self.mem) {
                // The driver added chains after the last pop: go round again.
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return self.broken(pos, &format!("cannot enable notifications: {e}")),
            }
        }
    }

    /// While the thread polls, the driver need not notify at all. With
    /// EVENT_IDX, virtio-queue's `disable_notification` leaves `avail_event`
    /// where it was, so the driver's next request would still kick; an
    /// `avail_event` one behind what the device has taken is never crossed
    /// by the driver's next index (VIRTIO 1.2 §2.7.10: it notifies only when
    /// its index passes the event), so no kick comes until
    /// `process_queue` sets it again.
    fn suppress_notifications(&mut self, pos: usize) {
        let q = &mut self.queues[pos];
        if q.broken {
            return;
        }
        if !q.vq.queue.event_idx_enabled() {
            if let Err(e) = q.vq.queue.disable_notification(&self.mem) {
                self.broken(pos, &format!("cannot suppress notifications: {e}"));
            }
            return;
        }
        // avail_event follows the used ring's flags, index and elements (§2.7.8).
        let addr =
            GuestAddress(q.vq.queue.used_ring()).checked_add(4 + 8 * u64::from(q.vq.queue.size()));
        let behind = q.vq.queue.next_avail().wrapping_sub(1);
        if let Some(a) = addr {
            // A failed write only costs a kick.
            let _ = self.mem.store(behind.to_le(), a, Ordering::Relaxed);
        }
    }

    /// Pop every available chain and submit its requests: in batches of at most
    /// [`PLUG_BATCH`], each handed to the kernel in one system call (io_uring).
    fn drain(&mut self, pos: usize) {
        self.disk.plug();
        self.drain_plugged(pos);
        self.release_held();
        self.disk.unplug();
    }

    fn drain_plugged(&mut self, pos: usize) {
        let mut batch = 0;
        loop {
            if batch == PLUG_BATCH {
                self.release_held();
                self.disk.unplug();
                self.disk.plug();
                batch = 0;
            }
            batch += 1;
            let q = &mut self.queues[pos].vq.queue;
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return self.broken(pos, &format!("bad available ring: {e}")),
            };
            let Some(chain) = chain else {
                return;
            };
            let head = chain.head_index();
            let parsed = parse(chain, &self.mem, &self.limits);
            match parsed {
                Parsed::Drop => self.add_used(pos, head, 0),
                Parsed::Done {
                    status,
                    code,
                    used_len,
                } => {
                    self.write_status(status, code);
                    self.add_used(pos, head, used_len);
                }
                Parsed::Submit {
                    status,
                    used_len,
                    ops,
                } => self.submit(pos, head, status, used_len, ops),
            }
            if self.queues[pos].broken {
                return;
            }
        }
    }

    fn submit(
        &mut self,
        queue: usize,
        head: u16,
        status: GuestAddress,
        used_len: u32,
        ops: Vec<RequestOp>,
    ) {
        let entry = InFlight {
            queue,
            head,
            status,
            used_len,
            remaining: ops.len(),
            code: blk_status::OK,
            then: None,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.inflight[s] = Some(entry);
                s
            }
            None => {
                self.inflight.push(Some(entry));
                self.inflight.len() - 1
            }
        };
        let mut ops = ops;
        if self.limits.merging && ops.len() == 1 && joinable(&ops[0]) {
            if let Some(op) = ops.pop() {
                self.hold(slot, op);
            }
            return;
        }
        // Everything else goes after the held request, in the order the driver gave them.
        self.release_held();
        for op in ops {
            self.enqueue(Request {
                tag: slot as u64,
                op,
            });
        }
    }

    /// Join the read or write in `slot` to the held one, or submit that and hold this one.
    fn hold(&mut self, slot: usize, op: RequestOp) {
        let op = match self.held.as_mut() {
            Some(h) => {
                let prev = h.last;
                match h.join(slot, op) {
                    Ok(kind) => {
                        if let Some(Some(e)) = self.inflight.get_mut(prev) {
                            e.then = Some(slot);
                        }
                        self.stats.merged(kind);
                        return;
                    }
                    Err(op) => op,
                }
            }
            None => op,
        };
        self.release_held();
        self.held = Some(Held {
            first: slot,
            last: slot,
            op,
        });
    }

    /// Submit the held request, if any.
    fn release_held(&mut self) {
        if let Some(h) = self.held.take() {
            self.enqueue(Request {
                tag: h.first as u64,
                op: h.op,
            });
        }
    }

    fn enqueue(&mut self, req: Request) {
        if self.pending.is_empty() {
            self.submit_one(req);
        } else {
            // Keep order behind the requests already waiting.
            self.pending.push_back(req);
        }
    }

    /// Submit one disk request; false if the disk is full and it waits.
    fn submit_one(&mut self, req: Request) -> bool {
        match self.disk.submit(req) {
            Ok(()) => true,
            Err(e) => {
                let e = *e;
                if matches!(e.error, BlockError::Submit(_)) {
                    self.pending.push_front(e.request);
                    false
                } else {
                    log::debug!("virtio-blk: request refused: {}", e.error);
                    self.finish_part(e.request.tag, false);
                    true
                }
            }
        }
    }

    /// Collect the completions the disk already has (requests that finished while being
    /// submitted, or while the thread polled), so they go back in this batch; true if any.
    fn collect_ready(&mut self) -> bool {
        let ready = self.disk.ready();
        if ready {
            self.handle_completions();
        }
        ready
    }

    /// Collect disk completions, interrupt the driver for them, and retry waiting requests.
    ///
    /// The interrupt goes before anything else this thread does in the same wake-up (the
    /// requests the driver kicked for, retried ones): a submission is a system call that
    /// in a nested guest costs hundreds of microseconds, and the driver refills its queue
    /// only once it sees the completions. (Deferred to the end of the wake-up, 128 KiB
    /// reads at depth 8 in the rig waited that much longer than under QEMU.)
    pub(super) fn handle_completions(&mut self) {
        for (tag, result) in self.disk.completions() {
            if let Err(e) = &result {
                log::debug!("virtio-blk: request failed: {e}");
            }
            self.finish_part(tag, result.is_ok());
        }
        self.signal_used();
        self.sync_wce();
        while let Some(req) = self.pending.pop_front() {
            if !self.submit_one(req) {
                break;
            }
        }
        if !self.pending.is_empty() && self.disk.in_flight() == 0 {
            // Nothing left to complete, so nothing would retry them.
            log::warn!("virtio-blk: the disk refuses requests with none in flight");
            while let Some(req) = self.pending.pop_front() {
                self.finish_part(req.tag, false);
            }
        }
    }

    /// One disk request finished: the virtio requests it carries (one, or several joined)
    /// each have one part less to wait for.
    fn finish_part(&mut self, tag: u64, ok: bool) {
        let Some(slot) = usize::try_from(tag)
            .ok()
            .filter(|&s| s < self.inflight.len())
        else {
            log::error!("virtio-blk: completion for unknown tag {tag}");
            return;
        };
        let mut next = Some(slot);
        while let Some(slot) = next {
            next = self.finish_slot(slot, ok);
        }
    }

    /// One part of the request in `slot` finished; returns the slot joined after it.
    fn finish_slot(&mut self, slot: usize, ok: bool) -> Option<usize> {
        let Some(entry) = self.inflight[slot].as_mut() else {
            log::error!("virtio-blk: completion for free slot {slot}");
            return None;
        };
        if !ok {
            entry.code = blk_status::IOERR;
        }
        let then = entry.then.take();
        entry.remaining = entry.remaining.saturating_sub(1);
        if entry.remaining > 0 {
            return then;
        }
        let done = self.inflight[slot].take()?;
        self.free.push(slot);
        self.write_status(done.status, done.code);
        self.add_used(done.queue, done.head, done.used_len);
        then
    }

    fn write_status(&self, status: GuestAddress, code: u8) {
        if let Err(e) = self.mem.write_obj(code, status) {
            // Checked when parsed; memory does not shrink under a running device.
            log::error!("virtio-blk: cannot write status byte: {e}");
        }
    }

    fn add_used(&mut self, pos: usize, head: u16, len: u32) {
        let q = &mut self.queues[pos];
        if q.broken {
            return;
        }
        match q.vq.queue.add_used(&self.mem, head, len) {
            Ok(()) => q.used_added = true,
            Err(e) => self.broken(pos, &format!("cannot return chain {head}: {e}")),
        }
    }

    /// Interrupt each queue that has new used buffers, if the driver wants it.
    pub(super) fn signal_used(&mut self) {
        for q in &mut self.queues {
            if !std::mem::take(&mut q.used_added) {
                continue;
            }
            let needed = q.vq.queue.needs_notification(&self.mem).unwrap_or(true);
            if needed {
                self.interrupt.signal_queue(q.vq.index);
            }
        }
    }

    /// Device reset: stop taking requests, without touching the rings (the
    /// driver has forgotten them); then [`Worker::poll_drained`].
    fn begin_drain(&mut self) {
        self.pending.clear();
        // Requests held back by throttling go now, so a reset does not wait
        // out the limits.
        self.disk.release_throttled();
    }

    /// Collect completions of a draining worker; true once the disk has
    /// nothing in flight.
    fn poll_drained(&mut self) -> bool {
        let _ = self.disk.completions();
        if self.disk.in_flight() > 0 {
            return false;
        }
        self.inflight.clear();
        self.free.clear();
        true
    }
}

/// Local token of the disk's completion fd (queues use their position).
const COMPLETION: u8 = 0xfe;

impl IoWork for Worker {
    fn serve_fds(&self) -> Vec<(RawFd, u8)> {
        let mut fds: Vec<(RawFd, u8)> = self
            .queues
            .iter()
            .zip(0u8..)
            .map(|(q, pos)| (q.vq.notify.as_raw_fd(), pos))
            .collect();
        fds.extend(self.drain_fds());
        fds
    }

    fn drain_fds(&self) -> Vec<(RawFd, u8)> {
        self.disk
            .completion_fds()
            .into_iter()
            .map(|fd| (fd, COMPLETION))
            .collect()
    }

    fn start(&mut self) {
        for pos in 0..self.queues.len() {
            self.process_queue(pos);
        }
    }

    fn on_event(&mut self, local: u8) {
        if local == COMPLETION {
            return self.handle_completions();
        }
        let pos = usize::from(local);
        if pos < self.queues.len() {
            let _ = self.queues[pos].vq.notify.read();
            // Completions already posted go back before this kick's submissions (see
            // handle_completions); looking costs no system call.
            self.collect_ready();
            self.process_queue(pos);
            self.collect_ready();
        }
    }

    fn after_batch(&mut self) {
        self.signal_used();
    }

    fn set_alone(&mut self, alone: bool) {
        self.disk.set_alone(alone);
    }

    fn poll_begin(&mut self) {
        for pos in 0..self.queues.len() {
            self.suppress_notifications(pos);
        }
    }

    fn poll(&mut self) -> bool {
        let mut found = false;
        for pos in 0..self.queues.len() {
            let q = &self.queues[pos];
            if q.broken {
                continue;
            }
            let avail = q.vq.queue.avail_idx(&self.mem, Ordering::Acquire);
            if matches!(avail, Ok(i) if i.0 != q.vq.queue.next_avail()) {
                if !found {
                    self.sync_wce();
                }
                found = true;
                self.drain(pos);
            }
        }
        self.collect_ready() || found
    }

    fn poll_end(&mut self) {
        for pos in 0..self.queues.len() {
            self.process_queue(pos);
        }
        self.collect_ready();
    }

    fn begin_drain(&mut self) {
        Worker::begin_drain(self);
    }

    fn poll_drained(&mut self) -> bool {
        Worker::poll_drained(self)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
