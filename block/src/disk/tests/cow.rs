//! Allocating writes the engine carries out (`disk/cow.rs`): copy-on-write over a backing
//! file and allocation with the write cache off.

use super::*;

/// Writes into an overlay's unallocated clusters, many in flight at once, several into the
/// same cluster and some across clusters or past the backing file's end, all go to the
/// engine (none takes the synchronous path) in every cache mode that maps them, keep the
/// backing data around them, and leave an image qemu-img checks clean.
#[test]
fn copy_on_write_goes_to_the_engine() {
    const CL: u64 = 16 << 10;
    const K4: u64 = 4096;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut rng = Rng::new(11);
    let base: Vec<u8> = (0..DISK_SIZE / 2).map(|_| rng.next() as u8).collect();
    // (offset, length): inside a cluster (head and tail kept), three writes into cluster 2,
    // one across clusters 4 and 5, a whole cluster, two clusters from the middle of one,
    // and writes past the backing file's end (its tail reads as zeroes).
    let writes: [(u64, u64); 9] = [
        (K4, K4),
        (2 * CL, K4),
        (2 * CL + 2 * K4, K4),
        (2 * CL + 3 * K4, K4),
        (5 * CL - K4, 2 * K4),
        (7 * CL, CL),
        (9 * CL + K4, 2 * CL),
        (DISK_SIZE / 2 - K4, 2 * K4),
        (DISK_SIZE - 2 * K4, K4),
    ];
    for cache in [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
    ] {
        for aio in engines_for(cache) {
            let what = format!("{cache:?}/{aio:?}");
            let dir = TempDir::new("cow");
            let base_path = dir.path().join("base.raw");
            std::fs::write(&base_path, &base).unwrap();
            let top = dir.path().join("top.qcow2");
            create_qcow2(&top, DISK_SIZE, CL, Some((&base_path, Format::Raw)));
            let mut disk = open_qcow2(&top, cache, aio);
            let mut want = base.clone();
            want.resize(DISK_SIZE as usize, 0);
            let before = disk.sync_served;
            for (i, &(off, len)) in writes.iter().enumerate() {
                let addr = i as u64 * 0x10000;
                let data: Vec<u8> = (0..len)
                    .map(|b| (b * 7 + i as u64 * 41 + 1) as u8)
                    .collect();
                mem.write_slice(&data, GuestAddress(addr)).unwrap();
                want[off as usize..(off + len) as usize].copy_from_slice(&data);
                let buf = SgList::from_guest(&mem, &[(GuestAddress(addr), len as usize)]).unwrap();
                disk.submit(Request {
                    tag: i as u64,
                    op: RequestOp::Write { offset: off, buf },
                })
                .unwrap();
            }
            for (tag, r) in wait_all(&mut disk, writes.len()) {
                assert_eq!(
                    r.unwrap(),
                    writes[tag as usize].1 as usize,
                    "{what}: write {tag}"
                );
            }
            assert_eq!(
                disk.sync_served, before,
                "{what}: a write took the synchronous path"
            );
            assert!(
                read_via(&mut disk, &mem, 0x100000, 0, DISK_SIZE) == want,
                "{what}: read back"
            );
            // Written into again, now in place.
            let data = vec![0x5a; K4 as usize];
            write_via(&mut disk, &mem, 0, 2 * CL + K4, &data);
            want[(2 * CL + K4) as usize..(2 * CL + 2 * K4) as usize].copy_from_slice(&data);
            run(&mut disk, RequestOp::Flush).unwrap();
            drop(disk);
            assert!(
                guest_contents(&top, Format::Qcow2) == want,
                "{what}: image contents"
            );
        }
    }
}

