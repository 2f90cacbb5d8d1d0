//! Registers, segments, page tables, MSRs and LAPIC LINT pins for the 64-bit
//! boot protocol entry: long mode, identity-mapped first GiB, `rsi` pointing
//! at boot_params (Documentation/arch/x86/boot.rst, "64-bit boot protocol").

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{kvm, CpuError};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_2M: u64 = 0x80;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The KVM segment a GDT entry at `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Write the GDT, IDT and identity page tables every vCPU shares.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |what, v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|source| CpuError::Memory { what, source })
    };
    for (i, e) in boot_gdt().iter().enumerate() {
        w("GDT", *e, BOOT_GDT_START + i as u64 * 8)?;
    }
    w("IDT", 0, BOOT_IDT_START)?;
    w("PML4", PDPTE_START | PAGE_PRESENT_RW, PML4_START)?;
    w("PDPT", PDE_START | PAGE_PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        w(
            "PD",
            (i << 21) | PAGE_PRESENT_RW | PAGE_2M,
            PDE_START + i * 8,
        )?;
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

/// Special registers for long mode with the boot GDT and page tables.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Set registers, special registers, FPU, MSRs and LAPIC LINT pins of a
/// vCPU. The BSP starts at `entry`; APs wait for INIT/SIPI from the kernel.
pub fn setup(vcpu: &VcpuFd, entry: u64, is_bsp: bool) -> Result<(), CpuError> {
    set_msrs(vcpu)?;
    set_lint(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    if !is_bsp {
        return Ok(());
    }
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs))
        .map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

fn set_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let list = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fits a FAM struct");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::warn!(
            "KVM accepted {set} of {} boot MSRs (stopped at {:#x})",
            entries.len(),
            entries[set].index
        );
    }
    Ok(())
}

/// LINT0 as ExtINT (the 8259 path) and LINT1 as NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[off..off + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, b) in reg.iter_mut().zip(v.to_le_bytes()) {
            *dst = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_as_documented() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let cs = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.tr.selector, 0x18);
    }
}
