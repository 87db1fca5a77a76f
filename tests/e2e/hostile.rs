//! Hostile traffic through real Envoy 1.40 with the filter and the sample catalog: oversized and
//! malformed heads, keys given twice or in two places, paths that climb out of an API, methods
//! and versions a gateway does not serve, and a body far past a bandwidth quota. Each case gets
//! its documented answer (Envoy's own where its codec or normalisation decides first, SPEC §3
//! and docs/choices.md where the filter does), no VM dies, and the next ordinary call is
//! answered as ever.

use apim_edge_e2e::{request, request_raw, root, start_envoy, start_upstream, Envoy, Response};
use serde_json::{json, Value};

/// A key of subscription `sub-all-apis` (scope: every API, no product limits).
const KEY: &str = "all-apis-key";
const INVALID: &str = "Access denied due to invalid subscription key";

fn sample() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/catalog/sample.json")).unwrap(),
    )
    .unwrap()
}

fn envoy() -> Envoy {
    let upstream = start_upstream();
    start_envoy(
        &upstream,
        &json!({"snapshot": sample(), "stripSubscriptionKey": true}),
    )
    .unwrap()
}

/// A request head: the request line, `headers` as raw lines, then an empty body.
fn head(line: &str, headers: &[&[u8]]) -> Vec<u8> {
    let mut h = format!("{line}\r\nhost: api.contoso.com\r\n").into_bytes();
    for header in headers {
        h.extend_from_slice(header);
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n\r\n");
    h
}

fn key_line(key: &str) -> Vec<u8> {
    format!("ocp-apim-subscription-key: {key}").into_bytes()
}

/// What the upstream received, from its echo: the path, and every header's value.
fn upstream_saw(r: &Response) -> (String, String) {
    let seen: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (
        seen["path"].as_str().unwrap_or("").to_string(),
        seen["headers"].to_string(),
    )
}

/// After each hostile request, an ordinary call is answered as ever (on every worker, over
/// several calls), and nothing has panicked.
fn still_serving(envoy: &Envoy, after: &str) {
    for _ in 0..4 {
        let r = request(
            envoy.port,
            "GET",
            "/echo/items/1",
            &[("Ocp-Apim-Subscription-Key".into(), KEY.into())],
        );
        assert_eq!(r.status, 200, "after {after}: {}", r.body);
    }
    let log = envoy.log_text();
    assert!(!log.contains("panicked"), "after {after}:\n{log}");
}

#[test]
fn hostile_heads_get_their_documented_answers_and_the_workers_live_on() {
    let envoy = envoy();
    let key = key_line(KEY);
    let big = [b"x-big: ".as_slice(), &vec![b'a'; 60 * 1024]].concat();
    let many: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("x-h{i}: v").into_bytes())
        .collect();
    let mut many_refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
    many_refs.push(&key);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // Envoy's limits on a request head (60 KiB, 100 headers) answer before any filter.
        (
            "a 60 KiB header value",
            head("GET /echo/items/1 HTTP/1.1", &[&key, &big]),
            431,
            "",
        ),
        (
            "200 headers",
            head("GET /echo/items/1 HTTP/1.1", &many_refs),
            431,
            "",
        ),
        // Envoy's codec refuses a NUL in a header value.
        (
            "a NUL in a header value",
            head("GET /echo/items/1 HTTP/1.1", &[&key, b"x-nul: a\0b"]),
            400,
            "",
        ),
        // A key that is not UTF-8 is no key of any subscription.
        (
            "key bytes that are not UTF-8",
            head(
                "GET /echo/items/1 HTTP/1.1",
                &[b"ocp-apim-subscription-key: \xff\xfe\x80"],
            ),
            401,
            INVALID,
        ),
        // SPEC §3.3: the header, when present, is the key; the query parameter is not read.
        (
            "a valid header key and an invalid query key",
            head("GET /echo/items/1?subscription-key=nope HTTP/1.1", &[&key]),
            200,
            "",
        ),
        (
            "an invalid header key and a valid query key",
            head(
                &format!("GET /echo/items/1?subscription-key={KEY} HTTP/1.1"),
                &[b"ocp-apim-subscription-key: nope"],
            ),
            401,
            INVALID,
        ),
        // docs/choices.md: a key given twice is its values joined, as HTTP reads a repeated
        // field: no subscription's key, whatever the two are.
        (
            "the key header twice, the same valid key",
            head("GET /echo/items/1 HTTP/1.1", &[&key, &key]),
            401,
            INVALID,
        ),
        (
            "the key header twice, valid then invalid",
            head(
                "GET /echo/items/1 HTTP/1.1",
                &[&key, b"ocp-apim-subscription-key: nope"],
            ),
            401,
            INVALID,
        ),
        (
            "the key parameter twice",
            head(
                &format!(
                    "GET /echo/items/1?subscription-key={KEY}&subscription-key={KEY} HTTP/1.1"
                ),
                &[],
            ),
            401,
            INVALID,
        ),
        // Paths are normalised before the filter decides: climbing out of the open API
        // `public` lands on /admin, which no API serves.
        (
            "/public/../admin",
            head("GET /public/../admin HTTP/1.1", &[]),
            404,
            "Resource not found",
        ),
        (
            "/public/%2e%2e/admin",
            head("GET /public/%2e%2e/admin HTTP/1.1", &[]),
            404,
            "Resource not found",
        ),
        // A method no operation serves (CONNECT, without Envoy's upgrade support) and
        // HTTP/1.0 (which Envoy does not accept by default).
        (
            "CONNECT",
            b"CONNECT api.contoso.com:443 HTTP/1.1\r\nhost: api.contoso.com:443\r\n\r\n".to_vec(),
            404,
            "",
        ),
        (
            "HTTP/1.0 without Host",
            format!("GET /echo/items/1 HTTP/1.0\r\nocp-apim-subscription-key: {KEY}\r\n\r\n")
                .into_bytes(),
            426,
            "",
        ),
    ];
    for (name, raw, status, body) in cases {
        let r = request_raw(envoy.port, &raw).unwrap();
        assert_eq!(r.status, status, "{name}: {}", r.body);
        assert!(r.body.contains(body), "{name}: {}", r.body);
        // What reached the upstream never carries the key.
        if r.status == 200 {
            let (_, headers) = upstream_saw(&r);
            assert!(!headers.contains(KEY), "{name}: {headers}");
        }
        still_serving(&envoy, name);
    }
}

