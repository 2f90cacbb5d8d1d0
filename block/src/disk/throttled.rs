//! A disk's side of throttling: one FIFO per direction of requests waiting for budget from
//! the disk's [`ThrottleGroup`].
//!
//! Only the head of each FIFO is known to the group; a request behind it waits without asking,
//! so a disk's requests of one direction start in submission order. Reads and writes have
//! separate FIFOs (as in QEMU) so a read limit does not hold writes back, and flushes bypass
//! throttling: they only cover writes that already completed, which throttled writes have not.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::request::{Request, RequestOp};
use super::Disk;
use crate::stats::IoKind;
use crate::throttle::{Direction, Member, ThrottleGroup};

/// A request with what the pipeline records about it before it starts.
pub(super) struct Pending {
    pub req: Request,
    pub kind: IoKind,
    pub submitted: Instant,
}

/// What a request costs: its direction and bytes. Discards and write-zeroes count as write
/// operations but move no data, so they cost no bytes (otherwise one large discard would stall
/// the disk for minutes under a bytes/s limit).
fn cost(op: &RequestOp) -> Option<(Direction, u64)> {
    match op {
        RequestOp::Read { buf, .. } => Some((Direction::Read, buf.len() as u64)),
        RequestOp::Write { buf, .. } => Some((Direction::Write, buf.len() as u64)),
        RequestOp::Discard { .. } | RequestOp::WriteZeroes { .. } => Some((Direction::Write, 0)),
        RequestOp::Flush => None,
    }
}

pub(super) struct DiskThrottle {
    member: Member,
    queues: [VecDeque<Pending>; 2],
}

impl DiskThrottle {
    /// Join `group`; grants are announced on `evt` (the disk's completion eventfd).
    pub fn new(group: &Arc<ThrottleGroup>, evt: EventFd) -> DiskThrottle {
        DiskThrottle {
            member: group.join(evt),
            queues: Default::default(),
        }
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        self.member.group()
    }

    /// Requests waiting for budget.
    pub fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Hand `p` back if it may start now; otherwise queue it (its disk's eventfd is written
    /// when the group grants it).
    pub fn admit(&mut self, p: Pending) -> Option<Pending> {
        let Some((dir, bytes)) = cost(&p.req.op) else {
            return Some(p);
        };
        let queue = &mut self.queues[dir as usize];
        if queue.is_empty() && self.member.admit(dir, bytes) {
            return Some(p);
        }
        queue.push_back(p);
        None
    }

    /// The queued requests that may start now, in order per direction; with `force`, all of
    /// them (paid for regardless of budget).
    pub fn ready(&mut self, force: bool) -> Vec<Pending> {
        let mut out = Vec::new();
        for dir in [Direction::Read, Direction::Write] {
            let queue = &mut self.queues[dir as usize];
            while let Some(head) = queue.front() {
                let bytes = cost(&head.req.op).map_or(0, |(_, b)| b);
                if force {
                    self.member.force(dir, bytes);
                } else if !self.member.admit(dir, bytes) {
                    break;
                }
                out.extend(queue.pop_front());
            }
        }
        out
    }
}

impl Disk {
    /// The throttle group this disk draws on, if any.
    pub fn throttle_group(&self) -> Option<&Arc<ThrottleGroup>> {
        self.throttle.as_ref().map(|t| t.group())
    }

    /// Start every request still waiting for throttle budget now, paying for them anyway (as
    /// QEMU does when draining), so a device reset does not sit out the limits. They complete
    /// through [`Disk::completions`] as usual.
    pub fn release_throttled(&mut self) {
        self.start_throttled(true);
        if !self.done.is_empty() {
            self.signal();
        }
    }

    /// Start queued requests the throttle group now allows (all of them with `force`).
    pub(super) fn start_throttled(&mut self, force: bool) {
        let Some(t) = &mut self.throttle else {
            return;
        };
        let ready = t.ready(force);
        if ready.is_empty() {
            return;
        }
        let now = Instant::now();
        for p in ready {
            self.stats
                .throttle_released(p.kind, now.saturating_duration_since(p.submitted));
            self.dispatch(p);
        }
    }
}
