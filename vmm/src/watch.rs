//! Running a child process under watch: its output read as it comes (passed through, kept,
//! or both), each complete line shown to a judge of progress, and the child killed when it
//! overruns its time or makes no progress for too long.
//!
//! `platter compare` runs each VMM boot this way (the console kept, a line per fio job is
//! progress, the VMM killed when its guest falls silent) and the nested rig too (output
//! passed through, L1's kernel messages not progress, the rig's whole process tree killed
//! when L1 hangs).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the wait loop looks at the child.
const POLL: Duration = Duration::from_millis(200);
/// How long a killed child may take to die before it is given up on: a VMM stuck inside
/// the kernel (a KVM ioctl of a nested hypervisor that went wrong) cannot die.
const UNKILLABLE: Duration = Duration::from_secs(30);

/// Judges a complete line (without its newline) of the child with this process id: whether
/// it is progress.
pub type LineJudge = Box<dyn FnMut(u32, &[u8]) -> bool + Send>;

/// What to do with one of the child's output streams.
#[derive(Default)]
pub struct Stream {
    /// Where its bytes are copied as they come (partial lines too, so prompts show).
    pub echo: Option<Box<dyn Write + Send>>,
    /// Keep a copy in the [`Outcome`].
    pub keep: bool,
    /// Sees each complete line; without one, the stream's lines are not progress.
    pub judge: Option<LineJudge>,
}

/// What gets killed when the child overruns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// The child alone, by its handle.
    Child,
    /// The child and every process descending from it (a script and what it started).
    Tree,
}

/// When the child is killed.
pub struct Limits {
    /// Its whole time (none: no limit).
    pub timeout: Option<Duration>,
    /// The longest time without a progress line, from the start or from the last one.
    pub silence: Duration,
    /// What to kill.
    pub kill: Kill,
}

/// How the child ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Its exit status when it exited by itself (none when killed, or ended by a signal).
    pub status: Option<i32>,
    /// What it wrote to stdout and stderr, for streams that keep it.
    pub stdout: Vec<u8>,
    /// See `stdout`.
    pub stderr: Vec<u8>,
    /// Killed, for overrunning its time or for silence.
    pub killed: bool,
    /// Killed for silence.
    pub stalled: bool,
    /// Killed, and still alive [`UNKILLABLE`] later (stuck inside the kernel).
    pub lingering: bool,
}

/// Run `cmd` (stdin from /dev/null) under `limits`, its stdout and stderr handled as told.
pub fn run(
    mut cmd: Command,
    limits: &Limits,
    stdout: Stream,
    stderr: Stream,
) -> std::io::Result<Outcome> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let start = Instant::now();
    let last = Arc::new(Mutex::new(start));
    let readers = [
        child.stdout.take().map(|r| reader(r, stdout, pid, &last)),
        child.stderr.take().map(|r| reader(r, stderr, pid, &last)),
    ];
    let deadline = limits.timeout.map(|t| start + t);
    let mut out = Outcome::default();
    loop {
        if let Some(s) = child.try_wait()? {
            out.status = s.code();
            break;
        }
        out.stalled = last.lock().is_ok_and(|t| t.elapsed() >= limits.silence);
        if out.stalled || deadline.is_some_and(|d| Instant::now() >= d) {
            out.killed = true;
            kill(&mut child, limits.kill);
            let gone = Instant::now() + UNKILLABLE;
            while child.try_wait()?.is_none() && Instant::now() < gone {
                std::thread::sleep(POLL);
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    // The readers end when the pipes close, i.e. when the child (and whatever it started
    // that holds them) is gone; a child that could not be killed keeps them, and its
    // output so far is lost.
    if out.killed && child.try_wait()?.is_none() {
        out.lingering = true;
        return Ok(out);
    }
    let [o, e] = readers;
    out.stdout = o.and_then(|t| t.join().ok()).unwrap_or_default();
    out.stderr = e.and_then(|t| t.join().ok()).unwrap_or_default();
    Ok(out)
}

/// A thread copying `from` as `to` says, noting in `last` the time of each progress line;
/// it returns the bytes kept.
fn reader(
    mut from: impl Read + Send + 'static,
    mut to: Stream,
    pid: u32,
    last: &Arc<Mutex<Instant>>,
) -> JoinHandle<Vec<u8>> {
    let last = last.clone();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let chunk = &buf[..n];
            if let Some(w) = &mut to.echo {
                let _ = w.write_all(chunk);
                let _ = w.flush();
            }
            if to.keep {
                kept.extend_from_slice(chunk);
            }
            for &b in chunk {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(judge) = &mut to.judge {
                    if judge(pid, &line) {
                        if let Ok(mut t) = last.lock() {
                            *t = Instant::now();
                        }
                    }
                }
                line.clear();
            }
        }
        kept
    })
}

