//! Raw images: a regular file (sparse or not) or a block device; guest byte `x` is host byte
//! `x`. Discard punches holes (FALLOC_FL_PUNCH_HOLE); write-zeroes uses FALLOC_FL_ZERO_RANGE
//! (for block devices the kernel turns these into BLKDISCARD-like zeroing and BLKZEROOUT).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::format::{Extent, FormatDriver};
use crate::options::Format;

// <linux/fs.h>: _IO(0x12, 104), _IO(0x12, 123), _IOR(0x12, 114, size_t)
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Default logical block size reported to guests for regular files.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;

/// A raw image.
#[derive(Debug)]
pub struct RawDriver {
    file: File,
    size: u64,
    block_device: bool,
    logical: u32,
    physical: u32,
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int to the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

impl RawDriver {
    /// Wrap an open image file or block device; `request_align` is the O_DIRECT alignment (1
    /// without O_DIRECT), reported as the physical block size so guests align their I/O.
    pub fn new(file: File, request_align: usize) -> io::Result<RawDriver> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let fd = file.as_raw_fd();
        let (size, logical, physical) = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, valid for the call.
            let r = unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            let logical = ioctl_int(fd, BLKSSZGET).unwrap_or(DEFAULT_LOGICAL_BLOCK_SIZE);
            let physical = ioctl_int(fd, BLKPBSZGET).unwrap_or(logical);
            (size, logical, physical.max(logical))
        } else {
            let logical = DEFAULT_LOGICAL_BLOCK_SIZE;
            let physical = (request_align as u32).max(logical);
            (meta.len(), logical, physical)
        };
        Ok(RawDriver {
            file,
            size,
            block_device,
            logical,
            physical,
        })
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl FormatDriver for RawDriver {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn data_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn logical_block_size(&self) -> u32 {
        self.logical
    }
    fn physical_block_size(&self) -> u32 {
        self.physical
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn falloc_passthrough(&self) -> bool {
        true
    }
    fn identity_mapped(&self) -> bool {
        true
    }
    fn map_extents(
        &mut self,
        offset: u64,
        len: u64,
        _write: bool,
    ) -> io::Result<Option<Vec<Extent>>> {
        Ok(Some(vec![Extent::Host {
            fd: self.file.as_raw_fd(),
            host: offset,
            len,
        }]))
    }
    // The pipeline never takes the synchronous path for raw (everything maps); these serve
    // callers that want plain blocking I/O.
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }
    fn write_sync(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset)
    }
    fn zero_sync(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe {
            libc::fallocate64(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Open an image (or a backing file) for reading, and writing unless `readonly`, with
/// O_DIRECT when `direct`; without access-time updates when the kernel allows it (the caller
/// owns the file, or is root). A read through the page cache otherwise asks the clock and
/// the file system whether the access time is due (`atime_needs_update`, `current_time`,
/// `touch_atime`: 4 % of the CPU time of a cached 4 KiB read in perf), for a time no one
/// reads on a disk image. Someone else's file (EPERM) opens as it is.
pub fn open_image_file(path: &Path, readonly: bool, direct: bool) -> io::Result<File> {
    let open = |noatime: bool| {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if noatime {
            flags |= libc::O_NOATIME;
        }
        OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(flags)
            .open(path)
    };
    match open(true) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(false),
        r => r,
    }
}

/// O_DIRECT alignment of `file`: (file offset and length alignment, memory alignment).
///
/// Asks the kernel first (statx STATX_DIOALIGN, Linux 6.1+), then the block device's logical
/// block size, then falls back to 4096, which satisfies every common setup.
pub fn direct_io_alignment(file: &File) -> (usize, usize) {
    const FALLBACK: usize = 4096;
    // SAFETY: statx is plain data; zeroed is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty NUL-terminated path with AT_EMPTY_PATH, valid out pointer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && stx.stx_dio_offset_align != 0
        && stx.stx_dio_mem_align != 0
    {
        return (
            stx.stx_dio_offset_align as usize,
            stx.stx_dio_mem_align as usize,
        );
    }
    if let Ok(sz) = ioctl_int(file.as_raw_fd(), BLKSSZGET) {
        if sz.is_power_of_two() {
            return (sz as usize, sz as usize);
        }
    }
    (FALLBACK, FALLBACK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::io::Read;
    use std::time::{Duration, SystemTime};

    /// Reading an image opened by Platter leaves its access time alone, even one old enough
    /// that a relatime mount would update it on the next read.
    #[test]
    fn image_reads_do_not_touch_the_access_time() {
        let dir = TempDir::new("raw-noatime");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3 * 86400);
        let times = std::fs::FileTimes::new().set_accessed(old);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_times(times)
            .unwrap();
        for direct in [false, true] {
            let Ok(mut f) = open_image_file(&path, true, direct) else {
                assert!(direct, "a buffered open cannot fail here");
                continue; // this file system has no O_DIRECT
            };
            // SAFETY: fcntl on a descriptor this test owns.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(flags & libc::O_NOATIME, 0, "direct={direct}");
            if !direct {
                let mut data = Vec::new();
                f.read_to_end(&mut data).unwrap();
                assert_eq!(data.len(), 8192);
            }
        }
        let atime = std::fs::metadata(&path).unwrap().accessed().unwrap();
        assert_eq!(atime, old, "the read moved the access time");
    }
}
