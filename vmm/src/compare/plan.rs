//! What a comparison measures: the fio jobs (parsed from names like
//! `randread-4k-qd32`), the disks taken from the config, and the serial each
//! disk is found by in the guest.

use std::path::Path;

use crate::config::{Config, DiskConfig, DiskFormat, MemorySize};

/// The jobs run on every disk unless `--jobs` says otherwise.
pub const DEFAULT_JOBS: &str =
    "randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32,read-128k-qd8,write-128k-qd8";
/// A disk with this id is the guest's root file system, not a subject.
pub const ROOT_DISK_ID: &str = "root";
/// Longest serial any controller carries (virtio-blk GET_ID, ATA IDENTIFY).
pub const MAX_SERIAL: usize = 20;
/// Deepest queue a job may ask for.
const MAX_DEPTH: u32 = 1024;
/// The first bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// One fio job, named `RW-BS-qdDEPTH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The name as given (`randread-4k-qd32`); also fio's job name.
    pub name: String,
    /// fio's `--rw`.
    pub rw: String,
    /// fio's `--bs` (`4k`, `128k`, `1m`).
    pub bs: String,
    /// fio's `--iodepth`.
    pub depth: u32,
}

impl Job {
    /// Parse `randread-4k-qd32`; the guest script splits names the same way.
    pub fn parse(name: &str) -> Result<Job, String> {
        let usage = || {
            format!(
                "`{name}` is not a job name: use RW-BS-qdN with RW one of read, write, \
                 randread, randwrite, e.g. randread-4k-qd32"
            )
        };
        let mut parts = name.split('-');
        let (Some(rw), Some(bs), Some(qd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(usage());
        };
        if !matches!(rw, "read" | "write" | "randread" | "randwrite") {
            return Err(usage());
        }
        let digits = bs.trim_end_matches(['k', 'K', 'm', 'M']);
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || bs.len() - digits.len() > 1
        {
            return Err(usage());
        }
        let depth = qd
            .strip_prefix("qd")
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|d| (1..=MAX_DEPTH).contains(d))
            .ok_or_else(usage)?;
        Ok(Job {
            name: name.to_string(),
            rw: rw.to_string(),
            bs: bs.to_string(),
            depth,
        })
    }

    /// Whether the job writes (skipped on read-only disks).
    pub fn writes(&self) -> bool {
        self.rw.contains("write")
    }
}

/// Parse `--jobs` (comma-separated names), refusing duplicates.
pub fn parse_jobs(list: &str) -> Result<Vec<Job>, String> {
    let mut jobs: Vec<Job> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let job = Job::parse(name)?;
        if jobs.iter().any(|j| j.name == job.name) {
            return Err(format!("--jobs: `{name}` is given twice"));
        }
        jobs.push(job);
    }
    if jobs.is_empty() {
        return Err("--jobs: no jobs given".into());
    }
    Ok(jobs)
}

/// Parse `--size`: a whole number of MiB, at least 1 MiB ("64M", "1G").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = MemorySize::parse(s).map_err(|e| format!("--size: {e}"))?.0;
    if bytes == 0 || bytes % (1 << 20) != 0 {
        return Err(format!(
            "--size: `{s}` must be a whole number of MiB (e.g. 64M)"
        ));
    }
    Ok(bytes)
}

/// A disk being measured.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Its index in the config's `[[disk]]` list.
    pub index: usize,
    /// The disk as configured.
    pub disk: DiskConfig,
    /// The serial the guest finds it by.
    pub serial: String,
    /// Whether `serial` was made up here (and must be passed to the VMMs).
    pub derived: bool,
    /// raw or qcow2, from the config or the image's first bytes.
    pub format: DiskFormat,
}

/// A serial for a disk without one: the id, with characters other than
/// letters, digits, `-`, `_`, `.` replaced by `-`; an id longer than
/// [`MAX_SERIAL`] keeps its first 15 characters and gets a 4-digit hash.
pub fn derive_serial(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| if serial_char(c) { c } else { '-' })
        .collect();
    if clean.len() <= MAX_SERIAL {
        return clean;
    }
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{}-{:04x}", &clean[..15], hash & 0xffff)
}

