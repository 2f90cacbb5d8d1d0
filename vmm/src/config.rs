//! The TOML configuration: one serde tree with `deny_unknown_fields`, then a
//! separate [`Config::validate`] that checks what serde can't (ranges, files,
//! host limits). Every rejection is one line naming the file and the key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod throttle;
pub use throttle::{limits as throttle_limits, ThrottleGroupConfig};

/// Smallest guest RAM a stock Linux kernel with an initramfs boots in.
pub const MIN_MEMORY_MIB: u64 = 64;
/// xAPIC IDs are 8 bits and 0xff is broadcast; the MP table and MADT use them.
pub const MAX_VCPUS: u32 = 254;
/// The x86 boot protocol's command line limit for 6.x kernels.
pub const MAX_CMDLINE_LEN: usize = 2048;
/// Most queues a virtio disk may ask for.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtio queue.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// virtio-blk's GET_ID answer is 20 bytes.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// ATA IDENTIFY serial number field.
pub const ATA_SERIAL_BYTES: usize = 20;
/// ATA IDENTIFY model field.
pub const ATA_MODEL_BYTES: usize = 40;
/// Two IDE channels, master and slave each.
pub const IDE_MAX_DRIVES: usize = 4;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The config file the error is in.
    pub file: String,
    /// The dotted key (or `line N` when the parser could not name one).
    pub key: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

/// The whole machine description.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// vCPUs, memory and reboot behaviour.
    #[serde(default)]
    pub machine: MachineConfig,
    /// What to boot.
    pub kernel: KernelConfig,
    /// Where the guest's COM1 goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Disks and their controllers.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Host PCI functions handed to the guest through VFIO.
    #[serde(default, rename = "passthrough")]
    pub passthrough: Vec<PassthroughConfig>,
    /// Limits shared by the disks that name them.
    #[serde(default, rename = "throttle_group")]
    pub throttle_groups: Vec<ThrottleGroupConfig>,
    /// Settings of named I/O threads (a name used only by disks gets the defaults).
    #[serde(default, rename = "iothread")]
    pub iothreads: Vec<IoThreadConfig>,
    /// The file this came from; relative paths are resolved against its folder.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[machine]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=254).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest RAM: an integer in MiB, or a string with a K/M/G suffix ("2G").
    #[serde(default = "default_memory")]
    pub memory: MemorySize,
    /// What a guest reboot does: end Platter (`exit`) or start the guest again (`restart`).
    #[serde(default)]
    pub on_reboot: OnReboot,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> MemorySize {
    MemorySize(512 << 20)
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpus: default_vcpus(),
            memory: default_memory(),
            on_reboot: OnReboot::default(),
        }
    }
}

/// What a guest-initiated reboot does.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// Platter exits with status 0, as on poweroff.
    #[default]
    Exit,
    /// Platter boots the guest again.
    Restart,
}

/// A size in bytes, written as MiB (integer) or with a suffix (string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl MemorySize {
    /// Parse "512M", "2G", "65536K", "1073741824" (bytes without suffix).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (digits, shift) = match s.chars().last() {
            Some('K' | 'k') => (&s[..s.len() - 1], 10),
            Some('M' | 'm') => (&s[..s.len() - 1], 20),
            Some('G' | 'g') => (&s[..s.len() - 1], 30),
            Some('T' | 't') => (&s[..s.len() - 1], 40),
            _ => (s, 0),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a size (use e.g. 512M or 2G)"))?;
        n.checked_mul(1 << shift)
            .map(MemorySize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }

    /// The size in MiB, rounded down.
    pub fn mib(self) -> u64 {
        self.0 >> 20
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Mib(m) => m
                .checked_mul(1 << 20)
                .map(MemorySize)
                .ok_or_else(|| serde::de::Error::custom("memory size is too large")),
            Raw::Text(t) => MemorySize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// `[[iothread]]`: settings of a named I/O thread, like QEMU's `-object iothread`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IoThreadConfig {
    /// The name disks use in `iothread`.
    pub id: String,
    /// The longest the thread spins looking for work before it sleeps, in
    /// nanoseconds (adaptive, like QEMU's poll-max-ns); 0 turns polling off.
    #[serde(default = "default_poll_max_ns")]
    pub poll_max_ns: u64,
}

