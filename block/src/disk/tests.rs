//! Pipeline tests: a model test of random concurrent mixes against an in-memory image for
//! raw × every cache mode × every implemented engine, plus edge cases and durability.

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

/// Random batches of concurrent requests. Within a batch, writes/discards/zeroes are
/// byte-disjoint from each other and from reads, but freely share blocks, so every result is
/// determined and read-modify-write races would show.
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

fn model_test(cache: CacheMode, aio: AioMode, seed: u64, rounds: usize) {
    model_test_on(TestImage::Raw, cache, aio, seed, rounds)
}

fn model_test_on(img: TestImage, cache: CacheMode, aio: AioMode, seed: u64, rounds: usize) {
    let dir = TempDir::new("model");
    let (path, mut model) = make_test_image(&dir, img);
    let format = match img {
        TestImage::Raw => Format::Raw,
        TestImage::Qcow2 { .. } => Format::Qcow2,
    };
    let mut disk = open_disk(&DiskOptions {
        format: Some(format),
        ..opts(&path, cache, aio)
    })
    .unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rng = Rng::new(seed);
    let mut tag = 0u64;
    for round in 0..rounds {
        if round == rounds / 2 {
            let wce = disk.wce();
            disk.set_wce(!wce);
        }
        let hot = rng.below(2) == 0;
        let k = 1 + rng.below(if hot { 16 } else { 8 }) as usize;
        let mut planned: Vec<(u64, Planned)> = Vec::new();
        let mut busy: Vec<(u64, u64, bool)> = Vec::new(); // (start, end, writes)
        for slot in 0..k as u64 {
            let kind = rng.below(100);
            let (off, len) = random_range(&mut rng, hot);
            let writes = (40..90).contains(&kind);
            let clash = busy
                .iter()
                .any(|&(s, e, w)| off < e && s < off + len && (w || writes));
            if clash && kind < 90 {
                continue;
            }
            // Unaligned guest memory half of the time.
            let addr = slot * SLOT
                + if rng.below(2) == 0 {
                    0
                } else {
                    1 + rng.below(4095)
                };
            tag += 1;
            let p = match kind {
                0..=39 => {
                    mem.write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                        .unwrap();
                    let sg = guest_sg(&mem, addr, len, &mut rng);
                    disk.submit(Request {
                        tag,
                        op: RequestOp::Read {
                            offset: off,
                            buf: sg,
                        },
                    })
                    .unwrap();
                    Planned::Read { off, len, addr }
                }
                40..=74 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    mem.write_slice(&data, GuestAddress(addr)).unwrap();
                    let sg = guest_sg(&mem, addr, len, &mut rng);
                    disk.submit(Request {
                        tag,
                        op: RequestOp::Write {
                            offset: off,
                            buf: sg,
                        },
                    })
                    .unwrap();
                    Planned::Write { off, data }
                }
                75..=81 => {
                    disk.submit(Request {
                        tag,
                        op: RequestOp::Discard { offset: off, len },
                    })
                    .unwrap();
                    Planned::Zero { off, len }
                }
                82..=89 => {
                    disk.submit(Request {
                        tag,
                        op: RequestOp::WriteZeroes {
                            offset: off,
                            len,
                            unmap: rng.below(2) == 0,
                        },
                    })
                    .unwrap();
                    Planned::Zero { off, len }
                }
                _ => {
                    disk.submit(Request {
                        tag,
                        op: RequestOp::Flush,
                    })
                    .unwrap();
                    Planned::Flush
                }
            };
            if !matches!(p, Planned::Flush) {
                busy.push((off, off + len, writes));
            }
            planned.push((tag, p));
        }
        let done = wait_all(&mut disk, planned.len());
        for (t, r) in &done {
            let (_, p) = planned.iter().find(|(pt, _)| pt == t).expect("known tag");
            let n = r.as_ref().unwrap_or_else(|e| {
                let what = match p {
                    Planned::Read { off, len, .. } => format!("read [{off}, +{len})"),
                    Planned::Write { off, data } => format!("write [{off}, +{})", data.len()),
                    Planned::Zero { off, len } => format!("discard/zero [{off}, +{len})"),
                    Planned::Flush => "flush".into(),
                };
                panic!("{img:?} {cache}/{aio} round {round}: {what}: {e}")
            });
            match p {
                Planned::Read { off, len, addr } => {
                    assert_eq!(*n as u64, *len);
                    let mut got = vec![0u8; *len as usize];
                    mem.read_slice(&mut got, GuestAddress(*addr)).unwrap();
                    let want = &model[*off as usize..(*off + *len) as usize];
                    assert!(
                        got == want,
                        "{cache}/{aio} round {round}: read [{off}, +{len}) differs from the model"
                    );
                }
                Planned::Write { data, .. } => assert_eq!(*n, data.len()),
                _ => {}
            }
        }
        for (_, p) in planned {
            match p {
                Planned::Write { off, data } => {
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data)
                }
                Planned::Zero { off, len } => model[off as usize..(off + len) as usize].fill(0),
                _ => {}
            }
        }
    }
    assert!(disk.ranges.is_idle());
    drop(disk);
    let on_disk = guest_contents(&path, format);
    assert!(
        on_disk == model,
        "{img:?} {cache}/{aio}: final image differs from the model"
    );
}

