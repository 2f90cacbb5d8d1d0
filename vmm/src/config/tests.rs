//! Every rejection `Config` can give has a test here.

use super::*;

const GOOD: &str = r#"
[machine]
vcpus = 2
memory = "512M"

[kernel]
path = "vmlinuz"
initramfs = "initrd.img"
cmdline = "console=ttyS0 quiet"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", &[])
}

/// A config whose kernel and initramfs exist (in a temp dir).
fn on_disk(text: &str) -> (tempdir::Dir, Config) {
    let dir = tempdir::Dir::new();
    std::fs::write(dir.0.join("vmlinuz"), b"k").unwrap();
    std::fs::write(dir.0.join("initrd.img"), b"i").unwrap();
    let path = dir.0.join("vm.toml");
    std::fs::write(&path, text).unwrap();
    let mut cfg = Config::parse(text, "vm.toml", &[]).unwrap();
    cfg.source = path;
    cfg.resolve_paths();
    (dir, cfg)
}

mod tempdir {
    /// A temporary folder removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "platter-cfg-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const PLENTY: HostLimits = HostLimits {
    memory_bytes: Some(64 << 30),
};

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.machine.vcpus, 2);
    assert_eq!(c.machine.memory.mib(), 512);
    assert_eq!(c.machine.on_reboot, OnReboot::Exit);
    assert_eq!(c.serial.mode, SerialMode::Stdio);
    assert!(c.disks.is_empty());
    let (_d, c) = on_disk(GOOD);
    c.validate(&PLENTY).unwrap();
}

#[test]
fn memory_accepts_mib_integers_and_suffixes() {
    assert_eq!(MemorySize::parse("2G").unwrap().mib(), 2048);
    assert_eq!(MemorySize::parse("65536K").unwrap().mib(), 64);
    assert!(MemorySize::parse("lots").is_err());
    assert!(MemorySize::parse("99999999999T").is_err());
    let c = parse(&GOOD.replace("\"512M\"", "1024")).unwrap();
    assert_eq!(c.machine.memory.mib(), 1024);
}

#[test]
fn unknown_key_names_the_key() {
    let e = parse(&GOOD.replace("vcpus = 2", "vcpu = 2")).unwrap_err();
    assert_eq!(e.file, "test.toml");
    assert!(e.key.starts_with("machine.vcpu"), "{e}");
    assert!(e.message.contains("unknown field `vcpu`"), "{e}");
}

#[test]
fn unknown_table_is_refused() {
    let e = parse(&format!("{GOOD}\n[gpu]\nx = 1\n")).unwrap_err();
    assert!(e.message.contains("unknown field `gpu`"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let e = parse(&GOOD.replace("vcpus = 2", "vcpus = \"two\"")).unwrap_err();
    assert!(e.key.starts_with("machine.vcpus"), "{e}");
    assert!(e.message.contains("invalid type"), "{e}");
}

#[test]
fn iothread_of_the_wrong_type_names_the_key() {
    for v in ["5", "[\"a\", 2]"] {
        let e = parse(&format!("{GOOD}{DISK}iothread = {v}\n")).unwrap_err();
        assert!(e.key.contains("iothread"), "{v}: {e}");
        assert!(e.message.contains("a thread name or a list"), "{v}: {e}");
    }
}

#[test]
fn syntax_error_names_the_line() {
    let e = parse("[machine\nvcpus = 1").unwrap_err();
    assert!(e.key.contains("line 1"), "{e}");
}

#[test]
fn missing_kernel_table_is_refused() {
    let e = parse("[machine]\nvcpus = 1\n").unwrap_err();
    assert!(e.message.contains("missing field `kernel`"), "{e}");
}

#[test]
fn vcpus_out_of_range() {
    for n in [0, 255, 1000] {
        let (_d, c) = on_disk(&GOOD.replace("vcpus = 2", &format!("vcpus = {n}")));
        let e = c.validate(&PLENTY).unwrap_err();
        assert_eq!(e.key, "machine.vcpus");
        assert!(e.message.contains("between 1 and 254"), "{e}");
    }
}

#[test]
fn memory_too_small_or_too_large() {
    let (_d, c) = on_disk(&GOOD.replace("\"512M\"", "\"16M\""));
    assert_eq!(c.validate(&PLENTY).unwrap_err().key, "machine.memory");
    let (_d, c) = on_disk(GOOD);
    let tiny = HostLimits {
        memory_bytes: Some(256 << 20),
    };
    let e = c.validate(&tiny).unwrap_err();
    assert_eq!(e.key, "machine.memory");
    assert!(e.message.contains("more than this host can give"), "{e}");
}

#[test]
fn missing_kernel_or_initramfs_file() {
    let (d, c) = on_disk(GOOD);
    std::fs::remove_file(d.0.join("initrd.img")).unwrap();
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "kernel.initramfs");
    std::fs::remove_file(d.0.join("vmlinuz")).unwrap();
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "kernel.path");
    assert!(e.message.contains("cannot open"), "{e}");
}

