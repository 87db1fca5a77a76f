//! The filter's `.wasm` in the wasmtime host: the same answers as the native engine for every
//! trace (one worker and four), exact counting with truly parallel workers, and clear errors
//! for modules that cannot run.

use apim_edge_harness::host::Host;
use std::path::PathBuf;
use std::process::Command;

use apim_edge_harness::build::{
    conformance_traces, filter_wasm, workspace_root as root, ConformanceTrace,
};

fn apim_edge(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apim-edge"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

const SAMPLE: &str = "tests/catalog/sample.json";

/// A trace without a configuration of its own.
fn plain(trace: &std::path::Path) -> ConformanceTrace {
    ConformanceTrace {
        trace: trace.to_path_buf(),
        config: None,
    }
}

/// `apim-edge replay` of a trace (with its configuration) against `snapshot`, through the
/// `.wasm` on `workers` VMs, with `mode` (`--diff` or `--check`).
fn replay_in_wasm(
    snapshot: &str,
    t: &ConformanceTrace,
    wasm: &std::path::Path,
    workers: &str,
    mode: &str,
) -> std::process::Output {
    let mut args = vec!["replay", "--snapshot", snapshot];
    let trace_args = t.args();
    args.extend(trace_args.iter().map(String::as_str));
    args.extend(["--wasm", wasm.to_str().unwrap(), "--workers", workers, mode]);
    apim_edge(&args)
}

#[test]
fn every_trace_gives_the_same_answers_from_the_wasm() {
    let wasm = filter_wasm();
    for t in conformance_traces() {
        for workers in ["1", "4"] {
            let out = replay_in_wasm(SAMPLE, &t, &wasm, workers, "--diff");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.contains(" 0 differ"),
                "{} with {workers} workers:\n{}{stderr}",
                t.trace.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

#[test]
fn the_wasm_meets_every_expectation_of_the_traces() {
    let wasm = filter_wasm();
    for t in conformance_traces() {
        let out = replay_in_wasm(SAMPLE, &t, &wasm, "4", "--check");
        assert!(
            out.status.success(),
            "{}: {}",
            t.trace.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `apim-edge replay` of `trace` through the `.wasm` on four VMs, each on a thread of its own.
fn replay_on_4_parallel_workers(
    wasm: &std::path::Path,
    snapshot: &std::path::Path,
    trace: &std::path::Path,
    more: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "replay",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
        "--workers",
        "4",
        "--parallel",
    ];
    args.extend(more);
    apim_edge(&args)
}

#[test]
fn parallel_workers_admit_a_quota_exactly() {
    let wasm = filter_wasm();
    let dir = std::env::temp_dir().join(format!("apim-edge-wasm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snapshot = dir.join("quota.json");
    std::fs::write(
        &snapshot,
        serde_json::json!({
            "apis": [{"name": "a", "path": "a"}],
            "products": [{"name": "p", "apis": ["a"], "policy": "<policies><inbound><quota calls=\"200\" renewal-period=\"86400\" /></inbound></policies>"}],
            "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
        })
        .to_string(),
    )
    .unwrap();
    let trace = dir.join("burst.jsonl");
    let line = r#"{"t": 0, "method": "GET", "url": "/a/x", "headers": {"Ocp-Apim-Subscription-Key": "k"}}"#;
    std::fs::write(&trace, vec![line; 300].join("\n")).unwrap();
    for run in 0..5 {
        let out = replay_on_4_parallel_workers(&wasm, &snapshot, &trace, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let allowed = text
            .lines()
            .filter(|l| l.contains(r#""outcome":"allowed""#))
            .count();
        let exceeded = text
            .lines()
            .filter(|l| l.contains(r#""outcome":"quota_exceeded""#))
            .count();
        assert_eq!((allowed, exceeded), (200, 100), "run {run}");
    }
}

/// A module from WebAssembly text, in a file of its own (tests run in parallel).
fn module(text: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path =
        std::env::temp_dir().join(format!("apim-edge-guest-{}-{n}.wasm", std::process::id()));
    std::fs::write(&path, wat::parse_str(text).unwrap()).unwrap();
    path
}

#[test]
fn unknown_imports_are_refused_at_load_by_name() {
    let err = Host::load(&module(r#"(module (import "env" "nope" (func)))"#))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("imports what this host does not provide: env::nope"),
        "{err:#}"
    );
}

#[test]
fn a_guest_that_traps_is_an_error() {
    let host = Host::load(&module(
        r#"(module (func (export "_initialize") unreachable))"#,
    ))
    .unwrap();
    let err = host.vm(b"{}").err().unwrap();
    assert!(
        format!("{err:#}").contains("_initialize: the guest trapped"),
        "{err:#}"
    );
}

#[test]
fn a_guest_that_never_returns_is_stopped() {
    let host = Host::load(&module(
        r#"(module (func (export "_initialize") (loop (br 0))))"#,
    ))
    .unwrap();
    let err = host.vm(b"{}").err().unwrap();
    assert!(format!("{err:#}").contains("ran longer than"), "{err:#}");
}

#[test]
fn snapshot_source_fetches_are_answered_by_callout_rules() {
    let wasm = filter_wasm();
    let dir = std::env::temp_dir().join(format!("apim-edge-callout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snapshot = |state: &str| {
        serde_json::json!({
            "apis": [{"name": "a", "path": "a"}],
            "products": [{"name": "p", "apis": ["a"]}],
            "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k", "state": state}}]
        })
        .to_string()
    };
    let (inline, fetched) = (dir.join("inline.json"), dir.join("fetched.json"));
    std::fs::write(&inline, snapshot("active")).unwrap();
    std::fs::write(&fetched, snapshot("suspended")).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"snapshotSource": {"cluster": "apim-config", "authority": "config", "path": "/snapshot.json", "refreshSeconds": 10}}"#,
    )
    .unwrap();
    let trace = dir.join("calls.jsonl");
    std::fs::write(
        &trace,
        r#"{"t": 1, "method": "GET", "url": "/a/x", "headers": {"Ocp-Apim-Subscription-Key": "k"}}"#,
    )
    .unwrap();
    let replay = |rules: &[&str]| {
        let mut args = vec![
            "replay",
            "--snapshot",
            inline.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
            "--wasm",
            wasm.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(rules);
        let out = apim_edge(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            record["status"].as_u64(),
            record["outcome"].as_str().map(String::from),
        )
    };
    // The fetched snapshot suspends the subscription: its key is refused from the first call.
    let rule = format!("apim-config={}", fetched.display());
    assert_eq!(
        replay(&["--callout", &rule]),
        (Some(401), Some("invalid_key".into()))
    );
    // Without a rule the fetch fails, and the inline snapshot stays in force.
    assert_eq!(replay(&[]), (Some(200), Some("allowed".into())));
    // A rule that is not CLUSTER=FILE is unusable input.
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        inline.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
        "--callout",
        "apim-config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected CLUSTER=FILE"));
}

#[test]
fn a_har_file_replays_with_its_recorded_statuses_as_expectations() {
    let wasm = filter_wasm();
    let har = "tests/har/starter.har";
    // Natively and through the .wasm with four workers: every recorded status matches.
    for extra in [
        &[][..],
        &["--wasm", wasm.to_str().unwrap(), "--workers", "4"][..],
    ] {
        let mut args = vec![
            "replay",
            "--snapshot",
            "tests/catalog/sample.json",
            "--trace",
            har,
            "--expect-recorded",
        ];
        args.extend_from_slice(extra);
        let out = apim_edge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("check: 9 requests, 0 mismatched"),
            "{stderr}"
        );
    }
    // A recording that disagrees with the catalog is reported, request by request.
    let dir = std::env::temp_dir().join(format!("apim-edge-har-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(har)).unwrap()).unwrap();
    doc["log"]["entries"][5]["response"]["status"] = 200.into();
    let wrong = dir.join("wrong.har");
    std::fs::write(&wrong, doc.to_string()).unwrap();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        "tests/catalog/sample.json",
        "--trace",
        wrong.to_str().unwrap(),
        "--expect-recorded",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mismatch at request 5 (GET /echo/items/1): status: expected 200, got 429"),
        "{stderr}"
    );
}

#[test]
fn bench_reports_both_sides_and_their_ratio() {
    let wasm = filter_wasm();
    let out = apim_edge(&[
        "bench",
        "--snapshot",
        "tests/catalog/sample.json",
        "--trace",
        "tests/traces/rate-limit.jsonl",
        "--wasm",
        wasm.to_str().unwrap(),
        "--requests",
        "500",
        "--warmup",
        "50",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for label in ["requests/s", "p50", "p90", "p99", "p99.9", "max"] {
        assert!(lines[0].contains(label), "{stdout}");
    }
    assert!(lines[1].starts_with("native "), "{stdout}");
    assert!(lines[2].starts_with("wasm "), "{stdout}");
    assert!(lines[3].starts_with("wasm/native "), "{stdout}");
    // Every figure is a number: requests/s, then five latencies with units, then ratios.
    let figures: Vec<&str> = lines[2].split_whitespace().skip(1).collect();
    assert!(figures[0].parse::<f64>().unwrap() > 0.0, "{stdout}");
    assert_eq!(
        lines[3]
            .split_whitespace()
            .filter(|f| f.ends_with('x'))
            .count(),
        5
    );
    // An empty trace is unusable input.
    let empty = std::env::temp_dir().join(format!("apim-edge-empty-{}.jsonl", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let out = apim_edge(&[
        "bench",
        "--snapshot",
        "tests/catalog/sample.json",
        "--trace",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Expressions at the load-time limits (256 operators; `!` and parentheses 32 deep) run in the
/// `.wasm` for every request, on every worker, and give the same answers as natively.
#[test]
fn expressions_at_the_limits_run_in_the_wasm_on_every_request() {
    let wasm = filter_wasm();
    let dir = std::env::temp_dir().join(format!("apim-edge-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("limits.jsonl");
    let expect = format!(
        r#"{{"method": "GET", "url": "/limits/x", "expect": {{"status": 200, "outcome": "allowed", "upstream": {{"headers": {{"x-chain": "{}", "x-nest": "True"}}}}}}}}"#,
        "a".repeat(257)
    );
    std::fs::write(&trace, vec![expect; 40].join("\n")).unwrap();
    for mode in ["--check", "--diff"] {
        let out = replay_in_wasm(
            "tests/catalog/at-limits.json",
            &plain(&trace),
            &wasm,
            "4",
            mode,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains("40 requests, 0 mismatched")
                || stderr.contains("40 requests, 0 differ"),
            "{mode}: {stderr}"
        );
    }
}

/// A `return-response` or `mock-response` in outbound replaces the upstream's response: the
/// same status, headers, body and outcome natively and from the `.wasm` on 4 workers.
#[test]
fn an_outbound_response_replaces_the_upstream_in_the_wasm_as_natively() {
    let wasm = filter_wasm();
    let dir = std::env::temp_dir().join(format!("apim-edge-outbound-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snapshot = dir.join("outbound.json");
    let doc = serde_json::json!({
        "apis": [
            {"name": "a", "properties": {"path": "a", "subscriptionRequired": false},
             "policy": r#"<policies><inbound><base /></inbound><outbound><base /><return-response><set-status code="418" reason="teapot" /><set-header name="x-replaced" exists-action="override"><value>@(context.Api.Id)</value></set-header><set-body>{"replaced": true}</set-body></return-response></outbound></policies>"#},
            {"name": "m", "properties": {"path": "m", "subscriptionRequired": false},
             "policy": r#"<policies><outbound><mock-response status-code="202" content-type="text/plain" /></outbound></policies>"#}]
    });
    std::fs::write(&snapshot, doc.to_string()).unwrap();
    let trace = dir.join("outbound.jsonl");
    let a = r#"{"method": "GET", "url": "/a/x", "upstreamStatus": 503, "expect": {"status": 418, "outcome": "returned", "headers": {"x-replaced": "a"}, "body": "{\"replaced\": true}"}}"#;
    let m = r#"{"method": "GET", "url": "/m/x", "expect": {"status": 202, "outcome": "returned", "headers": {"content-type": "text/plain"}, "body": ""}}"#;
    std::fs::write(&trace, [a, m, a, m].join("\n")).unwrap();
    let snapshot = snapshot.to_str().unwrap();
    let native = apim_edge(&[
        "replay",
        "--snapshot",
        snapshot,
        "--trace",
        trace.to_str().unwrap(),
        "--check",
    ]);
    let stderr = String::from_utf8_lossy(&native.stderr);
    assert!(native.status.success(), "native: {stderr}");
    for mode in ["--check", "--diff"] {
        let out = replay_in_wasm(snapshot, &plain(&trace), &wasm, "4", mode);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {stderr}");
    }
}

/// `workerLeases`: four truly parallel workers each admit from their own shares of a quota of
/// 1,000 and of a rate limit of 1,000 a minute, taken from shared data. None ever admits past
/// a limit; what they leave unspent is under `calls` (64) per worker and counter; and shared
/// data is touched on few calls (`--host-calls`).
#[test]
fn worker_leases_never_over_admit_and_leave_under_a_share_per_worker_unspent() {
    let wasm = filter_wasm();
    let dir = std::env::temp_dir().join(format!("apim-edge-leases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("leases.json");
    std::fs::write(
        &config,
        r#"{"workerLeases": {"calls": 64, "minLimit": 1000, "holdMs": 6000}}"#,
    )
    .unwrap();
    for (policy, denied) in [
        (
            r#"<quota calls="1000" renewal-period="86400" />"#,
            "quota_exceeded",
        ),
        (
            r#"<rate-limit calls="1000" renewal-period="60" />"#,
            "rate_limited",
        ),
    ] {
        let snapshot = dir.join("limit.json");
        std::fs::write(
            &snapshot,
            serde_json::json!({
                "apis": [{"name": "a", "path": "a"}],
                "products": [{"name": "p", "apis": ["a"], "policy": format!("<policies><inbound>{policy}</inbound></policies>")}],
                "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
            })
            .to_string(),
        )
        .unwrap();
        // 1,300 calls, one a millisecond: all within the rate limit's period.
        let trace = dir.join("burst.jsonl");
        let lines: Vec<String> = (0..1300)
            .map(|i| format!(r#"{{"t": {}, "method": "GET", "url": "/a/x", "headers": {{"Ocp-Apim-Subscription-Key": "k"}}}}"#, f64::from(i) / 1000.0))
            .collect();
        std::fs::write(&trace, lines.join("\n")).unwrap();
        let more = ["--config", config.to_str().unwrap(), "--host-calls"];
        let out = replay_on_4_parallel_workers(&wasm, &snapshot, &trace, &more);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let text = String::from_utf8(out.stdout).unwrap();
        let count = |outcome: &str| {
            text.lines()
                .filter(|l| l.contains(&format!(r#""outcome":"{outcome}""#)))
                .count()
        };
        let (allowed, refused) = (count("allowed"), count(denied));
        assert_eq!(allowed + refused, 1300, "{policy}: {text}");
        assert!(allowed <= 1000, "{policy}: {allowed} admitted");
        assert!(allowed > 1000 - 4 * 64, "{policy}: only {allowed} admitted");
        // Shares answer most calls: shared data is read on far fewer than one call in two.
        let line = stderr
            .lines()
            .find(|l| l.starts_with("proxy_on_request_headers: "))
            .unwrap();
        let reads: f64 = line
            .split("proxy_get_shared_data ")
            .nth(1)
            .and_then(|r| r.split([',', ' ']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        assert!(reads < 0.5, "{policy}: {line}");
    }
}
