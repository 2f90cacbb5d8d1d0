//! Pipeline tests: edge cases of the request pipeline here; the model test of random
//! concurrent mixes against an in-memory image (`model.rs`), durability after SIGKILL
//! (`durability.rs`) and interoperability with qemu-img (`interop.rs`) beside it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::options::AioMode;
use crate::testutil::{Rng, TempDir};

const DISK_SIZE: u64 = 1 << 20;
const MEM_SIZE: usize = 16 << 20;
const SLOT: u64 = 128 << 10;
const MAX_LEN: u64 = 64 << 10;
const ENGINES: [AioMode; 3] = [AioMode::Threads, AioMode::IoUring, AioMode::Native];

/// Engines that can run with `cache` (Linux AIO needs O_DIRECT).
pub(super) fn engines_for(cache: CacheMode) -> impl Iterator<Item = AioMode> {
    ENGINES
        .into_iter()
        .filter(move |a| *a != AioMode::Native || cache.direct())
}

pub(super) fn make_image(dir: &TempDir, size: u64) -> std::path::PathBuf {
    let p = dir.path().join("disk.raw");
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

pub(super) fn opts(path: &Path, cache: CacheMode, aio: AioMode) -> DiskOptions {
    DiskOptions {
        format: Some(Format::Raw),
        cache,
        aio,
        ..DiskOptions::new(path)
    }
}

/// Wait on the eventfd until `n` completions arrived.
pub(super) fn wait_all(disk: &mut Disk, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    while got.len() < n {
        let fired = disk.wait_completions(Some(Duration::from_secs(10)));
        assert!(
            fired.unwrap(),
            "no completion within 10 s ({} of {n})",
            got.len()
        );
        got.extend(disk.completions());
    }
    assert_eq!(got.len(), n);
    got
}

fn run(disk: &mut Disk, op: RequestOp) -> Result<usize, BlockError> {
    disk.submit(Request { tag: 7, op }).map_err(|e| e.error)?;
    wait_all(disk, 1).pop().unwrap().1
}

fn guest_sg(mem: &GuestMemoryMmap, addr: u64, len: u64, rng: &mut Rng) -> SgList {
    // 1 to 3 segments with random split points.
    let mut segs = Vec::new();
    let mut at = addr;
    let mut left = len;
    let pieces = 1 + rng.below(3);
    for i in 0..pieces {
        let n = if i + 1 == pieces || left <= 1 {
            left
        } else {
            1 + rng.below(left - 1)
        };
        segs.push((GuestAddress(at), n as usize));
        at += n;
        left -= n;
        if left == 0 {
            break;
        }
    }
    SgList::from_guest(mem, &segs).unwrap()
}

/// Small requests packed into a few blocks, so concurrent requests share blocks.
const HOT_SIZE: u64 = 8192;
const HOT_MAX_LEN: u64 = 700;

fn random_range(rng: &mut Rng, hot: bool) -> (u64, u64) {
    if hot {
        let off = rng.below(HOT_SIZE);
        let len = (1 + rng.below(HOT_MAX_LEN)).min(HOT_SIZE - off);
        return (off, len);
    }
    let pick = |rng: &mut Rng, max: u64| match rng.below(4) {
        0 => rng.below(max / 4096 + 1) * 4096,
        1 => rng.below(max / 512 + 1) * 512,
        _ => rng.below(max + 1),
    };
    let off = pick(rng, DISK_SIZE - 1).min(DISK_SIZE - 1);
    let len = pick(rng, MAX_LEN).clamp(1, DISK_SIZE - off);
    (off, len)
}

enum Planned {
    Read { off: u64, len: u64, addr: u64 },
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
    Flush,
}

/// The image a model test runs on.
#[derive(Clone, Copy, Debug)]
enum TestImage {
    Raw,
    /// qcow2 with this cluster size, optionally over a raw backing file of random bytes.
    Qcow2 {
        cluster: u64,
        backing: bool,
    },
}

/// Create the image; returns its path and its initial guest contents.
fn make_test_image(dir: &TempDir, img: TestImage) -> (std::path::PathBuf, Vec<u8>) {
    match img {
        TestImage::Raw => (make_image(dir, DISK_SIZE), vec![0u8; DISK_SIZE as usize]),
        TestImage::Qcow2 { cluster, backing } => {
            let mut initial = vec![0u8; DISK_SIZE as usize];
            let mut o = crate::CreateOptions {
                cluster_size: Some(cluster),
                ..Default::default()
            };
            if backing {
                // Shorter than the disk: the rest reads as zeroes.
                let mut rng = Rng::new(99);
                let base: Vec<u8> = (0..DISK_SIZE - 3 * 4096)
                    .map(|_| rng.next() as u8)
                    .collect();
                std::fs::write(dir.path().join("base.raw"), &base).unwrap();
                initial[..base.len()].copy_from_slice(&base);
                o.backing_file = Some("base.raw".into());
                o.backing_format = Some(Format::Raw);
            }
            let p = dir.path().join("disk.qcow2");
            crate::img::create(&p, Format::Qcow2, DISK_SIZE, &o).unwrap();
            (p, initial)
        }
    }
}

/// Guest contents of the image at `path` as qemu-img sees them (after `qemu-img check`
/// passes), or as a fresh read-only open of ours does without qemu-img.
pub(super) fn guest_contents(path: &Path, format: Format) -> Vec<u8> {
    if format == Format::Raw {
        return std::fs::read(path).unwrap();
    }
    if let Some(q) = crate::testutil::qemu_img() {
        let p = path.as_os_str();
        crate::testutil::run_ok(&q, &["check".as_ref(), "-f".as_ref(), "qcow2".as_ref(), p]);
        return crate::testutil::qemu_read_qcow2(&q, path);
    }
    let mut d = open_disk(&DiskOptions {
        format: Some(format),
        readonly: true,
        ..DiskOptions::new(path)
    })
    .unwrap();
    let mut v = vec![0u8; d.size() as usize];
    // SAFETY: `v` outlives the request, which completes before `run` returns.
    let sg = unsafe {
        SgList::from_raw(
            vec![crate::IoVec {
                base: v.as_mut_ptr(),
                len: v.len(),
            }],
            None,
        )
    };
    run(&mut d, RequestOp::Read { offset: 0, buf: sg }).unwrap();
    v
}

/// Create a qcow2 image with `cluster`-byte clusters, over `backing` (file name next to it,
/// format) if given.
fn create_qcow2(path: &Path, size: u64, cluster: u64, backing: Option<(&Path, Format)>) {
    let o = crate::CreateOptions {
        cluster_size: Some(cluster),
        backing_file: backing.map(|(p, _)| p.file_name().unwrap().to_str().unwrap().into()),
        backing_format: backing.map(|(_, f)| f),
        ..Default::default()
    };
    crate::img::create(path, Format::Qcow2, size, &o).unwrap();
}

fn open_qcow2(path: &Path, cache: CacheMode, aio: AioMode) -> Disk {
    open_disk(&DiskOptions {
        format: Some(Format::Qcow2),
        ..opts(path, cache, aio)
    })
    .unwrap()
}

/// Write `data` at `offset` from guest memory at `addr`; returns what the request returned.
fn write_via(disk: &mut Disk, mem: &GuestMemoryMmap, addr: u64, offset: u64, data: &[u8]) -> usize {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
    let sg = SgList::from_guest(mem, &[(GuestAddress(addr), data.len())]).unwrap();
    run(disk, RequestOp::Write { offset, buf: sg }).unwrap()
}

/// Read `len` bytes at `offset` into guest memory at `addr` (first filled with 0xee, so
/// bytes the read leaves alone show), and return them.
fn read_via(disk: &mut Disk, mem: &GuestMemoryMmap, addr: u64, offset: u64, len: u64) -> Vec<u8> {
    mem.write_slice(&vec![0xeeu8; len as usize], GuestAddress(addr))
        .unwrap();
    let sg = SgList::from_guest(mem, &[(GuestAddress(addr), len as usize)]).unwrap();
    assert_eq!(
        run(disk, RequestOp::Read { offset, buf: sg }).unwrap(),
        len as usize
    );
    let mut got = vec![0u8; len as usize];
    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
    got
}

/// A qcow2 range whose clusters lie out of order in the file (written last to first), with
/// a hole, is read and rewritten in one request each through the engine (one operation per
/// host extent, the hole filled in place), never on the synchronous path; the image stays
/// what qemu-img expects.
#[test]
fn scattered_qcow2_clusters_go_to_the_engine_in_pieces() {
    const CL: u64 = 4096;
    const N: u64 = 16;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for cache in [CacheMode::None, CacheMode::Writeback] {
        for aio in engines_for(cache) {
            let dir = TempDir::new("scatter");
            let path = dir.path().join("d.qcow2");
            create_qcow2(&path, DISK_SIZE, CL, None);
            let mut disk = open_qcow2(&path, cache, aio);
            let mut model = vec![0u8; (N * CL) as usize];
            // Clusters 15, 14, ..., 0 except 5: host order is the reverse of guest order.
            for c in (0..N).rev().filter(|&c| c != 5) {
                let data: Vec<u8> = (0..CL).map(|i| (c * 31 + i * 7) as u8).collect();
                assert_eq!(write_via(&mut disk, &mem, 0, c * CL, &data), CL as usize);
                model[(c * CL) as usize..((c + 1) * CL) as usize].copy_from_slice(&data);
            }
            let before = disk.sync_served;
            assert!(
                read_via(&mut disk, &mem, 0x10000, 0, N * CL) == model,
                "{cache:?}/{aio:?}: scattered read"
            );

            let data: Vec<u8> = (0..N * CL).map(|i| (i * 13 + 1) as u8).collect();
            assert_eq!(write_via(&mut disk, &mem, 0x20000, 0, &data), data.len());
            assert!(
                read_via(&mut disk, &mem, 0x10000, 0, N * CL) == data,
                "{cache:?}/{aio:?}: scattered write"
            );
            assert_eq!(
                disk.sync_served, before,
                "{cache:?}/{aio:?} took the sync path"
            );
            assert_eq!(run(&mut disk, RequestOp::Flush).unwrap(), 0);
            drop(disk);
            let mut want = data.clone();
            want.resize(DISK_SIZE as usize, 0);
            assert!(guest_contents(&path, Format::Qcow2) == want);
        }
    }
}

/// Reads of clusters the overlay does not have go to the engine from the backing file's
/// descriptor, through a raw or a qcow2 backing file (itself scattered, with a hole), and
/// past the end of a backing file shorter than the overlay they read zeroes; the backing
/// file follows the overlay's cache mode (O_DIRECT or not).
#[test]
fn backing_reads_go_to_the_engine() {
    const CL: u64 = 4096;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let base_len = DISK_SIZE / 2;
    let mut rng = Rng::new(5);
    let base: Vec<u8> = (0..base_len).map(|_| rng.next() as u8).collect();
    for base_fmt in [Format::Raw, Format::Qcow2] {
        for cache in [CacheMode::None, CacheMode::Writeback] {
            for aio in engines_for(cache) {
                let dir = TempDir::new("backing-engine");
                let mut want = vec![0u8; DISK_SIZE as usize];
                let base_path = match base_fmt {
                    Format::Raw => {
                        let p = dir.path().join("base.raw");
                        std::fs::write(&p, &base).unwrap();
                        want[..base.len()].copy_from_slice(&base);
                        p
                    }
                    Format::Qcow2 => {
                        // Clusters written last to first, cluster 3 left a hole.
                        let p = dir.path().join("base.qcow2");
                        create_qcow2(&p, base_len, CL, None);
                        let mut d = open_qcow2(&p, CacheMode::Writeback, AioMode::Threads);
                        for c in (0..base_len / CL).rev().filter(|&c| c != 3) {
                            let at = (c * CL) as usize;
                            let data = &base[at..at + CL as usize];
                            write_via(&mut d, &mem, 0, c * CL, data);
                            want[at..at + CL as usize].copy_from_slice(data);
                        }
                        run(&mut d, RequestOp::Flush).unwrap();
                        p
                    }
                };
                let top = dir.path().join("top.qcow2");
                create_qcow2(&top, DISK_SIZE, CL, Some((&base_path, base_fmt)));
                let mut disk = open_qcow2(&top, cache, aio);
                // The overlay's own data in clusters 1 and 6.
                for c in [1u64, 6] {
                    let data = vec![0xc0 | c as u8; CL as usize];
                    write_via(&mut disk, &mem, 0, c * CL, &data);
                    want[(c * CL) as usize..((c + 1) * CL) as usize].copy_from_slice(&data);
                }
                let before = disk.sync_served;
                // Whole-disk read (backing, overlay, hole, past the backing file's end), then
                // a read of backing data alone.
                for (off, len) in [(0, DISK_SIZE), (8 * CL, 2 * CL)] {
                    let got = read_via(&mut disk, &mem, 0x10000, off, len);
                    assert!(
                        got[..] == want[off as usize..(off + len) as usize],
                        "{base_fmt:?}/{cache:?}/{aio:?}: read at {off}"
                    );
                }
                assert_eq!(disk.sync_served, before, "{base_fmt:?}/{cache:?}/{aio:?}");
                // The base is read with the overlay's cache mode: O_DIRECT under cache=none.
                let x = disk.driver.map_extents(8 * CL, CL, false).unwrap().unwrap();
                let [Extent::Host { fd, .. }] = x[..] else {
                    panic!("cluster 8 maps to {x:?}");
                };
                assert_ne!(fd, disk.fd(), "cluster 8 is the base's");
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
                    .unwrap();
                assert_eq!(
                    flags & libc::O_DIRECT != 0,
                    cache.direct(),
                    "{base_fmt:?}/{cache:?}: base flags {flags:o}"
                );
            }
        }
    }
}

/// A read that finished while being submitted (a never-written qcow2 cluster) is ready at
/// once, without the eventfd; once taken, nothing is.
#[test]
fn requests_finished_on_submission_are_ready() {
    let dir = TempDir::new("ready");
    let path = dir.path().join("d.qcow2");
    crate::img::create(&path, Format::Qcow2, DISK_SIZE, &Default::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for aio in ENGINES {
        let mut d = open_qcow2(&path, CacheMode::None, aio);
        assert!(!d.ready());
        let sg = SgList::from_guest(&mem, &[(GuestAddress(0), 4096)]).unwrap();
        let op = RequestOp::Read { offset: 0, buf: sg };
        d.submit(Request { tag: 3, op }).unwrap();
        assert!(d.ready(), "{aio:?}");
        let got: Vec<_> = d.completions().collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.as_ref().unwrap(), &4096);
        assert!(!d.ready(), "{aio:?}");
    }
}

/// Requests the disk finishes itself signal the eventfd once until it is reset, as the
/// engines' completions do: three reads of a never-written qcow2 cluster taken with
/// `take_ready` leave a count of 1 (one write, not three); after a reset the next one writes
/// again, so a waiting consumer still wakes.
#[test]
fn requests_finished_on_submission_signal_once_until_reset() {
    let dir = TempDir::new("signal-once");
    let path = dir.path().join("d.qcow2");
    crate::img::create(&path, Format::Qcow2, DISK_SIZE, &Default::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for aio in ENGINES {
        let mut d = open_qcow2(&path, CacheMode::None, aio);
        let read = |d: &mut Disk, tag| {
            let sg = SgList::from_guest(&mem, &[(GuestAddress(0), 4096)]).unwrap();
            let op = RequestOp::Read { offset: 0, buf: sg };
            d.submit(Request { tag, op }).unwrap();
            assert_eq!(d.take_ready().count(), 1, "{aio:?}");
        };
        for tag in 0..3 {
            read(&mut d, tag);
        }
        assert_eq!(d.evt.read().unwrap(), 1, "{aio:?}: one signal for three");
        d.reset_evt();
        read(&mut d, 3);
        assert_eq!(
            d.evt.read().unwrap(),
            1,
            "{aio:?}: signalled again after a reset"
        );
    }
}

/// A caller that takes completions with `take_ready` and waits only with
/// `wait_completions` never misses one: requests that finish during their submission (reads
/// of a hole) leave the eventfd unread, and the next wait resets it before sleeping, for
/// every engine and page-cache or O_DIRECT files, at depth 1 and 4; the data written is
/// read back.
#[test]
fn take_ready_and_wait_never_lose_a_completion() {
    let dir = TempDir::new("take-ready");
    let path = make_image(&dir, DISK_SIZE);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        for aio in engines_for(cache) {
            let mut d = open_disk(&opts(&path, cache, aio)).unwrap();
            for depth in [1usize, 4] {
                let mut in_flight = 0usize;
                let mut next = 0u64;
                let mut done = 0u64;
                while done < 200 {
                    while in_flight < depth && next < 200 {
                        let slot = next % 8;
                        let addr = slot * 8192;
                        let sg = SgList::from_guest(&mem, &[(GuestAddress(addr), 4096)]).unwrap();
                        // Writes to the first half; reads of its holes and of what was
                        // written, so some finish on submission and some on a worker.
                        let op = if next % 3 == 0 {
                            mem.write_slice(&[next as u8; 4096], GuestAddress(addr))
                                .unwrap();
                            RequestOp::Write {
                                offset: (next % 64) * 4096,
                                buf: sg,
                            }
                        } else {
                            RequestOp::Read {
                                offset: (next * 4096 * 7) % DISK_SIZE,
                                buf: sg,
                            }
                        };
                        d.submit(Request { tag: next, op }).unwrap();
                        in_flight += 1;
                        next += 1;
                    }
                    let fired = d.wait_completions(Some(Duration::from_secs(10)));
                    assert!(
                        fired.unwrap(),
                        "{cache:?} {aio:?} depth {depth}: lost after {done}"
                    );
                    for (tag, r) in d.take_ready() {
                        assert_eq!(r.unwrap(), 4096, "request {tag}");
                        in_flight -= 1;
                        done += 1;
                    }
                }
            }
            // Block 63 was last written by request 63 (127 and 191 were reads).
            let got = read_via(&mut d, &mem, 1 << 19, 63 * 4096, 4096);
            assert_eq!(got, vec![63u8; 4096], "{cache:?} {aio:?}");
        }
    }
}

#[test]
fn direct_io_detects_alignment_and_bounces() {
    let dir = TempDir::new("align");
    let path = make_image(&dir, DISK_SIZE);
    let disk = open_disk(&opts(&path, CacheMode::None, AioMode::Threads)).unwrap();
    let a = disk.request_alignment();
    eprintln!(
        "O_DIRECT request alignment detected: {a}, memory alignment {}",
        disk.mem_align
    );
    assert!(a.is_power_of_two() && a >= 512, "alignment {a}");
    assert!(u64::from(disk.physical_block_size()) >= a);
    assert_eq!(disk.logical_block_size(), 512);
    let buffered = open_disk(&DiskOptions {
        readonly: true,
        locking: false,
        ..opts(&path, CacheMode::Writeback, AioMode::Threads)
    })
    .unwrap();
    assert_eq!(buffered.request_alignment(), 1);
}

#[test]
fn requests_past_the_end_are_handed_back() {
    let dir = TempDir::new("range");
    let path = make_image(&dir, DISK_SIZE);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for aio in ENGINES {
        let cache = if aio == AioMode::Native {
            CacheMode::None
        } else {
            CacheMode::Writeback
        };
        let mut disk = open_disk(&opts(&path, cache, aio)).unwrap();
        let sg = SgList::from_guest(&mem, &[(GuestAddress(0), 1024)]).unwrap();
        let err = disk
            .submit(Request {
                tag: 1,
                op: RequestOp::Read {
                    offset: DISK_SIZE - 512,
                    buf: sg,
                },
            })
            .unwrap_err();
        assert!(matches!(err.error, BlockError::OutOfRange { .. }), "{err}");
        assert_eq!(err.request.tag, 1);
        let huge = disk.submit(Request {
            tag: 2,
            op: RequestOp::Discard {
                offset: u64::MAX - 10,
                len: 100,
            },
        });
        assert!(matches!(
            huge.unwrap_err().error,
            BlockError::OutOfRange { .. }
        ));
        // The last byte is fine.
        let sg = SgList::from_guest(&mem, &[(GuestAddress(0), 1)]).unwrap();
        assert_eq!(
            run(
                &mut disk,
                RequestOp::Read {
                    offset: DISK_SIZE - 1,
                    buf: sg
                }
            )
            .unwrap(),
            1
        );
        assert_eq!(disk.in_flight(), 0);
    }
}

#[test]
fn read_only_disks_refuse_writes_and_share() {
    let dir = TempDir::new("ro");
    let path = make_image(&dir, DISK_SIZE);
    let ro = DiskOptions {
        readonly: true,
        ..opts(&path, CacheMode::Writeback, AioMode::Threads)
    };
    let mut a = open_disk(&ro).unwrap();
    let _b = open_disk(&ro).unwrap();
    let err = a
        .submit(Request {
            tag: 1,
            op: RequestOp::WriteZeroes {
                offset: 0,
                len: 512,
                unmap: false,
            },
        })
        .unwrap_err();
    assert!(matches!(err.error, BlockError::ReadOnly));
    // A writer is refused while readers hold the image.
    let w = open_disk(&opts(&path, CacheMode::Writeback, AioMode::Threads));
    assert!(matches!(w, Err(BlockError::Locked { .. })));
}

#[test]
fn two_writers_are_refused() {
    let dir = TempDir::new("lock");
    let path = make_image(&dir, DISK_SIZE);
    let _a = open_disk(&opts(&path, CacheMode::None, AioMode::IoUring)).unwrap();
    let b = open_disk(&opts(&path, CacheMode::Writeback, AioMode::Threads));
    let err = b.unwrap_err();
    assert!(matches!(err, BlockError::Locked { .. }));
    assert!(err.to_string().contains("write"), "{err}");
}

#[test]
fn wce_follows_cache_mode_and_toggles() {
    let dir = TempDir::new("wce");
    let path = make_image(&dir, DISK_SIZE);
    for cache in CacheMode::ALL {
        // No image lock: a child another test forks at this moment would hold the previous
        // iteration's locked descriptor until it execs.
        let mut d = open_disk(&DiskOptions {
            locking: false,
            ..opts(&path, *cache, AioMode::Threads)
        })
        .unwrap();
        assert_eq!(d.wce(), cache.initial_wce(), "{cache}");
        d.set_wce(!d.wce());
        assert_eq!(d.wce(), !cache.initial_wce());
        assert_eq!(run(&mut d, RequestOp::Flush).unwrap(), 0);
    }
}

#[test]
fn native_aio_needs_o_direct() {
    let dir = TempDir::new("native");
    let path = make_image(&dir, DISK_SIZE);
    for cache in CacheMode::ALL.iter().filter(|c| !c.direct()) {
        let e = open_disk(&opts(&path, *cache, AioMode::Native)).unwrap_err();
        assert!(matches!(e, BlockError::NativeAioNeedsDirect), "{cache}");
        assert!(e.to_string().contains("cache=none"));
    }
    let d = open_disk(&opts(&path, CacheMode::Directsync, AioMode::Native)).unwrap();
    assert_eq!(d.aio_mode(), AioMode::Native);
}

/// More requests than the AIO context holds wait in the engine and still all complete.
#[test]
fn native_aio_overflows_its_context() {
    let dir = TempDir::new("native-q");
    let path = make_image(&dir, DISK_SIZE);
    let mut d = open_disk(&DiskOptions {
        uring_entries: 8,
        ..opts(&path, CacheMode::None, AioMode::Native)
    })
    .unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for i in 0..100u64 {
        let sg = SgList::from_guest(&mem, &[(GuestAddress(i * 4096), 4096)]).unwrap();
        d.submit(Request {
            tag: i,
            op: RequestOp::Write {
                offset: i * 4096,
                buf: sg,
            },
        })
        .unwrap();
    }
    d.submit(Request {
        tag: 100,
        op: RequestOp::Flush,
    })
    .unwrap();
    let done = wait_all(&mut d, 101);
    assert!(done.iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn qcow2_and_probing() {
    let dir = TempDir::new("probe");
    let q = dir.path().join("a.qcow2");
    crate::img::create(&q, Format::Qcow2, 1 << 20, &Default::default()).unwrap();
    let d = open_disk(&DiskOptions::new(&q)).unwrap();
    assert_eq!((d.format(), d.size()), (Format::Qcow2, 1 << 20));
    drop(d);
    let r = make_image(&dir, 4096);
    let d = open_disk(&DiskOptions::new(&r)).unwrap();
    assert_eq!((d.format(), d.size()), (Format::Raw, 4096));
}

#[test]
fn discard_punches_holes() {
    let dir = TempDir::new("discard");
    let path = dir.path().join("full.raw");
    crate::img::create(
        &path,
        Format::Raw,
        4 << 20,
        &crate::CreateOptions {
            preallocation: crate::Preallocation::Full,
            ..Default::default()
        },
    )
    .unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    let mut d = open_disk(&opts(&path, CacheMode::Writeback, AioMode::IoUring)).unwrap();
    assert!(d.supports_discard());
    run(
        &mut d,
        RequestOp::Discard {
            offset: 0,
            len: 2 << 20,
        },
    )
    .unwrap();
    run(
        &mut d,
        RequestOp::WriteZeroes {
            offset: 2 << 20,
            len: 1 << 20,
            unmap: true,
        },
    )
    .unwrap();
    use std::os::unix::fs::MetadataExt;
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(
        after * 512 <= (before * 512) - (3 << 20),
        "{before} -> {after} blocks"
    );
}

/// The rig's sequence on a qcow2 disk: data written and flushed, the whole disk discarded,
/// no guest flush after it, the machine stops: once the disk is drained and flushed the
/// freed clusters are holes in the host file again, and the image checks clean.
#[test]
fn qcow2_discard_gives_the_space_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("discard-q2");
    let path = dir.path().join("d.qcow2");
    crate::img::create(&path, Format::Qcow2, 32 << 20, &Default::default()).unwrap();
    for (cache, aio) in [
        (CacheMode::None, AioMode::IoUring),
        (CacheMode::Writeback, AioMode::Threads),
    ] {
        let o = DiskOptions {
            format: Some(Format::Qcow2),
            ..opts(&path, cache, aio)
        };
        let mut d = open_disk(&o).unwrap();
        assert!(d.supports_discard());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0x5a; 1 << 20], GuestAddress(0)).unwrap();
        for i in 0..8u64 {
            let buf = SgList::from_guest(&mem, &[(GuestAddress(0), 1 << 20)]).unwrap();
            run(
                &mut d,
                RequestOp::Write {
                    offset: i << 20,
                    buf,
                },
            )
            .unwrap();
        }
        run(&mut d, RequestOp::Flush).unwrap();
        let written = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            written >= 8 << 20,
            "{cache:?}: {written} bytes after writing 8 MiB"
        );
        run(
            &mut d,
            RequestOp::Discard {
                offset: 0,
                len: 32 << 20,
            },
        )
        .unwrap();
        d.drain_and_flush(Duration::from_secs(10)).unwrap();
        let left = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            left < 1 << 20,
            "{cache:?}: {left} bytes left after discarding all"
        );
        if let Some(q) = crate::testutil::qemu_img() {
            crate::testutil::run_ok(q, &["check", "-U", path.to_str().unwrap()]);
        }
        drop(d);
    }
}

