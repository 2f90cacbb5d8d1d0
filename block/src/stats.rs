//! Per-disk I/O statistics, written by the thread that runs the [`Disk`](crate::Disk) and read
//! by any other (the VMM prints them on exit or on a signal).
//!
//! Every counter is a relaxed atomic: recording costs a few uncontended atomic adds and needs
//! no lock, and a reader never stalls the device thread. The price is that a
//! [`DiskStats::snapshot`] taken while requests complete is not one instant: two counters may
//! be one request apart. That is fine for monitoring and exact once the disk is idle.
//!
//! Latency runs from [`Disk::submit`](crate::Disk::submit) to the moment
//! [`Disk::completions`](crate::Disk::completions) hands the request back, so it includes time
//! spent waiting for throttle budget and for a range lock, like the guest sees it. The
//! histogram has log2 buckets of microseconds:
//!
//! ```text
//!  bucket   0      1       2       3            i                 25
//!  range  <1 µs  [1,2)   [2,4)   [4,8) ... [2^(i-1), 2^i) µs ... ≥ 2^24 µs (~16.8 s)
//! ```

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::disk::RequestOp;

/// Number of latency histogram buckets (see the module documentation).
pub const LATENCY_BUCKETS: usize = 26;

/// The kinds of request counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Discard,
    /// Write-zeroes.
    WriteZeroes,
}

impl IoKind {
    /// Every kind, in the order snapshots print them.
    pub const ALL: [IoKind; 5] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Discard,
        IoKind::WriteZeroes,
    ];

    /// The name used in text and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
            IoKind::WriteZeroes => "write_zeroes",
        }
    }

    /// The kind of a request.
    pub fn of(op: &RequestOp) -> IoKind {
        match op {
            RequestOp::Read { .. } => IoKind::Read,
            RequestOp::Write { .. } => IoKind::Write,
            RequestOp::Flush => IoKind::Flush,
            RequestOp::Discard { .. } => IoKind::Discard,
            RequestOp::WriteZeroes { .. } => IoKind::WriteZeroes,
        }
    }
}

/// The histogram bucket of a latency.
fn bucket_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }
}

/// Upper bound of bucket `i` (the last bucket has none; its lower bound is returned).
fn bucket_limit(i: usize) -> Duration {
    Duration::from_micros(1u64 << i.min(LATENCY_BUCKETS - 2))
}

#[derive(Debug, Default)]
struct KindStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    latency_ns: AtomicU64,
    histogram: [AtomicU64; LATENCY_BUCKETS],
    throttled: AtomicU64,
    throttle_wait_ns: AtomicU64,
    merged: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Live counters of one disk; share it with [`Disk::stats`](crate::Disk::stats).
#[derive(Debug, Default)]
pub struct DiskStats {
    kinds: [KindStats; 5],
    in_flight: AtomicU64,
    throttled_now: AtomicU64,
}

impl DiskStats {
    fn kind(&self, k: IoKind) -> &KindStats {
        &self.kinds[k as usize]
    }

