//! ACPI tables (ACPI 6.5): the guest learns its CPUs (MADT), its PCI root
//! bridge (DSDT `PNP0A08`) and how to power off (`_S5` + the PM1a control
//! block in the FADT) from these. Without ACPI a stock kernel's `poweroff`
//! can only halt, and Platter would never learn the guest is done.
//!
//! ```text
//! ACPI_START: RSDP -> XSDT -> { FACP -> { DSDT, FACS }, APIC (MADT) }
//! ```

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::boot::mptable::ioapic_id;
use crate::layout::{
    ACPI_PM1A_CNT, ACPI_PM1A_EVT, ACPI_SCI_IRQ, APIC_ADDR, I8042_PORT, IOAPIC_ADDR, PCI_HOLE_START,
    PCI_IO_END, PCI_MMIO32_END, PCI_MMIO64_SIZE,
};

const OEM_ID: [u8; 6] = *b"PLATTR";
const OEM_TABLE: [u8; 8] = *b"PLATTERV";
/// The SLP_TYP value `_S5_` announces; the PM device powers off on it.
pub const S5_SLP_TYP: u8 = 5;
/// FADT IAPC_BOOT_ARCH bit 0: ISA legacy devices (COM1, RTC) present.
const IAPC_LEGACY_DEVICES: u16 = 1;
/// The i8042 command that pulses the CPU reset line; also the FADT reset value.
pub const I8042_RESET_CMD: u8 = 0xfe;

/// Where each table went and the RSDP's address (for boot_params).
pub struct AcpiTables {
    /// Guest address of the RSDP.
    pub rsdp_addr: u64,
    /// (guest address, bytes) of every table, RSDP included.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `\_S5_` and the PCI root bridge with the windows it decodes.
fn dsdt(mmio64_start: u64) -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]),
    );
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, (PCI_IO_END - 1) as u16, None);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_HOLE_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &io_low, &io_high, &mmio32, &mmio64]);
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &0u8),
        aml::Name::new("_SEG".into(), &0u8),
        aml::Name::new("_UID".into(), &0u8),
        aml::Name::new("_BBN".into(), &0u8),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    let pci = aml::Device::new("_SB_.PCI0".into(), children);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    pci.to_aml_bytes(&mut body);
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&body);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless);
    f.sci_int = ACPI_SCI_IRQ.into();
    // SMI_CMD = 0: the machine is always in ACPI mode, no handover needed.
    f.pm1a_evt_blk = (ACPI_PM1A_EVT as u32).into();
    f.pm1_evt_len = 4;
    f.pm1a_cnt_blk = (ACPI_PM1A_CNT as u32).into();
    f.pm1_cnt_len = 2;
    // IA-PC boot architecture: legacy devices present; no 8042 keyboard
    // controller to probe (Platter's i8042 only carries the reset line, which
    // the reset register below reaches, so the guest skips a slow probe).
    f.iapc_boot_arch = IAPC_LEGACY_DEVICES.into();
    // Reset: write 0xfe to the i8042 command port, like a keyboard-controller reset.
    f.reset_reg = acpi_tables::gas::GAS::new(
        acpi_tables::gas::AddressSpace::SystemIo,
        8,
        0,
        acpi_tables::gas::AccessSize::ByteAccess,
        I8042_PORT + 4,
    );
    f.reset_value = I8042_RESET_CMD;
    bytes(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(APIC_ADDR as u32),
    );
    for cpu in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(ioapic_id(vcpus), IOAPIC_ADDR as u32, 0));
    let mut v = bytes(&m);
    // MADT flags bit 0: PCAT_COMPAT (dual 8259s present), so Linux masks them.
    v[40] |= 1;
    v[9] = 0;
    v[9] = checksum(&v);
    v
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, x| s.wrapping_sub(*x))
}

/// Build all tables for a machine with `vcpus` vCPUs and `ram` bytes of RAM,
/// laid out from `base`.
pub fn build(base: u64, vcpus: u8, ram: u64) -> AcpiTables {
    let mut next = base;
    let mut place = |len: usize, align: u64| {
        let at = next.next_multiple_of(align);
        next = at + len as u64;
        at
    };
    let rsdp_addr = place(Rsdp::len(), 16);
    let dsdt = dsdt(crate::layout::pci_mmio64_start(ram));
    let dsdt_addr = place(dsdt.len(), 8);
    let facs = bytes(&acpi_tables::facs::FACS::new());
    let facs_addr = place(facs.len(), 64);
    let fadt = fadt(dsdt_addr, facs_addr);
    let fadt_addr = place(fadt.len(), 8);
    let madt = madt(vcpus);
    let madt_addr = place(madt.len(), 8);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = place(xsdt.len(), 8);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    AcpiTables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (facs_addr, facs),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_do_not_overlap() {
        let t = build(0xe0000, 2, 512 << 20);
        assert_eq!(t.rsdp_addr, 0xe0000);
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (addr, b) in &t.blobs {
            match &b[0..4] {
                b"RSD " => assert_eq!(sum(&b[..20]), 0),
                b"FACS" => {}
                _ => {
                    assert_eq!(sum(b), 0, "{:?}", std::str::from_utf8(&b[0..4]));
                    let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
                    assert_eq!(len, b.len());
                }
            }
            for (a, l) in &spans {
                assert!(addr + b.len() as u64 <= *a || a + l <= *addr);
            }
            spans.push((*addr, b.len() as u64));
        }
        let end = spans.iter().map(|(a, l)| a + l).max().unwrap();
        assert!(end <= crate::layout::BIOS_END);
    }

    #[test]
    fn madt_lists_every_cpu() {
        let m = madt(4);
        assert_eq!(&m[0..4], b"APIC");
        let mut p = 44;
        let mut cpus = 0;
        while p < m.len() {
            if m[p] == 0 {
                assert_eq!(m[p + 3], cpus);
                cpus += 1;
            }
            p += m[p + 1] as usize;
        }
        assert_eq!(cpus, 4);
    }

    #[test]
    fn dsdt_has_s5_and_pci_root() {
        let d = dsdt(1 << 32);
        let has = |n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(has(b"_S5_"));
        assert!(has(b"PCI0"));
    }
}
