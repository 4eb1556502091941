//! Reading an encoded `ProbeResult` in place. The collector's ingest keeps each result of a batch
//! as its bytes (`pb::raw::ResultBatch`) and reads it through [`ResultView`]: borrowed strings, no
//! allocation per field, where decoding into `pb::ProbeResult` allocated about twenty `String`s.
//! Same wire format and the same answers as `pb::ProbeResult::decode` (checked by a test).

use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::DecodeError;
use smallvec::SmallVec;

use crate::pb;

/// Why an encoded result could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Invalid(&'static str),
}

/// The endpoint of a [`ResultView`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointView<'a> {
    pub host: &'a str,
    pub ip: &'a str,
    pub port: u32,
    pub family: i32,
}

/// The value of a [`FactView`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FactValue<'a> {
    Text(&'a str),
    Int(i64),
    Float(f64),
    Flag(bool),
}

/// One fact of a [`ResultView`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactView<'a> {
    pub key: &'a str,
    pub value: Option<FactValue<'a>>,
}

impl FactView<'_> {
    pub fn to_fact(&self) -> pb::Fact {
        pb::Fact {
            key: self.key.to_string(),
            value: self.value.map(|v| match v {
                FactValue::Text(t) => pb::fact::Value::Text(t.to_string()),
                FactValue::Int(i) => pb::fact::Value::Int(i),
                FactValue::Float(f) => pb::fact::Value::Float(f),
                FactValue::Flag(b) => pb::fact::Value::Flag(b),
            }),
        }
    }
}

/// A `ProbeResult` read in place from its encoding (fields as in `pb::ProbeResult`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultView<'a> {
    pub agent_id: &'a str,
    pub seq: u64,
    pub target: &'a str,
    pub endpoint: Option<EndpointView<'a>>,
    pub check: &'a str,
    pub start_us: i64,
    pub outcome: i32,
    pub error_class: &'a str,
    pub phase: &'a str,
    pub timings: SmallVec<[(&'a str, u64); 12]>,
    pub facts: SmallVec<[FactView<'a>; 6]>,
    pub message: &'a str,
    pub interval_ms: u64,
    /// The encoding read.
    src: &'a [u8],
    /// Byte ranges in `src` of the fields 8 to 13 (error class to interval), in their order;
    /// see [`Self::body`].
    body: SmallVec<[std::ops::Range<usize>; 2]>,
}

/// Field numbers of `ProbeResult` that [`ResultView::body`] keeps.
const BODY_FIELDS: std::ops::RangeInclusive<u32> = 8..=13;

impl<'a> ResultView<'a> {
    /// Reads `b`, an encoded `pb::ProbeResult`; fails where `pb::ProbeResult::decode` fails.
    pub fn parse(b: &'a [u8]) -> Result<ResultView<'a>, ViewError> {
        let mut v = ResultView {
            src: b,
            ..Default::default()
        };
        let mut buf = b;
        while !buf.is_empty() {
            let start = b.len() - buf.len();
            let (tag, wt) = decode_key(&mut buf)?;
            match (tag, wt) {
                (1, WireType::LengthDelimited) => v.agent_id = text(&mut buf)?,
                (2, WireType::Varint) => v.seq = decode_varint(&mut buf)?,
                (3, WireType::LengthDelimited) => v.target = text(&mut buf)?,
                (4, WireType::LengthDelimited) => {
                    let e = v.endpoint.get_or_insert_with(EndpointView::default);
                    endpoint(delimited(&mut buf)?, e)?;
                }
                (5, WireType::LengthDelimited) => v.check = text(&mut buf)?,
                (6, WireType::Varint) => v.start_us = decode_varint(&mut buf)? as i64,
                (7, WireType::Varint) => v.outcome = decode_varint(&mut buf)? as i32,
                (8, WireType::LengthDelimited) => v.error_class = text(&mut buf)?,
                (9, WireType::LengthDelimited) => v.phase = text(&mut buf)?,
                (10, WireType::LengthDelimited) => v.timings.push(timing(delimited(&mut buf)?)?),
                (11, WireType::LengthDelimited) => v.facts.push(fact(delimited(&mut buf)?)?),
                (12, WireType::LengthDelimited) => v.message = text(&mut buf)?,
                (13, WireType::Varint) => v.interval_ms = decode_varint(&mut buf)?,
                (1..=13, _) => return Err(ViewError::Invalid("invalid wire type")),
                _ => skip_field(wt, tag, &mut buf, DecodeContext::default())?,
            }
            if BODY_FIELDS.contains(&tag) {
                let end = b.len() - buf.len();
                // Adjacent fields extend the last span (one span when encoded in field order).
                match v.body.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => v.body.push(start..end),
                }
            }
        }
        Ok(v)
    }

    /// Appends the encoded fields 8 to 13 (error class, phase, timings, facts, message,
    /// interval): the `ProbeResult` the collector stores as a result's body, copied as sent.
    pub fn body(&self, out: &mut Vec<u8>) {
        for span in &self.body {
            out.extend_from_slice(&self.src[span.clone()]);
        }
    }

    /// Length of [`Self::body`].
    pub fn body_len(&self) -> usize {
        self.body.iter().map(std::ops::Range::len).sum()
    }

    /// The result as an owned `pb::ProbeResult`.
    pub fn to_result(&self) -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: self.agent_id.to_string(),
            seq: self.seq,
            target: self.target.to_string(),
            endpoint: self.endpoint.map(|e| pb::Endpoint {
                host: e.host.to_string(),
                ip: e.ip.to_string(),
                port: e.port,
                family: e.family,
            }),
            check: self.check.to_string(),
            start_us: self.start_us,
            outcome: self.outcome,
            error_class: self.error_class.to_string(),
            phase: self.phase.to_string(),
            timings: self
                .timings
                .iter()
                .map(|&(phase, micros)| pb::PhaseTiming {
                    phase: phase.to_string(),
                    micros,
                })
                .collect(),
            facts: self.facts.iter().map(FactView::to_fact).collect(),
            message: self.message.to_string(),
            interval_ms: self.interval_ms,
        }
    }
}

