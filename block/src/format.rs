//! The format seam: what a disk image looks like to the request pipeline.
//!
//! A driver tells the pipeline the guest-visible geometry and where guest bytes live in the
//! host file. Raw maps guest offset `x` to host offset `x`; qcow2 (next) will map through its
//! L1/L2 tables and allocate on write.

use std::os::fd::RawFd;

use crate::options::Format;

/// A disk image format as seen by [`crate::Disk`].
pub trait FormatDriver: Send {
    /// Which format this is.
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Host descriptor that holds the guest data.
    fn data_fd(&self) -> RawFd;
    /// Host offset of guest byte `offset` (identity for raw).
    fn host_offset(&self, offset: u64) -> u64;
    /// Guest-visible logical block size.
    fn logical_block_size(&self) -> u32;
    /// Guest-visible physical block size.
    fn physical_block_size(&self) -> u32;
    /// Whether discard can free host space.
    fn supports_discard(&self) -> bool;
}
