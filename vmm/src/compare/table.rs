//! The text report: a header saying what was measured and how far to trust
//! it, one row per disk x job, and a summary line per disk.

use super::results::{DiskResult, RunInfo};

/// Column headings; the rows line up under them.
const HEADINGS: [&str; 11] = [
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
];

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
    h += "Numbers come from one run on this machine: only the ratios between VMMs in the same run mean something";
    if info.in_rig {
        h += ";\nthis ran in the nested rig, where emulation distorts every absolute number (see shared/RIG.md)";
    }
    h += ".\n";
    h
}

/// The table and the per-disk summaries.
pub fn render(disks: &[DiskResult]) -> String {
    let mut rows: Vec<[String; 11]> = vec![HEADINGS.map(String::from)];
    for d in disks {
        for j in &d.jobs {
            let iops =
                |s: Option<super::fio::Sample>| s.map_or("-".into(), |s| format!("{:.0}", s.iops));
            let mib = |s: Option<super::fio::Sample>| {
                s.map_or("-".into(), |s| format!("{:.1}", s.bw_kib / 1024.0))
            };
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
                if c < 6 {
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
    for d in disks {
        match d.mean_ratio() {
            Some((m, n)) => {
                out += &format!(
                    "{} ({}): Platter/QEMU IOPS {m:.2} (geometric mean of {n} jobs)\n",
                    d.id,
                    d.describe()
                )
            }
            None => out += &format!("{} ({}): no ratio (QEMU not run)\n", d.id, d.describe()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::results::tests::disk;
    use super::*;

    #[test]
    fn table_has_a_row_per_disk_and_job() {
        let t = render(&[
            disk(
                "a",
                &[
                    ("randread-4k-qd1", 1000.0, Some(500.0)),
                    ("write-128k-qd8", 20.0, Some(40.0)),
                ],
            ),
            disk("b", &[("randread-4k-qd1", 7.0, None)]),
        ]);
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
                "2.0"
            ]
        );
        assert_eq!(lines[2].split_whitespace().nth(8), Some("0.50"));
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>()[6..],
            ["7", "-", "-", "0.0", "-"]
        );
        assert!(t.contains("a (virtio-blk, raw, cache=none, aio=io_uring): Platter/QEMU IOPS 1.00 (geometric mean of 2 jobs)"), "{t}");
        assert!(
            t.contains("b (virtio-blk, raw, cache=none, aio=io_uring): no ratio"),
            "{t}"
        );
    }

    #[test]
    fn header_warns_about_the_rig() {
        let info = RunInfo {
            config: "c.toml".into(),
            runtime: 2,
            size: 16 << 20,
            in_rig: true,
        };
        let h = header(&info, true);
        assert!(
            h.contains("only the ratios") && h.contains("nested rig"),
            "{h}"
        );
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
