//! What requests change beside their own rows: a request's and a batch's [`Delta`], and the
//! [`Buffer`] of committed rollups and series state not written yet.

use super::*;

/// Changes made by requests, applied to SQLite once per batch and to the writer's memory once
/// committed.
#[derive(Default)]
pub(super) struct Delta {
    /// Series ids learned (looked up or inserted) by these requests.
    pub(super) ids: SeriesDir,
    pub(super) series: FxMap<i64, SeriesMem>,
    /// Hour aggregates of the stored results (a key may repeat), merged into the writer's
    /// buffer once committed.
    pub(super) hours: Vec<(HourKey, Agg)>,
    /// `results.id` of the last result stored.
    pub(super) last_id: i64,
    pub(super) events: Vec<pb::WatchEvent>,
    pub(super) stored: u64,
    pub(super) duplicates: u64,
    /// What the requests leave behind (results, rows, replaced state), dropped by the dropper
    /// thread so the writer spends no time freeing it.
    pub(super) garbage: Vec<Garbage>,
}

/// Anything the writer hands to the dropper thread.
pub(super) type Garbage = Box<dyn std::any::Any + Send>;

/// Merges `a` into `map[k]`: moved in when `k` is new, else merged and handed back to be dropped.
#[must_use]
pub(super) fn merge_into<K: std::hash::Hash + Eq>(
    map: &mut FxMap<K, Agg>,
    k: K,
    a: Agg,
) -> Option<Agg> {
    match map.entry(k) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(a);
            None
        }
        std::collections::hash_map::Entry::Occupied(mut o) => {
            o.get_mut().merge(&a);
            Some(a)
        }
    }
}

impl Delta {
    pub(super) fn absorb(&mut self, other: Delta) {
        self.ids.absorb(other.ids);
        self.series.extend(other.series);
        if self.hours.is_empty() {
            self.hours = other.hours;
        } else {
            self.hours.extend(other.hours);
        }
        self.last_id = self.last_id.max(other.last_id);
        self.events.extend(other.events);
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.garbage.extend(other.garbage);
    }
}

/// What committed results changed and the writer has not written yet: their rollups (hour and
/// day rows, a day row holding all of its hours; the week rows are derived when written) and
/// the series whose state they changed (the state itself is in `Writer::series`).
#[derive(Default)]
pub(super) struct Buffer {
    pub(super) rows: FxMap<LevelKey, Agg>,
    /// Series whose row in `series` is behind their state in memory.
    pub(super) series: FxSet<i64>,
    /// `results.id` of the last result whose changes are here (or already written).
    pub(super) through_id: i64,
    /// When the oldest change here was made.
    pub(super) since: Option<Instant>,
}

impl Buffer {
    /// Adds committed results' hour aggregates and the series they changed; `last_id` is the
    /// last of those results. An hour no window reads any more (see [`Level::keep_from`]) goes
    /// into its day row only. Returns the aggregates merged into others, to be dropped.
    #[must_use]
    pub(super) fn add(
        &mut self,
        hours: Vec<(HourKey, Agg)>,
        series: impl IntoIterator<Item = i64>,
        last_id: i64,
        now_us: i64,
    ) -> Vec<Agg> {
        self.series.extend(series);
        if last_id > self.through_id {
            self.through_id = last_id;
            self.since.get_or_insert_with(Instant::now);
        }
        let keep = Level::Hour.keep_from(now_us).unwrap_or(i64::MIN);
        self.rows.reserve(hours.len());
        let mut spent = Vec::with_capacity(hours.len());
        for ((bucket, id), a) in hours {
            let day = (Level::Day, Level::Day.bucket(bucket), id);
            if bucket >= keep {
                self.rows.entry(day).or_default().merge(&a);
                spent.extend(merge_into(&mut self.rows, (Level::Hour, bucket, id), a));
            } else {
                spent.extend(merge_into(&mut self.rows, day, a));
            }
        }
        spent
    }

    /// Rollup rows and series rows waiting.
    pub(super) fn len(&self) -> usize {
        self.rows.len() + self.series.len()
    }
}