    /// A request was accepted by `submit`.
    pub(crate) fn submitted(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A request was handed back by `submit` (out of range, read-only disk).
    pub(crate) fn refused(&self, k: IoKind) {
        self.kind(k).refused.fetch_add(1, Relaxed);
    }

    /// A request was handed back by `completions`, with its bytes, or `None` if it failed.
    pub(crate) fn completed(&self, k: IoKind, bytes: Option<usize>, latency: Duration) {
        let s = self.kind(k);
        s.ops.fetch_add(1, Relaxed);
        match bytes {
            Some(n) => s.bytes.fetch_add(n as u64, Relaxed),
            None => s.errors.fetch_add(1, Relaxed),
        };
        s.latency_ns.fetch_add(nanos(latency), Relaxed);
        s.histogram[bucket_of(latency)].fetch_add(1, Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// A request started waiting for throttle budget.
    pub(crate) fn throttle_queued(&self) {
        self.throttled_now.fetch_add(1, Relaxed);
    }

    /// A request that waited `wait` for throttle budget was started.
    pub(crate) fn throttle_released(&self, k: IoKind, wait: Duration) {
        let s = self.kind(k);
        s.throttled.fetch_add(1, Relaxed);
        s.throttle_wait_ns.fetch_add(nanos(wait), Relaxed);
        self.throttled_now.fetch_sub(1, Relaxed);
    }

    /// A device joined one of its requests of kind `k` to the one before it (adjacent disk
    /// ranges), so the disk ran the two as one request.
    pub fn merged(&self, k: IoKind) {
        self.kind(k).merged.fetch_add(1, Relaxed);
    }

    /// A copy of every counter as plain numbers.
    pub fn snapshot(&self) -> StatsSnapshot {
        let kind = |k: IoKind| {
            let s = self.kind(k);
            KindSnapshot {
                ops: s.ops.load(Relaxed),
                bytes: s.bytes.load(Relaxed),
                errors: s.errors.load(Relaxed),
                refused: s.refused.load(Relaxed),
                latency_total: Duration::from_nanos(s.latency_ns.load(Relaxed)),
                histogram: std::array::from_fn(|i| s.histogram[i].load(Relaxed)),
                throttled: s.throttled.load(Relaxed),
                throttle_wait: Duration::from_nanos(s.throttle_wait_ns.load(Relaxed)),
                merged: s.merged.load(Relaxed),
            }
        };
        StatsSnapshot {
            read: kind(IoKind::Read),
            write: kind(IoKind::Write),
            flush: kind(IoKind::Flush),
            discard: kind(IoKind::Discard),
            write_zeroes: kind(IoKind::WriteZeroes),
            in_flight: self.in_flight.load(Relaxed),
            throttled_now: self.throttled_now.load(Relaxed),
        }
    }
}

/// Counters of one request kind at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindSnapshot {
    /// Requests completed (successfully or not), as the disk ran them: requests a device
    /// joined into one (`merged`) count once.
    pub ops: u64,
    /// Bytes of the successful ones (the range length for discards and write-zeroes).
    pub bytes: u64,
    /// Requests that completed with an error.
    pub errors: u64,
    /// Requests refused by `submit` (beyond the end, read-only disk); not in `ops`.
    pub refused: u64,
    /// Sum of the latencies of `ops`.
    pub latency_total: Duration,
    /// Latency histogram of `ops`, log2 buckets of microseconds (see [`crate::stats`]).
    pub histogram: [u64; LATENCY_BUCKETS],
    /// Requests that had to wait for throttle budget.
    pub throttled: u64,
    /// Total time those requests waited.
    pub throttle_wait: Duration,
    /// Device requests joined to the one before them (virtio-blk merges reads or writes of
    /// adjacent ranges); the guest issued `ops + merged` requests.
    pub merged: u64,
}

impl KindSnapshot {
    /// Mean latency, `None` before the first request.
    pub fn mean_latency(&self) -> Option<Duration> {
        (self.ops > 0).then(|| {
            let ns = self.latency_total.as_nanos() / u128::from(self.ops);
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        })
    }

    /// Latency at or below which fraction `p` (0..=1) of the requests completed, rounded up to
    /// its histogram bucket's upper bound; `None` before the first request.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let total: u64 = self.histogram.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((p.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.histogram.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(bucket_limit(i));
            }
        }
        Some(bucket_limit(LATENCY_BUCKETS - 1))
    }
}

/// Every counter of a disk at one moment (see the module documentation for how exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Reads.
    pub read: KindSnapshot,
    /// Writes.
    pub write: KindSnapshot,
    /// Flushes.
    pub flush: KindSnapshot,
    /// Discards.
    pub discard: KindSnapshot,
    /// Write-zeroes.
    pub write_zeroes: KindSnapshot,
    /// Requests submitted and not yet handed back, throttled ones included.
    pub in_flight: u64,
    /// Requests waiting for throttle budget right now.
    pub throttled_now: u64,
}

fn us(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl StatsSnapshot {
    /// The counters of one kind.
    pub fn kind(&self, k: IoKind) -> &KindSnapshot {
        match k {
            IoKind::Read => &self.read,
            IoKind::Write => &self.write,
            IoKind::Flush => &self.flush,
            IoKind::Discard => &self.discard,
            IoKind::WriteZeroes => &self.write_zeroes,
        }
    }

    /// One JSON object, keys in a fixed order, latencies in microseconds:
    /// `{"read":{"ops":..,"bytes":..,"errors":..,"refused":..,"latency_us_mean":..,
    /// "latency_us_p50":..,"latency_us_p99":..,"latency_us_histogram":[..26],
    /// "throttled":..,"throttle_wait_us":..,"merged":..},"write":{..},"flush":{..},"discard":{..},
    /// "write_zeroes":{..},"in_flight":..,"throttled_now":..}`.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        for k in IoKind::ALL {
            let c = self.kind(k);
            let fields = c.fields();
            let (latencies, throttle) = fields.split_at(7);
            let _ = write!(s, "\"{}\":{{", k.as_str());
            for (json, _, v) in latencies {
                let _ = write!(s, "\"{json}\":{v},");
            }
            let hist: Vec<String> = c.histogram.iter().map(u64::to_string).collect();
            let _ = write!(s, "\"latency_us_histogram\":[{}]", hist.join(","));
            for (json, _, v) in throttle {
                let _ = write!(s, ",\"{json}\":{v}");
            }
            s.push_str("},");
        }
        let _ = write!(
            s,
            "\"in_flight\":{},\"throttled_now\":{}}}",
            self.in_flight, self.throttled_now
        );
        s
    }
}

