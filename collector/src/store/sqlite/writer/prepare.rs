//! Batch preparation: the per-result work that needs no database (row encoding, the batch's
//! series, its hour aggregates), done on the ingest task before the batch reaches the writer.

use super::*;

/// The per-result work on a batch of results that needs no database: row encoding (store::row),
/// the batch's distinct series, and its hour aggregates. Built by [`Prepared::of`] in the ingest
/// session's task (on a tokio worker, beside the writer's thread), so the writer only resolves
/// series ids, binds, steps and merges.
pub(crate) struct Prepared {
    /// The batch's region (the agent's).
    pub(super) region: String,
    /// Distinct series of the batch: its id when the directory knows it, else its key and the
    /// endpoint parts a new `series` row records.
    pub(super) series: Vec<SeriesRef>,
    /// Per result: its index into `series`, its row and its interval.
    pub(super) rows: Vec<(u32, ResultRow, u64)>,
    /// Hour aggregates of all results by (bucket, index into `series`); the writer uses them
    /// when every result of the batch is stored (no duplicate), else it aggregates what it stored.
    pub(super) hours: Vec<(i64, u32, Agg)>,
    /// Seqs strictly ascending: then "the first seq is above the mark" means "no duplicate".
    pub(super) ascending: bool,
}

/// A series of a batch: known by id, or to be looked up (and maybe created) by the writer.
pub(super) enum SeriesRef {
    Known(i64),
    New(SeriesKey, EndpointParts),
}

impl Prepared {
    /// `dir` gives the ids of the series the writer committed already: those need no key.
    pub(crate) fn of(region: &str, results: &[ResultView<'_>], dir: &SeriesDir) -> Prepared {
        // The label is a function of host, ip and port: with target and check they name the
        // series (the region is the batch's), so the label is made once per series, not per result.
        let mut index: FxMap<Ident<'_>, u32> =
            FxMap::with_capacity_and_hasher(results.len(), Default::default());
        let mut series: Vec<SeriesRef> = Vec::new();
        let mut rows = Vec::with_capacity(results.len());
        let mut hours: FxMap<(i64, u32), Agg> =
            FxMap::with_capacity_and_hasher(results.len(), Default::default());
        for r in results {
            let e = r.endpoint.as_ref();
            let ident = Ident {
                region,
                target: r.target,
                check: r.check,
                host: e.map_or(r.target, |e| e.host),
                ip: e.map_or("", |e| e.ip),
                port: e.map_or(0, |e| e.port),
            };
            let k = *index.entry(ident).or_insert_with(|| {
                series.push(match dir.get(ident) {
                    Some(id) => SeriesRef::Known(id),
                    None => {
                        let parts = EndpointParts::of(r);
                        let key = SeriesKey {
                            target: r.target.to_string(),
                            endpoint: endpoint_label(r),
                            check: r.check.to_string(),
                            region: region.to_string(),
                        };
                        SeriesRef::New(key, parts)
                    }
                });
                (series.len() - 1) as u32
            });
            hours
                .entry((Level::Hour.bucket(r.start_us), k))
                .or_default()
                .add_view(r);
            rows.push((k, ResultRow::of_view(r), r.interval_ms));
        }
        let ascending = results.windows(2).all(|w| w[0].seq < w[1].seq);
        Prepared {
            region: region.to_string(),
            series,
            rows,
            hours: hours.into_iter().map(|((b, k), a)| (b, k, a)).collect(),
            ascending,
        }
    }
}

/// The parts of a result's endpoint, kept once per series.
#[derive(Debug, Clone, Default)]
pub(super) struct EndpointParts {
    pub(super) host: String,
    pub(super) ip: String,
    pub(super) port: i64,
    pub(super) family: i32,
}

impl EndpointParts {
    pub(super) fn of(r: &ResultView<'_>) -> EndpointParts {
        match &r.endpoint {
            Some(e) => EndpointParts {
                host: e.host.to_string(),
                ip: e.ip.to_string(),
                port: i64::from(e.port),
                family: e.family,
            },
            None => EndpointParts {
                host: r.target.to_string(),
                ..Default::default()
            },
        }
    }
}
