//! The fact keys probes write and the analysis reads (`cert.days_left`, `mx.0.host`): one
//! typed name per fact, so writer and reader cannot drift apart. Values stay typed in
//! [`crate::FactValue`]; a key family with an index or a name has a function that builds it.

/// The address an endpoint observation was made against.
pub mod address {
    /// `ipv4` or `ipv6`.
    pub const FAMILY: &str = "address.family";
    /// The address (or failed lookup) came from expanding a mail domain through its MX records
    /// (or its implicit MX): port 25 of it is judged as mail delivery.
    pub const VIA_MX: &str = "address.via_mx";

    /// True when a result's fact `key` (a flag `value`, or any value for the MX preference) marks
    /// its endpoint as one of a domain's MX expansion.
    pub fn marks_mx_expansion(key: &str, flag: Option<bool>) -> bool {
        match key {
            VIA_MX | super::mx::IMPLICIT | super::mx::NULL => flag == Some(true),
            super::mx::PREFERENCE => true,
            _ => false,
        }
    }
}

/// About the result itself.
pub mod result {
    /// Set when the agent cut the result to fit [`crate::limits`].
    pub const TRUNCATED: &str = "result.truncated";
}

/// The leaf certificate a TLS handshake presented.
pub mod cert {
    /// Subjects of the intermediate certificates the server sent (` | ` between them), when any.
    pub const CHAIN: &str = "cert.chain";
    /// How many intermediate certificates the server sent.
    pub const CHAIN_LEN: &str = "cert.chain_len";
    pub const DAYS_LEFT: &str = "cert.days_left";
    pub const ERROR: &str = "cert.error";
    pub const ISSUER: &str = "cert.issuer";
    pub const NAME_MATCH: &str = "cert.name_match";
    pub const NOT_AFTER: &str = "cert.not_after";
    pub const NOT_AFTER_UNIX: &str = "cert.not_after_unix";
    pub const SUBJECT: &str = "cert.subject";
    pub const VERIFIED: &str = "cert.verified";
    pub const SHA256: &str = "cert.sha256";
}

/// DANE TLSA lookups (RFC 7672).
pub mod dane {
    pub const DNSSEC: &str = "dane.dnssec";
    pub const PRESENT: &str = "dane.present";

    /// Field names for [`nth`] and [`address`].
    pub mod field {
        pub const HOST: &str = "host";
        pub const PRESENT: &str = "present";
        pub const TLSA: &str = "tlsa";
        /// Per address, for [`address`](super::address).
        pub const MATCH: &str = "match";
        pub const MATCHED: &str = "matched";
    }

    /// A fact of the `i`-th MX host's TLSA look-up: `dane.0.host`, `dane.0.tlsa`.
    pub fn nth(i: usize, field: &str) -> String {
        format!("dane.{i}.{field}")
    }

    /// The match of one address of the `i`-th MX host: `dane.0.192.0.2.1.match`.
    pub fn address(i: usize, ip: &str, field: &str) -> String {
        format!("dane.{i}.{ip}.{field}")
    }
}

/// A delivery round trip: submit, then read back over IMAP.
pub mod delivery {
    pub const AUTH_MECHANISM: &str = "delivery.auth_mechanism";
    pub const CREDENTIALS: &str = "delivery.credentials";
    pub const IMAPS_PORT: &str = "delivery.imaps_port";
    pub const LAST_SMTP_REPLY: &str = "delivery.last_smtp_reply";
    pub const SUBMIT_US: &str = "delivery.submit_us";
    pub const TAG: &str = "delivery.tag";
}

/// DKIM key records (RFC 6376).
pub mod dkim {
    pub const SELECTORS: &str = "dkim.selectors";

    /// Field names for [`selector`].
    pub mod field {
        pub const BITS: &str = "bits";
        pub const ERROR: &str = "error";
        pub const FINDINGS: &str = "findings";
        pub const KEY_TYPE: &str = "key_type";
        pub const OUTCOME: &str = "outcome";
        pub const REVOKED: &str = "revoked";
    }

    /// A fact of one selector's key: `dkim.s1.bits`.
    pub fn selector(sel: &str, field: &str) -> String {
        format!("dkim.{sel}.{field}")
    }
}

/// The DMARC record (RFC 7489).
pub mod dmarc {
    pub const ADKIM: &str = "dmarc.adkim";
    pub const ASPF: &str = "dmarc.aspf";
    pub const FINDINGS: &str = "dmarc.findings";
    pub const P: &str = "dmarc.p";
    pub const PCT: &str = "dmarc.pct";
    pub const RECORD: &str = "dmarc.record";
    pub const RUA: &str = "dmarc.rua";
    pub const RUA_COUNT: &str = "dmarc.rua_count";
    pub const RUF_COUNT: &str = "dmarc.ruf_count";
    pub const SP: &str = "dmarc.sp";
}

/// DNS blocklist look-ups of the MX addresses.
pub mod dnsbl {
    pub const ADDRESSES: &str = "dnsbl.addresses";
    pub const ERRORS: &str = "dnsbl.errors";
    pub const LISTED: &str = "dnsbl.listed";
    pub const ZONES: &str = "dnsbl.zones";

