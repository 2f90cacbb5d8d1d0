//! Who may start next in a throttle group: the buckets plus a round-robin queue of waiting
//! disks per direction. Time is passed in, so this is tested without sleeping; the group's
//! timer thread ([`super::group`]) drives [`Scheduler::grant`].
//!
//! Each disk ("member") keeps its own FIFO of throttled requests per direction and shows the
//! scheduler only the head of each. The rules:
//!
//! * A request whose disk has nothing queued in that direction asks [`Scheduler::admit`]: it
//!   starts at once if no disk is waiting in that direction and the buckets allow it;
//!   otherwise its disk joins the back of that direction's waiting queue.
//! * When budget appears, [`Scheduler::grant`] pays for the head request of the disk at the
//!   front of the queue, marks it granted, and writes that disk's completion eventfd. The
//!   disk's device thread then starts it (in `Disk::completions`), and asks again for its next
//!   request, which puts it at the back: one request per turn, round robin across disks, so a
//!   busy disk cannot starve the others of the group. Reads and writes take turns too.
//!
//! Paying at grant time means a disk whose thread is slow to pick up its grant never lets the
//! group overrun its limits.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::bucket::Buckets;
use super::config::ThrottleConfig;
use super::Direction;

/// A disk's handle in its group.
pub(crate) type MemberId = u64;

struct Member {
    /// The disk's completion eventfd (a duplicate), written on a grant.
    evt: EventFd,
    /// The head request of this direction is paid for and may start.
    granted: [bool; 2],
    /// Bytes of the head request this disk waits with, per direction.
    waiting: [Option<u64>; 2],
}

/// The answer of [`Scheduler::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Start the request now (it is paid for).
    Start,
    /// The member just joined the waiting queue: the timer must recompute its deadline.
    Queued,
    /// The member was already waiting.
    Waiting,
}

pub(crate) struct Scheduler {
    buckets: Buckets,
    members: HashMap<MemberId, Member>,
    next_id: MemberId,
    /// Members waiting, per direction, in turn order.
    queue: [VecDeque<MemberId>; 2],
    /// The direction served first by the next grant, so reads and writes alternate.
    first: usize,
}

impl Scheduler {
    pub fn new(cfg: &ThrottleConfig, now: Instant) -> Scheduler {
        Scheduler {
            buckets: Buckets::new(cfg, now),
            members: HashMap::new(),
            next_id: 0,
            queue: Default::default(),
            first: 0,
        }
    }

    /// New limits; the levels start empty again.
    pub fn reconfigure(&mut self, cfg: &ThrottleConfig, now: Instant) {
        self.buckets = Buckets::new(cfg, now);
    }

