//! End-to-end tests: Platter boots the stock Debian kernel inside the nested
//! rig (`guests/rig`, see RIG.md) and the guest reports what it sees.
//!
//! These need the rig's artifacts (`guests/build.sh`) and take a minute or
//! more each, so they run when `PLATTER_RIG_TESTS=1` (the README's test
//! command sets it). Without it they print that they were skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The machine every boot test asks for.
const VCPUS: u32 = 2;
const MEMORY_MIB: u64 = 512;
/// The Q35 host bridge Platter's PCI root presents at 00:00.0.
const HOST_BRIDGE: &str = "0000:00:00.0 0x8086 0x29c0 0x060000";
/// vCPUs of the disk tests' guests. One: with two, guests under sustained I/O
/// in the nested TCG rig now and then lose a vCPU (soft lockups and RCU
/// stalls, seen under QEMU as the L2 VMM too; a request that never completes)
/// or triple-fault with nothing logged; see the issue notes. The boot test and the short multiqueue test keep two.
const DISK_TEST_VCPUS: u32 = 1;
/// RAM of the rig's L1 machine for these tests.
const L1_MEMORY_MIB: &str = "6144";
/// Markers the guest-side script prints.
const MARK_EXIT: &str = "PLATTER-GUEST-EXIT=0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn enabled() -> bool {
    if std::env::var_os("PLATTER_RIG_TESTS").is_some_and(|v| v == "1") {
        return true;
    }
    eprintln!("skipped: set PLATTER_RIG_TESTS=1 to run the rig tests (see README)");
    false
}

