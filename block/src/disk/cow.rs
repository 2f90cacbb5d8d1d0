//! Allocating writes carried out by the engine from a driver's [`CowPlan`]:
//!
//! ```text
//!  read the old head and tail of the first and last cluster (backing file, old cluster)
//!    ─▶ write  [head] + guest bytes + [tail]  to the planned clusters, one operation per
//!       host-contiguous run
//!    ─▶ the driver links the new clusters (─▶ metadata synced when WCE is off)
//! ```
//!
//! The request holds its whole clusters exclusively from dispatch to completion
//! (`Disk::lock_range` asks [`crate::format::FormatDriver::allocates`]), so other requests
//! on those clusters wait and nothing else allocates them. A read of the head or tail that
//! fails or comes back short (a backing file whose end is not aligned for O_DIRECT) gives the
//! clusters back and runs the request on the synchronous path, which reads such ranges
//! itself; a failed write gives them back and fails the request.

use super::*;
use crate::format::CowPlan;
use crate::sg::IoVec;

/// Largest stretch of old bytes read (and dropped) to join a head and tail read into one.
const MAX_READ_GAP: usize = 128 << 10;

/// One read of old contents: `len` bytes at `host` of `fd` for guest bytes from `guest`.
struct ReadPiece {
    fd: RawFd,
    host: u64,
    guest: u64,
    len: usize,
    iovecs: Vec<libc::iovec>,
}

/// A piece of what a planned write writes: old contents kept, or the guest's bytes.
enum Segment<'a> {
    Old(&'a AlignedBuf),
    Guest(&'a SgList),
}

impl Segment<'_> {
    fn len(&self) -> usize {
        match self {
            Segment::Old(b) => b.len(),
            Segment::Guest(sg) => sg.len(),
        }
    }

    fn iovecs(&self, at: usize, len: usize) -> Vec<IoVec> {
        match self {
            Segment::Old(b) => vec![b.iovec(at, len)],
            Segment::Guest(sg) => sg.iovecs_range(at, len),
        }
    }
}

/// A planned write in flight.
pub(super) struct Cow {
    sg: SgList,
    offset: u64,
    plan: CowPlan,
    head: Option<AlignedBuf>,
    tail: Option<AlignedBuf>,
    /// Where a read over both head and tail puts the old bytes between them.
    _scratch: Option<AlignedBuf>,
    /// Expected length of each engine operation of the current stage, by part number.
    lens: Vec<usize>,
    pending: usize,
    writing: bool,
    short: bool,
    err: Option<io::Error>,
}

impl Cow {
    fn head_len(&self) -> usize {
        self.head.as_ref().map_or(0, |b| b.len())
    }

    /// Guest offset of the first byte written: the first cluster's start when its head is
    /// kept, otherwise the guest's offset.
    fn write_start(&self) -> u64 {
        self.offset - self.head_len() as u64
    }

    /// `len` bytes of what is written (head, guest bytes, tail) from `skip` on.
    fn stream(&self, mut skip: usize, mut len: usize) -> Vec<libc::iovec> {
        let segments = (self.head.iter().map(Segment::Old))
            .chain([Segment::Guest(&self.sg)])
            .chain(self.tail.iter().map(Segment::Old));
        let mut out = Vec::new();
        for seg in segments {
            if len == 0 {
                break;
            }
            if skip >= seg.len() {
                skip -= seg.len();
                continue;
            }
            let n = (seg.len() - skip).min(len);
            out.extend(seg.iovecs(skip, n).into_iter().map(|v| v.to_libc()));
            len -= n;
            skip = 0;
        }
        out
    }

    /// The write's engine operations: `(host offset, skip into the stream, length)` per run
    /// of clusters that lie next to each other in the file.
    fn runs(&self) -> Vec<(u64, usize, usize)> {
        let from = self.write_start();
        let to =
            self.offset + self.sg.len() as u64 + self.tail.as_ref().map_or(0, |b| b.len()) as u64;
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        for (i, cl) in self.plan.clusters.iter().enumerate() {
            let g = self.plan.start + i as u64 * self.plan.cluster;
            let (a, b) = (g.max(from), (g + self.plan.cluster).min(to));
            if a >= b {
                continue;
            }
            let host = cl.host + (a - g);
            let skip = (a - from) as usize;
            let len = (b - a) as usize;
            match runs.last_mut() {
                Some(r) if r.0 + r.2 as u64 == host && r.1 + r.2 == skip => r.2 += len,
                _ => runs.push((host, skip, len)),
            }
        }
        runs
    }
}

