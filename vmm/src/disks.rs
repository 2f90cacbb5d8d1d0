//! From `[[disk]]` entries to devices: open every image first (so a bad
//! image or a lock conflict stops Platter before anything starts), then put
//! each disk on its controller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use platter_block::{open_disk, Disk, DiskOptions, ThrottleGroup};
use platter_devices::bus::Bus;
use platter_devices::ide::{self, IdeDriveConfig, IrqLevel, PiixIde, PiixVariant};
use platter_devices::virtio::{self, BlkConfig, IoThread, VirtioBlk, VirtioPciDevice};
use std::sync::RwLock;
use vm_memory::GuestMemoryMmap;

use crate::config::{self, Config, ConfigError, Controller, DiskConfig, IoThreadConfig};
use crate::irq::{GsiTable, KvmMsiRouter};
use crate::pci::{IoEvent, PciSegment};

/// Failures while attaching an opened disk to its controller.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The virtio-blk model refused the configuration.
    #[error("disk `{id}`: {source}")]
    Blk {
        id: String,
        #[source]
        source: virtio::BlkConfigError,
    },
    /// The virtio PCI transport refused the device.
    #[error("disk `{id}`: {source}")]
    Transport {
        id: String,
        #[source]
        source: virtio::VirtioPciError,
    },
    /// A named I/O thread could not be started.
    #[error("disk `{id}`: cannot start I/O thread `{name}`: {source}")]
    IoThread {
        id: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// Interrupt vectors could not be set up.
    #[error("disk `{id}`: MSI-X vectors: {source}")]
    Interrupts {
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// The IDE controller refused a drive (model/serial strings, media).
    #[error("IDE: {0}")]
    Ide(#[source] ide::IdeError),
    /// An IDE port overlapped another device.
    #[error("IDE ports: {0}")]
    IdePorts(#[source] platter_devices::bus::BusError),
    /// The PCI segment refused the function.
    #[error("disk `{id}`: {source}")]
    Pci {
        id: String,
        #[source]
        source: crate::pci::PciWiringError,
    },
}

/// A disk whose image is open and locked, waiting for its controller.
pub struct OpenedDisk {
    /// Its config entry.
    pub config: DiskConfig,
    /// The block layer's handle.
    pub disk: Disk,
}

fn block_options(d: &DiskConfig) -> DiskOptions {
    use platter_block::{AioMode, CacheMode, Format};
    let mut o = DiskOptions::new(&d.path);
    o.format = d.format.map(|f| match f {
        config::DiskFormat::Raw => Format::Raw,
        config::DiskFormat::Qcow2 => Format::Qcow2,
    });
    o.cache = match d.cache {
        config::CacheMode::Writeback => CacheMode::Writeback,
        config::CacheMode::None => CacheMode::None,
        config::CacheMode::Writethrough => CacheMode::Writethrough,
        config::CacheMode::Directsync => CacheMode::Directsync,
        config::CacheMode::Unsafe => CacheMode::Unsafe,
    };
    o.aio = match d.aio {
        config::AioMode::Threads => AioMode::Threads,
        config::AioMode::Native => AioMode::Native,
        config::AioMode::IoUring => AioMode::IoUring,
    };
    o.readonly = d.readonly || d.media == config::Media::Cdrom;
    o.discard = d.discard;
    if let Some(size) = d.l2_cache_size {
        o.l2_cache_size = size.0;
    }
    o
}

/// Open every disk of `cfg`; the first failure names its key and file.
/// Throttle groups are made here, one per `[[throttle_group]]` and one for
/// each disk with limits of its own.
pub fn open_all(cfg: &Config) -> Result<Vec<OpenedDisk>, ConfigError> {
    let file = cfg.source.display().to_string();
    let group = |key: String, name: &str, keys: &std::collections::BTreeMap<String, u64>| {
        let fail = |message: String| ConfigError {
            file: file.clone(),
            key: key.clone(),
            message,
        };
        let limits = config::throttle_limits(keys).map_err(|(_, m)| fail(m))?;
        ThrottleGroup::new(name, limits).map_err(|e| fail(e.to_string()))
    };
    let mut groups = HashMap::new();
    for (i, g) in cfg.throttle_groups.iter().enumerate() {
        let made = group(format!("throttle_group[{i}]"), &g.id, &g.limits)?;
        groups.insert(g.id.clone(), made);
    }
    cfg.disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut opts = block_options(d);
            opts.throttle = match (&d.throttle, &d.throttle_group) {
                (Some(keys), _) => Some(group(
                    format!("disk[{i}].throttle"),
                    &format!("disk {}", d.id),
                    keys,
                )?),
                // Validation checked that the group exists.
                (None, Some(g)) => groups.get(g).cloned(),
                (None, None) => None,
            };
            let fail = |k: &str, message: String| ConfigError {
                file: file.clone(),
                key: format!("disk[{i}].{k}"),
                message: format!("disk `{}`: {message}", d.id),
            };
            let disk = open_disk(&opts).map_err(|e| fail("path", e.to_string()))?;
            // Validation caught `format = "raw"`; this is a raw image found by probing.
            if d.l2_cache_size.is_some() && disk.format() != platter_block::Format::Qcow2 {
                return Err(fail(
                    "l2_cache_size",
                    "the image is raw; only qcow2 images have an L2 cache".into(),
                ));
            }
            Ok(OpenedDisk {
                config: d.clone(),
                disk,
            })
        })
        .collect()
}

/// Everything a controller needs from the machine.
pub struct Wiring<'a> {
    /// The VM, for irqfds.
    pub vm: &'a Arc<VmFd>,
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// MSI routes.
    pub gsi: &'a Arc<Mutex<GsiTable>>,
    /// The PCI segment the controllers go on.
    pub pci: &'a mut PciSegment,
    /// The port I/O bus, for legacy-mode IDE ports.
    pub pio: &'a RwLock<Bus>,
    /// Named I/O threads (`iothread = "NAME"` or a list).
    pub io_threads: NamedThreads,
}

