//! The command line's contract: exit codes, error messages that name what is wrong, `check`,
//! `seal` and `synth`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn apim_edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apim-edge"))
        .args(args)
        .output()
        .unwrap()
}

fn sample() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/catalog/sample.json")
        .to_string_lossy()
        .into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("apim-edge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn check_prints_a_summary() {
    let out = apim_edge(&["check", &sample()]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("apis           16 (11 operations)"), "{s}");
    assert!(s.contains("subscriptions  20 (15 active, 21 keys)"), "{s}");
    // Which scope uses what: the tiered product's choose, and what its branches hold.
    assert!(
        s.contains("    product 'tiered': base, choose, include-fragment, rate-limit-by-key, return-response, set-header, set-variable\n"),
        "{s}"
    );
    assert!(
        s.contains("    API 'secure-api': base, validate-jwt\n"),
        "{s}"
    );
    assert!(s.contains("    API 'cors-api': base, cors\n"), "{s}");
    assert!(
        s.contains("    product 'rewriting': base, choose, rewrite-uri, set-header, set-method, set-query-parameter\n"),
        "{s}"
    );
}

#[test]
fn a_broken_snapshot_exits_2_naming_the_json_path() {
    let p = scratch("broken.json");
    std::fs::write(
        &p,
        r#"{"apis": [], "products": [{"name": "a"}, {"name": "b", "properties": {"subscriptionRequired": "yes"}}]}"#,
    )
    .unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(
        e.contains("products[1].properties.subscriptionRequired: expected a boolean"),
        "{e}"
    );
}

#[test]
fn an_unsupported_policy_is_refused_or_skipped() {
    let p = scratch("cache.json");
    std::fs::write(
        &p,
        r#"{"apis": [{"name": "a", "path": "a", "policy": "<policies>\n<inbound>\n  <cache-lookup />\n</inbound></policies>"}]}"#,
    )
    .unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(
        e.contains("API 'a' policy, line 3, column 3: <cache-lookup> is not supported at the edge"),
        "{e}"
    );
    let out = apim_edge(&["check", "--skip-unsupported", p.to_str().unwrap()]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("warnings       1"), "{s}");
    assert!(s.contains("skipped: <cache-lookup>"), "{s}");
}

#[test]
fn an_unreadable_trace_exits_2_naming_the_line() {
    let t = scratch("bad.jsonl");
    std::fs::write(
        &t,
        "{\"method\": \"GET\", \"url\": \"/\"}\n{\"url\": \"/\"}\n",
    )
    .unwrap();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        &sample(),
        "--trace",
        t.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("line 2: method: required"), "{e}");
}

#[test]
fn seal_leaves_no_plain_key_and_the_same_decisions() {
    let sealed = scratch("sealed.json");
    let out = apim_edge(&["seal", &sample(), sealed.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&sealed).unwrap();
    assert!(!text.contains("starter-primary"));
    assert!(!text.contains("\"primaryKey\""));
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/traces/keys.jsonl");
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        sealed.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--check",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn synth_makes_a_catalog_that_loads() {
    let out = apim_edge(&[
        "synth",
        "--subscriptions",
        "200",
        "--apis",
        "20",
        "--products",
        "10",
    ]);
    assert!(out.status.success());
    let p = scratch("synth.json");
    std::fs::write(&p, &out.stdout).unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("apis           20 (60 operations)"), "{s}");
    assert!(
        s.contains("subscriptions  200 (200 active, 400 keys)"),
        "{s}"
    );
}

