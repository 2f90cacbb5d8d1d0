//! The QEMU command line that boots the same guest with the same disks, for
//! the side-by-side numbers. Cache and aio modes have QEMU's names already;
//! every virtio disk gets its own I/O thread, as Platter gives it, unless
//! disks name a shared one (`iothread = "NAME"`). IDE disks sit on the PIIX3
//! IDE function of QEMU's i440FX `pc` machine (q35 has none) at the channel
//! and unit Platter gives them.

use std::path::Path;

use platter_devices::virtio::io_poll;

use crate::config::{self, AioMode, CacheMode, Config, Controller, DiskConfig, DiskFormat, Media};

use super::plan::Subject;

/// The QEMU binary looked up on PATH.
pub const QEMU: &str = "qemu-system-x86_64";
/// Platter's defaults for what a `[[disk]]` leaves out.
const DEFAULT_QUEUES: u16 = 1;
const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The model strings Platter's IDE drives report unless `model` is set.
const DEFAULT_HD_MODEL: &str = "PLATTER HARDDISK";
const DEFAULT_CD_MODEL: &str = "PLATTER DVD-ROM";

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
    opt(&p.display().to_string())
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

/// Where a disk sits on QEMU's machine, decided over all disks at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The QEMU id of the I/O thread serving it (virtio only).
    pub iothread: Option<&'a str>,
    /// IDE (channel, unit), as Platter places it.
    pub ide: Option<(u8, u8)>,
}

/// The I/O thread a disk without an `iothread` name gets to itself.
fn own_iothread(n: usize) -> String {
    format!("io{n}")
}

/// QEMU's id for a named I/O thread: the name, unless it would not be a QEMU
/// id (those start with a letter) or could clash with [`own_iothread`].
fn named_iothread(name: &str) -> String {
    let auto = name
        .strip_prefix("io")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) && !auto {
        name.to_string()
    } else {
        format!("iothread-{name}")
    }
}

/// A value inside a QEMU option list: commas are doubled.
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