fn default_poll_max_ns() -> u64 {
    platter_devices::virtio::io_poll::DEFAULT_POLL_MAX_NS
}

/// The polling window of the I/O thread `name`: its `[[iothread]]` setting, else the default.
pub fn poll_max_ns(threads: &[IoThreadConfig], name: &str) -> u64 {
    threads
        .iter()
        .find(|t| t.id == name)
        .map_or_else(default_poll_max_ns, |t| t.poll_max_ns)
}

/// The longest polling window accepted: beyond a millisecond spinning only burns a CPU.
pub const MAX_POLL_NS: u64 = 1_000_000;

/// Whether `name` can name an I/O thread (Linux thread names are at most 15 bytes).
fn valid_thread_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `iothread`: one thread name for all of a disk's queues, or a list: queue `i` is served
/// by thread `i mod n` (QEMU's iothread-vq-mapping, round robin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThreads(pub Vec<String>);

impl<'de> Deserialize<'de> for IoThreads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = || serde::de::Error::custom("expected a thread name or a list of names");
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(IoThreads(vec![s])),
            toml::Value::Array(a) => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()
                .map(IoThreads),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.mib())
    }
}

/// `[kernel]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// A bzImage (relative to the config file's folder, or absolute).
    pub path: PathBuf,
    /// An initramfs (cpio, optionally compressed).
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_cmdline() -> String {
    "console=ttyS0".to_string()
}

/// `[serial]`
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// `stdio` (the terminal, in raw mode), `file` or `off`.
    #[serde(default)]
    pub mode: SerialMode,
    /// The output file when `mode = "file"`.
    pub path: Option<PathBuf>,
}

/// Where COM1 goes.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// Standard input and output.
    #[default]
    Stdio,
    /// Output appended to `serial.path`; no input.
    File,
    /// Discarded.
    Off,
}

/// Disk image formats.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A flat image or block device.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// The controller a disk hangs off.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Controller {
    /// virtio-blk over virtio-pci.
    VirtioBlk,
    /// virtio-scsi over virtio-pci.
    VirtioScsi,
    /// PIIX IDE.
    Ide,
    /// ICH9 AHCI.
    Ahci,
    /// USB mass storage on xHCI.
    UsbStorage,
}

impl Controller {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            Controller::VirtioBlk => "virtio-blk",
            Controller::VirtioScsi => "virtio-scsi",
            Controller::Ide => "ide",
            Controller::Ahci => "ahci",
            Controller::UsbStorage => "usb-storage",
        }
    }
}

/// Host cache behaviour, with QEMU's meaning.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Host page cache, guest write cache on, flush = fdatasync.
    #[default]
    Writeback,
    /// O_DIRECT, guest write cache on.
    None,
    /// Page cache + O_DSYNC, guest write cache off.
    Writethrough,
    /// O_DIRECT + O_DSYNC.
    Directsync,
    /// Page cache, flushes ignored.
    Unsafe,
}

/// I/O engine.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AioMode {
    /// A pool of preadv/pwritev threads.
    #[default]
    Threads,
    /// Linux AIO (needs O_DIRECT).
    Native,
    /// io_uring.
    IoUring,
}

/// Media type of a disk.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    /// A hard disk.
    #[default]
    Disk,
    /// A read-only CD-ROM.
    Cdrom,
}

/// Bounds of `l2_cache_size`: one 64 KiB table at least, as much as a 4 TiB
/// disk with 64 KiB clusters maps at most.
const L2_CACHE_MIN: u64 = 64 << 10;
const L2_CACHE_MAX: u64 = 4 << 30;

