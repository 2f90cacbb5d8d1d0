//! `platter`: boot a Linux guest from a TOML config, and tools around it.

mod boot;
mod compare;
mod config;
mod cpu;
mod disk_stats;
mod disks;
mod events;
mod hostcheck;
mod img;
mod img_bench;
mod irq;
mod layout;
mod logger;
mod memory;
mod pci;
mod rig;
mod signals;
mod stop;
mod terminal;
mod vm;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status for bad input (config, host): nothing was started.
const EXIT_USAGE: u8 = 2;
/// Exit status when the machine failed while running.
const EXIT_FAILURE: u8 = 1;

/// Platter: a small KVM virtual machine monitor about storage.
#[derive(Parser)]
#[command(name = "platter", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// When to hand a run to the nested rig.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum RigMode {
    /// Only when this host's KVM can't boot a stock guest.
    Auto,
    /// Always run inside the rig.
    Always,
    /// Never; refuse on such a host.
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the machine a config describes; exits 0 when the guest powers off.
    Run {
        /// The TOML config file.
        config: PathBuf,
        /// Override a config key, e.g. --set machine.vcpus=4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run inside the nested test rig (guests/rig) when this host's KVM
        /// cannot boot a stock Linux kernel (PVM hosts).
        #[arg(long, value_enum, default_value_t = RigMode::Auto)]
        rig: RigMode,
        /// Print vCPU exit counts by reason when the guest stops.
        #[arg(long)]
        exit_stats: bool,
        /// Print each disk's statistics (operations, bytes, latency,
        /// throttling) when the guest stops.
        #[arg(long)]
        disk_stats: bool,
        /// Keep each disk's statistics as JSON in FILE, rewritten every
        /// second while the guest runs.
        #[arg(long, value_name = "FILE")]
        stats_file: Option<PathBuf>,
    },
    /// Create and inspect disk images (raw, qcow2), like qemu-img.
    Img {
        #[command(subcommand)]
        cmd: img::ImgCommand,
    },
    /// Boot a config's guest and measure its disks with fio, side by side
    /// with QEMU when it is installed.
    Compare(compare::CompareArgs),
    /// Validate a config without starting anything.
    Check {
        /// The TOML config file.
        config: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check { config, set } => match config::Config::load(&config, &set) {
            Ok(c) => {
                println!(
                    "{}: ok ({} vCPUs, {}, kernel {})",
                    config.display(),
                    c.machine.vcpus,
                    c.machine.memory,
                    c.kernel.path.display()
                );
                0
            }
            Err(e) => {
                eprintln!("platter: {e}");
                EXIT_USAGE
            }
        },
        Command::Img { cmd } => match img::run(cmd) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("platter img: {e}");
                EXIT_FAILURE
            }
        },
        Command::Compare(args) => match compare::run(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("platter compare: {e}");
                e.exit_code()
            }
        },
        Command::Run {
            config,
            set,
            rig,
            exit_stats,
            disk_stats,
            stats_file,
        } => run(
            config,
            set,
            rig,
            Reports {
                exit_stats,
                disk_stats,
                stats_file,
            },
        ),
    };
    terminal::restore();
    ExitCode::from(code)
}

/// What `platter run` reports besides the guest's console.
struct Reports {
    exit_stats: bool,
    disk_stats: bool,
    stats_file: Option<PathBuf>,
}

fn run(path: PathBuf, set: Vec<String>, rig_mode: RigMode, reports: Reports) -> u8 {
    let cfg = match config::Config::load(&path, &set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("platter: {e}");
            return EXIT_USAGE;
        }
    };
    let rig_args = || {
        let mut a = vec!["run".to_string(), path.display().to_string()];
        for s in &set {
            a.push(format!("--set={s}"));
        }
        if reports.exit_stats {
            a.push("--exit-stats".into());
        }
        if reports.disk_stats {
            a.push("--disk-stats".into());
        }
        if let Some(f) = &reports.stats_file {
            a.push(format!("--stats-file={}", f.display()));
        }
        a
    };
    let to_rig = |why: &str| -> u8 {
        let Some(script) = rig::find(&path) else {
            eprintln!("platter: {why}; the nested rig (guests/rig from Platter's repository) was not found: set PLATTER_RIG to its path");
            return EXIT_USAGE;
        };
        let cmd = rig::command(&script, &rig_args());
        if rig_mode == RigMode::Never {
            eprintln!(
                "platter: {why}; run it in the nested rig instead: {}",
                cmd.join(" ")
            );
            return EXIT_USAGE;
        }
        eprintln!(
            "platter: {why}; running it in the nested rig: {}",
            cmd.join(" ")
        );
        let e = rig::exec(&cmd);
        eprintln!("platter: cannot start {}: {e}", cmd[0]);
        EXIT_USAGE
    };
    if rig_mode == RigMode::Always {
        return to_rig("--rig=always");
    }
    let kvm = match hostcheck::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("platter: {e}");
            return EXIT_USAGE;
        }
    };
    match hostcheck::probe(&kvm) {
        Ok(v) if !v.can_boot_stock_guest() => return to_rig(&v.explain()),
        Ok(_) => {}
        Err(e) => log::warn!("{e}"),
    }
    // From here on SIGTERM, SIGINT and SIGHUP stop the machine in order (signals.rs); the
    // mask must be in place before the first thread starts (disk engines, the stats file).
    if let Err(e) = signals::block() {
        eprintln!("platter: cannot block the stop signals: {e}");
        return EXIT_FAILURE;
    }
    let disks = match disks::open_all(&cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("platter: {e}");
            return EXIT_USAGE;
        }
    };
    let stats = disk_stats::AllStats(
        disks
            .iter()
            .map(|d| (d.config.id.clone(), d.disk.stats()))
            .collect(),
    );
    let _stats_file = match reports.stats_file.clone() {
        Some(f) => match disk_stats::StatsFile::start(f.clone(), stats.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("platter: --stats-file {}: {e}", f.display());
                return EXIT_USAGE;
            }
        },
        None => None,
    };
    let mut machine = match vm::start(&kvm, &cfg, disks) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("platter: cannot start the machine: {e}");
            return EXIT_FAILURE;
        }
    };
    if cfg.serial.mode == config::SerialMode::Stdio {
        terminal::enter_raw();
    }
    let outcome = machine.wait();
    machine.shutdown();
    terminal::restore();
    if reports.exit_stats {
        eprintln!("platter: {}", machine.exits.summary());
    }
    if reports.disk_stats {
        eprint!("platter: disk statistics\n{}", stats.text());
    }
    match outcome {
        Ok(vm::Outcome::PowerOff) => 0,
        Ok(vm::Outcome::Reset) if cfg.machine.on_reboot == config::OnReboot::Restart => restart(),
        Ok(vm::Outcome::Reset) => 0,
        Ok(vm::Outcome::Signal(sig)) => {
            eprintln!(
                "platter: stopped on {}: the guest was halted, its disks drained and flushed",
                signals::name(sig)
            );
            0
        }
        Err(e) => {
            eprintln!("platter: {e}");
            EXIT_FAILURE
        }
    }
}

/// Start the same command line again in a fresh process: a clean machine.
fn restart() -> u8 {
    use std::os::unix::process::CommandExt;
    signals::unblock();
    let args: Vec<String> = std::env::args().collect();
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(&args[0])
        .args(&args[1..])
        .exec();
    eprintln!("platter: restarting after guest reboot failed: {e}");
    EXIT_FAILURE
}