/// `-drive` and `-device` arguments for disk number `n` placed at `at`.
pub fn disk_args(
    n: usize,
    d: &DiskConfig,
    format: DiskFormat,
    serial: Option<&str>,
    at: Placement<'_>,
) -> Result<Vec<String>, String> {
    let drive = format!("d{n}");
    let on_off = |b: bool| if b { "on" } else { "off" };
    let drive_opts = format!(
        "file={},if=none,id={drive},format={},cache={},aio={},discard={},readonly={}",
        escape(&d.path),
        format_name(format),
        cache_name(d.cache),
        aio_name(d.aio),
        if d.discard { "unmap" } else { "ignore" },
        on_off(d.readonly || d.media == Media::Cdrom),
    );
    let drive_opts = match d.l2_cache_size {
        Some(size) if format == DiskFormat::Qcow2 => {
            format!("{drive_opts},l2-cache-size={}", size.0)
        }
        _ => drive_opts,
    };
    let mut props = String::new();
    if let Some(s) = serial {
        props += &format!(",serial={}", opt(s));
    }
    // IDE's logical blocks are 512 bytes in both VMMs (config enforces it).
    if let Some(b) = d
        .logical_block_size
        .filter(|_| d.controller != Controller::Ide)
    {
        props += &format!(",logical_block_size={b}");
    }
    if let Some(b) = d.physical_block_size {
        props += &format!(",physical_block_size={b}");
    }
    let needs = |what: &str| format!("disk `{}`: no {what} was decided for it", d.id);
    let mut args = vec!["-drive".to_string(), drive_opts];
    match d.controller {
        Controller::VirtioBlk => args.extend([
            "-device".into(),
            format!(
                "virtio-blk-pci,drive={drive},iothread={},num-queues={},queue-size={},\
                 request-merging={}{props}",
                at.iothread.ok_or_else(|| needs("I/O thread"))?,
                d.num_queues.unwrap_or(DEFAULT_QUEUES),
                d.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
                on_off(d.request_merging.unwrap_or(true)),
            ),
        ]),
        Controller::VirtioScsi => args.extend([
            "-device".into(),
            format!(
                "virtio-scsi-pci,id=scsi{n},iothread={},num_queues={},virtqueue_size={}",
                at.iothread.ok_or_else(|| needs("I/O thread"))?,
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
        // The PIIX3 IDE function of QEMU's `pc` machine: buses ide.0, ide.1.
        Controller::Ide => {
            let (channel, unit) = at.ide.ok_or_else(|| needs("IDE position"))?;
            let (kind, model) = match d.media {
                Media::Cdrom => ("ide-cd", DEFAULT_CD_MODEL),
                Media::Disk => ("ide-hd", DEFAULT_HD_MODEL),
            };
            let model = opt(d.model.as_deref().unwrap_or(model));
            args.extend([
                "-device".into(),
                format!("{kind},drive={drive},bus=ide.{channel},unit={unit},model={model}{props}"),
            ]);
        }
    }
    Ok(args)
}

/// Whether a controller has I/O threads in QEMU.
fn has_iothread(c: Controller) -> bool {
    matches!(c, Controller::VirtioBlk | Controller::VirtioScsi)
}

/// The whole QEMU argument list (without the binary) for `cfg` booted with
/// `cmdline`. Disks not measured (the root) keep their own serial.
pub fn args(cfg: &Config, subjects: &[Subject], cmdline: &str) -> Result<Vec<String>, String> {
    // Q35 has no PIIX IDE function; the older i440FX `pc` machine does.
    let ide: Vec<DiskConfig> = cfg
        .disks
        .iter()
        .filter(|d| d.controller == Controller::Ide)
        .cloned()
        .collect();
    let machine = if ide.is_empty() {
        "q35,accel=kvm"
    } else {
        "pc,accel=kvm"
    };
    let mut a: Vec<String> = [
        "-machine",
        machine,
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        // Thread names ("CPU 0/KVM") tell the vCPUs from the rest in the host CPU per I/O.
        "-name",
        "platter-compare,debug-threads=on",
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
    // Disks naming the same I/O thread share it; the others get their own. Each polls as
    // Platter's thread does (its `[[iothread]]`, else Platter's default, which is not
    // QEMU's): equivalent options.
    let threads: Vec<Option<(String, u64)>> = cfg
        .disks
        .iter()
        .enumerate()
        .map(|(n, d)| {
            // QEMU 7.2 (Debian 12) has no per-queue mapping (iothread-vq-mapping came in
            // 9.0, through JSON -device only): a list gives QEMU its first thread.
            has_iothread(d.controller).then(|| {
                d.iothread.as_ref().and_then(|t| t.0.first()).map_or_else(
                    || (own_iothread(n), io_poll::DEFAULT_POLL_MAX_NS),
                    |t| (named_iothread(t), config::poll_max_ns(&cfg.iothreads, t)),
                )
            })
        })
        .collect();
    let mut made: Vec<&str> = Vec::new();
    for (t, poll) in threads.iter().flatten() {
        if !made.contains(&t.as_str()) {
            a.extend([
                "-object".into(),
                format!("iothread,id={t},poll-max-ns={poll}"),
            ]);
            made.push(t);
        }
    }
    let mut positions = crate::disks::ide_positions(&ide).into_iter();
    for (n, d) in cfg.disks.iter().enumerate() {
        let subject = subjects.iter().find(|s| s.index == n);
        let format = match (subject, d.format) {
            (Some(s), _) => s.format,
            (None, Some(f)) => f,
            (None, None) => super::plan::format_of(&read_head(&d.path)),
        };
        let serial = subject.map(|s| s.serial.as_str()).or(d.serial.as_deref());
        let at = Placement {
            iothread: threads[n].as_ref().map(|(t, _)| t.as_str()),
            ide: if d.controller == Controller::Ide {
                positions.next()
            } else {
                None
            },
        };
        a.extend(disk_args(n, d, format, serial, at)?);
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

    /// The placement `args` gives a lone virtio disk number `n`.
    fn own(n: usize) -> (String, Placement<'static>) {
        (own_iothread(n), Placement::default())
    }

    #[test]
    fn virtio_blk_disk_maps_every_option() {
        let d = disk(
            "cache = \"none\"\naio = \"io_uring\"\nnum_queues = 2\nqueue_size = 128\n\
             discard = true\nreadonly = false\nrequest_merging = false",
        );
        let (io, at) = own(3);
        let at = Placement {
            iothread: Some(&io),
            ..at
        };
        let a = disk_args(3, &d, DiskFormat::Qcow2, Some("SER-3"), at).unwrap();
        assert_eq!(
            a,
            vec![
                "-drive",
                "file=/img/a,,b.raw,if=none,id=d3,format=qcow2,cache=none,aio=io_uring,discard=unmap,readonly=off",
                "-device",
                "virtio-blk-pci,drive=d3,iothread=io3,num-queues=2,queue-size=128,\
                 request-merging=off,serial=SER-3",
            ]
        );
    }

    #[test]
    fn defaults_match_platter() {
        let d = disk("discard = false\nreadonly = true");
        let at = Placement {
            iothread: Some("io0"),
            ide: None,
        };
        let a = disk_args(0, &d, DiskFormat::Raw, None, at).unwrap();
        assert!(
            a[1].ends_with("cache=writeback,aio=threads,discard=ignore,readonly=on"),
            "{}",
            a[1]
        );
        assert_eq!(
            a[3],
            "virtio-blk-pci,drive=d0,iothread=io0,num-queues=1,queue-size=256,request-merging=on"
        );
        for (c, n) in [
            (CacheMode::Writethrough, "writethrough"),
            (CacheMode::Directsync, "directsync"),
            (CacheMode::Unsafe, "unsafe"),
        ] {
            assert_eq!(cache_name(c), n);
        }
        assert_eq!(aio_name(AioMode::Native), "native");
        assert!(disk_args(0, &d, DiskFormat::Raw, None, Placement::default()).is_err());
    }

    #[test]
    fn other_controllers() {
        let mut d = disk("");
        d.controller = Controller::Ahci;
        let a = disk_args(1, &d, DiskFormat::Raw, Some("S"), Placement::default()).unwrap();
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
        let at = Placement {
            iothread: Some("io1"),
            ide: None,
        };
        let a = disk_args(1, &d, DiskFormat::Raw, None, at).unwrap();
        assert!(a[3].contains(",iothread=io1,"), "{a:?}");
        assert!(a[5].starts_with("scsi-hd,drive=d1,bus=scsi1.0"));
        d.controller = Controller::Ide;
        assert!(disk_args(1, &d, DiskFormat::Raw, None, Placement::default()).is_err());
    }

    #[test]
    fn named_iothreads_are_qemu_ids() {
        assert_eq!(named_iothread("shared"), "shared");
        assert_eq!(named_iothread("io1"), "iothread-io1");
        assert_eq!(named_iothread("io"), "io");
        assert_eq!(named_iothread("1st"), "iothread-1st");
    }

    fn config(disks: &str) -> Config {
        let text = format!(
            "[machine]\nvcpus = 2\nmemory = \"512M\"\n[kernel]\npath = \"/k\"\ninitramfs = \"/i\"\n{disks}"
        );
        Config::parse(&text, "t", &[]).unwrap()
    }

    fn raw_disk(id: &str, controller: &str, extra: &str) -> String {
        format!(
            "[[disk]]\nid = \"{id}\"\npath = \"/{id}\"\nformat = \"raw\"\ncontroller = \"{controller}\"\n{extra}\n"
        )
    }

    #[test]
    fn machine_arguments() {
        let cfg = config(&format!(
            "{}{}",
            raw_disk("root", "virtio-blk", "serial = \"R\""),
            raw_disk("x", "virtio-blk", "")
        ));
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let a = args(&cfg, &subjects, "console=ttyS0").unwrap().join(" ");
        assert!(a.starts_with("-machine q35,accel=kvm -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot -name platter-compare,debug-threads=on -smp 2 -m 512M -kernel /k -initrd /i -append console=ttyS0 "), "{a}");
        assert!(
            a.contains("-object iothread,id=io0,poll-max-ns=0 -object iothread,id=io1,poll-max-ns=0 -drive"),
            "{a}"
        );
        assert!(
            a.contains("id=d0,format=raw") && a.contains(",serial=R"),
            "{a}"
        );
        assert!(
            a.contains(
                "drive=d1,iothread=io1,num-queues=1,queue-size=256,request-merging=on,serial=x"
            ),
            "{a}"
        );
        assert_eq!(memory_arg(3 << 19), "1536K");
    }

    #[test]
    fn qcow2_l2_cache_size_reaches_the_drive() {
        let q = raw_disk("q", "virtio-blk", "l2_cache_size = \"8M\"")
            .replace("format = \"raw\"", "format = \"qcow2\"");
        let cfg = config(&format!("{}{q}", raw_disk("root", "virtio-blk", "")));
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let j = args(&cfg, &subjects, "c").unwrap().join(" ");
        assert!(
            j.contains("format=qcow2,") && j.contains(",l2-cache-size=8388608 "),
            "{j}"
        );
    }

    #[test]
    fn ide_disks_sit_where_platter_puts_them() {
        let cfg = config(&format!(
            "{}{}{}{}",
            raw_disk("root", "virtio-blk", "serial = \"R\""),
            raw_disk(
                "hd",
                "ide",
                "physical_block_size = 4096\nchannel = 0\nunit = 1"
            ),
            raw_disk("v", "virtio-blk", ""),
            raw_disk("cd", "ide", "media = \"cdrom\"\nmodel = \"MY, CD\""),
        ));
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let a = args(&cfg, &subjects, "c").unwrap();
        let j = a.join(" ");
        assert!(j.starts_with("-machine pc,accel=kvm "), "{j}");
        // Only the virtio disks have I/O threads.
        assert_eq!(j.matches("-object iothread").count(), 2, "{j}");
        assert!(a.contains(
            &"ide-hd,drive=d1,bus=ide.0,unit=1,model=PLATTER HARDDISK,serial=hd,physical_block_size=4096".to_string()
        ), "{j}");
        // The CD-ROM takes the first free position, as in crate::disks.
        assert!(
            a.contains(&"ide-cd,drive=d3,bus=ide.0,unit=0,model=MY,, CD,serial=cd".to_string()),
            "{j}"
        );
        assert!(
            j.contains("id=d3,format=raw,cache=writeback,aio=threads,discard=unmap,readonly=on"),
            "{j}"
        );
    }

    #[test]
    fn disks_naming_an_iothread_share_it() {
        let cfg = config(&format!(
            "{}{}{}{}",
            raw_disk("a", "virtio-blk", "iothread = \"shared\""),
            raw_disk("b", "virtio-blk", ""),
            raw_disk("c", "virtio-blk", "iothread = \"shared\""),
            raw_disk("d", "virtio-blk", "iothread = \"io1\""),
        ));
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let j = args(&cfg, &subjects, "c").unwrap().join(" ");
        assert!(j.contains("-object iothread,id=shared,poll-max-ns=0 -object iothread,id=io1,poll-max-ns=0 -object iothread,id=iothread-io1,poll-max-ns=0 -drive"), "{j}");
        assert_eq!(j.matches("-object").count(), 3, "{j}");
        assert!(
            j.contains("drive=d0,iothread=shared,") && j.contains("drive=d2,iothread=shared,"),
            "{j}"
        );
        assert!(
            j.contains("drive=d1,iothread=io1,") && j.contains("drive=d3,iothread=iothread-io1,"),
            "{j}"
        );
    }

    #[test]
    fn iothread_polling_settings_reach_qemu() {
        let cfg = config(&format!(
            "{}{}[[iothread]]\nid = \"busy\"\npoll_max_ns = 32768\n",
            raw_disk("a", "virtio-blk", "iothread = \"busy\""),
            raw_disk("b", "virtio-blk", "iothread = \"other\""),
        ));
        let subjects = super::super::plan::subjects(&cfg).unwrap();
        let j = args(&cfg, &subjects, "c").unwrap().join(" ");
        assert!(
            j.contains("-object iothread,id=busy,poll-max-ns=32768 -object iothread,id=other,poll-max-ns=0 -drive"),
            "{j}"
        );
    }
}