/// With the write cache off, a write that allocates is durable when it completes: its data
/// and the L2 entry that maps it are in the file before the completion, so reopening the
/// image without a flush (as after a crash) finds it.
#[test]
fn allocating_writes_with_the_write_cache_off_are_durable_at_completion() {
    const CL: u64 = 16 << 10;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for aio in engines_for(CacheMode::Directsync) {
        let dir = TempDir::new("cow-wt");
        let path = dir.path().join("d.qcow2");
        create_qcow2(&path, DISK_SIZE, CL, None);
        let mut disk = open_qcow2(&path, CacheMode::Directsync, aio);
        let before = disk.sync_served;
        let data = vec![0xa7u8; 4096];
        write_via(&mut disk, &mem, 0, 3 * CL + 4096, &data);
        assert_eq!(
            disk.sync_served, before,
            "{aio:?}: took the synchronous path"
        );
        // A second reader of the file (past the image lock, as after a crash) finds it.
        let mut other = crate::qcow2::Qcow2Driver::open(
            &path,
            File::open(&path).unwrap(),
            true,
            crate::qcow2::driver::DEFAULT_L2_CACHE_SIZE,
            1,
            0,
        )
        .unwrap();
        let mut got = vec![0u8; CL as usize];
        other.read_sync(3 * CL, &mut got).unwrap();
        let mut want = vec![0u8; CL as usize];
        want[4096..8192].copy_from_slice(&data);
        assert!(got == want, "{aio:?}: the write is not in the file");
        drop(disk);
    }
}

/// Sixteen 4 KiB writes in flight into one new cluster of an overlay: the first copies on
/// write holding the cluster; once it has linked the cluster, the fifteen waiting for it
/// find it allocated and go together (none still waits), and the cluster holds them all.
#[test]
fn writes_waiting_for_a_copied_cluster_go_together() {
    const CL: u64 = 64 << 10;
    const K4: u64 = 4096;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    for aio in engines_for(CacheMode::None) {
        let dir = TempDir::new("cow-seq");
        let base_path = dir.path().join("base.raw");
        std::fs::write(&base_path, vec![0x11u8; DISK_SIZE as usize]).unwrap();
        let top = dir.path().join("top.qcow2");
        create_qcow2(&top, DISK_SIZE, CL, Some((&base_path, Format::Raw)));
        let mut disk = open_qcow2(&top, CacheMode::None, aio);
        let mut want = vec![0x11u8; DISK_SIZE as usize];
        for i in 0..CL / K4 {
            let data = vec![i as u8 + 1; K4 as usize];
            mem.write_slice(&data, GuestAddress(i * K4)).unwrap();
            want[(CL + i * K4) as usize..(CL + (i + 1) * K4) as usize].copy_from_slice(&data);
            let buf = SgList::from_guest(&mem, &[(GuestAddress(i * K4), K4 as usize)]).unwrap();
            disk.submit(Request {
                tag: i,
                op: RequestOp::Write {
                    offset: CL + i * K4,
                    buf,
                },
            })
            .unwrap();
        }
        assert_eq!(
            disk.ranges.waiting_len(),
            15,
            "{aio:?}: the first holds the cluster"
        );
        let mut done = Vec::new();
        while done.is_empty() {
            assert!(disk
                .wait_completions(Some(Duration::from_secs(10)))
                .unwrap());
            done.extend(disk.completions());
        }
        assert_eq!(
            disk.ranges.waiting_len(),
            0,
            "{aio:?}: writes still wait one by one"
        );
        done.extend(wait_all(&mut disk, 16 - done.len()));
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{aio:?}");
        assert!(
            read_via(&mut disk, &mem, 0x100000, 0, DISK_SIZE) == want,
            "{aio:?}"
        );
    }
}

/// The buffers a disk makes for itself (copy-on-write heads and tails, bounce buffers) start
/// on a page in every cache mode, whatever smaller alignment O_DIRECT would accept: ext4
/// serialises direct writes whose segments are not block-aligned in memory
/// (`Disk::bounce_align`).
#[test]
fn the_disks_own_buffers_are_page_aligned() {
    for cache in [CacheMode::None, CacheMode::Writeback, CacheMode::Directsync] {
        let dir = TempDir::new("align");
        let top = dir.path().join("top.qcow2");
        create_qcow2(&top, DISK_SIZE, 64 << 10, None);
        let disk = open_qcow2(&top, cache, AioMode::Threads);
        let align = disk.bounce_align();
        assert!(align % 4096 == 0, "{cache:?}: {align}");
        let buf = crate::sg::AlignedBuf::for_reading(60 << 10, align);
        assert_eq!(buf.iovec(0, 1).base as usize % 4096, 0, "{cache:?}");
    }
}
