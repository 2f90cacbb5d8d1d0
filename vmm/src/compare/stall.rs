//! What Platter's block layer held when its guest fell silent: compare runs Platter with
//! `--stats-file`, and when a boot is killed for silence or overrunning, the last
//! statistics tell a request Platter never completed (requests in flight for minutes) from
//! a guest that stopped on its own (none in flight).

use std::path::{Path, PathBuf};

/// Where this compare's Platter boots keep their statistics.
pub fn stats_path() -> PathBuf {
    std::env::temp_dir().join(format!("platter-compare-{}.stats.json", std::process::id()))
}

/// One line per disk of the stats file at `path` (`--stats-file`'s JSON), naming its
/// requests in flight; `None` when the file is missing or has no disks.
pub fn in_flight(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<String> = text
        .split("{\"id\":\"")
        .skip(1)
        .filter_map(|d| {
            let id = &d[..d.find('"')?];
            let n = d.split("\"in_flight\":").nth(1)?;
            let n: u64 = n[..n.find(|c: char| !c.is_ascii_digit())?].parse().ok()?;
            Some(format!(
                "  disk `{id}`: {n} requests in flight in Platter's block layer"
            ))
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_per_disk_from_the_stats_file() {
        let path = std::env::temp_dir().join(format!("platter-stall-test-{}", std::process::id()));
        std::fs::write(
            &path,
            "{\"disks\":[{\"id\":\"a\",\"stats\":{\"read\":{\"ops\":3},\"in_flight\":2,\"throttled_now\":0}},{\"id\":\"b-2\",\"stats\":{\"in_flight\":0,\"throttled_now\":0}}]}\n",
        )
        .unwrap();
        assert_eq!(
            in_flight(&path).unwrap(),
            "  disk `a`: 2 requests in flight in Platter's block layer\n  disk `b-2`: 0 requests in flight in Platter's block layer"
        );
        std::fs::write(&path, "{\"disks\":[]}\n").unwrap();
        assert_eq!(in_flight(&path), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(in_flight(&path), None);
    }
}
