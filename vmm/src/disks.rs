//! From `[[disk]]` entries to devices: open every image first (so a bad
//! image or a lock conflict stops Platter before anything starts), then put
//! each disk on its controller.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use platter_block::{open_disk, Disk, DiskOptions};
use platter_devices::virtio::{self, BlkConfig, VirtioBlk, VirtioPciDevice};
use vm_memory::GuestMemoryMmap;

use crate::config::{self, Config, ConfigError, Controller, DiskConfig};
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
    /// Interrupt vectors could not be set up.
    #[error("disk `{id}`: MSI-X vectors: {source}")]
    Interrupts {
        id: String,
        #[source]
        source: std::io::Error,
    },
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
    o
}

/// Open every disk of `cfg`; the first failure names its key and file.
pub fn open_all(cfg: &Config) -> Result<Vec<OpenedDisk>, ConfigError> {
    cfg.disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            open_disk(&block_options(d))
                .map(|disk| OpenedDisk {
                    config: d.clone(),
                    disk,
                })
                .map_err(|e| ConfigError {
                    file: cfg.source.display().to_string(),
                    key: format!("disk[{i}].path"),
                    message: format!("disk `{}`: {e}", d.id),
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
}

/// Put each opened disk on its controller.
pub fn attach_all(disks: Vec<OpenedDisk>, w: &mut Wiring) -> Result<(), AttachError> {
    for d in disks {
        match d.config.controller {
            Controller::VirtioBlk => attach_virtio_blk(d, w)?,
            // Config validation refuses the others until they land.
            other => unreachable!("controller {other:?} passed validation"),
        }
    }
    Ok(())
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
    };
    let vectors = blk_cfg.num_queues + 1;
    let blk = VirtioBlk::new(d.disk, blk_cfg).map_err(|source| AttachError::Blk {
        id: id.clone(),
        source,
    })?;
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
