//! The QEMU command line that boots the same guest with the same disks, for
//! the side-by-side numbers. Cache and aio modes have QEMU's names already;
//! every disk gets its own I/O thread, as Platter gives it.

use std::path::Path;

use crate::config::{AioMode, CacheMode, Config, Controller, DiskConfig, DiskFormat};

use super::plan::Subject;

/// The QEMU binary looked up on PATH.
pub const QEMU: &str = "qemu-system-x86_64";
/// Platter's defaults for what a `[[disk]]` leaves out.
const DEFAULT_QUEUES: u16 = 1;
const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Where `qemu-system-x86_64` is, if on PATH.
pub fn find() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(QEMU))
            .find(|p| p.is_file())
    })
}

/// QEMU's `-m` value for a size in bytes.
fn memory_arg(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// A path inside a QEMU option list: commas are doubled.
fn escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// QEMU's `cache=` word.
pub fn cache_name(c: CacheMode) -> &'static str {
    match c {
        CacheMode::Writeback => "writeback",
        CacheMode::None => "none",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Directsync => "directsync",
        CacheMode::Unsafe => "unsafe",
    }
}

/// QEMU's `aio=` word.
pub fn aio_name(a: AioMode) -> &'static str {
    match a {
        AioMode::Threads => "threads",
        AioMode::Native => "native",
        AioMode::IoUring => "io_uring",
    }
}

