//! The model test: random batches of concurrent requests against an in-memory image,
//! for every format × cache mode × engine.

use super::*;

/// Random batches of concurrent requests. Within a batch, writes/discards/zeroes are
/// byte-disjoint from each other and from reads, but freely share blocks, so every result is
/// determined and read-modify-write races would show.
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
