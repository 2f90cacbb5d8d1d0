//! The guest physical address map. Everything the VMM places in guest memory
//! has its address here, so overlaps are visible in one screen.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0009_fc00  MP table (EBDA)
//! 0x0000_0520  IDT (empty)         0x000e_0000  ACPI tables (RSDP first)
//! 0x0000_7000  boot_params         0x0010_0000  kernel (1 MiB)
//! 0x0000_8ff0  boot stack top      ...          initramfs at top of low RAM
//! 0x0000_9000  PML4                0xc000_0000  32-bit PCI MMIO hole
//! 0x0000_a000  PDPT                0xfec0_0000  IOAPIC
//! 0x0000_b000  PD (1 GiB, 2 MiB)   0xfee0_0000  local APIC
//! 0x0002_0000  kernel cmdline      4 GiB        RAM above the hole
//! ```

/// GDT for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT (Linux installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack pointer at entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP must lie in 0xe0000..0xfffff for legacy scans.
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI hole; RAM above this moves above 4 GiB.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit PCI MMIO window (the IOAPIC follows).
pub const PCI_MMIO32_END: u64 = 0xfec0_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// First byte above 4 GiB.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Size of the 64-bit PCI MMIO window placed above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// KVM's TSS region on Intel (three pages just below the BIOS).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page on Intel (just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_PORT: u64 = 0x60;
/// CMOS RTC index and data ports.
pub const RTC_PORT: u64 = 0x70;
/// ACPI PM1a event block (status + enable).
pub const ACPI_PM1A_EVT: u64 = 0x600;
/// ACPI PM1a control block.
pub const ACPI_PM1A_CNT: u64 = 0x604;
/// SCI interrupt announced in the FADT.
pub const ACPI_SCI_IRQ: u16 = 9;
/// End of the I/O port space.
pub const PCI_IO_END: u64 = 0x1_0000;

/// A guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Split `size` bytes of RAM around the PCI hole.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    if size <= PCI_HOLE_START {
        vec![RamRegion {
            start: 0,
            len: size,
        }]
    } else {
        vec![
            RamRegion {
                start: 0,
                len: PCI_HOLE_START,
            },
            RamRegion {
                start: HIGH_RAM_START,
                len: size - PCI_HOLE_START,
            },
        ]
    }
}

/// First address of the 64-bit PCI window: above all RAM, 1 GiB aligned.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    let top = ram_regions(ram_size)
        .last()
        .map(|r| r.start + r.len)
        .unwrap_or(0)
        .max(HIGH_RAM_START);
    top.next_multiple_of(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_the_hole_is_one_region() {
        assert_eq!(
            ram_regions(512 << 20),
            vec![RamRegion {
                start: 0,
                len: 512 << 20
            }]
        );
        assert_eq!(pci_mmio64_start(512 << 20), HIGH_RAM_START);
    }

    #[test]
    fn ram_crossing_the_hole_moves_above_4g() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, PCI_HOLE_START);
        assert_eq!(r[1].start, HIGH_RAM_START);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, 2048),
            (EBDA_START, 0x400),
            (ACPI_START, 0x10000),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} {b:x?}");
            }
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
