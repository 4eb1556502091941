//! SPF macro expansion (RFC 7208 §7) for `check_host()`: `%{s}`, `%{d}`, `%{i}` and friends with
//! their digit, reverse and delimiter transformers. `exp` text macros (`c`, `r`, `t`) are refused.

use std::net::{IpAddr, Ipv6Addr};

use super::canonical;
use super::record::is_macro_string;

/// What macros expand to: the client address, the domain being checked and the sender's domain.
pub(super) struct MacroContext<'a> {
    pub(super) ip: IpAddr,
    pub(super) domain: &'a str,
    pub(super) sender_domain: &'a str,
}

/// Expands the macros of §7 for a sender `postmaster@<sender_domain>`; `None` on bad syntax.
pub(super) fn expand_macros(spec: &str, ctx: &MacroContext<'_>) -> Option<String> {
    if !is_macro_string(spec) {
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
                let letter = chars.next()?.to_ascii_lowercase();
                let mut body = String::new();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    body.push(c);
                }
                let value = macro_value(letter, ctx)?;
                out.push_str(&transform(&value, &body)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn macro_value(letter: char, ctx: &MacroContext<'_>) -> Option<String> {
    Some(match letter {
        's' => format!("postmaster@{}", ctx.sender_domain),
        'l' => "postmaster".to_string(),
        'o' | 'h' => ctx.sender_domain.to_string(),
        'd' => ctx.domain.to_string(),
        'i' => match canonical(ctx.ip) {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => nibbles(&v6).join("."),
        },
        'v' => if ctx.ip.is_ipv4() || canonical(ctx.ip).is_ipv4() {
            "in-addr"
        } else {
            "ip6"
        }
        .to_string(),
        'p' => "unknown".to_string(),
        // c, r, t are only allowed in exp text, which this module does not expand
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

fn nibbles(v6: &Ipv6Addr) -> Vec<String> {
    v6.octets()
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .map(|n| format!("{n:x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::probe::spf::testing::ip;

    #[test]
    fn macro_transformers() {
        let ctx = MacroContext {
            ip: ip("192.0.2.3"),
            domain: "a.b.example.com",
            sender_domain: "example.com",
        };
        assert_eq!(expand_macros("%{d2}", &ctx).as_deref(), Some("example.com"));
        assert_eq!(
            expand_macros("%{dr}", &ctx).as_deref(),
            Some("com.example.b.a")
        );
        assert_eq!(
            expand_macros("%{ir}.%{l}.%{o}", &ctx).as_deref(),
            Some("3.2.0.192.postmaster.example.com")
        );
        assert_eq!(
            expand_macros("%{s}%%%_%-", &ctx).as_deref(),
            Some("postmaster@example.com% %20")
        );
        assert_eq!(expand_macros("%{d0}", &ctx), None);
        assert_eq!(expand_macros("%{c}", &ctx), None);
        let ctx6 = MacroContext {
            ip: ip("2001:db8::cb01"),
            domain: "example.com",
            sender_domain: "example.com",
        };
        assert_eq!(
            expand_macros("%{i}", &ctx6).as_deref(),
            Some("2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.b.0.1")
        );
        assert_eq!(expand_macros("%{v}", &ctx6).as_deref(), Some("ip6"));
    }

    proptest::proptest! {
        #[test]
        fn expand_never_panics(s in "\\PC{0,40}") {
            let ctx = MacroContext { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), domain: "example.com", sender_domain: "example.com" };
            let _ = expand_macros(&s, &ctx);
        }
    }
}