fn serial_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// The disks to measure: every `[[disk]]` but the root, each with a serial
/// unique among all disks (the guest script finds disks by serial).
pub fn subjects(cfg: &Config) -> Result<Vec<Subject>, String> {
    let mut out: Vec<Subject> = Vec::new();
    let mut taken: Vec<String> = cfg.disks.iter().filter_map(|d| d.serial.clone()).collect();
    for (index, disk) in cfg.disks.iter().enumerate() {
        if disk.id == ROOT_DISK_ID {
            continue;
        }
        let (serial, derived) = match &disk.serial {
            Some(s) => {
                if s.is_empty() || !s.chars().all(serial_char) {
                    return Err(format!(
                        "disk[{index}].serial: `{s}`: compare finds disks by serial and needs \
                         one of letters, digits, `-`, `_`, `.`"
                    ));
                }
                (s.clone(), false)
            }
            None => {
                let s = derive_serial(&disk.id);
                taken.push(s.clone());
                (s, true)
            }
        };
        if taken.iter().filter(|t| **t == serial).count() > 1 {
            return Err(format!(
                "disk[{index}].serial: `{serial}` is used by another disk too; compare finds \
                 disks by serial: give each disk its own `serial`"
            ));
        }
        let format = match disk.format {
            Some(f) => f,
            None => detect_format(&disk.path)
                .map_err(|e| format!("disk[{index}].path: {}: {e}", disk.path.display()))?,
        };
        out.push(Subject {
            index,
            disk: disk.clone(),
            serial,
            derived,
            format,
        });
    }
    if out.is_empty() {
        return Err("no [[disk]] to compare (a disk with id = \"root\" is not measured)".into());
    }
    Ok(out)
}

/// The `--set` overrides that give disks their derived serials.
pub fn serial_overrides(subjects: &[Subject]) -> Vec<String> {
    subjects
        .iter()
        .filter(|s| s.derived)
        .map(|s| format!("disk.{}.serial=\"{}\"", s.index, s.serial))
        .collect()
}

/// raw or qcow2 from an image's first bytes.
pub fn format_of(header: &[u8]) -> DiskFormat {
    if header.starts_with(QCOW2_MAGIC) {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

fn detect_format(path: &Path) -> std::io::Result<DiskFormat> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)?.read(&mut head)?;
    Ok(format_of(&head[..n]))
}

/// The size the guest sees: qcow2's header field, else the file's length.
pub fn virtual_size(header: &[u8], file_len: u64) -> u64 {
    match (format_of(header), header.get(24..32)) {
        (DiskFormat::Qcow2, Some(b)) => u64::from_be_bytes(b.try_into().unwrap_or_default()),
        _ => file_len,
    }
}

/// Refuse a disk smaller than the region fio works on.
pub fn check_size(subject: &Subject, size: u64) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let path = &subject.disk.path;
    let open_err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let mut head = [0u8; 32];
    let n = f.read(&mut head).map_err(open_err)?;
    // seek(End) also gives the size of a block device, where metadata says 0.
    let len = f.seek(SeekFrom::End(0)).map_err(open_err)?;
    let have = virtual_size(&head[..n], len);
    if have < size {
        return Err(format!(
            "disk[{}].path: disk `{}` is {} MiB, smaller than --size ({} MiB): \
             pass a smaller --size or make the image bigger",
            subject.index,
            subject.disk.id,
            have >> 20,
            size >> 20
        ));
    }
    Ok(())
}

/// Whether the image is on a 9p mount, as the rig's repository share is:
/// there O_DIRECT and the page cache behave unlike a local disk, so the
/// numbers measure 9p as much as the VMM. (statfs can't tell: 9p reports
/// the server's file system type.)
pub fn on_9p(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    path.canonicalize()
        .is_ok_and(|p| fs_type(&mounts, &p) == Some("9p"))
}