#[test]
fn relative_paths_follow_the_config_file() {
    let (d, c) = on_disk(GOOD);
    assert_eq!(c.kernel.path, d.0.join("vmlinuz"));
}

#[test]
fn cmdline_too_long() {
    let long = "x".repeat(MAX_CMDLINE_LEN);
    let (_d, c) = on_disk(&GOOD.replace("console=ttyS0 quiet", &long));
    assert_eq!(c.validate(&PLENTY).unwrap_err().key, "kernel.cmdline");
}

#[test]
fn serial_file_needs_a_path() {
    let (_d, c) = on_disk(&format!("{GOOD}\n[serial]\nmode = \"file\"\n"));
    assert_eq!(c.validate(&PLENTY).unwrap_err().key, "serial.path");
    let e = parse(&format!("{GOOD}\n[serial]\nmode = \"pipe\"\n")).unwrap_err();
    assert!(e.key.starts_with("serial.mode"), "{e}");
}

const DISK: &str = r#"
[[disk]]
id = "data"
path = "data.img"
format = "raw"
controller = "virtio-blk"
cache = "none"
aio = "io_uring"
"#;

#[test]
fn virtio_blk_disk_is_accepted_and_others_refused_for_now() {
    let c = parse(&format!("{GOOD}{DISK}")).unwrap();
    assert_eq!(c.disks[0].controller, Controller::VirtioBlk);
    assert_eq!(c.disks[0].cache, CacheMode::None);
    assert_eq!(c.disks[0].aio, AioMode::IoUring);
    let (d, c) = on_disk(&format!("{GOOD}{DISK}"));
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "disk[0].path", "the image does not exist yet");
    std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
    c.validate(&PLENTY).unwrap();
    let (d, c) = on_disk(&format!("{GOOD}{}", DISK.replace("virtio-blk", "ahci")));
    std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "disk[0].controller");
    assert!(e.message.contains("not supported yet"), "{e}");
    for extra in ["media = \"cdrom\"", "model = \"x\""] {
        let (d, c) = on_disk(&format!("{GOOD}{DISK}{extra}\n"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        let e = c.validate(&PLENTY).unwrap_err();
        assert!(e.message.contains("not supported for controller"), "{e}");
    }
    let (d, c) = on_disk(&format!("{GOOD}{DISK}serial = \"{}\"\n", "x".repeat(21)));
    std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
    assert_eq!(c.validate(&PLENTY).unwrap_err().key, "disk[0].serial");
}

#[test]
fn disk_bad_values_are_refused() {
    let e = parse(&format!(
        "{GOOD}{}",
        DISK.replace("\"none\"", "\"sometimes\"")
    ))
    .unwrap_err();
    assert!(e.key.starts_with("disk.cache"), "{e}");
    let e = parse(&format!("{GOOD}{}", DISK.replace("virtio-blk", "floppy"))).unwrap_err();
    assert!(e.key.starts_with("disk.controller"), "{e}");
    let (_d, c) = on_disk(&format!(
        "{GOOD}{}",
        DISK.replace("\"none\"", "\"writeback\"")
            .replace("io_uring", "native")
    ));
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "disk[0].aio");
    assert!(e.message.contains("O_DIRECT"), "{e}");
}

#[test]
fn passthrough_is_refused_for_now() {
    let (_d, c) = on_disk(&format!(
        "{GOOD}\n[[passthrough]]\nid = \"nvme\"\nhost = \"0000:01:00.0\"\n"
    ));
    let e = c.validate(&PLENTY).unwrap_err();
    assert_eq!(e.key, "passthrough[0]");
    assert!(e.message.contains("not supported yet"), "{e}");
}

