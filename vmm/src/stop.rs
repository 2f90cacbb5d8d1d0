//! Stopping the machine in order: vCPUs first (so no guest access starts new
//! I/O), then every PCI function is shut down, which drains each disk and
//! flushes it the way a guest flush would. Without this the process ended
//! with vCPU threads still in KVM_RUN and disks never closed: a qcow2 image
//! kept only what the guest's last flush wrote, and the clusters a later
//! discard freed stayed allocated in the host file.
//!
//! A vCPU thread leaves KVM_RUN when a signal reaches it (the handler does
//! nothing; KVM_RUN returns EINTR). The signal can land just before the thread
//! enters KVM_RUN and be missed, so it is sent again until the thread is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use platter_devices::pci::PciRoot;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick handler; once per process, before vCPU threads start.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The running vCPU threads and the flag that tells them to return.
#[derive(Default)]
pub struct Vcpus {
    pub stop: Arc<AtomicBool>,
    pub threads: Vec<JoinHandle<()>>,
}

impl Vcpus {
    /// Tell every vCPU thread to return and wait up to `within` for them;
    /// returns how many did not.
    pub fn stop(&mut self, within: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + within;
        loop {
            let (done, running): (Vec<_>, Vec<_>) =
                self.threads.drain(..).partition(|t| t.is_finished());
            for t in done {
                let _ = t.join();
            }
            self.threads = running;
            if self.threads.is_empty() || Instant::now() >= deadline {
                return self.threads.len();
            }
            for t in &self.threads {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Shut every PCI function down (see [`platter_devices::pci::PciDevice::shutdown`]).
pub fn shutdown_pci(root: &Mutex<PciRoot>) {
    let functions = root.lock().expect("PCI root lock").functions();
    for f in functions {
        f.lock().expect("PCI function lock").shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads that sleep in a blocking syscall until a signal, as a vCPU in
    /// KVM_RUN with a halted guest does, are kicked out and joined.
    #[test]
    fn blocked_threads_are_kicked_and_joined() {
        install_kick_handler().unwrap();
        let mut v = Vcpus::default();
        for _ in 0..3 {
            let stop = v.stop.clone();
            v.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: pause has no arguments; it returns when a signal is handled.
                    unsafe { libc::pause() };
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(v.stop(Duration::from_secs(5)), 0);
        assert!(v.threads.is_empty());
    }

    /// A thread that never looks at the flag is reported, not waited for forever.
    #[test]
    fn a_thread_that_ignores_the_flag_is_counted() {
        install_kick_handler().unwrap();
        let mut v = Vcpus::default();
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        v.threads.push(std::thread::spawn(move || {
            while !r.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
        assert_eq!(v.stop(Duration::from_millis(50)), 1);
        release.store(true, Ordering::SeqCst);
        assert_eq!(v.stop(Duration::from_secs(5)), 0);
    }
}
