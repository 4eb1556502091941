//! Reading an encoded `ProbeResult` in place. The collector's ingest keeps each result of a batch
//! as its bytes (`pb::raw::ResultBatch`) and reads it through [`ResultView`]: borrowed strings, no
//! allocation per field, where decoding into `pb::ProbeResult` allocated about twenty `String`s.
//! Same wire format and the same answers as `pb::ProbeResult::decode` (checked by a test). The
//! stored body is the validated fields only: copied as sent when that is already their canonical
//! encoding (what prost writes), re-encoded otherwise (repeats, unknown fields, padding).

use prost::encoding::{
    decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint, key_len, skip_field,
    DecodeContext, WireType,
};
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
    /// Whether those ranges are exactly the canonical encoding of the fields read (in field
    /// order, each once, no unknown or default-valued fields, shortest varints).
    canonical: bool,
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
        // Canonical so far: body fields in ascending order, the non-repeated ones once, no
        // default value written out, sub-messages canonical themselves.
        let mut canonical = true;
        let mut last_body_tag = 0;
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
                (8, WireType::LengthDelimited) => {
                    v.error_class = text(&mut buf)?;
                    canonical &= !v.error_class.is_empty();
                }
                (9, WireType::LengthDelimited) => {
                    v.phase = text(&mut buf)?;
                    canonical &= !v.phase.is_empty();
                }
                (10, WireType::LengthDelimited) => {
                    let (t, ok) = timing(delimited(&mut buf)?)?;
                    v.timings.push(t);
                    canonical &= ok;
                }
                (11, WireType::LengthDelimited) => {
                    let (f, ok) = fact(delimited(&mut buf)?)?;
                    v.facts.push(f);
                    canonical &= ok;
                }
                (12, WireType::LengthDelimited) => {
                    v.message = text(&mut buf)?;
                    canonical &= !v.message.is_empty();
                }
                (13, WireType::Varint) => {
                    v.interval_ms = decode_varint(&mut buf)?;
                    canonical &= v.interval_ms != 0;
                }
                (1..=13, _) => return Err(ViewError::Invalid("invalid wire type")),
                _ => skip_field(wt, tag, &mut buf, DecodeContext::default())?,
            }
            if BODY_FIELDS.contains(&tag) {
                let repeated = matches!(tag, 10 | 11);
                canonical &= tag > last_body_tag || (tag == last_body_tag && repeated);
                last_body_tag = tag;
                let end = b.len() - buf.len();
                // Adjacent fields extend the last span (one span when encoded in field order).
                match v.body.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => v.body.push(start..end),
                }
            }
        }
        // In order and without repeats, a longer span than the canonical length means padded
        // (overlong) varints.
        v.canonical = canonical && v.sent_len() == v.canonical_len();
        Ok(v)
    }

    /// Appends the encoded fields 8 to 13 (error class, phase, timings, facts, message,
    /// interval): the `ProbeResult` the collector stores as a result's body. It is exactly
    /// `encode()` of those fields as read: the bytes as sent when they already are (what every
    /// prost encoder sends), re-encoded when not, so nothing a reader skips (a repeated field's
    /// earlier values, unknown fields inside a fact) is ever stored.
    pub fn body(&self, out: &mut Vec<u8>) {
        if self.canonical {
            for span in &self.body {
                out.extend_from_slice(&self.src[span.clone()]);
            }
        } else {
            self.encode_body(out);
        }
    }

    /// Length of [`Self::body`].
    pub fn body_len(&self) -> usize {
        if self.canonical {
            self.sent_len()
        } else {
            self.canonical_len()
        }
    }

    fn sent_len(&self) -> usize {
        self.body.iter().map(std::ops::Range::len).sum()
    }

    /// Length of the canonical encoding of fields 8 to 13.
    fn canonical_len(&self) -> usize {
        let text = |tag: u32, s: &str| {
            if s.is_empty() {
                0
            } else {
                delimited_len(tag, s.len())
            }
        };
        let timings: usize = self
            .timings
            .iter()
            .map(|&(phase, micros)| delimited_len(10, timing_len(phase, micros)))
            .sum();
        let facts: usize = self
            .facts
            .iter()
            .map(|f| delimited_len(11, fact_len(f)))
            .sum();
        let interval = if self.interval_ms == 0 {
            0
        } else {
            key_len(13) + encoded_len_varint(self.interval_ms)
        };
        text(8, self.error_class)
            + text(9, self.phase)
            + timings
            + facts
            + text(12, self.message)
            + interval
    }

    /// Writes fields 8 to 13 as prost would.
    fn encode_body(&self, out: &mut Vec<u8>) {
        put_text(8, self.error_class, out);
        put_text(9, self.phase, out);
        for &(phase, micros) in &self.timings {
            encode_key(10, WireType::LengthDelimited, out);
            encode_varint(timing_len(phase, micros) as u64, out);
            put_text(1, phase, out);
            if micros != 0 {
                encode_key(2, WireType::Varint, out);
                encode_varint(micros, out);
            }
        }
        for f in &self.facts {
            encode_key(11, WireType::LengthDelimited, out);
            encode_varint(fact_len(f) as u64, out);
            put_text(1, f.key, out);
            match f.value {
                None => {}
                Some(FactValue::Text(t)) => {
                    // A oneof member is written even when empty.
                    encode_key(2, WireType::LengthDelimited, out);
                    encode_varint(t.len() as u64, out);
                    out.extend_from_slice(t.as_bytes());
                }
                Some(FactValue::Int(i)) => {
                    encode_key(3, WireType::Varint, out);
                    encode_varint(i as u64, out);
                }
                Some(FactValue::Float(x)) => {
                    encode_key(4, WireType::SixtyFourBit, out);
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Some(FactValue::Flag(b)) => {
                    encode_key(5, WireType::Varint, out);
                    encode_varint(u64::from(b), out);
                }
            }
        }
        put_text(12, self.message, out);
        if self.interval_ms != 0 {
            encode_key(13, WireType::Varint, out);
            encode_varint(self.interval_ms, out);
        }
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

/// Encoded length of a length-delimited field of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Writes a non-empty string field (proto3 leaves out empty ones).
fn put_text(tag: u32, s: &str, out: &mut Vec<u8>) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

/// Encoded length of a `PhaseTiming`'s fields.
fn timing_len(phase: &str, micros: u64) -> usize {
    let phase = if phase.is_empty() {
        0
    } else {
        delimited_len(1, phase.len())
    };
    let micros = if micros == 0 {
        0
    } else {
        key_len(2) + encoded_len_varint(micros)
    };
    phase + micros
}

/// Encoded length of a `Fact`'s fields.
fn fact_len(f: &FactView<'_>) -> usize {
    let key = if f.key.is_empty() {
        0
    } else {
        delimited_len(1, f.key.len())
    };
    key + match f.value {
        None => 0,
        Some(FactValue::Text(t)) => delimited_len(2, t.len()),
        Some(FactValue::Int(i)) => key_len(3) + encoded_len_varint(i as u64),
        Some(FactValue::Float(_)) => key_len(4) + 8,
        Some(FactValue::Flag(_)) => key_len(5) + 1,
    }
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

/// A `PhaseTiming`, and whether its encoding is canonical (see [`ResultView::body`]).
fn timing(mut buf: &[u8]) -> Result<((&str, u64), bool), ViewError> {
    let (mut phase, mut micros) = ("", 0);
    let mut canonical = true;
    let mut last = 0;
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        canonical &= tag > last;
        last = tag;
        match (tag, wt) {
            (1, WireType::LengthDelimited) => {
                phase = text(&mut buf)?;
                canonical &= !phase.is_empty();
            }
            (2, WireType::Varint) => {
                micros = decode_varint(&mut buf)?;
                canonical &= micros != 0;
            }
            (1..=2, _) => return Err(ViewError::Invalid("invalid wire type")),
            _ => {
                skip_field(wt, tag, &mut buf, DecodeContext::default())?;
                canonical = false;
            }
        }
    }
    Ok(((phase, micros), canonical))
}

/// A `Fact`, and whether its encoding is canonical (see [`ResultView::body`]).
fn fact(mut buf: &[u8]) -> Result<(FactView<'_>, bool), ViewError> {
    let mut f = FactView {
        key: "",
        value: None,
    };
    // The key first, then at most one value.
    let mut canonical = true;
    let mut last = 0;
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        canonical &= last == 0 || (last == 1 && tag > 1);
        last = tag;
        f.value = match (tag, wt) {
            (1, WireType::LengthDelimited) => {
                f.key = text(&mut buf)?;
                canonical &= !f.key.is_empty();
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
            (5, WireType::Varint) => {
                let v = decode_varint(&mut buf)?;
                canonical &= v <= 1;
                Some(FactValue::Flag(v != 0))
            }
            (1..=5, _) => return Err(ViewError::Invalid("invalid wire type")),
            _ => {
                skip_field(wt, tag, &mut buf, DecodeContext::default())?;
                canonical = false;
                continue;
            }
        };
    }
    Ok((f, canonical))
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
        assert_eq!(body, body_fields(&r).encode_to_vec());
        // Fields out of order (another encoder) give the same body fields, in field order.
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
        assert_eq!(body.len(), v.body_len());
    }

    /// Fields 8 to 13 of `r`: what the collector stores of it.
    fn body_fields(r: &pb::ProbeResult) -> pb::ProbeResult {
        pb::ProbeResult {
            error_class: r.error_class.clone(),
            phase: r.phase.clone(),
            timings: r.timings.clone(),
            facts: r.facts.clone(),
            message: r.message.clone(),
            interval_ms: r.interval_ms,
            ..Default::default()
        }
    }

    fn body_of(bytes: &[u8]) -> Vec<u8> {
        let v = ResultView::parse(bytes).expect("parses");
        let mut body = Vec::new();
        v.body(&mut body);
        assert_eq!(body.len(), v.body_len());
        body
    }

    #[test]
    fn what_a_reader_skips_is_not_stored() {
        let big = "x".repeat(1 << 20);
        // A megabyte message, then the short one a reader keeps (last wins).
        let mut repeated = Vec::new();
        prost::encoding::string::encode(12, &big, &mut repeated);
        prost::encoding::string::encode(12, &"short".to_string(), &mut repeated);
        assert_eq!(body_of(&repeated).len(), 7);
        // A megabyte unknown field inside a fact and a timing.
        let mut fact = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut fact);
        prost::encoding::string::encode(9, &big, &mut fact);
        let mut nested = Vec::new();
        prost::encoding::bytes::encode(11, &fact, &mut nested);
        prost::encoding::bytes::encode(10, &fact, &mut nested);
        let body = body_of(&nested);
        assert!(body.len() < 16, "{} bytes stored", body.len());
        // Overlong varints: interval 5 as ten bytes.
        let padded = [
            13 << 3,
            0x85,
            0x80,
            0x80,
            0x80,
            0x80,
            0x80,
            0x80,
            0x80,
            0x80,
            0x00,
        ];
        assert_eq!(body_of(&padded), [13 << 3, 5]);
        // Unknown top-level fields never reach the body (as before).
        let mut extra = sample().encode_to_vec();
        prost::encoding::string::encode(99, &big, &mut extra);
        assert_eq!(body_of(&extra), body_fields(&sample()).encode_to_vec());
    }

    /// One protobuf field of random tag, wire type and content; sub-messages of fields 10 and
    /// 11 are built the same way, so they hold repeats, unknowns and defaults too.
    fn field(depth: u32) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            (1u32..16, any::<u64>()).prop_map(|(t, v)| {
                let mut b = Vec::new();
                prost::encoding::uint64::encode(t, &v, &mut b);
                b
            }),
            (1u32..16, "[a-z]{0,6}").prop_map(|(t, s)| {
                let mut b = Vec::new();
                prost::encoding::string::encode(t, &s, &mut b);
                b
            }),
            (1u32..6, any::<f64>()).prop_map(|(t, v)| {
                let mut b = Vec::new();
                prost::encoding::double::encode(t, &v, &mut b);
                b
            }),
            // A varint padded to ten bytes.
            (1u32..16, 0u64..128).prop_map(|(t, v)| {
                let mut b = Vec::new();
                encode_key(t, WireType::Varint, &mut b);
                b.push(0x80 | v as u8);
                b.extend_from_slice(&[0x80; 8]);
                b.push(0);
                b
            }),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        prop_oneof![
            4 => leaf,
            1 => (10u32..12, proptest::collection::vec(field(depth - 1), 0..5)).prop_map(|(t, parts)| {
                let mut b = Vec::new();
                prost::encoding::bytes::encode(t, &parts.concat(), &mut b);
                b
            }),
        ]
        .boxed()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// The stored body is exactly the encoding of the validated fields: whatever was sent,
        /// and never longer than what was sent.
        #[test]
        fn stored_body_is_the_encoding_of_what_was_read(
            parts in proptest::collection::vec(field(1), 0..12),
            prefix in proptest::option::of(proptest::strategy::Just(())),
        ) {
            let mut bytes = if prefix.is_some() { sample().encode_to_vec() } else { Vec::new() };
            bytes.extend(parts.concat());
            let decoded = pb::ProbeResult::decode(bytes.as_slice());
            let view = ResultView::parse(&bytes);
            proptest::prop_assert_eq!(decoded.is_ok(), view.is_ok());
            if let (Ok(decoded), Ok(view)) = (decoded, view) {
                let mut body = Vec::new();
                view.body(&mut body);
                proptest::prop_assert_eq!(body.len(), view.body_len());
                proptest::prop_assert_eq!(&body, &body_fields(&decoded).encode_to_vec());
                proptest::prop_assert!(body.len() <= bytes.len());
            };
        }
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