#[test]
fn overrides_apply_before_parsing() {
    let c = Config::parse(
        GOOD,
        "t",
        &[
            "machine.vcpus=4".into(),
            "kernel.cmdline=console=ttyS0 rig.cmd=abc".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.machine.vcpus, 4);
    assert_eq!(c.kernel.cmdline, "console=ttyS0 rig.cmd=abc");
    let e = Config::parse(GOOD, "t", &["machine.vcpus".into()]).unwrap_err();
    assert!(e.key.contains("--set"), "{e}");
}

#[test]
fn overrides_index_arrays_of_tables() {
    let text = format!(
        "{GOOD}\n[[disk]]\nid = \"a\"\npath = \"a.raw\"\ncontroller = \"virtio-blk\"\n\
         [[disk]]\nid = \"b\"\npath = \"b.raw\"\ncontroller = \"virtio-blk\"\n"
    );
    let c = Config::parse(&text, "t", &["disk.1.serial=\"B-SERIAL\"".into()]).unwrap();
    assert_eq!(c.disks[0].serial, None);
    assert_eq!(c.disks[1].serial.as_deref(), Some("B-SERIAL"));
    for bad in ["disk.2.serial=x", "disk.serial=x", "disk.one.serial=x"] {
        let e = Config::parse(&text, "t", &[bad.into()]).unwrap_err();
        assert!(e.key.contains("--set"), "{bad}: {e}");
    }
}

#[test]
fn load_reports_unreadable_file() {
    let e = Config::load(Path::new("/nonexistent/vm.toml"), &[]).unwrap_err();
    assert_eq!(e.key, "file");
    assert_eq!(e.to_string().lines().count(), 1);
}

#[test]
fn disk_ranges_are_checked() {
    for (k, v) in [
        ("num_queues", "0"),
        ("num_queues", "65"),
        ("queue_size", "100"),
        ("queue_size", "2048"),
        ("logical_block_size", "1000"),
        ("physical_block_size", "256"),
        ("channel", "2"),
        ("unit", "3"),
    ] {
        let (_d, c) = on_disk(&format!("{GOOD}{DISK}{k} = {v}\n"));
        assert_eq!(c.validate(&PLENTY).unwrap_err().key, format!("disk[0].{k}"));
    }
    let (_d, c) = on_disk(&format!("{GOOD}{DISK}{DISK}"));
    assert_eq!(c.validate(&PLENTY).unwrap_err().key, "disk[1].id");
}

#[test]
fn iothread_and_block_sizes_per_controller() {
    let ok = [
        (DISK.to_string(), "iothread = \"io-0_a\""),
        (DISK.to_string(), "iothread = [\"io0\"]"),
        (
            DISK.to_string(),
            "num_queues = 4\niothread = [\"io0\", \"io1\"]",
        ),
        (
            DISK.to_string(),
            "logical_block_size = 4096\nphysical_block_size = 4096",
        ),
        (ide_disk("a", ""), "physical_block_size = 4096"),
        (ide_disk("a", ""), "logical_block_size = 512"),
    ];
    for (disk, extra) in ok {
        let (d, c) = on_disk(&format!("{GOOD}{disk}{extra}\n"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        c.validate(&PLENTY)
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    let bad = [
        (DISK.to_string(), "iothread = \"a b\"", "iothread"),
        (DISK.to_string(), "iothread = \"\"", "iothread"),
        (DISK.to_string(), "iothread = []", "iothread"),
        (
            DISK.to_string(),
            "num_queues = 2\niothread = [\"a\", \"a\"]",
            "iothread",
        ),
        (DISK.to_string(), "iothread = [\"a\", \"b\"]", "iothread"),
        (
            DISK.to_string(),
            "iothread = \"sixteen-chars-xx\"",
            "iothread",
        ),
        (ide_disk("a", ""), "iothread = \"io0\"", "iothread"),
        (
            ide_disk("a", ""),
            "logical_block_size = 4096",
            "logical_block_size",
        ),
        (
            ide_disk("a", "media = \"cdrom\""),
            "physical_block_size = 4096",
            "physical_block_size",
        ),
    ];
    for (disk, extra, key) in bad {
        let (d, c) = on_disk(&format!("{GOOD}{disk}{extra}\n"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        let e = c.validate(&PLENTY).unwrap_err();
        assert_eq!(e.key, format!("disk[0].{key}"), "{extra}: {e}");
    }
}

fn ide_disk(id: &str, extra: &str) -> String {
    format!("[[disk]]\nid = \"{id}\"\npath = \"data.img\"\ncontroller = \"ide\"\n{extra}\n")
}

#[test]
fn ide_disks_take_ide_keys_and_four_positions() {
    let check = |disks: &str| {
        let (d, c) = on_disk(&format!("{GOOD}{disks}"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        c.validate(&PLENTY)
    };
    check(&format!(
        "{}{}",
        ide_disk(
            "a",
            "model = \"Platter HD\"\nserial = \"A1\"\nchannel = 1\nunit = 1"
        ),
        ide_disk("cd", "media = \"cdrom\"")
    ))
    .unwrap();
    let five: String = (0..5).map(|i| ide_disk(&format!("d{i}"), "")).collect();
    assert_eq!(check(&five).unwrap_err().key, "disk[4].controller");
    let twice = format!(
        "{}{}",
        ide_disk("a", "channel = 0\nunit = 1"),
        ide_disk("b", "unit = 1")
    );
    assert_eq!(check(&twice).unwrap_err().key, "disk[1].unit");
    let e = check(&ide_disk("a", "num_queues = 2")).unwrap_err();
    assert_eq!(e.key, "disk[0].num_queues");
    let e = check(&ide_disk("a", "request_merging = false")).unwrap_err();
    assert_eq!(e.key, "disk[0].request_merging");
    let e = check(&ide_disk("a", &format!("model = \"{}\"", "m".repeat(41)))).unwrap_err();
    assert_eq!(e.key, "disk[0].model");
    let e = check(&ide_disk("a", "serial = \"bad\u{00e9}\"")).unwrap_err();
    assert_eq!(e.key, "disk[0].serial");
}

#[test]
fn throttle_limits_per_disk_and_per_group() {
    let group = "[[throttle_group]]\nid = \"slow\"\niops_total = 100\nbps_total_max = 2000000\nbps_total = 1000000\n";
    let ok = [
        format!("{GOOD}{DISK}[disk.throttle]\niops_read = 10\niops_read_max = 20\n"),
        format!("{GOOD}{group}{DISK}throttle_group = \"slow\"\n"),
    ];
    for text in ok {
        let (d, c) = on_disk(&text);
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        c.validate(&PLENTY)
            .unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    let bad = [
        (
            format!("{GOOD}{DISK}[disk.throttle]\niops_reed = 10\n"),
            "disk[0].throttle.iops_reed",
        ),
        (
            format!("{GOOD}{DISK}[disk.throttle]\nbps_total = 10\nbps_read = 5\n"),
            "disk[0].throttle.bps_total",
        ),
        (
            format!("{GOOD}{DISK}throttle_group = \"nope\"\n"),
            "disk[0].throttle_group",
        ),
        (
            format!(
                "{GOOD}{group}{DISK}throttle_group = \"slow\"\n[disk.throttle]\niops_read = 1\n"
            ),
            "disk[0].throttle_group",
        ),
        (format!("{GOOD}{group}{group}"), "throttle_group[1].id"),
        (
            format!("{GOOD}[[throttle_group]]\nid = \"g\"\niops_total = 5\niops_total_max = 2\n"),
            "throttle_group[0].iops_total_max",
        ),
    ];
    for (text, key) in bad {
        let (d, c) = on_disk(&text);
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        let e = c.validate(&PLENTY).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

#[test]
fn l2_cache_size_is_for_qcow2_and_bounded() {
    let qcow2 = DISK.replace("format = \"raw\"", "format = \"qcow2\"");
    let detected = DISK.replace("format = \"raw\"\n", "");
    for (disk, v) in [(&qcow2, "\"1M\""), (&qcow2, "64"), (&detected, "\"64K\"")] {
        let (d, c) = on_disk(&format!("{GOOD}{disk}l2_cache_size = {v}\n"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        c.validate(&PLENTY).unwrap_or_else(|e| panic!("{v}: {e}"));
    }
    assert_eq!(
        parse(&format!("{GOOD}{qcow2}l2_cache_size = \"1M\"\n"))
            .unwrap()
            .disks[0]
            .l2_cache_size,
        Some(MemorySize(1 << 20))
    );
    for (disk, v, why) in [
        (DISK, "\"1M\"", "only qcow2"),
        (&qcow2, "\"32K\"", "from 64K to 4G"),
        (&qcow2, "\"5G\"", "from 64K to 4G"),
    ] {
        let (d, c) = on_disk(&format!("{GOOD}{disk}l2_cache_size = {v}\n"));
        std::fs::write(d.0.join("data.img"), [0u8; 512]).unwrap();
        let e = c.validate(&PLENTY).unwrap_err();
        assert_eq!(e.key, "disk[0].l2_cache_size", "{v}: {e}");
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn iothread_tables_set_polling_and_are_checked() {
    let (_d, c) = on_disk(&format!(
        "{GOOD}[[iothread]]\nid = \"io0\"\npoll_max_ns = 32768\n[[iothread]]\nid = \"io1\"\n"
    ));
    c.validate(&PLENTY).unwrap();
    let polls: Vec<(&str, u64)> = c
        .iothreads
        .iter()
        .map(|t| (t.id.as_str(), t.poll_max_ns))
        .collect();
    assert_eq!(
        polls,
        [("io0", 32_768), ("io1", 0)],
        "no polling when unset"
    );
    let bad = [
        ("id = \"a b\"", "iothread[0].id"),
        ("id = \"io0\"\n[[iothread]]\nid = \"io0\"", "iothread[1].id"),
        (
            "id = \"io0\"\npoll_max_ns = 1000001",
            "iothread[0].poll_max_ns",
        ),
    ];
    for (table, key) in bad {
        let (_d, c) = on_disk(&format!("{GOOD}[[iothread]]\n{table}\n"));
        let e = c.validate(&PLENTY).unwrap_err();
        assert_eq!(e.key, key, "{table}: {e}");
    }
    let e = parse(&format!("{GOOD}[[iothread]]\nid = \"io0\"\npoll = 5\n")).unwrap_err();
    assert!(e.to_string().contains("poll"), "{e}");
}
