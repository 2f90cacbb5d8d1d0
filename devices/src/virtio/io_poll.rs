//! Adaptive polling of an I/O thread (QEMU's iothread `poll-max-ns`).
//!
//! Before an I/O thread sleeps in epoll, it may spin for a short window,
//! looking at the rings and the completion queues itself. A request or a
//! completion found there is served without the wakeup (a futex or epoll
//! round trip, and a scheduler switch), and while the thread polls the
//! driver is told not to notify, which saves the guest the VM exit of a
//! kick. Spinning costs a CPU, so the window adapts to how long the thread
//! actually waited, as QEMU's does (util/aio-posix.c):
//!
//! ```text
//!  waited <= window              the window was long enough: keep it
//!  waited >  max                 events are too far apart: stop polling (0)
//!  otherwise                     grow: 0 -> 4 us -> x2 ... up to max
//! ```
//!
//! An idle guest thus costs no spinning: its first long wait sets the
//! window to 0 until events come close together again.
//!
//! Off by default (`poll_max_ns = 0`), unlike QEMU's iothreads: in the only
//! place it could be measured here, the nested rig (`platter compare`,
//! raw/none/io_uring, three alternating boots each, nothing else running),
//! polling with QEMU's 32768 ns took the geometric mean Platter/QEMU from
//! 1.16 to 0.92 (the spinning thread competes for the host CPUs that also run
//! the guest), although it cut VM exits per I/O (read-128k-qd8: 2.4 -> 1.9).
//! A host with cores to spare may gain latency from it; it is one key away.

use std::time::Duration;

/// QEMU's default longest window for its I/O threads.
pub const QEMU_POLL_MAX_NS: u64 = 32_768;
/// Platter's default: no polling (see the module's docs for why).
pub const DEFAULT_POLL_MAX_NS: u64 = 0;
/// The first window after polling was off.
const POLL_START_NS: u64 = 4_000;

/// The polling window of one thread.
#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    max_ns: u64,
    ns: u64,
}

impl PollWindow {
    /// A window that may grow to `max_ns` (0: never poll).
    pub fn new(max_ns: u64) -> Self {
        Self { max_ns, ns: 0 }
    }

    /// How long to poll before sleeping; zero means go straight to sleep.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.ns)
    }

    /// After a sleep: the thread waited `waited` in total (poll + sleep)
    /// for its next event.
    pub fn waited(&mut self, waited: Duration) {
        let w = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        if w <= self.ns {
            return;
        }
        if w > self.max_ns {
            self.ns = 0;
        } else if self.ns < self.max_ns {
            self.ns = if self.ns == 0 {
                POLL_START_NS
            } else {
                self.ns.saturating_mul(2)
            }
            .min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    #[test]
    fn grows_with_close_events_and_stops_for_far_ones() {
        let mut w = PollWindow::new(QEMU_POLL_MAX_NS);
        assert_eq!(w.window(), ns(0), "starts without polling");
        w.waited(ns(10_000));
        assert_eq!(w.window(), ns(4_000));
        w.waited(ns(10_000));
        assert_eq!(w.window(), ns(8_000));
        w.waited(ns(7_000));
        assert_eq!(w.window(), ns(8_000), "long enough: kept");
        w.waited(ns(30_000));
        w.waited(ns(30_000));
        assert_eq!(w.window(), ns(32_000));
        w.waited(ns(32_500));
        assert_eq!(w.window(), ns(32_768), "capped at the maximum");
        w.waited(ns(32_700));
        assert_eq!(w.window(), ns(32_768));
        w.waited(ns(1_000_000));
        assert_eq!(w.window(), ns(0), "an idle wait stops polling");
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut w = PollWindow::new(0);
        for n in [1, 100, 5_000, 1_000_000] {
            w.waited(ns(n));
            assert_eq!(w.window(), ns(0));
        }
    }
}