impl Disk {
    /// Start a planned write: read what the first and last cluster keep, or write at once.
    pub(super) fn begin_cow(&mut self, id: u64, offset: u64, sg: SgList, plan: CowPlan) {
        let align = self.bounce_align();
        let end = offset + sg.len() as u64;
        let mut head = plan
            .head
            .as_ref()
            .map(|_| AlignedBuf::for_reading((offset - plan.start) as usize, align));
        let mut tail = plan
            .tail
            .as_ref()
            .map(|_| AlignedBuf::for_reading((plan.end() - end) as usize, align));
        // Host extents are read into the buffers; the others (zero clusters, holes, past the
        // backing file's end) are cleared here.
        let mut pieces: Vec<ReadPiece> = Vec::new();
        for (buf, x, from) in [
            (&mut head, &plan.head, plan.start),
            (&mut tail, &plan.tail, end),
        ] {
            let (Some(buf), Some(x)) = (buf, x) else {
                continue;
            };
            let mut at = 0usize;
            for e in x {
                let len = e.len() as usize;
                match *e {
                    Extent::Host { fd, host, .. } => pieces.push(ReadPiece {
                        fd,
                        host,
                        guest: from + at as u64,
                        len,
                        iovecs: vec![buf.iovec(at, len).to_libc()],
                    }),
                    Extent::Zero { .. } => buf.zero(at, len),
                }
                at += len;
            }
            // A plan covers its head and tail whole; should one fall short, the rest is
            // zeroes rather than whatever the allocator left there.
            if at < buf.len() {
                let rest = buf.len() - at;
                buf.zero(at, rest);
            }
        }
        // Head and tail next to each other in one file (a write inside one cluster of a
        // raw backing file): one read over both, the old bytes between them read into a
        // scratch buffer and dropped, as QEMU does; a device op costs more than the bytes.
        let mut scratch = None;
        let gap = sg.len();
        if let Some(i) = pieces.iter().position(|p| p.guest == end) {
            if i > 0 && gap <= MAX_READ_GAP {
                let (h, t) = (&pieces[i - 1], &pieces[i]);
                if h.fd == t.fd
                    && h.guest + h.len as u64 == offset
                    && h.host + (h.len + gap) as u64 == t.host
                {
                    // Only the kernel writes it; nothing reads it.
                    let buf = AlignedBuf::for_reading(gap, align);
                    let t = pieces.remove(i);
                    let h = &mut pieces[i - 1];
                    h.iovecs.push(buf.iovec(0, gap).to_libc());
                    h.iovecs.extend(t.iovecs);
                    h.len += gap + t.len;
                    scratch = Some(buf);
                }
            }
        }
        let lens: Vec<usize> = pieces.iter().map(|p| p.len).collect();
        let reads: Vec<EngineOp> = pieces
            .into_iter()
            .enumerate()
            .map(|(i, p)| EngineOp {
                id: id | (i as u64) << PART_SHIFT,
                fd: p.fd,
                kind: OpKind::Read {
                    offset: p.host,
                    iovecs: IoVecs(p.iovecs),
                },
            })
            .collect();
        let cow = Cow {
            sg,
            offset,
            plan,
            head,
            tail,
            _scratch: scratch,
            pending: 0,
            lens,
            writing: false,
            short: false,
            err: None,
        };
        self.set_state(id, State::Cow(Box::new(cow)));
        if reads.is_empty() {
            return self.cow_write(id);
        }
        let (sent, failed) = submit_all(self.engine.as_mut(), reads.into_iter());
        if let Some(State::Cow(c)) = self.inflight.get_mut(id).map(|e| &mut e.state) {
            c.pending = sent;
            if let Some(e) = failed {
                c.err.get_or_insert(io::Error::other(e.to_string()));
            }
        }
        if sent == 0 {
            self.cow_fallback(id);
        }
    }

    /// An engine operation of a planned write finished.
    pub(super) fn on_cow_completion(&mut self, id: u64, part: usize, result: io::Result<usize>) {
        let Some(State::Cow(c)) = self.inflight.get_mut(id).map(|e| &mut e.state) else {
            return;
        };
        c.pending -= 1;
        match result {
            Err(e) => {
                c.err.get_or_insert(e);
            }
            Ok(n) if Some(&n) != c.lens.get(part) => c.short = true,
            Ok(_) => {}
        }
        if c.pending > 0 {
            return;
        }
        if !c.writing {
            if c.err.is_some() || c.short {
                return self.cow_fallback(id);
            }
            return self.cow_write(id);
        }
        let failure = match (c.err.take(), c.short) {
            (Some(e), _) => Some(BlockError::Io(e)),
            (None, true) => Some(BlockError::Short {
                what: "write",
                done: 0,
                len: c.sg.len(),
            }),
            (None, false) => None,
        };
        let Some(State::Cow(c)) = self.take_state(id) else {
            return;
        };
        if let Some(e) = failure {
            self.driver.abort_cow(&c.plan);
            return self.complete(id, Err(e));
        }
        // Linked; with the write cache off, made durable before the completion.
        let r = self.driver.commit_cow(&c.plan);
        self.finish_sync(id, c.sg.len(), r);
    }

