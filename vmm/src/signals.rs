//! SIGTERM, SIGINT and SIGHUP stop the machine in order, as QEMU does ("terminating on
//! signal 15"): the vCPUs stop, every disk drains and is flushed, the statistics asked for are
//! printed and Platter exits 0. Without this `kill`, a service manager's stop or a closed
//! terminal ended the process where it stood, and a qcow2 image lost the table updates it
//! held in memory since the guest's last flush (its clusters leak, the data behind them is
//! unreachable).
//!
//! The signals are blocked in every thread (the mask is inherited, so it is set before the
//! first thread starts) and taken by one thread with `sigwait`, which turns the first into a
//! stop request. A second signal means the orderly stop is not wanted or is stuck: Platter
//! restores the terminal and exits at once.

use std::io;
use std::thread;

/// The signals that ask for an orderly stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Status of an exit forced by a second signal.
const FORCED_EXIT: i32 = 1;

/// The stop signals as a set.
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Block the stop signals in the calling thread and every thread it starts from now on.
/// Call before the machine's first thread; undo with [`unblock`] before exec'ing anything.
pub fn block() -> io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Unblock them again in the calling thread (an exec'd program inherits the mask).
pub fn unblock() {
    let set = stop_set();
    // SAFETY: as in `block`.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Name of a stop signal for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Start the thread that takes the stop signals (blocked by [`block`] beforehand): the
/// first is handed to `on_stop`, a second ends the process.
pub fn spawn_waiter(
    on_stop: impl Fn(libc::c_int) + Send + 'static,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = stop_set();
            let mut first = true;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and blocked in this thread; `sig` is writable.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if first {
                    first = false;
                    on_stop(sig);
                } else {
                    crate::terminal::restore();
                    eprintln!(
                        "platter: {} again while stopping; exiting without waiting for the disks",
                        name(sig)
                    );
                    std::process::exit(FORCED_EXIT);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc::channel;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A stop signal sent to the waiter (to its thread: the test harness's own threads do
    /// not block the signals, so a process-wide one would end the test run) is taken by
    /// `sigwait` and handed on once.
    #[test]
    fn a_blocked_stop_signal_reaches_the_waiter() {
        let (tx, rx) = channel();
        let t = thread::spawn(move || {
            block().unwrap();
            let tx = Mutex::new(tx);
            spawn_waiter(move |s| {
                let _ = tx.lock().unwrap().send(s);
            })
            .unwrap()
        });
        let waiter = t.join().unwrap();
        // SAFETY: the waiter thread runs until the process ends; SIGHUP is blocked in it.
        unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGHUP) };
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, libc::SIGHUP);
        assert_eq!(name(got), "SIGHUP");
    }
}
