#!/usr/bin/env bash
# The main job: build apim-edge, load the sample catalog and replay the sample traffic through
# the engine, printing each decision as a table. Until the proxy-wasm filter and the Envoy
# set-up land, this runs the native engine (the same decisions the filter will make).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet -p apim-edge-harness
bin=target/release/apim-edge

echo "== the sample catalog"
"$bin" check tests/catalog/sample.json
for trace in tests/traces/*.jsonl; do
  echo
  echo "== $(basename "$trace")"
  "$bin" replay --snapshot tests/catalog/sample.json --trace "$trace" --format table
done
