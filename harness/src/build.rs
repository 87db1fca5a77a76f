//! Building from the current source, so that tests never run a stale artifact: the filter's
//! `.wasm`, the counter service and the command line, each once per process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cargo build ARGS` in the workspace once per process (per `once`), and returns
/// `output` under the workspace.
///
/// # Panics
/// When the build fails: for tests and tools, where that is the failure.
fn built(once: &'static OnceLock<PathBuf>, args: &[&str], output: &str) -> PathBuf {
    once.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .arg("build")
            .args(args)
            .current_dir(&root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build {} failed", args.join(" "));
        root.join(output)
    })
    .clone()
}

/// Builds package `package` for `wasm32-wasip1` in release (once per process, per `once`),
/// and returns the path of `file` there.
fn wasm(once: &'static OnceLock<PathBuf>, package: &str, file: &str) -> PathBuf {
    let output = format!("target/wasm32-wasip1/release/{file}");
    let args = ["--release", "--target", "wasm32-wasip1", "-p", package];
    built(once, &args, &output)
}

/// Builds the filter (once per process) and returns the path of its `.wasm`.
///
/// # Panics
/// When the filter does not build: this is for tests and tools, where that is the failure.
pub fn filter_wasm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    wasm(&BUILT, "apim-edge-filter", "apim_edge_filter.wasm")
}

/// Builds the test guest `tests/guest` (once per process), a proxy-wasm filter that is not
/// apim-edge, and returns the path of its `.wasm`.
pub fn test_guest_wasm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    wasm(&BUILT, "apim-edge-test-guest", "apim_edge_test_guest.wasm")
}

/// Builds the counter service (once per process) and returns the path of its binary.
pub fn counters_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    built(
        &BUILT,
        &["-p", "apim-edge-counters", "--bin", "apim-edge-counters"],
        "target/debug/apim-edge-counters",
    )
}

/// Builds the command line (once per process) and returns the path of its binary.
pub fn cli_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    built(
        &BUILT,
        &["-p", "apim-edge-harness", "--bin", "apim-edge"],
        "target/debug/apim-edge",
    )
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
