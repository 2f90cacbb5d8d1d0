//! The numbers of one comparison: per disk, per job, Platter's and QEMU's
//! samples; their ratios, and the raw numbers as JSON (`--json`).

use std::collections::BTreeMap;

use super::fio::{Report, Sample};
use super::plan::{Job, Subject};
use super::qemu::{aio_name, cache_name, format_name};

/// One disk's results.
#[derive(Debug, Clone)]
pub struct DiskResult {
    /// The config's id.
    pub id: String,
    /// The serial the guest found it by.
    pub serial: String,
    /// Controller, format, cache and aio names, as in the config.
    pub controller: String,
    /// raw or qcow2.
    pub format: String,
    /// The cache mode.
    pub cache: String,
    /// The I/O engine.
    pub aio: String,
    /// One per job, in `--jobs` order (write jobs absent on read-only disks).
    pub jobs: Vec<JobResult>,
}

/// One job on one disk.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The job's name.
    pub job: String,
    /// Under Platter.
    pub platter: Option<Sample>,
    /// Under QEMU (None when QEMU was not run).
    pub qemu: Option<Sample>,
    /// The ratio in each round (with `--rounds`; empty otherwise).
    pub round_ratios: Vec<f64>,
}

impl JobResult {
    /// Platter IOPS / QEMU IOPS.
    pub fn ratio(&self) -> Option<f64> {
        match (self.platter, self.qemu) {
            (Some(p), Some(q)) if q.iops > 0.0 => Some(p.iops / q.iops),
            _ => None,
        }
    }

    /// The lowest and highest ratio of the rounds, when there were several.
    pub fn ratio_spread(&self) -> Option<(f64, f64)> {
        if self.round_ratios.len() < 2 {
            return None;
        }
        let lo = self.round_ratios.iter().copied().fold(f64::MAX, f64::min);
        let hi = self.round_ratios.iter().copied().fold(f64::MIN, f64::max);
        Some((lo, hi))
    }
}

impl DiskResult {
    /// The geometric mean of the job ratios, and how many there were.
    pub fn mean_ratio(&self) -> Option<(f64, usize)> {
        let logs: Vec<f64> = self
            .jobs
            .iter()
            .filter_map(JobResult::ratio)
            .filter(|r| *r > 0.0)
            .map(f64::ln)
            .collect();
        (!logs.is_empty()).then(|| {
            (
                (logs.iter().sum::<f64>() / logs.len() as f64).exp(),
                logs.len(),
            )
        })
    }

    /// `raw, cache=none, aio=io_uring`-style description.
    pub fn describe(&self) -> String {
        format!(
            "{}, {}, cache={}, aio={}",
            self.controller, self.format, self.cache, self.aio
        )
    }
}

/// Put the two boots' reports together in plan order.
pub fn collect(
    subjects: &[Subject],
    jobs: &[Job],
    platter: &Report,
    qemu: Option<&Report>,
    round_ratios: &BTreeMap<(String, String), Vec<f64>>,
) -> Vec<DiskResult> {
    subjects
        .iter()
        .map(|s| DiskResult {
            id: s.disk.id.clone(),
            serial: s.serial.clone(),
            controller: s.disk.controller.name().to_string(),
            format: format_name(s.format).to_string(),
            cache: cache_name(s.disk.cache).to_string(),
            aio: aio_name(s.disk.aio).to_string(),
            jobs: jobs
                .iter()
                .filter(|j| !(s.disk.readonly && j.writes()))
                .map(|j| {
                    let key = (s.serial.clone(), j.name.clone());
                    JobResult {
                        job: j.name.clone(),
                        platter: platter.samples.get(&key).copied(),
                        qemu: qemu.and_then(|q| q.samples.get(&key).copied()),
                        round_ratios: round_ratios.get(&key).cloned().unwrap_or_default(),
                    }
                })
                .collect(),
        })
        .collect()
}

/// IDE against virtio-blk on equal format, cache and aio, under one VMM:
/// the gap between the emulated and the paravirtual controller.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerGap {
    /// "Platter" or "QEMU".
    pub vmm: &'static str,
    /// `raw, cache=none, aio=io_uring`.
    pub settings: String,
    /// IDE IOPS / virtio-blk IOPS, geometric mean over the job pairs.
    pub iops_ratio: f64,
    /// How many (IDE job, virtio-blk job) pairs that is.
    pub pairs: usize,
    /// Mean exits per I/O of the IDE and of the virtio-blk jobs, when counted.
    pub exits: Option<(f64, f64)>,
}

