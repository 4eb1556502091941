//! SPF macro expansion (RFC 7208 §7) for `check_host()`: `%{s}`, `%{d}`, `%{i}` and friends with
//! their digit, reverse and delimiter transformers, URL escaping for upper-case letters, and the
//! `c`, `r`, `t` letters that only explanation text may use.

use std::net::{IpAddr, Ipv6Addr};

use super::canonical;
use super::record::is_macro_string;

/// What macros expand to.
pub(crate) struct MacroContext<'a> {
    pub(crate) ip: IpAddr,
    /// `%{s}`: the sender, `local@domain`.
    pub(crate) sender: &'a str,
    /// `%{l}`: the local part (`postmaster` when MAIL FROM had none).
    pub(crate) local: &'a str,
    /// `%{o}`: the sender's domain.
    pub(crate) sender_domain: &'a str,
    /// `%{d}`: the domain being checked.
    pub(crate) domain: &'a str,
    /// `%{h}`: the HELO name.
    pub(crate) helo: &'a str,
    /// `%{p}`: the validated name of the address, if the caller looked it up.
    pub(crate) validated: Option<&'a str>,
    /// `%{t}`: seconds since the epoch.
    pub(crate) now: u64,
}

/// Where an expanded string goes: a domain-spec (no `c`, `r`, `t`) or explanation text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    Domain,
    Explanation,
}

