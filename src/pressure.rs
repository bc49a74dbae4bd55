//! Pressure levels from usage against a limit, with hysteresis.

use std::fmt;

use crate::error::{MemError, Result};

/// How close an engine (or the process) is to its limit.
///
/// Ordered: `Normal < Warning < Critical < Emergency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PressureLevel {
    /// Below the warning threshold: allocate freely.
    Normal = 0,
    /// Past the warning threshold: prefer compact structures, start flushing caches.
    Warning = 1,
    /// Past the critical threshold: spill, shed optional work.
    Critical = 2,
    /// Past the emergency threshold: refuse new work, free what you can now.
    Emergency = 3,
}

impl PressureLevel {
    /// Every level, lowest first.
    pub const ALL: [PressureLevel; 4] = [
        PressureLevel::Normal,
        PressureLevel::Warning,
        PressureLevel::Critical,
        PressureLevel::Emergency,
    ];

    /// The level's lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            PressureLevel::Normal => "normal",
            PressureLevel::Warning => "warning",
            PressureLevel::Critical => "critical",
            PressureLevel::Emergency => "emergency",
        }
    }

    pub(crate) const fn from_u8(v: u8) -> PressureLevel {
        match v {
            0 => PressureLevel::Normal,
            1 => PressureLevel::Warning,
            2 => PressureLevel::Critical,
            _ => PressureLevel::Emergency,
        }
    }
}

impl fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the pressure levels start, as fractions of the limit, and how far usage must fall
/// below a threshold before the level drops again.
///
/// Defaults: warning 70 %, critical 85 %, emergency 95 %, hysteresis 5 points. With them a
/// level reached at 85 % is left only when usage falls below 80 %, so usage hovering around a
/// threshold does not make the level flap.
///
/// ```
/// use nodedb_mem::PressureThresholds;
/// let t = PressureThresholds::default();
/// assert_eq!((t.warning, t.critical, t.emergency, t.hysteresis), (0.70, 0.85, 0.95, 0.05));
/// assert!(t.validate().is_ok());
/// let bad = PressureThresholds { warning: 0.9, critical: 0.8, ..t };
/// assert_eq!(
///     bad.validate().unwrap_err().to_string(),
///     "invalid configuration `thresholds.critical` = 0.8: must be above thresholds.warning (0.9)"
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PressureThresholds {
    /// Start of [`PressureLevel::Warning`], in `(0, 1]`.
    pub warning: f64,
    /// Start of [`PressureLevel::Critical`], above `warning`.
    pub critical: f64,
    /// Start of [`PressureLevel::Emergency`], above `critical`, at most 1.
    pub emergency: f64,
    /// How far below a level's threshold usage must fall to leave that level, in `[0, warning)`.
    pub hysteresis: f64,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        PressureThresholds {
            warning: 0.70,
            critical: 0.85,
            emergency: 0.95,
            hysteresis: 0.05,
        }
    }
}

const PPM: u64 = 1_000_000;

