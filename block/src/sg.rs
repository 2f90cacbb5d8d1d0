//! Scatter-gather lists: guest memory resolved to host slices, and aligned bounce buffers.
//!
//! A request's [`SgList`] holds raw host pointers. They stay valid because the list also holds
//! a clone of the guest memory map (an `Arc` per region), so the mapping outlives the request.

use std::alloc::{self, Layout};
use std::any::Any;
use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::BlockError;

/// One host memory segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoVec {
    /// Start of the segment in this process.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

impl IoVec {
    pub(crate) fn to_libc(self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.cast(),
            iov_len: self.len,
        }
    }
}

/// A scatter-gather list of host segments plus whatever keeps them mapped.
pub struct SgList {
    iovecs: Vec<IoVec>,
    len: usize,
    _keepalive: Option<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for SgList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgList")
            .field("iovecs", &self.iovecs)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the pointers refer to guest memory (kept mapped by `_keepalive`) or to memory the
// creator of `from_raw` promised stays valid; the block layer only touches them from one engine
// operation at a time per byte, as a DMA engine would.
unsafe impl Send for SgList {}

impl SgList {
    /// Resolve guest physical segments `(address, length)` to host slices. A segment that
    /// crosses a region boundary becomes several host segments.
    pub fn from_guest(
        mem: &GuestMemoryMmap,
        segments: &[(GuestAddress, usize)],
    ) -> Result<SgList, BlockError> {
        let mut iovecs = Vec::with_capacity(segments.len());
        let mut len = 0usize;
        for &(addr, seg_len) in segments {
            let bad = || BlockError::GuestMemory {
                addr: addr.0,
                len: seg_len,
            };
            let mut got = 0usize;
            for slice in mem.get_slices(addr, seg_len) {
                let slice = slice.map_err(|_| bad())?;
                let guard = slice.ptr_guard_mut();
                iovecs.push(IoVec {
                    base: guard.as_ptr(),
                    len: slice.len(),
                });
                got += slice.len();
            }
            if got != seg_len {
                return Err(bad());
            }
            len = len.checked_add(seg_len).ok_or_else(bad)?;
        }
        Ok(SgList {
            iovecs,
            len,
            _keepalive: Some(Box::new(mem.clone())),
        })
    }

    /// Build a list from raw host segments.
    ///
    /// # Safety
    /// Every segment must be valid for reads and writes for its whole length until the request
    /// that carries this list has completed (or been handed back), and nothing else may access
    /// it meanwhile. `keepalive` is dropped with the list and may own the memory.
    pub unsafe fn from_raw(iovecs: Vec<IoVec>, keepalive: Option<Box<dyn Any + Send>>) -> SgList {
        let len = iovecs.iter().map(|v| v.len).sum();
        SgList {
            iovecs,
            len,
            _keepalive: keepalive,
        }
    }