fn kill(child: &mut Child, how: Kill) {
    match how {
        Kill::Child => {
            let _ = child.kill();
        }
        Kill::Tree => {
            for p in descendants(child.id()) {
                // SAFETY: kill only sends a signal; a process already gone is ESRCH.
                unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// `pid` and every process descending from it, found by their parents in /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let p: u32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                    let ppid = stat_fields(&stat)?.nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// The fields of a `/proc/.../stat` line from field 3 (state) on. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses itself, so they start after
/// its last `)`.
pub fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// Run `attempt` up to `times` times (at least once) while it ends with a reason to go
/// again; `told` hears each reason before the next run. The last run's result stands as
/// it is. The nested rig's guests and its L1 now and then stop or hang for no fault of the
/// command, so compare's boots and whole rig runs go through this.
pub fn retry<T>(
    times: u32,
    mut attempt: impl FnMut() -> (T, Option<String>),
    mut told: impl FnMut(&str),
) -> T {
    let mut run = 1;
    loop {
        match attempt() {
            (result, Some(why)) if run < times => {
                told(&why);
                run += 1;
                drop(result);
            }
            (result, _) => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs go again while they give a reason and runs remain; the last result stands.
    #[test]
    fn retry_stops_at_success_or_the_last_run() {
        let mut runs = 0;
        let mut heard = Vec::new();
        let r = retry(
            3,
            || {
                runs += 1;
                (runs, (runs < 2).then(|| format!("run {runs} failed")))
            },
            |why| heard.push(why.to_string()),
        );
        assert_eq!((r, heard), (2, vec!["run 1 failed".to_string()]));

        let mut runs = 0;
        let mut heard = 0;
        let r = retry(
            3,
            || {
                runs += 1;
                (runs, Some("down".to_string()))
            },
            |_| heard += 1,
        );
        assert_eq!(
            (r, heard),
            (3, 2),
            "three runs, told twice, the last result stands"
        );
        assert_eq!(
            retry(0, || (7, Some("x".into())), |_| panic!("no retry")),
            7
        );
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    fn limits(timeout: Option<u64>, silence_ms: u64, kill: Kill) -> Limits {
        Limits {
            timeout: timeout.map(Duration::from_millis),
            silence: Duration::from_millis(silence_ms),
            kill,
        }
    }

    fn kept() -> Stream {
        Stream {
            keep: true,
            ..Stream::default()
        }
    }

    /// Both streams kept as they were, lines judged with the child's pid, partial last
    /// lines kept too, the exit status reported.
    #[test]
    fn keeps_output_and_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let out = Stream {
            keep: true,
            judge: Some(Box::new(move |pid, l| {
                s2.lock()
                    .unwrap()
                    .push((pid, String::from_utf8_lossy(l).into_owned()));
                true
            })),
            ..Stream::default()
        };
        let r = run(
            sh("echo one; echo two >&2; printf 'three\\r\\nfour'; exit 3"),
            &limits(Some(20_000), 20_000, Kill::Child),
            out,
            kept(),
        )
        .unwrap();
        assert_eq!(r.status, Some(3));
        assert_eq!(r.stdout, b"one\nthree\r\nfour");
        assert_eq!(r.stderr, b"two\n");
        let seen = seen.lock().unwrap();
        let lines: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["one", "three\r"]);
        assert!(seen[0].0 > 0 && seen[0].0 != std::process::id() && seen[0].0 == seen[1].0);
        assert!(!r.killed && !r.stalled);
    }

    /// Silence counts from the start and from the last progress line; lines the judge
    /// turns down (and unjudged streams) are no progress; lines that keep coming are.
    #[test]
    fn silence_is_a_stall() {
        let t = Instant::now();
        let r = run(
            sh("echo started; exec sleep 30"),
            &limits(Some(60_000), 500, Kill::Child),
            kept(),
            kept(),
        )
        .unwrap();
        assert!(r.killed && r.stalled && r.status.is_none());
        assert_eq!(r.stdout, b"started\n");
        assert!(t.elapsed() < Duration::from_secs(20));

        let judged = || Stream {
            judge: Some(Box::new(|_, l: &[u8]| !l.starts_with(b"[noise]"))),
            ..Stream::default()
        };
        let noisy = "while :; do echo '[noise] x'; echo err >&2; sleep 0.1; done";
        let r = run(
            sh(noisy),
            &limits(None, 700, Kill::Child),
            judged(),
            Stream::default(),
        )
        .unwrap();
        assert!(r.stalled, "noise and stderr are not progress");

        let steady = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.3; echo $i; done";
        let r = run(
            sh(steady),
            &limits(Some(20_000), 2_000, Kill::Child),
            judged(),
            Stream::default(),
        )
        .unwrap();
        assert_eq!((r.status, r.stalled), (Some(0), false));
    }

    /// A child over its time is killed; with `Kill::Tree` so is what it started.
    #[test]
    fn overrunning_children_are_killed_with_their_own() {
        let t = Instant::now();
        let mut c = Command::new("sleep");
        c.arg("30");
        let r = run(c, &limits(Some(300), 60_000, Kill::Child), kept(), kept()).unwrap();
        assert!(r.killed && !r.stalled && r.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(10));

        let dir = std::env::temp_dir().join(format!("platter-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("sleeper");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let r = run(sh(&script), &limits(None, 500, Kill::Tree), kept(), kept()).unwrap();
        assert!(r.stalled);
        let sleeper = std::fs::read_to_string(&pid_file).unwrap();
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", sleeper.trim()))
            .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "the child's child {sleeper} outlived the kill");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stat_fields_start_after_the_command_name() {
        let stat = "42 (a (b) c) S 7 42 42 0";
        let mut f = stat_fields(stat).unwrap();
        assert_eq!((f.next(), f.next()), (Some("S"), Some("7")));
        assert!(stat_fields("no name").is_none());
    }
}
