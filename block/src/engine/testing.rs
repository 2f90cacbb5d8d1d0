//! What the engines' tests share: files to read, read operations, waiting for completions.

use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use super::{Engine, EngineCompletion, EngineOp, IoVecs, OpKind};
use crate::sg::AlignedBuf;
use crate::testutil::TempDir;

/// A read of `buf.len()` bytes at `offset` into `buf`.
pub fn read_op(fd: i32, id: u64, offset: u64, buf: &mut [u8]) -> EngineOp {
    EngineOp {
        id,
        fd,
        kind: OpKind::Read {
            offset,
            iovecs: IoVecs(vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }]),
        },
    }
}

/// A write of `src` at `offset`, with RWF_DSYNC when `dsync`.
pub fn write_op(fd: i32, id: u64, offset: u64, src: &[u8], dsync: bool) -> EngineOp {
    EngineOp {
        id,
        fd,
        kind: OpKind::Write {
            offset,
            iovecs: IoVecs(vec![libc::iovec {
                iov_base: src.as_ptr() as *mut libc::c_void,
                iov_len: src.len(),
            }]),
            dsync,
        },
    }
}

/// A file `f` in `dir` of `len` patterned bytes, open for reading and writing through the
/// page cache; and the bytes.
pub fn file_with(dir: &TempDir, len: usize) -> (std::fs::File, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let path = dir.path().join("f");
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (f, data)
}

/// Submit a read into each of `bufs`: read `first + i` fills `bufs[i]` from offset
/// `(first + i) * len`.
pub fn submit_reads(e: &mut dyn Engine, fd: i32, bufs: &mut [AlignedBuf], first: u64) {
    for (id, b) in (first..).zip(bufs.iter_mut()) {
        let len = b.len() as u64;
        submit(e, read_op(fd, id, id * len, b.as_mut_slice()));
    }
}

/// Submit `op`, which the engine must take.
pub fn submit(e: &mut dyn Engine, op: EngineOp) {
    e.submit(op).map_err(|(e, _)| e).unwrap();
}

/// Wait (up to 5 s) for the next completion.
pub fn next(e: &mut dyn Engine) -> EngineCompletion {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(c) = e.pop_completion() {
            return c;
        }
        assert!(Instant::now() < deadline, "no completion within 5 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait for `n` completions that each moved `len` bytes; their ids, sorted.
pub fn completed_ids(e: &mut dyn Engine, n: usize, len: usize) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..n)
        .map(|_| {
            let c = next(e);
            assert_eq!(c.result.unwrap(), len, "completion {}", c.id);
            c.id
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// A file of `len` bytes of `byte` in `dir`, opened for reading (with O_DIRECT if `direct`).
pub fn filled(dir: &TempDir, byte: u8, len: usize, direct: bool) -> std::fs::File {
    let path = dir.path().join("f");
    std::fs::write(&path, vec![byte; len]).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&path)
        .unwrap()
}
