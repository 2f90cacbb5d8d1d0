//! Leaky buckets: the arithmetic of the six limits, with time passed in so it is tested
//! without sleeping.
//!
//! A bucket fills by each request's cost (1 operation, or its bytes) and drains at `avg` units
//! per second. A request may start once the level has drained far enough that the request
//! fits under the bucket's capacity; its cost is then added:
//!
//! ```text
//!   capacity ┤- - - - - - - - - - - -   max * max_length      (or avg / 10 without max)
//!            │        ┌──┐
//!   level    │   ┌────┘  │ cost         a request of `cost` starts when
//!            │───┘       └──╲ drains    level <= capacity - cost (or level == 0 if larger)
//!          0 ┼──────────────────▶ t     at avg per second
//! ```
//!
//! So after an idle period a disk may run `capacity` units at once (the burst), and over any
//! interval `t` at most `capacity + avg * t` units start. With a burst length over one second,
//! a second bucket of capacity `max / 10` draining at `max` keeps the rate during the burst at
//! `max` instead of letting the whole allowance go at once.

use std::time::{Duration, Instant};

use super::config::{Limit, LimitKind, ThrottleConfig};
use super::Direction;

#[derive(Debug, Clone, Default)]
struct Bucket {
    avg: f64,
    max: f64,
    length: f64,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn new(l: &Limit) -> Bucket {
        Bucket {
            avg: l.avg as f64,
            max: l.max as f64,
            length: l.max_length as f64,
            level: 0.0,
            burst_level: 0.0,
        }
    }

    fn leak(&mut self, secs: f64) {
        self.level = (self.level - self.avg * secs).max(0.0);
        self.burst_level = (self.burst_level - self.max * secs).max(0.0);
    }

    fn has_burst_bucket(&self) -> bool {
        self.max > 0.0 && self.length > 1.0
    }

    /// Seconds until a request of `cost` units fits.
    fn wait(&self, cost: f64) -> f64 {
        if self.avg == 0.0 {
            return 0.0;
        }
        let capacity = if self.max > 0.0 {
            self.max * self.length
        } else {
            self.avg / 10.0
        };
        let mut wait = (self.level - (capacity - cost).max(0.0)) / self.avg;
        if self.has_burst_bucket() {
            let burst = (self.burst_level - (self.max / 10.0 - cost).max(0.0)) / self.max;
            wait = wait.max(burst);
        }
        wait.max(0.0)
    }

    fn charge(&mut self, cost: f64) {
        if self.avg > 0.0 {
            self.level += cost;
            if self.has_burst_bucket() {
                self.burst_level += cost;
            }
        }
    }
}

/// The six buckets of one throttle group.
#[derive(Debug, Clone)]
pub(crate) struct Buckets {
    buckets: [Bucket; 6],
    iops_size: u64,
    last: Instant,
}

impl Buckets {
    pub fn new(cfg: &ThrottleConfig, now: Instant) -> Buckets {
        Buckets {
            buckets: LimitKind::ALL.map(|k| Bucket::new(cfg.limit(k))),
            iops_size: cfg.iops_size,
            last: now,
        }
    }

    /// Drain the buckets for the time since the last call.
    pub fn advance(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        if secs > 0.0 {
            self.buckets.iter_mut().for_each(|b| b.leak(secs));
            self.last = now;
        }
    }

    /// The buckets a request counts against, with its cost in each one's unit.
    fn costs(&self, dir: Direction, bytes: u64) -> [(LimitKind, f64); 4] {
        let ops = if self.iops_size > 0 && bytes > self.iops_size {
            bytes as f64 / self.iops_size as f64
        } else {
            1.0
        };
        let (iops, bps) = match dir {
            Direction::Read => (LimitKind::IopsRead, LimitKind::BpsRead),
            Direction::Write => (LimitKind::IopsWrite, LimitKind::BpsWrite),
        };
        [
            (LimitKind::IopsTotal, ops),
            (iops, ops),
            (LimitKind::BpsTotal, bytes as f64),
            (bps, bytes as f64),
        ]
    }

    /// How long a request of `bytes` in `dir` must wait (zero: it may start now).
    pub fn wait(&self, dir: Direction, bytes: u64) -> Duration {
        let secs = self
            .costs(dir, bytes)
            .iter()
            .map(|&(k, cost)| self.buckets[k as usize].wait(cost))
            .fold(0.0, f64::max);
        // Rounded up to whole microseconds so that, after sleeping, the request fits.
        Duration::from_micros((secs * 1e6).ceil() as u64)
    }

