//! Reading the guest's console: `CMP` lines carry fio's terse (version 3)
//! output, `CMPFAIL` lines say what did not run.
//!
//! Terse v3 fields (1-based, from fio's HOWTO, "Terse output"): 1 version,
//! 3 job name, 5 error; read side 6 KiB, 7 bandwidth KiB/s, 8 IOPS,
//! 9 runtime ms, 10-13 submission latency, 14-17 completion latency
//! (min, max, mean, stdev; usec), 18-37 percentiles, 38-41 total latency,
//! 42-46 bandwidth statistics; the write side repeats that from 47
//! (48 bandwidth, 49 IOPS, 50 runtime ms, 57 mean completion latency).
//! The number of I/Os a job did is IOPS x runtime on each side.

use std::collections::BTreeMap;

/// One job's result.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Read + write I/Os per second.
    pub iops: f64,
    /// Read + write KiB per second.
    pub bw_kib: f64,
    /// Mean completion latency in microseconds (weighted by IOPS).
    pub clat_us: f64,
    /// Read + write I/Os the job completed.
    pub ios: f64,
    /// VM exits per I/O during the job (None when KVM's counters could not
    /// be read; see `kvm_stats`).
    pub exits_per_io: Option<f64>,
    /// Of those, port I/O and MMIO exits (the device's registers).
    pub pio_mmio_per_io: Option<f64>,
    /// Interrupts injected per I/O (how well completions are batched).
    pub irqs_per_io: Option<f64>,
    /// HLT exits per I/O (how often the vCPU sat waiting).
    pub halts_per_io: Option<f64>,
    /// The VMM's host CPU per I/O outside its vCPU threads, in microseconds (device
    /// emulation, I/O threads, workers; see `cpu_time`).
    pub vmm_cpu_us_per_io: Option<f64>,
    /// The vCPU threads' host CPU per I/O in microseconds (the guest's own time included).
    pub vcpu_cpu_us_per_io: Option<f64>,
}

impl Sample {
    /// Fill the per-I/O exit numbers from a job's exit counts.
    pub fn set_exits(&mut self, c: super::kvm_stats::Counts) {
        if self.ios > 0.0 {
            self.exits_per_io = Some(c.exits as f64 / self.ios);
            self.pio_mmio_per_io = Some((c.io_exits + c.mmio_exits) as f64 / self.ios);
            self.irqs_per_io = Some(c.irq_injections as f64 / self.ios);
            self.halts_per_io = Some(c.halt_exits as f64 / self.ios);
        }
    }

    /// Fill the per-I/O host CPU numbers from a job's CPU times.
    pub fn set_cpu(&mut self, c: super::cpu_time::CpuTimes) {
        if self.ios > 0.0 {
            self.vmm_cpu_us_per_io = Some(c.other_ns() as f64 / 1000.0 / self.ios);
            self.vcpu_cpu_us_per_io = Some(c.vcpu_ns as f64 / 1000.0 / self.ios);
        }
    }
}

/// What one boot reported.
#[derive(Debug, Default)]
pub struct Report {
    /// (serial, job) -> numbers.
    pub samples: BTreeMap<(String, String), Sample>,
    /// `serial what status` for each `CMPFAIL`, and unreadable `CMP` lines.
    pub failures: Vec<String>,
    /// Whether the guest's init reached its end and reported a status.
    pub exit: Option<i32>,
}

/// One report of several boots of the same VMM: for each (disk, job), the run with the
/// median IOPS (the upper one of an even count), with that run's other numbers. Failures
/// and the exit status are those of the last boot (earlier failed boots stop the compare).
pub fn median(runs: Vec<Report>) -> Report {
    let mut all: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    let mut last = Report::default();
    for r in runs {
        for (k, s) in &r.samples {
            all.entry(k.clone()).or_default().push(*s);
        }
        last = r;
    }
    last.samples = all
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            (k, v[v.len() / 2])
        })
        .collect();
    last
}

/// Each job's Platter/QEMU IOPS ratio in every round (round i of one VMM beside round i of
/// the other: they booted one after the other), for the spread a single median hides.
pub fn round_ratios(platter: &[Report], qemu: &[Report]) -> BTreeMap<(String, String), Vec<f64>> {
    let mut out: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for (p, q) in platter.iter().zip(qemu) {
        for (k, ps) in &p.samples {
            if let Some(qs) = q.samples.get(k).filter(|qs| qs.iops > 0.0) {
                out.entry(k.clone()).or_default().push(ps.iops / qs.iops);
            }
        }
    }
    out
}

