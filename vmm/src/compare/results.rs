//! The numbers of one comparison: per disk, per job, Platter's and QEMU's
//! samples; their ratios, and the raw numbers as JSON (`--json`).

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
}

impl JobResult {
    /// Platter IOPS / QEMU IOPS.
    pub fn ratio(&self) -> Option<f64> {
        match (self.platter, self.qemu) {
            (Some(p), Some(q)) if q.iops > 0.0 => Some(p.iops / q.iops),
            _ => None,
        }
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
                    }
                })
                .collect(),
        })
        .collect()
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
}

/// JSON text of the results (no dependency: the shapes are fixed).
pub fn to_json(info: &RunInfo, disks: &[DiskResult]) -> String {
    let sample = |s: Option<Sample>| match s {
        Some(s) => format!(
            "{{\"iops\": {}, \"bw_kib\": {}, \"clat_mean_us\": {}}}",
            num(s.iops),
            num(s.bw_kib),
            num(s.clat_us)
        ),
        None => "null".into(),
    };
    let mut out = format!(
        "{{\n  \"config\": {},\n  \"runtime_s\": {},\n  \"size_bytes\": {},\n  \"in_rig\": {},\n  \"disks\": [",
        quote(&info.config),
        info.runtime,
        info.size,
        info.in_rig
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
                "      {{\"job\": {}, \"platter\": {}, \"qemu\": {}, \"ratio\": {}}}",
                quote(&j.job),
                sample(j.platter),
                sample(j.qemu),
                j.ratio().map_or("null".into(), num)
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
    fn json_has_every_number() {
        let info = RunInfo {
            config: "c\"fg.toml".into(),
            runtime: 5,
            size: 1 << 20,
            in_rig: true,
        };
        let j = to_json(
            &info,
            &[disk("a", &[("r", 2.5, Some(1.0)), ("w", 1.0, None)])],
        );
        assert!(j.contains("\"config\": \"c\\\"fg.toml\""), "{j}");
        assert!(j.contains("{\"job\": \"r\", \"platter\": {\"iops\": 2.5, \"bw_kib\": 10, \"clat_mean_us\": 100}, \"qemu\": {\"iops\": 1, \"bw_kib\": 4, \"clat_mean_us\": 100}, \"ratio\": 2.5}"), "{j}");
        assert!(j.contains("\"qemu\": null, \"ratio\": null"), "{j}");
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(quote("a\nb"), "\"a\\u000ab\"");
    }
}
