//! Boots already measured, kept across the whole-comparison runs of one `platter compare`
//! in the nested rig.
//!
//! When the rig's L1 dies or hangs, the comparison runs again in a new L1; without this it
//! would start over and lose every round the dead L1 had finished (a three-round run lost
//! two whole rounds so). The comparison inside L1 appends each successful boot's numbers to
//! a file in the repository (the one place L1 and the host share writably); the run after a
//! failure reads it and boots only what is missing. The host side makes the file for one
//! invocation and removes it at the end.
//!
//! ```text
//!  J <round> <vmm> <serial> <job> <iops> <bw KiB/s> <clat us> <ios> <exits> <pio+mmio> <irqs> <halts> <vmm cpu> <vcpu cpu>
//!  ...                                        (one per job; "-" for a number not measured)
//!  BOOT <round> <vmm>                         (the boot's lines are complete)
//! ```
//!
//! A boot counts only with its `BOOT` line, so one cut short by L1's death is measured again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::fio::{Report, Sample};

/// The boots a file holds: (round, VMM) -> what the boot reported.
pub type Saved = BTreeMap<(u32, String), Report>;

/// Read the boots in `path`; nothing when it is missing or unreadable.
pub fn load(path: &Path) -> Saved {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut pending: BTreeMap<(u32, String), Report> = BTreeMap::new();
    let mut saved = Saved::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["BOOT", round, who] => {
                let Ok(r) = round.parse::<u32>() else {
                    continue;
                };
                if let Some(mut report) = pending.remove(&(r, who.to_string())) {
                    report.exit = Some(0);
                    saved.insert((r, who.to_string()), report);
                }
            }
            ["J", round, who, serial, job, nums @ ..] => {
                let (Ok(r), Some(s)) = (round.parse::<u32>(), sample(nums)) else {
                    continue;
                };
                pending
                    .entry((r, who.to_string()))
                    .or_default()
                    .samples
                    .insert((serial.to_string(), job.to_string()), s);
            }
            _ => {}
        }
    }
    saved
}

/// Append one boot's numbers to `path`, in one write.
pub fn save(path: &Path, round: u32, who: &str, report: &Report) -> std::io::Result<()> {
    let mut text = String::new();
    for ((serial, job), s) in &report.samples {
        text += &format!("J {round} {who} {serial} {job} {}\n", numbers(s));
    }
    text += &format!("BOOT {round} {who}\n");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

fn numbers(s: &Sample) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
    [
        s.iops.to_string(),
        s.bw_kib.to_string(),
        s.clat_us.to_string(),
        s.ios.to_string(),
        opt(s.exits_per_io),
        opt(s.pio_mmio_per_io),
        opt(s.irqs_per_io),
        opt(s.halts_per_io),
        opt(s.vmm_cpu_us_per_io),
        opt(s.vcpu_cpu_us_per_io),
    ]
    .join(" ")
}

fn sample(nums: &[&str]) -> Option<Sample> {
    let [iops, bw, clat, ios, exits, pio, irqs, halts, vmm, vcpu] = nums else {
        return None;
    };
    let opt = |v: &str| -> Option<Option<f64>> {
        match v {
            "-" => Some(None),
            v => v.parse().ok().map(Some),
        }
    };
    Some(Sample {
        iops: iops.parse().ok()?,
        bw_kib: bw.parse().ok()?,
        clat_us: clat.parse().ok()?,
        ios: ios.parse().ok()?,
        exits_per_io: opt(exits)?,
        pio_mmio_per_io: opt(pio)?,
        irqs_per_io: opt(irqs)?,
        halts_per_io: opt(halts)?,
        vmm_cpu_us_per_io: opt(vmm)?,
        vcpu_cpu_us_per_io: opt(vcpu)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(iops: f64, exits: Option<f64>) -> Report {
        let mut r = Report::default();
        let s = Sample {
            iops,
            bw_kib: iops * 4.0,
            clat_us: 123.456_789,
            ios: 5000.0,
            exits_per_io: exits,
            vcpu_cpu_us_per_io: Some(0.1 + 0.2),
            ..Default::default()
        };
        r.samples
            .insert(("SER-A".into(), "randread-4k-qd1".into()), s);
        r.samples.insert(("b".into(), "write-128k-qd8".into()), s);
        r
    }

    /// Saved boots come back number for number; a boot without its closing line (L1 died
    /// while writing it) and a missing file give nothing.
    #[test]
    fn boots_round_trip_and_cut_boots_are_dropped() {
        let path = std::env::temp_dir().join(format!("platter-state-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert!(load(&path).is_empty());
        save(&path, 1, "platter", &report(1000.5, Some(2.25))).unwrap();
        save(&path, 1, "qemu", &report(900.0, None)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"J 2 platter SER-A randread-4k-qd1 1 2 3 4 - - - - - -\n")
            .unwrap();
        let got = load(&path);
        let _ = std::fs::remove_file(&path);
        let keys: Vec<(u32, &str)> = got.keys().map(|(r, w)| (*r, w.as_str())).collect();
        assert_eq!(keys, [(1, "platter"), (1, "qemu")]);
        let p = &got[&(1, "platter".to_string())];
        assert_eq!(p.samples, report(1000.5, Some(2.25)).samples);
        assert_eq!(p.exit, Some(0));
        assert_eq!(
            got[&(1, "qemu".to_string())].samples,
            report(900.0, None).samples
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(sample(&["1", "2", "3"]).is_none());
        assert!(sample(&["x", "2", "3", "4", "-", "-", "-", "-", "-", "-"]).is_none());
        let s = sample(&["1", "2", "3", "4", "5", "-", "-", "-", "-", "6"]).unwrap();
        assert_eq!(
            (s.exits_per_io, s.vcpu_cpu_us_per_io, s.halts_per_io),
            (Some(5.0), Some(6.0), None)
        );
    }
}
