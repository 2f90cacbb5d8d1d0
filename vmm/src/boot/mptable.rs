//! The Intel MultiProcessor Specification 1.4 table (chapter 4): how a kernel
//! booted with `acpi=off` (and the X86_MPPARSE code in Debian's kernel) finds
//! the vCPUs, the IOAPIC and how ISA IRQs reach it.
//!
//! ```text
//! EBDA: [floating pointer "_MP_" 16 B][config header "PCMP" 44 B][entries...]
//! entries: processor x N (20 B), bus ISA + PCI (8 B), IOAPIC (8 B),
//!          I/O interrupt x 16 (8 B), local interrupt LINT0/LINT1 (8 B)
//! ```

use crate::layout::IOAPIC_ADDR;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const BUS_ISA: u8 = 0;
const BUS_PCI: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
/// ISA IRQs routed identity-mapped to IOAPIC pins.
pub const ISA_IRQS: u8 = 16;

/// The IOAPIC's ID: after the vCPUs' APIC IDs (0..vcpus).
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// Build the table for `vcpus` vCPUs, to be written at guest address `base`.
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic = ioapic_id(vcpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informational.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_ISA, b"ISA   "), (BUS_PCI, b"PCI   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[2, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n reaches IOAPIC pin n: KVM's default GSI routing wires GSI n
    // to both the 8259 and IOAPIC pin n, the PIT included.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, BUS_ISA, irq, ioapic, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]);
    header.extend_from_slice(b"PLATTER ");
    header.extend_from_slice(b"KVM VM      ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(crate::layout::APIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let sum = checksum(&[header.as_slice(), entries.as_slice()].concat());
    header[7] = sum;

    let mut fp = Vec::with_capacity(FLOATING_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    [fp, header, entries].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_right() {
        let base = 0x9fc00;
        let t = build(base, 2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, base + 16);
        let h = &t[16..];
        assert_eq!(&h[0..4], b"PCMP");
        let len = u16::from_le_bytes([h[4], h[5]]) as usize;
        assert_eq!(len, h.len());
        assert_eq!(sum(h), 0);
    }

    #[test]
    fn entries_describe_cpus_and_ioapic() {
        for vcpus in [1u8, 2, 8, 254] {
            let t = build(0, vcpus);
            let h = &t[16..];
            let count = u16::from_le_bytes([h[34], h[35]]);
            let mut p = HEADER_LEN;
            let (mut cpus, mut bsp, mut ioapics, mut ints) = (0, 0, 0, 0);
            for _ in 0..count {
                match h[p] {
                    0 => {
                        assert_eq!(h[p + 1], cpus as u8, "APIC IDs are 0..n");
                        cpus += 1;
                        bsp += (h[p + 3] & CPU_FLAG_BSP != 0) as u32;
                        p += 20;
                    }
                    2 => {
                        assert_eq!(h[p + 1], ioapic_id(vcpus));
                        ioapics += 1;
                        p += 8;
                    }
                    3 => {
                        assert_eq!(h[p + 6], ioapic_id(vcpus));
                        ints += 1;
                        p += 8;
                    }
                    1 | 4 => p += 8,
                    t => panic!("unexpected entry type {t}"),
                }
            }
            assert_eq!(p, h.len());
            assert_eq!((cpus, bsp, ioapics), (vcpus as u32, 1, 1));
            assert_eq!(ints, ISA_IRQS as u32);
        }
    }
}
