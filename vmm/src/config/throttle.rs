//! Throttling in the config: limits on one disk (`[disk.throttle]`, a group
//! of one) or shared by several (`[[throttle_group]]` named by a disk's
//! `throttle_group`). Keys are QEMU's `throttling.*` names without the
//! prefix: `iops_total`, `iops_read`, `iops_write`, `bps_total`, `bps_read`,
//! `bps_write`, each with `_max` (burst) and `_max_length` (seconds), and
//! `iops_size`. The block layer's `ThrottleConfig` knows the keys and checks
//! them the way QEMU does; here they are only collected and named.

use std::collections::BTreeMap;

use platter_block::ThrottleConfig;
use serde::Deserialize;

/// `[[throttle_group]]`: a name and flat limit keys.
#[derive(Debug, Deserialize, Clone)]
pub struct ThrottleGroupConfig {
    /// The name disks refer to with `throttle_group`.
    pub id: String,
    /// Limit keys and values (checked in [`limits`]).
    #[serde(flatten)]
    pub limits: BTreeMap<String, u64>,
}

/// The block layer's limits for these keys; the error is (key, message).
pub fn limits(keys: &BTreeMap<String, u64>) -> Result<ThrottleConfig, (String, String)> {
    let mut c = ThrottleConfig::default();
    for (k, v) in keys {
        c.set(k, *v).map_err(|e| (k.clone(), e.to_string()))?;
    }
    c.validate().map_err(|e| (e.key(), e.to_string()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn keys_become_limits() {
        let c = limits(&map(&[
            ("iops_total", 100),
            ("iops_total_max", 200),
            ("bps_read", 1 << 20),
        ]))
        .unwrap();
        assert_eq!(c.iops_total.avg, 100);
        assert_eq!(c.iops_total.max, 200);
        assert_eq!(c.bps_read.avg, 1 << 20);
    }

    #[test]
    fn bad_keys_are_named() {
        let (k, m) = limits(&map(&[("iops_totl", 1)])).unwrap_err();
        assert_eq!(k, "iops_totl", "{m}");
        let (k, m) = limits(&map(&[("bps_total", 1), ("bps_read", 1)])).unwrap_err();
        assert!(m.contains("bps_total"), "{m}");
        assert_eq!(k, "bps_total");
        let (k, _) = limits(&map(&[("iops_read", 5), ("iops_read_max", 2)])).unwrap_err();
        assert_eq!(k, "iops_read_max");
        let (k, _) = limits(&map(&[("iops_read_max_length", 3)])).unwrap_err();
        assert_eq!(k, "iops_read_max_length");
    }
}
