//! From one descriptor chain to a checked block request (VIRTIO 1.2 §5.2.6).
//!
//! ```text
//!  device-readable                         device-writable
//!  +--------------------------+----------+ +------------------+--------+
//!  | le32 type | le32 ioprio  | data     | | data (IN/GET_ID) | status |
//!  | le64 sector              | (OUT,    | |                  | u8     |
//!  |  = 16-byte header        | DISCARD) | |                  |        |
//!  +--------------------------+----------+ +------------------+--------+
//! ```
//!
//! The device may not assume any framing (§2.7.4): the header may span
//! descriptors and the status byte may share one with data. So the chain is
//! read as two byte streams, readable then writable, and cut by offsets.
//!
//! Every check the guest could fail is made here, before anything reaches
//! the disk: the chain must end in a writable descriptor (else there is no
//! status to report and the chain goes back with used length 0), readable
//! descriptors must come first, the header must be whole, data must go the
//! right way, be non-empty, whole sectors, within `seg_max` / `size_max`
//! and inside the disk, and every buffer must be guest RAM.

use platter_block::{RequestOp, SgList};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

use super::{blk_status, req_type, Limits, ID_BYTES, SECTOR_SIZE};

/// Header bytes (type, ioprio, sector).
const HEADER_SIZE: usize = 16;
const HEADER_LEN: u64 = HEADER_SIZE as u64;
/// Bytes of one discard / write-zeroes segment.
const SEGMENT_SIZE: usize = 16;
const SEGMENT_LEN: u64 = SEGMENT_SIZE as u64;
/// Flag bit of a write-zeroes segment: the device may unmap.
const FLAG_UNMAP: u32 = 1;

/// What to do with a chain.
#[derive(Debug)]
pub(super) enum Parsed {
    /// No status byte to write: give the chain back with used length 0.
    Drop,
    /// Finished here: write `code` at `status`, used length `used_len`.
    Done {
        status: GuestAddress,
        code: u8,
        used_len: u32,
    },
    /// Send `ops` to the disk; when all complete, write the status.
    Submit {
        status: GuestAddress,
        used_len: u32,
        ops: Vec<RequestOp>,
    },
}

#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// The chain cut into its readable and writable halves.
struct Streams {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Bytes `[from, to)` of a stream, as segments.
fn slice(segs: &[Seg], from: u64, to: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for s in segs {
        let (start, end) = (at.max(from), (at + s.len).min(to));
        if start < end {
            out.push(Seg {
                addr: GuestAddress(s.addr.0.wrapping_add(start - at)),
                len: end - start,
            });
        }
        at += s.len;
    }
    out
}

/// Copy bytes `[from, from + buf.len())` of a stream out of guest memory.
fn read_stream(mem: &GuestMemoryMmap, segs: &[Seg], from: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in slice(segs, from, from + buf.len() as u64) {
        let Ok(n) = usize::try_from(s.len) else {
            return false;
        };
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

fn guest_segments(segs: &[Seg]) -> Option<Vec<(GuestAddress, usize)>> {
    segs.iter()
        .map(|s| usize::try_from(s.len).ok().map(|l| (s.addr, l)))
        .collect()
}

/// Parse and check one chain; GET_ID is answered here.
pub(super) fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap, limits: &Limits) -> Parsed
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let descs: Vec<Descriptor> = chain.collect();
    // virtio-queue ends a chain early, silently, on a loop (more descriptors
    // than the queue has), an unreadable or nested indirect table, or a
    // next index out of range: the last descriptor then still says NEXT.
    let Some(last) = descs.last() else {
        return Parsed::Drop;
    };
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Parsed::Drop;
    }
    let Some(status) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return Parsed::Drop;
    };
    let status = GuestAddress(status);
    if !mem.address_in_range(status) {
        return Parsed::Drop;
    }
    let ioerr = Parsed::Done {
        status,
        code: blk_status::IOERR,
        used_len: 1,
    };

    let mut streams = Streams {
        readable: Vec::new(),
        writable: Vec::new(),
    };
    for d in &descs {
        let seg = Seg {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        if d.is_write_only() {
            streams.writable.push(seg);
        } else if streams.writable.is_empty() {
            streams.readable.push(seg);
        } else {
            // Readable after writable breaks §2.7.4.
            return ioerr;
        }
    }

    let mut header = [0u8; HEADER_SIZE];
    if total(&streams.readable) < HEADER_LEN || !read_stream(mem, &streams.readable, 0, &mut header)
    {
        return ioerr;
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector);

    let r_total = total(&streams.readable);
    let w_total = total(&streams.writable);
    let data_in = slice(&streams.writable, 0, w_total - 1);
    let data_out = slice(&streams.readable, HEADER_LEN, r_total);
    let req = Checked {
        mem,
        limits,
        status,
    };
    match kind {
        req_type::IN => {
            if !data_out.is_empty() {
                return ioerr;
            }
            req.rw(sector, &data_in, false)
        }
        req_type::OUT => {
            if !data_in.is_empty() || limits.readonly {
                return ioerr;
            }
            req.rw(sector, &data_out, true)
        }
        req_type::FLUSH => Parsed::Submit {
            status,
            used_len: 1,
            ops: vec![RequestOp::Flush],
        },
        req_type::GET_ID => {
            if !data_out.is_empty() || data_in.is_empty() {
                return ioerr;
            }
            req.get_id(&data_in)
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = kind == req_type::DISCARD;
            let offered = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !offered {
                return req.done(blk_status::UNSUPP, 1);
            }
            if !data_in.is_empty() || limits.readonly {
                return ioerr;
            }
            req.ranges(&data_out, discard)
        }
        _ => req.done(blk_status::UNSUPP, 1),
    }
}

