//! Host CPU a VMM spends per I/O, outside its vCPUs.
//!
//! Exits per I/O say how often the guest stops; the host CPU the VMM's other threads burn
//! per I/O (device emulation, I/O threads, thread-pool workers, the main loop) says what
//! each request costs on the host, which is what decides how many disks one host core can
//! serve, and on a nested host (the rig) where every instruction of L1 is emulated, a large
//! part of each request's latency.
//!
//! The process's CPU time (`/proc/PID/stat`, utime + stime: every thread, including those
//! that ended) minus its vCPU threads' (`/proc/PID/task/TID/schedstat`, nanoseconds on a
//! CPU; a vCPU thread's time includes the guest's own) is the rest. vCPU threads are known
//! by name: Platter's `vcpuN`, QEMU's `CPU N/KVM` (QEMU names its threads with
//! `-name ...,debug-threads=on`, which `platter compare` passes).

use std::path::Path;

/// CPU time of one process, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Every thread's, user and system.
    pub total_ns: u64,
    /// The vCPU threads' (guest time included).
    pub vcpu_ns: u64,
}

impl CpuTimes {
    /// What was spent between `earlier` and `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            total_ns: self.total_ns.saturating_sub(earlier.total_ns),
            vcpu_ns: self.vcpu_ns.saturating_sub(earlier.vcpu_ns),
        }
    }

    /// The time outside the vCPU threads.
    pub fn other_ns(self) -> u64 {
        self.total_ns.saturating_sub(self.vcpu_ns)
    }
}

/// Whether a thread named `comm` runs a vCPU: Platter's `vcpu0`, QEMU's `CPU 0/KVM`.
pub fn is_vcpu_thread(comm: &str) -> bool {
    let comm = comm.trim_end();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    comm.strip_prefix("vcpu").is_some_and(digits)
        || comm
            .strip_prefix("CPU ")
            .and_then(|r| r.strip_suffix("/KVM"))
            .is_some_and(digits)
}

/// utime + stime of a `/proc/.../stat` line, in clock ticks. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses itself, so fields are counted
/// after its last `)`.
fn stat_ticks(stat: &str) -> Option<u64> {
    let mut fields = crate::watch::stat_fields(stat)?.skip(11); // field 3 (state) is the first
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    ticks.saturating_mul(1_000_000_000) / hz
}

/// A thread's time on a CPU in nanoseconds: the first field of its `schedstat`, or its
/// `stat` ticks where the kernel has no schedstat.
fn thread_ns(task: &Path) -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    Some(ticks_to_ns(stat_ticks(
        &std::fs::read_to_string(task.join("stat")).ok()?,
    )?))
}

/// The CPU times of process `pid` under `proc` (normally `/proc`); None when it is gone.
pub fn read(proc: &Path, pid: u32) -> Option<CpuTimes> {
    let dir = proc.join(pid.to_string());
    let total_ns = ticks_to_ns(stat_ticks(
        &std::fs::read_to_string(dir.join("stat")).ok()?,
    )?);
    let mut vcpu_ns = 0;
    for task in std::fs::read_dir(dir.join("task")).ok()?.flatten() {
        let path = task.path();
        let is_vcpu = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| is_vcpu_thread(&c));
        if is_vcpu {
            vcpu_ns += thread_ns(&path).unwrap_or(0);
        }
    }
    Some(CpuTimes { total_ns, vcpu_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_by_name() {
        for yes in ["vcpu0", "vcpu12\n", "CPU 0/KVM", "CPU 3/KVM\n"] {
            assert!(is_vcpu_thread(yes), "{yes:?}");
        }
        for no in [
            "vcpu",
            "vcpux",
            "platter-blk-0",
            "IO iothread0",
            "CPU /KVM",
            "CPU 1/TCG",
            "qemu-system-x86",
            "worker",
        ] {
            assert!(!is_vcpu_thread(no), "{no:?}");
        }
    }

    #[test]
    fn stat_fields_after_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let line = "42 (CPU 0/KVM (x)) S 1 42 42 0 -1 4194560 10 0 0 0 700 55 0 0 20 0";
        assert_eq!(stat_ticks(line), Some(755));
        assert_eq!(stat_ticks("42 (short) S 1"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_a_vcpu_thread_counts_apart() {
        let busy = |name: &str| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(|| {
                    let start = std::time::Instant::now();
                    let mut x = 0u64;
                    while start.elapsed() < std::time::Duration::from_millis(60) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(300));
                })
                .unwrap()
        };
        let v = busy("vcpu0");
        std::thread::sleep(std::time::Duration::from_millis(150));
        let pid = std::process::id();
        let t = read(Path::new("/proc"), pid).expect("own process");
        assert!(t.vcpu_ns >= 40_000_000, "{t:?}");
        assert!(t.total_ns >= t.vcpu_ns / 2, "{t:?}");
        v.join().unwrap();
        assert_eq!(read(Path::new("/proc"), u32::MAX), None);
        let later = CpuTimes {
            total_ns: 10,
            vcpu_ns: 3,
        };
        assert_eq!(later.since(CpuTimes::default()).other_ns(), 7);
        assert_eq!(CpuTimes::default().since(later), CpuTimes::default());
    }
}
