//! Errors of the block layer: one variant per failure, messages that say what to do.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when opening a disk, submitting a request or handling an image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The filesystem refuses O_DIRECT (tmpfs, for example).
    #[error("{path}: the filesystem does not support O_DIRECT; use cache=writeback or cache=writethrough")]
    DirectUnsupported {
        /// Image path.
        path: PathBuf,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("{path}: failed to get {what} lock: is another process using the image? (it may be open for writing elsewhere; open it read-only or stop the other user)")]
    Locked {
        /// Image path.
        path: PathBuf,
        /// Which lock, in QEMU's words ("shared \"write\"", "\"write\"" ...).
        what: String,
    },
    /// Setting or testing an OFD lock failed for a reason other than a conflict.
    #[error("{path}: cannot lock the image: {source}")]
    LockFailed {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A request reaches past the end of the disk.
    #[error("request [{offset}, +{len}) is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Request offset in bytes.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// Disk size in bytes.
        size: u64,
    },
    /// A write-type request on a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// Linux AIO could not be set up (fs.aio-max-nr reached, seccomp).
    #[error("cannot set up Linux AIO (io_setup): {0}; raise fs.aio-max-nr or use aio=io_uring or aio=threads")]
    NativeAioSetup(#[source] io::Error),
    /// Linux AIO without O_DIRECT would block in io_submit.
    #[error("aio=native needs O_DIRECT: use cache=none or cache=directsync, or pick aio=threads or aio=io_uring")]
    NativeAioNeedsDirect,
    /// io_uring could not be set up (old kernel, seccomp, ulimit).
    #[error("cannot set up io_uring: {0}; use aio=threads")]
    IoUringSetup(#[source] io::Error),
    /// The threads engine could not start its workers.
    #[error("cannot start I/O worker threads: {0}")]
    ThreadSpawn(#[source] io::Error),
    /// An eventfd could not be created or cloned.
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The engine refused the request (queue full, ring error).
    #[error("cannot submit the request: {0}")]
    Submit(#[source] io::Error),
    /// Requests were still in flight when the disk had to be closed.
    #[error("{0} requests still in flight after waiting to close the disk")]
    CloseTimeout(usize),
    /// The host I/O failed.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// A write or read made no progress before the end of the request.
    #[error("short {what}: {done} of {len} bytes, then no progress")]
    Short {
        /// "read" or "write".
        what: &'static str,
        /// Bytes done.
        done: usize,
        /// Bytes asked for.
        len: usize,
    },
    /// A guest scatter-gather element does not resolve to host memory.
    #[error("guest memory range at {addr:#x} (+{len}) is not mapped")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The qcow2 header is invalid or hostile.
    #[error("{path}: invalid qcow2 image: {reason}")]
    InvalidQcow2 {
        /// Image path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A qcow2 image uses a feature this version cannot handle.
    #[error("{path}: unsupported qcow2 feature: {feature}")]
    UnsupportedQcow2 {
        /// Image path.
        path: PathBuf,
        /// Which feature.
        feature: String,
    },
    /// The backing chain is longer than the limit (or loops).
    #[error("{path}: backing chain deeper than {limit} images (or a loop)")]
    ChainTooDeep {
        /// Image path.
        path: PathBuf,
        /// The bound.
        limit: usize,
    },
    /// `img create` options that make no sense together.
    #[error("invalid image creation options: {0}")]
    CreateOptions(String),
    /// Creating or writing an image file failed.
    #[error("{path}: {source}")]
    ImageIo {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Throttle limits that make no sense (see `ThrottleConfig::validate`).
    #[error("invalid throttle limits: {0}")]
    ThrottleConfig(#[from] crate::throttle::ThrottleConfigError),
}
