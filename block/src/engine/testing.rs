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

/// The lone-request rule of an engine that waits in the kernel (`inline.rs`), seen from
/// outside: on a thread that serves the engine alone, a plugged batch of one read of `fd`
/// (filled with `byte`) has completed when `unplug` returns, counted by `waits`; on a thread
/// that is not alone, or for a batch of two, `unplug` only submits. Every read brings its
/// data, and the eventfd `evt` the engine signals is readable after the waited one.
pub fn check_lone_waits<E: Engine>(
    e: &mut E,
    waits: fn(&E) -> u64,
    evt: &vmm_sys_util::eventfd::EventFd,
    fd: i32,
    byte: u8,
) {
    let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::new(4096, 4096)).collect();
    e.plug();
    submit_reads(e, fd, &mut bufs[..1], 0);
    e.unplug();
    assert_eq!(waits(e), 0, "not alone: not waited for");
    assert!(completed_ids(e, 1, 4096) == [0]);
    e.set_alone(true);
    let _ = evt.read();
    e.rearm();
    e.plug();
    submit_reads(e, fd, &mut bufs[1..2], 1);
    e.unplug();
    assert_eq!(waits(e), 1, "alone: waited for in unplug");
    assert!(e.ready(), "complete when unplug returns");
    assert!(evt.read().is_ok(), "the eventfd was signalled");
    e.rearm();
    assert!(completed_ids(e, 1, 4096) == [1]);
    e.plug();
    submit_reads(e, fd, &mut bufs[2..4], 2);
    e.unplug();
    assert_eq!(waits(e), 1, "a batch of two is not waited for");
    assert!(completed_ids(e, 2, 4096) == [2, 3]);
    assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == byte)));
}