/// Expands the macros of §7; `None` on bad syntax or a letter not allowed for `use_`.
pub(crate) fn expand_macros(spec: &str, ctx: &MacroContext<'_>, use_: Use) -> Option<String> {
    if !is_macro_string(spec, use_ == Use::Explanation) {
        return None;
    }
    let mut out = String::new();
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '%' => out.push('%'),
            '_' => out.push(' '),
            '-' => out.push_str("%20"),
            '{' => {
                let letter = chars.next()?;
                let mut body = String::new();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    body.push(c);
                }
                let value = macro_value(letter.to_ascii_lowercase(), ctx)?;
                let value = transform(&value, &body)?;
                if letter.is_ascii_uppercase() {
                    out.push_str(&url_escape(&value));
                } else {
                    out.push_str(&value);
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Cuts an expanded domain name to 253 characters by dropping labels on the left (§7.3).
pub(crate) fn truncate_domain(name: String) -> String {
    let mut rest = name.as_str();
    while rest.trim_end_matches('.').len() > 253 {
        match rest.split_once('.') {
            Some((_, r)) => rest = r,
            None => break,
        }
    }
    rest.to_string()
}

/// `%{p}` and `%{c}` need the address in text; `%{i}` in its dotted form.
fn macro_value(letter: char, ctx: &MacroContext<'_>) -> Option<String> {
    let ip = canonical(ctx.ip);
    Some(match letter {
        's' => ctx.sender.to_string(),
        'l' => ctx.local.to_string(),
        'o' => ctx.sender_domain.to_string(),
        'h' => ctx.helo.to_string(),
        'd' => ctx.domain.to_string(),
        'i' => match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => nibbles(&v6).join("."),
        },
        'v' => if ip.is_ipv4() { "in-addr" } else { "ip6" }.to_string(),
        'p' => ctx.validated.unwrap_or("unknown").to_string(),
        'c' => ip.to_string(),
        // the receiving host's name: not known to a checker outside the MTA
        'r' => "unknown".to_string(),
        't' => ctx.now.to_string(),
        _ => return None,
    })
}

/// Applies `[digits][r][delimiters]` to a macro value (§7.3).
fn transform(value: &str, body: &str) -> Option<String> {
    let digits: String = body.chars().take_while(char::is_ascii_digit).collect();
    let rest = body.get(digits.len()..)?;
    let (reverse, delims) = match rest.strip_prefix(['r', 'R']) {
        Some(d) => (true, d),
        None => (false, rest),
    };
    let delims = if delims.is_empty() { "." } else { delims };
    let mut parts: Vec<&str> = value.split(|c| delims.contains(c)).collect();
    if reverse {
        parts.reverse();
    }
    if !digits.is_empty() {
        let keep: usize = digits.parse().ok()?;
        if keep == 0 {
            return None;
        }
        let skip = parts.len().saturating_sub(keep);
        parts.drain(..skip);
    }
    Some(parts.join("."))
}

/// RFC 3986 escaping of everything but the unreserved characters (§7.3, upper-case macros).
fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The nibbles of an IPv6 address, most significant first, as RFC 7208 §7.4 writes them.
fn nibbles(v6: &Ipv6Addr) -> Vec<String> {
    v6.octets()
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .map(|n| format!("{n:X}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::testing::ip;

    fn ctx(addr: &str) -> MacroContext<'static> {
        MacroContext {
            ip: ip(addr),
            sender: "strong-bad@email.example.com",
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            helo: "mx.example.org",
            validated: None,
            now: 1_700_000_000,
        }
    }

    #[test]
    fn rfc_7208_section_7_4_examples() {
        let c = ctx("192.0.2.3");
        let cases = [
            ("%{s}", "strong-bad@email.example.com"),
            ("%{o}", "email.example.com"),
            ("%{d}", "email.example.com"),
            ("%{d4}", "email.example.com"),
            ("%{d3}", "email.example.com"),
            ("%{d2}", "example.com"),
            ("%{d1}", "com"),
            ("%{dr}", "com.example.email"),
            ("%{d2r}", "example.email"),
            ("%{l}", "strong-bad"),
            ("%{l-}", "strong.bad"),
            ("%{lr}", "strong-bad"),
            ("%{lr-}", "bad.strong"),
            ("%{l1r-}", "strong"),
            (
                "%{ir}.%{v}._spf.%{d2}",
                "3.2.0.192.in-addr._spf.example.com",
            ),
            ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
            (
                "%{d2}.trusted-domains.example.net",
                "example.com.trusted-domains.example.net",
            ),
            ("%{s}%%%_%-", "strong-bad@email.example.com% %20"),
        ];
        assert!(!cases.is_empty());
        for (spec, want) in cases {
            assert_eq!(
                expand_macros(spec, &c, Use::Domain).as_deref(),
                Some(want),
                "{spec}"
            );
        }
        let c6 = ctx("2001:db8::cb01");
        assert_eq!(
            expand_macros("%{ir}.%{v}._spf.%{d2}", &c6, Use::Domain).as_deref(),
            Some("1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2.ip6._spf.example.com")
        );
    }

    #[test]
    fn explanation_letters_and_escaping() {
        let c = ctx("2001:db8::cb01");
        assert_eq!(expand_macros("%{c}", &c, Use::Domain), None);
        assert_eq!(
            expand_macros("%{c} %{r} %{t}", &c, Use::Explanation).as_deref(),
            Some("2001:db8::cb01 unknown 1700000000")
        );
        assert_eq!(
            expand_macros("%{S}", &c, Use::Explanation).as_deref(),
            Some("strong-bad%40email.example.com")
        );
        assert_eq!(expand_macros("%{d0}", &c, Use::Domain), None);
        assert_eq!(
            expand_macros("%{p}", &c, Use::Domain).as_deref(),
            Some("unknown")
        );
    }

    #[test]
    fn long_names_lose_labels_on_the_left() {
        let long = format!("{}.example.com", ["abcdefghij"; 30].join("."));
        let cut = truncate_domain(long);
        assert!(cut.len() <= 253 && cut.ends_with(".example.com"), "{cut}");
        assert!(cut.starts_with("abcdefghij."));
    }

    proptest::proptest! {
        #[test]
        fn expand_never_panics(s in "\\PC{0,40}") {
            let mut c = ctx("127.0.0.1");
            c.ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let _ = expand_macros(&s, &c, Use::Domain);
            let _ = expand_macros(&s, &c, Use::Explanation);
        }
    }
}
