//! VM exits per I/O, counted by the kernel the same way for any VMM.
//!
//! KVM keeps a debugfs directory per VM, `<debugfs>/kvm/<pid>-<fd>/`, named
//! after the task that created the VM and the VM's file descriptor; its
//! files hold the VM's statistics, the per-vCPU counters summed over the
//! vCPUs (Linux 6.1, arch/x86/kvm/x86.c, `kvm_vcpu_stats_desc`): `exits`,
//! `io_exits` (port I/O), `mmio_exits` (MMIO handed to user space),
//! `irq_injections`, `halt_exits`, ...
//! It needs root and a mounted debugfs; the rig's L1 has both
//! (guests/l1-init).
//!
//! The guest script brackets each fio job with markers; a snapshot at each
//! gives the job's exits:
//!
//! ```text
//!  CMPGO <serial> <job>   snapshot ─┐
//!  (fio runs)                       │ delta = the job's exits
//!  CMPEND                 snapshot ─┘ (before the long CMP line is printed)
//!  CMP <serial> <terse>
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::cpu_time::{self, CpuTimes};

/// Where the kernel shows processes.
const PROC: &str = "/proc";

/// Where KVM's per-VM directories are on a normal host.
pub const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
/// The marker the guest prints just before a job.
pub const GO: &str = "CMPGO ";
/// The marker the guest prints just after a job.
pub const END: &str = "CMPEND";

/// Counters of one VM (or the sum over several).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every vCPU exit, handled in the kernel or in user space.
    pub exits: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// MMIO exits that reached user space.
    pub mmio_exits: u64,
    /// Interrupts injected into the vCPUs (a device's completions cost at
    /// least an injection and, without APIC virtualization, an EOI exit).
    pub irq_injections: u64,
    /// HLT exits: the vCPU had nothing to do, typically waiting for I/O.
    pub halt_exits: u64,
}

impl Counts {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            exits: self.exits.saturating_sub(earlier.exits),
            io_exits: self.io_exits.saturating_sub(earlier.io_exits),
            mmio_exits: self.mmio_exits.saturating_sub(earlier.mmio_exits),
            irq_injections: self.irq_injections.saturating_sub(earlier.irq_injections),
            halt_exits: self.halt_exits.saturating_sub(earlier.halt_exits),
        }
    }
}

/// Whether `root` (KVM's debugfs directory) can be listed at all.
pub fn available(root: &Path) -> bool {
    std::fs::read_dir(root).is_ok()
}

/// The process `pid` and its threads: KVM names a VM's directory after the
/// task that created it, which need not be the main thread.
pub fn process_ids(pid: u32) -> Vec<u32> {
    let mut ids = vec![pid];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        ids.extend(
            tasks
                .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|t| *t != pid),
        );
    }
    ids
}

/// The counters summed over every VM one of `ids` created (a VMM may have
/// made and closed a probe VM first; a closed VM's directory is gone, and a
/// live idle one only adds a constant). None when there is no such VM or its
/// files can't be read.
pub fn read(root: &Path, ids: &[u32]) -> Option<Counts> {
    let mut sum = Counts::default();
    for d in vm_dirs(root, ids)? {
        let n = |f: &str| counter(&d, f);
        sum.exits += n("exits")?;
        sum.io_exits += n("io_exits")?;
        sum.mmio_exits += n("mmio_exits")?;
        sum.irq_injections += n("irq_injections")?;
        sum.halt_exits += n("halt_exits")?;
    }
    Some(sum)
}

/// KVM's directories of the VMs one of `ids` created; None when there is none.
fn vm_dirs(root: &Path, ids: &[u32]) -> Option<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let (pid, _fd) = name.to_str()?.split_once('-')?;
            ids.contains(&pid.parse().ok()?).then(|| e.path())
        })
        .collect();
    (!dirs.is_empty()).then_some(dirs)
}

