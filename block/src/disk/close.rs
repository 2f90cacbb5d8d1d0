//! Closing time: when the machine stops, what is in flight finishes and the disk is flushed
//! as a guest flush would flush it, like QEMU flushing every image on exit. Without this a
//! qcow2 image keeps only what the guest's last flush wrote: its cached tables and the
//! clusters a later discard freed (which are given back to the host only once the tables
//! that dropped them are on disk) would be lost with the process.

use std::time::{Duration, Instant};

use super::Disk;
use crate::engine::{run_blocking, EngineOp, OpKind};
use crate::BlockError;

impl Disk {
    /// Wait up to `timeout` for every request in flight (throttled ones start at once; their
    /// completions are dropped: nobody is left to hear them), then write cached metadata
    /// back, give back space grown ahead of need and, unless the cache mode ignores flushes,
    /// fdatasync. The disk stays usable.
    pub fn drain_and_flush(&mut self, timeout: Duration) -> Result<(), BlockError> {
        self.release_throttled();
        let deadline = Instant::now() + timeout;
        loop {
            let _ = self.completions().count();
            let left = self.in_flight();
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BlockError::CloseTimeout(left));
            }
            self.wait_completions(Some(deadline - now))
                .map_err(BlockError::Io)?;
        }
        if self.readonly {
            return Ok(());
        }
        self.driver.flush_metadata().map_err(BlockError::Io)?;
        self.driver.trim_tail().map_err(BlockError::Io)?;
        if self.cache.honours_flush() {
            let op = EngineOp {
                id: 0,
                fd: self.fd(),
                kind: OpKind::Fdatasync,
            };
            run_blocking(&op).map_err(BlockError::Io)?;
        }
        Ok(())
    }
}
