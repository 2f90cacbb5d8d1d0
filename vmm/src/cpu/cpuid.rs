//! CPUID: what KVM supports, adjusted per vCPU so the guest sees one socket
//! of `vcpus` cores with APIC IDs 0..n, and knows it runs on a hypervisor.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::{kvm, CpuError};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
/// The processor brand string, 16 bytes a leaf.
const LEAVES_BRAND: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// KVM's supported CPUID, read once for all vCPUs, with the TSC-deadline timer offered
/// when KVM emulates it.
///
/// KVM leaves the TSC-deadline bit out of its supported CPUID, since the timer lives in the
/// in-kernel LAPIC and is announced as a capability instead (QEMU and cloud-hypervisor set
/// it from there). Without it a guest arms its LAPIC timer in one-shot mode, which costs a
/// count conversion on every arm; with it, one MSR write of an absolute TSC value.
pub fn supported(kvm_fd: &Kvm) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm_fd.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        offer_tsc_deadline(&mut cpuid);
    }
    set_brand(&mut cpuid, host_leaf);
    Ok(cpuid)
}

/// One CPUID leaf of the host: (eax, ebx, ecx, edx).
fn host_leaf(leaf: u32) -> [u32; 4] {
    // SAFETY: CPUID exists on every x86-64 processor; it reads identification registers
    // and has no side effects.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(leaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Give the guest the host's brand string (what `/proc/cpuinfo` calls the model name, and
/// what a user compares with the host), as QEMU's `-cpu host` does: KVM's supported table
/// leaves those leaves empty, so a guest names its processor by family and model only
/// ("AMD 17/01"). Leaves KVM already filled, or that the table's extended range does not
/// reach, stay as they are.
fn set_brand(cpuid: &mut CpuId, host: impl Fn(u32) -> [u32; 4]) {
    let max_ext = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map_or(0, |e| e.eax);
    if max_ext < *LEAVES_BRAND.end() {
        return;
    }
    for leaf in LEAVES_BRAND {
        let [eax, ebx, ecx, edx] = host(leaf);
        match cpuid.as_mut_slice().iter_mut().find(|e| e.function == leaf) {
            Some(e) if e.eax | e.ebx | e.ecx | e.edx != 0 => {}
            Some(e) => (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, ecx, edx),
            None => {
                let entry = kvm_bindings::kvm_cpuid_entry2 {
                    function: leaf,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                };
                // A full table keeps its nameless processor.
                let _ = cpuid.push(entry);
            }
        }
    }
}

/// Set the TSC-deadline timer bit (leaf 1, ECX bit 24).
fn offer_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Bits needed to number `n` cores.
fn id_bits(n: u32) -> u32 {
    32 - (n.max(1) - 1).leading_zeros()
}

/// Adjust `cpuid` for vCPU `id` of `count`.
pub fn for_vcpu(mut cpuid: CpuId, id: u8, count: u8) -> CpuId {
    let (id, count) = (u32::from(id), u32::from(count));
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            // Cores per package - 1 in EAX[31:26] of every real cache level.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x03ff_c3ff) | ((count - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_FEATURES if count > 1 => e.ecx |= ECX_AMD_CMP_LEGACY,
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn table() -> CpuId {
        let leaf = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        CpuId::from_entries(&[
            leaf(LEAF_FEATURES, 0),
            leaf(LEAF_TOPOLOGY, 0),
            leaf(LEAF_TOPOLOGY, 1),
            leaf(LEAF_AMD_SIZES, 0),
        ])
        .unwrap()
    }

    #[test]
    fn apic_id_and_count_are_set() {
        let c = for_vcpu(table(), 3, 4);
        let e = &c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        let core = &c.as_slice()[2];
        assert_eq!((core.ebx, core.edx, core.eax), (4, 3, 2));
        assert_eq!(c.as_slice()[3].ecx & 0xff, 3);
    }

    #[test]
    fn tsc_deadline_is_offered_in_leaf_1_only() {
        let mut c = table();
        offer_tsc_deadline(&mut c);
        let with: Vec<bool> = c
            .as_slice()
            .iter()
            .map(|e| e.ecx & ECX_TSC_DEADLINE != 0)
            .collect();
        assert_eq!(with, [true, false, false, false]);
    }

    #[test]
    fn brand_string_comes_from_the_host_where_kvm_left_it_empty() {
        let leaf = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let host = |l: u32| [l, l + 1, l + 2, l + 3];
        let mut c = CpuId::from_entries(&[
            leaf(0x8000_0000, 0x8000_0008),
            leaf(0x8000_0002, 0),
            leaf(0x8000_0003, 7),
        ])
        .unwrap();
        set_brand(&mut c, host);
        let got: Vec<(u32, u32, u32)> = c
            .as_slice()
            .iter()
            .map(|e| (e.function, e.eax, e.edx))
            .collect();
        assert_eq!(
            got,
            [
                (0x8000_0000, 0x8000_0008, 0),
                (0x8000_0002, 0x8000_0002, 0x8000_0005),
                (0x8000_0003, 7, 0),
                (0x8000_0004, 0x8000_0004, 0x8000_0007),
            ]
        );
        // A table whose extended range stops short gets nothing.
        let mut short = CpuId::from_entries(&[leaf(0x8000_0000, 0x8000_0001)]).unwrap();
        set_brand(&mut short, host);
        assert_eq!(short.as_slice().len(), 1);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
