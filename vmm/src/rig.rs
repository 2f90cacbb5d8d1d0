//! Handing a run to the nested rig (`guests/rig`) when this host's KVM can't
//! boot a stock guest: the rig runs a TCG QEMU with nested SVM whose Debian
//! kernel offers a real KVM, and runs the same Platter command line in it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::watch::{self, Kill, Limits, Stream};

/// Find `guests/rig`: `$PLATTER_RIG`, else above the binary, else above the config.
pub fn find(config: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PLATTER_RIG") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    let starts = [exe.as_deref(), config.canonicalize().ok().as_deref()]
        .into_iter()
        .flatten()
        .map(Path::to_path_buf)
        .collect::<Vec<_>>();
    starts.iter().find_map(|s| {
        s.ancestors()
            .map(|a| a.join("guests/rig"))
            .find(|c| c.is_file())
    })
}

/// The command line that runs `args` (a `platter run` invocation) in the rig.
pub fn command(rig: &Path, args: &[String]) -> Vec<String> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "platter".into());
    let mut v = vec![rig.display().to_string(), "--".into(), exe];
    v.extend(args.iter().cloned());
    v.push("--rig=never".into());
    v
}

/// The rig's own failure status (guests/rig: the rig failed, not the command).
const RIG_FAILED: i32 = 125;
/// Runs of one rig command at most: a three-disk comparison lost its L1 twice in a row
/// once (down during QEMU's boot, then hung at the start of the next run).
const RIG_ATTEMPTS: u32 = 3;
/// How guests/rig says L1 went down before the command reported its status.
const L1_STOPPED: &str = "rig: L1 stopped";

/// Run the rig command `cmd`, its output passed through, and return its exit status. When
/// L1 itself went down before the command finished (the rig says so on stderr and exits
/// 125), or printed nothing for `silence` (an L1 that stopped making progress: the rig's
/// own timeout would wait out the whole run), kill it and everything it started and run
/// it again: in long comparisons the nested rig's L1 now and then stops or hangs
/// (seen a few times in multi-round runs, always while QEMU was the L2's VMM), and the
/// whole run would otherwise be lost. So is a command that exits with status `wedged`
/// (compare's for a VMM it could not kill: L1's KVM went wrong, and L1 is no use any more).
/// At most [`RIG_ATTEMPTS`] runs; `told` gets the reason for each further one.
pub fn run_retrying(
    cmd: &[String],
    silence: Duration,
    wedged: Option<i32>,
    told: &dyn Fn(&str),
) -> std::io::Result<i32> {
    watch::retry(
        RIG_ATTEMPTS,
        || match run_watched(cmd, silence) {
            Ok((code, trouble)) if trouble.is_none() && Some(code) == wedged => (
                Ok(code),
                Some("a VMM in the rig's L1 could not be killed".to_string()),
            ),
            Ok((code, trouble)) => (Ok(code), trouble),
            Err(e) => (Err(e), None),
        },
        told,
    )
}

