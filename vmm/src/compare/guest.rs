//! The guest side: a busybox shell script, handed to the rig's L2 init
//! (`guests/l2-init`) as base64 in `rig.cmd=`, that finds each disk by its
//! serial, writes the measured region once and fsyncs it (so raw blocks and
//! qcow2 clusters are allocated and both VMMs read real data; busybox dd has
//! no O_DIRECT, and without the fsync the 64 MiB sat dirty in the guest's page
//! cache and went out during the first measured jobs), runs the fio jobs,
//! then flushes the disk (an fsync of the device: a FLUSH request, so either
//! VMM writes back what its image left in L1's page cache, on a writeback disk
//! all the jobs' writes, before the next disk is measured, not during it) and
//! prints one line per job:
//!
//! ```text
//! CMPGO <serial> <job>                        just before each job
//! CMPEND                                       just after it (kvm_stats)
//! CMP <serial> <fio terse v3 fields 1..57>     one per job that ran
//! CMPFAIL <serial> <job|fill|disk> <status>    followed by fio's last lines
//! ```
//!
//! The whole kernel command line must stay under 2048 bytes, so the script is
//! terse; its base64 is about 1 KiB for the default jobs and three disks.

use crate::config::{Controller, MAX_CMDLINE_LEN};

use super::plan::{Job, Subject};

/// fio terse fields kept: up to the last one read (the write side's
/// percentiles and the disk statistics after it are dropped).
const TERSE_FIELDS: usize = super::fio::LAST_FIELD;

/// Find a block device by serial, whatever the controller: virtio-blk has
/// `/sys/block/vdX/serial`; SCSI, ATA (libata) and USB disks have the unit
/// serial VPD page (a 4-byte header, then the serial, maybe space-padded).
/// NVMe keeps it in `device/serial`. Keep every lookup in this one function.
const FIND_DISK: &str = "d(){ for b in /sys/block/*;do \
s=$(cat $b/serial $b/device/serial 2>/dev/null||tail -c+5 $b/device/vpd_pg80 2>/dev/null);\
[ \"$(echo $s)\" = \"$1\" ]&&echo ${b##*/}&&return;done;}";