/// `[[disk]]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A name unique among disks.
    pub id: String,
    /// The image file or block device.
    pub path: PathBuf,
    /// Image format; detected from the file when absent.
    pub format: Option<DiskFormat>,
    /// Which controller.
    pub controller: Controller,
    /// Host cache mode.
    #[serde(default)]
    pub cache: CacheMode,
    /// I/O engine.
    #[serde(default)]
    pub aio: AioMode,
    /// Guest can't write.
    #[serde(default)]
    pub readonly: bool,
    /// disk or cdrom.
    #[serde(default)]
    pub media: Media,
    /// Serial number the guest sees.
    pub serial: Option<String>,
    /// Model string the guest sees (ATA/SCSI).
    pub model: Option<String>,
    /// Pass guest discards to the image.
    #[serde(default = "default_true")]
    pub discard: bool,
    /// virtio queues.
    pub num_queues: Option<u16>,
    /// virtio queue size.
    pub queue_size: Option<u16>,
    /// The I/O thread(s) serving this disk's queues.
    pub iothread: Option<IoThreads>,
    /// virtio-blk: join adjacent reads/writes of a batch (QEMU's request-merging).
    pub request_merging: Option<bool>,
    /// Logical block size in bytes.
    pub logical_block_size: Option<u32>,
    /// Physical block size in bytes.
    pub physical_block_size: Option<u32>,
    /// qcow2: bytes of L2 tables kept in memory (QEMU's l2-cache-size).
    pub l2_cache_size: Option<MemorySize>,
    /// This disk's own limits (flat keys: iops_total, bps_read_max, ...).
    pub throttle: Option<std::collections::BTreeMap<String, u64>>,
    /// A `[[throttle_group]]` whose limits this disk shares.
    pub throttle_group: Option<String>,
    /// IDE channel (0 or 1).
    pub channel: Option<u8>,
    /// IDE unit (0 master, 1 slave).
    pub unit: Option<u8>,
}

fn default_true() -> bool {
    true
}

/// `[[passthrough]]`
#[derive(Debug, Deserialize, Clone)]
// Parsed now; read once VFIO passthrough lands.
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {
    /// A name unique among passthrough devices.
    pub id: String,
    /// The host PCI address, e.g. `0000:01:00.0`.
    pub host: String,
}

