//! Guest RAM: anonymous mappings registered with KVM as memory slots.
//!
//! Each mapping starts on a 2 MiB boundary and is advised MADV_HUGEPAGE, as QEMU does
//! for its RAM: KVM maps a guest 2 MiB page with one huge EPT/NPT entry only when the
//! host virtual address and the guest physical address are both 2 MiB aligned and the
//! host backs it with a transparent huge page. A plain anonymous mmap lands on any 4 KiB
//! boundary, which leaves every guest page a 4 KiB one in the second-level tables (more
//! TLB misses, longer nested walks), and with THP in `madvise` mode (common in
//! distributions) no huge pages at all.
//!
//! The mappings live as long as the process: devices hold clones of the memory on their
//! own threads until exit, and a guest reboot with `on_reboot = "restart"` re-executes
//! Platter.

use std::io;
use std::ptr::null_mut;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::layout::ram_regions;

/// Failures while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {size} MiB of guest RAM: {source}")]
    Allocate {
        size: u64,
        #[source]
        source: io::Error,
    },
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Register(#[source] kvm_ioctls::Error),
}

/// Map `size` bytes of RAM (split around the PCI hole) and give it to `vm`.
pub fn create(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .iter()
        .map(|r| (GuestAddress(r.start), r.len as usize))
        .collect();
    let alloc = |source: io::Error| MemoryError::Allocate {
        size: size >> 20,
        source,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in &ranges {
        let host = map_huge_aligned(len).map_err(alloc)?;
        // SAFETY: `host` is the start of a fresh anonymous mapping of `len` bytes with these
        // protection and flags, never unmapped (see the module docs).
        let region = unsafe { MmapRegion::build_raw(host, len, PROT, FLAGS) }
            .map_err(|e| alloc(io::Error::other(e)))?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| alloc(io::Error::other("the region overflows the address space")))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| alloc(io::Error::other(e)))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's own start is mapped");
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points at a live mapping of `region.len()` bytes that
        // `mem` owns; `mem` outlives the VM because the VM is torn down by
        // process exit, never before the memory it was given.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Register)?;
    }
    Ok(mem)
}

/// Huge page size the mappings are aligned to (x86-64 PMD).
const HUGE_PAGE: usize = 2 << 20;
const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// vm-memory's flags for anonymous guest RAM.
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// An anonymous mapping of `len` bytes starting on a [`HUGE_PAGE`] boundary, advised for
/// transparent huge pages: map `HUGE_PAGE` more than needed and give back the ends.
fn map_huge_aligned(len: usize) -> io::Result<*mut u8> {
    let padded = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::other("guest RAM size overflows"))?;
    // SAFETY: a new private anonymous mapping at an address the kernel picks; it touches no
    // existing memory.
    let p = unsafe { libc::mmap(null_mut(), padded, PROT, FLAGS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = padded - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside [aligned, aligned +
    // len), which is all that is used; head and tail are page multiples (mmap returns a
    // page-aligned start, len is a page multiple).
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on the mapping just made. It fails only where THP is compiled out,
    // which costs the huge pages and nothing else.
    unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Ok(aligned as *mut u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_starts_on_a_huge_page_boundary_and_is_advised() {
        for len in [HUGE_PAGE, 3 * HUGE_PAGE + 4096, 64 << 20] {
            let p = map_huge_aligned(len).unwrap() as usize;
            assert_eq!(p % HUGE_PAGE, 0, "len {len}");
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let at = smaps
                .find(&format!("\n{p:x}-"))
                .unwrap_or_else(|| panic!("no mapping at {p:x}"));
            let flags = smaps[at..]
                .lines()
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap();
            assert!(flags.contains(" hg"), "MADV_HUGEPAGE not set: {flags}");
            // SAFETY: the test's own mapping, unused after this.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}