/// One statistic of a VM's directory.
fn counter(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Guest memory KVM maps in its second-level (EPT/NPT) tables for the VMs of `ids`, in MiB:
/// (in 4 KiB pages, in 2 MiB pages), from the VM statistics `pages_4k` and `pages_2m`.
/// Guest RAM a VMM maps misaligned or without transparent huge pages ends up in 4 KiB
/// entries, which makes every TLB miss of the guest dearer.
pub fn mapped_mib(root: &Path, ids: &[u32]) -> Option<(u64, u64)> {
    let mut sum = (0, 0);
    for d in vm_dirs(root, ids)? {
        sum.0 += counter(&d, "pages_4k")? * 4 / 1024;
        sum.1 += counter(&d, "pages_2m")? * 2;
    }
    Some(sum)
}

/// A job: (disk serial, job name).
type JobKey = (String, String);

/// Turns the guest's markers into per-job exit counts and host CPU times for one VMM
/// process.
#[derive(Debug)]
pub struct ExitMeter {
    root: PathBuf,
    /// The job running now, and the counters and CPU times when it started.
    running: Option<(JobKey, Option<Counts>, Option<CpuTimes>)>,
    /// (serial, job) -> exits during the job.
    pub jobs: BTreeMap<JobKey, Counts>,
    /// (serial, job) -> the VMM's host CPU time during the job.
    pub cpu: BTreeMap<JobKey, CpuTimes>,
}

impl ExitMeter {
    /// A meter reading KVM's directories under `root`.
    pub fn new(root: &Path) -> ExitMeter {
        ExitMeter {
            root: root.to_path_buf(),
            running: None,
            jobs: BTreeMap::new(),
            cpu: BTreeMap::new(),
        }
    }

    /// Look at one console line of the VMM `pid`; snapshots at the markers.
    pub fn line(&mut self, pid: u32, line: &str) {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(GO) {
            self.running = rest.split_once(' ').map(|(serial, job)| {
                (
                    (serial.to_string(), job.trim().to_string()),
                    read(&self.root, &process_ids(pid)),
                    cpu_time::read(Path::new(PROC), pid),
                )
            });
        } else if line.trim_end() == END {
            if let Some((key, start, cpu_start)) = self.running.take() {
                if let (Some(start), Some(now)) = (start, read(&self.root, &process_ids(pid))) {
                    self.jobs.insert(key.clone(), now.since(start));
                }
                if let (Some(start), Some(now)) = (cpu_start, cpu_time::read(Path::new(PROC), pid))
                {
                    self.cpu.insert(key, now.since(start));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(root: &Path, name: &str, exits: u64, io: u64, mmio: u64) {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("vcpu0")).unwrap();
        for (f, v) in [
            ("exits", exits),
            ("io_exits", io),
            ("mmio_exits", mmio),
            ("irq_injections", exits / 4),
            ("halt_exits", exits / 10),
        ] {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }

    fn fake_root(tag: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("platter-kvm-stats-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn mapped_memory_by_page_size() {
        let root = fake_root("pages");
        vm(&root, "77-3", 1, 1, 1);
        vm(&root, "78-4", 1, 1, 1);
        for (vm, k4, m2) in [("77-3", 2048u64, 100u64), ("78-4", 1024, 28)] {
            std::fs::write(root.join(vm).join("pages_4k"), format!("{k4}\n")).unwrap();
            std::fs::write(root.join(vm).join("pages_2m"), format!("{m2}\n")).unwrap();
        }
        assert_eq!(mapped_mib(&root, &[77]), Some((8, 200)));
        assert_eq!(mapped_mib(&root, &[77, 78]), Some((12, 256)));
        assert_eq!(mapped_mib(&root, &[79]), None);
        std::fs::remove_file(root.join("77-3/pages_2m")).unwrap();
        assert_eq!(
            mapped_mib(&root, &[77]),
            None,
            "an unreadable counter is no count"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reads_and_sums_the_vms_of_a_process() {
        let root = fake_root("read");
        vm(&root, "4242-11", 1000, 300, 20);
        vm(&root, "4243-12", 5, 1, 1);
        vm(&root, "99-11", 77, 7, 7);
        assert_eq!(
            read(&root, &[4242]),
            Some(Counts {
                exits: 1000,
                io_exits: 300,
                mmio_exits: 20,
                irq_injections: 250,
                halt_exits: 100,
            })
        );
        // A thread of the process made the second VM.
        assert_eq!(read(&root, &[4242, 4243]).map(|c| c.exits), Some(1005));
        assert_eq!(read(&root, &[1]), None);
        assert_eq!(read(&root.join("missing"), &[4242]), None);
        assert!(available(&root) && !available(&root.join("missing")));
        std::fs::remove_file(root.join("99-11/mmio_exits")).unwrap();
        assert_eq!(
            read(&root, &[99]),
            None,
            "an unreadable counter is no count"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn markers_bracket_each_job() {
        let root = fake_root("meter");
        let pid = 4_000_000_000; // no such process: its own id is all there is
        let name = format!("{pid}-9");
        vm(&root, &name, 100, 10, 1);
        let mut m = ExitMeter::new(&root);
        m.line(pid, "CMPGO SER-A randread-4k-qd1\r");
        vm(&root, &name, 400, 160, 2);
        m.line(pid, "some other line");
        m.line(pid, "CMPEND\r");
        m.line(pid, "CMPEND");
        m.line(pid, "CMPGO SER-B randwrite-4k-qd1");
        std::fs::remove_dir_all(root.join(&name)).unwrap();
        m.line(pid, "CMPEND");
        assert_eq!(m.jobs.len(), 1, "{:?}", m.jobs);
        assert_eq!(
            m.jobs[&("SER-A".to_string(), "randread-4k-qd1".to_string())],
            Counts {
                exits: 300,
                io_exits: 150,
                mmio_exits: 1,
                irq_injections: 75,
                halt_exits: 30,
            }
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