/// The controller gaps a result set shows: for each VMM and each format,
/// cache and aio that both an IDE and a virtio-blk disk have, every job the
/// two ran is a pair.
pub fn controller_gaps(disks: &[DiskResult]) -> Vec<ControllerGap> {
    let settings = |d: &DiskResult| format!("{}, cache={}, aio={}", d.format, d.cache, d.aio);
    let mut groups: Vec<String> = Vec::new();
    for d in disks.iter().filter(|d| d.controller == "ide") {
        let g = settings(d);
        let twin = disks
            .iter()
            .any(|v| v.controller == "virtio-blk" && settings(v) == g);
        if twin && !groups.contains(&g) {
            groups.push(g);
        }
    }
    type Pick = fn(&JobResult) -> Option<Sample>;
    let vmms: [(&'static str, Pick); 2] = [("Platter", |j| j.platter), ("QEMU", |j| j.qemu)];
    let mut out = Vec::new();
    for (vmm, pick) in vmms {
        for g in &groups {
            let of = |controller: &str| -> Vec<(&str, Sample)> {
                disks
                    .iter()
                    .filter(|d| d.controller == controller && settings(d) == *g)
                    .flat_map(|d| d.jobs.iter())
                    .filter_map(|j| pick(j).map(|s| (j.job.as_str(), s)))
                    .collect()
            };
            let (ide, virtio) = (of("ide"), of("virtio-blk"));
            let pairs: Vec<(Sample, Sample)> = ide
                .iter()
                .flat_map(|(job, i)| {
                    virtio
                        .iter()
                        .filter(move |(vj, _)| vj == job)
                        .map(move |(_, v)| (*i, *v))
                })
                .filter(|(i, v)| i.iops > 0.0 && v.iops > 0.0)
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let n = pairs.len() as f64;
            let iops_ratio = (pairs
                .iter()
                .map(|(i, v)| (i.iops / v.iops).ln())
                .sum::<f64>()
                / n)
                .exp();
            let mean = |side: fn(&(Sample, Sample)) -> Option<f64>| -> Option<f64> {
                let all: Option<Vec<f64>> = pairs.iter().map(side).collect();
                all.map(|v| v.iter().sum::<f64>() / n)
            };
            let exits = mean(|p| p.0.exits_per_io).zip(mean(|p| p.1.exits_per_io));
            out.push(ControllerGap {
                vmm,
                settings: g.clone(),
                iops_ratio,
                pairs: pairs.len(),
                exits,
            });
        }
    }
    out
}

/// Settings recorded with the numbers.
pub struct RunInfo {
    /// The config compared.
    pub config: String,
    /// Seconds per job.
    pub runtime: u32,
    /// Bytes of each disk fio worked on.
    pub size: u64,
    /// Whether this ran in the nested rig (numbers distorted by emulation).
    pub in_rig: bool,
    /// Whether KVM's per-VM exit counters could be read (exits per I/O).
    pub exits: bool,
    /// Boots per VMM; each number is the median run's.
    pub rounds: u32,
}

/// JSON text of the results (no dependency: the shapes are fixed).
pub fn to_json(info: &RunInfo, disks: &[DiskResult]) -> String {
    let opt = |x: Option<f64>| x.map_or("null".into(), num);
    let sample = |s: Option<Sample>| {
        match s {
        Some(s) => format!(
            "{{\"iops\": {}, \"bw_kib\": {}, \"clat_mean_us\": {}, \"ios\": {}, \"exits_per_io\": {}, \"pio_mmio_exits_per_io\": {}, \"irqs_per_io\": {}, \"halts_per_io\": {}, \"vmm_cpu_us_per_io\": {}, \"vcpu_cpu_us_per_io\": {}}}",
            num(s.iops),
            num(s.bw_kib),
            num(s.clat_us),
            num(s.ios),
            opt(s.exits_per_io),
            opt(s.pio_mmio_per_io),
            opt(s.irqs_per_io),
            opt(s.halts_per_io),
            opt(s.vmm_cpu_us_per_io),
            opt(s.vcpu_cpu_us_per_io)
        ),
        None => "null".into(),
    }
    };
    let mut out = format!(
        "{{\n  \"config\": {},\n  \"runtime_s\": {},\n  \"size_bytes\": {},\n  \"rounds\": {},\n  \"in_rig\": {},\n  \"exit_counts\": {},\n  \"disks\": [",
        quote(&info.config),
        info.runtime,
        info.size,
        info.rounds,
        info.in_rig,
        info.exits
    );
    for (i, d) in disks.iter().enumerate() {
        out += if i == 0 { "\n" } else { ",\n" };
        out += &format!(
            "    {{\"id\": {}, \"serial\": {}, \"controller\": {}, \"format\": {}, \"cache\": {}, \"aio\": {}, \"jobs\": [",
            quote(&d.id),
            quote(&d.serial),
            quote(&d.controller),
            quote(&d.format),
            quote(&d.cache),
            quote(&d.aio)
        );
        for (k, j) in d.jobs.iter().enumerate() {
            out += if k == 0 { "\n" } else { ",\n" };
            out += &format!(
                "      {{\"job\": {}, \"platter\": {}, \"qemu\": {}, \"ratio\": {}, \"round_ratios\": [{}]}}",
                quote(&j.job),
                sample(j.platter),
                sample(j.qemu),
                j.ratio().map_or("null".into(), num),
                j.round_ratios
                    .iter()
                    .map(|&r| num(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out += "\n    ]}";
    }
    out += "\n  ]\n}\n";
    out
}

/// A JSON number (finite; fio's numbers always are).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{}", (x * 1000.0).round() / 1000.0)
    } else {
        "null".into()
    }
}

/// A JSON string.
pub fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn sample(iops: f64) -> Sample {
        Sample {
            iops,
            bw_kib: iops * 4.0,
            clat_us: 100.0,
            ios: iops,
            ..Sample::default()
        }
    }

    pub fn disk(id: &str, pairs: &[(&str, f64, Option<f64>)]) -> DiskResult {
        DiskResult {
            id: id.into(),
            serial: id.to_uppercase(),
            controller: "virtio-blk".into(),
            format: "raw".into(),
            cache: "none".into(),
            aio: "io_uring".into(),
            jobs: pairs
                .iter()
                .map(|(j, p, q)| JobResult {
                    job: j.to_string(),
                    platter: Some(sample(*p)),
                    qemu: q.map(sample),
                    round_ratios: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn ratios_and_geometric_mean() {
        let d = disk(
            "a",
            &[
                ("r", 200.0, Some(100.0)),
                ("w", 50.0, Some(100.0)),
                ("x", 1.0, None),
            ],
        );
        assert_eq!(d.jobs[0].ratio(), Some(2.0));
        assert_eq!(d.jobs[2].ratio(), None);
        let (m, n) = d.mean_ratio().unwrap();
        assert!((m - 1.0).abs() < 1e-12 && n == 2);
        assert!(disk("b", &[("r", 1.0, None)]).mean_ratio().is_none());
    }

    #[test]
    fn ide_is_compared_with_virtio_blk_on_equal_settings() {
        let mut ide = disk("i", &[("r", 100.0, Some(50.0)), ("w", 400.0, None)]);
        ide.controller = "ide".into();
        let virtio = disk("v", &[("r", 400.0, Some(200.0)), ("w", 400.0, Some(1.0))]);
        let mut other = disk("o", &[("r", 1.0, Some(1.0))]);
        other.cache = "writeback".into();
        let mut v = virtio.clone();
        for (d, e) in [(&mut ide, 40.0), (&mut v, 5.0)] {
            for j in &mut d.jobs {
                j.platter.as_mut().unwrap().exits_per_io = Some(e);
            }
        }
        let gaps = controller_gaps(&[ide.clone(), v, other.clone()]);
        assert_eq!(gaps.len(), 2, "{gaps:?}");
        assert_eq!(
            (gaps[0].vmm, gaps[0].settings.as_str(), gaps[0].pairs),
            ("Platter", "raw, cache=none, aio=io_uring", 2)
        );
        assert!((gaps[0].iops_ratio - 0.5).abs() < 1e-12, "{gaps:?}");
        assert_eq!(gaps[0].exits, Some((40.0, 5.0)));
        // QEMU ran only the read job on the IDE disk.
        assert_eq!(
            (gaps[1].vmm, gaps[1].pairs, gaps[1].exits),
            ("QEMU", 1, None)
        );
        assert!((gaps[1].iops_ratio - 0.25).abs() < 1e-12);
        // No IDE disk, or none on the virtio disk's settings: no gap.
        assert!(controller_gaps(&[virtio.clone(), other.clone()]).is_empty());
        ide.cache = "writeback".into();
        assert_eq!(controller_gaps(&[ide, virtio]).len(), 0);
    }

    #[test]
    fn json_has_every_number() {
        let info = RunInfo {
            config: "c\"fg.toml".into(),
            runtime: 5,
            size: 1 << 20,
            in_rig: true,
            exits: true,
            rounds: 3,
        };
        let mut d = disk("a", &[("r", 2.5, Some(1.0)), ("w", 1.0, None)]);
        d.jobs[0].platter.as_mut().unwrap().exits_per_io = Some(12.25);
        d.jobs[0].round_ratios = vec![0.5, 2.5];
        assert_eq!(d.jobs[0].ratio_spread(), Some((0.5, 2.5)));
        assert_eq!(d.jobs[1].ratio_spread(), None);
        let j = to_json(&info, &[d]);
        assert!(j.contains("\"config\": \"c\\\"fg.toml\""), "{j}");
        assert!(j.contains("{\"job\": \"r\", \"platter\": {\"iops\": 2.5, \"bw_kib\": 10, \"clat_mean_us\": 100, \"ios\": 2.5, \"exits_per_io\": 12.25, \"pio_mmio_exits_per_io\": null, \"irqs_per_io\": null, \"halts_per_io\": null, \"vmm_cpu_us_per_io\": null, \"vcpu_cpu_us_per_io\": null}, \"qemu\": {\"iops\": 1, \"bw_kib\": 4, \"clat_mean_us\": 100, \"ios\": 1, \"exits_per_io\": null, \"pio_mmio_exits_per_io\": null, \"irqs_per_io\": null, \"halts_per_io\": null, \"vmm_cpu_us_per_io\": null, \"vcpu_cpu_us_per_io\": null}, \"ratio\": 2.5, \"round_ratios\": [0.5, 2.5]}"), "{j}");
        assert!(j.contains("\"exit_counts\": true,"), "{j}");
        assert!(
            j.contains("\"qemu\": null, \"ratio\": null, \"round_ratios\": []"),
            "{j}"
        );
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(quote("a\nb"), "\"a\\u000ab\"");
    }
}
