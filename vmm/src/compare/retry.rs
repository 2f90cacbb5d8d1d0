//! Boots that fail, and what is kept of them.
//!
//! In the nested rig a guest now and then stops running or triple-faults, most often
//! minutes into a boot, after it measured some disks already. A boot that fails is tried
//! again ([`BOOT_ATTEMPTS`] boots of a VMM per round at most), and the next boot measures
//! only the disks the failed ones did not finish: a disk is measured whole within one boot
//! (its region written, then each of its jobs), so every number of a disk comes from the
//! same boot, and the boots after a failure are shorter, which leaves less time for the
//! next one.
//!
//! ```text
//!  boot 1: raw-none ✓  raw-wb (guest stalls)          kept: raw-none
//!  boot 2:             raw-wb ✓  qcow2 ✓              report: raw-none + raw-wb + qcow2
//! ```

use std::process::Command;

use super::plan::{Job, Subject};
use super::{boot_and_measure, fio, Error, Plan};
use crate::watch;

/// Boots of one VMM per round at most: a guest of the nested rig now and then stops running
/// or triple-faults (QEMU 7.2's twice in six boots of one run; Platter's three times in a
/// row in one three-disk run, each time on the writeback/threads disk).
pub const BOOT_ATTEMPTS: u32 = 3;

/// Boot a VMM (`cmd` makes its command for a kernel command line) and measure every disk of
/// the plan, booting again for the disks a failed boot did not finish; the last failure is
/// the error.
pub(super) fn boot(
    plan: &Plan,
    who: &'static str,
    cmd: impl Fn(&str) -> Result<Command, Error>,
) -> Result<fio::Report, Error> {
    let mut kept = fio::Report::default();
    let mut left: Vec<Subject> = plan.subjects.clone();
    watch::retry(
        BOOT_ATTEMPTS,
        || {
            let c = match plan.cmdline_for(&left).and_then(|line| cmd(&line)) {
                Ok(c) => c,
                // A command that cannot be built will not be built the next time either.
                Err(e) => return (Err(e), None),
            };
            match boot_and_measure(who, c, plan, &left) {
                Ok(mut r) => {
                    r.samples.append(&mut kept.samples);
                    (Ok(r), None)
                }
                // This machine cannot boot anything any more: the host side of the rig
                // starts a fresh L1 (`EXIT_WEDGED`).
                Err((e @ Error::Wedged(_), _)) => (Err(e), None),
                Err((e, partial)) => {
                    let done = finished(&left, &plan.jobs, &partial);
                    for (key, sample) in partial.samples {
                        if done.contains(&key.0) {
                            kept.samples.insert(key, sample);
                        }
                    }
                    left.retain(|s| !done.contains(&s.serial));
                    if left.is_empty() {
                        // Every disk reported before the boot went wrong.
                        eprintln!(
                            "platter compare: {e}, after every disk was measured; keeping the numbers"
                        );
                        kept.exit = partial.exit;
                        return (Ok(std::mem::take(&mut kept)), None);
                    }
                    let why = if done.is_empty() {
                        e.to_string()
                    } else {
                        let ids: Vec<&str> = left.iter().map(|s| s.disk.id.as_str()).collect();
                        format!(
                            "{e}; keeping the disks it finished, measuring {}",
                            ids.join(", ")
                        )
                    };
                    (Err(e), Some(why))
                }
            }
        },
        |why| eprintln!("platter compare: {why}; booting {who} once more"),
    )
}

/// The serials of `subjects` that `report` has every job for (writes are not run on a
/// read-only disk) and no failure of.
pub(super) fn finished(subjects: &[Subject], jobs: &[Job], report: &fio::Report) -> Vec<String> {
    subjects
        .iter()
        .filter(|s| missing_job(s, jobs, report).is_none())
        .filter(|s| {
            !report
                .failures
                .iter()
                .any(|f| f.split([' ', ':']).next() == Some(s.serial.as_str()))
        })
        .map(|s| s.serial.clone())
        .collect()
}

/// The first job of `subject` that `report` has no numbers for.
pub(super) fn missing_job<'a>(
    subject: &Subject,
    jobs: &'a [Job],
    report: &fio::Report,
) -> Option<&'a Job> {
    jobs.iter()
        .filter(|j| !(subject.disk.readonly && j.writes()))
        .find(|j| {
            !report
                .samples
                .contains_key(&(subject.serial.clone(), j.name.clone()))
        })
}

