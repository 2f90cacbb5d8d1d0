//! The text report: a header saying what was measured and how far to trust
//! it, one row per disk x job, a summary line per disk, and the IDE /
//! virtio-blk gap when the config has both on equal settings.

use super::fio::Sample;
use super::results::{controller_gaps, DiskResult, RunInfo};

/// Column headings; the rows line up under them.
const HEADINGS: [&str; 13] = [
    "disk",
    "controller",
    "format",
    "cache",
    "aio",
    "job",
    "platter_iops",
    "qemu_iops",
    "ratio",
    "platter_MiB/s",
    "qemu_MiB/s",
    "platter_exits/io",
    "qemu_exits/io",
];
/// The first column holding a number (right-aligned from here on).
const FIRST_NUMBER: usize = 6;

/// The lines above the table.
pub fn header(info: &RunInfo, qemu: bool) -> String {
    let mut h = format!(
        "Disk comparison of {}: fio in the guest, O_DIRECT, libaio, {} s per job over the first {} MiB of each disk.\n",
        info.config,
        info.runtime,
        info.size >> 20
    );
    if qemu {
        h += "Platter and QEMU boot the same kernel, initramfs and disks; ratio = Platter IOPS / QEMU IOPS.\n";
    } else {
        h += "QEMU was not run (--qemu never, or qemu-system-x86_64 not on PATH): Platter's numbers only.\n";
    }
    if info.rounds > 1 {
        h += &format!(
            "Each VMM booted {} times, alternating; each number is the median run's (below the table: each ratio's lowest and highest round). Only the ratios between VMMs in the same comparison mean something",
            info.rounds
        );
    } else {
        h += "Numbers come from one run on this machine (--rounds N alternates N boots of each VMM and keeps the medians): only the ratios between VMMs in the same run mean something";
    }
    if info.in_rig {
        h += ";\nthis ran in the nested rig, where emulation distorts every absolute number (see shared/RIG.md)";
    }
    h += ".\n";
    if info.exits {
        h += "exits/io = the VM's vCPU exits during the job (KVM's own counters) / the I/Os fio completed.\n";
    } else {
        h += "exits/io not measured (shown as -): KVM's counters in /sys/kernel/debug/kvm need root and debugfs mounted.\n";
    }
    h
}