/// One run of `cmd`: its exit status, and why it deserves another attempt, if it does.
fn run_watched(cmd: &[String], silence: Duration) -> std::io::Result<(i32, Option<String>)> {
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // L1's kernel messages (`[  224.656060] watchdog: BUG: soft lockup ...`) are not
    // progress: a hung L1 prints them every half minute.
    let passed = |to: Box<dyn Write + Send>, keep| Stream {
        echo: Some(to),
        keep,
        judge: Some(Box::new(|_, line: &[u8]| !is_kernel_message(line))),
    };
    let limits = Limits {
        timeout: None,
        silence,
        kill: Kill::Tree,
    };
    let out = watch::run(
        command,
        &limits,
        passed(Box::new(std::io::stdout()), false),
        passed(Box::new(std::io::stderr()), true),
    )?;
    let code = out.status.unwrap_or(1);
    if out.stalled {
        return Ok((
            code,
            Some(format!(
                "the rig printed nothing for {} s",
                silence.as_secs()
            )),
        ));
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let stopped = code == RIG_FAILED && text.lines().any(|l| l.starts_with(L1_STOPPED));
    Ok((code, stopped.then(|| "the rig's L1 went down".to_string())))
}

/// Whether `line` is a kernel log line: `[`, a timestamp of spaces, digits and a dot, `]`.
fn is_kernel_message(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(rest) = line.strip_prefix(b"[") else {
        return false;
    };
    let Some(end) = rest.iter().position(|&b| b == b']') else {
        return false;
    };
    let stamp = &rest[..end];
    stamp.contains(&b'.')
        && stamp.iter().any(u8::is_ascii_digit)
        && stamp
            .iter()
            .all(|&b| b == b' ' || b == b'.' || b.is_ascii_digit())
}

/// Replace this process with the rig running `cmd`; returns only on failure.
pub fn exec(cmd: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A stand-in for guests/rig running the shell script `body`.
    fn fake_rig(dir: &Path, body: &str) -> Vec<String> {
        let script = dir.join("rig.sh");
        std::fs::write(&script, body).unwrap();
        vec!["sh".into(), script.display().to_string()]
    }

    fn run(
        dir: &Path,
        body: &str,
        silence: Duration,
        told: &std::cell::RefCell<Vec<String>>,
    ) -> i32 {
        run_retrying(&fake_rig(dir, body), silence, Some(WEDGED), &|why| {
            told.borrow_mut().push(why.into())
        })
        .unwrap()
    }

    /// The fake command's status for "a VMM could not be killed".
    const WEDGED: i32 = 4;

    #[test]
    fn a_run_whose_l1_stopped_or_hung_goes_again() {
        let dir = std::env::temp_dir().join(format!("platter-rig-retry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("tried");
        let told = std::cell::RefCell::new(Vec::new());
        let long = Duration::from_secs(60);

        // Down once, then fine: the second attempt's status.
        let body = format!(
            "if [ -e {m} ]; then exit 3; fi\ntouch {m}\necho 'rig: L1 stopped (QEMU exit status 0) without reporting' >&2\nexit 125\n",
            m = marker.display()
        );
        assert_eq!(run(&dir, &body, long, &told), 3);
        assert_eq!(told.borrow().as_slice(), ["the rig's L1 went down"]);

        // Down every time: the last failure stands. Other rig failures are not retried.
        let always = "echo 'rig: L1 stopped (QEMU exit status 0)' >&2\nexit 125\n";
        assert_eq!(run(&dir, always, long, &told), 125);
        assert_eq!(told.borrow().len(), RIG_ATTEMPTS as usize);
        let other = "echo 'rig: qemu-system-x86_64 is missing' >&2\nexit 125\n";
        assert_eq!(run(&dir, other, long, &told), 125);
        assert_eq!(told.borrow().len(), RIG_ATTEMPTS as usize, "not retried");
        assert_eq!(run(&dir, "exit 0\n", long, &told), 0);

        // A command that could not kill its VMM: L1 is no use, the next run gets a fresh one.
        std::fs::remove_file(&marker).unwrap();
        let wedged = format!(
            "if [ -e {m} ]; then exit 0; fi\ntouch {m}\nexit {WEDGED}\n",
            m = marker.display()
        );
        assert_eq!(run(&dir, &wedged, long, &told), 0);
        assert_eq!(
            told.borrow().last().map(String::as_str),
            Some("a VMM in the rig's L1 could not be killed")
        );

        // Kernel messages are no progress: a rig that prints only those is silent.
        assert!(is_kernel_message(
            b"[  224.656060] watchdog: BUG: soft lockup - CPU#1 stuck for 209s! [platter:119]\r"
        ));
        for progress in [
            &b"  platter  raw-none-uring   randread-4k-qd1   933 IOPS"[..],
            b"platter compare: booting the same guest under QEMU",
            b"[[disk]]",
            b"[ ] x",
        ] {
            assert!(
                !is_kernel_message(progress),
                "{:?}",
                String::from_utf8_lossy(progress)
            );
        }

        // Silent past the limit: killed with what it started, and run again.
        std::fs::remove_file(&marker).unwrap();
        let pid_file = dir.join("sleeper");
        let hang = format!(
            "if [ -e {m} ]; then exit 0; fi\ntouch {m}\necho working\nsleep 30 &\necho $! > {p}\nwhile :; do echo '[   28.655040] watchdog: BUG: soft lockup'; sleep 0.2; done\n",
            m = marker.display(),
            p = pid_file.display()
        );
        let start = Instant::now();
        assert_eq!(run(&dir, &hang, Duration::from_secs(1), &told), 0);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            told.borrow().last().map(String::as_str),
            Some("the rig printed nothing for 1 s")
        );
        let sleeper = std::fs::read_to_string(&pid_file).unwrap();
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", sleeper.trim()))
            .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "the rig's child {sleeper} outlived the kill");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