/// What the upstream receives is the path the filter decided on: dot segments resolved and
/// doubled slashes merged first; and a key parameter whose name or value is percent-encoded is
/// read once decoded (docs/choices.md) and stripped all the same.
#[test]
fn the_upstream_gets_the_path_that_was_decided_and_never_the_key() {
    let envoy = envoy();
    let key = key_line(KEY);
    for (target, headers, path) in [
        ("/public/../public/x", vec![], "/public/x"),
        ("//echo//items/1", vec![key.as_slice()], "/echo/items/1"),
        ("/echo/./items/1", vec![key.as_slice()], "/echo/items/1"),
        (
            "/echo/items/1?subscription%2Dkey=all-apis-key",
            vec![],
            "/echo/items/1",
        ),
        (
            "/echo/items/1?subscription-key=all%2Dapis%2Dkey",
            vec![],
            "/echo/items/1",
        ),
    ] {
        let r = request_raw(
            envoy.port,
            &head(&format!("GET {target} HTTP/1.1"), &headers),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        let (seen, seen_headers) = upstream_saw(&r);
        assert_eq!(seen, path, "{target}");
        assert!(!seen_headers.contains(KEY), "{target}: {seen_headers}");
        assert!(
            !seen_headers.contains("all%2Dapis"),
            "{target}: {seen_headers}"
        );
    }
    still_serving(&envoy, "normalised paths");
}

/// A 10 MB body against a bandwidth quota of 1 KiB an hour (product `bandwidth`): the call is
/// admitted (bandwidth is checked when a call arrives and counted when it completes, SPEC §3),
/// and the next call is refused until the window renews.
#[test]
fn a_10_mb_body_spends_a_bandwidth_quota_and_the_next_call_is_refused() {
    let envoy = envoy();
    let body = vec![b'x'; 10 * 1024 * 1024];
    let mut raw = format!(
        "POST /media/clip HTTP/1.1\r\nhost: api.contoso.com\r\nocp-apim-subscription-key: bandwidth-key\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let r = request_raw(envoy.port, &raw).unwrap();
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    let key = [(
        "Ocp-Apim-Subscription-Key".to_string(),
        "bandwidth-key".to_string(),
    )];
    // Completion is counted as the exchange ends; a moment later the next call is refused.
    let mut next = request(envoy.port, "GET", "/media/clip", &key);
    for _ in 0..20 {
        if next.status == 403 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        next = request(envoy.port, "GET", "/media/clip", &key);
    }
    assert_eq!(next.status, 403, "{}", next.body);
    assert!(
        next.body.contains("Out of bandwidth quota"),
        "{}",
        next.body
    );
    still_serving(&envoy, "a 10 MB body");
}
