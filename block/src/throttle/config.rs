//! Throttle limits with QEMU's `throttling.*` meaning, under Platter's key names
//! (`iops_total`, `iops_total_max`, `iops_total_max_length`, ..., `iops_size`), and their
//! validation.

use std::fmt;

/// Largest accepted rate, burst or length (QEMU's bound: beyond it the bucket arithmetic in
/// floating point loses whole operations).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One limit: an average rate, an optional burst rate and how long a burst may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Average rate, operations or bytes per second; 0 means unlimited.
    pub avg: u64,
    /// Burst rate (`*_max`); 0 means bursts of a tenth of a second's worth of `avg`.
    pub max: u64,
    /// Seconds a burst at `max` may last (`*_max_length`), at least 1.
    pub max_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            avg: 0,
            max: 0,
            max_length: 1,
        }
    }
}

/// Which of the six limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Operations per second, reads and writes together.
    IopsTotal,
    /// Read operations per second.
    IopsRead,
    /// Write operations per second (discards and write-zeroes included).
    IopsWrite,
    /// Bytes per second, reads and writes together.
    BpsTotal,
    /// Bytes read per second.
    BpsRead,
    /// Bytes written per second.
    BpsWrite,
}

impl LimitKind {
    /// Every limit, in key order.
    pub const ALL: [LimitKind; 6] = [
        LimitKind::IopsTotal,
        LimitKind::IopsRead,
        LimitKind::IopsWrite,
        LimitKind::BpsTotal,
        LimitKind::BpsRead,
        LimitKind::BpsWrite,
    ];

    /// The key of the average rate; `_max` and `_max_length` are appended for the others.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::IopsTotal => "iops_total",
            LimitKind::IopsRead => "iops_read",
            LimitKind::IopsWrite => "iops_write",
            LimitKind::BpsTotal => "bps_total",
            LimitKind::BpsRead => "bps_read",
            LimitKind::BpsWrite => "bps_write",
        }
    }
}

impl LimitKind {
    /// For a total limit, the per-direction keys it excludes.
    fn split_keys(self) -> &'static str {
        match self {
            LimitKind::IopsTotal => "iops_read/iops_write",
            LimitKind::BpsTotal => "bps_read/bps_write",
            _ => "",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected throttle configuration; every message names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleConfigError {
    /// A total limit together with a per-direction one of the same unit (QEMU refuses it too:
    /// which one would win is ambiguous).
    #[error("{total} and {} cannot be used at the same time", .total.split_keys())]
    TotalAndSplit {
        /// `iops_total` or `bps_total`.
        total: LimitKind,
    },
    /// A burst rate below the average rate.
    #[error("{limit}_max ({max}) must not be lower than {limit} ({avg}); raise {limit}_max or leave it 0")]
    MaxBelowAvg {
        /// Which limit.
        limit: LimitKind,
        /// Its burst rate.
        max: u64,
        /// Its average rate.
        avg: u64,
    },
    /// A burst rate without an average rate.
    #[error("{limit}_max needs {limit} to be set too")]
    MaxWithoutAvg {
        /// Which limit.
        limit: LimitKind,
    },
    /// A burst that lasts no time.
    #[error("{limit}_max_length must be at least 1 (second)")]
    ZeroLength {
        /// Which limit.
        limit: LimitKind,
    },
    /// A burst length without a burst rate.
    #[error("{limit}_max_length ({length}) needs {limit}_max to be set too")]
    LengthWithoutMax {
        /// Which limit.
        limit: LimitKind,
        /// The length given.
        length: u64,
    },
    /// A value beyond [`THROTTLE_VALUE_MAX`].
    #[error("{key} = {value} is too large (at most {THROTTLE_VALUE_MAX})")]
    TooLarge {
        /// The key.
        key: String,
        /// The value given.
        value: u64,
    },
    /// [`ThrottleConfig::set`] got a key it does not know.
    #[error("unknown throttle key {key:?}; expected iops_total|iops_read|iops_write|bps_total|bps_read|bps_write, optionally followed by _max or _max_length, or iops_size")]
    UnknownKey {
        /// The key.
        key: String,
    },
}

impl ThrottleConfigError {
    /// The flat key the error is about (`bps_total`, `iops_read_max`, ...), for messages that
    /// point at a config key.
    pub fn key(&self) -> String {
        match self {
            Self::TotalAndSplit { total } => total.as_str().to_string(),
            Self::MaxBelowAvg { limit, .. } | Self::MaxWithoutAvg { limit } => {
                format!("{limit}_max")
            }
            Self::ZeroLength { limit } | Self::LengthWithoutMax { limit, .. } => {
                format!("{limit}_max_length")
            }
            Self::TooLarge { key, .. } | Self::UnknownKey { key } => key.clone(),
        }
    }
}

/// Limits of one throttle group (a disk with its own limits is a group of one). Default: no
/// limits.
///
/// Reads count against `*_total` and `*_read`, writes, discards and write-zeroes against
/// `*_total` and `*_write`; flushes are never throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleConfig {
    /// `iops_total`, `iops_total_max`, `iops_total_max_length`.
    pub iops_total: Limit,
    /// `iops_read`, `iops_read_max`, `iops_read_max_length`.
    pub iops_read: Limit,
    /// `iops_write`, `iops_write_max`, `iops_write_max_length`.
    pub iops_write: Limit,
    /// `bps_total`, `bps_total_max`, `bps_total_max_length`.
    pub bps_total: Limit,
    /// `bps_read`, `bps_read_max`, `bps_read_max_length`.
    pub bps_read: Limit,
    /// `bps_write`, `bps_write_max`, `bps_write_max_length`.
    pub bps_write: Limit,
    /// `iops_size`: a request of more bytes counts as `bytes / iops_size` operations, so large
    /// requests cannot dodge an IOPS limit; 0 counts every request as one.
    pub iops_size: u64,
}

impl ThrottleConfig {
    /// One limit by kind.
    pub fn limit(&self, k: LimitKind) -> &Limit {
        match k {
            LimitKind::IopsTotal => &self.iops_total,
            LimitKind::IopsRead => &self.iops_read,
            LimitKind::IopsWrite => &self.iops_write,
            LimitKind::BpsTotal => &self.bps_total,
            LimitKind::BpsRead => &self.bps_read,
            LimitKind::BpsWrite => &self.bps_write,
        }
    }