/// A guest that discards a qcow2 cluster while a read and a write of it are still in flight,
/// flushes and writes somewhere new: the discard waits for both, so the new write cannot be
/// given the freed cluster while the old operations may still land in it (they would have
/// written into, or read from, its next owner). Checked on the mapping, which is
/// deterministic: the old path freed the cluster at once, the flush made the free real and
/// the allocation reused it.
#[test]
fn qcow2_discard_waits_for_io_in_flight_on_its_clusters() {
    const CL: u64 = 64 << 10;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for (cache, aio) in [
        (CacheMode::None, AioMode::IoUring),
        (CacheMode::Writeback, AioMode::Threads),
    ] {
        let dir = TempDir::new("discard-race");
        let path = dir.path().join("d.qcow2");
        create_qcow2(&path, 4 << 20, CL, None);
        let mut d = open_qcow2(&path, cache, aio);
        write_via(&mut d, &mem, 0, 0, &[0xa1; CL as usize]);
        let old = d
            .driver
            .map(0, CL, true)
            .unwrap()
            .expect("cluster 0 allocated");
        let sg =
            |addr: u64| SgList::from_guest(&mem, &[(GuestAddress(addr), CL as usize)]).unwrap();
        mem.write_slice(&[0xb2; CL as usize], GuestAddress(CL))
            .unwrap();
        mem.write_slice(&[0xc3; CL as usize], GuestAddress(2 * CL))
            .unwrap();
        let reqs = [
            RequestOp::Write {
                offset: 0,
                buf: sg(CL),
            },
            RequestOp::Read {
                offset: 0,
                buf: sg(3 * CL),
            },
            RequestOp::Discard { offset: 0, len: CL },
            // Frees become real once the tables are durable, at the next flush.
            RequestOp::Flush,
            RequestOp::Write {
                offset: 1 << 20,
                buf: sg(2 * CL),
            },
        ];
        for (tag, op) in reqs.into_iter().enumerate() {
            d.submit(Request {
                tag: tag as u64,
                op,
            })
            .unwrap();
        }
        let new = d.driver.map(1 << 20, CL, false).unwrap();
        assert_ne!(
            new,
            Some(old),
            "{cache:?}/{aio:?}: a cluster in use was handed out again"
        );
        for (tag, r) in wait_all(&mut d, 5) {
            assert!(r.is_ok(), "{cache:?}/{aio:?}: request {tag}: {r:?}");
        }
        assert_eq!(read_via(&mut d, &mem, 0, 0, CL), vec![0u8; CL as usize]);
        assert_eq!(
            read_via(&mut d, &mem, 0, 1 << 20, CL),
            vec![0xc3; CL as usize]
        );
        drop(d);
        if let Some(q) = crate::testutil::qemu_img() {
            crate::testutil::run_ok(q, &["check", path.to_str().unwrap()]);
        }
    }
}

mod cow;
mod durability;
mod interop;
mod model;