impl KindSnapshot {
    /// The numbers both outputs show, in order, as (JSON key, text key, value); latencies
    /// in microseconds. The JSON adds the histogram after the first seven.
    fn fields(&self) -> [(&'static str, &'static str, u64); 10] {
        [
            ("ops", "ops", self.ops),
            ("bytes", "bytes", self.bytes),
            ("errors", "errors", self.errors),
            ("refused", "refused", self.refused),
            ("latency_us_mean", "lat_mean_us", us(self.mean_latency())),
            ("latency_us_p50", "lat_p50_us", us(self.percentile(0.5))),
            ("latency_us_p99", "lat_p99_us", us(self.percentile(0.99))),
            ("throttled", "throttled", self.throttled),
            (
                "throttle_wait_us",
                "throttle_wait_us",
                us(Some(self.throttle_wait)),
            ),
            ("merged", "merged", self.merged),
        ]
    }
}

/// One line per kind that saw any request, then the gauges:
///
/// ```text
/// read: ops=100 bytes=409600 errors=0 refused=0 lat_mean_us=35 lat_p50_us=32 lat_p99_us=128 throttled=95 throttle_wait_us=1900000 merged=0
/// in_flight=0 throttled_now=0
/// ```
impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for k in IoKind::ALL {
            let c = self.kind(k);
            if c.ops == 0 && c.refused == 0 && c.throttled == 0 {
                continue;
            }
            write!(f, "{}:", k.as_str())?;
            for (_, text, v) in c.fields() {
                write!(f, " {text}={v}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "in_flight={} throttled_now={}",
            self.in_flight, self.throttled_now
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket_of(Duration::from_nanos(999)), 0);
        assert_eq!(bucket_of(Duration::from_micros(1)), 1);
        assert_eq!(bucket_of(Duration::from_micros(3)), 2);
        assert_eq!(bucket_of(Duration::from_micros(4)), 3);
        assert_eq!(bucket_of(Duration::from_secs(1)), 20);
        assert_eq!(bucket_of(Duration::from_secs(10)), 24);
        assert_eq!(bucket_of(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
        // Every latency is below its bucket's limit, except in the open last bucket.
        for us in [0, 1, 5, 1000, 123_456, 8_000_000] {
            let d = Duration::from_micros(us);
            assert!(d < bucket_limit(bucket_of(d)), "{us}");
        }
    }

    #[test]
    fn snapshot_mean_percentiles_and_formats() {
        let s = DiskStats::default();
        for i in 0..100u64 {
            s.submitted();
            // 99 fast reads at 10 µs, one slow at 5 ms.
            let lat = if i == 99 { 5000 } else { 10 };
            s.completed(IoKind::Read, Some(4096), Duration::from_micros(lat));
        }
        s.submitted();
        s.completed(IoKind::Write, None, Duration::from_micros(2));
        s.refused(IoKind::Discard);
        s.submitted();
        s.throttle_queued();
        s.merged(IoKind::Read);
        let snap = s.snapshot();
        assert_eq!(snap.read.ops, 100);
        assert_eq!((snap.read.merged, snap.write.merged), (1, 0));
        assert_eq!(snap.read.bytes, 409_600);
        assert_eq!(snap.write.errors, 1);
        assert_eq!(snap.write.bytes, 0);
        assert_eq!(snap.discard.refused, 1);
        assert_eq!(snap.discard.ops, 0);
        assert_eq!((snap.in_flight, snap.throttled_now), (1, 1));
        assert_eq!(snap.read.histogram.iter().sum::<u64>(), 100);
        assert_eq!(snap.read.mean_latency(), Some(Duration::from_nanos(59_900)));
        assert_eq!(snap.read.percentile(0.5), Some(Duration::from_micros(16)));
        assert_eq!(snap.read.percentile(0.99), Some(Duration::from_micros(16)));
        assert_eq!(snap.read.percentile(1.0), Some(Duration::from_micros(8192)));
        assert_eq!(snap.flush.mean_latency(), None);
        assert_eq!(snap.flush.percentile(0.5), None);

        let text = snap.to_string();
        assert!(text.starts_with("read: ops=100 bytes=409600 errors=0 refused=0 lat_mean_us=59"));
        assert!(text.contains("\ndiscard: ops=0 bytes=0 errors=0 refused=1"));
        assert!(!text.contains("flush:"));
        assert!(text.ends_with("in_flight=1 throttled_now=1"));
        assert!(text.contains("throttle_wait_us=0 merged=1\nwrite:"));

        let json = snap.to_json();
        assert!(json.starts_with("{\"read\":{\"ops\":100,\"bytes\":409600,"));
        assert!(json.contains("\"latency_us_p50\":16,\"latency_us_p99\":16,"));
        assert!(json.ends_with(",\"in_flight\":1,\"throttled_now\":1}"));
        assert!(json.contains("\"throttle_wait_us\":0,\"merged\":1},\"write\""));
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        assert_eq!(json.matches('{').count(), 6);
    }

    #[test]
    fn throttle_wait_is_recorded_per_kind() {
        let s = DiskStats::default();
        s.throttle_queued();
        s.throttle_queued();
        s.throttle_released(IoKind::Write, Duration::from_millis(3));
        let snap = s.snapshot();
        assert_eq!(snap.write.throttled, 1);
        assert_eq!(snap.write.throttle_wait, Duration::from_millis(3));
        assert_eq!(snap.throttled_now, 1);
    }
}