    pub fn add_member(&mut self, evt: EventFd) -> MemberId {
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                evt,
                granted: [false; 2],
                waiting: [None; 2],
            },
        );
        id
    }

    pub fn remove_member(&mut self, id: MemberId) {
        self.members.remove(&id);
        self.queue.iter_mut().for_each(|q| q.retain(|&m| m != id));
    }

    /// May the head request (`bytes` long) of member `id` in `dir` start now? If not, the
    /// member waits for a grant, which writes its eventfd.
    pub fn admit(&mut self, id: MemberId, dir: Direction, bytes: u64, now: Instant) -> Admit {
        let d = dir as usize;
        let Some(m) = self.members.get_mut(&id) else {
            return Admit::Start;
        };
        if std::mem::take(&mut m.granted[d]) {
            return Admit::Start;
        }
        if m.waiting[d].is_some() {
            return Admit::Waiting;
        }
        self.buckets.advance(now);
        if self.queue[d].is_empty() && self.buckets.wait(dir, bytes).is_zero() {
            self.buckets.charge(dir, bytes);
            return Admit::Start;
        }
        m.waiting[d] = Some(bytes);
        self.queue[d].push_back(id);
        Admit::Queued
    }

    /// Start the head request now whatever the budget (draining), still paying for it.
    pub fn force(&mut self, id: MemberId, dir: Direction, bytes: u64, now: Instant) {
        let d = dir as usize;
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        if std::mem::take(&mut m.granted[d]) {
            return;
        }
        if m.waiting[d].take().is_some() {
            self.queue[d].retain(|&w| w != id);
        }
        self.buckets.advance(now);
        self.buckets.charge(dir, bytes);
    }

    /// Whether any member waits for a grant.
    #[cfg(test)]
    pub fn has_waiters(&self) -> bool {
        self.queue.iter().any(|q| !q.is_empty())
    }

    /// Grant every waiting head request the budget allows, in turn; returns how long until the
    /// next grant may be possible (`None`: nobody waits).
    pub fn grant(&mut self, now: Instant) -> Option<Duration> {
        self.buckets.advance(now);
        loop {
            let mut next: Option<Duration> = None;
            let mut granted = false;
            for k in 0..2 {
                let d = (self.first + k) % 2;
                let dir = if d == 0 {
                    Direction::Read
                } else {
                    Direction::Write
                };
                let Some(&id) = self.queue[d].front() else {
                    continue;
                };
                let Some(bytes) = self.members.get(&id).and_then(|m| m.waiting[d]) else {
                    // Cannot happen (removal clears the queue); drop the stale entry.
                    self.queue[d].pop_front();
                    granted = true;
                    continue;
                };
                let wait = self.buckets.wait(dir, bytes);
                if !wait.is_zero() {
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    continue;
                }
                self.buckets.charge(dir, bytes);
                self.queue[d].pop_front();
                if let Some(m) = self.members.get_mut(&id) {
                    m.waiting[d] = None;
                    m.granted[d] = true;
                    if let Err(e) = m.evt.write(1) {
                        log::error!("cannot wake a throttled disk: {e}");
                    }
                }
                self.first = 1 - d;
                granted = true;
                break;
            }
            if !granted {
                return next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn sched(pairs: &[(&str, u64)], t0: Instant) -> Scheduler {
        let mut c = ThrottleConfig::default();
        for (k, v) in pairs {
            c.set(k, *v).unwrap();
        }
        Scheduler::new(&c, t0)
    }

    fn member(s: &mut Scheduler) -> (MemberId, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (s.add_member(evt.try_clone().unwrap()), evt)
    }

    /// Drive members that always have another request queued in `dir`, granting as early as
    /// the buckets allow; returns which member started each request.
    fn run(s: &mut Scheduler, ids: &[MemberId], dir: Direction, n: usize) -> Vec<MemberId> {
        let mut now = Instant::now();
        let mut order = Vec::new();
        // Every member first asks for its head request.
        let mut ready: VecDeque<MemberId> = ids.iter().copied().collect();
        while order.len() < n {
            while let Some(id) = ready.pop_front() {
                if s.admit(id, dir, 4096, now) == Admit::Start {
                    order.push(id);
                    ready.push_back(id);
                    if order.len() == n {
                        return order;
                    }
                }
            }
            if let Some(w) = s.grant(now) {
                now += w;
            }
            // Members whose head was granted ask again (and start it).
            for &id in ids {
                if s.members[&id].granted[dir as usize] {
                    ready.push_back(id);
                }
            }
        }
        order
    }

    #[test]
    fn waiting_disks_take_turns() {
        let t0 = Instant::now();
        let mut s = sched(&[("iops_total", 100)], t0);
        let (a, _ea) = member(&mut s);
        let (b, eb) = member(&mut s);
        let (c, _ec) = member(&mut s);
        let order = run(&mut s, &[a, b, c], Direction::Read, 60);
        // After the burst, strict rotation.
        let tail = &order[order.len() - 30..];
        for w in tail.windows(3) {
            let mut w = w.to_vec();
            w.sort_unstable();
            assert_eq!(w, vec![a, b, c], "{order:?}");
        }
        // A grant wrote the member's eventfd.
        assert!(eb.read().unwrap() > 0);
    }

    #[test]
    fn newcomers_queue_behind_waiters() {
        let t0 = Instant::now();
        // A burst of one.
        let mut s = sched(&[("iops_read", 5)], t0);
        let (a, _ea) = member(&mut s);
        let (b, _eb) = member(&mut s);
        assert_eq!(s.admit(a, Direction::Read, 512, t0), Admit::Start);
        assert_eq!(s.admit(a, Direction::Read, 512, t0), Admit::Queued);
        assert_eq!(s.admit(a, Direction::Read, 512, t0), Admit::Waiting);
        // Budget is back after 200 ms, but `a` waits first, so `b` queues.
        let later = t0 + Duration::from_millis(250);
        assert_eq!(s.admit(b, Direction::Read, 512, later), Admit::Queued);
        let next = s.grant(later).unwrap();
        assert!(next >= Duration::from_millis(200) && next <= Duration::from_millis(201));
        assert!(s.members[&a].granted[0] && !s.members[&b].granted[0]);
        // Writes are not limited and do not wait behind reads.
        assert_eq!(s.admit(b, Direction::Write, 512, later), Admit::Start);
        // `a` starts its granted head.
        assert_eq!(s.admit(a, Direction::Read, 512, later), Admit::Start);
        assert!(s.has_waiters());
        assert_eq!(s.grant(later + Duration::from_millis(201)), None);
        assert!(s.members[&b].granted[0]);
    }

    #[test]
    fn forcing_and_removal_clear_the_queue() {
        let t0 = Instant::now();
        let mut s = sched(&[("iops_total", 1)], t0);
        let (a, _ea) = member(&mut s);
        let (b, _eb) = member(&mut s);
        assert_eq!(s.admit(a, Direction::Write, 0, t0), Admit::Start);
        assert_eq!(s.admit(a, Direction::Write, 0, t0), Admit::Queued);
        assert_eq!(s.admit(b, Direction::Read, 0, t0), Admit::Queued);
        s.force(a, Direction::Write, 0, t0);
        assert!(s.queue[1].is_empty());
        s.remove_member(b);
        assert!(!s.has_waiters());
        assert_eq!(s.grant(t0), None);
    }
}
