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
