//! In the nested rig, disk images under the repository live on 9p, which is
//! slow and synchronous enough to hide what the VMMs do. A user's host has
//! its images on a local file system; so that the rig measures that, compare
//! copies the measured images to an ext4 file system local to L1 (a loop
//! device on L1's own tmpfs) for both VMMs, and leaves the originals alone.
//!
//! Only images without a backing file are copied (a chain would need its
//! relative paths kept); the others stay where they are and the report says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::plan::Subject;

/// Room for the file system's own metadata on top of the images.
const SLACK: u64 = 64 << 20;

/// A mounted scratch file system; unmounted and removed (with its backing
/// file beside the mount point) on drop.
pub struct Scratch {
    mount: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether an image can be copied on its own (no backing file).
fn standalone(path: &Path) -> bool {
    platter_block::img::info(path).is_ok_and(|i| i.backing_file.is_none())
}

impl Scratch {
    /// Copy the images of `subjects` that are on 9p and point them at the
    /// copies; returns the scratch file system and the `--set` overrides that
    /// do the same for the VMMs, or `None` when nothing needed copying.
    pub fn for_subjects(
        subjects: &mut [Subject],
    ) -> Result<Option<(Scratch, Vec<String>)>, String> {
        let movable: Vec<&mut Subject> = subjects
            .iter_mut()
            .filter(|s| super::plan::on_9p(&s.disk.path) && standalone(&s.disk.path))
            .collect();
        if movable.is_empty() {
            return Ok(None);
        }
        let bytes: u64 = movable
            .iter()
            .map(|s| std::fs::metadata(&s.disk.path).map_or(0, |m| m.len()))
            .sum();
        let base = std::env::temp_dir().join(format!("platter-compare-{}", std::process::id()));
        let (mount, image) = (base.join("mnt"), base.join("fs.ext4"));
        let made = std::fs::create_dir_all(&mount)
            .and_then(|()| std::fs::File::create(&image))
            .and_then(|f| f.set_len(bytes + SLACK))
            .map_err(|e| format!("{base:?}: {e}"))
            .and_then(|()| run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)))
            .and_then(|()| {
                // L1 loads modules on demand only for what it booted with.
                for m in ["loop", "ext4"] {
                    let _ = Command::new("modprobe").args(["-q", m]).status();
                }
                run(Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&image)
                    .arg(&mount))
            });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&base);
            return Err(e);
        }
        // From here on, dropping it unmounts.
        let scratch = Scratch { mount };
        let mut overrides = Vec::new();
        for s in movable {
            let copy = scratch
                .mount
                .join(format!("disk{}-{}", s.index, file_name(&s.disk.path)));
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&s.disk.path)
                .arg(&copy))?;
            overrides.push(format!(
                "disk.{}.path={}",
                s.index,
                toml::Value::String(copy.display().to_string())
            ));
            s.disk.path = copy;
        }
        scratch.settle()?;
        Ok(Some((scratch, overrides)))
    }

    /// Write the copies out and drop them from L1's page cache before the first boot. Left
    /// dirty, they were written back while the first boot (always Platter's) ran its first
    /// jobs, and O_DIRECT requests on them had to flush and drop the cached pages first: in
    /// a README run the first disk's depth-1 jobs under Platter took 2-3x the host CPU per
    /// I/O of QEMU's boot (which came after the writeback) and reached 0.42-0.55 of its IOPS.
    fn settle(&self) -> Result<(), String> {
        run(Command::new("sync").arg("-f").arg(&self.mount))?;
        let entries =
            std::fs::read_dir(&self.mount).map_err(|e| format!("{:?}: {e}", self.mount))?;
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue; // lost+found
            }
            let Ok(f) = std::fs::File::open(entry.path()) else {
                continue;
            };
            // SAFETY: posix_fadvise only gives the kernel advice about an open descriptor.
            let rc = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            if rc != 0 {
                log::warn!(
                    "{}: cannot drop its cached pages: {}",
                    entry.path().display(),
                    std::io::Error::from_raw_os_error(rc)
                );
            }
        }
        Ok(())
    }

    /// Where the copies are.
    pub fn mount_point(&self) -> &Path {
        &self.mount
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned())
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("umount").arg(&self.mount)) {
            log::warn!("scratch file system: {e}");
            return;
        }
        if let Some(base) = self.mount.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}
