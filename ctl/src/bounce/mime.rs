//! The MIME walker: headers (unfolded, case-insensitive), nested multiparts and base64 /
//! quoted-printable bodies, flattened to the leaf parts a bounce is read from. Hand-written: the
//! explainer needs only this much of MIME and tolerance for broken bounces (a missing closing
//! boundary, an unknown one), and a full MIME crate (`mail-parser`, `mailparse`) would be a new
//! dependency for ctl; base64 comes from the `base64` crate ctl already uses.

use base64::Engine as _;

/// Nested multiparts followed at most this deep.
const MAX_DEPTH: usize = 8;

/// A non-multipart body part, decoded.
pub(super) struct Leaf {
    /// `type/subtype`, lowercased; `text/plain` when absent.
    pub(super) mime: String,
    pub(super) body: String,
}

/// Splits at the first empty line; a message without one is all headers.
pub(super) fn split_head(text: &str) -> (&str, &str) {
    if text.starts_with('\n') {
        return ("", text.get(1..).unwrap_or_default());
    }
    match text.find("\n\n") {
        Some(pos) => (
            text.get(..pos).unwrap_or_default(),
            text.get(pos + 2..).unwrap_or_default(),
        ),
        None => (text, ""),
    }
}

/// Header fields as (lowercased name, unfolded value); lines that are not fields are skipped.
pub(super) fn parse_headers(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                let more = line.trim();
                if !more.is_empty() {
                    if !value.is_empty() {
                        value.push(' ');
                    }
                    value.push_str(more);
                }
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) {
                out.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    out
}

pub(super) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `type/subtype` lowercased, and the `boundary` parameter if any.
fn content_type(headers: &[(String, String)]) -> (String, Option<String>) {
    let Some(value) = header(headers, "content-type") else {
        return ("text/plain".to_string(), None);
    };
    let mut items = value.split(';');
    let mime = items.next().unwrap_or_default().trim().to_ascii_lowercase();
    let boundary = items.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    });
    let mime = if mime.is_empty() {
        "text/plain".to_string()
    } else {
        mime
    };
    (mime, boundary.filter(|b| !b.is_empty()))
}

pub(super) fn collect_leaves(
    headers: &[(String, String)],
    body: &str,
    depth: usize,
    out: &mut Vec<Leaf>,
) {
    let (mime, boundary) = content_type(headers);
    if mime.starts_with("multipart/") && depth < MAX_DEPTH {
        if let Some(parts) = boundary.as_deref().and_then(|b| split_multipart(body, b)) {
            for part in parts {
                let (head, body) = split_head(part);
                let part_headers = parse_headers(head);
                collect_leaves(&part_headers, body, depth + 1, out);
            }
            return;
        }
    }
    let encoding = header(headers, "content-transfer-encoding")
        .unwrap_or("7bit")
        .to_ascii_lowercase();
    let body = match encoding.trim() {
        "base64" => decode_base64(body),
        "quoted-printable" => decode_quoted_printable(body),
        _ => body.to_string(),
    };
    // a multipart without a usable boundary is read as text
    let mime = if mime.starts_with("multipart/") {
        "text/plain".to_string()
    } else {
        mime
    };
    out.push(Leaf { mime, body });
}

/// The parts between `--boundary` lines, up to `--boundary--`; `None` if no delimiter occurs.
fn split_multipart<'a>(body: &'a str, boundary: &str) -> Option<Vec<&'a str>> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut offset: usize = 0;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if let Some(rest) = trimmed.strip_prefix(delimiter.as_str()) {
            let closing = rest.starts_with("--");
            if rest.is_empty() || closing {
                if let Some(s) = start {
                    // the newline before a delimiter belongs to the delimiter
                    let end = offset.saturating_sub(1).max(s);
                    parts.push(body.get(s..end).unwrap_or_default());
                }
                if closing {
                    return Some(parts);
                }
                start = Some(offset + line.len());
            }
        }
        offset += line.len();
    }
    let s = start?;
    parts.push(body.get(s..).unwrap_or_default());
    Some(parts)
}

fn decode_base64(body: &str) -> String {
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => body.to_string(),
    }
}

fn decode_quoted_printable(body: &str) -> String {
    let mut out = Vec::with_capacity(body.len());
    let bytes = body.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        // soft line break: `=` then optional trailing whitespace then newline
        let mut j = i + 1;
        while matches!(bytes.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        if bytes.get(j) == Some(&b'\n') {
            i = j + 1;
            continue;
        }
        let hex = |x: Option<&u8>| x.and_then(|c| (*c as char).to_digit(16));
        match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            _ => {
                out.push(b'=');
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_printable_decoding() {
        assert_eq!(
            decode_quoted_printable("recipien=\nt's =3D ok=20\n"),
            "recipient's = ok \n"
        );
        assert_eq!(
            decode_quoted_printable("bad =ZZ and end ="),
            "bad =ZZ and end ="
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(s in "\\PC*") {
            let _ = decode_quoted_printable(&s);
            let _ = decode_base64(&s);
        }
    }
}