/// A length-delimited field's bytes.
fn delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], ViewError> {
    let len = decode_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= buf.len())
        .ok_or(ViewError::Invalid("buffer underflow"))?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

/// A string field (UTF-8 checked, as prost does).
fn text<'a>(buf: &mut &'a [u8]) -> Result<&'a str, ViewError> {
    std::str::from_utf8(delimited(buf)?)
        .map_err(|_| ViewError::Invalid("invalid string value: data is not UTF-8 encoded"))
}

fn endpoint<'a>(mut buf: &'a [u8], e: &mut EndpointView<'a>) -> Result<(), ViewError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match (tag, wt) {
            (1, WireType::LengthDelimited) => e.host = text(&mut buf)?,
            (2, WireType::LengthDelimited) => e.ip = text(&mut buf)?,
            (3, WireType::Varint) => e.port = decode_varint(&mut buf)? as u32,
            (4, WireType::Varint) => e.family = decode_varint(&mut buf)? as i32,
            (1..=4, _) => return Err(ViewError::Invalid("invalid wire type")),
            _ => skip_field(wt, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(())
}

fn timing(mut buf: &[u8]) -> Result<(&str, u64), ViewError> {
    let (mut phase, mut micros) = ("", 0);
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match (tag, wt) {
            (1, WireType::LengthDelimited) => phase = text(&mut buf)?,
            (2, WireType::Varint) => micros = decode_varint(&mut buf)?,
            (1..=2, _) => return Err(ViewError::Invalid("invalid wire type")),
            _ => skip_field(wt, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok((phase, micros))
}

fn fact(mut buf: &[u8]) -> Result<FactView<'_>, ViewError> {
    let mut f = FactView {
        key: "",
        value: None,
    };
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        f.value = match (tag, wt) {
            (1, WireType::LengthDelimited) => {
                f.key = text(&mut buf)?;
                continue;
            }
            (2, WireType::LengthDelimited) => Some(FactValue::Text(text(&mut buf)?)),
            (3, WireType::Varint) => Some(FactValue::Int(decode_varint(&mut buf)? as i64)),
            (4, WireType::SixtyFourBit) => {
                let Some((bits, rest)) = buf.split_first_chunk::<8>() else {
                    return Err(ViewError::Invalid("buffer underflow"));
                };
                buf = rest;
                Some(FactValue::Float(f64::from_le_bytes(*bits)))
            }
            (5, WireType::Varint) => Some(FactValue::Flag(decode_varint(&mut buf)? != 0)),
            (1..=5, _) => return Err(ViewError::Invalid("invalid wire type")),
            _ => {
                skip_field(wt, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
        };
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sample() -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: "agent-1".into(),
            seq: 42,
            target: "example.test".into(),
            endpoint: Some(pb::Endpoint {
                host: "mx1.example.test".into(),
                ip: "198.18.0.25".into(),
                port: 25,
                family: pb::AddressFamily::Ipv4 as i32,
            }),
            check: "smtp".into(),
            start_us: 1_764_000_000_000_000,
            outcome: pb::Outcome::Fail as i32,
            error_class: "timeout".into(),
            phase: "banner".into(),
            timings: vec![
                pb::PhaseTiming {
                    phase: "connect".into(),
                    micros: 1_234,
                },
                pb::PhaseTiming {
                    phase: "total".into(),
                    micros: 10_000_000,
                },
            ],
            facts: vec![
                pb::Fact {
                    key: "tls_version".into(),
                    value: Some(pb::fact::Value::Text("TLSv1.3".into())),
                },
                pb::Fact {
                    key: "smtp.reply_code".into(),
                    value: Some(pb::fact::Value::Int(-421)),
                },
                pb::Fact {
                    key: "ratio".into(),
                    value: Some(pb::fact::Value::Float(0.25)),
                },
                pb::Fact {
                    key: "starttls".into(),
                    value: Some(pb::fact::Value::Flag(true)),
                },
                pb::Fact {
                    key: "none".into(),
                    value: None,
                },
            ],
            message: "no banner within 10s".into(),
            interval_ms: 60_000,
        }
    }

    #[test]
    fn view_reads_what_prost_decodes() {
        let r = sample();
        let bytes = r.encode_to_vec();
        let v = ResultView::parse(&bytes).expect("parses");
        assert_eq!(v.to_result(), r);
        assert_eq!(
            v.timings.as_slice(),
            &[("connect", 1_234), ("total", 10_000_000)]
        );
        // A negative start (before 1970) and outcome survive as prost reads them.
        let odd = pb::ProbeResult {
            start_us: -5,
            outcome: -1,
            ..Default::default()
        };
        let bytes = odd.encode_to_vec();
        assert_eq!(ResultView::parse(&bytes).unwrap().to_result(), odd);
    }

    #[test]
    fn body_is_the_stored_fields_as_encoded() {
        let r = sample();
        let bytes = r.encode_to_vec();
        let v = ResultView::parse(&bytes).unwrap();
        assert_eq!(v.body.len(), 1, "fields in order: one span");
        let mut body = Vec::new();
        v.body(&mut body);
        let back = pb::ProbeResult::decode(body.as_slice()).unwrap();
        assert_eq!(
            back,
            pb::ProbeResult {
                agent_id: String::new(),
                seq: 0,
                target: String::new(),
                endpoint: None,
                check: String::new(),
                start_us: 0,
                outcome: 0,
                ..r.clone()
            }
        );
        // Fields out of order (another encoder) give the same body fields, in two spans.
        let mut shuffled = Vec::new();
        prost::encoding::string::encode(12, &r.message, &mut shuffled);
        prost::encoding::string::encode(1, &r.agent_id, &mut shuffled);
        prost::encoding::string::encode(8, &r.error_class, &mut shuffled);
        let v = ResultView::parse(&shuffled).unwrap();
        assert_eq!(v.body.len(), 2);
        let mut body = Vec::new();
        v.body(&mut body);
        let back = pb::ProbeResult::decode(body.as_slice()).unwrap();
        assert_eq!((back.message, back.error_class), (r.message, r.error_class));
        assert_eq!(back.agent_id, "");
    }

    #[test]
    fn bad_input_fails_like_prost() {
        let bytes = sample().encode_to_vec();
        for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
            let part = &bytes[..cut];
            assert_eq!(
                ResultView::parse(part).is_err(),
                pb::ProbeResult::decode(part).is_err(),
                "cut at {cut}"
            );
        }
        // Not UTF-8 in a string field.
        let mut bad = Vec::new();
        prost::encoding::bytes::encode(3, &vec![0xff, 0xfe], &mut bad);
        assert!(ResultView::parse(&bad).is_err());
        assert!(pb::ProbeResult::decode(bad.as_slice()).is_err());
        // A string field sent as a varint.
        let mut wrong = Vec::new();
        prost::encoding::uint64::encode(3, &7, &mut wrong);
        assert!(ResultView::parse(&wrong).is_err());
        assert!(pb::ProbeResult::decode(wrong.as_slice()).is_err());
        // Unknown fields are skipped.
        let mut extra = sample().encode_to_vec();
        prost::encoding::string::encode(99, &"later".to_string(), &mut extra);
        assert_eq!(ResultView::parse(&extra).unwrap().to_result(), sample());
    }
}
