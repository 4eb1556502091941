//! The manifests in deploy/kubernetes parse, use only flags and environment variables the
//! binaries know (checked against their `--help`), and fit together: the collectors on
//! PostgreSQL are a Deployment of at least two replicas with `--db` from a Secret, behind a
//! Service, and the trial PostgreSQL's Secret points at its own Service.

use std::path::{Path, PathBuf};

use mxscope_tests::binaries::{mxscope_binary, AGENT, COLLECTOR};
use serde::Deserialize;
use serde_norway::Value;

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every `*.yaml` file, with its file name.
fn manifests() -> Vec<(String, Vec<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read manifest");
            let docs = serde_norway::Deserializer::from_str(&text)
                .map(|d| {
                    Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                })
                .collect();
            let name = path.file_name().expect("file name").to_string_lossy();
            (name.into_owned(), docs)
        })
        .collect()
}

fn file(name: &str) -> Vec<Value> {
    manifests()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no deploy/kubernetes/{name}"))
        .1
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The containers and init containers of a workload's pod template.
fn containers(workload: &Value) -> Vec<&Value> {
    let pod = &workload["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[*k].as_sequence())
        .flatten()
        .collect()
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_sequence()
        .map(|s| s.iter().map(str_of).collect())
        .unwrap_or_default()
}

fn help(binary: &str) -> String {
    let out = std::process::Command::new(mxscope_binary(binary).expect("binary"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{binary} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_manifest_parses_and_names_its_objects() {
    let all = manifests();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "agent.yaml",
        "agent-offline.yaml",
        "collector.yaml",
        "collector-postgres.yaml",
        "postgres.yaml",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    for (name, docs) in &all {
        assert!(!docs.is_empty(), "{name} holds no document");
        for d in docs {
            for key in ["apiVersion", "kind"] {
                assert!(d[key].is_string(), "{name}: {key} in {d:?}");
            }
            assert!(d["metadata"]["name"].is_string(), "{name}: metadata.name");
        }
    }
}

#[test]
fn containers_use_flags_and_env_the_binaries_know() {
    let helps = [(COLLECTOR, help(COLLECTOR)), (AGENT, help(AGENT))];
    let mut checked = 0;
    for (name, docs) in manifests() {
        for d in &docs {
            for c in containers(d) {
                let args = args(c);
                let Some((_, help)) = helps.iter().find(|(b, _)| args.first() == Some(b)) else {
                    continue;
                };
                for flag in args.iter().filter(|a| a.starts_with("--")) {
                    let flag = flag.split('=').next().expect("split");
                    assert!(
                        help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                        "{name}: {} has no {flag}",
                        args[0]
                    );
                    checked += 1;
                }
                for env in c["env"].as_sequence().into_iter().flatten() {
                    let var = str_of(&env["name"]);
                    assert!(
                        help.contains(&format!("[env: {var}")),
                        "{name}: {} reads no {var}",
                        args[0]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "checked only {checked} flags and variables");
}

#[test]
fn collectors_on_postgres_are_a_replicated_deployment_behind_a_service() {
    let docs = file("collector-postgres.yaml");
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let dep = deployments[0];
    let replicas = dep["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 2, "replicas: {replicas}");
    assert!(dep["spec"]["volumeClaimTemplates"].is_null(), "no volume");

    let collector = containers(dep)
        .into_iter()
        .find(|c| args(c).first() == Some(&COLLECTOR))
        .expect("a collector container");
    let args = args(collector);
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--db") || a.starts_with("--ca-key")),
        "--db comes from the Secret, no --ca-key on PostgreSQL: {args:?}"
    );
    let db = collector["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "MXSCOPE_DB")
        .expect("MXSCOPE_DB");
    let secret = &db["valueFrom"]["secretKeyRef"];
    assert!(
        secret["name"].is_string() && secret["key"].is_string(),
        "{db:?}"
    );

    // The Service selects the pods and targets their named ports.
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&dep["spec"]["selector"]["matchLabels"], labels);
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 1, "one Service");
    assert_eq!(&services[0]["spec"]["selector"], labels);
    let port_names: Vec<&Value> = collector["ports"]
        .as_sequence()
        .expect("container ports")
        .iter()
        .map(|p| &p["name"])
        .collect();
    let ports = services[0]["spec"]["ports"].as_sequence().expect("ports");
    assert!(!ports.is_empty());
    for p in ports {
        assert!(port_names.contains(&&p["targetPort"]), "{p:?}");
    }
}

#[test]
fn trial_postgres_secret_points_at_its_service() {
    let docs = file("postgres.yaml");
    let collector = file("collector-postgres.yaml");
    let dep = of_kind(&collector, "Deployment")[0];
    let db = containers(dep)
        .into_iter()
        .flat_map(|c| c["env"].as_sequence().into_iter().flatten())
        .find(|e| e["name"] == "MXSCOPE_DB")
        .expect("MXSCOPE_DB");
    let reference = &db["valueFrom"]["secretKeyRef"];

    // The Secret the collectors read, with the key they read.
    let secret = of_kind(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == reference["name"])
        .expect("the collectors' Secret");
    let url = str_of(&secret["stringData"][str_of(&reference["key"])]);
    let rest = url.strip_prefix("postgres://").expect("postgres:// URL");
    let (user, rest) = rest.split_once('@').expect("user@host");
    let (host_port, db_query) = rest.split_once('/').expect("host/db");
    let (host, port) = host_port.split_once(':').expect("host:port");
    let dbname = db_query.split('?').next().expect("db");
    let role = user.split(':').next().expect("role");

    // Host and port are the Service's, which selects the PostgreSQL pods.
    let service = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == host)
        .unwrap_or_else(|| panic!("no Service {host}"));
    let port: u64 = port.parse().expect("port");
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(port)),
        "Service {host} has port {port}"
    );
    let sts = of_kind(&docs, "StatefulSet")[0];
    assert_eq!(
        &service["spec"]["selector"],
        &sts["spec"]["template"]["metadata"]["labels"]
    );
    // The server is made with that role and database.
    let env = containers(sts)[0]["env"].as_sequence().expect("env");
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| str_of(&e["value"]))
    };
    assert_eq!(value("POSTGRES_USER"), Some(role));
    assert_eq!(value("POSTGRES_DB"), Some(dbname));
}