/// QEMU's arguments with `cmdline` as the kernel command line (`-append`).
pub(super) fn with_append(args: &[String], cmdline: &str) -> Vec<String> {
    let mut out = args.to_vec();
    if let Some(i) = out.iter().position(|a| a == "-append") {
        if let Some(v) = out.get_mut(i + 1) {
            *v = cmdline.to_string();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DiskFormat};

    fn subjects() -> Vec<Subject> {
        let disk = |id: &str, extra: &str| {
            format!("[[disk]]\nid = \"{id}\"\npath = \"{id}.raw\"\ncontroller = \"virtio-blk\"\n{extra}")
        };
        let text = format!(
            "[kernel]\npath = \"k\"\n{}{}{}",
            disk("a", ""),
            disk("b", ""),
            disk("ro", "readonly = true\n")
        );
        let mut c = Config::parse(&text, "t.toml", &[]).unwrap();
        for d in &mut c.disks {
            d.format = Some(DiskFormat::Raw);
        }
        super::super::plan::subjects(&c).unwrap()
    }

    fn report(samples: &[(&str, &str)], failures: &[&str]) -> fio::Report {
        let mut r = fio::Report::default();
        for (serial, job) in samples {
            r.samples.insert(
                (serial.to_string(), job.to_string()),
                fio::Sample::default(),
            );
        }
        r.failures = failures.iter().map(|f| f.to_string()).collect();
        r
    }

    /// A disk counts as finished with every job it runs and no failure; a read-only disk
    /// runs no writes.
    #[test]
    fn finished_disks_have_every_job_and_no_failure() {
        let s = subjects();
        let jobs = super::super::plan::parse_jobs("randread-4k-qd1,randwrite-4k-qd1").unwrap();
        let all = [
            ("a", "randread-4k-qd1"),
            ("a", "randwrite-4k-qd1"),
            ("b", "randread-4k-qd1"),
            ("ro", "randread-4k-qd1"),
        ];
        assert_eq!(finished(&s, &jobs, &report(&all, &[])), ["a", "ro"]);
        let b_failed = report(&all, &["b randwrite-4k-qd1 1"]);
        assert_eq!(finished(&s, &jobs, &b_failed), ["a", "ro"]);
        let a_failed = report(&all, &["a fill 1", "ro: unreadable"]);
        assert_eq!(finished(&s, &jobs, &a_failed), Vec::<String>::new());
        assert!(finished(&s, &jobs, &report(&[], &[])).is_empty());
        let job = missing_job(&s[1], &jobs, &report(&all, &[])).unwrap();
        assert_eq!(job.name, "randwrite-4k-qd1");
    }

    /// A terse line of one job (fio 3.33), for the fake VMM below.
    const TERSE: &str = "3;fio-3.33;randread-4k-qd1;0;0;66364;66165;16541;1003;4;4050;15.5;71.2;\
        0;5718;44.4;165.6;1.000000%=24;5.000000%=27;10.000000%=27;20.000000%=28;30.000000%=29;\
        40.000000%=30;50.000000%=31;60.000000%=33;70.000000%=35;80.000000%=38;90.000000%=43;\
        95.000000%=48;99.000000%=114;99.500000%=399;99.900000%=2867;99.950000%=3981;\
        99.990000%=5603;0%=0;0%=0;0%=0;34;5731;59.9;180.5;60864;71712;100.000000%;66288.0;\
        7670.6;0;0;0;0;0;0;0.0;0.0;0;0;0.0";

    /// A VMM that measures the disks its guest script names, and whose first boot dies
    /// after the first disk: the second boot measures only the other disks, and the
    /// report has every disk.
    #[test]
    fn a_failed_boot_keeps_the_disks_it_finished() {
        let dir = std::env::temp_dir().join(format!("platter-retry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let subjects: Vec<Subject> = subjects().into_iter().take(2).collect();
        let jobs = super::super::plan::parse_jobs("randread-4k-qd1").unwrap();
        let modules = vec!["virtio_blk"];
        let plan = Plan {
            subjects,
            jobs,
            size: 1 << 20,
            overrides: Vec::new(),
            qemu: None,
            base_cmdline: "console=ttyS0".into(),
            modules,
            runtime: 1,
            timeout: std::time::Duration::from_secs(30),
            silence: std::time::Duration::from_secs(30),
            _scratch: None,
        };
        // Boot n: the disks of the script (D='serial:rw ...'), one result each; boot 1
        // dies after the first.
        let fake = format!(
            "n=$(($(cat boots 2>/dev/null || echo 0) + 1)); echo $n > boots\n\
             d=$(printf %s \"$1\" | sed 's/.*rig.cmd=//' | base64 -d | sed -n \"s/.* D='\\([^']*\\)'.*/\\1/p\")\n\
             echo \"$d\" >> disks\n\
             for x in $d; do echo \"CMP ${{x%:*}} {TERSE}\"; [ $n = 1 ] && exit 3; done\n\
             echo PLATTER-GUEST-EXIT=0\n"
        );
        let r = boot(&plan, "qemu", |line| {
            let mut c = Command::new("sh");
            c.current_dir(&dir).args(["-c", &fake, "fake-vmm", line]);
            Ok(c)
        })
        .unwrap();
        let boots = std::fs::read_to_string(dir.join("disks")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            boots, "a:rw b:rw\nb:rw\n",
            "the second boot measured only b"
        );
        let got: Vec<&str> = r.samples.keys().map(|(s, _)| s.as_str()).collect();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(r.exit, Some(0));
    }

    #[test]
    fn qemu_gets_the_new_command_line() {
        let args: Vec<String> = ["-m", "512M", "-append", "old line", "-no-reboot"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            with_append(&args, "new"),
            ["-m", "512M", "-append", "new", "-no-reboot"]
        );
        let without: Vec<String> = vec!["-m".into()];
        assert_eq!(with_append(&without, "new"), without);
    }
}