    /// The head and tail are in their buffers: write everything.
    fn cow_write(&mut self, id: u64) {
        let dsync = self.dsync();
        let Some(State::Cow(c)) = self.inflight.get_mut(id).map(|e| &mut e.state) else {
            return;
        };
        let runs = c.runs();
        c.writing = true;
        c.lens = runs.iter().map(|r| r.2).collect();
        let ops: Vec<EngineOp> = runs
            .iter()
            .enumerate()
            .map(|(i, &(host, skip, len))| EngineOp {
                id: id | (i as u64) << PART_SHIFT,
                fd: self.driver.data_fd(),
                kind: OpKind::transfer(true, host, IoVecs(c.stream(skip, len)), dsync),
            })
            .collect();
        let (sent, failed) = submit_all(self.engine.as_mut(), ops.into_iter());
        let Some(State::Cow(c)) = self.inflight.get_mut(id).map(|e| &mut e.state) else {
            return;
        };
        c.pending = sent;
        let Some(e) = failed else {
            return;
        };
        if sent > 0 {
            // The writes already sent finish first; the request then fails.
            c.err.get_or_insert(io::Error::other(e.to_string()));
        } else if let Some(State::Cow(c)) = self.take_state(id) {
            self.driver.abort_cow(&c.plan);
            self.complete(id, Err(e));
        }
    }

    /// Reading the old contents failed: give the clusters back and let the synchronous
    /// path, which reads any range itself, do the write (still holding the clusters).
    fn cow_fallback(&mut self, id: u64) {
        let Some(State::Cow(c)) = self.take_state(id) else {
            return;
        };
        if let Some(e) = &c.err {
            log::debug!("copy-on-write read failed ({e}); taking the synchronous path");
        }
        self.driver.abort_cow(&c.plan);
        self.write_sync(id, c.offset, c.sg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::CowCluster;

    fn plan(hosts: &[u64], head: bool, tail: bool) -> CowPlan {
        CowPlan {
            start: 0,
            cluster: 4096,
            clusters: hosts
                .iter()
                .map(|&host| CowCluster {
                    host,
                    link: true,
                    allocated: true,
                })
                .collect(),
            head: head.then(Vec::new),
            tail: tail.then(Vec::new),
        }
    }

    /// The guest memory stays mapped for as long as the request's iovecs point into it.
    fn cow(offset: u64, len: usize, p: CowPlan) -> (vm_memory::GuestMemoryMmap<()>, Cow) {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
                .unwrap();
        let sg = SgList::from_guest(&mem, &[(vm_memory::GuestAddress(0), len)]).unwrap();
        let end = offset + len as u64;
        let c = Cow {
            head: p
                .head
                .as_ref()
                .map(|_| AlignedBuf::new(offset as usize, 512)),
            tail: p
                .tail
                .as_ref()
                .map(|_| AlignedBuf::new((p.end() - end) as usize, 512)),
            _scratch: None,
            sg,
            offset,
            plan: p,
            lens: Vec::new(),
            pending: 0,
            writing: false,
            short: false,
            err: None,
        };
        (mem, c)
    }

    #[test]
    fn runs_follow_the_host_layout() {
        // A 4 KiB write in the middle of one new cluster, head and tail kept: one run of
        // the whole cluster.
        let (_mem, c) = cow(1024, 2048, plan(&[1 << 20], true, true));
        assert_eq!(c.runs(), vec![(1 << 20, 0, 4096)]);
        let lens: Vec<usize> = c.stream(0, 4096).iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, vec![1024, 2048, 1024]);
        // Nothing kept: only the guest's bytes, at their place in the cluster.
        let (_mem, c) = cow(1024, 2048, plan(&[1 << 20], false, false));
        assert_eq!(c.runs(), vec![((1 << 20) + 1024, 0, 2048)]);
        // Three clusters, the last two next to each other in the file, the first apart.
        let (_mem, c) = cow(
            512,
            3 * 4096 - 1024,
            plan(&[8192, 65536, 69632], true, true),
        );
        assert_eq!(
            c.runs(),
            vec![(8192, 0, 4096), (65536, 4096, 8192)],
            "one operation per host-contiguous run"
        );
        let lens: Vec<usize> = c.stream(4096, 8192).iter().map(|v| v.iov_len).collect();
        assert_eq!(
            lens,
            vec![8192 - 512, 512],
            "guest bytes, then the kept tail"
        );
    }
}