/// (bandwidth, IOPS, runtime ms, mean completion latency) fields per side.
const READ: (usize, usize, usize, usize) = (7, 8, 9, 16);
const WRITE: (usize, usize, usize, usize) = (48, 49, 50, 57);
/// The last terse field read; the guest script keeps fields up to here.
pub const LAST_FIELD: usize = WRITE.3;
const TERSE_VERSION: &str = "3";
const GUEST_EXIT: &str = "PLATTER-GUEST-EXIT=";

/// Parse one terse v3 line into (job name, sample).
pub fn parse_terse(line: &str) -> Result<(String, Sample), String> {
    let f: Vec<&str> = line.trim().split(';').collect();
    if f.len() < LAST_FIELD || f[0] != TERSE_VERSION {
        return Err(format!(
            "not fio terse version 3 output ({} fields)",
            f.len()
        ));
    }
    let num = |i: usize| -> Result<f64, String> {
        f[i - 1]
            .parse::<f64>()
            .map_err(|_| format!("field {i} `{}` is not a number", f[i - 1]))
    };
    let error = num(5)?;
    if error != 0.0 {
        return Err(format!("fio reported error {error}"));
    }
    let (rbw, riops, rms, rlat) = (num(READ.0)?, num(READ.1)?, num(READ.2)?, num(READ.3)?);
    let (wbw, wiops, wms, wlat) = (num(WRITE.0)?, num(WRITE.1)?, num(WRITE.2)?, num(WRITE.3)?);
    let iops = riops + wiops;
    let clat_us = if iops > 0.0 {
        (rlat * riops + wlat * wiops) / iops
    } else {
        0.0
    };
    Ok((
        f[2].to_string(),
        Sample {
            iops,
            bw_kib: rbw + wbw,
            clat_us,
            ios: ((riops * rms + wiops * wms) / 1000.0).round(),
            ..Sample::default()
        },
    ))
}

