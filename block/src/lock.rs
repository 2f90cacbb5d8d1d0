//! Image locking with open file description (OFD) locks, byte for byte the way QEMU's
//! file-posix driver does it, so Platter and QEMU's tools see each other's locks.
//!
//! ```text
//!  byte 100 + bit : "I use permission <bit>"           (shared lock held)
//!  byte 200 + bit : "I do not let others use <bit>"    (shared lock held)
//!  bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize
//! ```
//!
//! A writer uses {read, write} and shares {read, write unchanged}; a reader uses {read} and
//! shares everything but write. So two writers conflict, a reader and a writer conflict, and
//! any number of readers coexist. OFD locks belong to the open file description: they conflict
//! even between two opens in one process, and vanish when the descriptor is closed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::BlockError;

const LOCK_BASE_PERM: i64 = 100;
const LOCK_BASE_SHARED: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_ALL: u32 = 0xf;

/// Marker that the image's lock bytes are held; the locks go away with the descriptor.
#[derive(Debug)]
pub struct ImageLock {
    _private: (),
}

fn ofd_lock(fd: RawFd, cmd: libc::c_int, typ: libc::c_int, start: i64) -> io::Result<libc::flock> {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl.l_pid = 0; // required to be 0 for OFD locks
                  // SAFETY: fcntl with a valid pointer to a flock for the duration of the call.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// How long a conflict is looked at again before it is reported.
const CONFLICT_GRACE: Duration = Duration::from_millis(250);

impl ImageLock {
    /// Take the locks for a reader (`readonly`) or a writer on `file`, failing with
    /// [`BlockError::Locked`] when another open of the image conflicts for longer than
    /// [`CONFLICT_GRACE`]: an open file description can outlive its close() for a moment
    /// (a child process forked meanwhile holds it until it execs, io_uring and Linux AIO
    /// may drop their last reference from a kernel worker), and an image closed and opened
    /// again at once, by this process or after another one exited, must not fail for it.
    /// (Seen: the block crate's tests, which reopen images while others spawn processes.)
    pub fn acquire(file: &File, path: &Path, readonly: bool) -> Result<ImageLock, BlockError> {
        let deadline = Instant::now() + CONFLICT_GRACE;
        loop {
            match Self::try_acquire(file, path, readonly) {
                Err(BlockError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    fn try_acquire(file: &File, path: &Path, readonly: bool) -> Result<ImageLock, BlockError> {
        let (perm, shared) = if readonly {
            (PERM_CONSISTENT_READ, PERM_ALL & !PERM_WRITE)
        } else {
            (
                PERM_CONSISTENT_READ | PERM_WRITE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            )
        };
        let fd = file.as_raw_fd();
        let fail = |source| BlockError::LockFailed {
            path: path.to_path_buf(),
            source,
        };
        let locked = |what: String| BlockError::Locked {
            path: path.to_path_buf(),
            what,
        };
        for (bit, name) in PERM_NAMES.iter().enumerate() {
            let mask = 1u32 << bit;
            if perm & mask != 0 {
                match ofd_lock(
                    fd,
                    libc::F_OFD_SETLK,
                    libc::F_RDLCK,
                    LOCK_BASE_PERM + bit as i64,
                ) {
                    Ok(_) => {}
                    Err(e) if is_conflict(&e) => return Err(locked(format!("\"{}\"", name))),
                    Err(e) => return Err(fail(e)),
                }
            }
            if shared & mask == 0 {
                match ofd_lock(
                    fd,
                    libc::F_OFD_SETLK,
                    libc::F_RDLCK,
                    LOCK_BASE_SHARED + bit as i64,
                ) {
                    Ok(_) => {}
                    Err(e) if is_conflict(&e) => {
                        return Err(locked(format!("shared \"{}\"", name)))
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
        }
        // Check others: someone not sharing a permission we use, or using one we don't share.
        for (bit, name) in PERM_NAMES.iter().enumerate() {
            let mask = 1u32 << bit;
            if perm & mask != 0 {
                let fl = ofd_lock(
                    fd,
                    libc::F_OFD_GETLK,
                    libc::F_WRLCK,
                    LOCK_BASE_SHARED + bit as i64,
                )
                .map_err(fail)?;
                if fl.l_type != libc::F_UNLCK as libc::c_short {
                    return Err(locked(format!("\"{}\"", name)));
                }
            }
            if shared & mask == 0 {
                let fl = ofd_lock(
                    fd,
                    libc::F_OFD_GETLK,
                    libc::F_WRLCK,
                    LOCK_BASE_PERM + bit as i64,
                )
                .map_err(fail)?;
                if fl.l_type != libc::F_UNLCK as libc::c_short {
                    return Err(locked(format!("shared \"{}\"", name)));
                }
            }
        }
        Ok(ImageLock { _private: () })
    }
}

fn is_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn image() -> (crate::testutil::TempDir, std::path::PathBuf) {
        let dir = crate::testutil::TempDir::new("lock");
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        (dir, path)
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn two_writers_conflict() {
        let (_d, path) = image();
        let a = open(&path);
        let _la = ImageLock::acquire(&a, &path, false).unwrap();
        let b = open(&path);
        let err = ImageLock::acquire(&b, &path, false).unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("is another process using the image"));
    }

    /// A conflicting descriptor closed within the grace (as a forked child's copy closes
    /// when it execs) does not fail the open; one that stays fails it after the grace.
    #[test]
    fn a_conflict_that_goes_away_at_once_is_waited_out() {
        let (_d, path) = image();
        let a = open(&path);
        let la = ImageLock::acquire(&a, &path, false).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(40));
            drop((la, a));
        });
        let b = open(&path);
        let start = Instant::now();
        ImageLock::acquire(&b, &path, false).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
        closer.join().unwrap();
        let c = open(&path);
        let start = Instant::now();
        assert!(ImageLock::acquire(&c, &path, false).is_err());
        assert!(start.elapsed() >= CONFLICT_GRACE);
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let (_d, path) = image();
        let r1 = open(&path);
        let _l1 = ImageLock::acquire(&r1, &path, true).unwrap();
        let r2 = open(&path);
        let _l2 = ImageLock::acquire(&r2, &path, true).unwrap();
        let w = open(&path);
        assert!(matches!(
            ImageLock::acquire(&w, &path, false),
            Err(BlockError::Locked { .. })
        ));
    }

    #[test]
    fn locks_go_away_with_the_descriptor() {
        let (_d, path) = image();
        let a = open(&path);
        let _la = ImageLock::acquire(&a, &path, false).unwrap();
        drop(a);
        let b = open(&path);
        ImageLock::acquire(&b, &path, false).unwrap();
    }

    /// QEMU's tools and Platter see each other's locks (qemu-io sits beside qemu-img).
    #[test]
    fn qemu_sees_our_locks_and_we_see_qemus() {
        let Some(qemu_img) = crate::testutil::qemu_img() else {
            return;
        };
        let qemu_io = qemu_img.with_file_name("qemu-io");
        if !qemu_io.is_file() {
            eprintln!("SKIP: qemu-io not found beside qemu-img");
            return;
        }
        let (_d, path) = image();
        let a = open(&path);
        let _la = ImageLock::acquire(&a, &path, false).unwrap();
        let out = std::process::Command::new(&qemu_io)
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Failed to get \"write\" lock"),
            "qemu-io wrote despite our lock: {stderr}"
        );
        drop(a);
        // qemu-io holding the image read-write keeps us out.
        let mut child = std::process::Command::new(&qemu_io)
            .args(["-f", "raw"])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait (without locking, which would make qemu-io fail) until qemu-io holds byte 100.
        let probe = open(&path);
        let mut up = false;
        for _ in 0..250 {
            let fl = ofd_lock(
                probe.as_raw_fd(),
                libc::F_OFD_GETLK,
                libc::F_WRLCK,
                LOCK_BASE_PERM,
            )
            .unwrap();
            if fl.l_type != libc::F_UNLCK as libc::c_short {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let refused = matches!(
            ImageLock::acquire(&probe, &path, false),
            Err(BlockError::Locked { .. })
        );
        drop(child.stdin.take());
        let _ = child.wait();
        assert!(up, "qemu-io never locked the image");
        assert!(
            refused,
            "we took the image while qemu-io had it open read-write"
        );
    }
}