/// The type of the file system `path` (absolute, canonical) is on, from
/// `/proc/self/mounts` text: the last mount on the longest matching point.
pub fn fs_type<'a>(mounts: &'a str, path: &Path) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            // Spaces in mount points are octal-escaped; good enough for a hint.
            let point = point.replace("\\040", " ");
            path.starts_with(&point).then_some((point.len(), kind))
        })
        .fold(
            None,
            |best: Option<(usize, &str)>, (len, kind)| match best {
                Some((b, _)) if b > len => best,
                _ => Some((len, kind)),
            },
        )
        .map(|(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_jobs_parse() {
        let jobs = parse_jobs(DEFAULT_JOBS).unwrap();
        assert_eq!(jobs.len(), 6);
        assert_eq!(
            jobs[1],
            Job {
                name: "randread-4k-qd32".into(),
                rw: "randread".into(),
                bs: "4k".into(),
                depth: 32
            }
        );
        assert!(!jobs[0].writes());
        assert!(jobs[5].writes());
    }

    #[test]
    fn bad_job_names_are_refused() {
        for bad in [
            "randread-4k",
            "randread-4k-qd0",
            "randread-4k-32",
            "trim-4k-qd1",
            "read-4kb-qd1",
            "read--qd1",
            "read-4k-qd1-x",
            "read-4k-qd2000",
        ] {
            assert!(Job::parse(bad).is_err(), "{bad}");
        }
        assert!(parse_jobs("read-4k-qd1,read-4k-qd1").is_err());
        assert!(parse_jobs(" , ").is_err());
    }

    #[test]
    fn sizes_are_whole_mib() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1500K").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn serials_derive_from_ids() {
        assert_eq!(derive_serial("data"), "data");
        assert_eq!(derive_serial("raw none/uring"), "raw-none-uring");
        let long = derive_serial("a-rather-long-disk-identifier");
        assert_eq!(long.len(), MAX_SERIAL);
        assert!(long.starts_with("a-rather-long-d-"), "{long}");
        // Stable, and different ids that share a prefix stay apart.
        assert_eq!(long, derive_serial("a-rather-long-disk-identifier"));
        assert_ne!(long, derive_serial("a-rather-long-disk-identifier2"));
    }

    fn config(disks: &str) -> Config {
        let text = format!("[kernel]\npath = \"k\"\n{disks}");
        let mut c = Config::parse(&text, "t.toml", &[]).unwrap();
        for d in &mut c.disks {
            d.format = Some(DiskFormat::Raw);
        }
        c
    }

    fn disk(id: &str, serial: Option<&str>) -> String {
        let s = serial
            .map(|s| format!("serial = \"{s}\"\n"))
            .unwrap_or_default();
        format!("[[disk]]\nid = \"{id}\"\npath = \"{id}.raw\"\ncontroller = \"virtio-blk\"\n{s}")
    }

    #[test]
    fn subjects_skip_root_and_get_serials() {
        let c = config(&format!(
            "{}{}{}",
            disk("root", None),
            disk("a", Some("SER-A")),
            disk("b", None)
        ));
        let s = subjects(&c).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].index, s[0].serial.as_str(), s[0].derived),
            (1, "SER-A", false)
        );
        assert_eq!(
            (s[1].index, s[1].serial.as_str(), s[1].derived),
            (2, "b", true)
        );
        assert_eq!(
            serial_overrides(&s),
            vec!["disk.2.serial=\"b\"".to_string()]
        );
    }

    #[test]
    fn clashing_or_unusable_serials_are_refused() {
        let c = config(&format!("{}{}", disk("a", Some("b")), disk("b", None)));
        assert!(subjects(&c).unwrap_err().contains("used by another disk"));
        let c = config(&disk("a", Some("has space")));
        assert!(subjects(&c).unwrap_err().contains("disk[0].serial"));
        let c = config(&disk("root", None));
        assert!(subjects(&c).unwrap_err().contains("no [[disk]]"));
    }

    #[test]
    fn file_system_type_from_mounts() {
        let mounts = "rootfs / rootfs rw 0 0\nhost / 9p ro 0 0\ntmpfs /tmp tmpfs rw 0 0\n\
                      repo /work/main 9p rw 0 0\n/dev/loop0 /tmp/compare ext4 rw 0 0\n";
        let t = |p: &str| fs_type(mounts, Path::new(p));
        assert_eq!(t("/work/main/guests/cache/images/a.raw"), Some("9p"));
        assert_eq!(t("/tmp/compare/a.raw"), Some("ext4"));
        assert_eq!(t("/tmp/compare2/a.raw"), Some("tmpfs"));
        assert_eq!(t("/usr/bin/fio"), Some("9p"));
        assert_eq!(fs_type("", Path::new("/x")), None);
    }

    #[test]
    fn formats_and_sizes_come_from_headers() {
        let mut qcow = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow.resize(24, 0);
        qcow.extend_from_slice(&(64u64 << 20).to_be_bytes());
        assert_eq!(format_of(&qcow), DiskFormat::Qcow2);
        assert_eq!(virtual_size(&qcow, 200_000), 64 << 20);
        assert_eq!(format_of(b"\0\0\0\0"), DiskFormat::Raw);
        assert_eq!(virtual_size(b"\0\0", 4096), 4096);
        assert_eq!(format_of(b""), DiskFormat::Raw);
    }
}
