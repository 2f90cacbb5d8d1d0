//! Test helpers shared by the device tests: raw disk images in temporary files.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use platter_block::{open_disk, AioMode, CacheMode, Disk, DiskOptions, Format};

/// A temporary file, removed on drop.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A raw image of `size` bytes (byte i holds `fill(i)`, else zeroes) opened with the page
/// cache and the thread pool, without locking.
pub fn raw_image(size: u64, readonly: bool, fill: Option<fn(u64) -> u8>) -> (TempFile, Disk) {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "platter-devices-{}-{}.raw",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    if let Some(fill) = fill {
        let data: Vec<u8> = (0..size).map(fill).collect();
        f.write_all_at(&data, 0).unwrap();
    }
    let mut opts = DiskOptions::new(&path);
    opts.format = Some(Format::Raw);
    opts.cache = CacheMode::Writeback;
    opts.aio = AioMode::Threads;
    opts.locking = false;
    opts.readonly = readonly;
    (TempFile(path), open_disk(&opts).unwrap())
}