impl Config {
    /// Read, override (`--set key=value`), parse and validate `path`.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg = Self::parse(&text, &file, overrides)?;
        cfg.source = path.to_path_buf();
        cfg.resolve_paths();
        cfg.validate(&HostLimits::read())?;
        Ok(cfg)
    }

    /// Parse TOML text (no validation, no path resolution).
    pub fn parse(text: &str, file: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        let err = |key: String, message: String| ConfigError {
            file: file.to_string(),
            key,
            message,
        };
        let mut value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(key_at(text, e.span()), e.message().to_string()))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| err(format!("--set {o}"), m))?;
        }
        let rendered = toml::to_string(&value).map_err(|e| err("config".into(), e.to_string()))?;
        toml::from_str(&rendered).map_err(|e: toml::de::Error| {
            // Spans refer to the re-rendered text, which keeps keys intact.
            err(key_at(&rendered, e.span()), e.message().to_string())
        })
    }

    fn resolve_paths(&mut self) {
        let base = self
            .source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.kernel.path);
        if let Some(p) = self.kernel.initramfs.as_mut() {
            fix(p);
        }
        if let Some(p) = self.serial.path.as_mut() {
            fix(p);
        }
        for d in &mut self.disks {
            fix(&mut d.path);
        }
    }

    /// Check ranges, files and host limits.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        let file = self.source.display().to_string();
        let err = |key: &str, message: String| ConfigError {
            file: file.clone(),
            key: key.to_string(),
            message,
        };
        let m = &self.machine;
        if !(1..=MAX_VCPUS).contains(&m.vcpus) {
            return Err(err(
                "machine.vcpus",
                format!("must be between 1 and {MAX_VCPUS} (got {})", m.vcpus),
            ));
        }
        if m.memory.mib() < MIN_MEMORY_MIB {
            return Err(err(
                "machine.memory",
                format!("must be at least {MIN_MEMORY_MIB} MiB (got {})", m.memory),
            ));
        }
        if m.memory.0 % 4096 != 0 {
            return Err(err(
                "machine.memory",
                "must be a multiple of 4 KiB".to_string(),
            ));
        }
        if let Some(avail) = host.memory_bytes {
            if m.memory.0 > avail {
                return Err(err(
                    "machine.memory",
                    format!(
                        "{} is more than this host can give ({} MiB available)",
                        m.memory,
                        avail >> 20
                    ),
                ));
            }
        }
        check_file(&self.kernel.path).map_err(|e| err("kernel.path", e))?;
        if let Some(p) = &self.kernel.initramfs {
            check_file(p).map_err(|e| err("kernel.initramfs", e))?;
        }
        if self.kernel.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(err(
                "kernel.cmdline",
                format!(
                    "is {} bytes; the limit is {}",
                    self.kernel.cmdline.len(),
                    MAX_CMDLINE_LEN - 1
                ),
            ));
        }
        if self.serial.mode == SerialMode::File && self.serial.path.is_none() {
            return Err(err(
                "serial.path",
                "is required when serial.mode = \"file\"".into(),
            ));
        }
        let mut group_ids = std::collections::HashSet::new();
        for (i, g) in self.throttle_groups.iter().enumerate() {
            let key = |k: &str| format!("throttle_group[{i}].{k}");
            if g.id.is_empty() || !group_ids.insert(g.id.clone()) {
                return Err(err(
                    &key("id"),
                    format!("`{}` is empty or used twice", g.id),
                ));
            }
            throttle::limits(&g.limits).map_err(|(k, m)| err(&key(&k), m))?;
        }
        let mut thread_ids = std::collections::HashSet::new();
        for (i, t) in self.iothreads.iter().enumerate() {
            let key = |k: &str| format!("iothread[{i}].{k}");
            if !valid_thread_name(&t.id) {
                return Err(err(
                    &key("id"),
                    format!("`{}`: use 1 to 15 letters, digits, `-` or `_`", t.id),
                ));
            }
            if !thread_ids.insert(t.id.clone()) {
                return Err(err(&key("id"), format!("`{}` is used twice", t.id)));
            }
            if t.poll_max_ns > MAX_POLL_NS {
                return Err(err(
                    &key("poll_max_ns"),
                    format!(
                        "must be at most {MAX_POLL_NS} (1 ms; got {})",
                        t.poll_max_ns
                    ),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let key = |k: &str| format!("disk[{i}].{k}");
            if d.id.is_empty() || !ids.insert(d.id.clone()) {
                return Err(err(
                    &key("id"),
                    format!("`{}` is empty or used twice", d.id),
                ));
            }
            if d.aio == AioMode::Native
                && !matches!(d.cache, CacheMode::None | CacheMode::Directsync)
            {
                return Err(err(
                    &key("aio"),
                    "aio = \"native\" needs O_DIRECT: use cache = \"none\" or \"directsync\""
                        .into(),
                ));
            }
            if let Some(q) = d.num_queues {
                if !(1..=MAX_QUEUES).contains(&q) {
                    return Err(err(
                        &key("num_queues"),
                        format!("must be between 1 and {MAX_QUEUES} (got {q})"),
                    ));
                }
            }
            if let Some(q) = d.queue_size {
                if !q.is_power_of_two() || q > MAX_QUEUE_SIZE {
                    return Err(err(
                        &key("queue_size"),
                        format!("must be a power of two up to {MAX_QUEUE_SIZE} (got {q})"),
                    ));
                }
            }
            let logical = d.logical_block_size.unwrap_or(512);
            for (k, v) in [
                ("logical_block_size", d.logical_block_size),
                ("physical_block_size", d.physical_block_size),
            ] {
                if let Some(v) = v {
                    if !v.is_power_of_two() || !(512..=65536).contains(&v) || v < logical {
                        return Err(err(
                            &key(k),
                            format!("must be a power of two from 512 to 65536, physical >= logical (got {v})"),
                        ));
                    }
                }
            }
            if let Some(size) = d.l2_cache_size {
                if d.format == Some(DiskFormat::Raw) {
                    return Err(err(
                        &key("l2_cache_size"),
                        "only qcow2 images have an L2 cache".into(),
                    ));
                }
                if !(L2_CACHE_MIN..=L2_CACHE_MAX).contains(&size.0) {
                    return Err(err(
                        &key("l2_cache_size"),
                        format!("must be from 64K to 4G (got {} bytes)", size.0),
                    ));
                }
            }
            if let Some(IoThreads(names)) = &d.iothread {
                if names.is_empty() {
                    return Err(err(&key("iothread"), "the list is empty".into()));
                }
                for (i, name) in names.iter().enumerate() {
                    if !valid_thread_name(name) {
                        return Err(err(
                            &key("iothread"),
                            format!("`{name}`: use 1 to 15 letters, digits, `-` or `_`"),
                        ));
                    }
                    if names[..i].contains(name) {
                        return Err(err(&key("iothread"), format!("`{name}` is listed twice")));
                    }
                }
                let queues = d.num_queues.unwrap_or(1);
                if names.len() > usize::from(queues) {
                    return Err(err(
                        &key("iothread"),
                        format!(
                            "{} threads for {queues} queue(s): list at most one per queue (num_queues)",
                            names.len()
                        ),
                    ));
                }
            }
            if let Some(keys) = &d.throttle {
                throttle::limits(keys).map_err(|(k, m)| err(&key(&format!("throttle.{k}")), m))?;
                if d.throttle_group.is_some() {
                    return Err(err(
                        &key("throttle_group"),
                        "a disk takes its own `throttle` limits or a `throttle_group`, not both"
                            .into(),
                    ));
                }
            }
            if let Some(g) = &d.throttle_group {
                if !self.throttle_groups.iter().any(|t| &t.id == g) {
                    return Err(err(
                        &key("throttle_group"),
                        format!("no [[throttle_group]] has id `{g}`"),
                    ));
                }
            }
            for (k, v) in [("channel", d.channel), ("unit", d.unit)] {
                if v.is_some_and(|v| v > 1) {
                    return Err(err(&key(k), "must be 0 or 1".into()));
                }
            }
        }
        let mut ide_slots = std::collections::HashSet::new();
        let mut ide_count = 0;
        for (i, d) in self.disks.iter().enumerate() {
            let key = |k: &str| format!("disk[{i}].{k}");
            let ctrl = d.controller.name();
            if !matches!(d.controller, Controller::VirtioBlk | Controller::Ide) {
                return Err(err(
                    &key("controller"),
                    format!(
                        "disk `{}`: controller `{ctrl}` is not supported yet (virtio-blk and ide are)",
                        d.id
                    ),
                ));
            }
            let ide = d.controller == Controller::Ide;
            let unsupported = [
                ("media", d.media == Media::Cdrom && !ide),
                ("model", d.model.is_some() && !ide),
                ("channel", d.channel.is_some() && !ide),
                ("unit", d.unit.is_some() && !ide),
                ("num_queues", d.num_queues.is_some() && ide),
                ("queue_size", d.queue_size.is_some() && ide),
                ("iothread", d.iothread.is_some() && ide),
                ("request_merging", d.request_merging.is_some() && ide),
                (
                    "logical_block_size",
                    d.logical_block_size.is_some_and(|v| v != 512) && ide,
                ),
                (
                    "physical_block_size",
                    d.physical_block_size.is_some() && d.media == Media::Cdrom,
                ),
            ];
            if let Some((k, _)) = unsupported.iter().find(|(_, set)| *set) {
                return Err(err(
                    &key(k),
                    format!(
                        "disk `{}`: `{k}` is not supported for controller `{ctrl}`",
                        d.id
                    ),
                ));
            }
            let serial_max = if ide {
                ATA_SERIAL_BYTES
            } else {
                VIRTIO_BLK_ID_BYTES
            };
            if let Some(s) = &d.serial {
                if s.len() > serial_max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    return Err(err(
                        &key("serial"),
                        format!(
                            "must be at most {serial_max} printable ASCII characters for {ctrl}"
                        ),
                    ));
                }
            }
            if let Some(m) = &d.model {
                if m.len() > ATA_MODEL_BYTES || !m.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                    return Err(err(
                        &key("model"),
                        format!("must be at most {ATA_MODEL_BYTES} printable ASCII characters"),
                    ));
                }
            }
            if ide {
                ide_count += 1;
                if ide_count > IDE_MAX_DRIVES {
                    return Err(err(
                        &key("controller"),
                        format!("IDE has {IDE_MAX_DRIVES} positions (2 channels x master/slave); this is drive {ide_count}"),
                    ));
                }
                if d.channel.is_some() || d.unit.is_some() {
                    let pos = (d.channel.unwrap_or(0), d.unit.unwrap_or(0));
                    if !ide_slots.insert(pos) {
                        return Err(err(
                            &key("unit"),
                            format!("IDE channel {} unit {} is already taken", pos.0, pos.1),
                        ));
                    }
                }
            }
            check_path(&d.path).map_err(|e| err(&key("path"), e))?;
        }
        if let Some(p) = self.passthrough.first() {
            return Err(err(
                "passthrough[0]",
                format!(
                    "`{}`: VFIO passthrough is not supported yet in this version of Platter",
                    p.id
                ),
            ));
        }
        Ok(())
    }
}

