//! [`ThrottleGroup`]: limits shared by the disks that name it, and the timer thread that wakes
//! throttled disks.
//!
//! Why a thread: device threads watch only each disk's completion eventfd (some devices even
//! write it themselves), so the wake-up for "budget is back" has to arrive on that eventfd. A
//! timerfd would be a second descriptor every device would have to watch; folding it into the
//! eventfd needs a thread reading it anyway. So each group has one thread that sleeps on a
//! condvar until the scheduler's next possible grant (or, while nobody waits, until a disk
//! starts waiting), pays for the head request of the disk whose turn it is and writes that
//! disk's eventfd. The disk starts the request in its next `completions()`. The thread ends
//! when the group is dropped, which happens after its last disk is closed.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::config::{ThrottleConfig, ThrottleConfigError};
use super::scheduler::{Admit, MemberId, Scheduler};
use super::Direction;
use crate::BlockError;

struct State {
    sched: Scheduler,
    config: ThrottleConfig,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the timer thread: a disk started waiting, the limits changed, or stop.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is one call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Limits shared by one or more disks: create it once per named group (or per disk with its
/// own limits) and put it in each disk's [`DiskOptions::throttle`](crate::DiskOptions).
///
/// The disks of a group draw on one budget; a disk whose request does not fit waits its turn
/// behind the other waiting disks (round robin, one request per turn) and, within the disk,
/// behind its own earlier requests of the same direction.
pub struct ThrottleGroup {
    name: String,
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
}

impl ThrottleGroup {
    /// A group named `name` (for messages only) with validated limits, and its timer thread.
    pub fn new(
        name: impl Into<String>,
        config: ThrottleConfig,
    ) -> Result<Arc<ThrottleGroup>, BlockError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sched: Scheduler::new(&config, Instant::now()),
                config,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let timer = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || timer_loop(&thread_shared))
            .map_err(BlockError::ThreadSpawn)?;
        Ok(Arc::new(ThrottleGroup {
            name: name.into(),
            shared,
            timer: Some(timer),
        }))
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current limits.
    pub fn config(&self) -> ThrottleConfig {
        self.shared.lock().config
    }

    /// Change the limits at run time; the buckets start empty (a fresh burst allowance).
    pub fn set_config(&self, config: ThrottleConfig) -> Result<(), ThrottleConfigError> {
        config.validate()?;
        let mut st = self.shared.lock();
        st.sched.reconfigure(&config, Instant::now());
        st.config = config;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Add a disk whose completion eventfd is `evt` (a duplicate the group keeps).
    pub(crate) fn join(self: &Arc<Self>, evt: EventFd) -> Member {
        let id = self.shared.lock().sched.add_member(evt);
        Member {
            group: self.clone(),
            id,
        }
    }
}

fn timer_loop(shared: &Shared) {
    let mut st = shared.lock();
    while !st.stop {
        st = match st.sched.grant(Instant::now()) {
            Some(wait) => {
                shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

impl Drop for ThrottleGroup {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

/// Groups compare by identity: two groups with equal limits are still two budgets.
impl PartialEq for ThrottleGroup {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for ThrottleGroup {}

impl fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .field("config", &self.config())
            .finish()
    }
}

/// One disk's membership in a group; leaving (drop) forgets its waits and grants.
pub(crate) struct Member {
    group: Arc<ThrottleGroup>,
    id: MemberId,
}

impl Member {
    /// May this disk's head request in `dir` start now? If not, the disk's eventfd is written
    /// when it may.
    pub fn admit(&self, dir: Direction, bytes: u64) -> bool {
        let shared = &self.group.shared;
        let mut st = shared.lock();
        match st.sched.admit(self.id, dir, bytes, Instant::now()) {
            Admit::Start => true,
            Admit::Queued => {
                shared.wake.notify_one();
                false
            }
            Admit::Waiting => false,
        }
    }

    /// Start the head request in `dir` regardless of budget (draining); it is still paid for.
    pub fn force(&self, dir: Direction, bytes: u64) {
        self.group
            .shared
            .lock()
            .sched
            .force(self.id, dir, bytes, Instant::now());
    }

    /// The group.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.group.shared.lock().sched.remove_member(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn invalid_limits_are_refused_and_the_timer_stops() {
        let mut c = ThrottleConfig::default();
        c.bps_total.avg = 1;
        c.bps_write.avg = 1;
        let e = ThrottleGroup::new("g", c).unwrap_err();
        assert!(matches!(e, BlockError::ThrottleConfig(_)), "{e}");
        assert!(e.to_string().contains("bps_total and bps_read/bps_write"));

        let g = ThrottleGroup::new("g", ThrottleConfig::default()).unwrap();
        assert_eq!(g.name(), "g");
        assert!(g.set_config(c).is_err());
        assert_eq!(*g, *g);
        drop(g); // joins the timer thread
    }

    #[test]
    fn the_timer_wakes_a_waiting_disk() {
        let mut c = ThrottleConfig::default();
        c.iops_read.avg = 20; // a burst of 2, then one every 50 ms
        let g = ThrottleGroup::new("g", c).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let m = g.join(evt.try_clone().unwrap());
        let t0 = Instant::now();
        assert!(m.admit(Direction::Read, 0));
        assert!(m.admit(Direction::Read, 0));
        assert!(!m.admit(Direction::Read, 0));
        // Blocks until the timer thread grants the request.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&evt),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(r, 1);
        assert!(t0.elapsed() >= Duration::from_millis(49));
        assert!(m.admit(Direction::Read, 0));
        drop(m);
        drop(g);
    }
}