/// A request whose status byte is known good.
struct Checked<'a> {
    mem: &'a GuestMemoryMmap,
    limits: &'a Limits,
    status: GuestAddress,
}

impl Checked<'_> {
    fn done(&self, code: u8, used_len: u32) -> Parsed {
        Parsed::Done {
            status: self.status,
            code,
            used_len,
        }
    }

    fn ioerr(&self) -> Parsed {
        self.done(blk_status::IOERR, 1)
    }

    /// Byte range of `sectors` sectors at `sector`, if inside the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(bytes)?;
        (end <= self.limits.capacity * SECTOR_SIZE).then_some(offset)
    }

    fn rw(&self, sector: u64, data: &[Seg], write: bool) -> Parsed {
        let len = total(data);
        let within_limits = data.len() <= self.limits.seg_max as usize
            && data
                .iter()
                .all(|s| s.len <= u64::from(self.limits.size_max));
        let block = self.limits.logical_block;
        if len == 0 || len % block != 0 || !within_limits {
            return self.ioerr();
        }
        let Some(offset) = self.range(sector, len).filter(|o| o % block == 0) else {
            return self.ioerr();
        };
        let (Some(segments), Ok(used)) = (guest_segments(data), u32::try_from(len)) else {
            return self.ioerr();
        };
        let Ok(buf) = SgList::from_guest(self.mem, &segments) else {
            return self.ioerr();
        };
        let (op, used_len) = if write {
            (RequestOp::Write { offset, buf }, 1)
        } else {
            (RequestOp::Read { offset, buf }, used.saturating_add(1))
        };
        Parsed::Submit {
            status: self.status,
            used_len,
            ops: vec![op],
        }
    }

    fn get_id(&self, data: &[Seg]) -> Parsed {
        let mut n = 0u64;
        for s in slice(data, 0, ID_BYTES as u64) {
            let (Ok(from), Ok(len)) = (usize::try_from(n), usize::try_from(s.len)) else {
                return self.ioerr();
            };
            if self
                .mem
                .write_slice(&self.limits.id[from..from + len], s.addr)
                .is_err()
            {
                return self.ioerr();
            }
            n += s.len;
        }
        // n is at most ID_BYTES.
        self.done(blk_status::OK, u32::try_from(n + 1).unwrap_or(1))
    }

    /// DISCARD or WRITE_ZEROES: a table of 16-byte segments.
    fn ranges(&self, data: &[Seg], discard: bool) -> Parsed {
        let (max_seg, max_sectors) = if discard {
            (self.limits.max_discard_seg, self.limits.max_discard_sectors)
        } else {
            (
                self.limits.max_write_zeroes_seg,
                self.limits.max_write_zeroes_sectors,
            )
        };
        let len = total(data);
        let count = len / SEGMENT_LEN;
        if len == 0 || len % SEGMENT_LEN != 0 || count > u64::from(max_seg) {
            return self.ioerr();
        }
        let mut ops = Vec::new();
        for i in 0..count {
            let mut seg = [0u8; SEGMENT_SIZE];
            if !read_stream(self.mem, data, i * SEGMENT_LEN, &mut seg) {
                return self.ioerr();
            }
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(sector);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Unknown flags, and unmap on a discard, are UNSUPP (§5.2.6.2).
            if flags & !FLAG_UNMAP != 0 || (discard && flags & FLAG_UNMAP != 0) {
                return self.done(blk_status::UNSUPP, 1);
            }
            if num > max_sectors {
                return self.ioerr();
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, bytes) else {
                return self.ioerr();
            };
            if bytes == 0 {
                continue;
            }
            ops.push(if discard {
                RequestOp::Discard { offset, len: bytes }
            } else {
                RequestOp::WriteZeroes {
                    offset,
                    len: bytes,
                    unmap: flags & FLAG_UNMAP != 0,
                }
            });
        }
        if ops.is_empty() {
            return self.done(blk_status::OK, 1);
        }
        Parsed::Submit {
            status: self.status,
            used_len: 1,
            ops,
        }
    }
}
