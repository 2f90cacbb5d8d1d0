//! Linux boot: load the bzImage, initramfs and command line, and describe the
//! machine to the kernel (boot_params with an e820 map, MP table, ACPI).
//! Follows the x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

pub mod acpi;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::boot_params;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    ram_regions, ACPI_START, BIOS_END, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START,
};

/// Magic values of the boot protocol's setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point is 0x200 past the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Boot failures; each names the file or the limit involved.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel.
    #[error("{path} is not a bootable x86 bzImage: {source}")]
    Kernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit in low memory beside the kernel.
    #[error("initramfs of {size} bytes does not fit in guest RAM below {limit:#x}")]
    InitrdTooBig { size: u64, limit: u64 },
    /// Writing into guest memory failed (a layout bug).
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing boot_params failed.
    #[error("writing boot_params: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// What the vCPU needs to start the kernel.
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: GuestAddress,
}

/// The e820 map for `ram` bytes of RAM.
pub fn e820_map(ram: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, BIOS_END - EBDA_START, E820_RESERVED),
    ];
    for r in ram_regions(ram) {
        let start = r.start.max(HIMEM_START);
        let end = r.start + r.len;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Load everything and write boot_params; returns the entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram: u64,
    vcpus: u8,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let read_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| BootError::Read { path, source }
    };
    let mut kfile = File::open(kernel).map_err(read_err(kernel))?;
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut kfile,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| BootError::Kernel {
        path: kernel.display().to_string(),
        source,
    })?;

    let mut cl = Cmdline::new(crate::config::MAX_CMDLINE_LEN)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    if let Some(path) = initramfs {
        let data = std::fs::read(path).map_err(read_err(path))?;
        let low_end = ram_regions(ram)[0].len;
        let limit = low_end.min(u64::from(params.hdr.initrd_addr_max) + 1);
        let size = data.len() as u64;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|a| *a >= loaded.kernel_end)
            .ok_or(BootError::InitrdTooBig { size, limit })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| BootError::Memory {
                what: "initramfs",
                source,
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    for (i, (addr, size, kind)) in e820_map(ram).into_iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = kind;
        params.e820_entries = i as u8 + 1;
    }

    let mp = mptable::build(EBDA_START, vcpus);
    mem.write_slice(&mp, GuestAddress(EBDA_START))
        .map_err(|source| BootError::Memory {
            what: "MP table",
            source,
        })?;
    let tables = acpi::build(ACPI_START, vcpus, ram);
    for (addr, blob) in &tables.blobs {
        mem.write_slice(blob, GuestAddress(*addr))
            .map_err(|source| BootError::Memory {
                what: "ACPI tables",
                source,
            })?;
    }
    params.acpi_rsdp_addr = tables.rsdp_addr;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)?;

    debug_assert!(mem.address_in_range(GuestAddress(ZERO_PAGE_START)));
    Ok(BootInfo {
        entry: GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_the_bios_area() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (512 << 20) - HIMEM_START, E820_RAM));
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (512 << 20) - (BIOS_END - EBDA_START));
    }

    #[test]
    fn e820_splits_around_the_pci_hole() {
        let m = e820_map(6 << 30);
        let high = m.last().unwrap();
        assert_eq!(high.0, 1 << 32);
        assert_eq!(high.1, (6 << 30) - crate::layout::PCI_HOLE_START);
        for w in m.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        assert!(m.len() <= 128);
    }
}
