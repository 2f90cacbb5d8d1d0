//! Platter's block layer: image formats, host cache modes and asynchronous I/O engines.
//!
//! Devices see one thing, [`Disk`], opened with [`open_disk`]:
//!
//! ```text
//!  device thread ──submit(Request{tag, op})──▶ Disk ──▶ FormatDriver (raw | qcow2)
//!        ▲                                      │        map(guest range) → host extents,
//!        │                                      │        or its synchronous path
//!        │                                      ▼
//!   completions() ◀── eventfd ◀── Engine (threads | native (Linux AIO) | io_uring)
//! ```
//!
//! * [`options`]: `DiskOptions`, `CacheMode` (QEMU's five modes), `AioMode`, `Format`.
//! * [`disk`]: the request pipeline, O_DIRECT bounce buffers and read-modify-write under a
//!   per-disk range lock.
//! * [`engine`]: the engine trait and the threads (grows on demand to 64 workers, like QEMU's
//!   pool), native (io_submit with IOCB_FLAG_RESFD; refused without O_DIRECT) and io_uring
//!   engines.
//! * [`throttle`]: IOPS and bytes/s limits per disk or per named [`ThrottleGroup`], with
//!   bursts (QEMU's `throttling.*`); requests over budget wait inside the disk.
//! * [`stats`]: per-disk counters and latency histograms ([`Disk::stats`]), readable from any
//!   thread while the disk runs.
//! * [`lock`]: QEMU-compatible OFD image locks.
//! * [`img`] and [`qcow2`]: `img create` / `img info`, qcow2 headers, and the qcow2 driver
//!   ([`qcow2::driver`]): L1/L2 mapping with write-back L2 and refcount caches
//!   (`DiskOptions::l2_cache_size`), cluster allocation with refcounts, backing chains (raw
//!   or qcow2, backing_fmt honoured), zero clusters, compressed (deflate) clusters readable,
//!   discard freeing clusters, corrupt and dirty bits.
//!
//! # The `imago` crate (evaluated for qcow2, version 0.2.6)
//!
//! Read from its source (crates.io 0.2.6, in the local registry): it opens and creates qcow2
//! (`Qcow2::create` builder with `cluster_size`, `refcount_width`, backing file + format, and a
//! preallocation module), reads and writes through a `FormatAccess` with its own L2/refcount
//! caches, accepts vm-memory `VolatileSlice`s, and follows backing chains. Its I/O model is
//! the bar it misses here: it is built on its own `Storage` trait driven either by async
//! functions (needing tokio for its locks, `async` feature, default) or a fully blocking
//! `sync` feature, and its file storage issues plain preadv/pwritev itself. It has no
//! io_uring or Linux AIO engine and no completion-eventfd model, so using it would mean
//! either running its blocking calls on our thread pool (losing io_uring and native for
//! qcow2) or implementing its `Storage` trait on top of our engines with an executor in
//! between. It also brings tokio, futures, nix, parking_lot, tracing and miniz_oxide.
//!
//! Decision: our own mapping layer (`qcow2::driver`, ~850 lines then, ~1,800 now with the
//! write-back caches and their tests; only new dependency miniz_oxide for deflate), keeping
//! the engine seam: a request whose range maps to owned, contiguous data clusters goes to the
//! engine at its host offset, so allocated qcow2 runs on all three engines. Measured with `scripts/bench-img.sh` (1 GiB, one noisy run on 2 shared
//! cores, QEMU 7.2's qemu-img): fully allocated qcow2, 4 KiB stride reads at depth 32,
//! cache=none: io_uring 66.6k ops/s vs qemu-img 53.8k (1.24x), native 66.7k vs 72.6k, threads
//! 46.8k vs 41.6k; the same as our raw numbers (64-65k), i.e. mapping costs nothing visible.
//! What imago would give was not measured (nothing was built against it): on the threads
//! engine alone it could at best match our threads rows, and it could not offer io_uring or
//! native.
//!
//! Allocating writes (sparse qcow2): the first version wrote every metadata change through
//! (read-modify-write of one block under O_DIRECT) and ran each allocation synchronously, so
//! 4 KiB random writes to a sparse image reached only 0.35-0.55x of qemu-img with cache=none.
//! Now L2 tables, refcount blocks and L1 entries are write-back (`qcow2::driver::writeback`):
//! written at guest flushes (refcount blocks, fdatasync, then L2/L1, so an on-disk reference
//! never points at a cluster counted 0; frees are applied only after the tables dropping them
//! are durable), on eviction, after every synchronous-path request while WCE is off, and at
//! close, always as whole aligned blocks from the cache. A crash between flushes leaks
//! clusters at most; no dirty bit needed. The refcount cache holds a quarter of the L2 cache's
//! bytes (at least 4 blocks). While WCE is on, a write that allocates a cluster reading as
//! zeroes (no backing file) is mapped to a fresh zeroed cluster and goes to the engine, and
//! the file grows ahead in 2 MiB steps (trimmed at close) instead of one `ftruncate` per
//! cluster. Same script, rw4k on a sparse 1 GiB image, three noisy runs on a shared host,
//! platter/qemu-img with cache=none: d1 threads 1.42-1.78x, native 1.37-1.78x, io_uring
//! 1.07-1.74x (were 0.48/0.43/0.37); d32 native 0.89-1.45x, io_uring 1.28-1.70x (were
//! 0.55/0.52), threads 0.53-0.65x (was 0.36). cache=writeback stays above 1.1x. The d32
//! threads row is the one left below 1.0; our guess (unmeasured): ext4 takes the inode lock
//! exclusively for direct writes into holes, and 32 blocking workers queue on it. (Since
//! confirmed and fixed: the file now grows by fallocate, 0.44x -> 1.82x.)
//!
//! Scattered clusters: a request over clusters that are not contiguous in the file (any image
//! a guest wrote in random order) used to run whole on the synchronous path, one blocking
//! read at a time on the device thread. It now becomes one engine operation per host extent,
//! all in flight together, and holes or zero clusters in a read are zero-filled in place
//! (QEMU splits its qcow2 requests the same way). `scripts/bench-img.sh` with
//! `FORMATS=qcow2-frag` (64 KiB clusters allocated in stride order), 1 MiB sequential reads
//! at depth 4, cache=none: 0.45x (threads) / 0.50x (io_uring) of qemu-img bench before,
//! 1.05x / 1.02x after.

pub mod disk;
pub mod engine;
mod error;
pub mod format;
pub mod img;
pub mod lock;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod sg;
pub mod stats;
#[cfg(test)]
pub(crate) mod testutil;
pub mod throttle;

pub use disk::{open_disk, Completion, Disk, Request, RequestOp, SubmitError};
pub use error::BlockError;
pub use img::{CreateOptions, ImageInfo, Preallocation};
pub use options::{AioMode, CacheMode, DiskOptions, Format, ParseOptionError};
pub use sg::{IoVec, SgList};
pub use stats::{DiskStats, IoKind, KindSnapshot, StatsSnapshot};
pub use throttle::{Limit, LimitKind, ThrottleConfig, ThrottleConfigError, ThrottleGroup};
