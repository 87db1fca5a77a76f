//! The filter's `.wasm` in real Envoy 1.40 (`--concurrency 4`), with real HTTP on loopback.

use apim_edge_e2e::start_envoy_lds;
use apim_edge_e2e::{
    request, request_raw, root, send_entry, start_envoy, start_envoy_logging, start_envoy_with,
    start_upstream, ConfigServer, Response,
};
use apim_edge_harness::trace::{self, Entry};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn sample() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/catalog/sample.json")).unwrap(),
    )
    .unwrap()
}

fn send(port: u16, e: &Entry) -> Response {
    let mut extra = Vec::new();
    if e.upstream_status != 200 {
        extra.push((
            "x-upstream-status".to_string(),
            e.upstream_status.to_string(),
        ));
    }
    send_entry(port, e, &extra)
}

/// Where Envoy's transport differs from the decision, by design: (trace, line index, header).
/// Envoy drops `content-type` from a local reply whose body is empty, so `mock-response`
/// without a body arrives without it (the engine's decision carries it; see the README).
const ENVOY_DIFFERENCES: [(&str, usize, &str); 1] = [("policies.jsonl", 14, "content-type")];

/// Status, headers and body as each line of the trace expects, and what the upstream receives
/// where it expects that (outcomes are checked through the access log in another test: HTTP
/// does not carry them). A trace's `NAME.config.json`, when there is one, is merged into the
/// filter configuration.
fn replay_through_envoy(name: &str) {
    let upstream = start_upstream();
    let mut config = json!({"snapshot": sample()});
    let sidecar = root()
        .join("tests/traces")
        .join(name)
        .with_extension("config.json");
    if let Ok(text) = std::fs::read_to_string(&sidecar) {
        let extra: Value = serde_json::from_str(&text).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
    }
    let envoy = start_envoy(&upstream, &config).unwrap();
    let text = std::fs::read_to_string(root().join("tests/traces").join(name)).unwrap();
    let entries = trace::parse(&text, 0).unwrap();
    let mut wrong = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let r = send(envoy.port, e);
        let expect = e.expect.as_ref().unwrap();
        if expect.status != Some(r.status) {
            wrong.push(format!(
                "{name}[{i}] {} {}: status {} (expected {:?}) {}",
                e.method, e.path, r.status, expect.status, r.body
            ));
        }
        for (h, v) in &expect.headers {
            if ENVOY_DIFFERENCES.contains(&(name, i, h.as_str())) {
                assert_eq!(
                    r.header(h),
                    None,
                    "{name}[{i}]: Envoy now keeps {h}: drop the exception"
                );
                continue;
            }
            if r.header(h).as_deref() != Some(v) {
                wrong.push(format!(
                    "{name}[{i}]: header {h} is {:?}, expected {v:?}",
                    r.header(h)
                ));
            }
        }
        for h in &expect.absent {
            if let Some(v) = r.header(h) {
                wrong.push(format!("{name}[{i}]: header {h} is {v:?}, expected absent"));
            }
        }
        if let Some(b) = &expect.body {
            if &r.body != b {
                wrong.push(format!("{name}[{i}]: body {:?}, expected {b:?}", r.body));
            }
        }
        if let Some(up) = &expect.upstream {
            let Ok(seen) = serde_json::from_str::<Value>(&r.body) else {
                wrong.push(format!(
                    "{name}[{i}]: did not reach the upstream: {}",
                    r.body
                ));
                continue;
            };
            if let Some(m) = &up.method {
                if seen["method"] != m.as_str() {
                    wrong.push(format!(
                        "{name}[{i}]: upstream method {}, expected {m:?}",
                        seen["method"]
                    ));
                }
            }
            if let Some(p) = &up.path {
                if seen["path"] != p.as_str() {
                    wrong.push(format!(
                        "{name}[{i}]: upstream path {}, expected {p:?}",
                        seen["path"]
                    ));
                }
            }
            for (h, v) in &up.headers {
                if seen["headers"].get(h).and_then(Value::as_str) != v.as_deref() {
                    wrong.push(format!(
                        "{name}[{i}]: upstream header {h} is {}, expected {v:?}",
                        seen["headers"][h]
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every subscription key of the sample catalog.
fn sample_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for s in sample()["subscriptions"].as_array().unwrap() {
        for k in ["primaryKey", "secondaryKey"] {
            if let Some(key) = s["properties"][k].as_str() {
                keys.push(key.to_string());
            }
        }
    }
    keys
}

#[test]
fn edge_trace_through_envoy() {
    replay_through_envoy("edge.jsonl");
}

/// With `stripSubscriptionKey`, no key text reaches the upstream, wherever and however often
/// the client put it: the upstream's own view of every request (its raw head) is searched.
#[test]
fn no_key_text_reaches_the_upstream_when_keys_are_stripped() {
    let upstream = start_upstream();
    let envoy = start_envoy(
        &upstream,
        &json!({"snapshot": sample(), "stripSubscriptionKey": true}),
    )
    .unwrap();
    let key = |k: &str| vec![("Ocp-Apim-Subscription-Key".to_string(), k.to_string())];
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("/echo/items/1?subscription-key=starter-primary", vec![]),
        ("/echo/items/1?subscription%2Dkey=starter2-primary", vec![]),
        ("/echo/items/1?subscription%2dkey=all-apis-key&x=1", vec![]),
        (
            "/echo/items/1?x=1&subscription-key=echo-only-key",
            key("echo-only-key"),
        ),
        (
            "/echo/items/1?subscription-key=gold-primary",
            key("starter-primary"),
        ),
        // A repeated key parameter is no key (docs/choices.md); beside a header key, both of
        // its values are stripped all the same.
        (
            "/echo/items/1?subscription-key=service-key&subscription-key=trial-primary",
            key("all-apis-key"),
        ),
        ("/echo/items/1", key("starter2-primary")),
        ("/public/anything?subscription-key=service-key", vec![]),
        ("/partner/orders?partner-key=partner-key-1", {
            vec![
                ("X-Partner-Key".to_string(), "partner-key-1".to_string()),
                ("x-partner".to_string(), "acme".to_string()),
                ("x-forwarded-for".to_string(), "10.0.0.7".to_string()),
            ]
        }),
    ];
    let keys = sample_keys();
    for (target, headers) in &cases {
        let r = request(envoy.port, "GET", target, headers);
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        let seen: Value = serde_json::from_str(&r.body).unwrap();
        let head = seen["head"].as_str().unwrap();
        for k in &keys {
            assert!(
                !head.contains(k.as_str()),
                "{target}: the upstream received {k}:\n{head}"
            );
        }
    }
}

#[test]
fn routing_trace_through_envoy() {
    replay_through_envoy("routing.jsonl");
}

#[test]
fn policies_trace_through_envoy() {
    replay_through_envoy("policies.jsonl");
}

/// Tiers by `set-variable` and `choose`: a limit per branch, a blocked tier answered by
/// `return-response` with a computed body, an outbound header from the inbound variable.
#[test]
fn choose_trace_through_envoy() {
    replay_through_envoy("choose.jsonl");
}

#[test]
fn cors_trace_through_envoy() {
    replay_through_envoy("cors.jsonl");
}

/// validate-jwt with RS256, ES256 and HS256 keys: valid tokens pass; expired, wrongly signed,
/// wrong audience or issuer, no scheme, garbage, absent and unscoped tokens get the policy's 401.
#[test]
fn jwt_trace_through_envoy() {
    replay_through_envoy("jwt.jsonl");
}

/// rewrite-uri, set-method and set-query-parameter: the upstream receives the method, path and
/// query the policies made, the key stripped from the query as they left it.
#[test]
fn rewrite_trace_through_envoy() {
    replay_through_envoy("rewrite.jsonl");
}

/// A request (method, path, headers) and the status and body Envoy must answer with.
type LocalReplyCase = (
    &'static str,
    &'static str,
    Vec<(String, String)>,
    u16,
    &'static str,
);

#[test]
fn every_local_response_of_spec_section_4() {
    let upstream = start_upstream();
    let envoy = start_envoy(&upstream, &json!({"snapshot": sample()})).unwrap();
    let key = |k: &str| {
        vec![
            ("Ocp-Apim-Subscription-Key".to_string(), k.to_string()),
            ("host".into(), "api.contoso.com".into()),
        ]
    };
    let cases: Vec<LocalReplyCase> = vec![
        (
            "GET",
            "/nowhere",
            key("all-apis-key"),
            404,
            r#"{"statusCode": 404, "message": "Resource not found"}"#,
        ),
        (
            "PUT",
            "/echo/items",
            key("all-apis-key"),
            404,
            r#"{"statusCode": 404, "message": "Resource not found"}"#,
        ),
        (
            "GET",
            "/echo/items/1",
            vec![("host".into(), "api.contoso.com".into())],
            401,
            r#"{"statusCode": 401, "message": "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."}"#,
        ),
        (
            "GET",
            "/echo/items/1",
            key("nope"),
            401,
            r#"{"statusCode": 401, "message": "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."}"#,
        ),
    ];
    for (method, path, headers, status, body) in cases {
        let r = request(envoy.port, method, path, &headers);
        assert_eq!(
            (r.status, r.body.as_str()),
            (status, body),
            "{method} {path}"
        );
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    let r = request(
        envoy.port,
        "GET",
        "/echo/items/1",
        &[("host".into(), "api.contoso.com".into())],
    );
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(
            r#"AzureApiManagementKey realm="https://api.contoso.com/echo",name="Ocp-Apim-Subscription-Key",type="header""#
        )
    );
    // 429 with Retry-After, after the starter product's 5 calls per minute.
    let starter = key("starter2-primary");
    for i in 0..5 {
        let r = request(envoy.port, "GET", "/echo/items/1", &starter);
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
        assert_eq!(r.header("x-ratelimit-remaining"), Some((4 - i).to_string()));
    }
    let r = request(envoy.port, "GET", "/echo/items/1", &starter);
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((59..=60).contains(&wait), "{wait}");
    assert_eq!(
        r.body,
        format!(
            r#"{{"statusCode": 429, "message": "Rate limit is exceeded. Try again in {wait} seconds."}}"#
        )
    );
    // 403: quota (trial: 3 per hour), bandwidth (1 KiB per hour, a real upstream body), IP.
    let trial = key("trial-primary");
    for _ in 0..3 {
        assert_eq!(
            request(envoy.port, "GET", "/echo/items/1", &trial).status,
            200
        );
    }
    let r = request(envoy.port, "GET", "/echo/items/1", &trial);
    assert_eq!(r.status, 403);
    assert!(r.body.starts_with(r#"{"statusCode": 403, "message": "Out of call volume quota. Quota will be replenished in 00:"#), "{}", r.body);
    let mut bw = key("bandwidth-key");
    bw.push(("x-upstream-bytes".into(), "2000".into()));
    let first = request(envoy.port, "GET", "/media/clip", &bw);
    assert_eq!((first.status, first.body.len()), (200, 2000));
    let r = request(envoy.port, "GET", "/media/clip", &bw);
    assert_eq!(r.status, 403);
    assert!(r.body.starts_with(r#"{"statusCode": 403, "message": "Out of bandwidth quota. Quota will be replenished in "#), "{}", r.body);
    let mut forbidden = key("gold-primary");
    forbidden.push(("x-forwarded-for".into(), "203.0.113.201".into()));
    let r = request(envoy.port, "GET", "/echo/items/1", &forbidden);
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            403,
            r#"{"statusCode": 403, "message": "Caller IP address 203.0.113.201 is not allowed. Access denied."}"#
        )
    );
}

#[test]
fn the_upstream_sees_policy_headers_and_identity_but_not_the_key() {
    let upstream = start_upstream();
    let envoy = start_envoy(
        &upstream,
        &json!({"snapshot": sample(), "stripSubscriptionKey": true, "identityHeaders": true}),
    )
    .unwrap();
    let headers = vec![
        (
            "Ocp-Apim-Subscription-Key".to_string(),
            "starter-primary".to_string(),
        ),
        ("x-apim-product-id".to_string(), "forged".to_string()),
    ];
    let r = request(envoy.port, "GET", "/echo/items/1?a=1", &headers);
    assert_eq!(r.status, 200);
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["headers"]["x-apim-product-id"], "starter");
    assert_eq!(seen["headers"]["x-apim-subscription-id"], "sub-starter");
    assert_eq!(seen["headers"]["x-api"], "echo-api");
    assert!(
        seen["headers"].get("ocp-apim-subscription-key").is_none(),
        "{seen}"
    );
    let r = request(
        envoy.port,
        "GET",
        "/echo/items/1?a=1&subscription-key=starter-primary",
        &[],
    );
    assert_eq!(r.status, 200);
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["path"], "/echo/items/1?a=1");
}

/// HTTP/1.1 lets a header value carry bytes that are not UTF-8 (obs-text), and Envoy passes
/// them on. The filter reads such a request like any other (the value as text with the
/// replacement character), and its VM lives on to decide the next call.
#[test]
fn a_header_value_that_is_not_utf8_is_decided_and_the_worker_lives_on() {
    let upstream = start_upstream();
    let envoy = start_envoy(&upstream, &json!({"snapshot": sample()})).unwrap();
    let head = |key: &str| {
        let mut h =
            b"GET /echo/items/1 HTTP/1.1\r\nhost: localhost\r\nx-note: caf\xe9 cr\xe8me\r\n"
                .to_vec();
        h.extend_from_slice(format!("ocp-apim-subscription-key: {key}\r\n").as_bytes());
        h.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n\r\n");
        h
    };
    // Sequentially, more calls than Envoy's four workers: every VM sees one.
    for _ in 0..8 {
        let r = request_raw(envoy.port, &head("service-key")).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.body, envoy.log_text());
        // The value reaches the upstream as it was sent (the echo decodes it lossily).
        let seen: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            seen["headers"]["x-note"], "caf\u{fffd} cr\u{fffd}me",
            "{seen}"
        );
        let r = request_raw(envoy.port, &head("no-such-key")).unwrap();
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r.body.contains("invalid subscription key"), "{}", r.body);
    }
    let r = request(
        envoy.port,
        "GET",
        "/echo/items/1",
        &[(
            "Ocp-Apim-Subscription-Key".to_string(),
            "service-key".to_string(),
        )],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !envoy.log_text().contains("panicked"),
        "{}",
        envoy.log_text()
    );
}

/// A set-header whose value comes from the request can carry what no header value may (a
/// CR LF decoded from the query). The filter hands it to Envoy, whose codec refuses the
/// request (503, "invalid header value"); the worker's VM lives on and decides the next call.
#[test]
fn a_header_value_envoy_refuses_does_not_stop_the_worker() {
    let upstream = start_upstream();
    let snapshot = limited_catalog(
        r#"<policies><inbound><set-header name="x-from-query" exists-action="override"><value>@(context.Request.Url.Query.GetValueOrDefault("v", "none"))</value></set-header></inbound></policies>"#,
    );
    let envoy = start_envoy(&upstream, &json!({"snapshot": snapshot})).unwrap();
    let key = [(
        "Ocp-Apim-Subscription-Key".to_string(),
        "bulk-key".to_string(),
    )];
    // More calls than Envoy's four workers: every VM sees one.
    for _ in 0..8 {
        let r = request(envoy.port, "GET", "/load/x?v=a%0D%0Ab%00c", &key);
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("invalid header value"), "{}", r.body);
    }
    let r = request(envoy.port, "GET", "/load/x?v=plain", &key);
    assert_eq!(r.status, 200, "{}\n{}", r.body, envoy.log_text());
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["headers"]["x-from-query"], "plain", "{seen}");
    assert!(
        !envoy.log_text().contains("panicked"),
        "{}",
        envoy.log_text()
    );
}