    /// Put `other`'s segments after this list's, as one transfer (a device joining two
    /// requests for adjacent disk ranges). What keeps either list's memory valid is kept.
    pub fn append(&mut self, mut other: SgList) {
        self.iovecs.append(&mut other.iovecs);
        self.len += other.len;
        self._keepalive = match (self._keepalive.take(), other._keepalive.take()) {
            (Some(a), Some(b)) => Some(Box::new((a, b))),
            (a, b) => a.or(b),
        };
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host segments.
    pub fn iovecs(&self) -> &[IoVec] {
        &self.iovecs
    }

    /// Whether O_DIRECT can use these segments as they are.
    pub(crate) fn is_aligned(&self, mem_align: usize, len_align: usize) -> bool {
        self.iovecs
            .iter()
            .all(|v| (v.base as usize) % mem_align == 0 && v.len % len_align == 0)
    }

    /// Copy `src` into the list starting at byte `at` of the list.
    pub(crate) fn copy_from(&self, mut at: usize, mut src: &[u8]) {
        for v in &self.iovecs {
            if src.is_empty() {
                break;
            }
            if at >= v.len {
                at -= v.len;
                continue;
            }
            let n = (v.len - at).min(src.len());
            // SAFETY: [base+at, base+at+n) lies inside the segment, which `from_guest` /
            // `from_raw` guarantee valid for writes while the request is in flight; `src` is a
            // bounce buffer that cannot overlap guest memory.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.base.add(at), n) };
            src = &src[n..];
            at = 0;
        }
    }

    /// Copy the list, starting at byte `at`, into `dst`.
    pub(crate) fn copy_to(&self, mut at: usize, mut dst: &mut [u8]) {
        for v in &self.iovecs {
            if dst.is_empty() {
                break;
            }
            if at >= v.len {
                at -= v.len;
                continue;
            }
            let n = (v.len - at).min(dst.len());
            // SAFETY: as in `copy_from`, with the roles of source and destination swapped.
            unsafe { std::ptr::copy_nonoverlapping(v.base.add(at), dst.as_mut_ptr(), n) };
            dst = &mut dst[n..];
            at = 0;
        }
    }

    /// Zero the list from byte `at` to its end.
    pub(crate) fn zero_from(&self, at: usize) {
        self.zero_range(at, self.len.saturating_sub(at));
    }

    /// Zero `len` bytes of the list from byte `at` (clipped to the list).
    pub(crate) fn zero_range(&self, mut at: usize, mut len: usize) {
        for v in &self.iovecs {
            if len == 0 {
                break;
            }
            if at >= v.len {
                at -= v.len;
                continue;
            }
            let n = (v.len - at).min(len);
            // SAFETY: [base+at, base+at+n) lies inside the segment, valid for writes while
            // the request is in flight (as in `copy_from`).
            unsafe { std::ptr::write_bytes(v.base.add(at), 0, n) };
            len -= n;
            at = 0;
        }
    }

    /// The segments covering bytes `skip..skip + len` of the list.
    pub(crate) fn iovecs_range(&self, skip: usize, mut len: usize) -> Vec<IoVec> {
        let mut out: Vec<IoVec> = self.iovecs_after(skip).collect();
        out.retain_mut(|v| {
            if len == 0 {
                return false;
            }
            v.len = v.len.min(len);
            len -= v.len;
            true
        });
        out
    }

    /// The segments after the first `skip` bytes (an iterator, so that a request's host
    /// iovec array is its one allocation on the I/O path).
    pub(crate) fn iovecs_after(&self, mut skip: usize) -> impl Iterator<Item = IoVec> + '_ {
        self.iovecs.iter().filter_map(move |v| {
            if skip >= v.len {
                skip -= v.len;
                return None;
            }
            // SAFETY: skip < v.len, so the result points inside the same segment.
            let base = unsafe { v.base.add(skip) };
            let len = v.len - skip;
            skip = 0;
            Some(IoVec { base, len })
        })
    }
}

/// A page: the alignment that serves every O_DIRECT memory requirement and that file systems
/// count as aligned (see `Disk::bounce_align`).
pub(crate) const PAGE_ALIGN: usize = 4096;

/// A heap buffer aligned for O_DIRECT, zero-initialised unless made for a read to fill.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> AlignedBuf {
        Self::alloc(len, align, true)
    }

    /// A buffer whose bytes are not cleared: only for one that a host read fills, or whose
    /// owner clears ([`AlignedBuf::zero`]) every byte it does not read into, before anything
    /// looks at it. Why: a copy-on-write reads up to a cluster less 4 KiB into such buffers,
    /// and zeroing them first was a tenth of the CPU time of 4 KiB writes into a fresh
    /// overlay at depth 32.
    pub(crate) fn for_reading(len: usize, align: usize) -> AlignedBuf {
        Self::alloc(len, align, false)
    }

    fn alloc(len: usize, align: usize, zeroed: bool) -> AlignedBuf {
        let layout =
            Layout::from_size_align(len.max(1), align.max(1)).expect("bounce buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    /// Clear `len` bytes from `at`.
    pub(crate) fn zero(&mut self, at: usize, len: usize) {
        assert!(at + len <= self.len());
        // SAFETY: at + len <= allocation size; `&mut self` gives exclusive access.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, len) };
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    pub(crate) fn iovec(&self, at: usize, len: usize) -> IoVec {
        assert!(at + len <= self.len());
        IoVec {
            // SAFETY: at + len <= allocation size.
            base: unsafe { self.ptr.as_ptr().add(at) },
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation is `layout.size()` bytes long and initialised: zeroed, or,
        // made `for_reading`, filled or cleared by its owner before it is looked at.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn guest_segments_resolve_across_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let sg = SgList::from_guest(
            &mem,
            &[(GuestAddress(0xff0), 0x20), (GuestAddress(0x10), 4)],
        )
        .unwrap();
        assert_eq!(sg.len(), 0x24);
        assert_eq!(sg.iovecs().len(), 3);
        let data: Vec<u8> = (0..0x24u8).collect();
        sg.copy_from(0, &data);
        let mut back = vec![0u8; 0x24];
        sg.copy_to(0, &mut back);
        assert_eq!(back, data);
        let mut g = [0u8; 4];
        mem.read_slice(&mut g, GuestAddress(0x10)).unwrap();
        assert_eq!(g, [0x20, 0x21, 0x22, 0x23]);
        assert_eq!(sg.iovecs_after(0x18).next().unwrap().len, 8);
    }

    /// Ranges across segment boundaries: zeroing touches exactly the range, and the
    /// iovecs of a range cover exactly its bytes.
    #[test]
    fn ranges_cross_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[0xffu8; 0x100], GuestAddress(0)).unwrap();
        let sg = SgList::from_guest(
            &mem,
            &[
                (GuestAddress(0x10), 8),
                (GuestAddress(0x40), 8),
                (GuestAddress(0x80), 8),
            ],
        )
        .unwrap();
        sg.zero_range(6, 12);
        let mut back = [0u8; 24];
        sg.copy_to(0, &mut back);
        let want: Vec<u8> = (0..24)
            .map(|i| if (6..18).contains(&i) { 0 } else { 0xff })
            .collect();
        assert_eq!(back[..], want[..]);
        let mut outside = [0u8; 8];
        mem.read_slice(&mut outside, GuestAddress(0x18)).unwrap();
        assert_eq!(outside, [0xff; 8], "zeroing stays inside the segments");
        sg.zero_range(20, 100);
        sg.copy_to(0, &mut back);
        assert_eq!(back[20..], [0; 4]);

        let r = sg.iovecs_range(6, 12);
        let lens: Vec<usize> = r.iter().map(|v| v.len).collect();
        assert_eq!(lens, [2, 8, 2]);
        assert_eq!(r[0].base as usize - sg.iovecs()[0].base as usize, 6);
        assert_eq!(r[2].base, sg.iovecs()[2].base);
    }

    #[test]
    fn appended_lists_are_one_transfer() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut a = SgList::from_guest(&mem, &[(GuestAddress(0x100), 4)]).unwrap();
        let b =
            SgList::from_guest(&mem, &[(GuestAddress(0x10), 2), (GuestAddress(0x40), 2)]).unwrap();
        a.append(b);
        assert_eq!((a.len(), a.iovecs().len()), (8, 3));
        a.copy_from(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut g = [0u8; 2];
        mem.read_slice(&mut g, GuestAddress(0x40)).unwrap();
        assert_eq!(
            g,
            [7, 8],
            "the appended list's bytes follow the first list's"
        );
        mem.read_slice(&mut g, GuestAddress(0x10)).unwrap();
        assert_eq!(g, [5, 6]);
    }

    #[test]
    fn unmapped_guest_segment_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = SgList::from_guest(&mem, &[(GuestAddress(0xf00), 0x200)]).unwrap_err();
        assert!(matches!(err, BlockError::GuestMemory { addr: 0xf00, .. }));
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(8192, 4096);
        assert_eq!(b.iovec(0, 1).base as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
