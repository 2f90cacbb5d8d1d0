//! `platter compare`: boot a config's guest, run fio on each of its disks
//! (found by serial), boot the same guest under QEMU with equivalent devices
//! when it is installed, and print the numbers side by side, with a chart.
//!
//! ```text
//!  compare ──> platter run CONFIG --rig=never --set kernel.cmdline=... rig.cmd=<script>
//!         └──> qemu-system-x86_64 ... -append <same cmdline>       (--qemu)
//!  console: CMP <serial> <fio terse>  ──>  table, --chart SVG, --json
//!  console: CMPGO / CMPEND  ──>  KVM's exit counters (debugfs)  ──>  exits/IO
//! ```
//!
//! Files: [`plan`] (jobs, disks, serials), [`guest`] (the script and kernel
//! command line), [`qemu`] (QEMU's arguments), [`boot`] (running a VMM with
//! a timeout), [`retry`] (boots again for the disks a failed boot did not finish),
//! [`fio`] (console parsing), [`kvm_stats`] (VM exits per job),
//! [`results`] (ratios, JSON), [`table`] and [`svg`] (the report).

mod boot;
mod cpu_time;
mod fio;
mod guest;
mod kvm_stats;
mod plan;
mod qemu;
mod results;
mod retry;
mod scratch;
mod stall;
mod state;
mod svg;
mod table;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::config::Config;
use crate::RigMode;

/// When to run QEMU alongside Platter.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum QemuMode {
    /// When qemu-system-x86_64 is on PATH.
    Auto,
    /// Always; fail without it.
    Always,
    /// Platter only.
    Never,
}

/// `platter compare`'s arguments.
#[derive(clap::Args, Clone)]
pub struct CompareArgs {
    /// The TOML config whose [[disk]]s to measure (a disk with id = "root" is
    /// not measured); each disk is found in the guest by its serial (derived
    /// from the id when the config gives none).
    pub config: PathBuf,
    /// Override a config key, as for `platter run` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// fio jobs, comma-separated, each RW-BS-qdDEPTH (RW: read, write,
    /// randread, randwrite).
    #[arg(long, value_name = "LIST", default_value = plan::DEFAULT_JOBS)]
    pub jobs: String,
    /// How much of each disk the jobs work on (whole MiB); written once first.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub size: String,
    /// Seconds per job.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub runtime: u32,
    /// Boot each VMM this many times, alternating (Platter, QEMU, Platter, ...), and
    /// report each job's median run: on a shared or nested host one boot's numbers swing
    /// by up to 2x against the next.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// Also boot the guest under QEMU (auto: when qemu-system-x86_64 is on PATH).
    #[arg(long, value_enum, default_value_t = QemuMode::Auto)]
    pub qemu: QemuMode,
    /// Write a bar chart of IOPS per disk and job (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// Write the numbers as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run inside the nested test rig (guests/rig) when this host's KVM
    /// cannot boot a stock Linux kernel (PVM hosts); output files must then
    /// be inside the repository.
    #[arg(long, value_enum, default_value_t = RigMode::Auto)]
    pub rig: RigMode,
    /// In the nested rig: measure copies of the images that sit on the
    /// repository's 9p share, made on an ext4 file system local to L1 (9p
    /// dominates the numbers otherwise); the originals are not written. The
    /// default; the flag stays for scripts that give it.
    #[arg(long, conflicts_with = "on_9p")]
    pub local_copies: bool,
    /// In the nested rig: measure the images where they are, on the 9p share,
    /// instead of local copies (slower, and the rig's guests stall more often
    /// under its load).
    #[arg(long = "on-9p")]
    pub on_9p: bool,
    /// Boots already measured by an earlier run of this comparison (the host side of the
    /// rig passes it; see `state.rs`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub state: Option<PathBuf>,
}

/// Why a comparison stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments, config or host: nothing was measured.
    #[error("{0}")]
    Usage(String),
    /// A boot or a fio job failed (the guest's last lines went to stderr).
    #[error("{0}")]
    Failed(String),
    /// A killed VMM did not die: it is stuck inside the kernel of the machine compare runs
    /// on (in the nested rig, L1's KVM went wrong), and every later boot there stalls too.
    #[error("{0}")]
    Wedged(String),
}