/// Collect every `CMP`/`CMPFAIL` line and the guest's exit status from a
/// console log. The serial console may end lines with CR LF.
pub fn parse_console(text: &str) -> Report {
    let mut r = Report::default();
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix("CMP ") {
            let Some((serial, terse)) = rest.split_once(' ') else {
                r.failures.push(format!("unreadable line `{line}`"));
                continue;
            };
            match parse_terse(terse) {
                Ok((job, s)) => {
                    r.samples.insert((serial.to_string(), job), s);
                }
                Err(e) => r.failures.push(format!("{serial}: {e}")),
            }
        } else if let Some(rest) = line.strip_prefix("CMPFAIL ") {
            r.failures.push(rest.to_string());
        } else if let Some(rc) = line.trim().strip_prefix(GUEST_EXIT) {
            r.exit = rc.parse().ok();
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_keeps_each_jobs_middle_run() {
        let run = |a: f64, b: f64| {
            let mut r = Report::default();
            for (job, iops) in [("j1", a), ("j2", b)] {
                let s = Sample {
                    iops,
                    bw_kib: iops * 4.0,
                    ..Default::default()
                };
                r.samples.insert(("s".into(), job.into()), s);
            }
            r.exit = Some(0);
            r
        };
        let m = median(vec![run(10.0, 7.0), run(30.0, 5.0), run(20.0, 9.0)]);
        let get = |job: &str| m.samples[&("s".to_string(), job.to_string())];
        assert_eq!(get("j1").iops, 20.0);
        assert_eq!(get("j1").bw_kib, 80.0, "the median run's own numbers");
        assert_eq!(get("j2").iops, 7.0);
        assert_eq!(m.exit, Some(0));
        let one = median(vec![run(1.0, 2.0)]);
        assert_eq!(one.samples.len(), 2);
    }

    #[test]
    fn round_ratios_pair_the_rounds_in_order() {
        let run = |pairs: &[(&str, f64)]| {
            let mut r = Report::default();
            for (job, iops) in pairs {
                let s = Sample {
                    iops: *iops,
                    ..Default::default()
                };
                r.samples.insert(("s".into(), job.to_string()), s);
            }
            r
        };
        let platter = [run(&[("a", 10.0), ("b", 6.0)]), run(&[("a", 30.0)])];
        let qemu = [
            run(&[("a", 20.0), ("b", 0.0)]),
            run(&[("a", 15.0)]),
            run(&[("a", 1.0)]),
        ];
        let r = round_ratios(&platter, &qemu);
        assert_eq!(r[&("s".to_string(), "a".to_string())], [0.5, 2.0]);
        assert!(
            !r.contains_key(&("s".to_string(), "b".to_string())),
            "no ratio to 0 IOPS"
        );
    }

    /// A real fio 3.33 line (randread, 4k, depth 1), cut to 57 fields as the
    /// guest script does.
    const READ_LINE: &str = "3;fio-3.33;randread-4k-qd1;0;0;66364;66165;16541;1003;4;4050;15.505962;71.200689;0;5718;44.420858;165.687433;1.000000%=24;5.000000%=27;10.000000%=27;20.000000%=28;30.000000%=29;40.000000%=30;50.000000%=31;60.000000%=33;70.000000%=35;80.000000%=38;90.000000%=43;95.000000%=48;99.000000%=114;99.500000%=399;99.900000%=2867;99.950000%=3981;99.990000%=5603;0%=0;0%=0;0%=0;34;5731;59.926820;180.596024;60864;71712;100.000000%;66288.000000;7670.694362;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000";

    /// The write side of a real randwrite line: fields 47.. filled.
    fn write_line() -> String {
        let mut f: Vec<String> = READ_LINE.split(';').map(String::from).collect();
        f[2] = "randwrite-4k-qd4".into();
        for v in &mut f[5..46] {
            *v = "0".into();
        }
        f[47] = "81150".into();
        f[48] = "20287".into();
        f[49] = "2000".into();
        f[56] = "187.690880".into();
        f.join(";")
    }

    #[test]
    fn terse_read_and_write_sides() {
        let (job, s) = parse_terse(READ_LINE).unwrap();
        assert_eq!(job, "randread-4k-qd1");
        assert_eq!(s.iops, 16541.0);
        assert_eq!(s.bw_kib, 66165.0);
        assert!((s.clat_us - 44.420858).abs() < 1e-9);
        // 16541 IOPS over 1003 ms (66364 KiB / 4 KiB = 16591 I/Os).
        assert_eq!(s.ios, 16591.0);
        assert_eq!(s.exits_per_io, None);
        let (job, mut s) = parse_terse(&write_line()).unwrap();
        assert_eq!(job, "randwrite-4k-qd4");
        assert_eq!((s.iops, s.bw_kib, s.ios), (20287.0, 81150.0, 40574.0));
        assert!((s.clat_us - 187.69088).abs() < 1e-9);
        s.set_exits(crate::compare::kvm_stats::Counts {
            exits: 81148,
            io_exits: 40574,
            mmio_exits: 0,
            irq_injections: 20287,
            halt_exits: 40574,
        });
        assert_eq!((s.exits_per_io, s.pio_mmio_per_io), (Some(2.0), Some(1.0)));
        assert_eq!((s.irqs_per_io, s.halts_per_io), (Some(0.5), Some(1.0)));
    }

    #[test]
    fn terse_garbage_is_refused() {
        assert!(parse_terse("2;fio-2;x").is_err());
        assert!(parse_terse(&READ_LINE.replacen("3;", "4;", 1)).is_err());
        let short: Vec<&str> = READ_LINE.split(';').take(40).collect();
        assert!(parse_terse(&short.join(";")).is_err());
        let errored = READ_LINE.replacen(";0;0;66364", ";0;5;66364", 1);
        assert!(parse_terse(&errored).unwrap_err().contains("error 5"));
        let bad_num = READ_LINE.replacen(";16541;", ";lots;", 1);
        assert!(parse_terse(&bad_num).unwrap_err().contains("field 8"));
    }

    #[test]
    fn console_lines_are_collected() {
        let log = format!(
            "PLATTER-GUEST-INIT\r\n[    1.0] some kernel line\r\nCMP SER-A {READ_LINE}\r\n\
             CMP SER-B {}\r\nCMPFAIL SER-B read-128k-qd8 1\r\n==> /tmp/e <==\r\n\
             CMP SER-C 3;fio\r\nPLATTER-GUEST-EXIT=1\r\n",
            write_line()
        );
        let r = parse_console(&log);
        assert_eq!(r.samples.len(), 2);
        assert!(r
            .samples
            .contains_key(&("SER-A".into(), "randread-4k-qd1".into())));
        assert!(r
            .samples
            .contains_key(&("SER-B".into(), "randwrite-4k-qd4".into())));
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);
        assert_eq!(r.failures[0], "SER-B read-128k-qd8 1");
        assert!(r.failures[1].starts_with("SER-C: "));
        assert_eq!(r.exit, Some(1));
        assert_eq!(parse_console("nothing").exit, None);
    }
}
