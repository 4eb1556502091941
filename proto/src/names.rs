//! Names users and agents give: agent ids, regions and admin names (DNS labels), host and domain
//! names, and target names (a domain name or an IP literal). The one place these rules live.

use std::net::IpAddr;

/// Longest DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest domain name in text form (without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;

/// A DNS-label style name: 1-63 lowercase letters, digits and inner hyphens (`eu-west`, `agent-1`).
/// Agent ids, regions and admin or reader names follow it.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What [`is_label`] asks for, for messages.
pub const LABEL_RULE: &str = "1-63 lowercase letters, digits and inner hyphens";

/// A label of a host or domain name: letters, digits, inner hyphens and underscores (as in
/// `_dmarc` and DKIM selectors), 1-63 bytes.
pub fn is_name_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= MAX_LABEL_LEN
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A host or domain name: dot-separated [`is_name_label`] labels, at most 253 characters, the
/// last label not all digits (so `192.0.2.300` is not a name). One trailing dot is allowed.
pub fn is_domain_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return false;
    }
    s.split('.').all(is_name_label)
        && s.rsplit('.')
            .next()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// A DNS name below a zone that need not be a host name (DKIM selectors, DNSBL zones): dot-separated
/// [`is_name_label`] labels, at most 253 characters; an all-digit last label is fine.
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.split('.').all(is_name_label)
}

/// The canonical form of a domain name: trimmed, lowercase, without the trailing dot.
pub fn normalize_domain(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// An IP literal as users write it: `192.0.2.1`, `2001:db8::1` or `[2001:db8::1]`.
pub fn parse_ip_literal(s: &str) -> Option<IpAddr> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    inner.parse().ok()
}

/// A target name: a domain name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetName {
    Domain(String),
    Ip(IpAddr),
}

impl TargetName {
    /// Reads a target name as users type it; `None` when it is neither a name nor an address.
    pub fn parse(s: &str) -> Option<TargetName> {
        let s = s.trim();
        match parse_ip_literal(s) {
            Some(ip) => Some(TargetName::Ip(ip)),
            None if is_domain_name(s) => Some(TargetName::Domain(normalize_domain(s))),
            None => None,
        }
    }

    /// The canonical text form: the lowercase name without trailing dot, or the address.
    pub fn canonical(&self) -> String {
        match self {
            TargetName::Domain(d) => d.clone(),
            TargetName::Ip(ip) => ip.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "eu-west", "agent-1", "0", &"a".repeat(63)] {
            assert!(is_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_label(bad), "{bad}");
        }
    }

    #[test]
    fn domain_names() {
        for ok in [
            "example.com",
            "example.com.",
            "_dmarc.example.com",
            "x",
            "mx-1.a.b",
        ] {
            assert!(is_domain_name(ok), "{ok}");
        }
        let long = format!("{}.com", "a".repeat(250));
        for bad in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "192.0.2.1",
            "a b",
            &long,
            "a.123",
        ] {
            assert!(!is_domain_name(bad), "{bad}");
        }
        assert!(is_dns_name("2.0.0.127.zen.example"));
        assert!(is_dns_name("1.2"));
        assert!(!is_dns_name("a..b"));
    }

    #[test]
    fn target_names() {
        assert_eq!(
            TargetName::parse(" Example.COM. ").map(|t| t.canonical()),
            Some("example.com".into())
        );
        assert_eq!(
            TargetName::parse("[2001:db8::1]").map(|t| t.canonical()),
            Some("2001:db8::1".into())
        );
        assert_eq!(TargetName::parse("not a name"), None);
        assert_eq!(TargetName::parse("192.0.2.300"), None);
    }
}
