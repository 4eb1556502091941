//! SMTP TLS reporting (RFC 8460): the `_smtp._tls` TXT record, `v=TLSRPTv1` and the `rua`
//! destinations (`mailto:` or `https:`) that receive daily TLS failure reports.

use thiserror::Error;

use super::{tag_list, TagItem};

/// Where reports go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportUri {
    /// The address after `mailto:`.
    Mailto(String),
    /// The full `https://` URL.
    Https(String),
}

/// A parsed TLS-RPT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRptRecord {
    pub rua: Vec<ReportUri>,
    /// Extension fields, as (name, value).
    pub extensions: Vec<(String, String)>,
}

/// Why a TXT string is not a usable TLS-RPT record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TlsRptError {
    #[error("record does not start with v=TLSRPTv1")]
    NotTlsRpt,
    #[error("no rua field")]
    MissingRua,
    #[error("invalid rua uri {uri:?}")]
    BadUri { uri: String },
    #[error("malformed field {field:?}")]
    Malformed { field: String },
    #[error("no v=TLSRPTv1 record")]
    NoRecord,
    #[error("{count} v=TLSRPTv1 records")]
    MultipleRecords { count: usize },
}

fn is_tlsrpt(items: &[TagItem<'_>]) -> bool {
    matches!(items.first(), Some(TagItem::Pair("v", "TLSRPTv1")))
}

/// Parses one `_smtp._tls` TXT string (§3).
pub fn parse(record: &str) -> Result<TlsRptRecord, TlsRptError> {
    let items = tag_list(record);
    if !is_tlsrpt(&items) {
        return Err(TlsRptError::NotTlsRpt);
    }
    let mut rua = None;
    let mut extensions = Vec::new();
    for item in items.iter().skip(1) {
        match item {
            TagItem::Pair("rua", value) => {
                let uris = value
                    .split(',')
                    .map(|u| parse_uri(u.trim()))
                    .collect::<Result<Vec<_>, _>>()?;
                rua.get_or_insert(uris);
            }
            TagItem::Pair(name, value)
                if !value.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
            {
                extensions.push((name.to_string(), value.to_string()));
            }
            TagItem::Pair(name, value) => {
                return Err(TlsRptError::Malformed {
                    field: format!("{name}={value}"),
                })
            }
            TagItem::Malformed(raw) => {
                return Err(TlsRptError::Malformed {
                    field: raw.to_string(),
                })
            }
        }
    }
    let rua = rua.ok_or(TlsRptError::MissingRua)?;
    Ok(TlsRptRecord { rua, extensions })
}

/// Picks and parses the one `v=TLSRPTv1` record among a name's TXT strings.
pub fn select(txt_records: &[String]) -> Result<TlsRptRecord, TlsRptError> {
    let candidates: Vec<&String> = txt_records
        .iter()
        .filter(|t| is_tlsrpt(&tag_list(t)))
        .collect();
    match candidates.as_slice() {
        [] => Err(TlsRptError::NoRecord),
        [one] => parse(one),
        more => Err(TlsRptError::MultipleRecords { count: more.len() }),
    }
}

fn parse_uri(uri: &str) -> Result<ReportUri, TlsRptError> {
    let bad = || TlsRptError::BadUri {
        uri: uri.to_string(),
    };
    if uri.is_empty() || !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    let (scheme, rest) = uri.split_once(':').ok_or_else(bad)?;
    if scheme.eq_ignore_ascii_case("mailto") {
        let (local, domain) = rest.split_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(bad());
        }
        Ok(ReportUri::Mailto(rest.to_string()))
    } else if scheme.eq_ignore_ascii_case("https") {
        let host = rest.strip_prefix("//").ok_or_else(bad)?;
        let host = host.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ReportUri::Https(uri.to_string()))
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mailto_and_https_destinations() {
        let r = parse(
            "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.net/v1/tlsrpt",
        )
        .expect("valid");
        assert_eq!(
            r.rua,
            vec![
                ReportUri::Mailto("tlsrpt@example.com".into()),
                ReportUri::Https("https://reports.example.net/v1/tlsrpt".into()),
            ]
        );
        let r = parse("v=TLSRPTv1;rua=mailto:a@example.com;ext=1").expect("valid");
        assert_eq!(r.extensions, vec![("ext".to_string(), "1".to_string())]);
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(
            parse("rua=mailto:a@example.com; v=TLSRPTv1"),
            Err(TlsRptError::NotTlsRpt)
        );
        assert_eq!(
            parse("v=TLSRPTv2; rua=mailto:a@example.com"),
            Err(TlsRptError::NotTlsRpt)
        );
        assert_eq!(parse("v=TLSRPTv1"), Err(TlsRptError::MissingRua));
        assert_eq!(
            parse("v=TLSRPTv1; rua=http://example.com/r"),
            Err(TlsRptError::BadUri {
                uri: "http://example.com/r".into()
            })
        );
        assert_eq!(
            parse("v=TLSRPTv1; rua=mailto:nobody"),
            Err(TlsRptError::BadUri {
                uri: "mailto:nobody".into()
            })
        );
        assert_eq!(
            parse("v=TLSRPTv1; rua=https:///x"),
            Err(TlsRptError::BadUri {
                uri: "https:///x".into()
            })
        );
        assert_eq!(
            parse("v=TLSRPTv1; rua="),
            Err(TlsRptError::BadUri { uri: String::new() })
        );
        assert!(matches!(
            parse("v=TLSRPTv1; rua=mailto:a@example.com; junk"),
            Err(TlsRptError::Malformed { .. })
        ));
    }

    #[test]
    fn selects_exactly_one_record() {
        let txt = vec![
            "v=spf1 -all".to_string(),
            "v=TLSRPTv1; rua=mailto:a@example.com".to_string(),
        ];
        assert!(select(&txt).is_ok());
        assert_eq!(select(&txt[..1]), Err(TlsRptError::NoRecord));
        let two = vec![txt[1].clone(), txt[1].clone()];
        assert_eq!(select(&two), Err(TlsRptError::MultipleRecords { count: 2 }));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(&s);
            let _ = parse(&format!("v=TLSRPTv1; rua={s}"));
        }
    }
}
