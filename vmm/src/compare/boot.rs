//! Running one VMM to the end: its console (stdout) is captured, each result
//! line is echoed as progress on stderr, and a boot that overruns its time
//! is killed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

/// Lines shown when a boot fails.
pub const TAIL_LINES: usize = 15;
/// How often the wait loop looks at the child.
const POLL: Duration = Duration::from_millis(200);
/// How long a killed child may take to die before it is given up on.
const UNKILLABLE: Duration = Duration::from_secs(30);

/// Run `cmd` to completion or `timeout`; `progress` sees every console line,
/// with the child's process id (to look the VMM up while it runs). `silence`
/// without a console line (from the start, or since the last line) counts
/// as a stall and the child is killed too: the guest boots in seconds and
/// prints a line at every job, so a long silence is a guest that stopped
/// running (as QEMU's sometimes does in the nested rig), not one working.
pub fn run(
    mut cmd: Command,
    timeout: Duration,
    silence: Duration,
    mut progress: impl FnMut(u32, &str) + Send + 'static,
) -> std::io::Result<Run> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let console = Arc::new(Mutex::new(String::new()));
    let text = console.clone();
    let last_line = Arc::new(Mutex::new(Instant::now()));
    let heard = last_line.clone();
    let out_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        // Lines, not strings: the console may carry bytes that aren't UTF-8.
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let l = String::from_utf8_lossy(&line);
            progress(pid, l.trim_end());
            if let Ok(mut h) = heard.lock() {
                *h = Instant::now();
            }
            if let Ok(mut t) = text.lock() {
                t.push_str(&l);
            }
            line.clear();
        }
    });
    let errors = Arc::new(Mutex::new(Vec::new()));
    let err_text = errors.clone();
    let err_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            if let Ok(mut t) = err_text.lock() {
                t.extend_from_slice(&buf[..n]);
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let mut stalled = false;
    let mut status = None;
    loop {
        if let Some(s) = child.try_wait()? {
            status = s.code();
            break;
        }
        stalled = last_line.lock().is_ok_and(|t| t.elapsed() >= silence);
        if stalled || Instant::now() >= deadline {
            timed_out = true;
            // Our own child, by its handle.
            let _ = child.kill();
            // A VMM stuck inside the kernel (a KVM ioctl of a nested hypervisor that went
            // wrong) cannot die: give up on it rather than wait forever.
            let gone = Instant::now() + UNKILLABLE;
            while child.try_wait()?.is_none() && Instant::now() < gone {
                std::thread::sleep(POLL);
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    // The readers end when the pipes close, i.e. when the child is gone; a child that is
    // still there keeps them (and its output so far is taken as it is).
    if !timed_out || child.try_wait()?.is_some() {
        let _ = out_reader.join();
        let _ = err_reader.join();
    }
    let console = console.lock().map(|t| t.clone()).unwrap_or_default();
    let stderr = errors
        .lock()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Ok(Run {
        // Set only when the child exited by itself before its time ran out.
        status,
        console,
        stderr,
        timed_out,
        stalled,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo one; echo two >&2; printf 'three\\r\\n'; exit 3"]);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let p2 = pids.clone();
        let r = run(
            c,
            Duration::from_secs(20),
            Duration::from_secs(20),
            move |pid, l| {
                s2.lock().unwrap().push(l.to_string());
                p2.lock().unwrap().push(pid);
            },
        )
        .unwrap();
        assert_eq!(r.status, Some(3));
        assert_eq!(r.console, "one\nthree\r\n");
        assert_eq!(r.stderr, "two\n");
        assert_eq!(*seen.lock().unwrap(), ["one", "three"]);
        let pids = pids.lock().unwrap();
        assert!(pids[0] > 0 && pids[0] != std::process::id() && pids[0] == pids[1]);
        assert!(!r.timed_out && !r.stalled);
    }

    #[test]
    fn a_console_that_falls_silent_is_a_stall() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo started; exec sleep 30"]);
        let t = Instant::now();
        let r = run(
            c,
            Duration::from_secs(60),
            Duration::from_millis(500),
            |_, _| {},
        )
        .unwrap();
        assert!(r.timed_out && r.stalled && r.status.is_none());
        assert_eq!(r.console, "started\n");
        assert!(t.elapsed() < Duration::from_secs(20));
        // Silent from the start: a guest that never boots is a stall too.
        let mut c = Command::new("sleep");
        c.arg("30");
        let r = run(
            c,
            Duration::from_secs(60),
            Duration::from_millis(300),
            |_, _| {},
        )
        .unwrap();
        assert!(r.stalled && r.console.is_empty());
        // Lines keep coming, slower than the silence in total: no stall.
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.3; echo $i; done",
        ]);
        let r = run(
            c,
            Duration::from_secs(20),
            Duration::from_secs(2),
            |_, _| {},
        )
        .unwrap();
        assert_eq!((r.status, r.stalled), (Some(0), false));
    }

    #[test]
    fn overrunning_child_is_killed() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let t = Instant::now();
        let r = run(
            c,
            Duration::from_millis(300),
            Duration::from_secs(60),
            |_, _| {},
        )
        .unwrap();
        assert!(r.timed_out && !r.stalled && r.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\r\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
