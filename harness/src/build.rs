//! Building the filter's `.wasm` from the current source, so that tests never run a stale
//! artifact: `cargo build --release --target wasm32-wasip1 -p apim-edge-filter`, once per process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the filter (once per process) and returns the path of its `.wasm`.
///
/// # Panics
/// When the filter does not build: this is for tests and tools, where that is the failure.
pub fn filter_wasm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip1",
                    "-p",
                    "apim-edge-filter",
                ])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "the filter does not build");
            root.join("target/wasm32-wasip1/release/apim_edge_filter.wasm")
        })
        .clone()
}

/// Builds the counter service (once per process) and returns the path of its binary.
///
/// # Panics
/// When it does not build: for tests and tools, where that is the failure.
pub fn counters_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-p",
                    "apim-edge-counters",
                    "--bin",
                    "apim-edge-counters",
                ])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "the counter service does not build");
            root.join("target/debug/apim-edge-counters")
        })
        .clone()
}

/// Builds the command line (once per process) and returns the path of its binary.
///
/// # Panics
/// When it does not build: for tests and tools, where that is the failure.
pub fn cli_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "apim-edge-harness", "--bin", "apim-edge"])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "the command line does not build");
            root.join("target/debug/apim-edge")
        })
        .clone()
}

/// A conformance trace of `tests/traces`, and the filter configuration it is replayed with:
/// `NAME.config.json` beside `NAME.jsonl`, when there is one.
pub struct ConformanceTrace {
    pub trace: PathBuf,
    pub config: Option<PathBuf>,
}

impl ConformanceTrace {
    /// `--trace T` and, with a configuration, `--config C`: for `apim-edge replay`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--trace".into(), self.trace.display().to_string()];
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.display().to_string()]);
        }
        args
    }
}

/// Every conformance trace, in name order.
///
/// # Panics
/// When `tests/traces` cannot be read: for tests, where that is the failure.
pub fn conformance_traces() -> Vec<ConformanceTrace> {
    let dir = workspace_root().join("tests/traces");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/traces is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    traces.sort();
    traces
        .into_iter()
        .map(|trace| {
            let config = trace.with_extension("config.json");
            ConformanceTrace {
                config: config.exists().then_some(config),
                trace,
            }
        })
        .collect()
}
