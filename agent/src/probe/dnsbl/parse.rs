//! DNS blocklists (RFC 5782): the query name for an address in a list's zone, and what the
//! A answers mean: listed (127.0.0.0/8 return codes), not listed, or an error of the list itself.

use std::net::{IpAddr, Ipv4Addr};

/// `<reversed address>.<zone>`: octets for IPv4, nibbles for IPv6 (RFC 5782 §2.1, §2.4).
/// IPv4-mapped IPv6 addresses are queried as IPv4.
pub(crate) fn reverse_query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_matches('.');
    let reversed = match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut nibbles: Vec<String> = v6
                .octets()
                .iter()
                .flat_map(|b| [b >> 4, b & 0x0f])
                .map(|n| format!("{n:x}"))
                .collect();
            nibbles.reverse();
            nibbles.join(".")
        }
        other => {
            let v4 = match other {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
    };
    format!("{reversed}.{zone}")
}

/// Why the list's answer cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ListErrorKind {
    /// 127.255.255.252: typing error in the list name or unsupported query (Spamhaus).
    BadQuery,
    /// 127.255.255.254: query through a public/open resolver, which the list refuses.
    PublicResolver,
    /// 127.255.255.255: excessive number of queries.
    RateLimited,
    /// Another 127.255.255.x code.
    OtherListCode,
    /// 127.0.0.1 is never a listing (RFC 5782 §5): a broken or wildcarded list.
    Loopback,
    /// An answer outside 127.0.0.0/8: the zone is wildcarded, parked or gone.
    NotLoopback,
}

/// What a blocklist answered for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DnsblAnswer {
    /// Return codes in 127.0.0.0/8, sorted (e.g. 127.0.0.2 = SBL, 127.0.0.4 = XBL at Spamhaus).
    Listed {
        codes: Vec<Ipv4Addr>,
    },
    NotListed,
    /// The list answered in a way that is not a verdict on the address.
    ListError {
        kind: ListErrorKind,
        answer: IpAddr,
    },
}

impl DnsblAnswer {
    #[cfg(test)]
    pub(crate) fn is_listed(&self) -> bool {
        matches!(self, DnsblAnswer::Listed { .. })
    }
}

fn error_kind(ip: IpAddr) -> Option<ListErrorKind> {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => return Some(ListErrorKind::NotLoopback),
    };
    match v4.octets() {
        [127, 255, 255, 252] => Some(ListErrorKind::BadQuery),
        [127, 255, 255, 254] => Some(ListErrorKind::PublicResolver),
        [127, 255, 255, 255] => Some(ListErrorKind::RateLimited),
        [127, 255, 255, _] => Some(ListErrorKind::OtherListCode),
        [127, 0, 0, 1] => Some(ListErrorKind::Loopback),
        [127, ..] => None,
        _ => Some(ListErrorKind::NotLoopback),
    }
}

/// Classifies the A records answered for a query name; no records (NXDOMAIN) is not listed.
/// Any error code wins over listing codes, since the list's answers are then unreliable.
pub(crate) fn classify_answer(addrs: &[IpAddr]) -> DnsblAnswer {
    if let Some((kind, answer)) = addrs.iter().find_map(|a| error_kind(*a).map(|k| (k, *a))) {
        return DnsblAnswer::ListError { kind, answer };
    }
    let mut codes: Vec<Ipv4Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    codes.sort();
    codes.dedup();
    if codes.is_empty() {
        DnsblAnswer::NotListed
    } else {
        DnsblAnswer::Listed { codes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().expect("test address")).collect()
    }

    #[test]
    fn reverses_ipv4_octets() {
        let ip: IpAddr = "192.0.2.99".parse().expect("v4");
        assert_eq!(
            reverse_query_name(ip, "zen.spamhaus.org"),
            "99.2.0.192.zen.spamhaus.org"
        );
        assert_eq!(
            reverse_query_name(ip, "bl.example.test."),
            "99.2.0.192.bl.example.test"
        );
        let mapped: IpAddr = "::ffff:192.0.2.99".parse().expect("v6");
        assert_eq!(
            reverse_query_name(mapped, "bl.example"),
            "99.2.0.192.bl.example"
        );
    }

    #[test]
    fn reverses_ipv6_nibbles() {
        // RFC 5782 §2.4 example
        let ip: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().expect("v6");
        assert_eq!(
            reverse_query_name(ip, "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
        );
    }

    #[test]
    fn nxdomain_is_not_listed() {
        assert_eq!(classify_answer(&[]), DnsblAnswer::NotListed);
        assert!(!classify_answer(&[]).is_listed());
    }

    #[test]
    fn loopback_codes_are_listings() {
        let a = classify_answer(&ips(&["127.0.0.4", "127.0.0.2", "127.0.0.4"]));
        assert_eq!(
            a,
            DnsblAnswer::Listed {
                codes: vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 4)]
            }
        );
        assert!(a.is_listed());
        assert!(classify_answer(&ips(&["127.0.1.2"])).is_listed());
    }

    #[test]
    fn spamhaus_error_codes_are_errors_of_the_list() {
        let cases = [
            ("127.255.255.254", ListErrorKind::PublicResolver),
            ("127.255.255.252", ListErrorKind::BadQuery),
            ("127.255.255.255", ListErrorKind::RateLimited),
            ("127.255.255.250", ListErrorKind::OtherListCode),
            ("127.0.0.1", ListErrorKind::Loopback),
            ("203.0.113.7", ListErrorKind::NotLoopback),
            ("::1", ListErrorKind::NotLoopback),
        ];
        for (answer, kind) in cases {
            let got = classify_answer(&ips(&[answer]));
            assert_eq!(
                got,
                DnsblAnswer::ListError {
                    kind,
                    answer: answer.parse().expect("ip")
                },
                "{answer}"
            );
            assert!(!got.is_listed());
        }
        // an error code next to a listing code still makes the answer unreliable
        let got = classify_answer(&ips(&["127.0.0.2", "127.255.255.254"]));
        assert!(matches!(
            got,
            DnsblAnswer::ListError {
                kind: ListErrorKind::PublicResolver,
                ..
            }
        ));
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(raw in proptest::collection::vec(proptest::num::u32::ANY, 0..6), zone in "\\PC{0,30}") {
            let addrs: Vec<IpAddr> = raw.iter().map(|n| IpAddr::V4(Ipv4Addr::from(*n))).collect();
            let _ = classify_answer(&addrs);
            for a in &addrs {
                let name = reverse_query_name(*a, &zone);
                proptest::prop_assert!(name.ends_with(zone.trim_matches('.')));
            }
        }
    }
}
