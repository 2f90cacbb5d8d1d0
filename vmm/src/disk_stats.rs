//! Per-disk statistics while the machine runs: printed when it stops
//! (`--disk-stats`) and kept current in a JSON file (`--stats-file`), which
//! a user can read at any time (`watch cat FILE`, `jq`). The block layer
//! counts; this only names the disks and writes the numbers out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use platter_block::DiskStats;

/// How often the stats file is rewritten.
const REFRESH: Duration = Duration::from_secs(1);

/// Every disk's counters, by config id.
#[derive(Clone, Default)]
pub struct AllStats(pub Vec<(String, Arc<DiskStats>)>);

impl AllStats {
    /// One block of lines per disk, for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (id, s) in &self.0 {
            out += &format!("disk `{id}`:\n");
            for line in s.snapshot().to_string().lines() {
                out += &format!("  {line}\n");
            }
        }
        out
    }

    /// `{"disks": [{"id": ..., "stats": {...}}, ...]}`.
    pub fn json(&self) -> String {
        let disks: Vec<String> = self
            .0
            .iter()
            .map(|(id, s)| {
                format!(
                    "{{\"id\":\"{}\",\"stats\":{}}}",
                    id.replace('\\', "\\\\").replace('"', "\\\""),
                    s.snapshot().to_json()
                )
            })
            .collect();
        format!("{{\"disks\":[{}]}}\n", disks.join(","))
    }
}

/// Write `text` to `path` whole: readers never see half a file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The thread keeping a stats file current; stopping writes it a last time.
pub struct StatsFile {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl StatsFile {
    /// Write `stats` to `path` now (so a bad path fails before the guest
    /// starts) and then every second.
    pub fn start(path: PathBuf, stats: AllStats) -> std::io::Result<Self> {
        write_atomically(&path, &stats.json())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("stats-file".into())
            .spawn(move || {
                // The last round runs after `stop`: the file ends with the final numbers.
                loop {
                    let last = stop2.load(Ordering::Relaxed);
                    if !last {
                        std::thread::park_timeout(REFRESH);
                    }
                    if let Err(e) = write_atomically(&path, &stats.json()) {
                        log::warn!("cannot write {}: {e}", path.display());
                    }
                    if last {
                        break;
                    }
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for StatsFile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_text_name_every_disk() {
        let s = AllStats(vec![
            ("a".into(), Arc::new(DiskStats::default())),
            ("b\"c".into(), Arc::new(DiskStats::default())),
        ]);
        let j = s.json();
        assert!(
            j.starts_with("{\"disks\":[{\"id\":\"a\",\"stats\":{"),
            "{j}"
        );
        assert!(j.contains("\"id\":\"b\\\"c\""), "{j}");
        let t = s.text();
        assert!(t.contains("disk `a`:") && t.contains("disk `b\"c`:"), "{t}");
    }

    #[test]
    fn stats_file_is_written_at_start_and_stop() {
        let dir = std::env::temp_dir().join(format!("platter-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.json");
        let s = AllStats(vec![("d".into(), Arc::new(DiskStats::default()))]);
        let f = StatsFile::start(path.clone(), s).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("\"d\""));
        std::fs::remove_file(&path).unwrap();
        drop(f);
        assert!(path.exists(), "rewritten when stopped");
        assert!(StatsFile::start(dir.join("no/such/dir.json"), AllStats::default()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