#[test]
fn model_all_cache_modes_and_engines() {
    for (i, cache) in CacheMode::ALL.iter().enumerate() {
        for (j, aio) in engines_for(*cache).enumerate() {
            model_test(*cache, aio, 1 + (i * 10 + j) as u64, 60);
        }
    }
}

#[test]
fn model_qcow2_all_cache_modes_and_engines() {
    let img = TestImage::Qcow2 {
        cluster: 4096,
        backing: false,
    };
    for (i, cache) in CacheMode::ALL.iter().enumerate() {
        for (j, aio) in engines_for(*cache).enumerate() {
            model_test_on(img, *cache, aio, 100 + (i * 10 + j) as u64, 40);
        }
    }
}

#[test]
fn model_qcow2_backing_and_cluster_sizes() {
    for (k, (cluster, backing)) in [(512, true), (65536, true), (65536, false), (2 << 20, true)]
        .into_iter()
        .enumerate()
    {
        let img = TestImage::Qcow2 { cluster, backing };
        // O_DIRECT needs clusters of at least the host's direct I/O alignment.
        let direct = TestImage::Qcow2 {
            cluster: cluster.max(4096),
            backing,
        };
        model_test_on(
            direct,
            CacheMode::None,
            AioMode::IoUring,
            200 + k as u64,
            40,
        );
        model_test_on(
            img,
            CacheMode::Writeback,
            AioMode::Threads,
            300 + k as u64,
            40,
        );
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
        let mut d = open_disk(&opts(&path, *cache, AioMode::Threads)).unwrap();
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

/// Bytes the durability child writes and flushes, and where.
const DURABLE_AT: u64 = 1000;
const DURABLE_LEN: u32 = 300_000;
/// Where the child writes again after its flush, never flushed.
const UNFLUSHED_AT: u64 = 600 << 10;

fn durable_pattern() -> Vec<u8> {
    (0..DURABLE_LEN).map(|i| (i % 251) as u8).collect()
}

/// Child half of the durability test: write, flush, write more without flushing, report,
/// then wait to be killed.
#[test]
#[ignore = "run by durability_after_sigkill as a child process"]
fn durability_child() {
    let Some(path) = std::env::var_os("PLATTER_DURABILITY_IMAGE") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let o = DiskOptions {
        format: Some(var("PLATTER_DURABILITY_FORMAT").parse().unwrap()),
        ..opts(
            Path::new(&path),
            var("PLATTER_DURABILITY_CACHE").parse().unwrap(),
            AioMode::IoUring,
        )
    };
    let mut d = open_disk(&o).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let data = durable_pattern();
    mem.write_slice(&data, GuestAddress(3)).unwrap();
    let sg = SgList::from_guest(&mem, &[(GuestAddress(3), data.len())]).unwrap();
    let write = |d: &mut Disk, offset: u64, len: usize| {
        let buf = SgList::from_guest(&mem, &[(GuestAddress(3), len)]).unwrap();
        run(d, RequestOp::Write { offset, buf }).unwrap();
    };
    run(
        &mut d,
        RequestOp::Write {
            offset: DURABLE_AT,
            buf: sg,
        },
    )
    .unwrap();
    run(&mut d, RequestOp::Flush).unwrap();
    // Unflushed: allocating writes (qcow2 metadata only in the cache) and an overwrite.
    write(&mut d, UNFLUSHED_AT, 200_000);
    write(&mut d, DISK_SIZE - 4096, 4096);
    println!("FLUSHED");
    std::thread::sleep(Duration::from_secs(60));
}

/// Data whose flush completed survives SIGKILL, for raw and for qcow2 (allocating writes,
/// metadata written back at the flush) in every cache mode that honours flushes; writes
/// after the flush leave a qcow2 image that `qemu-img check` finds consistent (leaked
/// clusters allowed, nothing else).
#[test]
fn durability_after_sigkill() {
    let q = crate::testutil::qemu_img();
    let mut cases = vec![(Format::Raw, CacheMode::None)];
    for cache in [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Directsync,
    ] {
        cases.push((Format::Qcow2, cache));
    }
    for (format, cache) in cases {
        let what = format!("{format:?} cache={cache:?}");
        let dir = TempDir::new("durable");
        let path = match format {
            Format::Raw => make_image(&dir, DISK_SIZE),
            Format::Qcow2 => {
                let p = dir.path().join("disk.qcow2");
                crate::img::create(&p, Format::Qcow2, DISK_SIZE, &Default::default()).unwrap();
                p
            }
        };
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "disk::tests::durability_child",
                "--ignored",
                "--nocapture",
            ])
            .env("PLATTER_DURABILITY_IMAGE", &path)
            .env("PLATTER_DURABILITY_FORMAT", format.to_string())
            .env("PLATTER_DURABILITY_CACHE", cache.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut flushed = false;
        for line in out.lines() {
            if line.unwrap().contains("FLUSHED") {
                flushed = true;
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(flushed, "{what}: child never reported its flush");
        if let (Format::Qcow2, Some(q)) = (format, &q) {
            // 0: clean, 3: leaked clusters only; 2 would be corruption.
            let out = std::process::Command::new(q)
                .args(["check", "-f", "qcow2"])
                .arg(&path)
                .output()
                .unwrap();
            let code = out.status.code();
            assert!(
                matches!(code, Some(0 | 3)),
                "{what}: qemu-img check exit {code:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // The lock died with the child; the data is there.
        let o = DiskOptions {
            format: Some(format),
            ..opts(&path, CacheMode::Directsync, AioMode::Threads)
        };
        let mut d = open_disk(&o).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sg = SgList::from_guest(&mem, &[(GuestAddress(0), DURABLE_LEN as usize)]).unwrap();
        run(
            &mut d,
            RequestOp::Read {
                offset: DURABLE_AT,
                buf: sg,
            },
        )
        .unwrap();
        let mut got = vec![0u8; DURABLE_LEN as usize];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got == durable_pattern(), "{what}: flushed data lost");
    }
}

/// Run qemu-img or qemu-io with `args`, asserting success.
fn qemu(tool: &str, args: &[&str]) {
    crate::testutil::run_ok(tool, args);
}

/// Read the whole disk through our pipeline.
fn read_all(path: &Path, cache: CacheMode, aio: AioMode) -> Vec<u8> {
    let mut d = open_disk(&DiskOptions {
        readonly: true,
        ..DiskOptions::new(path).with(cache, aio)
    })
    .unwrap();
    let mut v = vec![0u8; d.size() as usize];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // Chunks of odd sizes, so requests straddle clusters of every kind.
    let mut at = 0u64;
    let mut rng = Rng::new(5);
    while at < d.size() {
        let n = (1 + rng.below(300_000)).min(d.size() - at);
        let sg = SgList::from_guest(&mem, &[(GuestAddress(0), n as usize)]).unwrap();
        run(
            &mut d,
            RequestOp::Read {
                offset: at,
                buf: sg,
            },
        )
        .unwrap();
        mem.read_slice(&mut v[at as usize..(at + n) as usize], GuestAddress(0))
            .unwrap();
        at += n;
    }
    v
}

impl DiskOptions {
    fn with(mut self, cache: CacheMode, aio: AioMode) -> Self {
        self.cache = cache;
        self.aio = aio;
        self
    }
}

/// Images made by qemu-img (compressed, preallocated, v2, a qcow2-over-qcow2 chain with a
/// raw base) read back equal to `qemu-img convert -O raw`.
#[test]
fn qemu_img_images_read_back() {
    let Some(_) = crate::testutil::qemu_img() else {
        return;
    };
    let dir = TempDir::new("qemu-made");
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let size = 6 << 20;
    let mut rng = Rng::new(11);
    // Random data with zero runs and repetitive (compressible) runs.
    let mut data = vec![0u8; size];
    for chunk in data.chunks_mut(65536) {
        match rng.below(4) {
            0 => {}
            1 => chunk.fill(rng.next() as u8),
            _ => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
        }
    }
    std::fs::write(p("src.raw"), &data).unwrap();
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            &p("src.raw"),
            &p("comp.qcow2"),
        ],
    );
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            &p("src.raw"),
            &p("v2.qcow2"),
        ],
    );
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            &p("src.raw"),
            &p("meta.qcow2"),
        ],
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            &p("full.qcow2"),
            "3M",
        ],
    );
    // Chain: raw base <- qcow2 mid (some clusters rewritten, some zeroed) <- qcow2 top.
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.raw",
            "-F",
            "raw",
            &p("mid.qcow2"),
            "7M",
        ],
    );
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 100k 300k",
            "-c",
            "write -z 1M 256k",
            "-c",
            "write -P 0x44 6500k 100k",
            &p("mid.qcow2"),
        ],
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &p("top.qcow2"),
        ],
    );
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x55 250k 8k",
            "-c",
            "discard 2M 64k",
            "-c",
            "write -c -P 0x66 3M 64k",
            &p("top.qcow2"),
        ],
    );
    for name in [
        "comp.qcow2",
        "v2.qcow2",
        "meta.qcow2",
        "full.qcow2",
        "mid.qcow2",
        "top.qcow2",
    ] {
        qemu(
            "qemu-img",
            &["convert", "-O", "raw", &p(name), &p("want.raw")],
        );
        let want = std::fs::read(p("want.raw")).unwrap();
        for (cache, aio) in [
            (CacheMode::Writeback, AioMode::Threads),
            (CacheMode::None, AioMode::IoUring),
        ] {
            let got = read_all(Path::new(&p(name)), cache, aio);
            assert!(
                got == want,
                "{name} {cache}/{aio}: differs from qemu-img convert"
            );
        }
    }
}

