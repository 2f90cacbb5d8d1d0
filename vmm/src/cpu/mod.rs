//! vCPU state at the 64-bit Linux entry: CPUID, MSRs, segments, paging, LAPIC.

pub mod cpuid;
pub mod regs;
pub mod state;

/// Errors while setting up a vCPU; each names the ioctl that failed.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the page tables or GDT into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Shorthand for mapping a KVM error.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}
