//! Disk options: image format, cache mode and aio engine, with the exact config strings
//! (`writeback|none|writethrough|directsync|unsafe`, `threads|native|io_uring`, `raw|qcow2`),
//! and the throttle group. Throttle limits themselves are [`ThrottleConfig`], re-exported here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use crate::throttle::ThrottleConfig;
use crate::throttle::ThrottleGroup;

/// A config string that names no known value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {}", expected.trim_end_matches('|'))]
pub struct ParseOptionError {
    /// What was being parsed ("cache mode", ...).
    pub kind: &'static str,
    /// The rejected string.
    pub value: String,
    /// The accepted strings, `|`-separated.
    pub expected: &'static str,
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $kind:literal, { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            /// Every value, in config-string order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The config string.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseOptionError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(ParseOptionError {
                        kind: $kind,
                        value: s.to_string(),
                        expected: concat!($($s, "|"),+),
                    }),
                }
            }
        }
    };
}

string_enum!(
    /// Image format.
    Format, "image format", {
        /// Plain image: guest offset == host offset.
        Raw => "raw",
        /// QEMU copy-on-write v2 (compat=0.10) or v3 (compat=1.1).
        Qcow2 => "qcow2",
    }
);

string_enum!(
    /// Host cache mode, with QEMU's meaning.
    ///
    /// | mode         | host page cache | O_DIRECT | guest WCE | flush        |
    /// |--------------|-----------------|----------|-----------|--------------|
    /// | writeback    | yes             | no       | on        | fdatasync    |
    /// | none         | no              | yes      | on        | fdatasync    |
    /// | writethrough | yes             | no       | off       | fdatasync    |
    /// | directsync   | no              | yes      | off       | fdatasync    |
    /// | unsafe       | yes             | no       | on        | ignored      |
    CacheMode, "cache mode", {
        /// Page cache, write cache on.
        Writeback => "writeback",
        /// O_DIRECT, write cache on.
        None => "none",
        /// Page cache, every write durable.
        Writethrough => "writethrough",
        /// O_DIRECT, every write durable.
        Directsync => "directsync",
        /// Page cache, flushes ignored.
        Unsafe => "unsafe",
    }
);

string_enum!(
    /// Asynchronous I/O engine.
    AioMode, "aio engine", {
        /// A pool of preadv2/pwritev2 worker threads.
        Threads => "threads",
        /// Linux AIO (io_submit); needs O_DIRECT.
        Native => "native",
        /// io_uring.
        IoUring => "io_uring",
    }
);

impl CacheMode {
    /// Whether the image is opened with O_DIRECT (bypassing the host page cache).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// The guest-visible write cache state (WCE) at open time.
    pub fn initial_wce(self) -> bool {
        !matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether guest flushes reach the host (false only for `unsafe`).
    pub fn honours_flush(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// Default largest number of worker threads of the threads engine (QEMU's thread pool limit).
pub const DEFAULT_THREADS: usize = 64;
/// Default io_uring submission queue size.
pub const DEFAULT_URING_ENTRIES: u32 = 128;

/// How to open one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// Image file or block device.
    pub path: PathBuf,
    /// Format; `None` probes by magic (raw when no known magic is found).
    pub format: Option<Format>,
    /// Host cache mode.
    pub cache: CacheMode,
    /// I/O engine.
    pub aio: AioMode,
    /// Open read-only (shared lock; writes are refused).
    pub readonly: bool,
    /// Pass guest discards to the host (punch holes). Off: discards complete as no-ops.
    pub discard: bool,
    /// Take QEMU-compatible OFD locks on the image.
    pub locking: bool,
    /// Most worker threads for `aio=threads` (started on demand).
    pub threads: usize,
    /// qcow2 L2 table cache size in bytes (QEMU's `l2-cache-size`).
    pub l2_cache_size: u64,
    /// Ring size for `aio=io_uring`, and AIO context size (io_setup nr_events) for `aio=native`.
    pub uring_entries: u32,
    /// Throttle group whose limits this disk draws on (a disk with limits of its own gets a
    /// group of one); `None`: unlimited.
    pub throttle: Option<Arc<ThrottleGroup>>,
}

impl DiskOptions {
    /// Options with QEMU's defaults: probe the format, cache=writeback, aio=threads, read-write,
    /// discard on, locking on.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskOptions {
            path: path.into(),
            format: None,
            cache: CacheMode::Writeback,
            aio: AioMode::Threads,
            readonly: false,
            discard: true,
            locking: true,
            threads: DEFAULT_THREADS,
            uring_entries: DEFAULT_URING_ENTRIES,
            l2_cache_size: crate::qcow2::driver::DEFAULT_L2_CACHE_SIZE,
            throttle: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip() {
        for m in CacheMode::ALL {
            assert_eq!(m.to_string().parse::<CacheMode>().unwrap(), *m);
        }
        for m in AioMode::ALL {
            assert_eq!(m.to_string().parse::<AioMode>().unwrap(), *m);
        }
        for m in Format::ALL {
            assert_eq!(m.to_string().parse::<Format>().unwrap(), *m);
        }
        assert_eq!("io_uring".parse::<AioMode>().unwrap(), AioMode::IoUring);
        assert_eq!("none".parse::<CacheMode>().unwrap(), CacheMode::None);
    }

    #[test]
    fn unknown_strings_are_rejected_with_the_choices() {
        let e = "write-back".parse::<CacheMode>().unwrap_err();
        assert!(e
            .to_string()
            .contains("writeback|none|writethrough|directsync|unsafe"));
        assert!("iouring".parse::<AioMode>().is_err());
        assert!("Threads".parse::<AioMode>().is_err());
        assert!("vmdk".parse::<Format>().is_err());
    }

    #[test]
    fn cache_mode_semantics() {
        use CacheMode::*;
        assert!(!Writeback.direct() && Writeback.initial_wce() && Writeback.honours_flush());
        assert!(None.direct() && None.initial_wce());
        assert!(!Writethrough.direct() && !Writethrough.initial_wce());
        assert!(Directsync.direct() && !Directsync.initial_wce());
        assert!(!Unsafe.direct() && Unsafe.initial_wce() && !Unsafe.honours_flush());
    }
}