/// The table and the per-disk summaries.
pub fn render(disks: &[DiskResult]) -> String {
    let mut rows: Vec<[String; 13]> = vec![HEADINGS.map(String::from)];
    let iops = |s: Option<Sample>| s.map_or("-".into(), |s| format!("{:.0}", s.iops));
    let mib = |s: Option<Sample>| s.map_or("-".into(), |s| format!("{:.1}", s.bw_kib / 1024.0));
    let exits = |s: Option<Sample>| {
        s.and_then(|s| s.exits_per_io)
            .map_or("-".into(), |e| format!("{e:.1}"))
    };
    for d in disks {
        for j in &d.jobs {
            rows.push([
                d.id.clone(),
                d.controller.clone(),
                d.format.clone(),
                d.cache.clone(),
                d.aio.clone(),
                j.job.clone(),
                iops(j.platter),
                iops(j.qemu),
                j.ratio().map_or("-".into(), |r| format!("{r:.2}")),
                mib(j.platter),
                mib(j.qemu),
                exits(j.platter),
                exits(j.qemu),
            ]);
        }
    }
    let widths: Vec<usize> = (0..HEADINGS.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                // Text left-aligned, numbers right-aligned.
                if c < FIRST_NUMBER {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out.push('\n');
    // The table's columns stay fixed; the spread over rounds gets its own lines.
    let spreads: Vec<String> = disks
        .iter()
        .flat_map(|d| {
            d.jobs.iter().filter_map(move |j| {
                let (lo, hi) = j.ratio_spread()?;
                Some(format!("{} {} {lo:.2}-{hi:.2}", d.id, j.job))
            })
        })
        .collect();
    if !spreads.is_empty() {
        out += "Ratio per round, lowest-highest (the noise around each median):\n";
        for l in spreads {
            out += &format!("  {l}\n");
        }
        out.push('\n');
    }
    out += &cpu_lines(disks);
    for d in disks {
        match d.mean_ratio() {
            Some((m, n)) => {
                out += &format!(
                    "{} ({}): Platter/QEMU IOPS {m:.2} (geometric mean of {n} jobs)",
                    d.id,
                    d.describe()
                );
                let spreads: Vec<(f64, f64)> =
                    d.jobs.iter().filter_map(|j| j.ratio_spread()).collect();
                if !spreads.is_empty() {
                    out += &format!(
                        "; at least 1.00 in every round: {} of {} jobs, in none: {}",
                        spreads.iter().filter(|(lo, _)| *lo >= 1.0).count(),
                        spreads.len(),
                        spreads.iter().filter(|(_, hi)| *hi < 1.0).count()
                    );
                }
                out.push('\n');
            }
            None => out += &format!("{} ({}): no ratio (QEMU not run)\n", d.id, d.describe()),
        }
    }
    out
}

/// Host CPU per I/O outside the vCPUs, a line per disk (empty when it was not measured):
/// what a request costs each VMM's device side, which exits per I/O do not show.
fn cpu_lines(disks: &[DiskResult]) -> String {
    let us = |s: Option<Sample>| {
        s.and_then(|s| s.vmm_cpu_us_per_io)
            .map_or("-".into(), |c| format!("{c:.0}"))
    };
    let lines: Vec<String> = disks
        .iter()
        .filter(|d| {
            d.jobs.iter().any(|j| {
                j.platter.is_some_and(|s| s.vmm_cpu_us_per_io.is_some())
                    || j.qemu.is_some_and(|s| s.vmm_cpu_us_per_io.is_some())
            })
        })
        .map(|d| {
            let jobs: Vec<String> = d
                .jobs
                .iter()
                .map(|j| format!("{} {}/{}", j.job, us(j.platter), us(j.qemu)))
                .collect();
            format!("  {}: {}\n", d.id, jobs.join(", "))
        })
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "Host CPU per I/O outside the vCPUs (device emulation, I/O threads, workers), us, platter/qemu:\n{}\n",
        lines.concat()
    )
}

/// One line per VMM and setting where IDE and virtio-blk disks ran the same
/// jobs: how far the emulated controller is behind (empty otherwise).
pub fn gap_lines(disks: &[DiskResult]) -> String {
    let mut out = String::new();
    for g in controller_gaps(disks) {
        out += &format!(
            "IDE/virtio-blk under {}: IOPS {:.2} (geometric mean of {} jobs; {})",
            g.vmm, g.iops_ratio, g.pairs, g.settings
        );
        if let Some((ide, virtio)) = g.exits {
            out += &format!("; exits/IO {ide:.1} vs {virtio:.1}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::results::tests::disk;
    use super::*;

    fn info_clone(i: &RunInfo) -> RunInfo {
        RunInfo {
            config: i.config.clone(),
            ..*i
        }
    }

    #[test]
    fn host_cpu_per_io_gets_a_line_per_measured_disk() {
        let mut a = disk(
            "a",
            &[("randread-4k-qd1", 1000.0, Some(500.0)), ("w", 20.0, None)],
        );
        let plain = render(std::slice::from_ref(&a));
        assert!(!plain.contains("Host CPU"), "nothing measured: {plain}");
        if let Some(s) = a.jobs[0].platter.as_mut() {
            s.vmm_cpu_us_per_io = Some(12.4);
        }
        if let Some(s) = a.jobs[0].qemu.as_mut() {
            s.vmm_cpu_us_per_io = Some(30.6);
        }
        let t = render(&[a, disk("b", &[("r", 7.0, None)])]);
        assert!(
            t.contains("platter/qemu:\n  a: randread-4k-qd1 12/31, w -/-\n\n"),
            "{t}"
        );
        assert!(!t.contains("  b: "), "b was not measured: {t}");
    }

    #[test]
    fn table_has_a_row_per_disk_and_job() {
        let mut a = disk(
            "a",
            &[
                ("randread-4k-qd1", 1000.0, Some(500.0)),
                ("write-128k-qd8", 20.0, Some(40.0)),
            ],
        );
        a.jobs[0].round_ratios = vec![2.5, 1.25, 2.0];
        a.jobs[1].round_ratios = vec![0.5, 0.75];
        let t = render(&[a, disk("b", &[("randread-4k-qd1", 7.0, None)])]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("disk  controller  format  cache  aio"),
            "{t}"
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "a",
                "virtio-blk",
                "raw",
                "none",
                "io_uring",
                "randread-4k-qd1",
                "1000",
                "500",
                "2.00",
                "3.9",
                "2.0",
                "-",
                "-"
            ]
        );
        assert_eq!(lines[2].split_whitespace().nth(8), Some("0.50"));
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>()[6..],
            ["7", "-", "-", "0.0", "-", "-", "-"]
        );
        assert!(t.contains("a (virtio-blk, raw, cache=none, aio=io_uring): Platter/QEMU IOPS 1.00 (geometric mean of 2 jobs); at least 1.00 in every round: 1 of 2 jobs, in none: 1\n"), "{t}");
        assert!(
            t.contains("lowest-highest (the noise around each median):\n  a randread-4k-qd1 1.25-2.50\n  a write-128k-qd8 0.50-0.75\n\n"),
            "{t}"
        );
        assert!(
            t.contains("b (virtio-blk, raw, cache=none, aio=io_uring): no ratio"),
            "{t}"
        );
    }

    #[test]
    fn exits_per_io_columns_and_the_controller_gap() {
        let mut ide = disk("hd", &[("randread-4k-qd1", 300.0, Some(250.0))]);
        ide.controller = "ide".into();
        let mut virtio = disk("vd", &[("randread-4k-qd1", 1200.0, Some(1000.0))]);
        for (d, p, q) in [(&mut ide, 38.26, 41.0), (&mut virtio, 5.04, 5.2)] {
            d.jobs[0].platter.as_mut().unwrap().exits_per_io = Some(p);
            d.jobs[0].qemu.as_mut().unwrap().exits_per_io = Some(q);
        }
        let disks = [ide, virtio];
        let t = render(&disks);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].ends_with("platter_MiB/s  qemu_MiB/s  platter_exits/io  qemu_exits/io"),
            "{t}"
        );
        let cells = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[1])[1..],
            [
                "ide",
                "raw",
                "none",
                "io_uring",
                "randread-4k-qd1",
                "300",
                "250",
                "1.20",
                "1.2",
                "1.0",
                "38.3",
                "41.0"
            ]
        );
        assert_eq!(cells(lines[2])[11..], ["5.0", "5.2"]);
        // Numbers right-aligned under their headings.
        assert_eq!(lines[0].len(), lines[1].len(), "{t}");
        let g = gap_lines(&disks);
        assert_eq!(
            g,
            "IDE/virtio-blk under Platter: IOPS 0.25 (geometric mean of 1 jobs; raw, cache=none, aio=io_uring); exits/IO 38.3 vs 5.0\n\
             IDE/virtio-blk under QEMU: IOPS 0.25 (geometric mean of 1 jobs; raw, cache=none, aio=io_uring); exits/IO 41.0 vs 5.2\n"
        );
        assert_eq!(gap_lines(&disks[1..]), "");
    }

    #[test]
    fn header_warns_about_the_rig() {
        let info = RunInfo {
            config: "c.toml".into(),
            runtime: 2,
            size: 16 << 20,
            in_rig: true,
            exits: false,
            rounds: 1,
        };
        let h = header(&info, true);
        assert!(
            header(
                &RunInfo {
                    rounds: 3,
                    ..info_clone(&info)
                },
                true
            )
            .contains("booted 3 times, alternating"),
            "{h}"
        );
        assert!(
            h.contains("only the ratios") && h.contains("nested rig"),
            "{h}"
        );
        assert_eq!(h.matches("exits/io not measured").count(), 1, "{h}");
        assert!(header(
            &RunInfo {
                exits: true,
                ..info_clone(&info)
            },
            true
        )
        .contains("KVM's own counters"));
        assert!(header(
            &RunInfo {
                in_rig: false,
                ..info
            },
            false
        )
        .contains("QEMU was not run"));
    }
}