impl PressureThresholds {
    /// Checks the thresholds are in `(0, 1]`, strictly increasing, and the hysteresis in
    /// `[0, warning)`; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("thresholds.warning", self.warning),
            ("thresholds.critical", self.critical),
            ("thresholds.emergency", self.emergency),
        ];
        for (name, v) in fields {
            if !(v > 0.0 && v <= 1.0) {
                return Err(MemError::config(name, v, "must be above 0 and at most 1"));
            }
        }
        for pair in fields.windows(2) {
            let ((lo_name, lo), (hi_name, hi)) = (pair[0], pair[1]);
            if hi <= lo {
                return Err(MemError::config(
                    hi_name,
                    hi,
                    format!("must be above {lo_name} ({lo})"),
                ));
            }
        }
        if !(self.hysteresis >= 0.0 && self.hysteresis < self.warning) {
            return Err(MemError::config(
                "thresholds.hysteresis",
                self.hysteresis,
                format!(
                    "must be at least 0 and below thresholds.warning ({})",
                    self.warning
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn to_ppm(self) -> ThresholdsPpm {
        let ppm = |f: f64| (f * PPM as f64).round() as u64;
        ThresholdsPpm {
            start: [ppm(self.warning), ppm(self.critical), ppm(self.emergency)],
            hysteresis: ppm(self.hysteresis),
        }
    }
}

/// Thresholds in parts per million, for integer-only evaluation on the polling path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ThresholdsPpm {
    start: [u64; 3],
    hysteresis: u64,
}

impl ThresholdsPpm {
    /// The level for `usage` against `limit`, given the level it was at before.
    ///
    /// A level `k` above `current` is entered when usage reaches its threshold; a level at or
    /// below `current` is kept while usage stays above its threshold minus the hysteresis.
    pub(crate) fn level(&self, usage: u64, limit: u64, current: PressureLevel) -> PressureLevel {
        let ratio = ratio_ppm(usage, limit);
        let mut level = PressureLevel::Normal;
        for (i, &start) in self.start.iter().enumerate() {
            let k = PressureLevel::from_u8(i as u8 + 1);
            let enter = if k <= current {
                start.saturating_sub(self.hysteresis)
            } else {
                start
            };
            if ratio >= enter {
                level = k;
            }
        }
        level
    }
}

/// `usage / limit` in parts per million, saturating at `u64::MAX`; a zero limit with any usage
/// is infinitely full, with no usage it is empty.
pub(crate) fn ratio_ppm(usage: u64, limit: u64) -> u64 {
    if limit == 0 {
        return if usage == 0 { 0 } else { u64::MAX };
    }
    let r = u128::from(usage) * u128::from(PPM) / u128::from(limit);
    u64::try_from(r).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PressureLevel::*;

    fn t() -> ThresholdsPpm {
        PressureThresholds::default().to_ppm()
    }

    #[test]
    fn levels_rise_at_their_thresholds() {
        let t = t();
        assert_eq!(t.level(699, 1000, Normal), Normal);
        assert_eq!(t.level(700, 1000, Normal), Warning);
        assert_eq!(t.level(849, 1000, Normal), Warning);
        assert_eq!(t.level(850, 1000, Normal), Critical);
        assert_eq!(t.level(950, 1000, Normal), Emergency);
        assert_eq!(t.level(5000, 1000, Normal), Emergency);
    }

    #[test]
    fn levels_fall_only_past_the_hysteresis_band() {
        let t = t();
        // Reached Critical at 85 %: one byte less keeps it, 80 % keeps it, below 80 % drops it.
        assert_eq!(t.level(849, 1000, Critical), Critical);
        assert_eq!(t.level(800, 1000, Critical), Critical);
        assert_eq!(t.level(799, 1000, Critical), Warning);
        assert_eq!(t.level(649, 1000, Critical), Normal);
        assert_eq!(t.level(650, 1000, Warning), Warning);
        assert_eq!(t.level(0, 1000, Emergency), Normal);
    }

    #[test]
    fn zero_limit_is_full_unless_empty() {
        let t = t();
        assert_eq!(t.level(0, 0, Normal), Normal);
        assert_eq!(t.level(1, 0, Normal), Emergency);
        assert_eq!(ratio_ppm(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn validation_names_the_field() {
        let d = PressureThresholds::default();
        let msg = |t: PressureThresholds| t.validate().unwrap_err().to_string();
        assert_eq!(
            msg(PressureThresholds { warning: 0.0, ..d }),
            "invalid configuration `thresholds.warning` = 0: must be above 0 and at most 1"
        );
        assert_eq!(
            msg(PressureThresholds {
                emergency: f64::NAN,
                ..d
            }),
            "invalid configuration `thresholds.emergency` = NaN: must be above 0 and at most 1"
        );
        assert_eq!(
            msg(PressureThresholds {
                emergency: 0.85,
                ..d
            }),
            "invalid configuration `thresholds.emergency` = 0.85: must be above thresholds.critical (0.85)"
        );
        assert_eq!(
            msg(PressureThresholds {
                hysteresis: 0.7,
                ..d
            }),
            "invalid configuration `thresholds.hysteresis` = 0.7: must be at least 0 and below thresholds.warning (0.7)"
        );
    }
}
