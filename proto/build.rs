//! Compiles `mxscope/v1/*.proto` with the pure-Rust `protox` compiler, so no system `protoc` is
//! needed, and generates the collector's Ingest server over `mxscope.v1.raw` (results kept as
//! bytes; see `src/raw.rs`).

use tonic_build::manual::{Builder, Method, Service};

/// Messages serialised as JSON by the collector's web API.
const JSON_MESSAGES: &[&str] = &[
    "StatusRow",
    "StatusResponse",
    "AgentInfo",
    "AgentsResponse",
    "MatrixCell",
    "MatrixRow",
    "MatrixResponse",
    "LatencyRow",
    "LatencyResponse",
    "Finding",
    "DiagnoseResponse",
    "WatchEvent",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["mxscope/v1/mxscope.proto", "mxscope/v1/raw.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // The Query API's answers are also the dashboard's JSON (`/api/v1/…`): plain field names.
    let mut config = tonic_prost_build::configure();
    for message in JSON_MESSAGES {
        config = config.type_attribute(
            format!(".mxscope.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    config
        .build_client(true)
        .build_server(true)
        .bytes(".mxscope.v1.raw")
        .compile_fds(fds)?;
    // The same route as `mxscope.v1.Ingest/Session`, reading `raw::AgentMessage`.
    let ingest = Service::builder()
        .name("Ingest")
        .package("mxscope.v1")
        .method(
            Method::builder()
                .name("session")
                .route_name("Session")
                .input_type("crate::pb::raw::AgentMessage")
                .output_type("crate::pb::CollectorMessage")
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[ingest]);
    Ok(())
}
