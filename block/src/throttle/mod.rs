//! I/O throttling per disk and per named group, with QEMU's `throttling.*` semantics: IOPS and
//! bytes per second for reads, writes and both together, each with an optional burst rate and
//! burst length, and `iops_size`.
//!
//! ```text
//!  disk A ─submit─▶ FIFO per direction ─┐                       ┌─▶ engine
//!  disk B ─submit─▶ FIFO per direction ─┼─▶ ThrottleGroup ──────┤
//!                                       │   buckets + turns     │  (over budget: the disk
//!                     timer thread ─────┘   (grant: pay, write  │   waits; its eventfd is
//!                                            the disk's eventfd)┘   written when it may go)
//! ```
//!
//! * [`config`]: [`ThrottleConfig`] (the limits, flat keys, `validate`).
//! * `bucket`: the leaky-bucket arithmetic.
//! * `scheduler`: which waiting disk goes next (round robin, FIFO per disk).
//! * `group`: [`ThrottleGroup`], shared by its disks, and its timer thread.
//!
//! A disk with limits of its own is a group of one. Requests over budget are never refused:
//! they wait inside the [`Disk`](crate::Disk), count as in flight, and start in a later
//! [`Disk::completions`](crate::Disk::completions). Flushes are never throttled.

mod bucket;
pub mod config;
mod group;
mod scheduler;

pub use config::{Limit, LimitKind, ThrottleConfig, ThrottleConfigError, THROTTLE_VALUE_MAX};
pub(crate) use group::Member;
pub use group::ThrottleGroup;

/// The two request directions, each with its own queue and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Reads.
    Read = 0,
    /// Writes, discards and write-zeroes.
    Write = 1,
}