/// The per-disk loop. Inputs: `S` region bytes, `M` region MiB, `T` runtime,
/// `J` job names, `D` "serial:rw" or "serial:ro" words.
const BODY: &str = "r=0;for x in $D;do s=${x%:*};v=$(d $s)
[ -n \"$v\" ]||{ echo CMPFAIL $s disk 1;r=1;continue;}
f(){ echo CMPFAIL $s $1 $2;tail -5 /tmp/e /tmp/o;r=1;}
[ ${x#*:} = rw ]&&{ dd if=/dev/zero of=/dev/$v bs=1M count=$M conv=fsync 2>/tmp/e||f fill $?;}
for j in $J;do case $j in *write*)[ ${x#*:} = rw ]||continue;;esac
set -- $(echo $j|tr - ' ')
echo CMPGO $s $j;fio --name=$j --filename=/dev/$v --rw=$1 --bs=$2 --iodepth=${3#qd} \
--direct=1 --ioengine=libaio --time_based --runtime=$T --size=$S --output-format=terse \
--terse-version=3 >/tmp/o 2>/tmp/e;e=$?;echo CMPEND
[ $e = 0 ]&&echo \"CMP $s $(grep '^3;' /tmp/o|cut -d';' -f1-@F@)\"||f $j $e
done;[ ${x#*:} = rw ]&&dd if=/dev/zero of=/dev/$v count=0 conv=fsync,notrunc 2>/dev/null
done;exit $r";

/// The script for these disks and jobs.
pub fn script(subjects: &[Subject], jobs: &[Job], size: u64, runtime: u32) -> String {
    let disks: Vec<String> = subjects
        .iter()
        .map(|s| format!("{}:{}", s.serial, if s.disk.readonly { "ro" } else { "rw" }))
        .collect();
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    format!(
        "S={size} M={mib} T={runtime} J='{jobs}' D='{disks}'\n{FIND_DISK}\n{body}\n",
        body = BODY.replace("@F@", &TERSE_FIELDS.to_string()),
        mib = size >> 20,
        jobs = names.join(" "),
        disks = disks.join(" "),
    )
}

/// The modules the L2 initramfs must load for these controllers.
pub fn modules(controllers: impl IntoIterator<Item = Controller>) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for c in controllers {
        let need: &[&'static str] = match c {
            Controller::VirtioBlk => &["virtio_pci", "virtio_blk"],
            Controller::VirtioScsi => &["virtio_pci", "virtio_scsi", "sd_mod"],
            Controller::Ide => &["ata_piix", "sd_mod"],
            Controller::Ahci => &["ahci", "sd_mod"],
            Controller::UsbStorage => &["xhci_pci", "usb_storage", "sd_mod"],
        };
        for m in need {
            if !out.contains(m) {
                out.push(m);
            }
        }
    }
    out
}

/// The config's command line with our `rig.modules=` (merged with any it
/// had) and `rig.cmd=` in place of its own.
pub fn cmdline(base: &str, modules: &[&str], script: &str) -> Result<String, String> {
    let mut words: Vec<&str> = Vec::new();
    let mut mods: Vec<&str> = Vec::new();
    for w in base.split_whitespace() {
        if let Some(list) = w.strip_prefix("rig.modules=") {
            mods.extend(list.split(',').filter(|m| !m.is_empty()));
        } else if !w.starts_with("rig.cmd=") {
            words.push(w);
        }
    }
    for m in modules {
        if !mods.contains(m) {
            mods.push(m);
        }
    }
    let line = format!(
        "{} rig.modules={} rig.cmd={}",
        words.join(" "),
        mods.join(","),
        base64(script.as_bytes())
    );
    if line.len() >= MAX_CMDLINE_LEN {
        return Err(format!(
            "the guest script for these disks and jobs makes a {}-byte kernel command line \
             (the limit is {}): pass fewer --jobs or compare fewer disks at once",
            line.len(),
            MAX_CMDLINE_LEN - 1
        ));
    }
    Ok(line)
}

/// Standard base64 with padding, as busybox `base64 -d` reads it.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::plan::{self, DEFAULT_JOBS};
    use super::*;

    fn subjects(n: usize) -> Vec<Subject> {
        let text = (0..n)
            .map(|i| {
                format!(
                    "[[disk]]\nid = \"disk-{i}\"\npath = \"d{i}.raw\"\nformat = \"raw\"\n\
                     controller = \"virtio-blk\"\nreadonly = {}\n",
                    i == 1
                )
            })
            .collect::<String>();
        let cfg =
            crate::config::Config::parse(&format!("[kernel]\npath = \"k\"\n{text}"), "t", &[])
                .unwrap();
        plan::subjects(&cfg).unwrap()
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn script_lists_disks_and_jobs() {
        let jobs = plan::parse_jobs(DEFAULT_JOBS).unwrap();
        let s = script(&subjects(2), &jobs, 64 << 20, 5);
        assert!(
            s.starts_with("S=67108864 M=64 T=5 J='randread-4k-qd1 "),
            "{s}"
        );
        assert!(s.contains("D='disk-0:rw disk-1:ro'"), "{s}");
        assert!(s.contains(&format!("-f1-{TERSE_FIELDS}")));
        assert!(s.contains("echo CMPGO $s $j;fio ") && s.contains(";echo CMPEND\n"));
        assert!(s.contains("done;[ ${x#*:} = rw ]&&dd if=/dev/zero of=/dev/$v count=0 conv=fsync"));
    }

    #[test]
    fn default_plan_fits_the_kernel_command_line() {
        let jobs = plan::parse_jobs(DEFAULT_JOBS).unwrap();
        let s = script(&subjects(4), &jobs, 64 << 20, 5);
        let base = "console=ttyS0 quiet rig.modules=virtio_pci,virtio_blk rig.root=/dev/vda";
        let line = cmdline(base, &modules([Controller::VirtioBlk]), &s).unwrap();
        assert!(line.len() < 1600, "{} bytes", line.len());
        assert!(line.starts_with(
            "console=ttyS0 quiet rig.root=/dev/vda rig.modules=virtio_pci,virtio_blk rig.cmd="
        ));
        assert_eq!(line.matches("rig.modules=").count(), 1);
    }

    #[test]
    fn cmdline_merges_modules_and_refuses_overflow() {
        let line = cmdline(
            "console=ttyS0 rig.modules=ext4 rig.cmd=old",
            &["ahci", "sd_mod"],
            "x",
        )
        .unwrap();
        assert_eq!(
            line,
            "console=ttyS0 rig.modules=ext4,ahci,sd_mod rig.cmd=eA=="
        );
        let big = "x".repeat(1600);
        assert!(cmdline("console=ttyS0", &[], &big)
            .unwrap_err()
            .contains("2047"));
        assert_eq!(
            modules([Controller::VirtioBlk, Controller::VirtioScsi]),
            vec!["virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod"]
        );
    }
}
