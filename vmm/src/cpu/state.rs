//! A one-line summary of a vCPU's state, printed when the guest dies (triple
//! fault) so the report says where: the instruction, the stack, paging and
//! the descriptor tables, as QEMU's register dump would.

use kvm_ioctls::VcpuFd;

/// `rip=... rsp=... cr0=... cr2=... cr3=... cr4=... efer=... idt=base/limit ...`,
/// or why the state could not be read.
pub fn summary(fd: &VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("registers unreadable: {e}"),
    };
    let s = match fd.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("rip={:#x}; special registers unreadable: {e}", regs.rip),
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        s.cs.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit,
    )
}