/// The format's name (config and QEMU agree).
pub fn format_name(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// `-object iothread`, `-drive` and `-device` arguments for disk number `n`.
pub fn disk_args(
    n: usize,
    d: &DiskConfig,
    format: DiskFormat,
    serial: Option<&str>,
) -> Result<Vec<String>, String> {
    let (io, drive) = (format!("io{n}"), format!("d{n}"));
    let on_off = |b: bool| if b { "on" } else { "off" };
    let drive_opts = format!(
        "file={},if=none,id={drive},format={},cache={},aio={},discard={},readonly={}",
        escape(&d.path),
        format_name(format),
        cache_name(d.cache),
        aio_name(d.aio),
        if d.discard { "unmap" } else { "ignore" },
        on_off(d.readonly),
    );
    let mut props = String::new();
    if let Some(s) = serial {
        props += &format!(",serial={s}");
    }
    if let Some(b) = d.logical_block_size {
        props += &format!(",logical_block_size={b}");
    }
    if let Some(b) = d.physical_block_size {
        props += &format!(",physical_block_size={b}");
    }
    let mut args = vec!["-object".into(), format!("iothread,id={io}")];
    args.extend(["-drive".into(), drive_opts]);
    match d.controller {
        Controller::VirtioBlk => args.extend([
            "-device".into(),
            format!(
                "virtio-blk-pci,drive={drive},iothread={io},num-queues={},queue-size={}{props}",
                d.num_queues.unwrap_or(DEFAULT_QUEUES),
                d.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            ),
        ]),
        Controller::VirtioScsi => args.extend([
            "-device".into(),
            format!(
                "virtio-scsi-pci,id=scsi{n},iothread={io},num_queues={},virtqueue_size={}",
                d.num_queues.unwrap_or(DEFAULT_QUEUES),
                d.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            ),
            "-device".into(),
            format!("scsi-hd,drive={drive},bus=scsi{n}.0{props}"),
        ]),
        Controller::Ahci => args.extend([
            "-device".into(),
            format!("ahci,id=ahci{n}"),
            "-device".into(),
            format!("ide-hd,drive={drive},bus=ahci{n}.0{props}"),
        ]),
        Controller::UsbStorage => args.extend([
            "-device".into(),
            format!("qemu-xhci,id=xhci{n}"),
            "-device".into(),
            format!("usb-storage,drive={drive},bus=xhci{n}.0{props}"),
        ]),
        // Q35 has no PIIX IDE function to hang the disk on.
        Controller::Ide => {
            return Err(format!(
                "disk `{}`: no QEMU equivalent is built for controller `ide` yet",
                d.id
            ))
        }
    }
    if matches!(d.controller, Controller::Ahci | Controller::UsbStorage) {
        // These controllers have no I/O thread in QEMU; drop the object.
        args.drain(..2);
    }
    Ok(args)
}

/// The whole QEMU argument list (without the binary) for `cfg` booted with
/// `cmdline`. Disks not measured (the root) keep their own serial.
pub fn args(cfg: &Config, subjects: &[Subject], cmdline: &str) -> Result<Vec<String>, String> {
    let mut a: Vec<String> = [
        "-machine",
        "q35,accel=kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-smp".into(),
        cfg.machine.vcpus.to_string(),
        "-m".into(),
        memory_arg(cfg.machine.memory.0),
        "-kernel".into(),
        cfg.kernel.path.display().to_string(),
    ]);
    if let Some(i) = &cfg.kernel.initramfs {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    a.extend(["-append".into(), cmdline.to_string()]);
    for (n, d) in cfg.disks.iter().enumerate() {
        let subject = subjects.iter().find(|s| s.index == n);
        let format = match (subject, d.format) {
            (Some(s), _) => s.format,
            (None, Some(f)) => f,
            (None, None) => super::plan::format_of(&read_head(&d.path)),
        };
        let serial = subject.map(|s| s.serial.as_str()).or(d.serial.as_deref());
        a.extend(disk_args(n, d, format, serial)?);
    }
    Ok(a)
}

fn read_head(p: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = vec![0u8; 4];
    let n = std::fs::File::open(p)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    head.truncate(n);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(extra: &str) -> DiskConfig {
        let text = format!(
            "[kernel]\npath = \"k\"\n[[disk]]\nid = \"a\"\npath = \"/img/a,b.raw\"\n\
             controller = \"virtio-blk\"\n{extra}"
        );
        Config::parse(&text, "t", &[]).unwrap().disks.remove(0)
    }

    #[test]
    fn virtio_blk_disk_maps_every_option() {
        let d = disk(
            "cache = \"none\"\naio = \"io_uring\"\nnum_queues = 2\nqueue_size = 128\n\
             discard = true\nreadonly = false",
        );
        let a = disk_args(3, &d, DiskFormat::Qcow2, Some("SER-3")).unwrap();
        assert_eq!(
            a,
            vec![
                "-object",
                "iothread,id=io3",
                "-drive",
                "file=/img/a,,b.raw,if=none,id=d3,format=qcow2,cache=none,aio=io_uring,discard=unmap,readonly=off",
                "-device",
                "virtio-blk-pci,drive=d3,iothread=io3,num-queues=2,queue-size=128,serial=SER-3",
            ]
        );
    }

    #[test]
    fn defaults_match_platter() {
        let d = disk("discard = false\nreadonly = true");
        let a = disk_args(0, &d, DiskFormat::Raw, None).unwrap();
        assert!(
            a[3].ends_with("cache=writeback,aio=threads,discard=ignore,readonly=on"),
            "{}",
            a[3]
        );
        assert_eq!(
            a[5],
            "virtio-blk-pci,drive=d0,iothread=io0,num-queues=1,queue-size=256"
        );
        for (c, n) in [
            (CacheMode::Writethrough, "writethrough"),
            (CacheMode::Directsync, "directsync"),
            (CacheMode::Unsafe, "unsafe"),
        ] {
            assert_eq!(cache_name(c), n);
        }
        assert_eq!(aio_name(AioMode::Native), "native");
    }

    #[test]
    fn other_controllers() {
        let mut d = disk("");
        d.controller = Controller::Ahci;
        let a = disk_args(1, &d, DiskFormat::Raw, Some("S")).unwrap();
        assert_eq!(
            &a[2..],
            [
                "-device",
                "ahci,id=ahci1",
                "-device",
                "ide-hd,drive=d1,bus=ahci1.0,serial=S"
            ]
        );
        d.controller = Controller::VirtioScsi;
        let a = disk_args(1, &d, DiskFormat::Raw, None).unwrap();
        assert_eq!(a[0..2], ["-object", "iothread,id=io1"]);
        assert!(a[7].starts_with("scsi-hd,drive=d1,bus=scsi1.0"));
        d.controller = Controller::Ide;
        assert!(disk_args(1, &d, DiskFormat::Raw, None).is_err());
    }

    #[test]
    fn machine_arguments() {
        let text = "[machine]\nvcpus = 2\nmemory = \"512M\"\n[kernel]\npath = \"/k\"\ninitramfs = \"/i\"\n\
                    [[disk]]\nid = \"root\"\npath = \"/r\"\nformat = \"raw\"\ncontroller = \"virtio-blk\"\nserial = \"R\"\n\
                    [[disk]]\nid = \"x\"\npath = \"/x\"\nformat = \"raw\"\ncontroller = \"virtio-blk\"\n";
        let cfg = Config::parse(text, "t", &[]).unwrap();
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let a = args(&cfg, &subjects, "console=ttyS0").unwrap().join(" ");
        assert!(a.starts_with("-machine q35,accel=kvm -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot -smp 2 -m 512M -kernel /k -initrd /i -append console=ttyS0 "), "{a}");
        assert!(
            a.contains("id=d0,format=raw") && a.contains(",serial=R"),
            "{a}"
        );
        assert!(
            a.contains("drive=d1,iothread=io1,num-queues=1,queue-size=256,serial=x"),
            "{a}"
        );
        assert_eq!(memory_arg(3 << 19), "1536K");
    }
}
