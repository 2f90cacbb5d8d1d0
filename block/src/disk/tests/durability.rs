//! Data whose flush completed survives SIGKILL of the writer.

use super::*;

/// Bytes the durability child writes and flushes, and where.
const DURABLE_AT: u64 = 1000;
const DURABLE_LEN: u32 = 300_000;
/// Where the child writes again after its flush, never flushed.
const UNFLUSHED_AT: u64 = 600 << 10;

/// What an overlay's base holds: the bytes around the flushed write must still read so.
const BASE_BYTE: u8 = 0x5a;

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
/// metadata written back at the flush) in every cache mode that honours flushes, and for a
/// qcow2 overlay over a raw base (copy-on-write, planned and carried out by the engine where
/// aligned: `disk/cow.rs`); writes after the flush leave a qcow2 image that `qemu-img check`
/// finds consistent (leaked clusters allowed, nothing else).
#[test]
fn durability_after_sigkill() {
    let q = crate::testutil::qemu_img();
    let mut cases = vec![(Format::Raw, CacheMode::None, false)];
    for cache in [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Directsync,
    ] {
        cases.push((Format::Qcow2, cache, false));
    }
    for cache in [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
    ] {
        cases.push((Format::Qcow2, cache, true));
    }
    for (format, cache, backing) in cases {
        let what = format!("{format:?} cache={cache:?} backing={backing}");
        let dir = TempDir::new("durable");
        let path = match format {
            Format::Raw => make_image(&dir, DISK_SIZE),
            Format::Qcow2 if backing => {
                let base = dir.path().join("base.raw");
                std::fs::write(&base, vec![BASE_BYTE; DISK_SIZE as usize]).unwrap();
                let p = dir.path().join("disk.qcow2");
                create_qcow2(&p, DISK_SIZE, 64 << 10, Some((&base, Format::Raw)));
                p
            }
            Format::Qcow2 => {
                let p = dir.path().join("disk.qcow2");
                crate::img::create(&p, Format::Qcow2, DISK_SIZE, &Default::default()).unwrap();
                p
            }
        };
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "disk::tests::durability::durability_child",
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
        if backing {
            // The cluster's bytes before the write kept the base's.
            let sg = SgList::from_guest(&mem, &[(GuestAddress(0), DURABLE_AT as usize)]).unwrap();
            run(&mut d, RequestOp::Read { offset: 0, buf: sg }).unwrap();
            let mut head = vec![0u8; DURABLE_AT as usize];
            mem.read_slice(&mut head, GuestAddress(0)).unwrap();
            assert!(
                head.iter().all(|&b| b == BASE_BYTE),
                "{what}: the base's bytes lost"
            );
        }
    }
}
