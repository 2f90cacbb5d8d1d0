//! Requests as devices submit them, and what comes back.

use crate::sg::SgList;
use crate::BlockError;

/// What a request asks for.
#[derive(Debug)]
pub enum RequestOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Disk byte offset.
        offset: u64,
        /// Destination.
        buf: SgList,
    },
    /// Write `buf` at `offset`.
    Write {
        /// Disk byte offset.
        offset: u64,
        /// Source.
        buf: SgList,
    },
    /// Make completed writes durable.
    Flush,
    /// The guest no longer needs `[offset, offset+len)`; reads of it return zeroes afterwards.
    Discard {
        /// Disk byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero `[offset, offset+len)`, freeing host space when `unmap`.
    WriteZeroes {
        /// Disk byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether host space may be released.
        unmap: bool,
    },
}

/// A request with the caller's tag, returned with its completion.
#[derive(Debug)]
pub struct Request {
    /// Caller's tag.
    pub tag: u64,
    /// The operation.
    pub op: RequestOp,
}

/// A request refused at submission, handed back with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SubmitError {
    /// Why.
    #[source]
    pub error: BlockError,
    /// The untouched request.
    pub request: Request,
}

/// A finished request: its tag, and bytes transferred or the error.
pub type Completion = (u64, Result<usize, BlockError>);
