//! `mxscopectl token create|list|revoke`: enrolment tokens kept by the collector (only their
//! hash), with which an agent gets its certificate in one command (`mxscope-agent --enroll`).
//! Admin certificate only; the collector must sign online (`--ca-key`).

use std::io::Write;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use mxscope_proto::pb;

use crate::args;
use crate::cli::print;
use crate::client::Client;
use crate::output::{self, Cell, Column, Format, Report};

/// `mxscopectl token …`.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token for one region (and an agent id or id prefix); printed once, never again.
    Create(CreateArgs),
    /// List the tokens: id, region, id or prefix, expiry, uses left, state.
    List,
    /// Revoke a token by its id (certificates it gave stay valid: revoke those by serial).
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("who").args(["id", "id_prefix"])))]
pub(crate) struct CreateArgs {
    /// Region the agent's certificate is bound to.
    #[arg(long, value_parser = args::agent_id)]
    pub region: String,
    /// The agent id its certificate gets (exactly this one).
    #[arg(long, value_parser = args::agent_id)]
    pub id: Option<String>,
    /// Ids the agent may choose must start with this [default: REGION-].
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// How long the token can be used.
    #[arg(long, default_value = "1h", value_parser = args::duration)]
    pub ttl: Duration,
    /// How many agents may enrol with it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub uses: u32,
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// The token's id (the first column of `token list`).
    pub id: String,
}

pub(crate) async fn run(
    client: &mut Client,
    cmd: TokenCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let now = mxscope_proto::time::now_us();
    match cmd {
        TokenCommand::Create(a) => {
            let req = pb::CreateTokenRequest {
                region: a.region,
                agent_id: a.id.unwrap_or_default(),
                id_prefix: a.id_prefix.unwrap_or_default(),
                ttl_ms: u64::try_from(a.ttl.as_millis()).unwrap_or(u64::MAX),
                uses: a.uses,
            };
            let t = client.call(|c| c.create_token(req)).await?;
            if format == Format::Table {
                writeln!(out, "{}", t.token)?;
                eprintln!(
                    "token {} for region {} ({}), {} use{}, expires {}; CA sha256 {}\n\
                     start the agent with: mxscope-agent --enroll TOKEN --collector URL --state-dir DIR",
                    t.id,
                    t.region,
                    who(&t),
                    t.uses,
                    if t.uses == 1 { "" } else { "s" },
                    output::timestamp_seconds(t.expires_us).unwrap_or_default(),
                    t.ca_fingerprint
                );
                return Ok(());
            }
            report(std::slice::from_ref(&t), now, true).render_one(format, out)?;
            Ok(())
        }
        TokenCommand::List => {
            let resp = client
                .call(|c| c.list_tokens(pb::ListTokensRequest {}))
                .await?;
            print(
                &report(&resp.tokens, now, false),
                format,
                out,
                "no enrolment tokens (create one with 'mxscopectl token create --region R')",
            )
        }
        TokenCommand::Revoke(a) => {
            let t = client
                .call(|c| c.revoke_token(pb::RevokeTokenRequest { id: a.id }))
                .await?;
            if format == Format::Table {
                writeln!(out, "token {} ({}, {}) is revoked", t.id, t.region, who(&t))?;
                return Ok(());
            }
            report(std::slice::from_ref(&t), now, false).render_one(format, out)?;
            Ok(())
        }
    }
}

/// "agent id eu-1" or "ids eu-*".
fn who(t: &pb::TokenInfo) -> String {
    if t.agent_id.is_empty() {
        format!("ids {}*", t.id_prefix)
    } else {
        format!("agent id {}", t.agent_id)
    }
}

fn report(tokens: &[pb::TokenInfo], now_us: i64, with_secret: bool) -> Report {
    let mut columns = Vec::new();
    if with_secret {
        columns.push(Column::text("token", "TOKEN"));
    }
    columns.extend([
        Column::text("id", "ID"),
        Column::text("region", "REGION"),
        Column::text("agent_id", "AGENT ID"),
        Column::text("id_prefix", "ID PREFIX"),
        Column::text("state", "STATE"),
        Column::number("uses", "USES"),
        Column::number("uses_left", "LEFT"),
        Column::text("expires", "EXPIRES"),
        Column::text("created", "CREATED"),
        Column::text("ca_fingerprint", "CA SHA256").cut(16),
    ]);
    let mut r = Report::new(columns);
    for t in tokens {
        let mut row = Vec::new();
        if with_secret {
            row.push(Cell::new(t.token.as_str()));
        }
        row.extend([
            Cell::new(t.id.as_str()),
            Cell::new(t.region.as_str()),
            Cell::new(t.agent_id.as_str()),
            Cell::new(t.id_prefix.as_str()),
            Cell::new(t.state.as_str()),
            Cell::new(t.uses),
            Cell::new(t.uses_left),
            Cell::opt(output::timestamp_seconds(t.expires_us))
                .shown_as(output::timestamp_seconds(t.expires_us).unwrap_or_default()),
            Cell::opt(output::timestamp_seconds(t.created_us))
                .shown_as(output::age(t.created_us, now_us)),
            Cell::new(t.ca_fingerprint.as_str()),
        ]);
        r.push(row);
    }
    r
}