/// Base64 without padding quirks, for `rig.cmd=` (the guest decodes it).
fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `platter run` of configs/boot.toml whose guest runs `script`, as a
/// shell-quoted command line for the rig job.
fn platter_run(script: &str, extra: &[&str]) -> String {
    let mut args = vec![
        env!("CARGO_BIN_EXE_platter").to_string(),
        "run".into(),
        "configs/boot.toml".into(),
        "--rig=never".into(),
        format!("--set=machine.vcpus={VCPUS}"),
        format!("--set=machine.memory={MEMORY_MIB}M"),
        format!(
            "--set=kernel.cmdline=console=ttyS0 quiet rig.cmd={}",
            b64(script)
        ),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Seconds a rig job may take; the slowest (compare, Platter and QEMU) takes
/// about four minutes on a quiet machine.
const RIG_TIMEOUT_SECS: &str = "480";
/// How many times a job whose guest died is run in all (see [`in_rig`]).
const RIG_ATTEMPTS: u32 = 3;
/// `guests/rig`'s status when the job ran out of time.
const RIG_TIMED_OUT: i32 = 124;

/// What the output holds when a guest died: Platter's line for a triple
/// fault, compare's for a VMM that ended while its guest's script had not
/// (QEMU, run with -no-reboot, just exits when its guest triple-faults; seen
/// once in CI, a 1-vCPU QEMU guest at the start of a fio job), and the rig's
/// when L1 itself died (seen once: L1's kernel took a fatal exception inside
/// KVM_RUN, "Kernel panic - not syncing: Fatal exception in interrupt", with
/// its stack pointer at a page boundary: the nested TCG SVM again).
const GUEST_DIED: [&str; 4] = [
    "triple fault",
    // disk_job.sh's line for a guest it stopped for overrunning.
    "GUEST HUNG:",
    "the guest script did not finish (exit status missing)",
    "without reporting the command's exit status",
];

/// Run a shell job inside L1; returns (exit code, all output).
///
/// Now and then a guest in the nested TCG rig dies outright: it stalls (about
/// one run in ten: never reaches init, or soft lockups, with Platter's own
/// trace showing nothing pending) or triple-faults under write load (seen
/// twice in about ten virtio-blk runs; not understood yet, see the issue
/// notes). Such a job is run again, loudly, up to [`RIG_ATTEMPTS`] times in
/// all (CI once saw two deaths in a row in one test: a stall, then a triple
/// fault early in the boot); every other failure, and the last death, fails
/// the test. A stalled disk job costs `GUEST_LIMIT` (disk_job.sh), not the
/// rig's whole timeout: Platter is stopped, with its statistics printed.
fn in_rig(job: &str) -> (i32, String) {
    let mut attempt = 1;
    loop {
        let (rc, out) = in_rig_once(job);
        let died = rc == RIG_TIMED_OUT || GUEST_DIED.iter().any(|m| out.contains(m));
        if !died || attempt == RIG_ATTEMPTS {
            return (rc, out);
        }
        eprintln!(
            "RIG FLAKE: the guest died (status {rc}); running the job again ({} of {RIG_ATTEMPTS})",
            attempt + 1
        );
        attempt += 1;
    }
}

fn in_rig_once(job: &str) -> (i32, String) {
    let out = Command::new(repo().join("guests/rig"))
        .current_dir(repo())
        // L1 holds the guest's RAM, a tmpfs-backed scratch file system and the
        // page cache of both: give it room so writeback never stalls the guest.
        .args([
            "--timeout",
            RIG_TIMEOUT_SECS,
            "--mem",
            L1_MEMORY_MIB,
            "--",
            "sh",
            "-c",
            job,
        ])
        .output()
        .expect("running guests/rig");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(key))
        .map(|(_, v)| v.trim())
        .next()
}

#[test]
fn boots_and_reports_cpus_memory_pci_and_refuses_bad_config() {
    if !enabled() {
        return;
    }
    let facts = "echo UNAME=$(uname -r); echo NPROC=$(nproc); \
        echo MEMKB=$(awk '/MemTotal/{print $2}' /proc/meminfo); \
        echo GUEST_CPU=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1); \
        echo TSC_DEADLINE=$(grep -c -m1 tsc_deadline_timer /proc/cpuinfo); \
        for d in /sys/bus/pci/devices/*; do \
          echo PCI=$(basename $d) $(cat $d/vendor) $(cat $d/device) $(cat $d/class); done";
    // L1's processor, for the guest's to be compared with.
    let l1 = "echo L1_CPU=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)";
    let job = format!(
        "{l1}; {}; echo RUN1_RC=$?; {}; echo RUN2_RC=$?; {}; echo RUN3_RC=$?",
        platter_run(facts, &[]),
        platter_run("reboot -f", &["--set=machine.on_reboot=exit"]),
        platter_run("true", &["--set=machine.vcpus=0"]),
    );
    let (rc, out) = in_rig(&job);
    assert_eq!(rc, 0, "the rig job failed");

    // First run: the guest's view of the machine, then poweroff -> exit 0.
    let kernel = std::fs::read_to_string(repo().join("guests/cache/kernel/version")).unwrap();
    assert_eq!(value(&out, "UNAME="), Some(kernel.trim()));
    assert_eq!(value(&out, "NPROC="), Some(VCPUS.to_string().as_str()));
    let mem_kb: u64 = value(&out, "MEMKB=").unwrap().parse().unwrap();
    // The kernel keeps some RAM for itself; it must see most of 512 MiB and no more.
    assert!(
        mem_kb > MEMORY_MIB * 1024 * 8 / 10 && mem_kb <= MEMORY_MIB * 1024,
        "MemTotal {mem_kb} kB"
    );
    // The host's brand string and the TSC-deadline timer (L1's KVM emulates it).
    assert_eq!(value(&out, "GUEST_CPU="), value(&out, "L1_CPU="));
    assert_eq!(value(&out, "TSC_DEADLINE="), Some("1"));
    assert!(
        out.lines().any(|l| l.trim_end().ends_with(HOST_BRIDGE)),
        "host bridge missing from the guest's PCI list"
    );
    assert!(out.contains(MARK_EXIT), "guest script did not finish");
    assert_eq!(value(&out, "RUN1_RC="), Some("0"), "poweroff must exit 0");

    // Second run: guest reboot with on_reboot = exit ends Platter with 0.
    assert_eq!(value(&out, "RUN2_RC="), Some("0"), "reboot must exit 0");

    // Third run: a bad config is refused with one line and status 2.
    assert_eq!(value(&out, "RUN3_RC="), Some("2"));
    assert!(
        out.contains("machine.vcpus: must be between 1 and 254 (got 0)"),
        "bad config message missing"
    );
}

#[test]
fn pvm_host_is_detected_and_pointed_to_the_rig() {
    if !enabled() {
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host's KVM is not PVM");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_platter"))
        .current_dir(repo())
        .args(["run", "configs/boot.toml", "--rig=never"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("kvm_pvm"), "{err}");
    assert!(err.contains("guests/rig -- "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The cache x engine matrix of the virtio-blk test: (serial code, cache, aio).
const CACHES: [(&str, &str); 5] = [
    ("wb", "writeback"),
    ("no", "none"),
    ("wt", "writethrough"),
    ("ds", "directsync"),
    ("un", "unsafe"),
];
const ENGINES: [(&str, &str); 2] = [("th", "threads"), ("ur", "io_uring")];
/// Each data disk is this big; fio writes 4 MiB of it.
const DATA_DISK_SECTORS: u64 = 32 * 1024 * 1024 / 512;

/// A virtio-blk disk; `.qcow2` files are qcow2, anything else raw.
fn disk_toml(serial: &str, file: &str, extra: &str) -> String {
    let format = if file.ends_with(".qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    format!(
        "[[disk]]\nid = \"{serial}\"\nserial = \"{serial}\"\npath = \"@WORK@/{file}\"\n\
         format = \"{format}\"\ncontroller = \"virtio-blk\"\n{extra}\n"
    )
}

/// The guest's root is on virtio-blk; its data disks cover every cache mode
/// with each engine, a read-only disk, discard on and off, two queues on one
/// vCPU, an image that fills up, throttling and 4K logical blocks.
fn virtio_blk_config() -> String {
    let mut t = guest_header(DISK_TEST_VCPUS, "virtio_pci,virtio_blk", "/dev/vda");
    t += &disk_toml("root", "root.ext4", "");
    for (c, cache) in CACHES {
        for (a, aio) in ENGINES {
            let s = format!("m-{c}-{a}");
            // Two of them share a named I/O thread with the multiqueue disk.
            let shared = if c == "no" || c == "wt" {
                "\niothread = \"shared\""
            } else {
                ""
            };
            t += &disk_toml(
                &s,
                &format!("{s}.raw"),
                &format!("cache = \"{cache}\"\naio = \"{aio}\"{shared}"),
            );
        }
    }
    t += &disk_toml("ro", "ro.raw", "readonly = true");
    t += &disk_toml(
        "disc-on",
        "disc-on.raw",
        "discard = true\ncache = \"none\"\naio = \"io_uring\"",
    );
    t += &disk_toml(
        "disc-q2",
        "disc-q2.qcow2",
        "discard = true\ncache = \"none\"\naio = \"io_uring\"",
    );
    t += &disk_toml("disc-off", "disc-off.raw", "discard = false");
    // qcow2 overlays over a raw base (disk_job.sh makes `*-over.qcow2` so): writes copy on
    // write, carried out by the engine (cache=none) or with the write cache off.
    t += &disk_toml(
        "cow",
        "cow-over.qcow2",
        "cache = \"none\"\naio = \"io_uring\"",
    );
    t += &disk_toml(
        "cow-wt",
        "cow-wt-over.qcow2",
        "cache = \"writethrough\"\naio = \"threads\"",
    );
    t += &disk_toml(
        "mq",
        "mq.raw",
        "num_queues = 2\nqueue_size = 128\naio = \"io_uring\"\niothread = \"shared\"",
    );
    t += FULL_DISK_VIRTIO;
    // Throttled to 50 IOPS; its own group (`[disk.throttle]` must come last).
    t += &disk_toml("thr", "thr.raw", "[disk.throttle]\niops_total = 50");
    t += &disk_toml(
        "blk4k",
        "blk4k.raw",
        "logical_block_size = 4096\nphysical_block_size = 16384\ncache = \"none\"",
    );
    t
}

/// A disk whose image sits on an 8 MiB file system (disk_job.sh's @SMALL@):
/// writes past 8 MiB fail on the host with ENOSPC.
const FULL_DISK_VIRTIO: &str = "[[disk]]\nid = \"full\"\nserial = \"full\"\n\
    path = \"@SMALL@/full.raw\"\nformat = \"raw\"\ncontroller = \"virtio-blk\"\n\
    cache = \"writeback\"\n\n";

/// The guest saw host write failures as I/O errors, and the disk kept
/// working: reads and rewrites of the space it has still verify.
fn assert_error_path(out: &str) {
    assert_ne!(
        value(out, "FULL_WRITE "),
        Some("0"),
        "16 MiB written to a disk whose image can hold less than 8 MiB"
    );
    let errors: u32 = value(out, "FULL_IOERRORS ").unwrap().parse().unwrap();
    assert!(errors > 0, "the guest kernel logged no I/O error");
    assert_eq!(value(out, "FULL_READ "), Some("0"), "reads after the error");
    assert_eq!(
        value(out, "FULL_VERIFY "),
        Some("0"),
        "rewrite + verify of allocated space after the error"
    );
    assert!(
        out.lines().any(|l| l.contains("] /tmp/small/")
            && l.trim_end().ends_with(".raw: a guest write failed on the host: I/O error: No space left on device (os error 28); the guest sees an I/O error")),
        "Platter did not tell the user of the host's ENOSPC"
    );
}

/// Run `disk_job.sh` in the rig with config template `config` (image paths
/// under `@WORK@`), written as `name`, and the script the guest runs; checks
/// that the job ran, Platter exited 0 and the guest script finished, and
/// returns the output.
fn disk_job(name: &str, config: &str, guest_script: &str) -> String {
    let out = disk_job_unfinished(name, config, guest_script);
    assert!(out.contains(MARK_EXIT), "guest script did not finish");
    out
}

/// [`disk_job`] for a guest that is stopped before its script ends.
fn disk_job_unfinished(name: &str, config: &str, guest_script: &str) -> String {
    let template = write_template(name, config);
    let job = format!(
        "bash vmm/tests/rig/disk_job.sh '{}' '{}' '{guest_script}'",
        env!("CARGO_BIN_EXE_platter"),
        template.display()
    );
    let (rc, out) = in_rig(&job);
    assert_eq!(rc, 0, "the rig job failed");
    assert_eq!(value(&out, "RUN_RC "), Some("0"), "Platter must exit 0");
    out
}

/// Write a config template under guests/cache/tests (visible in L1).
fn write_template(name: &str, text: &str) -> PathBuf {
    let dir = repo().join("guests/cache/tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `[machine]` and `[kernel]` for a guest that loads `modules`, mounts its
/// root from `root` and runs /root/test.sh.
fn guest_header(vcpus: u32, modules: &str, root: &str) -> String {
    let repo = repo();
    format!(
        "[machine]\nvcpus = {vcpus}\nmemory = \"{MEMORY_MIB}M\"\n\n[kernel]\n\
         path = \"{k}\"\ninitramfs = \"{i}\"\n\
         cmdline = \"console=ttyS0 quiet rig.modules={modules} rig.root={root} rig.cmd={cmd}\"\n\n",
        k = repo.join("guests/cache/kernel/vmlinuz").display(),
        i = repo.join("guests/cache/l2/initramfs.cpio.gz").display(),
        cmd = b64("sh /root/test.sh"),
    )
}

#[test]
fn virtio_blk_root_and_data_disks_under_every_cache_mode_and_engine() {
    if !enabled() {
        return;
    }
    let out = disk_job(
        "virtio-blk.toml",
        &virtio_blk_config(),
        "vmm/tests/rig/virtio_blk_guest.sh",
    );

    let root = value(&out, "ROOT ").unwrap();
    assert_eq!(root, "/dev/vda ext4", "root file system on virtio-blk");

    for (c, cache) in CACHES {
        for (a, _) in ENGINES {
            let s = format!("m-{c}-{a}");
            assert_eq!(
                value(&out, &format!("FIO {s} ")),
                Some("0"),
                "fio verify on {s}"
            );
            assert_eq!(
                value(&out, &format!("SIZE {s} ")),
                Some(DATA_DISK_SECTORS.to_string().as_str())
            );
            // QEMU's meaning: writethrough and directsync turn the guest's cache off.
            let expect = if matches!(cache, "writethrough" | "directsync") {
                "write_through"
            } else {
                "write_back"
            };
            assert_eq!(value(&out, &format!("CACHETYPE {s} ")), Some(expect), "{s}");
        }
    }
    assert_eq!(value(&out, "TOGGLED "), Some("write_through"));
    assert_eq!(value(&out, "FIO toggled "), Some("0"));
    assert_eq!(value(&out, "RESTORED "), Some("write_back"));

    assert_eq!(value(&out, "RO_FLAG "), Some("1"));
    assert_ne!(
        value(&out, "RO_WRITE "),
        Some("0"),
        "a read-only disk took a write"
    );
    assert_eq!(value(&out, "RO_READ "), Some("0"));

    assert_ne!(value(&out, "DISCMAX disc-on "), Some("0"));
    assert_eq!(value(&out, "DISCMAX disc-off "), Some("0"));
    assert_eq!(value(&out, "WROTE disc-on "), Some("0"));
    assert_eq!(value(&out, "WROTE disc-off "), Some("0"));
    assert_eq!(value(&out, "BLKDISCARD disc-on "), Some("0"));
    assert_ne!(value(&out, "BLKDISCARD disc-off "), Some("0"));
    let alloc = |s: &str| -> u64 {
        value(&out, &format!("ALLOC_KIB {s} "))
            .unwrap()
            .parse()
            .unwrap()
    };
    // qcow2: discard frees the clusters, which are punched out of the file;
    // the header, tables and refcounts stay.
    assert_ne!(value(&out, "DISCMAX disc-q2 "), Some("0"));
    assert_eq!(value(&out, "WROTE disc-q2 "), Some("0"));
    assert_eq!(value(&out, "BLKDISCARD disc-q2 "), Some("0"));
    for s in ["disc-on", "disc-q2"] {
        assert!(alloc(s) < 1024, "discard left {} KiB of {s}", alloc(s));
    }
    assert!(
        alloc("disc-off") >= 8 * 1024,
        "the written data is missing: {} KiB",
        alloc("disc-off")
    );

    // Copy on write: fio verifies, and the blocks written one by one into the
    // overlay's clusters keep the base's bytes around them, as the guest reads
    // them and as qemu-img reads the image afterwards.
    for s in ["cow", "cow-wt"] {
        assert_eq!(
            value(&out, &format!("FIO {s} ")),
            Some("0"),
            "fio verify on {s}"
        );
        assert_eq!(value(&out, &format!("COW_WRITE {s} ")), Some("0"), "{s}");
        assert_eq!(
            value(&out, &format!("QCOW2_CHECK {s}-over ")),
            Some("0"),
            "qemu-img check {s}"
        );
        let expect = value(&out, &format!("COW_EXPECT_SHA256 {s} ")).unwrap();
        assert_eq!(
            value(&out, &format!("COW_GUEST_SHA256 {s} ")),
            Some(expect),
            "{s}: the guest read back other bytes"
        );
        assert_eq!(
            value(&out, &format!("COW_IMAGE_SHA256 {s} ")),
            Some(expect),
            "{s}: the image holds other bytes"
        );
    }

    // Two queues offered, one vCPU: the driver uses one, the other stays idle.
    assert_eq!(value(&out, "MQ "), Some("1"));
    assert_eq!(value(&out, "FIO mq "), Some("0"));

    // Throttling: fio's rate stays at the limit (plus the 0.1 s burst);
    // `--disk-stats` shows the requests that waited.
    let thr: f64 = value(&out, "THR_IOPS ").unwrap().parse().unwrap();
    assert!(thr > 0.0 && thr <= 60.0, "50 IOPS limit, fio saw {thr}");
    let stats = disk_stats(&out, "thr");
    assert!(
        stats.contains("throttled=") && !stats.contains("throttled=0 "),
        "no read waited for the throttle: {stats}"
    );
    assert!(
        disk_stats(&out, "m-wb-th").contains("write: ops="),
        "writes counted"
    );
    // --stats-file holds the same numbers as JSON, for every disk.
    let in_file: usize = value(&out, "STATS_FILE_DISKS ").unwrap().parse().unwrap();
    assert_eq!(in_file, virtio_blk_config().matches("[[disk]]").count());
    let text_ops = stats
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ops="));
    assert_eq!(value(&out, "STATS_FILE_READ_OPS thr "), text_ops);

    assert_error_path(&out);

    assert_eq!(value(&out, "BLOCKSIZES blk4k "), Some("4096 16384"));
    assert_eq!(value(&out, "SMALL_WRITE blk4k "), Some("failed"));
    assert_eq!(value(&out, "FIO blk4k "), Some("0"));
}

/// Two vCPUs, a root disk and a two-queue disk whose queues are served by two
/// I/O threads (queue 0 on mq-a, queue 1 on mq-b, sharing the disk; mq-b
/// polls, as QEMU's iothreads do by default): one fio job per vCPU, each
/// pinned, so each submits through its own queue. Kept short (see
/// DISK_TEST_VCPUS).
fn virtio_blk_mq_config() -> String {
    let mut t = guest_header(VCPUS, "virtio_pci,virtio_blk", "/dev/vda");
    t += &disk_toml("root", "root.ext4", "");
    t += &disk_toml(
        "mq",
        "mq.raw",
        "num_queues = 2\nqueue_size = 128\ncache = \"none\"\naio = \"io_uring\"\n\
         iothread = [\"mq-a\", \"mq-b\"]",
    );
    t += "\n[[iothread]]\nid = \"mq-b\"\npoll_max_ns = 32768\n";
    t
}

#[test]
fn virtio_blk_multiqueue_serves_one_queue_per_vcpu() {
    if !enabled() {
        return;
    }
    let out = disk_job(
        "virtio-blk-mq.toml",
        &virtio_blk_mq_config(),
        "vmm/tests/rig/virtio_mq_guest.sh",
    );
    assert_eq!(value(&out, "NPROC "), Some(VCPUS.to_string().as_str()));
    assert_eq!(value(&out, "MQ "), Some("2"));
    let threads = value(&out, "THREADS ").unwrap_or_default();
    for t in ["mq-a", "mq-b"] {
        assert!(
            threads.split(' ').any(|n| n == t),
            "no I/O thread {t} in Platter: {threads}"
        );
    }
    // blk-mq maps each CPU to a queue of its own.
    assert_eq!(value(&out, "MQ_CPUS 0 "), Some("0"));
    assert_eq!(value(&out, "MQ_CPUS 1 "), Some("1"));
    assert_eq!(value(&out, "FIO mq-cpu0 "), Some("0"));
    assert_eq!(value(&out, "FIO mq-cpu1 "), Some("0"));
    // Each queue got interrupts: the guest counted them per MSI-X vector.
    for q in 0..2 {
        let n: u64 = value(&out, &format!("MQ_IRQS {q} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0, "no interrupt on queue {q}");
    }
}

/// SIGTERM stops Platter in order: the guest wrote to a qcow2 disk without a
/// flush, so the image's new L2 entries were only in Platter's memory; after
/// the stop the image is consistent and holds what the guest wrote, and the
/// statistics were printed.
#[test]
fn sigterm_stops_in_order_and_keeps_what_qcow2_held_in_memory() {
    if !enabled() {
        return;
    }
    let mut config = guest_header(DISK_TEST_VCPUS, "virtio_pci,virtio_blk", "/dev/vda");
    config += &disk_toml("root", "root.ext4", "");
    config += &disk_toml("held", "held.qcow2", "cache = \"writeback\"");
    let out = disk_job_unfinished("sigterm.toml", &config, "vmm/tests/rig/sigterm_guest.sh");
    assert!(
        !out.contains("GUEST HUNG"),
        "the guest never asked to be stopped"
    );
    assert!(
        out.contains("platter: stopped on SIGTERM"),
        "no word of the orderly stop"
    );
    assert!(out.contains("vcpu exits: "), "--exit-stats after a signal");
    assert_eq!(value(&out, "DD_RC "), Some("0"));
    let held = disk_stats(&out, "held");
    assert!(
        held.contains("write: ops="),
        "the writes reached Platter: {held}"
    );
    // Without a flush from the guest only the orderly stop wrote the tables back.
    assert!(!held.contains("flush:"), "the guest flushed: {held}");
    assert_eq!(
        value(&out, "QCOW2_CHECK held "),
        Some("0"),
        "qemu-img check"
    );
    assert_eq!(
        value(&out, "QCOW2_SHA256_4M held "),
        value(&out, "WROTE_SHA256 "),
        "the image lost what the guest wrote"
    );
}

/// A disk of a comparison test; the file's extension is its format.
struct CompareDisk {
    id: &'static str,
    file: &'static str,
    controller: &'static str,
    /// A `serial = ...` line, or nothing (compare derives one from the id).
    serial: &'static str,
    cache: &'static str,
    aio: &'static str,
}

/// A disk with a derived serial.
const fn compare_disk(
    id: &'static str,
    file: &'static str,
    controller: &'static str,
    cache: &'static str,
    aio: &'static str,
) -> CompareDisk {
    CompareDisk {
        id,
        file,
        controller,
        serial: "",
        cache,
        aio,
    }
}

/// The `read:`/`write:` lines `--disk-stats` printed for disk `id`.
fn disk_stats(out: &str, id: &str) -> String {
    out.lines()
        .skip_while(|l| !l.contains(&format!("disk `{id}`:")))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The disks of the comparison test.
/// The second id is too long for a serial, so compare derives a hashed one.
const COMPARE_DISKS: [CompareDisk; 3] = [
    compare_disk("raw-none-uring", "a.raw", "virtio-blk", "none", "io_uring"),
    compare_disk(
        "raw-writeback-threads-disk",
        "b.raw",
        "virtio-blk",
        "writeback",
        "threads",
    ),
    CompareDisk {
        serial: "serial = \"QCOW2-SERIAL\"\n",
        ..compare_disk(
            "qcow2-none-uring",
            "c.qcow2",
            "virtio-blk",
            "none",
            "io_uring",
        )
    },
];
/// The jobs the compare test asks for (vmm/tests/rig/compare_job.sh passes
/// the same list): one read and one write job keep the two boots short,
/// which matters in the rig, where long guest runs now and then stall.
const COMPARE_JOBS: [&str; 2] = ["randread-4k-qd32", "randwrite-4k-qd32"];

/// IDE beside virtio-blk on equal settings (configs/compare-ide.toml in
/// small). IDE has one command in flight, so depth-1 jobs.
const COMPARE_IDE_DISKS: [CompareDisk; 2] = [
    compare_disk("ide-disk", "i.raw", "ide", "none", "io_uring"),
    compare_disk("virtio-disk", "v.raw", "virtio-blk", "none", "io_uring"),
];
const COMPARE_IDE_JOBS: [&str; 2] = ["randread-4k-qd1", "randwrite-4k-qd1"];

/// Columns of a `platter compare` table row: disk controller format cache
/// aio job platter_iops qemu_iops ratio platter_MiB/s qemu_MiB/s
/// platter_exits/io qemu_exits/io.
const COMPARE_COLUMNS: usize = 13;
const COL_PLATTER_IOPS: usize = 6;
const COL_QEMU_IOPS: usize = 7;
const COL_RATIO: usize = 8;
const COL_PLATTER_EXITS: usize = 11;
const COL_QEMU_EXITS: usize = 12;

fn compare_config(disks: &[CompareDisk]) -> String {
    let repo = repo();
    let mut t = format!(
        "[machine]\nvcpus = {DISK_TEST_VCPUS}\nmemory = \"{MEMORY_MIB}M\"\n\n[kernel]\n\
         path = \"{k}\"\ninitramfs = \"{i}\"\ncmdline = \"console=ttyS0 quiet\"\n\n",
        k = repo.join("guests/cache/kernel/vmlinuz").display(),
        i = repo.join("guests/cache/l2/initramfs.cpio.gz").display(),
    );
    for d in disks {
        t += &format!(
            "[[disk]]\nid = \"{}\"\npath = \"@WORK@/{}\"\nformat = \"{}\"\n\
             controller = \"{}\"\ncache = \"{}\"\naio = \"{}\"\n{}\n",
            d.id,
            d.file,
            d.file.rsplit('.').next().unwrap(),
            d.controller,
            d.cache,
            d.aio,
            d.serial
        );
    }
    t
}

/// Run `platter compare` with QEMU in the rig on these disks and jobs
/// (vmm/tests/rig/compare_job.sh), check that it exits 0 with the header it
/// owes, and return its output with the chart and JSON files.
fn run_compare(name: &str, disks: &[CompareDisk], jobs: &[&str]) -> (String, PathBuf, PathBuf) {
    let dir = repo().join("guests/cache/tests");
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join(format!("{name}.toml"));
    std::fs::write(&template, compare_config(disks)).unwrap();
    let (chart, json) = (
        dir.join(format!("{name}.svg")),
        dir.join(format!("{name}.json")),
    );
    for f in [&chart, &json] {
        let _ = std::fs::remove_file(f);
    }
    let job = format!(
        "bash vmm/tests/rig/compare_job.sh '{}' '{}' '{}' '{}' '{}'",
        env!("CARGO_BIN_EXE_platter"),
        template.display(),
        chart.display(),
        json.display(),
        jobs.join(",")
    );
    let (rc, out) = in_rig(&job);
    assert_eq!(rc, 0, "the rig job failed");
    assert_eq!(
        value(&out, "BADJOBS_RC "),
        Some("2"),
        "a bad --jobs is a usage error"
    );
    assert_eq!(
        value(&out, "COMPARE_RC "),
        Some("0"),
        "platter compare must exit 0"
    );
    assert!(
        out.contains("only the ratios"),
        "the header must say how far to trust it"
    );
    assert!(
        !out.contains("exits/io not measured"),
        "the rig's L1 mounts debugfs: exits per I/O must be measured"
    );
    (out, chart, json)
}

/// The table row of disk `id`, job `job`, cut into cells.
fn compare_row<'a>(out: &'a str, id: &str, job: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() == COMPARE_COLUMNS && c[0] == id && c[5] == job)
        .unwrap_or_else(|| panic!("no table row for {id} {job}"))
}

/// A table cell's number, when it is one above zero.
fn positive(cell: &str) -> Option<f64> {
    cell.parse::<f64>().ok().filter(|v| *v > 0.0)
}

/// Both VMMs' IOPS and exits per I/O in a row are numbers above zero.
fn assert_measured(row: &[&str]) {
    let what = format!("{} {}", row[0], row[5]);
    for (col, name) in [
        (COL_PLATTER_IOPS, "Platter IOPS"),
        (COL_QEMU_IOPS, "QEMU IOPS"),
        (COL_RATIO, "ratio"),
        (COL_PLATTER_EXITS, "Platter exits/IO"),
        (COL_QEMU_EXITS, "QEMU exits/IO"),
    ] {
        assert!(
            positive(row[col]).is_some(),
            "{name} for {what}: {}",
            row[col]
        );
    }
}

#[test]
fn compare_measures_every_disk_and_job_under_platter_and_qemu() {
    if !enabled() {
        return;
    }
    let (out, chart, json) = run_compare("compare", &COMPARE_DISKS, &COMPARE_JOBS);
    for d in &COMPARE_DISKS {
        for job in COMPARE_JOBS {
            let row = compare_row(&out, d.id, job);
            assert_eq!((row[1], row[3], row[4]), (d.controller, d.cache, d.aio));
            assert_measured(&row);
        }
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{} ({}, ", d.id, d.controller))
                    && l.contains("Platter/QEMU IOPS")),
            "summary line for {}",
            d.id
        );
    }
    assert!(
        !out.contains("IDE/virtio-blk under"),
        "no IDE disk, no controller gap"
    );
    // Platter's guest RAM starts on 2 MiB boundaries with MADV_HUGEPAGE (L1 has THP), so
    // KVM maps at least part of it with 2 MiB pages (all of it with 4 KiB ones before).
    let huge = out.lines().find_map(|l| {
        l.trim_start()
            .strip_prefix("platter")?
            .trim_start()
            .strip_prefix("guest memory: KVM maps ")?
            .split(' ')
            .next()?
            .parse::<u64>()
            .ok()
    });
    assert!(
        huge.is_some_and(|mib| mib > 0),
        "KVM maps none of Platter's guest RAM with 2 MiB pages: {huge:?}"
    );

    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    assert!(svg.starts_with("<svg"), "not an SVG");
    assert!(svg.trim_end().ends_with("</svg>"), "SVG cut short");
    let bars = COMPARE_DISKS.len() * COMPARE_JOBS.len() * 2;
    assert_eq!(svg.matches("<rect").count(), bars, "one rect per bar");
    assert_eq!(svg.matches("<rect").count(), svg.matches("</rect>").count());
    let numbers = std::fs::read_to_string(&json).expect("the JSON was written");
    assert_eq!(numbers.matches("\"job\": ").count(), bars / 2);
    assert_eq!(numbers.matches("\"exits_per_io\": ").count(), bars);
    // Host CPU per I/O, for both VMMs: the vCPU threads found by name (Platter's `vcpu0`,
    // QEMU's `CPU 0/KVM`), so their share is above 0, and the rest measured too.
    for key in ["\"vmm_cpu_us_per_io\": ", "\"vcpu_cpu_us_per_io\": "] {
        let values: Vec<&str> = numbers
            .split(key)
            .skip(1)
            .map(|rest| rest.split([',', '}']).next().unwrap_or(""))
            .collect();
        assert_eq!(values.len(), bars, "{key} per sample");
        assert!(
            values
                .iter()
                .all(|v| v.parse::<f64>().is_ok_and(|x| x > 0.0)),
            "{key}: {values:?}"
        );
    }
    assert!(out.contains("Host CPU per I/O outside the vCPUs"), "{out}");
}

/// IDE under Platter and under QEMU (PIIX IDE on the `pc` machine), beside
/// virtio-blk: every number measured, and IDE's exits per I/O above
/// virtio-blk's (several port I/O exits per ATA command against about one
/// notification per request): a property of the devices, not a timing.
#[test]
fn compare_ide_beside_virtio_blk() {
    if !enabled() {
        return;
    }
    let (out, _, json) = run_compare("compare-ide", &COMPARE_IDE_DISKS, &COMPARE_IDE_JOBS);
    for d in &COMPARE_IDE_DISKS {
        for job in COMPARE_IDE_JOBS {
            let row = compare_row(&out, d.id, job);
            assert_eq!((row[1], row[3], row[4]), (d.controller, d.cache, d.aio));
            assert_measured(&row);
        }
    }
    let (ide, virtio) = (COMPARE_IDE_DISKS[0].id, COMPARE_IDE_DISKS[1].id);
    for job in COMPARE_IDE_JOBS {
        for (col, who) in [(COL_PLATTER_EXITS, "Platter"), (COL_QEMU_EXITS, "QEMU")] {
            let exits = |id| positive(compare_row(&out, id, job)[col]).unwrap();
            assert!(
                exits(ide) > exits(virtio),
                "{who} {job}: IDE {} exits/IO, virtio-blk {}",
                exits(ide),
                exits(virtio)
            );
        }
    }
    for who in ["Platter", "QEMU"] {
        assert!(
            out.lines().any(
                |l| l.starts_with(&format!("IDE/virtio-blk under {who}: IOPS "))
                    && l.contains("raw, cache=none, aio=io_uring")
            ),
            "controller gap line under {who}"
        );
    }
    let numbers = std::fs::read_to_string(&json).expect("the JSON was written");
    assert!(numbers.contains("\"exit_counts\": true"), "{numbers}");
}

/// IDE drive models the guest finds its disks by.
const IDE_ROOT: &str = "Platter root";

fn ide_disk(id: &str, file: &str, channel: u8, unit: u8, extra: &str) -> String {
    format!(
        "[[disk]]\nid = \"{id}\"\npath = \"@WORK@/{file}\"\nformat = \"raw\"\n\
         controller = \"ide\"\nchannel = {channel}\nunit = {unit}\n{extra}\n"
    )
}

#[test]
fn ide_root_disks_and_cdrom_with_ata_piix() {
    if !enabled() {
        return;
    }
    let mut t = guest_header(
        DISK_TEST_VCPUS,
        "ata_piix,sd_mod,sr_mod,isofs",
        "LABEL=platter-root",
    );
    t += &ide_disk(
        "root",
        "root.ext4",
        0,
        0,
        &format!("model = \"{IDE_ROOT}\"\nserial = \"IDE-ROOT\""),
    );
    t += &ide_disk(
        "data1",
        "data1.raw",
        0,
        1,
        "model = \"Platter data1\"\nserial = \"IDE-DATA1\"\ncache = \"none\"\naio = \"io_uring\"",
    );
    t += &ide_disk("cd", "test.iso", 1, 0, "media = \"cdrom\"");
    // data2's image is on the 8 MiB file system: after its fio verify the
    // guest writes past the end of the space (the error path).
    t += &ide_disk(
        "data2",
        "data2.raw",
        1,
        1,
        "model = \"Platter data2\"\nserial = \"IDE-DATA2\"\ncache = \"writeback\"\naio = \"threads\"\n\
         physical_block_size = 4096",
    );
    let t = t.replace("@WORK@/data2.raw", "@SMALL@/data2.raw");
    let out = disk_job("ide.toml", &t, "vmm/tests/rig/ide_guest.sh");

    let root = value(&out, "ROOT ").unwrap();
    assert!(root.starts_with("ext4 sd"), "root on an IDE disk: {root}");
    assert_eq!(value(&out, "DRIVER "), Some("ata_piix"));
    // Four ATA/ATAPI devices run an Ultra DMA mode (UDMA/33: PIIX4 has a
    // 40-wire cable, as on real boards), and dmesg announced UDMA/100 drives.
    let udma = out
        .lines()
        .filter(|l| l.trim_end().starts_with("XFER XFER_UDMA_"))
        .count();
    assert_eq!(udma, 4, "devices in a UDMA mode");
    let announced: u32 = value(&out, "DMESG_MAX ").unwrap().parse().unwrap();
    assert!(announced >= 4, "dmesg lines with UDMA/100: {announced}");
    let disk = |m: &str| value(&out, &format!("DISK {m} ")).unwrap().to_string();
    let fields = |m: &str| {
        disk(m)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(fields("Platter_data1")[1..], ["65536", "IDE-DATA1"]);
    assert_eq!(fields("Platter_data2")[1..], ["65536", "IDE-DATA2"]);
    assert_eq!(fields("Platter_root")[2], "IDE-ROOT");
    // IDENTIFY word 106 carries the configured physical sector size.
    assert_eq!(value(&out, "BLOCKSIZES Platter_data1 "), Some("512 512"));
    assert_eq!(value(&out, "BLOCKSIZES Platter_data2 "), Some("512 4096"));
    assert_eq!(
        value(&out, "FIO Platter_data1 "),
        Some("0"),
        "fio verify on data1"
    );
    assert_eq!(
        value(&out, "FIO Platter_data2 "),
        Some("0"),
        "fio verify on data2"
    );

    assert_eq!(value(&out, "CACHE_BEFORE "), Some("write_back"));
    assert_eq!(
        value(&out, "CACHE_OFF "),
        Some("write_through"),
        "WCE off must reach the disk"
    );
    assert_eq!(value(&out, "FIO cache_off "), Some("0"));
    assert_eq!(value(&out, "CACHE_ON "), Some("write_back"));

    assert_error_path(&out);

    assert_eq!(value(&out, "CD_MOUNT "), Some("0"));
    let sha = value(&out, "ISO_SHA256 ").expect("job made the ISO");
    assert_eq!(
        value(&out, "CD_SHA256 "),
        Some(sha),
        "file on the CD differs"
    );
    let sectors: u64 = value(&out, "CD_SIZE ").unwrap().parse().unwrap();
    assert!(sectors >= 2048, "CD capacity {sectors} sectors");
}