    /// The verdict of one (zone, address) look-up, `listed`, `not_listed` or `error`:
    /// `dnsbl.zen.example.192.0.2.1`.
    pub fn entry(zone: &str, ip: &str) -> String {
        format!("dnsbl.{zone}.{ip}")
    }

    /// A detail of one (zone, address) look-up: `dnsbl.zen.example.192.0.2.1.codes`.
    pub fn listing(zone: &str, ip: &str, field: &str) -> String {
        format!("dnsbl.{zone}.{ip}.{field}")
    }

    /// Field names for [`listing`].
    pub mod field {
        pub const ANSWER: &str = "answer";
        pub const CODES: &str = "codes";
        pub const ERROR: &str = "error";
        pub const REASON: &str = "reason";
    }
}

/// ICMP echo rounds.
pub mod icmp {
    pub const LOSS: &str = "icmp.loss";
    pub const PERMITTED: &str = "icmp.permitted";
    pub const RECEIVED: &str = "icmp.received";
    pub const RTT_AVG_MS: &str = "icmp.rtt_avg_ms";
    pub const RTT_MAX_MS: &str = "icmp.rtt_max_ms";
    pub const RTT_MIN_MS: &str = "icmp.rtt_min_ms";
    pub const SENT: &str = "icmp.sent";
}

/// The IMAP greeting and capabilities.
pub mod imap {
    pub const GREETING: &str = "imap.greeting";
    pub const PREAUTH: &str = "imap.preauth";
    /// Delivery's read-back over IMAP: login time, polls until the message showed, its UID.
    pub const LOGIN_US: &str = "imap.login_us";
    pub const POLLS: &str = "imap.polls";
    pub const UID: &str = "imap.uid";
    pub const DELETED: &str = "imap.deleted";
    /// Capability keys: `imap.` before STARTTLS, `imap.tls.` after it.
    pub const PREFIX: &str = "imap.";
    pub const TLS_PREFIX: &str = "imap.tls.";

    /// A capability (or other) fact under `prefix`: `imap.tls.auth`.
    pub fn under(prefix: &str, name: &str) -> String {
        format!("{prefix}{name}")
    }

    /// How long a phase of the read-back took: `imap.connect_us`.
    pub fn phase_us(phase: crate::Phase) -> String {
        format!("imap.{phase}_us")
    }
}

/// Endpoint expansion: what the agent's fan-out caps left out.
pub mod endpoints {
    pub const ADDRESSES_DROPPED: &str = "endpoints.addresses_dropped";
    pub const MX_HOSTS_DROPPED: &str = "endpoints.mx_hosts_dropped";
}

/// The MTA-STS policy (RFC 8461).
pub mod mta_sts {
    pub const CONTENT_TYPE: &str = "mta_sts.content_type";
    pub const HTTP_STATUS: &str = "mta_sts.http_status";
    pub const ID: &str = "mta_sts.id";
    pub const MAX_AGE: &str = "mta_sts.max_age";
    pub const MODE: &str = "mta_sts.mode";
    pub const MX: &str = "mta_sts.mx";
    pub const MX_HOSTS: &str = "mta_sts.mx_hosts";
    pub const MX_UNCOVERED: &str = "mta_sts.mx_uncovered";
    pub const POLICY_BYTES: &str = "mta_sts.policy_bytes";
    pub const POLICY_RESOLVE_US: &str = "mta_sts.policy_resolve_us";
}

/// The MX expansion of a mail domain.
pub mod mx {
    pub const COUNT: &str = "mx.count";
    pub const HOSTS: &str = "mx.hosts";
    pub const IMPLICIT: &str = "mx.implicit";
    pub const IPV4_COUNT: &str = "mx.ipv4_count";
    pub const IPV6_COUNT: &str = "mx.ipv6_count";
    pub const NULL: &str = "mx.null";
    pub const PREFERENCE: &str = "mx.preference";
    /// The serial of the domain's SOA record, when the domain is a zone apex.
    pub const SOA_SERIAL: &str = "mx.soa_serial";
    pub const TTL: &str = "mx.ttl";

    /// A fact of the `i`-th MX host (by preference): `mx.0.host`, `mx.1.addrs`.
    pub fn nth(i: usize, field: &str) -> String {
        format!("mx.{i}.{field}")
    }

    /// Field names for [`nth`].
    pub mod field {
        pub const HOST: &str = "host";
        pub const PREFERENCE: &str = "preference";
        pub const ADDRS: &str = "addrs";
        pub const CNAME: &str = "cname";
        pub const ERROR: &str = "error";
        pub const FCRDNS: &str = "fcrdns";
        pub const IP_LITERAL: &str = "ip_literal";
        pub const IPV4: &str = "ipv4";
        pub const IPV6: &str = "ipv6";
        pub const PTR: &str = "ptr";
        pub const TTL: &str = "ttl";
    }
}