impl Error {
    /// The process exit status: 2 for bad input, 1 for a failed run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Failed(_) => 1,
            Error::Wedged(_) => EXIT_WEDGED,
        }
    }
}

/// compare's exit status for [`Error::Wedged`]: the host side of the rig runs the whole
/// comparison again in a fresh L1 (`rig.rs`).
pub const EXIT_WEDGED: u8 = 3;

/// Seconds allowed for a guest to boot and power off, on top of the jobs.
const BOOT_ALLOWANCE_S: u64 = 120;
/// Seconds per disk on top of writing its region (found, filled, settled).
const PER_DISK_S: u64 = 30;
/// Seconds per job on top of its runtime (fio start-up, ramp, report).
const PER_JOB_S: u64 = 20;
/// Extra time the rig needs to start and stop L1.
const RIG_ALLOWANCE_S: u64 = 120;

/// Everything decided before the first boot.
struct Plan {
    subjects: Vec<plan::Subject>,
    jobs: Vec<plan::Job>,
    size: u64,
    /// `--set`s for `platter run`: the user's, then the derived serials.
    overrides: Vec<String>,
    /// QEMU's binary and arguments, when QEMU runs.
    qemu: Option<(PathBuf, Vec<String>)>,
    /// What the kernel command line of a boot is made of (see `cmdline_for`): the config's
    /// own line, the modules, the runtime of a job.
    base_cmdline: String,
    modules: Vec<&'static str>,
    runtime: u32,
    timeout: Duration,
    /// Console silence that counts as a stalled guest.
    silence: Duration,
    /// In the rig: the L1-local copies of images that were on 9p.
    _scratch: Option<scratch::Scratch>,
}

impl Plan {
    /// The kernel command line whose script measures only `subjects` (never longer than
    /// the whole plan's, which `make_plan` checked).
    fn cmdline_for(&self, subjects: &[plan::Subject]) -> Result<String, Error> {
        let script = guest::script(subjects, &self.jobs, self.size, self.runtime);
        guest::cmdline(&self.base_cmdline, &self.modules, &script).map_err(Error::Usage)
    }
}

