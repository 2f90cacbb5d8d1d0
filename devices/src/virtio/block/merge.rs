//! Joining the reads or writes of one batch that continue each other (QEMU's virtio-blk
//! `request-merging`).
//!
//! A guest at depth N that reads or writes a file sequentially (`fio --rw=write --iodepth=8`,
//! a copy, a database log) puts several requests for adjacent ranges on the ring at once;
//! its own block layer merges only those it held in one plug. Each request the disk runs
//! costs a host system call, an io_uring entry, a range lock and a completion, and in a
//! nested host each of those costs a VM exit: joined, eight 128 KiB writes are one 1 MiB
//! write. The join happens only among chains popped in one batch (nothing waits for a
//! request still to come), so a lone request is submitted exactly as before.
//!
//! ```text
//!  ring: W 0+128K  W 128K+128K  R 9M+4K  W 256K+128K
//!        └── held ──┴─ joined ─┘   │       └─ held again (the read broke the run)
//!                                  submitted after the held write
//! ```

use platter_block::{IoKind, RequestOp};

/// Most bytes one joined request carries: QEMU's bound is the host's largest transfer,
/// which for a file is unbounded; this keeps a bounce buffer (O_DIRECT with unaligned guest
/// buffers) and one request's share of the disk reasonable.
pub(super) const MAX_BYTES: usize = 4 << 20;
/// Most host segments in one request: what one preadv/pwritev takes (Linux UIO_MAXIOV).
pub(super) const MAX_IOVECS: usize = 1024;

/// A read or write that the next request of the batch may still join.
pub(super) struct Held {
    /// Slot of the first virtio request (the disk request's tag).
    pub(super) first: usize,
    /// Slot of the last one joined, which the next joined one follows.
    pub(super) last: usize,
    pub(super) op: RequestOp,
}

impl Held {
    /// Join `op` (the request in `slot`) to the held request if it continues it: same
    /// direction, starting where the held one ends, within [`MAX_BYTES`] and
    /// [`MAX_IOVECS`]. Gives `op` back otherwise.
    pub(super) fn join(&mut self, slot: usize, op: RequestOp) -> Result<IoKind, RequestOp> {
        let kind = IoKind::of(&op);
        if !joinable(&op) || IoKind::of(&self.op) != kind {
            return Err(op);
        }
        let (RequestOp::Read {
            offset: at,
            buf: held,
        }
        | RequestOp::Write {
            offset: at,
            buf: held,
        }) = &mut self.op
        else {
            return Err(op);
        };
        match op {
            RequestOp::Read { offset, buf } | RequestOp::Write { offset, buf }
                if continues(*at, held, offset, &buf) =>
            {
                held.append(buf);
                self.last = slot;
                Ok(kind)
            }
            op => Err(op),
        }
    }
}

/// Whether `buf` at `offset` continues `held` at `at`, and the two fit one request.
fn continues(
    at: u64,
    held: &platter_block::SgList,
    offset: u64,
    buf: &platter_block::SgList,
) -> bool {
    at.checked_add(held.len() as u64) == Some(offset)
        && held.len() + buf.len() <= MAX_BYTES
        && held.iovecs().len() + buf.iovecs().len() <= MAX_IOVECS
}

/// Whether a request may be held for joining at all.
pub(super) fn joinable(op: &RequestOp) -> bool {
    matches!(op, RequestOp::Read { .. } | RequestOp::Write { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use platter_block::SgList;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn sg(mem: &GuestMemoryMmap, segs: usize, len: usize) -> SgList {
        let v: Vec<_> = (0..segs)
            .map(|i| (GuestAddress((i * len) as u64), len))
            .collect();
        SgList::from_guest(mem, &v).unwrap()
    }

    fn write(mem: &GuestMemoryMmap, offset: u64, len: usize) -> RequestOp {
        RequestOp::Write {
            offset,
            buf: sg(mem, 1, len),
        }
    }

    fn held(op: RequestOp) -> Held {
        Held {
            first: 0,
            last: 0,
            op,
        }
    }

    #[test]
    fn adjacent_requests_of_one_direction_join() {
        let m = mem();
        let mut h = held(write(&m, 4096, 4096));
        assert!(matches!(h.join(1, write(&m, 8192, 512)), Ok(IoKind::Write)));
        assert!(matches!(
            h.join(2, write(&m, 8704, 1024)),
            Ok(IoKind::Write)
        ));
        assert_eq!((h.first, h.last), (0, 2));
        match &h.op {
            RequestOp::Write { offset, buf } => {
                assert_eq!((*offset, buf.len(), buf.iovecs().len()), (4096, 5632, 3))
            }
            other => panic!("{other:?}"),
        }
        let mut r = held(RequestOp::Read {
            offset: 0,
            buf: sg(&m, 1, 512),
        });
        let next = RequestOp::Read {
            offset: 512,
            buf: sg(&m, 1, 512),
        };
        assert!(matches!(r.join(7, next), Ok(IoKind::Read)));
        assert_eq!(r.last, 7);
    }

    #[test]
    fn gaps_overlaps_other_directions_and_other_ops_do_not_join() {
        let m = mem();
        let mut h = held(write(&m, 4096, 4096));
        // A gap, an overlap, a request before the held one.
        for offset in [8704, 4096, 0] {
            assert!(h.join(1, write(&m, offset, 512)).is_err(), "{offset}");
        }
        let read = RequestOp::Read {
            offset: 8192,
            buf: sg(&m, 1, 512),
        };
        assert!(matches!(h.join(1, read), Err(RequestOp::Read { .. })));
        assert!(matches!(h.join(1, RequestOp::Flush), Err(RequestOp::Flush)));
        assert_eq!(h.last, 0, "nothing refused was recorded");
        assert!(!joinable(&RequestOp::Flush));
        assert!(!joinable(&RequestOp::Discard { offset: 0, len: 1 }));
        assert!(joinable(&write(&m, 0, 512)));
    }

    #[test]
    fn joined_requests_stay_within_one_transfer() {
        let m = mem();
        // Bytes: a request that would pass MAX_BYTES stays out.
        let mut h = held(write(&m, 0, MAX_BYTES / 2));
        let mut h2 = held(write(&m, 0, MAX_BYTES / 2));
        assert!(h
            .join(1, write(&m, (MAX_BYTES / 2) as u64, MAX_BYTES / 2))
            .is_ok());
        assert!(h.join(2, write(&m, MAX_BYTES as u64, 512)).is_err());
        assert!(h2
            .join(1, write(&m, (MAX_BYTES / 2) as u64, MAX_BYTES / 2 + 512))
            .is_err());
        // Segments: 1000 + 24 fit, one more does not.
        let mut s = held(RequestOp::Write {
            offset: 0,
            buf: sg(&m, 1000, 512),
        });
        let more = |segs| RequestOp::Write {
            offset: 1000 * 512,
            buf: sg(&m, segs, 512),
        };
        assert!(s.join(1, more(25)).is_err());
        assert!(s.join(1, more(24)).is_ok());
    }
}