/// The POP3 greeting and capabilities.
pub mod pop3 {
    pub const CAPA: &str = "pop3.capa";
    pub const CAPABILITIES: &str = "pop3.capabilities";
    pub const GREETING: &str = "pop3.greeting";
    pub const SASL: &str = "pop3.sasl";
    pub const STLS: &str = "pop3.stls";
    pub const USER: &str = "pop3.user";
    pub const TLS_CAPA_US: &str = "pop3.tls.capa_us";
    pub const TLS_CAPABILITIES: &str = "pop3.tls.capabilities";
    pub const TLS_SASL: &str = "pop3.tls.sasl";
    pub const TLS_USER: &str = "pop3.tls.user";
}

/// The local Postfix queue.
pub mod queue {
    pub const ACTIVE: &str = "queue.active";
    pub const BAD_LINES: &str = "queue.bad_lines";
    pub const BYTES: &str = "queue.bytes";
    pub const DEFERRAL_DOMAINS: &str = "queue.deferral_domains";
    pub const DEFERRED: &str = "queue.deferred";
    pub const HOLD: &str = "queue.hold";
    pub const INCOMING: &str = "queue.incoming";
    pub const MAILDROP: &str = "queue.maildrop";
    pub const MESSAGES: &str = "queue.messages";
    pub const OLDEST_AGE_S: &str = "queue.oldest_age_s";
    pub const OLDEST_ID: &str = "queue.oldest_id";

    /// The `i`-th deferral group: `queue.deferral.0.domain`, `queue.deferral.0.count`.
    pub fn deferral(i: usize, field: &str) -> String {
        format!("queue.deferral.{i}.{field}")
    }

    /// Field names for [`deferral`].
    pub mod field {
        pub const COUNT: &str = "count";
        pub const DOMAIN: &str = "domain";
        pub const REASON: &str = "reason";
    }
}

/// The SMTP dialogue.
pub mod smtp {
    pub const AUTH_AFTER_TLS: &str = "smtp.auth_after_tls";
    pub const AUTH_BEFORE_TLS: &str = "smtp.auth_before_tls";
    pub const BANNER: &str = "smtp.banner";
    pub const BANNER_CODE: &str = "smtp.banner_code";
    pub const QUIT_CODE: &str = "smtp.quit_code";
    pub const TLS_EXTENSIONS: &str = "smtp.tls.extensions";
    /// EHLO keyword keys: `smtp.` before STARTTLS, `smtp.tls.` after it.
    pub const PREFIX: &str = "smtp.";
    pub const TLS_PREFIX: &str = "smtp.tls.";
    /// The MAIL FROM and RCPT TO steps, for [`step`].
    pub const MAIL: &str = "smtp.mail";
    pub const RCPT: &str = "smtp.rcpt";

    /// An EHLO fact under `prefix`: `smtp.starttls`, `smtp.tls.auth`.
    pub fn under(prefix: &str, name: &str) -> String {
        format!("{prefix}{name}")
    }

    /// The reply to a dialogue step: `smtp.rcpt.code`, `smtp.rcpt.enhanced`, `smtp.rcpt.text`.
    pub fn step(step: &str, field: &str) -> String {
        format!("{step}.{field}")
    }

    /// Field names for [`step`].
    pub mod field {
        pub const CODE: &str = "code";
        pub const ENHANCED: &str = "enhanced";
        pub const TEXT: &str = "text";
    }
}

/// The SPF record and its evaluation (RFC 7208).
pub mod spf {
    pub const ALL: &str = "spf.all";
    pub const INCLUDES: &str = "spf.includes";
    pub const ISSUES: &str = "spf.issues";
    pub const LOOKUP_LIMIT: &str = "spf.lookup_limit";
    pub const LOOKUPS: &str = "spf.lookups";
    pub const MX_ADDRESSES: &str = "spf.mx_addresses";
    pub const MX_UNAUTHORISED: &str = "spf.mx_unauthorised";
    pub const PLUS_ALL: &str = "spf.plus_all";
    pub const RECORD: &str = "spf.record";
    pub const RECORDS: &str = "spf.records";
    /// How many configured outbound addresses (`spf_senders`) do not get `pass`.
    pub const SENDERS_UNAUTHORISED: &str = "spf.senders_unauthorised";
    pub const VALID: &str = "spf.valid";
    pub const VOID_LOOKUPS: &str = "spf.void_lookups";

    /// Whether one MX address passes SPF: `spf.mx.192.0.2.1`.
    pub fn mx_address(ip: &str) -> String {
        format!("spf.mx.{ip}")
    }

    /// The result for one configured outbound address (`spf_senders`): `spf.sender.192.0.2.1`.
    pub fn sender_address(ip: &str) -> String {
        format!("spf.sender.{ip}")
    }
}

/// The negotiated TLS session.
pub mod tls {
    pub const ALPN: &str = "tls.alpn";
    pub const IMPLICIT: &str = "tls.implicit";
    pub const SNI: &str = "tls.sni";
    pub const VERSION: &str = "tls.version";
    pub const CIPHER: &str = "tls.cipher";
}

/// The TLS-RPT record (RFC 8460).
pub mod tlsrpt {
    pub const RUA: &str = "tlsrpt.rua";
    pub const RUA_COUNT: &str = "tlsrpt.rua_count";
}