/// Run the comparison; prints the table on stdout, progress on stderr.
pub fn run(args: CompareArgs) -> Result<(), Error> {
    let plan = make_plan(&args)?;
    if let Some(why) = rig_reason(args.rig)? {
        return Err(to_rig(&args, &why, &plan));
    }
    let mut info = results::RunInfo {
        config: args.config.display().to_string(),
        runtime: args.runtime,
        size: plan.size,
        in_rig: in_rig(),
        exits: kvm_stats::available(Path::new(kvm_stats::KVM_DEBUGFS)),
        rounds: args.rounds,
    };
    let runs: usize = plan
        .subjects
        .iter()
        .map(|s| {
            plan.jobs
                .iter()
                .filter(|j| !(s.disk.readonly && j.writes()))
                .count()
        })
        .sum();
    eprintln!(
        "platter compare: {} disks, {} jobs of {} s each per VMM; booting under Platter",
        plan.subjects.len(),
        runs,
        args.runtime
    );
    let on_9p: Vec<&str> = plan
        .subjects
        .iter()
        .filter(|s| plan::on_9p(&s.disk.path))
        .map(|s| s.disk.id.as_str())
        .collect();
    let mut saved = args.state.as_deref().map(state::load).unwrap_or_default();
    let mut platter_runs = Vec::new();
    let mut qemu_runs = Vec::new();
    for round in 1..=args.rounds {
        if round > 1 {
            eprintln!(
                "platter compare: round {round} of {}: booting under Platter",
                args.rounds
            );
        }
        match measure_round(
            &args,
            &plan,
            round,
            &mut saved,
            &mut platter_runs,
            &mut qemu_runs,
        ) {
            Ok(()) => {}
            // The first round must succeed; a later failure (a guest lost to the host, as
            // the nested rig sometimes does) costs only its own round. A machine that can
            // boot nothing any more ends the run whatever the round: in the rig a fresh L1
            // then measures the rounds left, keeping the boots done (`state.rs`).
            Err(e) if round > 1 && !matches!(e, Error::Wedged(_)) => {
                eprintln!(
                    "platter compare: round {round} failed ({e}); reporting the medians of the rounds that completed"
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if plan.qemu.is_some() && qemu_runs.len() < platter_runs.len() {
        // Only whole rounds: both VMMs measured the same number of times.
        platter_runs.truncate(qemu_runs.len());
    }
    info.rounds = platter_runs.len() as u32;
    let round_ratios = fio::round_ratios(&platter_runs, &qemu_runs);
    let platter = fio::median(platter_runs);
    let qemu = plan.qemu.as_ref().map(|_| fio::median(qemu_runs));
    let disks = results::collect(
        &plan.subjects,
        &plan.jobs,
        &platter,
        qemu.as_ref(),
        &round_ratios,
    );
    print!("{}", table::header(&info, qemu.is_some()));
    if !on_9p.is_empty() {
        println!(
            "Note: the images of {} are on a 9p file system (the rig's repository share): \
             their numbers measure 9p as much as the VMMs (copies on an L1-local file system, \
             compare's default, give truer ones).",
            on_9p.join(", ")
        );
    }
    print!("\n{}", table::render(&disks));
    print!("{}", table::gap_lines(&disks));
    if let Some(path) = &args.chart {
        let title = match qemu {
            Some(_) => format!("Platter vs QEMU: {}", info.config),
            None => format!("Platter: {}", info.config),
        };
        write_file(path, &svg::render(&title, &disks))?;
    }
    if let Some(path) = &args.json {
        write_file(path, &results::to_json(&info, &disks))?;
    }
    Ok(())
}

fn make_plan(args: &CompareArgs) -> Result<Plan, Error> {
    let file = args.config.display().to_string();
    let usage = |e: String| Error::Usage(format!("{file}: {e}"));
    let jobs = plan::parse_jobs(&args.jobs).map_err(Error::Usage)?;
    let size = plan::parse_size(&args.size).map_err(Error::Usage)?;
    let first = Config::load(&args.config, &args.set).map_err(|e| Error::Usage(e.to_string()))?;
    let mut subjects = plan::subjects(&first).map_err(usage)?;
    for s in &subjects {
        plan::check_size(s, size).map_err(usage)?;
    }
    let mut overrides = args.set.clone();
    overrides.extend(plan::serial_overrides(&subjects));
    let mut local = None;
    if !args.on_9p && in_rig() {
        match scratch::Scratch::for_subjects(&mut subjects) {
            Ok(Some((fs, paths))) => {
                eprintln!(
                    "platter compare: in the rig, measuring copies of the 9p-hosted images on an \
                     L1-local ext4 file system ({}); the originals are not written",
                    fs.mount_point().display()
                );
                overrides.extend(paths);
                local = Some(fs);
            }
            Ok(None) => {}
            Err(e) => eprintln!("platter compare: cannot make local copies of the images ({e}); measuring them on 9p"),
        }
    }
    // The console is where the results come back.
    overrides.push("serial.mode=\"stdio\"".into());
    // Load again with the serials, so they go through the same validation.
    let cfg = Config::load(&args.config, &overrides).map_err(|e| Error::Usage(e.to_string()))?;
    let script = guest::script(&subjects, &jobs, size, args.runtime);
    let modules = guest::modules(cfg.disks.iter().map(|d| d.controller));
    let cmdline = guest::cmdline(&cfg.kernel.cmdline, &modules, &script).map_err(usage)?;
    let qemu = match (args.qemu, qemu::find()) {
        (QemuMode::Never, _) => None,
        (QemuMode::Always, None) => {
            return Err(Error::Usage(format!(
                "--qemu always: {} is not on PATH (install qemu-system-x86, see shared/RIG.md)",
                qemu::QEMU
            )))
        }
        (QemuMode::Auto, None) => {
            eprintln!(
                "platter compare: {} not on PATH; measuring Platter only",
                qemu::QEMU
            );
            None
        }
        (mode, Some(bin)) => match qemu::args(&cfg, &subjects, &cmdline) {
            Ok(a) => Some((bin, a)),
            Err(e) if mode == QemuMode::Always => return Err(usage(e)),
            Err(e) => {
                eprintln!("platter compare: {e}; measuring Platter only");
                None
            }
        },
    };
    let runs = subjects.len() as u64 * jobs.len() as u64;
    let timeout = Duration::from_secs(
        BOOT_ALLOWANCE_S
            + subjects.len() as u64 * (PER_DISK_S + (size >> 20))
            + runs * (u64::from(args.runtime) + PER_JOB_S),
    );
    // Longer than any quiet stretch of a working guest: a job (its runtime), or the first
    // write of a disk's region (at least 1 MiB/s even for IDE in the rig).
    let silence = Duration::from_secs(SILENCE_S + u64::from(args.runtime) + (size >> 20));
    Ok(Plan {
        subjects,
        jobs,
        size,
        overrides,
        qemu,
        base_cmdline: cfg.kernel.cmdline.clone(),
        modules,
        runtime: args.runtime,
        timeout,
        silence,
        _scratch: local,
    })
}

fn platter_command(args: &CompareArgs, plan: &Plan, cmdline: &str) -> Result<Command, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Usage(format!("cannot find Platter's own executable: {e}")))?;
    let mut c = Command::new(exe);
    c.arg("run").arg(&args.config).arg("--rig=never");
    c.arg(format!("--stats-file={}", stall::stats_path().display()));
    for o in &plan.overrides {
        c.arg(format!("--set={o}"));
    }
    c.arg(format!("--set=kernel.cmdline={}", results::quote(cmdline)));
    Ok(c)
}

/// One boot under Platter, then one under QEMU when it runs; each report joins its list.
/// A boot an earlier run of this comparison finished (`saved`) is not booted again.
fn measure_round(
    args: &CompareArgs,
    plan: &Plan,
    round: u32,
    saved: &mut state::Saved,
    platter: &mut Vec<fio::Report>,
    qemu: &mut Vec<fio::Report>,
) -> Result<(), Error> {
    platter.push(boot_once(args, round, saved, "platter", || {
        retry::boot(plan, "platter", |line| platter_command(args, plan, line))
    })?);
    if let Some((bin, qargs)) = &plan.qemu {
        qemu.push(boot_once(args, round, saved, "qemu", || {
            eprintln!("platter compare: booting the same guest under QEMU");
            retry::boot(plan, "qemu", |line| {
                let mut c = Command::new(bin);
                c.args(retry::with_append(qargs, line));
                Ok(c)
            })
        })?);
    }
    Ok(())
}

/// `who`'s boot of `round`: the one saved by an earlier run, or a new one (then saved).
fn boot_once(
    args: &CompareArgs,
    round: u32,
    saved: &mut state::Saved,
    who: &str,
    boot: impl FnOnce() -> Result<fio::Report, Error>,
) -> Result<fio::Report, Error> {
    if let Some(r) = saved.remove(&(round, who.to_string())) {
        eprintln!(
            "platter compare: round {round}: {who}'s numbers from the run before L1 went down"
        );
        return Ok(r);
    }
    let report = boot()?;
    if let Some(path) = &args.state {
        if let Err(e) = state::save(path, round, who, &report) {
            eprintln!(
                "platter compare: cannot keep the boot's numbers in {}: {e}",
                path.display()
            );
        }
    }
    Ok(report)
}

/// Added to twice a boot's stall limit: how long the rig may print nothing before its L1
/// counts as stopped (L1's boot and the local copies of images on 9p come first).
const RIG_SILENCE_EXTRA_S: u64 = 300;

/// Base of the console silence after which a guest counts as stalled (see Plan::silence).
const SILENCE_S: u64 = 120;

/// AnonHugePages of process `pid` in MiB (Linux's smaps_rollup).
fn huge_pages_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// Boot one VMM, echo progress, and check that every job of `subjects` reported; a failed
/// boot comes back with what it did report.
fn boot_and_measure(
    who: &'static str,
    cmd: Command,
    plan: &Plan,
    subjects: &[plan::Subject],
) -> Result<fio::Report, (Error, fio::Report)> {
    let names: Vec<(String, String)> = plan
        .subjects
        .iter()
        .map(|s| (s.serial.clone(), s.disk.id.clone()))
        .collect();
    let meter = std::sync::Arc::new(std::sync::Mutex::new(kvm_stats::ExitMeter::new(Path::new(
        kvm_stats::KVM_DEBUGFS,
    ))));
    let meter_in = meter.clone();
    let mut told_huge = false;
    let progress = move |pid: u32, line: &str| {
        let Ok(mut m) = meter_in.lock() else { return };
        m.line(pid, line);
        if !told_huge && line.trim_end() == kvm_stats::END {
            // After the first job the guest has touched its RAM: how KVM maps it (4 KiB
            // second-level entries make each guest TLB miss dearer) and how much of the
            // VMM's memory has transparent huge pages.
            told_huge = true;
            let ids = kvm_stats::process_ids(pid);
            let kvm = kvm_stats::mapped_mib(Path::new(kvm_stats::KVM_DEBUGFS), &ids)
                .map_or(String::new(), |(k4, m2)| {
                    format!("KVM maps {m2} MiB in 2 MiB pages, {k4} MiB in 4 KiB pages; ")
                });
            if let Some(thp) = huge_pages_mib(pid) {
                eprintln!("  {who:<8} guest memory: {kvm}{thp} MiB of the process in transparent huge pages");
            }
        }
        if let Some((serial, terse)) = line.strip_prefix("CMP ").and_then(|r| r.split_once(' ')) {
            let id = names
                .iter()
                .find(|(s, _)| s == serial)
                .map_or(serial, |(_, id)| id.as_str());
            if let Ok((job, mut s)) = fio::parse_terse(terse) {
                let key = (serial.to_string(), job.clone());
                if let Some(c) = m.jobs.get(&key) {
                    s.set_exits(*c);
                }
                if let Some(c) = m.cpu.get(&key) {
                    s.set_cpu(*c);
                }
                let exits = s
                    .exits_per_io
                    .map_or(String::new(), |e| format!(", {e:.1} exits/IO"));
                let cpu = s.vmm_cpu_us_per_io.map_or(String::new(), |c| {
                    format!(", {c:.0} us host CPU/IO outside vCPUs")
                });
                eprintln!(
                    "  {who:<8} {id:<16} {job:<20} {:>10.0} IOPS{exits}{cpu}",
                    s.iops
                );
            }
        } else if line.starts_with("CMPFAIL ") {
            eprintln!("  {who:<8} {line}");
        }
    };
    let run = boot::run(cmd, plan.timeout, plan.silence, progress).map_err(|e| {
        (
            Error::Usage(format!("cannot start {who}: {e}")),
            fio::Report::default(),
        )
    })?;
    let mut report = fio::parse_console(&run.console);
    if let Ok(m) = meter.lock() {
        for (key, counts) in &m.jobs {
            if let Some(s) = report.samples.get_mut(key) {
                s.set_exits(*counts);
            }
        }
        for (key, cpu) in &m.cpu {
            if let Some(s) = report.samples.get_mut(key) {
                s.set_cpu(*cpu);
            }
        }
    }
    let problem = if run.stalled {
        Some(format!(
            "{who}: the guest printed nothing for {} s; killed it",
            plan.silence.as_secs()
        ))
    } else if run.timed_out {
        Some(format!(
            "{who}: the guest had not finished after {} s; killed it",
            plan.timeout.as_secs()
        ))
    } else if run.status != Some(0) {
        let why = boot::tail(&run.stderr, 1);
        Some(format!(
            "{who} exited with status {}{}",
            run.status.map_or("(signal)".into(), |s| s.to_string()),
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ))
    } else if let Some(f) = report.failures.first() {
        Some(format!(
            "{who}: in the guest: {f} (and {} more){}",
            report.failures.len() - 1,
            boot::host_failure(&run.stderr)
        ))
    } else if report.exit != Some(0) {
        Some(format!(
            "{who}: the guest script did not finish (exit status {})",
            report.exit.map_or("missing".into(), |e| e.to_string())
        ))
    } else {
        missing(subjects, &plan.jobs, &report).map(|m| format!("{who}: no result for {m}"))
    };
    if who == "platter" {
        if run.timed_out {
            if let Some(held) = stall::in_flight(&stall::stats_path()) {
                eprintln!("--- platter: its disks when it was killed\n{held}");
            }
        }
        let _ = std::fs::remove_file(stall::stats_path());
    }
    if let Some(p) = problem {
        eprintln!("--- {who}: last lines of the guest console");
        eprintln!("{}", boot::tail(&run.console, boot::TAIL_LINES));
        if !run.stderr.trim().is_empty() {
            eprintln!("--- {who}: stderr");
            eprintln!("{}", boot::tail(&run.stderr, boot::TAIL_LINES));
        }
        if run.lingering {
            let p = format!(
                "{p}, but it did not die: it is stuck in this machine's kernel (in the nested rig, L1's KVM went wrong), where further boots stall too"
            );
            return Err((Error::Wedged(p), report));
        }
        return Err((Error::Failed(p), report));
    }
    Ok(report)
}

/// The first disk/job of `subjects` that the report lacks.
fn missing(subjects: &[plan::Subject], jobs: &[plan::Job], report: &fio::Report) -> Option<String> {
    subjects.iter().find_map(|s| {
        retry::missing_job(s, jobs, report).map(|j| format!("disk `{}` job {}", s.disk.id, j.name))
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text)
        .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))?;
    eprintln!("platter compare: wrote {}", path.display());
    Ok(())
}

/// Whether this process runs inside the rig's L1 (its kernel command line
/// names the rig's job).
fn in_rig() -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("rig.job="))
}