/// The named I/O threads: each made on first use with its `[[iothread]]` settings (or
/// the defaults) and shared by every disk that names it.
pub struct NamedThreads {
    config: Vec<IoThreadConfig>,
    running: HashMap<String, Arc<IoThread>>,
}

impl NamedThreads {
    /// Threads with the settings of `[[iothread]]`; none runs yet.
    pub fn new(config: &[IoThreadConfig]) -> Self {
        Self {
            config: config.to_vec(),
            running: HashMap::new(),
        }
    }

    /// The thread called `name`, started if it is not running yet.
    fn get(&mut self, name: &str) -> std::io::Result<Arc<IoThread>> {
        if let Some(t) = self.running.get(name) {
            return Ok(t.clone());
        }
        let poll = config::poll_max_ns(&self.config, name);
        let t = Arc::new(IoThread::with_poll_max(name, poll)?);
        self.running.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// What the device event loop must watch after attaching: a controller and
/// the completion eventfds of its disks (virtio-blk serves its own).
pub struct CompletionWatch {
    /// The IDE controller to poke.
    pub ide: Arc<Mutex<PiixIde>>,
    /// The disks' completion eventfds.
    pub fds: Vec<std::os::fd::RawFd>,
}

/// Put each opened disk on its controller; returns what the event loop
/// must watch.
pub fn attach_all(
    disks: Vec<OpenedDisk>,
    w: &mut Wiring,
) -> Result<Vec<CompletionWatch>, AttachError> {
    let mut ide_drives = Vec::new();
    for d in disks {
        match d.config.controller {
            Controller::VirtioBlk => attach_virtio_blk(d, w)?,
            Controller::Ide => ide_drives.push(d),
            // Config validation refuses the others until they land.
            other => unreachable!("controller {other:?} passed validation"),
        }
    }
    let mut watches = Vec::new();
    if !ide_drives.is_empty() {
        watches.push(attach_ide(ide_drives, w)?);
    }
    Ok(watches)
}

/// An ISA interrupt line driven by level, through KVM_IRQ_LINE.
struct KvmIrqLevel {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLevel for KvmIrqLevel {
    fn set(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            log::error!("IDE: KVM_IRQ_LINE {} = {level}: {e}", self.gsi);
        }
    }
}

/// IDE positions in the order they are handed out: primary master, primary
/// slave, secondary master, secondary slave.
pub const IDE_SLOTS: [(u8, u8); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// Place IDE drives: explicit channel/unit first, the rest in slot order.
/// Validation guarantees at most four and no two on one position.
pub fn ide_positions(disks: &[DiskConfig]) -> Vec<(u8, u8)> {
    let explicit: Vec<Option<(u8, u8)>> = disks
        .iter()
        .map(|d| match (d.channel, d.unit) {
            (Some(c), Some(u)) => Some((c, u)),
            (Some(c), None) => Some((c, 0)),
            (None, Some(u)) => Some((0, u)),
            (None, None) => None,
        })
        .collect();
    let taken = explicit.clone();
    let mut free = IDE_SLOTS
        .iter()
        .copied()
        .filter(|s| !taken.contains(&Some(*s)));
    explicit
        .into_iter()
        .map(|e| e.unwrap_or_else(|| free.next().expect("validated: at most four IDE drives")))
        .collect()
}

fn attach_ide(drives: Vec<OpenedDisk>, w: &mut Wiring) -> Result<CompletionWatch, AttachError> {
    let configs: Vec<DiskConfig> = drives.iter().map(|d| d.config.clone()).collect();
    let positions = ide_positions(&configs);
    let mut slots: [[Option<IdeDriveConfig>; 2]; 2] = Default::default();
    for ((c, u), d) in positions.into_iter().zip(drives) {
        let cdrom = d.config.media == config::Media::Cdrom;
        let media = if cdrom {
            ide::Media::Cdrom
        } else {
            ide::Media::Disk
        };
        let default_model = if cdrom {
            "PLATTER DVD-ROM"
        } else {
            "PLATTER HARDDISK"
        };
        let model = d
            .config
            .model
            .clone()
            .unwrap_or_else(|| default_model.into());
        let serial = d
            .config
            .serial
            .clone()
            .unwrap_or_else(|| d.config.id.clone());
        let mut drive = IdeDriveConfig::new(d.disk, media, &model, &serial);
        drive.physical_block_size = d.config.physical_block_size;
        slots[usize::from(c)][usize::from(u)] = Some(drive);
    }
    let irq = |gsi| -> Arc<dyn IrqLevel> {
        Arc::new(KvmIrqLevel {
            vm: w.vm.clone(),
            gsi,
        })
    };
    let dev = PiixIde::new(
        PiixVariant::Piix4,
        w.mem.clone(),
        slots,
        [irq(ide::PRIMARY_IRQ), irq(ide::SECONDARY_IRQ)],
    )
    .map_err(AttachError::Ide)?;
    let fds = dev.completion_fds();
    let dev = Arc::new(Mutex::new(dev));
    {
        let mut pio = w.pio.write().expect("bus lock");
        for (port, base, len) in ide::legacy_ports(&dev) {
            pio.insert(Arc::new(Mutex::new(port)), base, len)
                .map_err(AttachError::IdePorts)?;
        }
    }
    w.pci
        .add(dev.clone(), Vec::new())
        .map_err(|source| AttachError::Pci {
            id: "ide".into(),
            source,
        })?;
    Ok(CompletionWatch { ide: dev, fds })
}

fn attach_virtio_blk(d: OpenedDisk, w: &mut Wiring) -> Result<(), AttachError> {
    let c = &d.config;
    let id = c.id.clone();
    let defaults = BlkConfig::default();
    let blk_cfg = BlkConfig {
        serial: c.serial.clone(),
        num_queues: c.num_queues.unwrap_or(defaults.num_queues),
        queue_size: c.queue_size.unwrap_or(defaults.queue_size),
        discard: c.discard,
        readonly: c.readonly,
        request_merging: c.request_merging.unwrap_or(defaults.request_merging),
        logical_block_size: c.logical_block_size,
        physical_block_size: c.physical_block_size,
    };
    let vectors = blk_cfg.num_queues + 1;
    let mut blk = VirtioBlk::new(d.disk, blk_cfg).map_err(|source| AttachError::Blk {
        id: id.clone(),
        source,
    })?;
    if let Some(names) = &c.iothread {
        let threads = names
            .0
            .iter()
            .map(|name| {
                w.io_threads
                    .get(name)
                    .map_err(|source| AttachError::IoThread {
                        id: id.clone(),
                        name: name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        blk.set_io_threads(threads);
    }
    let router = KvmMsiRouter::new(w.vm, w.gsi.clone(), vectors).map_err(|source| {
        AttachError::Interrupts {
            id: id.clone(),
            source,
        }
    })?;
    let dev = VirtioPciDevice::new(Box::new(blk), w.mem.clone(), Arc::new(router), None).map_err(
        |source| AttachError::Transport {
            id: id.clone(),
            source,
        },
    )?;
    let ioevents = dev
        .notify_eventfds()
        .into_iter()
        .map(|(offset, fd)| {
            fd.try_clone()
                .map(|fd| IoEvent {
                    bar: virtio::pci::BAR,
                    offset,
                    fd,
                })
                .map_err(|source| AttachError::Interrupts {
                    id: id.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    w.pci
        .add(Arc::new(Mutex::new(dev)), ioevents)
        .map_err(|source| AttachError::Pci { id, source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(channel: Option<u8>, unit: Option<u8>) -> DiskConfig {
        let text =
            "[kernel]\npath = \"k\"\n[[disk]]\nid = \"a\"\npath = \"a\"\ncontroller = \"ide\"\n";
        let mut d = Config::parse(text, "t", &[]).unwrap().disks.remove(0);
        d.channel = channel;
        d.unit = unit;
        d
    }

    #[test]
    fn ide_positions_fill_free_slots_in_order() {
        let p = ide_positions(&[disk(None, None), disk(Some(0), Some(0)), disk(None, None)]);
        assert_eq!(p, vec![(0, 1), (0, 0), (1, 0)]);
        let p = ide_positions(&[disk(Some(1), None), disk(None, Some(1)), disk(None, None)]);
        assert_eq!(p, vec![(1, 0), (0, 1), (0, 0)]);
    }

    /// A probed raw image refuses `l2_cache_size` with the key named; a
    /// qcow2 image takes it.
    #[test]
    fn l2_cache_size_needs_a_qcow2_image() {
        let dir = std::env::temp_dir().join(format!("platter-disks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("a.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let q = dir.join("a.qcow2");
        platter_block::img::create(
            &q,
            platter_block::Format::Qcow2,
            1 << 20,
            &Default::default(),
        )
        .unwrap();
        let cfg = |path: &std::path::Path| {
            let text = format!(
                "[kernel]\npath = \"k\"\n[[disk]]\nid = \"a\"\npath = \"{}\"\n\
                 controller = \"virtio-blk\"\nl2_cache_size = \"1M\"\n",
                path.display()
            );
            config::Config::parse(&text, "t.toml", &[]).unwrap()
        };
        let e = open_all(&cfg(&raw)).err().expect("raw refused");
        assert_eq!(e.key, "disk[0].l2_cache_size", "{e}");
        let opened = open_all(&cfg(&q)).unwrap();
        assert_eq!(opened[0].disk.format(), platter_block::Format::Qcow2);
        drop(opened);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
