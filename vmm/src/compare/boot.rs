//! Running one VMM to the end: its console (stdout) is captured, each result
//! line is echoed as progress on stderr, and a boot that overruns its time
//! is killed.

use std::process::Command;
use std::time::Duration;

use crate::watch::{self, Kill, Limits, Stream};

/// How a finished boot went.
pub struct Run {
    /// The exit status (None when killed by a signal or on timeout).
    pub status: Option<i32>,
    /// Everything the guest printed on its console.
    pub console: String,
    /// The VMM's own stderr.
    pub stderr: String,
    /// Whether it was killed for overrunning.
    pub timed_out: bool,
    /// Whether it was killed because its console fell silent (see [`run`]).
    pub stalled: bool,
    /// Whether it was still alive after being killed: stuck inside the kernel, as a VMM
    /// whose vCPU went wrong in the nested rig's L1 KVM is.
    pub lingering: bool,
}

/// Lines shown when a boot fails.
pub const TAIL_LINES: usize = 15;

/// Run `cmd` to completion or `timeout`; `progress` sees every console line,
/// with the child's process id (to look the VMM up while it runs). `silence`
/// without a console line (from the start, or since the last line) counts
/// as a stall and the child is killed too: the guest boots in seconds and
/// prints a line at every job, so a long silence is a guest that stopped
/// running (as QEMU's sometimes does in the nested rig), not one working.
pub fn run(
    cmd: Command,
    timeout: Duration,
    silence: Duration,
    mut progress: impl FnMut(u32, &str) + Send + 'static,
) -> std::io::Result<Run> {
    let console = Stream {
        keep: true,
        // Lines, not strings: the console may carry bytes that aren't UTF-8.
        judge: Some(Box::new(move |pid, line| {
            progress(pid, String::from_utf8_lossy(line).trim_end());
            true
        })),
        ..Stream::default()
    };
    let stderr = Stream {
        keep: true,
        ..Stream::default()
    };
    let limits = Limits {
        timeout: Some(timeout),
        silence,
        kill: Kill::Child,
    };
    let out = watch::run(cmd, &limits, console, stderr)?;
    Ok(Run {
        // Set only when the child exited by itself before its time ran out.
        status: out.status,
        console: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out: out.killed,
        stalled: out.stalled,
        lingering: out.lingering,
    })
}

/// The last `n` non-empty lines of `text`, for error reports.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first host-side failure Platter warned of in `stderr` (a guest request the host
/// failed: a full file system, a device error), as "; IMAGE: a guest write failed on the
/// host: ...", or nothing: it names the cause of I/O errors the guest met.
pub fn host_failure(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains(" failed on the host: "))
        .map(|l| {
            let msg = l.split_once("] ").map_or(l, |(_, m)| m);
            format!("; {}", msg.trim_end())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Platter's warning of a host failure is found and stripped of the log prefix.
    #[test]
    fn a_host_failure_is_named() {
        let err = "[  1.5 WARN virtio-blk platter_block::disk] /s/q.qcow2: a guest write failed on the host: I/O error: No space left on device (os error 28); the guest sees an I/O error\n\
                   [  1.6 WARN virtio-blk platter_block::disk] /s/q.qcow2: a guest read failed on the host: x\n";
        assert_eq!(
            host_failure(err),
            "; /s/q.qcow2: a guest write failed on the host: I/O error: No space left on device (os error 28); the guest sees an I/O error"
        );
        assert_eq!(host_failure("platter: something else\n"), "");
    }

    /// A boot's console and stderr come back apart, each console line seen as progress;
    /// a console that falls silent is a stall (the watch itself is tested in `watch`).
    #[test]
    fn console_lines_are_progress_and_silence_a_stall() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo one; echo two >&2; printf 'three\\r\\n'; exit 3"]);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let r = run(
            c,
            Duration::from_secs(20),
            Duration::from_secs(20),
            move |_, l| s2.lock().unwrap().push(l.to_string()),
        )
        .unwrap();
        assert_eq!(r.status, Some(3));
        assert_eq!(r.console, "one\nthree\r\n");
        assert_eq!(r.stderr, "two\n");
        assert_eq!(*seen.lock().unwrap(), ["one", "three"]);
        assert!(!r.timed_out && !r.stalled);

        let mut c = Command::new("sh");
        c.args(["-c", "echo started; echo working >&2; exec sleep 30"]);
        let r = run(
            c,
            Duration::from_secs(60),
            Duration::from_millis(500),
            |_, _| {},
        )
        .unwrap();
        assert!(r.timed_out && r.stalled && r.status.is_none());
        assert_eq!(r.console, "started\n");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\r\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
