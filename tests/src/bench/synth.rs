//! Synthetic results shaped like real `smtp` STARTTLS probes: `targets` targets probed from each
//! agent's region, one slot after another, timestamps spread evenly from `start_us` over `span_us`.
//! The same generator feeds the gRPC agents and the raw SQLite baseline, so both store equal rows.

use mxscope_proto::pb;

/// Regions of the synthetic fleet (one agent per region in the 10M-row run).
pub(crate) const REGIONS: [&str; 10] = [
    "eu-west",
    "eu-central",
    "us-east",
    "us-west",
    "sa-east",
    "ap-south",
    "ap-east",
    "ap-north",
    "af-south",
    "me-central",
];

/// Name of synthetic target `i`.
pub(crate) fn target_name(i: usize) -> String {
    format!("t{i:04}.bench.test")
}

/// What one agent produces.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub agent_id: String,
    pub region_index: usize,
    pub targets: usize,
    /// Results this agent sends in total.
    pub total: u64,
    pub start_us: i64,
    pub span_us: i64,
}

/// Yields the agent's results in seq order.
#[derive(Debug)]
pub(crate) struct Generator {
    shape: Shape,
    names: Vec<String>,
    hosts: Vec<String>,
    ips: Vec<String>,
    next_seq: u64,
    step_us: i64,
}

impl Generator {
    pub(crate) fn new(shape: Shape) -> Generator {
        let names: Vec<String> = (0..shape.targets).map(target_name).collect();
        let hosts = names.iter().map(|n| format!("mx1.{n}")).collect();
        let ips = (0..shape.targets)
            .map(|i| format!("198.18.{}.{}", 100 + i / 250, 1 + i % 250))
            .collect();
        let step_us = (shape.span_us / shape.total.max(1) as i64).max(1);
        Generator {
            shape,
            names,
            hosts,
            ips,
            next_seq: 1,
            step_us,
        }
    }

    /// The next result, `None` after `total`.
    pub(crate) fn next_result(&mut self) -> Option<pb::ProbeResult> {
        let seq = self.next_seq;
        if seq > self.shape.total {
            return None;
        }
        self.next_seq += 1;
        let i = (seq - 1) as usize;
        let t = i % self.shape.targets.max(1);
        // Cheap deterministic noise: splitmix of seq and region.
        let mut h = seq
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(self.shape.region_index as u64);
        h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 29;
        let rtt = 5_000 + 15_000 * self.shape.region_index as u64 + h % 3_000;
        let failed = h % 100 < 2;
        let start_us = self.shape.start_us + (seq as i64 - 1) * self.step_us;
        let mut timings = vec![pb::PhaseTiming {
            phase: "connect".into(),
            micros: rtt,
        }];
        let (outcome, error_class, phase, message, facts) = if failed {
            timings.push(pb::PhaseTiming {
                phase: "total".into(),
                micros: 10_000_000,
            });
            (
                pb::Outcome::Fail,
                "timeout".to_string(),
                "banner".to_string(),
                "no banner within 10s".to_string(),
                Vec::new(),
            )
        } else {
            for (phase, n) in [
                ("banner", 1),
                ("ehlo", 1),
                ("starttls", 1),
                ("tls", 2),
                // The EHLO after STARTTLS: the agent records it as a second `ehlo`.
                ("ehlo", 1),
                ("quit", 1),
            ] {
                timings.push(pb::PhaseTiming {
                    phase: phase.into(),
                    micros: rtt * n + h % 500,
                });
            }
            timings.push(pb::PhaseTiming {
                phase: "total".into(),
                micros: rtt * 8 + h % 4_000,
            });
            let facts = vec![
                pb::Fact {
                    key: "tls_version".into(),
                    value: Some(pb::fact::Value::Text("TLSv1.3".into())),
                },
                pb::Fact {
                    key: "cert_days_left".into(),
                    value: Some(pb::fact::Value::Int(60 + (h % 30) as i64)),
                },
                pb::Fact {
                    key: "starttls".into(),
                    value: Some(pb::fact::Value::Flag(true)),
                },
            ];
            (
                pb::Outcome::Ok,
                String::new(),
                String::new(),
                "221 2.0.0 Bye".to_string(),
                facts,
            )
        };
        Some(pb::ProbeResult {
            agent_id: self.shape.agent_id.clone(),
            seq,
            target: self.names[t].clone(),
            endpoint: Some(pb::Endpoint {
                host: self.hosts[t].clone(),
                ip: self.ips[t].clone(),
                port: 25,
                family: pb::AddressFamily::Ipv4 as i32,
            }),
            check: "smtp".into(),
            start_us,
            outcome: outcome as i32,
            error_class,
            phase,
            timings,
            facts,
            message,
            interval_ms: 60_000,
        })
    }

    /// Up to `n` next results.
    pub(crate) fn batch(&mut self, n: usize) -> Vec<pb::ProbeResult> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_result() {
                Some(r) => out.push(r),
                None => break,
            }
        }
        out
    }
}

/// Shapes for `agents` agents sending `total` results between them over `span_us` ending now.
pub(crate) fn fleet(
    prefix: &str,
    agents: usize,
    targets: usize,
    total: u64,
    span_us: i64,
) -> Vec<Shape> {
    let now = super::sys::now_us();
    let per = total / agents.max(1) as u64;
    (0..agents)
        .map(|i| Shape {
            agent_id: format!("{prefix}-{i}"),
            region_index: i % REGIONS.len(),
            targets,
            total: per,
            start_us: now - span_us,
            span_us,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_yields_total_results_in_seq_order_within_the_span() {
        let shape = Shape {
            agent_id: "a".into(),
            region_index: 3,
            targets: 7,
            total: 50,
            start_us: 1_000_000,
            span_us: 5_000,
        };
        let mut g = Generator::new(shape);
        let all = g.batch(1000);
        assert_eq!(all.len(), 50);
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert!(all
            .iter()
            .all(|r| r.start_us >= 1_000_000 && r.start_us < 1_005_000));
        let targets: std::collections::BTreeSet<_> = all.iter().map(|r| r.target.clone()).collect();
        assert_eq!(targets.len(), 7);
        assert!(g.next_result().is_none());
    }
}
