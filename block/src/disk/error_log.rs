//! Host-side failures of guest requests, told to the user.
//!
//! A request that fails on the host (ENOSPC on a full file system, EIO from the device, a
//! short read past a truncated image) completes to the guest with an error, and the guest
//! says "I/O error" in its own log, where the host's user may never look. The first
//! failure of a disk is logged as a warning naming the image and the host's error; later
//! ones at most once every [`REPEAT`], with how many there were in between (a guest that
//! retries a failing write would otherwise fill the log). `--disk-stats` counts every one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::stats::IoKind;
use crate::BlockError;

/// The least time between two warnings of one disk.
const REPEAT: Duration = Duration::from_secs(10);

/// The failures of one disk, and when it last warned.
#[derive(Debug)]
pub(super) struct ErrorLog {
    image: PathBuf,
    last: Option<Instant>,
    /// Failures since the last warning, not warned of.
    unsaid: u64,
}

impl ErrorLog {
    pub(super) fn new(image: &Path) -> ErrorLog {
        ErrorLog {
            image: image.to_path_buf(),
            last: None,
            unsaid: 0,
        }
    }

    /// A guest request of `kind` failed with `err` at `now`: the warning to log, if one is
    /// due.
    pub(super) fn failed(
        &mut self,
        kind: IoKind,
        err: &BlockError,
        now: Instant,
    ) -> Option<String> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < REPEAT)
        {
            self.unsaid += 1;
            return None;
        }
        let more = match std::mem::take(&mut self.unsaid) {
            0 => String::new(),
            n => format!(" ({n} more failed since the last warning)"),
        };
        let first = if self.last.is_none() {
            "; the guest sees an I/O error"
        } else {
            ""
        };
        self.last = Some(now);
        Some(format!(
            "{}: a guest {} failed on the host: {err}{first}{more}",
            self.image.display(),
            kind.as_str()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first failure is told, the next ones within REPEAT are counted and told with the
    /// first failure after it.
    #[test]
    fn the_first_failure_is_told_and_the_rest_counted() {
        let mut log = ErrorLog::new(Path::new("/img/data.raw"));
        let enospc = BlockError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let t = Instant::now();
        let first = log.failed(IoKind::Write, &enospc, t).expect("first told");
        assert!(
            first.starts_with("/img/data.raw: a guest write failed on the host: "),
            "{first}"
        );
        assert!(first.contains("No space left on device"), "{first}");
        assert!(log
            .failed(IoKind::Write, &enospc, t + Duration::from_secs(1))
            .is_none());
        assert!(log
            .failed(IoKind::Read, &enospc, t + Duration::from_secs(9))
            .is_none());
        let later = log
            .failed(IoKind::Write, &enospc, t + REPEAT)
            .expect("told again");
        assert!(
            later.ends_with("(2 more failed since the last warning)"),
            "{later}"
        );
        assert!(!later.contains("guest sees"), "{later}");
    }
}