/// Why this comparison has to run in the nested rig, if it has to.
fn rig_reason(mode: RigMode) -> Result<Option<String>, Error> {
    match mode {
        RigMode::Never => Ok(None),
        RigMode::Always => Ok(Some("--rig=always".into())),
        RigMode::Auto => {
            let kvm = crate::hostcheck::open_kvm().map_err(|e| Error::Usage(e.to_string()))?;
            match crate::hostcheck::probe(&kvm) {
                Ok(v) if !v.can_boot_stock_guest() => Ok(Some(v.explain())),
                Ok(_) => Ok(None),
                Err(e) => {
                    log::warn!("{e}");
                    Ok(None)
                }
            }
        }
    }
}

/// This command's arguments again, for the rig (which appends --rig=never).
fn rig_args(args: &CompareArgs) -> Vec<String> {
    let mut a = vec!["compare".to_string(), args.config.display().to_string()];
    a.extend(args.set.iter().map(|s| format!("--set={s}")));
    a.push(format!("--jobs={}", args.jobs));
    a.push(format!("--size={}", args.size));
    a.push(format!("--runtime={}", args.runtime));
    a.push(format!("--rounds={}", args.rounds));
    let qemu = match args.qemu {
        QemuMode::Auto => "auto",
        QemuMode::Always => "always",
        QemuMode::Never => "never",
    };
    a.push(format!("--qemu={qemu}"));
    if let Some(c) = &args.chart {
        a.push(format!("--chart={}", c.display()));
    }
    if let Some(j) = &args.json {
        a.push(format!("--json={}", j.display()));
    }
    if args.on_9p {
        a.push("--on-9p".into());
    }
    if let Some(s) = &args.state {
        a.push(format!("--state={}", s.display()));
    }
    a
}

