//! The layer order DESIGN.md states, checked: which workspace crates each crate may depend on
//! (from `cargo metadata`), that `mxscopectl` links neither SQLite nor axum, and that no module of
//! the agent or the collector imports a module of a layer above its own (from the source).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

/// Workspace crate → the workspace crates it depends on (normal and build dependencies).
fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let meta: serde_json::Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]))
    .expect("cargo metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str())
                .filter(|n| names.contains(*n))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap_or_default().to_string(), deps)
        })
        .collect()
}

#[test]
fn crates_depend_only_downwards() {
    let graph = crate_graph();
    assert!(graph.len() >= 7, "workspace crates: {graph:?}");
    let allowed: &[(&str, &[&str])] = &[
        ("mxscope-proto", &[]),
        ("mxscope-pki", &["mxscope-proto"]),
        ("mxscope-spf", &["mxscope-proto"]),
        (
            "mxscope-agent",
            &["mxscope-proto", "mxscope-pki", "mxscope-spf"],
        ),
        ("mxscope-collector", &["mxscope-proto", "mxscope-pki"]),
        (
            "mxscope-ctl",
            &["mxscope-proto", "mxscope-pki", "mxscope-spf"],
        ),
    ];
    for (name, ok) in allowed {
        let deps = graph
            .get(*name)
            .unwrap_or_else(|| panic!("crate {name} missing from the workspace"));
        let extra: Vec<_> = deps.iter().filter(|d| !ok.contains(&d.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{name} depends on {extra:?}, above its layer"
        );
    }
}

#[test]
fn ctl_links_neither_sqlite_nor_axum() {
    let tree = cargo(&[
        "tree",
        "--offline",
        "-p",
        "mxscope-ctl",
        "-e",
        "normal,build",
        "--prefix",
        "none",
    ]);
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains("tonic"), "ctl's tree: {crates:?}");
    for banned in ["rusqlite", "libsqlite3-sys", "axum", "mimalloc"] {
        assert!(!crates.contains(banned), "mxscopectl links {banned}");
    }
}

/// The first `crate::name` path segments a source line uses, `use crate::{a, b::c}` included.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let tail = &rest[at + "crate::".len()..];
        if let Some(group) = tail.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            let mut depth = 0;
            let mut item = String::new();
            for ch in inner.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            out.push(item);
        } else {
            out.push(tail.to_string());
        }
        rest = tail;
    }
    out.into_iter()
        .filter_map(|s| {
            let s = s.trim();
            let end = s
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            (end > 0).then(|| s[..end].to_string())
        })
        .collect()
}

/// Source files of `src` with the top-level module each belongs to; test code (`tests/` folders,
/// `tests.rs`, `testing.rs` and everything after a file's first `#[cfg(test)]`) is left out.
fn modules(src: &Path) -> Vec<(String, PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                if name != "tests" {
                    stack.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") || matches!(name, "tests.rs" | "testing.rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("below src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or_default()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).expect("read source");
            let code = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .to_string();
            out.push((top, path, code));
        }
    }
    out
}

/// Checks that no module of `krate` refers to a module on a higher layer. `layers` lists the
/// layers bottom first; modules on one layer may use each other.
fn check_layers(krate: &str, layers: &[&[&str]]) {
    let src = workspace_root().join(krate).join("src");
    let level = |m: &str| layers.iter().position(|l| l.contains(&m));
    let files = modules(&src);
    assert!(!files.is_empty(), "no sources under {}", src.display());
    let mut violations = Vec::new();
    for (top, path, code) in &files {
        let Some(own) = level(top) else {
            violations.push(format!("{}: module '{top}' has no layer", path.display()));
            continue;
        };
        for (n, line) in code.lines().enumerate() {
            for r in crate_refs(line) {
                match level(&r) {
                    Some(l) if l > own => violations.push(format!(
                        "{}:{}: '{top}' (layer {own}) uses '{r}' (layer {l})",
                        path.display(),
                        n + 1
                    )),
                    None => violations.push(format!(
                        "{}:{}: '{r}' is on no layer",
                        path.display(),
                        n + 1
                    )),
                    _ => {}
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{krate}: imports against the layer order:\n{}",
        violations.join("\n")
    );
}

#[test]
fn crate_refs_reads_paths_and_groups() {
    assert_eq!(crate_refs("use crate::store::Store;"), vec!["store"]);
    assert_eq!(
        crate_refs("use crate::{analysis::x, store, limits::{A, B}};"),
        vec!["analysis", "store", "limits"]
    );
    assert!(crate_refs("let x = 1;").is_empty());
}

#[test]
fn collector_modules_respect_the_layer_order() {
    check_layers(
        "collector",
        &[
            &["analysis"],
            &["store"],
            &["error", "limits", "notify"],
            &["auth"],
            // `enrol` signs for the Enrollment service and for renewals (ingest) and tokens (query).
            &["enrol"],
            &["shared"],
            // `alert` asks agents through `confirm` and answers `query`; `query` lists its alerts.
            &["mailwatch", "ingest", "query", "http", "confirm", "alert"],
            &["lib", "main"],
        ],
    );
}

#[test]
fn agent_modules_respect_the_layer_order() {
    check_layers(
        "agent",
        &[
            &["error"],
            &["credentials", "trust"],
            &["probe"],
            &["config"],
            &["spool"],
            &["schedule"],
            &["enrol"],
            &["uplink"],
            // `fuzzing` (only with the feature) hands fuzzer input to the layers below.
            &["lib", "main", "fuzzing"],
        ],
    );
}
