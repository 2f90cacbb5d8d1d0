//! `platter img bench`: qemu-img bench's workload through Platter's block layer.
//!
//! Same options and the same access pattern as `qemu-img bench` (QEMU 10.0, qemu-img.c
//! `img_bench`): `count` requests of `size` bytes, `depth` of them in flight, all sharing one
//! buffer; request i goes to `offset + i * step`, wrapped modulo `image size - size`.
//! Completions are counted from the disk's completion eventfd, as a device thread would.

use std::path::PathBuf;
use std::time::Instant;

use platter_block::{
    open_disk, AioMode, CacheMode, DiskOptions, Format, IoVec, Request, RequestOp, SgList,
};

/// `platter img bench` options (qemu-img bench's spelling).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    pub count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: usize,
    /// Image format (probed when not given).
    #[arg(short = 'f')]
    pub format: Option<Format>,
    /// Host cache mode: writeback, none, writethrough, directsync, unsafe.
    #[arg(short = 't', default_value = "writeback")]
    pub cache: CacheMode,
    /// I/O engine: threads, native, io_uring.
    #[arg(short = 'i', default_value = "threads")]
    pub aio: AioMode,
    /// Same as -i native.
    #[arg(short = 'n')]
    pub native: bool,
    /// Offset of the first request (bytes; k/M/G suffixes).
    #[arg(short = 'o', default_value = "0")]
    pub offset: String,
    /// Request size (bytes; k/M/G suffixes).
    #[arg(short = 's', default_value = "4096")]
    pub size: String,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(short = 'S')]
    pub step: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Byte written by write requests.
    #[arg(long, default_value_t = 0)]
    pub pattern: u8,
    /// Quiet: print only the result line.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Open without taking image locks (force share).
    #[arg(short = 'U')]
    pub force_share: bool,
    /// The image.
    pub file: PathBuf,
}

/// Run the benchmark and print qemu-img bench's two lines.
pub fn run(args: BenchArgs) -> Result<(), String> {
    let size = parse(&args.size)?;
    let offset = parse(&args.offset)?;
    let step = match &args.step {
        Some(s) => parse(s)?,
        None => size,
    };
    if size == 0 || size > (1 << 30) {
        return Err(format!("invalid buffer size {size}"));
    }
    if args.depth == 0 {
        return Err("depth must be at least 1".into());
    }
    let aio = if args.native {
        AioMode::Native
    } else {
        args.aio
    };
    let mut disk = open_disk(&DiskOptions {
        format: args.format,
        cache: args.cache,
        aio,
        readonly: !args.write,
        locking: !args.force_share,
        ..DiskOptions::new(&args.file)
    })
    .map_err(|e| e.to_string())?;
    let image_size = disk.size();
    if !args.quiet {
        println!(
            "Sending {} {} requests, {size} bytes each, {} in parallel (starting at offset {offset}, step size {step})",
            args.count,
            if args.write { "write" } else { "read" },
            args.depth
        );
    }
    // One page-aligned buffer shared by every request, like qemu-img.
    let layout = std::alloc::Layout::from_size_align(size as usize, 4096)
        .map_err(|e| format!("buffer layout: {e}"))?;
    // SAFETY: non-zero size.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: freshly allocated, `size` bytes.
    unsafe { std::ptr::write_bytes(buf, args.pattern, size as usize) };

    let mut next_off = offset;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut in_flight = 0usize;
    let mut first_error = None;
    // This thread serves the one disk, as an I/O thread with one disk does. With aio=threads
    // each round's submissions go to the workers as one batch, as a device's drained ring
    // does. Linux AIO and io_uring get each request at once, as qemu-img bench gives them:
    // batching the refills of a depth-32 loop made the device take them in bursts, all 32
    // completing together and the queue idle while the next batch was made (raw rw4k-d32
    // none, native: 71k/s batched, 132k/s one by one, on this host). A round of one request
    // is a batch of one for every engine (a batch of one is submitted at once all the same),
    // so with nothing else in flight it takes the lone-request rule, as a guest's lone
    // request on a device's I/O thread does.
    disk.set_alone(true);
    let batch = disk.aio_mode() == AioMode::Threads;
    let start = Instant::now();
    while completed < args.count {
        let round = (args.depth - in_flight).min((args.count - submitted) as usize);
        let plugged = batch || round == 1;
        if plugged {
            disk.plug();
        }
        while submitted < args.count && in_flight < args.depth {
            let off = next_off;
            next_off = next_offset(off, step, size, image_size);
            // SAFETY: the buffer lives until after the last completion (freed below, after
            // the loop has seen every request complete).
            let sg = unsafe {
                SgList::from_raw(
                    vec![IoVec {
                        base: buf,
                        len: size as usize,
                    }],
                    None,
                )
            };
            let op = if args.write {
                RequestOp::Write {
                    offset: off,
                    buf: sg,
                }
            } else {
                RequestOp::Read {
                    offset: off,
                    buf: sg,
                }
            };
            if let Err(e) = disk.submit(Request { tag: submitted, op }) {
                first_error.get_or_insert(e.error.to_string());
                completed += 1;
            } else {
                in_flight += 1;
            }
            submitted += 1;
        }
        if plugged {
            disk.unplug();
        }
        if in_flight == 0 {
            continue;
        }
        match disk.wait_completions(None) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        for (_, result) in disk.take_ready() {
            in_flight -= 1;
            completed += 1;
            if let Err(e) = result {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(disk);
    // SAFETY: allocated above with this layout; no request is in flight any more.
    unsafe { std::alloc::dealloc(buf, layout) };
    if let Some(e) = first_error {
        return Err(format!("request failed: {e}"));
    }
    println!("Run completed in {secs:.3} seconds.");
    Ok(())
}

/// The offset after `off`: qemu-img bench's rule as Debian ships it (7.2 to 10.0), the sum
/// modulo the image size, so that both tools visit the same blocks and a comparison is fair
/// (the sequences differ widely: 20000 writes of 4 KiB with a step of 7919 blocks touch 9120
/// clusters of 64 KiB in a 1 GiB image by this rule, 15500 by the other). Where that rule
/// would run a request past the end (qemu-img then fails with EIO), QEMU's later rule
/// instead: modulo the size less one request.
fn next_offset(off: u64, step: u64, size: u64, image_size: u64) -> u64 {
    let next = off.saturating_add(step);
    if image_size <= size {
        return 0;
    }
    match next % image_size {
        n if n + size <= image_size => n,
        _ => next % (image_size - size),
    }
}

fn parse(s: &str) -> Result<u64, String> {
    platter_block::img::parse_size(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::next_offset;

    #[test]
    fn offsets_follow_qemu_img_bench() {
        const G: u64 = 1 << 30;
        let step = 4096 * 7919;
        // As qemu-img 7.2: the sum modulo the image size.
        let mut off = 0;
        let mut clusters = std::collections::BTreeSet::new();
        for _ in 0..20000 {
            clusters.insert(off >> 16);
            let want = (off + step) % G;
            off = next_offset(off, step, 4096, G);
            assert_eq!(off, want);
        }
        assert_eq!(clusters.len(), 9120, "the clusters qemu-img bench touches");
        // A request that would run past the end wraps modulo the size less one request
        // instead: (G - 4096) % (G - 8192).
        assert_eq!(next_offset(G - 8192, 4096, 8192, G), 4096);
        assert_eq!(next_offset(G - 8192, 8192, 8192, G), 0);
        // An image no larger than one request: always offset 0.
        assert_eq!(next_offset(0, 512, 4096, 4096), 0);
    }
}
