//! Running one VMM to the end: its console (stdout) is captured, each result
//! line is echoed as progress on stderr, and a boot that overruns its time
//! is killed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
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
}

/// Lines shown when a boot fails.
pub const TAIL_LINES: usize = 15;
/// How often the wait loop looks at the child.
const POLL: Duration = Duration::from_millis(200);

/// Run `cmd` to completion or `timeout`; `progress` sees every console line,
/// with the child's process id (to look the VMM up while it runs).
pub fn run(
    mut cmd: Command,
    timeout: Duration,
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
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        // Lines, not strings: the console may carry bytes that aren't UTF-8.
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let l = String::from_utf8_lossy(&line);
            progress(pid, l.trim_end());
            text.push_str(&l);
            line.clear();
        }
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // Our own child, by its handle.
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(POLL);
    };
    Ok(Run {
        status: if timed_out { None } else { status.code() },
        console: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        timed_out,
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
        let r = run(c, Duration::from_secs(20), move |pid, l| {
            s2.lock().unwrap().push(l.to_string());
            p2.lock().unwrap().push(pid);
        })
        .unwrap();
        assert_eq!(r.status, Some(3));
        assert_eq!(r.console, "one\nthree\r\n");
        assert_eq!(r.stderr, "two\n");
        assert_eq!(*seen.lock().unwrap(), ["one", "three"]);
        let pids = pids.lock().unwrap();
        assert!(pids[0] > 0 && pids[0] != std::process::id() && pids[0] == pids[1]);
        assert!(!r.timed_out);
    }

    #[test]
    fn overrunning_child_is_killed() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let t = Instant::now();
        let r = run(c, Duration::from_millis(300), |_, _| {}).unwrap();
        assert!(r.timed_out && r.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\r\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