    /// Account a request that starts.
    pub fn charge(&mut self, dir: Direction, bytes: u64) {
        for (k, cost) in self.costs(dir, bytes) {
            self.buckets[k as usize].charge(cost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Start requests of `bytes` as early as the buckets allow, with a clock moved by hand,
    /// and return the start time of each.
    fn schedule(cfg: &ThrottleConfig, dir: Direction, bytes: u64, n: usize) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut b = Buckets::new(cfg, t0);
        let mut now = t0;
        let mut starts = Vec::new();
        while starts.len() < n {
            b.advance(now);
            let w = b.wait(dir, bytes);
            if w.is_zero() {
                b.charge(dir, bytes);
                starts.push(now - t0);
            } else {
                now += w;
            }
        }
        starts
    }

    fn cfg(pairs: &[(&str, u64)]) -> ThrottleConfig {
        let mut c = ThrottleConfig::default();
        for (k, v) in pairs {
            c.set(k, *v).unwrap();
        }
        c.validate().unwrap();
        c
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn unlimited_never_waits() {
        let s = schedule(&ThrottleConfig::default(), Direction::Read, 1 << 20, 1000);
        assert_eq!(*s.last().unwrap(), Duration::ZERO);
    }

    #[test]
    fn average_rate_after_a_tenth_of_a_second_burst() {
        // 50 IOPS: a burst of 5, then one every 20 ms.
        let s = schedule(&cfg(&[("iops_total", 50)]), Direction::Read, 4096, 105);
        assert!(s[..5].iter().all(|d| d.is_zero()));
        assert!(!s[5].is_zero());
        assert!((secs(s[104]) - 2.0).abs() < 0.01, "{:?}", s[104]);
    }

    #[test]
    fn burst_max_and_length() {
        // avg 10, bursts at up to 100/s for 2 s: 200 ops in the burst, no faster than 100/s.
        let c = cfg(&[
            ("iops_write", 10),
            ("iops_write_max", 100),
            ("iops_write_max_length", 2),
        ]);
        let s = schedule(&c, Direction::Write, 512, 300);
        // The burst bucket lets 10 go at once, then 100/s.
        assert!(s[9].is_zero() && !s[10].is_zero());
        let burst_end = s.windows(2).position(|w| secs(w[1] - w[0]) > 0.05).unwrap() + 1;
        assert!((195..=225).contains(&burst_end), "{burst_end}");
        for w in s[10..burst_end].windows(11) {
            assert!(secs(w[10] - w[0]) >= 0.099, "faster than max");
        }
        // Then the average: 10/s.
        let tail = &s[burst_end..];
        let rate = (tail.len() - 1) as f64 / secs(tail[tail.len() - 1] - tail[0]);
        assert!((rate - 10.0).abs() < 0.1, "{rate}");
        // The reads are not limited at all.
        assert!(schedule(&c, Direction::Read, 512, 500)[499].is_zero());
    }

    #[test]
    fn bytes_per_second_and_large_requests() {
        // 1 MiB/s with 256 KiB requests: each waits for the previous one to drain.
        let s = schedule(
            &cfg(&[("bps_read", 1 << 20)]),
            Direction::Read,
            256 << 10,
            9,
        );
        assert!((secs(s[8]) - 2.0).abs() < 0.01, "{:?}", s);
        // Writes are separate.
        let c = cfg(&[("bps_read", 1 << 20)]);
        assert!(schedule(&c, Direction::Write, 1 << 20, 10)[9].is_zero());
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        // 100 IOPS with iops_size 4 KiB: a 64 KiB request counts as 16 operations.
        let c = cfg(&[("iops_total", 100), ("iops_size", 4096)]);
        let s = schedule(&c, Direction::Read, 64 << 10, 11);
        assert!((secs(s[10]) - 1.6).abs() < 0.02, "{:?}", s[10]);
        // Smaller requests still count as one.
        let s = schedule(&c, Direction::Read, 512, 110);
        assert!((secs(s[109]) - 1.0).abs() < 0.02, "{:?}", s[109]);
    }

    #[test]
    fn totals_are_shared_between_directions() {
        // A burst of two.
        let c = cfg(&[("iops_total", 20)]);
        let t0 = Instant::now();
        let mut b = Buckets::new(&c, t0);
        b.charge(Direction::Read, 1);
        assert!(b.wait(Direction::Write, 1).is_zero());
        b.charge(Direction::Write, 1);
        assert!(!b.wait(Direction::Write, 1).is_zero());
        assert!(!b.wait(Direction::Read, 1).is_zero());
    }
}