/// Hand the whole comparison to the rig and exit with its status (a run whose L1 went
/// down or hung is run again); returns only when the rig cannot be started.
fn to_rig(args: &CompareArgs, why: &str, plan: &Plan) -> Error {
    let per_boot = plan.timeout;
    let Some(script) = crate::rig::find(&args.config) else {
        return Error::Usage(format!(
            "{why}; the nested rig (guests/rig from Platter's repository) was not found: set PLATTER_RIG to its path"
        ));
    };
    // Only the repository is writable inside the rig.
    let repo = script
        .canonicalize()
        .ok()
        .and_then(|s| s.parent().and_then(Path::parent).map(Path::to_path_buf));
    for (flag, p) in [("--chart", &args.chart), ("--json", &args.json)] {
        let Some(p) = p else { continue };
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let inside = match (dir.canonicalize(), &repo) {
            (Ok(d), Some(r)) => d.starts_with(r),
            _ => false,
        };
        if !inside {
            return Error::Usage(format!(
                "{flag} {}: this runs in the nested rig, where only the repository ({}) is writable: write the file there",
                p.display(),
                repo.as_deref().unwrap_or(Path::new("?")).display()
            ));
        }
    }
    // Room for the boots of the rounds and the retries of one failing boot (failed boots
    // are mostly cut short by the stall limit, well before a whole boot's time).
    let boots = 2 * u64::from(args.rounds) + u64::from(retry::BOOT_ATTEMPTS) - 1;
    let timeout = boots * per_boot.as_secs() + RIG_ALLOWANCE_S;
    // What each run finishes is kept for the next one, should L1 go down (state.rs).
    let state = repo.as_ref().map(|r| {
        let dir = r.join("target");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("compare-state-{}.txt", std::process::id()))
    });
    let mut args = args.clone();
    args.state.clone_from(&state);
    let mut cmd = crate::rig::command(&script, &rig_args(&args));
    cmd.splice(1..1, ["--timeout".to_string(), timeout.to_string()]);
    eprintln!(
        "platter compare: {why}; running it in the nested rig: {}",
        cmd.join(" ")
    );
    let again = |why: &str| {
        eprintln!(
            "platter compare: {why} before the comparison finished; running the whole comparison again"
        )
    };
    // The rig is silent for a boot's stall limit when a guest stops (compare itself kills
    // that guest and says so); twice that and more means L1 itself stopped.
    let silence = 2 * plan.silence + Duration::from_secs(RIG_SILENCE_EXTRA_S);
    let result = crate::rig::run_retrying(&cmd, silence, Some(i32::from(EXIT_WEDGED)), &again);
    if let Some(s) = &state {
        let _ = std::fs::remove_file(s);
    }
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => Error::Usage(format!("cannot start {}: {e}", cmd[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CompareArgs,
    }

    #[test]
    fn defaults_and_rig_round_trip() {
        let a = Cli::try_parse_from(["x", "c.toml"]).unwrap().args;
        assert_eq!(
            (a.size.as_str(), a.runtime, a.qemu),
            ("64M", 5, QemuMode::Auto)
        );
        assert_eq!(a.jobs, plan::DEFAULT_JOBS);
        let a = Cli::try_parse_from([
            "x",
            "c.toml",
            "--set",
            "machine.vcpus=1",
            "--jobs",
            "read-4k-qd1",
            "--size",
            "16M",
            "--runtime",
            "2",
            "--qemu",
            "always",
            "--chart",
            "o.svg",
            "--json",
            "o.json",
            "--state",
            "target/s.txt",
        ])
        .unwrap()
        .args;
        let again = rig_args(&a);
        assert!(again.contains(&"--state=target/s.txt".to_string()));
        assert_eq!(again[0], "compare");
        let b = Cli::try_parse_from(
            std::iter::once("x".to_string()).chain(again.iter().skip(1).cloned()),
        )
        .unwrap()
        .args;
        assert_eq!(rig_args(&b), again);
        assert_eq!(
            (b.size.as_str(), b.runtime, b.qemu),
            ("16M", 2, QemuMode::Always)
        );
        assert_eq!(b.set, ["machine.vcpus=1"]);
        assert!(Cli::try_parse_from(["x", "c.toml", "--runtime", "0"]).is_err());
        assert!(!b.on_9p, "local copies unless asked otherwise");
    }

    /// Local copies are the default in the rig; `--on-9p` reaches the rig's run, and
    /// `--local-copies` (the old way to ask for copies) is still taken, but not with it.
    #[test]
    fn on_9p_reaches_the_rig_and_local_copies_is_still_taken() {
        let a = Cli::try_parse_from(["x", "c.toml", "--on-9p"])
            .unwrap()
            .args;
        assert!(a.on_9p);
        assert!(rig_args(&a).iter().any(|x| x == "--on-9p"));
        let l = Cli::try_parse_from(["x", "c.toml", "--local-copies"])
            .unwrap()
            .args;
        assert!(!l.on_9p && !rig_args(&l).iter().any(|x| x == "--on-9p"));
        assert!(Cli::try_parse_from(["x", "c.toml", "--local-copies", "--on-9p"]).is_err());
    }

    #[test]
    fn huge_pages_are_read_from_smaps_rollup() {
        // Any live process has the line (0 kB when nothing is huge).
        assert!(huge_pages_mib(std::process::id()).is_some());
        assert_eq!(huge_pages_mib(u32::MAX), None);
    }
}