/// The configuration is read by the engine's own parser, as the filter reads it: a file that is
/// not a configuration object, or a setting of the wrong type, is exit 2 naming what is wrong.
#[test]
fn a_configuration_that_is_not_one_exits_2_naming_the_fault() {
    let trace = scratch("one.jsonl");
    std::fs::write(&trace, r#"{"method": "GET", "url": "/echo/items/1"}"#).unwrap();
    let cases = [
        (
            "string.json",
            r#""a string""#,
            "expected a JSON object (the filter configuration)",
        ),
        (
            "array.json",
            "[1]",
            "expected a JSON object (the filter configuration)",
        ),
        (
            "mode.json",
            r#"{"failureMode": "sometimes"}"#,
            "failureMode: unknown variant `sometimes`",
        ),
        (
            "strip.json",
            r#"{"stripSubscriptionKey": "yes"}"#,
            "stripSubscriptionKey: invalid type",
        ),
    ];
    for (name, text, message) in cases {
        let config = scratch(name);
        std::fs::write(&config, text).unwrap();
        let out = apim_edge(&[
            "replay",
            "--snapshot",
            &sample(),
            "--trace",
            trace.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
    }
}

/// A catalog whose API `a` (path `a`, no key needed) has `policy` as its policy.
fn one_api_catalog(name: &str, policy: &str) -> PathBuf {
    let p = scratch(name);
    let doc = serde_json::json!({
        "apis": [{"name": "a", "properties": {"path": "a", "subscriptionRequired": false}, "policy": policy}]
    });
    std::fs::write(&p, doc.to_string()).unwrap();
    p
}

fn set_header(value: &str) -> String {
    format!(
        r#"<policies><inbound><set-header name="x-v" exists-action="override"><value>{value}</value></set-header></inbound></policies>"#
    )
}

/// Hostile policy documents: `check` refuses each with exit 2 and a message that names the
/// limit and the place, in bounded time and without overflowing its stack; a large flat
/// document at the size limit loads.
#[test]
fn hostile_policies_are_refused_naming_the_limit_and_the_place() {
    let terms = format!("@({})", vec!["1"; 5_000].join("+"));
    let long = format!("@({})", vec!["\"a\""; 20_000].join("+"));
    let parens = format!("@({}1{})", "(".repeat(500), ")".repeat(500));
    let cases = [
        (
            "terms.json",
            set_header(&terms),
            "more than 256 operators in one expression",
        ),
        (
            "parens.json",
            set_header(&parens),
            "nested more than 32 deep",
        ),
        (
            "long.json",
            set_header(&long),
            "is too large: the expression is 80002 bytes, more than 16384",
        ),
        (
            "xml.json",
            format!(
                "<policies>{}{}</policies>",
                "<a>".repeat(30_000),
                "</a>".repeat(30_000)
            ),
            "elements nested more than 64 deep",
        ),
        (
            "huge.json",
            format!(
                "<policies><inbound>{}</inbound></policies>",
                " ".repeat(300_000)
            ),
            "a policy document may have at most 262144",
        ),
    ];
    for (name, policy, message) in cases {
        let p = one_api_catalog(name, &policy);
        let out = apim_edge(&["check", p.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(stderr.contains("line 1, column"), "{name}: {stderr}");
        assert!(
            stderr.len() < 2_000,
            "{name}: the message quotes too much: {stderr}"
        );
    }
    // At the limits: 4,000 set-header elements with an expression each, under 256 KiB.
    let flat: String = (0..2_000)
        .map(|i| format!(r#"<set-header name="x-{i}" exists-action="override"><value>@("{i}")</value></set-header>"#))
        .collect();
    let p = one_api_catalog(
        "flat.json",
        &format!("<policies><inbound>{flat}</inbound></policies>"),
    );
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replay input outside sane ranges is exit 2 naming the line, natively and with `--wasm`, and
/// a HAR error never quotes a URL's query.
#[test]
fn replay_input_out_of_range_is_exit_2_naming_the_line() {
    let cases = [
        (
            r#"{"method": "GET", "url": "/a", "requestBytes": 18446744073709551615}"#,
            "line 1: requestBytes: 18446744073709551615 is more than",
        ),
        (
            r#"{"method": "GET", "url": "/a", "responseBytes": 10000000000}"#,
            "line 1: responseBytes: 10000000000 is more than",
        ),
        (
            r#"{"method": "GET", "url": "/a", "t": 1e300}"#,
            "line 1: t: expected seconds from --start",
        ),
    ];
    let snapshot = one_api_catalog("open.json", "<policies />");
    let filter = apim_edge_harness::build::filter_wasm();
    for (line, message) in cases {
        let t = scratch("range.jsonl");
        std::fs::write(&t, line).unwrap();
        for wasm in [false, true] {
            let mut args = vec![
                "replay",
                "--snapshot",
                snapshot.to_str().unwrap(),
                "--trace",
                t.to_str().unwrap(),
            ];
            if wasm {
                args.extend(["--wasm", filter.to_str().unwrap()]);
            }
            let out = apim_edge(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{line}: {stderr}");
            assert!(stderr.contains(message), "{line}: {stderr}");
        }
    }
    let har = scratch("relative.har");
    std::fs::write(
        &har,
        r#"{"log": {"version": "1.2", "creator": {"name": "devtools", "version": "1"},
          "entries": [{"startedDateTime": "2026-01-05T09:00:00Z", "time": 1,
            "request": {"method": "GET", "url": "/a/x?subscription-key=very-secret-key",
                        "httpVersion": "HTTP/1.1", "cookies": [], "queryString": [], "headers": [],
                        "headersSize": -1, "bodySize": 0},
            "response": {"status": 200, "statusText": "", "httpVersion": "HTTP/1.1", "cookies": [],
                         "headers": [], "content": {"size": 0}, "redirectURL": "",
                         "headersSize": -1, "bodySize": -1},
            "cache": {}, "timings": {"send": 0, "wait": 0, "receive": 0}}]}}"#,
    )
    .unwrap();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--trace",
        har.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("expected an absolute URL, not /a/x (query left out)"),
        "{stderr}"
    );
    assert!(!stderr.contains("very-secret-key"), "{stderr}");
}

/// Bad input to the command line: each is exit 2 with a message that names the place, without
/// a stack overflow, in bounded time and memory.
#[test]
fn bad_snapshots_exit_2_naming_the_place() {
    let nested_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bomb = r#"<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><policies><inbound><set-header name="x" exists-action="override"><value>&c;</value></set-header></inbound></policies>"#;
    let big_attr = format!(
        r#"<policies><inbound><set-header name="{}" exists-action="override" /></inbound></policies>"#,
        "x".repeat(20 * 1024 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.json", br#"{"apis": [{"name": "a", "#.to_vec(), "not valid JSON"),
        ("nested.json", nested_json.into_bytes(), "recursion limit exceeded"),
        ("utf8.json", b"{\"apis\": [{\"name\": \"\xff\xfe\"}]}".to_vec(), "cannot read"),
        (
            "bomb.json",
            serde_json::json!({"apis": [{"name": "a", "properties": {"path": "a"}, "policy": bomb}]})
                .to_string()
                .into_bytes(),
            "unrecognized entity `c`",
        ),
        (
            "attr.json",
            serde_json::json!({"apis": [{"name": "a", "properties": {"path": "a"}, "policy": big_attr}]})
                .to_string()
                .into_bytes(),
            "a policy document may have at most 262144",
        ),
    ];
    for (name, bytes, message) in cases {
        let p = scratch(name);
        std::fs::write(&p, bytes).unwrap();
        let out = apim_edge(&["check", p.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(stderr.len() < 2_000, "{name}: {stderr}");
    }
}

/// With `--wasm`, `--log-level` shows the filter's log lines with where they came from; and a
/// callout to a cluster the replay's proxy lacks (no `--callout` names it) fails at dispatch,
/// as in Envoy, which the filter logs.
#[test]
fn replay_shows_the_filters_logs_and_refuses_unknown_clusters() {
    let snapshot = one_api_catalog("logs.json", "<policies />");
    let config = scratch("logs.config.json");
    std::fs::write(
        &config,
        r#"{"snapshotSource": {"cluster": "apim-config", "refreshSeconds": 30}}"#,
    )
    .unwrap();
    let trace = scratch("logs.jsonl");
    std::fs::write(&trace, r#"{"method": "GET", "url": "/open/x"}"#).unwrap();
    let filter = apim_edge_harness::build::filter_wasm();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--wasm",
        filter.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("worker 0 start: [info] apim-edge: snapshot from the configuration loaded"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[error] apim-edge: cannot call cluster apim-config: BadArgument"),
        "{stderr}"
    );
    // Without --log-level, nothing of the filter's.
    let quiet = apim_edge(&[
        "replay",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--wasm",
        filter.to_str().unwrap(),
    ]);
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("apim-edge: snapshot from"));
}

/// The host for filters other than apim-edge: misuses of its options are exit 2 with a message
/// that says what is missing or wrong.
#[test]
fn replay_for_any_filter_names_what_its_options_need() {
    let trace = scratch("any-filter.jsonl");
    std::fs::write(&trace, r#"{"method": "GET", "url": "/hello"}"#).unwrap();
    let plugin = scratch("any-filter.plugin");
    std::fs::write(&plugin, "auth").unwrap();
    let guest = apim_edge_harness::build::test_guest_wasm();
    let (trace, plugin, guest) = (
        trace.to_str().unwrap(),
        plugin.to_str().unwrap(),
        guest.to_str().unwrap(),
    );
    // The guest run with its configuration, then what each case adds.
    let guest_with = |more: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["replay", "--trace", trace, "--wasm", guest];
        args.extend(["--plugin-config", plugin]);
        args.extend(more);
        args
    };
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["replay", "--trace", trace, "--wasm", guest],
            "--snapshot is needed (without it, only `replay --wasm --plugin-config` runs)",
        ),
        (
            vec!["replay", "--trace", trace, "--plugin-config", plugin],
            "--plugin-config, --vm-config, --root-id, --fail-open, --host-profile and --host-calls need --wasm",
        ),
        (
            guest_with(&["--diff"]),
            "--diff and --counters need apim-edge's configuration",
        ),
        (
            guest_with(&["--callout", "auth=no-such-file"]),
            "--callout auth=no-such-file: no-such-file is neither a file nor HOST:PORT",
        ),
        (
            guest_with(&["--snapshot", "sample.json"]),
            "cannot be used with",
        ),
        (
            guest_with(&["--callout", "auth=127.0.0.1:9@fast"]),
            "--callout auth=127.0.0.1:9@fast: the latency must be milliseconds, as @20ms",
        ),
        (
            guest_with(&["--host-profile", "cdn"]),
            "unknown host profile \"cdn\": envoy or service-extensions",
        ),
    ];
    for (args, message) in cases {
        let out = apim_edge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // And used rightly, the guest answers.
    let out = apim_edge(&guest_with(&[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["status"], 200);
    assert_eq!(record["body"], "Hello, World!\n");
    assert_eq!(record["headers"]["hello"], "World");
}

/// Output piped into a reader that stops early (`apim-edge synth | head`) ends the command
/// quietly, without a panic.
#[test]
fn a_closed_output_pipe_is_no_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_apim-edge"))
        .args(["synth", "--subscriptions", "200000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A `--callout` latency is virtual time: a counter service slower than the filter's
/// `timeoutMs` is a timeout to the filter (Envoy's UNAVAILABLE at the timeout), one within it
/// is an answer (here one that cannot be read). Both are decided as `onUnavailable` says.
#[test]
fn a_callout_latency_past_the_timeout_is_a_timeout() {
    let filter = apim_edge_harness::build::filter_wasm();
    let config = scratch("slow-counters.json");
    std::fs::write(
        &config,
        r#"{"counters": {"cluster": "apim-counters", "timeoutMs": 50, "onUnavailable": "deny"}}"#,
    )
    .unwrap();
    let answer = scratch("not-protobuf.bin");
    std::fs::write(&answer, "garbage").unwrap();
    let trace = format!("{}/../tests/traces/quota.jsonl", env!("CARGO_MANIFEST_DIR"));
    for (latency, reason) in [
        ("80ms", "no answer in time (gRPC status 14)"),
        ("10ms", "the message cannot be decoded"),
    ] {
        let rule = format!("apim-counters={}@{latency}", answer.display());
        let out = apim_edge(&[
            "replay",
            "--snapshot",
            &sample(),
            "--config",
            config.to_str().unwrap(),
            "--trace",
            &trace,
            "--wasm",
            filter.to_str().unwrap(),
            "--callout",
            &rule,
            "--log-level",
            "warn",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "request 0: [warn] apim-edge: counter service unavailable ({reason}"
            )),
            "{latency}: {stderr}"
        );
        let first: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        assert_eq!(first["outcome"], "counters_unavailable", "{latency}");
    }
}

/// `replay --host-calls` prints, per callback, the filter's calls into the host.
#[test]
fn replay_counts_host_calls_per_callback() {
    let filter = apim_edge_harness::build::filter_wasm();
    let trace = format!("{}/../tests/traces/quota.jsonl", env!("CARGO_MANIFEST_DIR"));
    let requests = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        &sample(),
        "--trace",
        &trace,
        "--wasm",
        filter.to_str().unwrap(),
        "--workers",
        "2",
        "--host-calls",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("host calls per callback, all workers:\n"),
        "{stderr}"
    );
    // Every request's headers were decided, by both workers together; each read the header map.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("proxy_on_request_headers: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.starts_with(&format!("proxy_on_request_headers: {requests} calls, ")),
        "{line}"
    );
    assert!(line.contains("proxy_get_header_map_pairs 1.00"), "{line}");
}

/// `apim-edge usage` (SPEC §8): records grouped by subscription (or product, API, operation),
/// each status counted as APIM's reports count it: success 2xx and 3xx, blocked 401, 403 and
/// 429, failed other 4xx and 5xx, other the rest; bandwidth is the bytes in and out.
#[test]
fn usage_reports_count_calls_as_apim_reports_do() {
    let records = scratch("usage.jsonl");
    let rec = |time: &str, sub: Option<&str>, status: u16, bytes: (u64, u64)| {
        serde_json::json!({"time": time, "api": "echo-api", "operation": "get-item",
            "product": "gold", "subscription": sub, "outcome": "x", "status": status,
            "requestBytes": bytes.0, "responseBytes": bytes.1})
        .to_string()
    };
    let lines = [
        rec("2026-01-01T10:00:00Z", Some("a"), 200, (10, 100)),
        rec("2026-01-01T10:10:00Z", Some("a"), 302, (0, 5)),
        rec("2026-01-01T10:20:00Z", Some("a"), 401, (0, 50)),
        rec("2026-01-01T10:30:00Z", Some("a"), 403, (0, 0)),
        rec("2026-01-01T11:00:00Z", Some("a"), 429, (0, 0)),
        rec("2026-01-01T11:10:00Z", Some("a"), 404, (0, 0)),
        rec("2026-01-01T11:20:00Z", Some("a"), 500, (0, 0)),
        rec("2026-01-01T11:30:00Z", Some("a"), 101, (0, 0)),
        rec("2026-01-01T12:00:00Z", Some("b"), 200, (1, 2)),
        // No subscription (an open product): in no subscription's row.
        rec("2026-01-01T12:00:00Z", None, 200, (1, 2)),
    ];
    std::fs::write(&records, lines.join("\n")).unwrap();
    let path = records.to_str().unwrap();
    let run = |more: &[&str]| {
        let mut args = vec!["usage", "--records", path];
        args.extend(more);
        let out = apim_edge(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let report: serde_json::Value = serde_json::from_str(&run(&[])).unwrap();
    assert_eq!(report["count"], 2, "{report}");
    let a = &report["value"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["subscriptionId"], "/subscriptions/a");
    assert_eq!(a["productId"], "/products/gold");
    assert_eq!(a["apiId"], "/apis/echo-api");
    assert_eq!(
        [
            &a["callCountSuccess"],
            &a["callCountBlocked"],
            &a["callCountFailed"],
            &a["callCountOther"],
            &a["callCountTotal"],
            &a["bandwidth"]
        ],
        [2, 3, 2, 1, 8, 165]
    );
    // By product: all ten; within 11:00 to 12:00; by hour.
    let by_product: serde_json::Value = serde_json::from_str(&run(&["--by", "product"])).unwrap();
    assert_eq!(by_product["value"][0]["callCountTotal"], 10, "{by_product}");
    assert_eq!(
        by_product["value"][0]["subscriptionId"],
        serde_json::Value::Null
    );
    let window: serde_json::Value = serde_json::from_str(&run(&[
        "--from",
        "2026-01-01T11:00:00Z",
        "--to",
        "2026-01-01T12:00:00Z",
    ]))
    .unwrap();
    assert_eq!(window["value"][0]["callCountTotal"], 4, "{window}");
    assert_eq!(window["count"], 1, "{window}");
    let csv = run(&["--interval", "PT1H", "--format", "csv"]);
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].starts_with("name,timestamp,interval,subscriptionId,"),
        "{csv}"
    );
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[1].starts_with("a,2026-01-01T10:00:00.000Z,PT1H,/subscriptions/a,")
            && rows[1].ends_with(",2,2,0,0,4,165"),
        "{csv}"
    );
    // A line that is not a record is skipped, named on stderr, and counted.
    let mixed = scratch("mixed-usage.jsonl");
    std::fs::write(
        &mixed,
        format!("{}\n{{\"time\": 1}}\ntruncated {{\"ti\n", lines[0]),
    )
    .unwrap();
    let out = apim_edge(&["usage", "--records", mixed.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("mixed-usage.jsonl line 2: not a usage record"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mixed-usage.jsonl line 3: not a usage record"),
        "{stderr}"
    );
    assert!(stderr.contains("usage: 2 lines skipped"), "{stderr}");
    let kept: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(kept["value"][0]["callCountTotal"], 1, "{kept}");
    // Unusable input: exit 2, naming the fault.
    let bad = scratch("bad-usage.jsonl");
    std::fs::write(&bad, "{\"time\": 1}\n").unwrap();
    for (args, message) in [
        (
            vec!["usage", "--records", path, "--interval", "P1M"],
            "expected an ISO 8601 duration",
        ),
        (
            vec!["usage", "--records", bad.to_str().unwrap(), "--strict"],
            "line 1: not a usage record",
        ),
        (
            vec!["usage", "--records", path, "--from", "yesterday"],
            "--from \"yesterday\": expected an RFC 3339 time",
        ),
    ] {
        let out = apim_edge(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// `replay --usage-out` writes a record per call: who, the outcome and status, the request's
/// bytes, and the response's (the upstream's for an admitted call, the gateway's own body for
/// one it answered).
#[test]
fn replay_writes_a_usage_record_per_call() {
    let out_file = scratch("replay-usage.jsonl");
    let trace = scratch("usage-trace.jsonl");
    std::fs::write(
        &trace,
        [
            r#"{"t": 0, "method": "GET", "url": "https://api.contoso.com/echo/items/1", "headers": {"Ocp-Apim-Subscription-Key": "gold-primary"}, "requestBytes": 7, "responseBytes": 300}"#,
            r#"{"t": 1, "method": "GET", "url": "https://api.contoso.com/echo/items/1", "headers": {"Ocp-Apim-Subscription-Key": "wrong"}, "requestBytes": 3, "responseBytes": 300}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        &sample(),
        "--trace",
        trace.to_str().unwrap(),
        "--usage-out",
        out_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    // A trace's `t` counts seconds after --start, 2026-01-01T00:00:00Z by default (SPEC §6).
    assert_eq!(records[0]["time"], "2026-01-01T00:00:00.000Z", "{text}");
    assert_eq!(records[1]["time"], "2026-01-01T00:00:01.000Z", "{text}");
    assert_eq!(records[0]["subscription"], "sub-gold");
    assert_eq!(records[0]["outcome"], "allowed");
    assert_eq!(records[0]["status"], 200);
    assert_eq!(
        (&records[0]["requestBytes"], &records[0]["responseBytes"]),
        (&serde_json::json!(7), &serde_json::json!(300))
    );
    let denied = &records[1];
    assert_eq!(denied["outcome"], "invalid_key");
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["subscription"], serde_json::Value::Null);
    let body = "{\"statusCode\": 401, \"message\": \"Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.\"}";
    assert_eq!(denied["responseBytes"], body.len());
}

/// Keys never leak from the command line (issue #22): `check` of a catalog with plain keys,
/// and `replay` (natively and in the wasmtime host with the filter's log at trace level, as
/// JSON and as a table, with usage records) of calls with right and wrong keys in the header
/// and the query: no key text in any output or error.
#[test]
fn keys_reach_no_output_of_check_or_replay() {
    let secrets = ["gold-primary", "leaky-wrong-key-1", "leaky-wrong-key-2"];
    let trace = scratch("leaky-trace.jsonl");
    std::fs::write(
        &trace,
        [
            format!(r#"{{"t": 0, "method": "GET", "url": "https://api.contoso.com/echo/items/1", "headers": {{"Ocp-Apim-Subscription-Key": "{}"}}}}"#, secrets[0]),
            format!(r#"{{"t": 1, "method": "GET", "url": "https://api.contoso.com/echo/items/1", "headers": {{"Ocp-Apim-Subscription-Key": "{}"}}}}"#, secrets[1]),
            format!(r#"{{"t": 2, "method": "GET", "url": "https://api.contoso.com/echo/items/1?subscription-key={}"}}"#, secrets[2]),
            format!(r#"{{"t": 3, "method": "GET", "url": "https://api.contoso.com/echo/items/1?subscription-key={}"}}"#, secrets[0]),
        ]
        .join("\n"),
    )
    .unwrap();
    let usage = scratch("leaky-usage.jsonl");
    let filter = apim_edge_harness::build::filter_wasm();
    let (trace, usage, filter) = (
        trace.to_str().unwrap(),
        usage.to_str().unwrap(),
        filter.to_str().unwrap(),
    );
    let sample = sample();
    let runs: Vec<Vec<&str>> = vec![
        vec!["check", &sample],
        vec![
            "replay",
            "--snapshot",
            &sample,
            "--trace",
            trace,
            "--usage-out",
            usage,
        ],
        vec![
            "replay",
            "--snapshot",
            &sample,
            "--trace",
            trace,
            "--format",
            "table",
        ],
        vec![
            "replay",
            "--snapshot",
            &sample,
            "--trace",
            trace,
            "--wasm",
            filter,
            "--log-level",
            "trace",
            "--diff",
        ],
    ];
    for args in runs {
        let out = apim_edge(&args);
        let text = format!(
            "{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(usage).unwrap_or_default()
        );
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "{args:?}: {text}"
        );
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{args:?} shows a key ({secret}):\n{text}"
            );
        }
    }
}
