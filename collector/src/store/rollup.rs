//! Rollups: per (level, bucket, series) aggregates ([`crate::analysis::aggregate::Agg`]), built in memory
//! (a batch's hours by the ingest task, buffered and written by the store writer); queries merge
//! them per window.
//!
//! Levels and why: `hour`, `day` and `week` rows, so a 30-day query merges 5 or 6 week rows per
//! series instead of 43,200 results. There is no minute level (schema step 7 dropped it): with
//! probes every 60 s or slower a minute row holds one result, so it doubled the writes and the
//! disk of the raw row without making a read cheaper; windows up to 3 hours read the raw results,
//! exactly. [`plan`] picks the source; [`Level::keep_from`] says how long a level is worth keeping.

/// A rollup granularity; the number is its width in seconds and is stored in `rollups.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Hour = 3600,
    Day = 86_400,
    /// Buckets aligned to the Unix epoch (they start on Thursdays, 00:00 UTC).
    Week = 604_800,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Hour, Level::Day, Level::Week];

    pub fn width_us(self) -> i64 {
        self as i64 * 1_000_000
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    /// Start of the bucket holding `t_us`.
    pub fn bucket(self, t_us: i64) -> i64 {
        t_us.div_euclid(self.width_us()) * self.width_us()
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Hour => "hour",
            Level::Day => "day",
            Level::Week => "week",
        }
    }
}

/// Bucket width of [`Store::history`](super::Store::history) over windows read from the raw
/// results (up to 3 hours): one minute, one result per series at the usual probe interval.
pub const RAW_BUCKET_US: i64 = 60_000_000;

/// Longest window read from hour rows; longer windows read day rows (see [`plan`]).
const HOUR_WINDOWS_UP_TO_US: i64 = 3 * 86_400_000_000;
/// Longest window read from day rows; longer windows read week rows.
const DAY_WINDOWS_UP_TO_US: i64 = 3 * 604_800_000_000;

/// Where a window `[since_us, now_us]` is read from: `None` for raw results from `since_us` on
/// (windows up to 3 hours), else the rollup level and its first bucket.
///
/// Windows up to 3 days use hour rows, up to 21 days day rows, longer ones week rows: at most
/// about 72 rows per series, and the first bucket may start up to one bucket width (an hour, a
/// day, a week: at most about 1/3 of the window) before `since`.
pub fn plan(since_us: i64, now_us: i64) -> Option<(Level, i64)> {
    let span = now_us.saturating_sub(since_us);
    let level = if span <= 3 * Level::Hour.width_us() {
        return None;
    } else if span <= HOUR_WINDOWS_UP_TO_US {
        Level::Hour
    } else if span <= DAY_WINDOWS_UP_TO_US {
        Level::Day
    } else {
        Level::Week
    };
    Some((level, level.bucket(since_us)))
}

impl Level {
    /// The oldest bucket of this level worth keeping at `now_us`: no window ending at `now_us`
    /// or later reads an older one ([`plan`] reads hour rows for windows up to 3 days and day
    /// rows up to 21 days), with one bucket of slack for a clock that steps back. `None` for
    /// week rows, which every longer window reads (they are kept for the rollup retention).
    ///
    /// So hour rows live about 3 days and day rows about 3 weeks, as coarser rows outlive finer
    /// ones in any round-robin store; results stored late (an agent's spool after an outage, a
    /// backfill) skip the hour and day rows no window will read.
    pub fn keep_from(self, now_us: i64) -> Option<i64> {
        let span = match self {
            Level::Hour => HOUR_WINDOWS_UP_TO_US,
            Level::Day => DAY_WINDOWS_UP_TO_US,
            Level::Week => return None,
        };
        Some(self.bucket(now_us.saturating_sub(span)) - self.width_us())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_picks_levels_by_span() {
        let now = 1_700_000_000_000_000;
        let h = 3_600_000_000;
        assert_eq!(plan(now - h, now), None, "raw results");
        assert_eq!(plan(now - 3 * h, now), None);
        assert_eq!(plan(now - 24 * h, now).unwrap().0, Level::Hour);
        let (level, from) = plan(now - 7 * 24 * h, now).unwrap();
        assert_eq!(level, Level::Day);
        assert!(from <= now - 7 * 24 * h && from > now - 8 * 24 * h);
        assert_eq!(plan(now - 21 * 24 * h, now).unwrap().0, Level::Day);
        let (level, from) = plan(now - 30 * 24 * h, now).unwrap();
        assert_eq!(level, Level::Week);
        assert!(from <= now - 30 * 24 * h && from > now - 37 * 24 * h);
        assert_eq!(
            Level::Week.bucket(Level::Day.bucket(now)),
            Level::Week.bucket(now)
        );
        assert_eq!(Level::Hour.bucket(7_300_000_000), 7_200_000_000);
        assert_eq!(Level::Hour.bucket(-1), -3_600_000_000);
    }

    /// Every row a window reads, now or later, is at or after its level's `keep_from` of now.
    #[test]
    fn no_window_reads_a_row_older_than_keep_from() {
        let h = 3_600_000_000i64;
        let now = 1_764_000_000_000_000i64 + 1_234_567;
        assert_eq!(Level::Week.keep_from(now), None);
        let mut hour_from_seen = i64::MAX;
        for later in [0, 1, h / 2, h, 5 * h, 3 * 24 * h] {
            for span in (1..=40 * 24).map(|k| k * h - 1) {
                let t = now + later;
                let Some((level, from)) = plan(t - span, t) else {
                    continue;
                };
                let keep = level.keep_from(now).unwrap_or(i64::MIN);
                assert!(from >= keep, "{level:?} span {span} later {later}");
                if level == Level::Hour && later == 0 {
                    hour_from_seen = hour_from_seen.min(from);
                }
            }
        }
        // Kept no more than a bucket of slack beyond the oldest row a window reads.
        let keep = Level::Hour.keep_from(now).unwrap();
        assert!(hour_from_seen - keep <= 2 * h, "{}", hour_from_seen - keep);
        assert!(keep >= now - 3 * 24 * h - 3 * h);
        let day = 24 * h;
        let keep = Level::Day.keep_from(now).unwrap();
        assert!(keep >= now - 21 * day - 3 * day && keep <= now - 21 * day);
    }
}
