//! Fuzz target: the input is a whole image file. It is written to a temporary file and opened
//! every way Platter opens images (format probe, qcow2 header parse, `img info`, the qcow2
//! driver read-write and read-only, `open_disk` read-only without locking), and a few sectors
//! are read, written and zeroed ([`platter_block::qcow2::hostile::open_and_access`]). Any
//! `Ok` or `Err` is fine; a panic, an abort or a hang is a finding.

#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per fuzzing process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("platter-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir.join("image")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    // Rewritten in place rather than truncated to zero: ext4 flushes files truncated to zero
    // on close, which would make every input cost a disk write.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("scratch file");
    file.set_len(data.len() as u64).expect("scratch file");
    file.write_all_at(data, 0).expect("scratch file");
    drop(file);
    let _ = platter_block::qcow2::hostile::open_and_access(path);
});
