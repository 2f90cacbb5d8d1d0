//! Test helpers: temporary directories on a real filesystem (O_DIRECT needs one), a small
//! deterministic RNG and the qemu-img lookup.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("PLATTER_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!(
            "platter-block-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic, seedable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// qemu-img, or None after printing why the test is skipped.
pub fn qemu_img() -> Option<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("qemu-img");
        if p.is_file() {
            return Some(p);
        }
    }
    eprintln!("SKIP: qemu-img not found in PATH; interop test not run");
    None
}

/// Run `tool` (qemu-img, qemu-io) with `args`, assert that it succeeded
/// (showing its output if not) and return its stdout.
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(tool: impl AsRef<std::ffi::OsStr>, args: &[S]) -> String {
    let tool = tool.as_ref();
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {:?} failed: {stdout}{}",
        tool.to_string_lossy(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The guest contents qemu-img reads from the qcow2 image at `path`: converted to a raw
/// file beside it, read, and the raw file removed.
pub fn qemu_read_qcow2(qemu_img: &Path, path: &Path) -> Vec<u8> {
    let raw = path.with_extension("converted.raw");
    let (p, r) = (path.as_os_str(), raw.as_os_str());
    run_ok(
        qemu_img,
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            p,
            r,
        ],
    );
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}
