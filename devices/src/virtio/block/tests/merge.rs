//! Request merging through the worker: adjacent reads or writes of one batch reach the
//! disk as one request, each virtio request still gets its own status, and a failure of the
//! joined request fails every request in it.

use std::os::unix::fs::FileExt;

use platter_block::{open_disk, CacheMode, CreateOptions, DiskOptions, Format, StatsSnapshot};

use super::*;

const SECTORS: u64 = 8;
const LEN: u32 = 512;

/// Where request `i`'s header and status byte live.
fn header_at(i: u64) -> u64 {
    HEADER + 32 * i
}
fn status_at(i: u64) -> u64 {
    STATUS + 16 * i
}

/// Queue a one-sector request of `kind` at `sector`, its data at `DATA + i * 512`.
fn push_rw(rig: &mut Rig<'_>, mem: &GuestMemoryMmap, i: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(header_at(i))).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(status_at(i)))
        .unwrap();
    let dir = if kind == req_type::IN { F_WRITE } else { 0 };
    rig.push(&[
        (header_at(i), 16, 0),
        (DATA + i * u64::from(LEN), LEN, dir),
        (status_at(i), 1, F_WRITE),
    ]);
}

fn stats(rig: &Rig<'_>) -> StatsSnapshot {
    rig.worker.stats().snapshot()
}

/// Writes at sectors 0-3, a read elsewhere, a write at 4, then the same sectors read back:
/// the first four writes go as one disk request (the read breaks the run, so the fifth goes
/// alone), the reads of 0-4 as one; every request completes with its own status and data.
#[test]
fn adjacent_requests_of_a_batch_reach_the_disk_as_one() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    for i in 0..SECTORS {
        let data = pattern(LEN as usize, i as u8);
        mem.write_slice(&data, GuestAddress(DATA + i * u64::from(LEN)))
            .unwrap();
    }
    for i in 0..4 {
        push_rw(&mut rig, &mem, i, req_type::OUT, i);
    }
    push_rw(&mut rig, &mem, 4, req_type::IN, 100);
    push_rw(&mut rig, &mem, 5, req_type::OUT, 4);
    rig.run();
    assert_eq!(rig.used_idx(), 6);
    for i in 0..6 {
        assert_eq!(read_mem(&mem, status_at(i), 1), [OK], "request {i}");
    }
    let s = stats(&rig);
    assert_eq!(
        (s.write.ops, s.write.merged, s.write.bytes),
        (2, 3, 5 * 512)
    );
    assert_eq!((s.read.ops, s.read.merged), (1, 0));
    // Used lengths are each request's own (data + status), not the joined request's.
    for i in 0..6usize {
        assert_eq!(rig.used(i).1, if i == 4 { LEN + 1 } else { 1 });
    }

    // Read the five sectors back, in reverse ring order: nothing joins (each starts
    // before the held one), and the data is each write's own.
    let before = rig.used_idx();
    for i in 0..5 {
        push_rw(&mut rig, &mem, 10 + i, req_type::IN, 4 - i);
    }
    rig.run();
    assert_eq!(rig.used_idx(), before + 5);
    assert_eq!(stats(&rig).read.merged, 0);
    for i in 0..5 {
        let got = read_mem(&mem, DATA + (10 + i) * u64::from(LEN), LEN as usize);
        let sector = 4 - i;
        let wrote = if sector == 4 { 5 } else { sector };
        assert_eq!(got, pattern(LEN as usize, wrote as u8), "sector {sector}");
    }

    // In ring order they join: one disk read, four merged.
    for i in 0..5 {
        push_rw(&mut rig, &mem, 20 + i, req_type::IN, i);
    }
    rig.run();
    let s = stats(&rig);
    assert_eq!((s.read.ops, s.read.merged), (7, 4));
    for i in 0..5 {
        assert_eq!(read_mem(&mem, status_at(20 + i), 1), [OK]);
        let got = read_mem(&mem, DATA + (20 + i) * u64::from(LEN), LEN as usize);
        let wrote = if i == 4 { 5 } else { i };
        assert_eq!(got, pattern(LEN as usize, wrote as u8), "sector {i}");
    }
}

/// A flush between two adjacent writes keeps them apart: the first is submitted before the
/// flush, the second after it.
#[test]
fn a_flush_between_writes_keeps_them_apart() {
    let mem = memory();
    let mut rig = Rig::new(&mem, blk_config());
    push_rw(&mut rig, &mem, 0, req_type::OUT, 0);
    mem.write_slice(&[0u8; 16], GuestAddress(header_at(1)))
        .unwrap();
    mem.write_obj(req_type::FLUSH.to_le(), GuestAddress(header_at(1)))
        .unwrap();
    rig.push(&[(header_at(1), 16, 0), (status_at(1), 1, F_WRITE)]);
    push_rw(&mut rig, &mem, 2, req_type::OUT, 1);
    rig.run();
    let s = stats(&rig);
    assert_eq!((s.write.ops, s.write.merged, s.flush.ops), (2, 0, 1));
    for i in 0..3 {
        assert_eq!(read_mem(&mem, status_at(i), 1), [OK]);
    }
}

#[test]
fn request_merging_off_submits_each_request() {
    let mem = memory();
    let cfg = BlkConfig {
        request_merging: false,
        ..blk_config()
    };
    let mut rig = Rig::new(&mem, cfg);
    for i in 0..4 {
        push_rw(&mut rig, &mem, i, req_type::OUT, i);
    }
    rig.run();
    let s = stats(&rig);
    assert_eq!((s.write.ops, s.write.merged), (4, 0));
}

/// A qcow2 image whose L1 table points an L2 table at an unaligned offset: every read of
/// the disk fails in the block layer. Two adjacent reads joined into one both get IOERR,
/// and a third, alone, too.
#[test]
fn a_failed_joined_request_fails_each_request_in_it() {
    let mem = memory();
    let (file, disk) = corrupt_qcow2();
    let mut rig = Rig::on_disk(&mem, blk_config(), file, disk);
    push_rw(&mut rig, &mem, 0, req_type::IN, 0);
    push_rw(&mut rig, &mem, 1, req_type::IN, 1);
    push_rw(&mut rig, &mem, 2, req_type::IN, 3);
    rig.run();
    assert_eq!(rig.used_idx(), 3);
    for i in 0..3 {
        assert_eq!(read_mem(&mem, status_at(i), 1), [IOERR], "request {i}");
    }
    let s = stats(&rig);
    assert_eq!((s.read.ops, s.read.merged, s.read.errors), (2, 1, 2));
    assert_eq!(rig.worker.in_flight(), 0);
}

fn corrupt_qcow2() -> (crate::testutil::TempFile, platter_block::Disk) {
    let path = std::env::temp_dir().join(format!(
        "platter-devices-merge-{}.qcow2",
        std::process::id()
    ));
    let file = crate::testutil::TempFile(path.clone());
    platter_block::img::create(&path, Format::Qcow2, DISK_SIZE, &CreateOptions::default()).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut off = [0u8; 8];
    f.read_exact_at(&mut off, 40).unwrap();
    // L1[0]: "copied", L2 table at cluster 1 plus 512 bytes.
    let entry = (1u64 << 63) | (0x1_0000 + 512);
    f.write_all_at(&entry.to_be_bytes(), u64::from_be_bytes(off))
        .unwrap();
    let mut opts = DiskOptions::new(&path);
    opts.format = Some(Format::Qcow2);
    opts.cache = CacheMode::Writeback;
    opts.locking = false;
    (file, open_disk(&opts).unwrap())
}
