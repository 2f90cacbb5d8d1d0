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

/// The room the copy of the image at `path` may need on the scratch file system, or None
/// when it cannot be copied on its own (it has a backing file, or is no image). A qcow2 image
/// grows as the guest writes: its file may be a few clusters while the fill and the write
/// jobs allocate the whole measured region, so it gets its virtual size on top of its file,
/// plus its metadata (L2 and refcount entries: 10 bytes per cluster, at most 1/32 of the
/// data with 512-byte clusters). Sized by the file alone, a fresh qcow2 left the guest's
/// writes failing with EIO (ENOSPC on the host) as soon as a comparison measured only it.
fn room(path: &Path) -> Option<u64> {
    let info = platter_block::img::info(path).ok()?;
    if info.backing_file.is_some() {
        return None;
    }
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    Some(match info.format {
        platter_block::Format::Raw => len.max(info.virtual_size),
        platter_block::Format::Qcow2 => len + info.virtual_size + info.virtual_size / 32,
    })
}

impl Scratch {
    /// Copy the images of `subjects` that are on 9p and point them at the
    /// copies; returns the scratch file system and the `--set` overrides that
    /// do the same for the VMMs, or `None` when nothing needed copying.
    pub fn for_subjects(
        subjects: &mut [Subject],
    ) -> Result<Option<(Scratch, Vec<String>)>, String> {
        let mut bytes = 0;
        let movable: Vec<&mut Subject> = subjects
            .iter_mut()
            .filter(|s| super::plan::on_9p(&s.disk.path))
            .filter(|s| room(&s.disk.path).inspect(|r| bytes += r).is_some())
            .collect();
        if movable.is_empty() {
            return Ok(None);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use platter_block::img::{create, CreateOptions};
    use platter_block::Format;

    /// A fresh qcow2 gets room for its whole virtual size, a raw image its length; an image
    /// with a backing file is not copied.
    #[test]
    fn a_growing_qcow2_gets_room_for_its_virtual_size() {
        let dir = std::env::temp_dir().join(format!("platter-room-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (q, r, o) = (dir.join("q.qcow2"), dir.join("r.raw"), dir.join("o.qcow2"));
        let opts = CreateOptions::default();
        create(&q, Format::Qcow2, 128 << 20, &opts).unwrap();
        create(&r, Format::Raw, 128 << 20, &opts).unwrap();
        let overlay = CreateOptions {
            backing_file: Some("r.raw".into()),
            backing_format: Some(Format::Raw),
            ..CreateOptions::default()
        };
        create(&o, Format::Qcow2, 128 << 20, &overlay).unwrap();
        let q_len = std::fs::metadata(&q).unwrap().len();
        assert!(q_len < 1 << 20, "a fresh qcow2 is small ({q_len})");
        assert!(room(&q).unwrap() >= q_len + (128 << 20));
        assert_eq!(room(&r), Some(128 << 20));
        assert_eq!(room(&o), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
