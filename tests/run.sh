#!/usr/bin/env bash
# All the tests: installs what they need, then formatting, lints, the wasm build of the engine,
# and every test of the workspace (unit, property, corpus, conformance traces, CLI, snapshots).
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip1
rustup component add rustfmt clippy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The engine must build for the filter's target.
cargo build -p apim-edge-policies --target wasm32-wasip1
cargo test --workspace
