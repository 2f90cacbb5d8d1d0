//! Statistics and throttling through the real pipeline, on temporary raw images.
//!
//! Timing assertions are lower bounds only (a throttle can never be faster than its limits;
//! a loaded host may always be slower), so they cannot flake.

use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::tests::{engines_for, make_image, opts, wait_all};
use super::*;
use crate::options::AioMode;
use crate::testutil::TempDir;
use crate::throttle::{ThrottleConfig, ThrottleGroup};

const IMAGE_SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn sg(mem: &GuestMemoryMmap, slot: u64, len: u64) -> SgList {
    SgList::from_guest(mem, &[(GuestAddress(slot * BLOCK), len as usize)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, tag: u64, len: u64) -> Request {
    Request {
        tag,
        op: RequestOp::Read {
            offset: (tag % 64) * BLOCK,
            buf: sg(mem, tag % 64, len),
        },
    }
}

fn group(pairs: &[(&str, u64)]) -> Arc<ThrottleGroup> {
    let mut c = ThrottleConfig::default();
    for (k, v) in pairs {
        c.set(k, *v).unwrap();
    }
    ThrottleGroup::new("test", c).unwrap()
}

fn throttled_disk(dir: &TempDir, name: &str, g: &Arc<ThrottleGroup>) -> Disk {
    let path = dir.path().join(name);
    File::create(&path).unwrap().set_len(IMAGE_SIZE).unwrap();
    open_disk(&DiskOptions {
        throttle: Some(g.clone()),
        ..opts(&path, CacheMode::Writeback, AioMode::Threads)
    })
    .unwrap()
}

/// Wait for the eventfd, then take whatever completed (possibly nothing).
fn wait_some(d: &mut Disk) -> usize {
    let fired = d.wait_completions(Some(Duration::from_secs(10)));
    assert!(fired.unwrap(), "no completion within 10 s");
    d.completions().len()
}

fn assert_histograms_match(s: &crate::stats::StatsSnapshot) {
    for k in crate::stats::IoKind::ALL {
        let c = s.kind(k);
        assert_eq!(c.histogram.iter().sum::<u64>(), c.ops, "{}", k.as_str());
    }
}

#[test]
fn stats_count_every_kind() {
    for aio in engines_for(CacheMode::Writeback) {
        let dir = TempDir::new("stats");
        let path = make_image(&dir, IMAGE_SIZE);
        let mut d = open_disk(&opts(&path, CacheMode::Writeback, aio)).unwrap();
        let stats = d.stats();
        let mem = guest_mem();
        let mut reqs = Vec::new();
        for i in 0..3 {
            reqs.push(RequestOp::Write {
                offset: i * BLOCK,
                buf: sg(&mem, i, BLOCK),
            });
        }
        for i in 3..5 {
            reqs.push(RequestOp::Read {
                offset: 8 * BLOCK,
                buf: sg(&mem, i, 1000),
            });
        }
        reqs.push(RequestOp::Flush);
        reqs.push(RequestOp::Discard {
            offset: 16 * BLOCK,
            len: 2 * BLOCK,
        });
        reqs.push(RequestOp::WriteZeroes {
            offset: 32 * BLOCK,
            len: BLOCK,
            unmap: false,
        });
        let n = reqs.len();
        for (tag, op) in reqs.into_iter().enumerate() {
            d.submit(Request {
                tag: tag as u64,
                op,
            })
            .unwrap();
        }
        // Refused at submit: counted apart, never in flight.
        assert!(d
            .submit(Request {
                tag: 99,
                op: RequestOp::Read {
                    offset: IMAGE_SIZE,
                    buf: sg(&mem, 9, 512),
                },
            })
            .is_err());
        // Nothing is handed back before `completions`.
        assert_eq!(stats.snapshot().in_flight, n as u64);
        assert!(wait_all(&mut d, n).iter().all(|(_, r)| r.is_ok()));

        let s = stats.snapshot();
        assert_eq!(
            (s.write.ops, s.write.bytes, s.write.errors),
            (3, 3 * BLOCK, 0)
        );
        assert_eq!((s.read.ops, s.read.bytes, s.read.refused), (2, 2000, 1));
        assert_eq!((s.flush.ops, s.flush.bytes), (1, 0));
        assert_eq!((s.discard.ops, s.discard.bytes), (1, 2 * BLOCK));
        assert_eq!((s.write_zeroes.ops, s.write_zeroes.bytes), (1, BLOCK));
        assert_eq!((s.in_flight, s.throttled_now), (0, 0));
        assert_eq!(d.in_flight(), 0);
        assert_histograms_match(&s);
        assert!(s.write.mean_latency().unwrap() > Duration::ZERO);
        assert_eq!(s.read.throttled, 0);
        // The handle outlives the disk.
        drop(d);
        assert_eq!(stats.snapshot(), s);
    }
}

#[test]
fn throttled_reads_keep_the_average_and_show_their_wait() {
    // 50 IOPS: a burst of 5 (a tenth of a second), then one every 20 ms.
    const RATE: f64 = 50.0;
    const BURST: f64 = 5.0;
    const N: u64 = 100;
    let g = group(&[("iops_total", RATE as u64)]);
    let dir = TempDir::new("throttle");
    let mut d = throttled_disk(&dir, "a.raw", &g);
    let mem = guest_mem();
    let t0 = Instant::now();
    for tag in 0..N {
        d.submit(read(&mem, tag, 512)).unwrap();
    }
    assert_eq!(
        d.in_flight(),
        N as usize,
        "throttled requests count as in flight"
    );
    let s = d.stats().snapshot();
    assert!(s.throttled_now > 0 && s.in_flight == N);
    let mut tags: Vec<u64> = wait_all(&mut d, N as usize)
        .into_iter()
        .map(|(t, r)| {
            r.unwrap();
            t
        })
        .collect();
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        elapsed >= (N as f64 - BURST) / RATE - 0.01,
        "{N} reads at {RATE} IOPS took only {elapsed:.3} s"
    );
    tags.sort_unstable();
    assert_eq!(tags, (0..N).collect::<Vec<_>>());

    let s = d.stats().snapshot();
    assert_eq!((s.read.ops, s.in_flight, s.throttled_now), (N, 0, 0));
    assert!(s.read.throttled > 0 && s.read.throttle_wait > Duration::ZERO);
    // Latency runs from submit, so it includes the throttle wait.
    assert!(s.read.latency_total >= s.read.throttle_wait);
    assert_histograms_match(&s);
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn a_group_shares_its_budget_between_disks() {
    // 40 IOPS for the group: a burst of 4, and two disks doing 40 reads each.
    const RATE: f64 = 40.0;
    const BURST: f64 = 4.0;
    const PER_DISK: u64 = 40;
    const DEPTH: u64 = 8;
    let g = group(&[("iops_total", RATE as u64)]);
    let dir = TempDir::new("group");
    let disks = [
        throttled_disk(&dir, "a.raw", &g),
        throttled_disk(&dir, "b.raw", &g),
    ];
    let t0 = Instant::now();
    let threads: Vec<_> = disks
        .into_iter()
        .map(|mut d| {
            std::thread::spawn(move || {
                let mem = guest_mem();
                let (mut sent, mut done) = (0, 0);
                while done < PER_DISK {
                    while sent < PER_DISK && sent - done < DEPTH {
                        d.submit(read(&mem, sent, 512)).unwrap();
                        sent += 1;
                    }
                    done += wait_some(&mut d) as u64;
                }
                assert_eq!(d.in_flight(), 0);
                d.stats().snapshot()
            })
        })
        .collect();
    let snaps: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = t0.elapsed().as_secs_f64();
    let total = (2 * PER_DISK) as f64;
    assert!(
        elapsed >= (total - BURST) / RATE - 0.01,
        "two disks did {total} reads at {RATE} IOPS together in only {elapsed:.3} s"
    );
    for s in &snaps {
        assert_eq!(s.read.ops, PER_DISK);
        assert!(s.read.throttled > 0);
    }
}

#[test]
fn flushes_bypass_and_release_starts_everything() {
    // One operation per second: everything after the first read waits.
    let g = group(&[("iops_total", 1)]);
    let dir = TempDir::new("release");
    let mut d = throttled_disk(&dir, "a.raw", &g);
    let mem = guest_mem();
    for tag in 0..5 {
        d.submit(read(&mem, tag, 512)).unwrap();
    }
    d.submit(Request {
        tag: 10,
        op: RequestOp::Flush,
    })
    .unwrap();
    let s = d.stats().snapshot();
    assert_eq!(
        (s.in_flight, s.throttled_now),
        (6, 4),
        "the flush is not held"
    );
    assert_eq!(d.throttle_group().unwrap().name(), "test");

    d.release_throttled();
    let s = d.stats().snapshot();
    assert_eq!((s.throttled_now, s.read.throttled), (0, 4));
    assert_eq!(wait_all(&mut d, 6).len(), 6);
    assert_eq!(d.in_flight(), 0);

    // Closing a disk with requests still queued leaves the group usable; new limits (none
    // here) apply at once.
    for tag in 0..3 {
        d.submit(read(&mem, tag, 512)).unwrap();
    }
    drop(d);
    g.set_config(ThrottleConfig::default()).unwrap();
    let mut d = throttled_disk(&dir, "b.raw", &g);
    d.submit(read(&mem, 1, 512)).unwrap();
    assert_eq!(wait_all(&mut d, 1).len(), 1);
}