/// What the host can give, read once so validation is testable.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostLimits {
    /// Bytes of RAM the host could hand out (MemAvailable + SwapFree).
    pub memory_bytes: Option<u64>,
}

impl HostLimits {
    /// Read /proc/meminfo.
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kib| kib * 1024)
        };
        let memory_bytes = match (field("MemAvailable:"), field("SwapFree:")) {
            (Some(a), s) => Some(a + s.unwrap_or(0)),
            _ => None,
        };
        Self { memory_bytes }
    }
}

/// A disk path: a regular file or a block device that can be opened.
fn check_path(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a regular file or block device",
            p.display()
        )),
        Err(e) => Err(format!("cannot open {}: {e}", p.display())),
    }
}

fn check_file(p: &Path) -> Result<(), String> {
    match std::fs::File::open(p) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(format!("{} is not a regular file", p.display())),
            Err(e) => Err(format!("{}: {e}", p.display())),
        },
        Err(e) => Err(format!("cannot open {}: {e}", p.display())),
    }
}

/// Apply `a.b.c=value`: the value is parsed as a TOML value, or taken as a
/// string when it doesn't parse (so `--set kernel.cmdline=console=ttyS0` works).
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| "expected key=value".to_string())?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or("empty key")?;
    let mut table = root;
    let mut segments = path.iter();
    while let Some(p) = segments.next() {
        table = match table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            // An array of tables (`[[disk]]`) takes an index: `disk.1.serial`.
            toml::Value::Array(items) => {
                let n = items.len();
                let i = segments
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .ok_or_else(|| format!("`{p}` is an array: give an index, e.g. {p}.0"))?;
                items
                    .get_mut(i)
                    .and_then(toml::Value::as_table_mut)
                    .ok_or_else(|| format!("`{p}` has {n} tables; there is no {p}.{i}"))?
            }
            v => v
                .as_table_mut()
                .ok_or_else(|| format!("`{p}` is not a table"))?,
        };
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// Name the key at a parser error: `[table] key` from the text around `span`.
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "config".into();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let mut table = String::new();
    for l in text[..start].lines() {
        let t = l.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let line = text[start..].lines().next().unwrap_or("");
    let full_line = text.lines().nth(line_no - 1).unwrap_or(line);
    let key = full_line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (key, table.is_empty()) {
        (Some(k), false) => format!("{table}.{k} (line {line_no})"),
        (Some(k), true) => format!("{k} (line {line_no})"),
        (None, false) => format!("[{table}] (line {line_no})"),
        (None, true) => format!("line {line_no}"),
    }
}

#[cfg(test)]
mod tests;
