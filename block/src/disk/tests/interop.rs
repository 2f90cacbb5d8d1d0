//! Images made by qemu-img read back; images we write pass qemu-img check and compare.

use super::*;

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

    fn with_format(mut self, f: Format) -> Self {
        self.format = Some(f);
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
