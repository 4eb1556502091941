//! Mail policy records: pure parsers and evaluators for DMARC, DKIM keys, MTA-STS and TLS-RPT
//! (SPF, which also walks DNS, has its own module, `probe::spf`). No I/O here: records come in as
//! already-fetched strings, so every rule is unit tested.

pub mod dkim;
pub mod dmarc;
pub mod mtasts;
pub mod tlsrpt;

/// How a policy check grades what it found: the proto outcome (a worse outcome is greater).
pub use mxscope_proto::Outcome;

/// One `name=value` item of a tag list (DKIM, DMARC, MTA-STS and TLS-RPT records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagItem<'a> {
    Pair(&'a str, &'a str),
    /// An item without `=` or with an empty name, as written (trimmed).
    Malformed(&'a str),
}

/// Splits `tag=value; tag=value` into trimmed items; empty items (`;;`, a trailing `;`) are
/// dropped. Whitespace around names and values (including folded CRLF) is not significant.
pub(crate) fn tag_list(record: &str) -> Vec<TagItem<'_>> {
    record
        .split(';')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => {
                TagItem::Pair(name.trim(), value.trim())
            }
            _ => TagItem::Malformed(item),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_list_trims_and_flags_malformed_items() {
        let items = tag_list(" v = DMARC1 ;p=reject;; bogus ; =x;\r\n\tpct= 50 ;");
        assert_eq!(
            items,
            vec![
                TagItem::Pair("v", "DMARC1"),
                TagItem::Pair("p", "reject"),
                TagItem::Malformed("bogus"),
                TagItem::Malformed("=x"),
                TagItem::Pair("pct", "50"),
            ]
        );
        assert!(tag_list("").is_empty());
        assert_eq!(Outcome::Warn.max(Outcome::Fail), Outcome::Fail);
        assert_eq!(Outcome::Ok.max(Outcome::Warn), Outcome::Warn);
    }
}