    /// One limit by kind, to change it.
    pub fn limit_mut(&mut self, k: LimitKind) -> &mut Limit {
        match k {
            LimitKind::IopsTotal => &mut self.iops_total,
            LimitKind::IopsRead => &mut self.iops_read,
            LimitKind::IopsWrite => &mut self.iops_write,
            LimitKind::BpsTotal => &mut self.bps_total,
            LimitKind::BpsRead => &mut self.bps_read,
            LimitKind::BpsWrite => &mut self.bps_write,
        }
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        LimitKind::ALL.iter().any(|&k| self.limit(k).avg > 0)
    }

    /// Set one value by its flat key (`iops_read`, `bps_total_max`, `iops_write_max_length`,
    /// `iops_size`, ...), for config files and `--set`. Does not validate; call
    /// [`ThrottleConfig::validate`] when done.
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), ThrottleConfigError> {
        if key == "iops_size" {
            self.iops_size = value;
            return Ok(());
        }
        for k in LimitKind::ALL {
            let Some(rest) = key.strip_prefix(k.as_str()) else {
                continue;
            };
            let l = self.limit_mut(k);
            let slot = match rest {
                "" => &mut l.avg,
                "_max" => &mut l.max,
                "_max_length" => &mut l.max_length,
                _ => break,
            };
            *slot = value;
            return Ok(());
        }
        Err(ThrottleConfigError::UnknownKey {
            key: key.to_string(),
        })
    }