/// `total` calls from 64 concurrent connections; the statuses seen, counted.
fn hammer(
    port: u16,
    total: usize,
    path: &str,
    key: &str,
) -> std::collections::BTreeMap<u16, usize> {
    let sent = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (sent, seen, path, key) = (
                sent.clone(),
                seen.clone(),
                path.to_string(),
                key.to_string(),
            );
            std::thread::spawn(move || {
                while sent.fetch_add(1, Ordering::SeqCst) < total {
                    let r = request(
                        port,
                        "GET",
                        &path,
                        &[("Ocp-Apim-Subscription-Key".into(), key.clone())],
                    );
                    *seen.lock().unwrap().entry(r.status).or_insert(0) += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
}

fn limited_catalog(policy: &str) -> Value {
    json!({
        "apis": [{"name": "load", "path": "load"}],
        "products": [{"name": "bulk", "apis": ["load"], "policy": policy}],
        "subscriptions": [{"name": "bulk-sub", "properties": {"scope": "/products/bulk", "primaryKey": "bulk-key"}}]
    })
}

#[test]
fn a_quota_of_1000_admits_exactly_1000_across_4_workers() {
    let upstream = start_upstream();
    let snapshot = limited_catalog(
        r#"<policies><inbound><quota calls="1000" renewal-period="86400" /></inbound></policies>"#,
    );
    let envoy = start_envoy(&upstream, &json!({"snapshot": snapshot})).unwrap();
    let seen = hammer(envoy.port, 1300, "/load/x", "bulk-key");
    assert_eq!(seen.get(&200), Some(&1000), "{seen:?}");
    assert_eq!(seen.get(&403), Some(&300), "{seen:?}");
}

/// `workerLeases` in real Envoy: four workers admit from shares of a quota of 1,000 they take
/// from shared data. Never past the quota; under a share (64) per worker left unspent.
#[test]
fn worker_leases_never_over_admit_a_quota_across_4_workers() {
    let upstream = start_upstream();
    let snapshot = limited_catalog(
        r#"<policies><inbound><quota calls="1000" renewal-period="86400" /></inbound></policies>"#,
    );
    let config = json!({"snapshot": snapshot, "workerLeases": {"calls": 64, "minLimit": 1000}});
    let envoy = start_envoy(&upstream, &config).unwrap();
    let seen = hammer(envoy.port, 1300, "/load/x", "bulk-key");
    let (admitted, refused) = (
        seen.get(&200).copied().unwrap_or(0),
        seen.get(&403).copied().unwrap_or(0),
    );
    assert_eq!(admitted + refused, 1300, "{seen:?}");
    assert!(admitted <= 1000, "{seen:?}");
    assert!(admitted > 1000 - 4 * 64, "{seen:?}");
}

#[test]
fn a_rate_limit_of_300_admits_exactly_300_within_its_window() {
    let upstream = start_upstream();
    let snapshot = limited_catalog(
        r#"<policies><inbound><rate-limit calls="300" renewal-period="300" /></inbound></policies>"#,
    );
    let envoy = start_envoy(&upstream, &json!({"snapshot": snapshot})).unwrap();
    let seen = hammer(envoy.port, 500, "/load/x", "bulk-key");
    assert_eq!(seen.get(&200), Some(&300), "{seen:?}");
    assert_eq!(seen.get(&429), Some(&200), "{seen:?}");
}

#[test]
fn a_snapshot_that_does_not_load_is_refused_with_the_reason() {
    let upstream = start_upstream();
    let broken =
        json!({"products": [{"name": "p", "properties": {"subscriptionRequired": "yes"}}]});
    let log = match start_envoy(&upstream, &json!({"snapshot": broken})) {
        Ok(e) => panic!("Envoy took a broken snapshot:\n{}", e.log_text()),
        Err(log) => log,
    };
    // One line that says why.
    assert_eq!(
        log.lines().filter(|l| l.contains("wasm log")).count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("apim-edge: configuration refused: snapshot: 1 errors; the first: products[0].properties.subscriptionRequired: expected a boolean"),
        "{log}"
    );
}

/// `emit-metric` in Envoy: each call that runs it adds its value to an Envoy counter of the
/// namespace and name (defined on first use in each worker VM).
#[test]
fn emit_metric_becomes_an_envoy_counter() {
    let upstream = start_upstream();
    let snapshot = limited_catalog(
        r#"<policies><inbound><emit-metric name="api-requests" namespace="custom-metrics" value="2"><dimension name="API" /></emit-metric></inbound></policies>"#,
    );
    let envoy = start_envoy(&upstream, &json!({"snapshot": snapshot})).unwrap();
    let key = [(
        "Ocp-Apim-Subscription-Key".to_string(),
        "bulk-key".to_string(),
    )];
    for _ in 0..5 {
        assert_eq!(request(envoy.port, "GET", "/load/x", &key).status, 200);
    }
    let name = "apim_edge.metric.custom-metrics.api-requests";
    let stats = envoy.stats(name);
    let total: u64 = stats
        .iter()
        .filter(|(n, _)| n.ends_with(name))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 10, "{stats:?}");
}

/// SPEC §8 in Envoy: the bootstrap writes a usage record per call (JSON Lines), which
/// `apim-edge usage` reads into a report: an admitted call, a blocked one (invalid key), and
/// one that matched no API.
#[test]
fn envoy_writes_usage_records_that_the_usage_report_reads() {
    let upstream = start_upstream();
    let envoy = start_envoy(&upstream, &json!({"snapshot": sample()})).unwrap();
    let host = ("host".to_string(), "api.contoso.com".to_string());
    let gold = (
        "Ocp-Apim-Subscription-Key".to_string(),
        "gold-primary".to_string(),
    );
    let ok = request(envoy.port, "GET", "/echo/items/1", &[gold, host.clone()]);
    assert_eq!(ok.status, 200);
    let wrong = ("Ocp-Apim-Subscription-Key".to_string(), "wrong".to_string());
    let denied = request(envoy.port, "GET", "/echo/items/1", &[wrong, host.clone()]);
    assert_eq!(denied.status, 401);
    let lost = request(envoy.port, "GET", "/nowhere", &[host]);
    assert_eq!(lost.status, 404);
    let mut lines = Vec::new();
    for _ in 0..50 {
        let text = std::fs::read_to_string(&envoy.usage_log).unwrap_or_default();
        lines = text.lines().map(str::to_string).collect();
        if lines.len() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let admitted = &records[0];
    assert_eq!(admitted["subscription"], "sub-gold", "{admitted}");
    assert_eq!(admitted["product"], "gold", "{admitted}");
    assert_eq!(admitted["api"], "echo-api", "{admitted}");
    assert_eq!(admitted["outcome"], "allowed", "{admitted}");
    assert_eq!(admitted["status"], 200, "{admitted}");
    assert_eq!(admitted["responseBytes"], ok.body.len(), "{admitted}");
    assert!(
        admitted["time"].as_str().unwrap().ends_with('Z'),
        "{admitted}"
    );
    assert_eq!(records[1]["outcome"], "invalid_key", "{}", records[1]);
    assert_eq!(records[1]["subscription"], Value::Null, "{}", records[1]);
    assert_eq!(
        records[1]["responseBytes"],
        denied.body.len(),
        "{}",
        records[1]
    );
    assert_eq!(records[2]["outcome"], "api_not_found", "{}", records[2]);
    assert_eq!(records[2]["api"], Value::Null, "{}", records[2]);
    // The report: one subscription, its one call succeeded.
    let out = std::process::Command::new(apim_edge_e2e::cli_bin())
        .args(["usage", "--records"])
        .arg(&envoy.usage_log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 1, "{report}");
    assert_eq!(report["value"][0]["name"], "sub-gold", "{report}");
    assert_eq!(report["value"][0]["callCountSuccess"], 1, "{report}");
}

/// `filterState` names the fields the access log may read: the others are not set (each
/// costs a host call a call).
#[test]
fn filter_state_holds_only_the_fields_configured() {
    let upstream = start_upstream();
    let config = json!({"snapshot": sample(), "filterState": ["outcome", "subscription"]});
    let envoy = start_envoy(&upstream, &config).unwrap();
    let ok = request(
        envoy.port,
        "GET",
        "/echo/items/1",
        &[
            ("Ocp-Apim-Subscription-Key".into(), "gold-primary".into()),
            ("host".into(), "api.contoso.com".into()),
        ],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let mut log = String::new();
    for _ in 0..50 {
        log = envoy.access_log_text();
        if log.contains("/echo/items/1") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        log.contains(
            "ACCESS GET /echo/items/1 200 outcome=allowed product=- subscription=sub-gold"
        ),
        "{log}"
    );
}

#[test]
fn access_log_and_metrics_carry_the_decisions() {
    let upstream = start_upstream();
    let envoy = start_envoy(&upstream, &json!({"snapshot": sample()})).unwrap();
    let host = ("host".to_string(), "api.contoso.com".to_string());
    let ok = request(
        envoy.port,
        "GET",
        "/echo/items/1",
        &[
            ("Ocp-Apim-Subscription-Key".into(), "gold-primary".into()),
            host.clone(),
        ],
    );
    assert_eq!(ok.status, 200);
    // Keys in the query, a wrong one and a right one: the access log shows neither.
    let wrong = request(
        envoy.port,
        "GET",
        "/echo/items/3?subscription-key=wrong-secret-key",
        std::slice::from_ref(&host),
    );
    assert_eq!(wrong.status, 401);
    let queried = request(
        envoy.port,
        "GET",
        "/echo/items/4?x=1&subscription-key=gold-primary",
        std::slice::from_ref(&host),
    );
    assert_eq!(queried.status, 200);
    let missing = request(envoy.port, "GET", "/echo/items/2", &[host]);
    assert_eq!(missing.status, 401);
    // Each worker adds its calls by outcome to the metrics once a second (on its next call or
    // tick): wait for the four calls to show, then check each count.
    let mut stats = envoy.stats("apim_edge");
    for _ in 0..40 {
        let counted: u64 = stats
            .iter()
            .filter(|(n, _)| n.contains("apim_edge.requests."))
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum();
        if counted >= 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        stats = envoy.stats("apim_edge");
    }
    let stat = |name: &str| {
        stats
            .iter()
            .find(|(n, _)| n.ends_with(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        stat("apim_edge.requests.allowed").as_deref(),
        Some("2"),
        "{stats:?}"
    );
    assert_eq!(
        stat("apim_edge.requests.invalid_key").as_deref(),
        Some("1"),
        "{stats:?}"
    );
    assert_eq!(
        stat("apim_edge.requests.missing_key").as_deref(),
        Some("1"),
        "{stats:?}"
    );
    // The same counters in Prometheus format (Envoy strips the wasmcustom namespace).
    let prometheus = request(envoy.admin, "GET", "/stats/prometheus", &[]).body;
    assert!(
        prometheus.contains("apim_edge_requests_allowed{} 2"),
        "{prometheus}"
    );
    assert!(
        prometheus.contains("apim_edge_requests_missing_key{} 1"),
        "{prometheus}"
    );
    // The access log is written when a stream ends; give Envoy a moment to flush it.
    let mut log = String::new();
    for _ in 0..50 {
        log = envoy.access_log_text();
        if log.contains("/echo/items/2") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        log.contains(
            "ACCESS GET /echo/items/1 200 outcome=allowed product=gold subscription=sub-gold"
        ),
        "{log}"
    );
    assert!(
        log.contains("ACCESS GET /echo/items/2 401 outcome=missing_key product=- subscription=-"),
        "{log}"
    );
    assert!(
        log.contains("ACCESS GET /echo/items/3 401 outcome=invalid_key")
            && log.contains("ACCESS GET /echo/items/4 200 outcome=allowed product=gold"),
        "{log}"
    );
    for key in ["wrong-secret-key", "gold-primary"] {
        assert!(!log.contains(key), "the access log carries a key: {log}");
    }
}

fn reload_catalog(keys: &[(&str, &str)]) -> String {
    let subs: Vec<Value> = keys
        .iter()
        .map(|(name, key)| json!({"name": name, "properties": {"scope": "/products/p", "primaryKey": key}}))
        .collect();
    json!({
        "apis": [{"name": "a", "path": "a"}],
        "products": [{"name": "p", "apis": ["a"], "policy": "<policies><inbound><rate-limit calls=\"3\" renewal-period=\"300\" /></inbound></policies>"}],
        "subscriptions": subs
    })
    .to_string()
}

fn status_with(port: u16, key: &str) -> u16 {
    request(
        port,
        "GET",
        "/a/x",
        &[("Ocp-Apim-Subscription-Key".into(), key.into())],
    )
    .status
}

/// Polls until a call with `key` gets `want` (within 15 s); the calls made, with statuses.
fn until(port: u16, key: &str, want: u16) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..75 {
        let s = status_with(port, key);
        seen.push(s);
        if s == want {
            return seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("no {want} for {key} in 15 s: {seen:?}");
}

#[test]
fn snapshots_from_a_source_reload_without_a_restart_and_keep_counters() {
    let upstream = start_upstream();
    let source = ConfigServer::start(&reload_catalog(&[("s1", "k1")]));
    let config = json!({"snapshotSource": {"cluster": "apim-config", "authority": "config", "path": "/snapshot.json", "refreshSeconds": 1}});
    let envoy = start_envoy_with(&upstream, &config, Some(&source)).unwrap();

    // Until the first fetch loads, calls are internal errors (failureMode closed). Each worker
    // picks the loaded snapshot up on its next tick, so for a while a call may still meet one
    // that has not: a 500, counted nowhere. Nothing else may come before the answer wanted.
    let once_loaded = |key: &str, want: u16| {
        let seen = until(envoy.port, key, want);
        assert!(
            seen[..seen.len() - 1].iter().all(|s| *s == 500),
            "{key}: {seen:?}"
        );
    };
    once_loaded("k1", 200);
    once_loaded("k1", 200); // 2 of s1's 3 calls used
    once_loaded("k2", 401);

    // A new snapshot: k2 becomes valid without a restart...
    source.replace(&reload_catalog(&[("s1", "k1"), ("s2", "k2")]));
    let polled = until(envoy.port, "k2", 200);
    assert!(polled.iter().all(|s| *s == 401 || *s == 200), "{polled:?}");
    // ...and s1's rate-limit counter carried over: one call left, then 429.
    assert_eq!(status_with(envoy.port, "k1"), 200);
    assert_eq!(status_with(envoy.port, "k1"), 429);

    // Unchanged snapshot: one fetch per refresh period for all 4 workers, answered 304.
    let before = source.fetches();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let fetched = source.fetches() - before;
    assert!((1..=5).contains(&fetched), "{fetched} fetches in 3 s");

    // A broken snapshot is refused everywhere; the last good one keeps serving.
    source.replace("{\"apis\": [{\"name\": \"a\"}, {\"name\": \"a\"}]}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(status_with(envoy.port, "k2"), 200);
    let stats = envoy.stats("apim_edge.snapshot");
    let failures: u64 = stats
        .iter()
        .find(|(n, _)| n.ends_with("apim_edge.snapshot.failures"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    assert!(failures >= 1, "{stats:?}");
    assert!(
        envoy.log_text().contains(
            "refused, the last good one stays: 1 errors; the first: apis[1]: duplicate API 'a'"
        ),
        "{}",
        envoy.log_text()
    );

    // A source that fails (HTTP 500): refused too, counted, and the last good one serves on.
    source.fail_with(500);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(status_with(envoy.port, "k2"), 200);
    let after: u64 = envoy
        .stats("apim_edge.snapshot")
        .iter()
        .find(|(n, _)| n.ends_with("apim_edge.snapshot.failures"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    assert!(after > failures, "failures {failures} -> {after}");
    assert!(
        envoy
            .log_text()
            .contains("snapshotSource answered \"500\"; the last good snapshot stays"),
        "{}",
        envoy.log_text()
    );
}

#[test]
fn a_configuration_update_reloads_the_snapshot_and_keeps_counters() {
    let upstream = start_upstream();
    let first: Value = serde_json::from_str(&reload_catalog(&[("s1", "k1")])).unwrap();
    let mut lds = start_envoy_lds(&upstream, &json!({"snapshot": first})).unwrap();
    let port = lds.envoy.port;
    assert_eq!(status_with(port, "k1"), 200);
    assert_eq!(status_with(port, "k1"), 200); // 2 of s1's 3 calls used
    assert_eq!(status_with(port, "k2"), 401);

    // Envoy builds a new listener and filter configuration from the updated file.
    let second: Value =
        serde_json::from_str(&reload_catalog(&[("s1", "k1"), ("s2", "k2")])).unwrap();
    lds.update(&json!({"snapshot": second}));
    until(port, "k2", 200);
    // The counters live in shared data under the same VM id: s1 has one call left.
    assert_eq!(status_with(port, "k1"), 200);
    assert_eq!(status_with(port, "k1"), 429);

    // An update whose snapshot does not load is rejected; the configuration in force serves on.
    lds.update(&json!({"snapshot": {"apis": [{"name": "a"}, {"name": "a"}]}}));
    let log_says = |needle: &str| {
        (0..50).any(|_| {
            let found = lds.envoy.log_text().contains(needle);
            if !found {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            found
        })
    };
    assert!(
        log_says("apis[1]: duplicate API 'a'"),
        "{}",
        lds.envoy.log_text()
    );
    assert_eq!(status_with(port, "k2"), 200);
}

/// Expressions at the load-time limits run in V8 for every request on every worker, and one
/// just past a limit is refused with the reason: Envoy never starts on a configuration that
/// would trap or overflow its stack.
#[test]
fn expressions_at_the_limits_run_and_past_them_are_refused() {
    let upstream = start_upstream();
    let at_limits: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/catalog/at-limits.json")).unwrap(),
    )
    .unwrap();
    let envoy = start_envoy(&upstream, &json!({"snapshot": at_limits})).unwrap();
    for _ in 0..40 {
        let r = request(envoy.port, "GET", "/limits/x", &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let seen: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(seen["headers"]["x-chain"], "a".repeat(257));
        assert_eq!(seen["headers"]["x-nest"], "True");
    }
    assert!(!envoy.log_text().contains("panicked"));
    drop(envoy);
    let mut past = at_limits.clone();
    let deep = format!("@({}1{})", "(".repeat(500), ")".repeat(500));
    past["apis"][0]["policy"] = json!(format!(
        r#"<policies><inbound><set-header name="x-deep" exists-action="override"><value>{deep}</value></set-header></inbound></policies>"#
    ));
    let log = match start_envoy(&upstream, &json!({"snapshot": past})) {
        Ok(e) => panic!(
            "Envoy took an expression past the limits:\n{}",
            e.log_text()
        ),
        Err(log) => log,
    };
    assert!(
        log.contains("apim-edge: configuration refused")
            && log.contains("nested more than 32 deep"),
        "{log}"
    );
}

/// With only a `snapshotSource`, the first fetch is made as soon as Envoy can make it, not a
/// whole `refreshSeconds` later: calls fail (`failureMode`) only for that moment. Here the
/// period is 30 s, so a first fetch that waited for it would leave 30 s of 500s.
#[test]
fn the_first_snapshot_is_fetched_at_start_not_a_period_later() {
    let upstream = start_upstream();
    let source = ConfigServer::start(&reload_catalog(&[("s1", "k1")]));
    let config = json!({"snapshotSource": {"cluster": "apim-config", "authority": "config", "path": "/snapshot.json", "refreshSeconds": 30}});
    let envoy = start_envoy_with(&upstream, &config, Some(&source)).unwrap();
    let ready = std::time::Instant::now();
    // A request every 50 ms, each on its own connection and thread (a 500 ends when Envoy closes
    // its connection, which it may delay): (when it was sent, its status).
    let (tx, rx) = std::sync::mpsc::channel();
    let port = envoy.port;
    let mut first_200 = None;
    while first_200.is_none() && ready.elapsed().as_secs() < 10 {
        let tx = tx.clone();
        let sent = ready.elapsed();
        std::thread::spawn(move || {
            let key = ("Ocp-Apim-Subscription-Key".to_string(), "k1".to_string());
            let s = request(port, "GET", "/a/x", &[key]).status;
            let _ = tx.send((sent, s));
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        first_200 = rx
            .try_iter()
            .filter(|(_, s)| *s == 200)
            .map(|(t, _)| t)
            .min();
    }
    drop(tx);
    let gap = first_200.expect("no snapshot 10 s after Envoy was ready");
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let answers: Vec<(std::time::Duration, u16)> = rx.try_iter().collect();
    // Before it: internal errors only (failureMode closed).
    assert!(
        answers
            .iter()
            .all(|(t, s)| *s == 200 || (*s == 500 && *t < gap)),
        "{answers:?}"
    );
    let last_500 = answers
        .iter()
        .filter(|(_, s)| *s == 500)
        .map(|(t, _)| *t)
        .max();
    eprintln!(
        "first snapshot: the last 500 was sent {last_500:?} and the first 200 {gap:?} after Envoy was ready"
    );
    assert!(gap.as_secs() < 5, "{} ms", gap.as_millis());
    // Every worker has it soon after (each picks it up on its next tick).
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..8 {
        let s = request(
            envoy.port,
            "GET",
            "/a/x",
            &[("Ocp-Apim-Subscription-Key".to_string(), "nope".to_string())],
        )
        .status;
        assert_eq!(s, 401);
    }
}

/// A `return-response` in the outbound section replaces the upstream's response, as APIM's
/// does: the client gets the policy's status, headers and body, and the worker lives on.
#[test]
fn an_outbound_return_response_replaces_the_upstream_response() {
    let upstream = start_upstream();
    let snapshot = json!({
        "apis": [{"name": "a", "properties": {"path": "a", "subscriptionRequired": false},
                  "policy": r#"<policies><inbound><base /></inbound><outbound><base /><return-response><set-status code="418" reason="teapot" /><set-header name="x-replaced" exists-action="override"><value>@(context.Api.Id)</value></set-header><set-body>{"replaced": true}</set-body></return-response></outbound></policies>"#}]
    });
    let envoy = start_envoy(&upstream, &json!({"snapshot": snapshot})).unwrap();
    for _ in 0..8 {
        let r = request(envoy.port, "GET", "/a/x", &[]);
        assert_eq!((r.status, r.body.as_str()), (418, r#"{"replaced": true}"#));
        assert_eq!(r.header("x-replaced").as_deref(), Some("a"));
    }
    assert!(
        !envoy.log_text().contains("panicked"),
        "{}",
        envoy.log_text()
    );
}

/// Keys never leak (issue #22): with Envoy's wasm component logging at trace level (and the
/// filter's own log with it), an access log and usage records of every call, right and wrong
/// keys in the header, the query and both reach neither Envoy's log, nor the access log, nor
/// the usage records, nor the admin stats.
#[test]
fn keys_reach_no_log_record_or_stat_even_at_trace_level() {
    let upstream = start_upstream();
    let envoy =
        start_envoy_logging(&upstream, &json!({"snapshot": sample()}), "wasm:trace").unwrap();
    let host = ("host".to_string(), "api.contoso.com".to_string());
    let key = |k: &str| ("Ocp-Apim-Subscription-Key".to_string(), k.to_string());
    let secrets = [
        "gold-primary",
        "leaky-wrong-key-1",
        "leaky-wrong-key-2",
        "leaky-wrong-key-3",
    ];
    type Call = (String, Vec<(String, String)>, u16);
    let calls: Vec<Call> = vec![
        (
            "/echo/items/1".into(),
            vec![key(secrets[0]), host.clone()],
            200,
        ),
        (
            "/echo/items/1".into(),
            vec![key(secrets[1]), host.clone()],
            401,
        ),
        (
            format!("/echo/items/1?subscription-key={}", secrets[0]),
            vec![host.clone()],
            200,
        ),
        (
            format!("/echo/items/1?subscription-key={}", secrets[2]),
            vec![host.clone()],
            401,
        ),
        (
            format!("/echo/items/1?subscription-key={}", secrets[0]),
            vec![key(secrets[3]), host.clone()],
            401,
        ),
    ];
    for (path, headers, status) in &calls {
        let r = request(envoy.port, "GET", path, headers);
        assert_eq!(r.status, *status, "{path}: {}", r.body);
    }
    // Every call is in the records before anything is read.
    let mut usage = String::new();
    for _ in 0..50 {
        usage = std::fs::read_to_string(&envoy.usage_log).unwrap_or_default();
        if usage.lines().count() >= calls.len() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(usage.lines().count(), calls.len(), "{usage}");
    let log = envoy.log_text();
    // The trace level is on: the filter's own log lines are there.
    assert!(log.contains("wasm log"), "{log}");
    let places = [
        ("Envoy's log", log),
        ("the access log", envoy.access_log_text()),
        ("the usage records", usage),
        ("/stats", request(envoy.admin, "GET", "/stats", &[]).body),
        (
            "/stats/prometheus",
            request(envoy.admin, "GET", "/stats/prometheus", &[]).body,
        ),
    ];
    for (place, text) in &places {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{place} carries a key ({secret}):\n{text}"
            );
        }
    }
}

/// The main job (`envoy/demo.sh` runs this binary) keeps working: every request of the sample
/// traffic is decided and logged by Envoy, and the usage report follows.
#[test]
fn the_main_job_decides_every_sample_request_and_reports_usage() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apim-edge-demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // A request missing from the access log shows "?" as its status.
    assert!(!stdout.contains("     ?  "), "{stdout}");
    assert!(stdout.contains("== rewrite.jsonl"), "{stdout}");
    assert!(stdout.contains("Usage by subscription"), "{stdout}");
    assert!(stdout.contains("  sub-gold  "), "{stdout}");
}
