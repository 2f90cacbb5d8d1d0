//! Can this host's KVM boot a stock Linux guest?
//!
//! Some hosts expose a `/dev/kvm` that only runs specially built guests at
//! native speed: PVM ("Pagetable-based Virtual Machine", module `kvm_pvm`)
//! runs anything else through KVM's instruction emulator at a few MIPS, where
//! a stock kernel never finishes booting. We tell such a host apart by timing
//! a tiny real-mode loop: hardware-assisted KVM runs it in well under a
//! millisecond, an emulating KVM takes hundreds.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Loop iterations in the probe (two instructions each).
pub const PROBE_ITERATIONS: u32 = 200_000;
/// Slower than this and the host cannot boot a stock kernel usefully.
pub const PROBE_LIMIT: Duration = Duration::from_millis(50);
const PROBE_CODE_ADDR: u64 = 0x1000;

/// Why KVM can't be used at all.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No /dev/kvm.
    #[error("/dev/kvm does not exist: KVM is not available on this host (enable virtualization in the firmware and load kvm_intel or kvm_amd)")]
    NoKvm,
    /// /dev/kvm not accessible.
    #[error("permission denied opening /dev/kvm: add your user to the `kvm` group (sudo usermod -aG kvm $USER) and log in again")]
    Permission,
    /// Another failure opening KVM.
    #[error("cannot use /dev/kvm: {0}")]
    Open(#[source] io::Error),
    /// The probe VM could not be built.
    #[error("KVM speed probe failed: {0}")]
    Probe(String),
}

/// Open /dev/kvm, mapping the common failures to advice.
pub fn open_kvm() -> Result<Kvm, HostError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => HostError::NoKvm,
        libc::EACCES | libc::EPERM => HostError::Permission,
        _ => HostError::Open(io::Error::from_raw_os_error(e.errno())),
    })
}

/// The verdict on the host's KVM.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// How long the probe loop took.
    pub probe: Duration,
    /// `kvm_pvm` is loaded.
    pub pvm: bool,
}

impl Verdict {
    /// Can a stock kernel boot at a useful speed?
    pub fn can_boot_stock_guest(&self) -> bool {
        self.probe < PROBE_LIMIT
    }

    /// One line naming the cause.
    pub fn explain(&self) -> String {
        let what = if self.pvm {
            "this host's KVM is PVM (module kvm_pvm), which runs only PVM-built guests natively"
        } else {
            "this host's KVM emulates guest instructions instead of running them"
        };
        format!(
            "{what}: a {}-instruction probe took {} ms (hardware-assisted KVM: under 1 ms), so a stock Linux kernel cannot boot at a useful speed",
            2 * PROBE_ITERATIONS,
            self.probe.as_millis()
        )
    }
}

/// Time the probe loop in a throwaway VM.
pub fn probe(kvm: &Kvm) -> Result<Verdict, HostError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: kvm_ioctls::Error| HostError::Probe(format!("{what}: {e}"))
    };
    let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])
        .map_err(|e| HostError::Probe(e.to_string()))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| HostError::Probe(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x10000,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps 64 KiB at `host` and lives until `vm` is dropped at
    // the end of this function (declared before it, dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
    // mov ecx, N; l: dec ecx; jnz l; hlt   (real mode, 32-bit operands)
    let n = PROBE_ITERATIONS.to_le_bytes();
    let code = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], 0x66, 0x49, 0x75, 0xfc, 0xf4,
    ];
    mem.write_slice(&code, GuestAddress(PROBE_CODE_ADDR))
        .map_err(|e| HostError::Probe(e.to_string()))?;
    let mut vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
    regs.rip = PROBE_CODE_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => return Err(HostError::Probe(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(HostError::Probe(format!("KVM_RUN: {e}"))),
        }
    }
    let probe = start.elapsed();
    let ecx = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?.rcx;
    if ecx & 0xffff_ffff != 0 {
        return Err(HostError::Probe(format!("loop ended with ecx = {ecx:#x}")));
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(Verdict {
        probe,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
    })
}