/// Images written by us pass `qemu-img check` and `qemu-img compare` against the model,
/// also when they started as qemu-img's compressed or preallocated images.
#[test]
fn our_writes_to_qemu_made_images_check_clean() {
    let Some(_) = crate::testutil::qemu_img() else {
        return;
    };
    let dir = TempDir::new("qemu-write");
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let mut data = vec![0u8; 2 << 20];
    let mut rng = Rng::new(3);
    data.iter_mut().for_each(|b| *b = (rng.next() % 4) as u8);
    std::fs::write(p("src.raw"), &data).unwrap();
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            &p("src.raw"),
            &p("c.qcow2"),
        ],
    );
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            &p("m.qcow2"),
            "2M",
        ],
    );
    for (name, mut model) in [("c.qcow2", data.clone()), ("m.qcow2", vec![0u8; 2 << 20])] {
        let mut d = open_disk(
            &opts(Path::new(&p(name)), CacheMode::None, AioMode::Native).with_format(Format::Qcow2),
        )
        .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for i in 0..40u64 {
            let off = rng.below(2 << 20);
            let len = (1 + rng.below(100_000)).min((2 << 20) - off);
            if i % 5 == 4 {
                run(&mut d, RequestOp::Discard { offset: off, len }).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                continue;
            }
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            mem.write_slice(&bytes, GuestAddress(0)).unwrap();
            let sg = SgList::from_guest(&mem, &[(GuestAddress(0), len as usize)]).unwrap();
            run(
                &mut d,
                RequestOp::Write {
                    offset: off,
                    buf: sg,
                },
            )
            .unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
        }
        run(&mut d, RequestOp::Flush).unwrap();
        drop(d);
        std::fs::write(p("model.raw"), &model).unwrap();
        qemu("qemu-img", &["check", "-f", "qcow2", &p(name)]);
        qemu(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                &p(name),
                &p("model.raw"),
            ],
        );
    }
}

impl DiskOptions {
    fn with_format(mut self, f: Format) -> Self {
        self.format = Some(f);
        self
    }
}