    /// Check the limits the way QEMU does; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ThrottleConfigError> {
        let both = |a: LimitKind, b: LimitKind| self.limit(a).avg > 0 || self.limit(b).avg > 0;
        if self.bps_total.avg > 0 && both(LimitKind::BpsRead, LimitKind::BpsWrite) {
            return Err(ThrottleConfigError::TotalAndSplit {
                total: LimitKind::BpsTotal,
            });
        }
        if self.iops_total.avg > 0 && both(LimitKind::IopsRead, LimitKind::IopsWrite) {
            return Err(ThrottleConfigError::TotalAndSplit {
                total: LimitKind::IopsTotal,
            });
        }
        let too_large = |key: String, value: u64| {
            if value > THROTTLE_VALUE_MAX {
                Err(ThrottleConfigError::TooLarge { key, value })
            } else {
                Ok(())
            }
        };
        too_large("iops_size".into(), self.iops_size)?;
        for limit in LimitKind::ALL {
            let l = self.limit(limit);
            too_large(limit.to_string(), l.avg)?;
            too_large(format!("{limit}_max"), l.max)?;
            too_large(format!("{limit}_max_length"), l.max_length)?;
            if l.max_length == 0 {
                return Err(ThrottleConfigError::ZeroLength { limit });
            }
            if l.max > 0 && l.avg == 0 {
                return Err(ThrottleConfigError::MaxWithoutAvg { limit });
            }
            if l.max > 0 && l.max < l.avg {
                return Err(ThrottleConfigError::MaxBelowAvg {
                    limit,
                    max: l.max,
                    avg: l.avg,
                });
            }
            if l.max_length > 1 && l.max == 0 {
                return Err(ThrottleConfigError::LengthWithoutMax {
                    limit,
                    length: l.max_length,
                });
            }
            // The burst allowance is max * max_length units; keep it in range as well.
            too_large(
                format!("{limit}_max * {limit}_max_length"),
                l.max.saturating_mul(l.max_length),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, u64)]) -> ThrottleConfig {
        let mut c = ThrottleConfig::default();
        for (k, v) in pairs {
            c.set(k, *v).unwrap();
        }
        c
    }

    fn err(pairs: &[(&str, u64)]) -> String {
        with(pairs).validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_unlimited_and_valid() {
        let c = ThrottleConfig::default();
        assert!(!c.is_limited());
        c.validate().unwrap();
    }

    #[test]
    fn flat_keys_reach_their_fields() {
        let c = with(&[
            ("iops_total", 100),
            ("iops_total_max", 500),
            ("iops_total_max_length", 10),
            ("bps_read", 1 << 20),
            ("bps_write_max", 7),
            ("iops_size", 4096),
        ]);
        assert_eq!(
            c.iops_total,
            Limit {
                avg: 100,
                max: 500,
                max_length: 10
            }
        );
        assert_eq!(c.bps_read.avg, 1 << 20);
        assert_eq!(c.bps_write.max, 7);
        assert_eq!(c.iops_size, 4096);
        assert!(c.is_limited());
        for bad in [
            "iops",
            "iops_total_min",
            "bps_total_max_len",
            "iops_totalx",
            "",
        ] {
            let e = ThrottleConfig::default().set(bad, 1).unwrap_err();
            assert!(e.to_string().contains("unknown throttle key"), "{bad}: {e}");
        }
    }

    #[test]
    fn total_with_split_is_refused() {
        assert_eq!(
            err(&[("bps_total", 10), ("bps_read", 5)]),
            "bps_total and bps_read/bps_write cannot be used at the same time"
        );
        assert_eq!(
            err(&[("bps_total", 10), ("bps_write", 5)]),
            "bps_total and bps_read/bps_write cannot be used at the same time"
        );
        assert_eq!(
            err(&[("iops_total", 10), ("iops_read", 5)]),
            "iops_total and iops_read/iops_write cannot be used at the same time"
        );
        // Different units mix freely.
        with(&[("iops_total", 10), ("bps_read", 5), ("bps_write", 6)])
            .validate()
            .unwrap();
    }

    #[test]
    fn burst_values_are_checked() {
        assert!(err(&[("iops_read", 100), ("iops_read_max", 50)])
            .starts_with("iops_read_max (50) must not be lower than iops_read (100)"));
        assert_eq!(
            err(&[("bps_write_max", 50)]),
            "bps_write_max needs bps_write to be set too"
        );
        assert_eq!(
            err(&[("iops_total", 5), ("iops_total_max_length", 0)]),
            "iops_total_max_length must be at least 1 (second)"
        );
        assert_eq!(
            err(&[("iops_total", 5), ("iops_total_max_length", 3)]),
            "iops_total_max_length (3) needs iops_total_max to be set too"
        );
        assert!(err(&[("bps_total", THROTTLE_VALUE_MAX + 1)]).starts_with("bps_total = "));
        assert!(err(&[("iops_size", u64::MAX)]).starts_with("iops_size = "));
        assert!(err(&[
            ("bps_total", 1),
            ("bps_total_max", THROTTLE_VALUE_MAX),
            ("bps_total_max_length", 2)
        ])
        .starts_with("bps_total_max * bps_total_max_length = "));
        with(&[
            ("iops_read", 100),
            ("iops_read_max", 100),
            ("iops_read_max_length", 60),
        ])
        .validate()
        .unwrap();
    }
}
