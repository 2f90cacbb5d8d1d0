//! End-to-end tests: Platter boots the stock Debian kernel inside the nested
//! rig (`guests/rig`, see RIG.md) and the guest reports what it sees.
//!
//! These need the rig's artifacts (`guests/build.sh`) and take a minute or
//! more each, so they run when `PLATTER_RIG_TESTS=1` (the README's test
//! command sets it). Without it they print that they were skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The machine every boot test asks for.
const VCPUS: u32 = 2;
const MEMORY_MIB: u64 = 512;
/// The Q35 host bridge Platter's PCI root presents at 00:00.0.
const HOST_BRIDGE: &str = "0000:00:00.0 0x8086 0x29c0 0x060000";
/// Markers the guest-side script prints.
const MARK_EXIT: &str = "PLATTER-GUEST-EXIT=0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn enabled() -> bool {
    if std::env::var_os("PLATTER_RIG_TESTS").is_some_and(|v| v == "1") {
        return true;
    }
    eprintln!("skipped: set PLATTER_RIG_TESTS=1 to run the rig tests (see README)");
    false
}

/// Base64 without padding quirks, for `rig.cmd=` (the guest decodes it).
fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `platter run` of configs/boot.toml whose guest runs `script`, as a
/// shell-quoted command line for the rig job.
fn platter_run(script: &str, extra: &[&str]) -> String {
    let mut args = vec![
        env!("CARGO_BIN_EXE_platter").to_string(),
        "run".into(),
        "configs/boot.toml".into(),
        "--rig=never".into(),
        format!("--set=machine.vcpus={VCPUS}"),
        format!("--set=machine.memory={MEMORY_MIB}M"),
        format!(
            "--set=kernel.cmdline=console=ttyS0 quiet rig.cmd={}",
            b64(script)
        ),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run a shell job inside L1; returns (exit code, all output).
fn in_rig(job: &str) -> (i32, String) {
    let out = Command::new(repo().join("guests/rig"))
        .current_dir(repo())
        .args(["--timeout", "900", "--", "sh", "-c", job])
        .output()
        .expect("running guests/rig");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(key))
        .map(|(_, v)| v.trim())
        .next()
}

#[test]
fn boots_and_reports_cpus_memory_pci_and_refuses_bad_config() {
    if !enabled() {
        return;
    }
    let facts = "echo UNAME=$(uname -r); echo NPROC=$(nproc); \
        echo MEMKB=$(awk '/MemTotal/{print $2}' /proc/meminfo); \
        for d in /sys/bus/pci/devices/*; do \
          echo PCI=$(basename $d) $(cat $d/vendor) $(cat $d/device) $(cat $d/class); done";
    let job = format!(
        "{}; echo RUN1_RC=$?; {}; echo RUN2_RC=$?; {}; echo RUN3_RC=$?",
        platter_run(facts, &[]),
        platter_run("reboot -f", &["--set=machine.on_reboot=exit"]),
        platter_run("true", &["--set=machine.vcpus=0"]),
    );
    let (rc, out) = in_rig(&job);
    assert_eq!(rc, 0, "the rig job failed");

    // First run: the guest's view of the machine, then poweroff -> exit 0.
    let kernel = std::fs::read_to_string(repo().join("guests/cache/kernel/version")).unwrap();
    assert_eq!(value(&out, "UNAME="), Some(kernel.trim()));
    assert_eq!(value(&out, "NPROC="), Some(VCPUS.to_string().as_str()));
    let mem_kb: u64 = value(&out, "MEMKB=").unwrap().parse().unwrap();
    // The kernel keeps some RAM for itself; it must see most of 512 MiB and no more.
    assert!(
        mem_kb > MEMORY_MIB * 1024 * 8 / 10 && mem_kb <= MEMORY_MIB * 1024,
        "MemTotal {mem_kb} kB"
    );
    assert!(
        out.lines().any(|l| l.trim_end().ends_with(HOST_BRIDGE)),
        "host bridge missing from the guest's PCI list"
    );
    assert!(out.contains(MARK_EXIT), "guest script did not finish");
    assert_eq!(value(&out, "RUN1_RC="), Some("0"), "poweroff must exit 0");

    // Second run: guest reboot with on_reboot = exit ends Platter with 0.
    assert_eq!(value(&out, "RUN2_RC="), Some("0"), "reboot must exit 0");

    // Third run: a bad config is refused with one line and status 2.
    assert_eq!(value(&out, "RUN3_RC="), Some("2"));
    assert!(
        out.contains("machine.vcpus: must be between 1 and 254 (got 0)"),
        "bad config message missing"
    );
}

#[test]
fn pvm_host_is_detected_and_pointed_to_the_rig() {
    if !enabled() {
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: this host's KVM is not PVM");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_platter"))
        .current_dir(repo())
        .args(["run", "configs/boot.toml", "--rig=never"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("kvm_pvm"), "{err}");
    assert!(err.contains("guests/rig -- "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
