//! `cors` through the public engine API (APIM's policy reference, "CORS"): a preflight is
//! answered at the edge from the policies of the call it asks about, without a key and without
//! counting; an actual cross-origin call gets the `Access-Control-*` headers on its response
//! (a denial too); an origin the policy does not allow ends a simple call, or goes on without
//! the headers, as `terminate-unmatched-request` says. Where APIM's reference is silent, the
//! Fetch standard's CORS protocol decides (docs/choices.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_policies::{
    Catalog, HeaderEdit, LoadOptions, LocalResponse, MemoryStore, Outcome, Request,
};
use serde_json::json;

const APP: &str = "https://app.contoso.com";

/// An API `orders` (subscription required; operations GET and PUT of `/items/{id}`) whose
/// policy is `api_policy`, in product `p` with a rate limit of 2 a minute; the service policy
/// is `global`.
fn catalog(global: &str, api_policy: &str) -> Catalog {
    let global = (!global.is_empty()).then_some(global);
    let doc = json!({
        "service": {"name": "contoso", "policy": global},
        "apis": [{"name": "orders", "properties": {"path": "orders"}, "policy": api_policy,
                  "operations": [
                      {"name": "get-item", "method": "GET", "urlTemplate": "/items/{id}"},
                      {"name": "put-item", "method": "PUT", "urlTemplate": "/items/{id}"}]}],
        "products": [{"name": "p", "apis": ["orders"],
                      "policy": "<policies><inbound><rate-limit calls=\"2\" renewal-period=\"60\" /><base /></inbound></policies>"}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

const API_CORS: &str = r#"<policies><inbound><base />
    <cors allow-credentials="true">
      <allowed-origins><origin>https://app.contoso.com/</origin></allowed-origins>
      <allowed-methods preflight-result-max-age="300"><method>GET</method><method>PUT</method></allowed-methods>
      <allowed-headers><header>content-type</header><header>ocp-apim-subscription-key</header></allowed-headers>
      <expose-headers><header>x-request-id</header></expose-headers>
    </cors>
</inbound></policies>"#;

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn request<'a>(method: &'a str, h: &'a [(String, String)]) -> Request<'a> {
    Request {
        method,
        host: "api.contoso.com",
        path: "/orders/items/1",
        query: "",
        headers: h,
        client_ip: None,
    }
}

fn header(r: &LocalResponse, name: &str) -> Option<String> {
    r.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.to_string())
}

fn preflight(origin: &str, method: &str) -> Vec<(String, String)> {
    headers(&[
        ("Origin", origin),
        ("Access-Control-Request-Method", method),
        (
            "Access-Control-Request-Headers",
            "Content-Type, Ocp-Apim-Subscription-Key, X-Other",
        ),
    ])
}

#[test]
fn a_preflight_from_an_allowed_origin_is_answered_without_a_key_and_counts_nothing() {
    let c = catalog("", API_CORS);
    let store = MemoryStore::new();
    for _ in 0..5 {
        let h = preflight(APP, "PUT");
        let d = c.decide(&request("OPTIONS", &h), 0, &store).unwrap();
        assert_eq!(d.outcome, Outcome::CorsPreflight);
        let r = d.response.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, ""));
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some(APP)
        );
        assert_eq!(
            header(&r, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert_eq!(
            header(&r, "access-control-allow-methods").as_deref(),
            Some("PUT")
        );
        assert_eq!(
            header(&r, "access-control-allow-headers").as_deref(),
            Some("Content-Type, Ocp-Apim-Subscription-Key")
        );
        assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("300"));
        assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));
    }
    // The product's rate limit of 2 is untouched by five preflights.
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    for _ in 0..2 {
        let d = c.decide(&request("GET", &h), 0, &store).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed);
    }
}

#[test]
fn a_preflight_from_another_origin_ends_with_an_empty_200_and_no_cors_headers() {
    let c = catalog("", API_CORS);
    let h = preflight("https://evil.example", "GET");
    let d = c
        .decide(&request("OPTIONS", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::CorsUnmatched);
    let r = d.response.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert!(r.headers.is_empty(), "{:?}", r.headers);
}

/// `terminate-unmatched-request="false"`: a preflight the first `cors` does not match goes to
/// the next one of the effective inbound section (here the global scope's, after `<base />`).
#[test]
fn an_unmatched_preflight_goes_on_to_the_next_cors_when_not_terminated() {
    let global = r#"<policies><inbound><cors><allowed-origins><origin>*</origin></allowed-origins></cors></inbound></policies>"#;
    let api = r#"<policies><inbound>
        <cors terminate-unmatched-request="false"><allowed-origins><origin>https://app.contoso.com</origin></allowed-origins></cors>
        <base />
    </inbound></policies>"#;
    let c = catalog(global, api);
    let h = preflight("https://other.example", "GET");
    let d = c
        .decide(&request("OPTIONS", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::CorsPreflight);
    let r = d.response.unwrap();
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    // GET is allowed by default (GET and POST); no header is, by default.
    assert_eq!(
        header(&r, "access-control-allow-methods").as_deref(),
        Some("GET")
    );
    assert_eq!(header(&r, "access-control-allow-headers"), None);
}

/// Without a `cors` for the call it asks about, an `OPTIONS` is an ordinary call: here no
/// operation serves it, and without a key it could not be made anyway.
#[test]
fn without_cors_a_preflight_is_an_ordinary_options_call() {
    let c = catalog("", "<policies><inbound><base /></inbound></policies>");
    let h = preflight(APP, "GET");
    let d = c
        .decide(&request("OPTIONS", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::OperationNotFound);
}

#[test]
fn an_actual_call_from_an_allowed_origin_gets_the_headers_on_its_response_and_its_denials() {
    let c = catalog("", API_CORS);
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("Origin", APP)]);
    for _ in 0..2 {
        let d = c.decide(&request("GET", &h), 0, &store).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed);
        let call = d.call.unwrap();
        let edits = c.respond(&call, 200, &|_| false).unwrap();
        let set = |name: &str| {
            edits.iter().find_map(|e| match e {
                HeaderEdit::Set(n, v) if n == name => Some(v.to_string()),
                _ => None,
            })
        };
        assert_eq!(set("access-control-allow-origin").as_deref(), Some(APP));
        assert_eq!(
            set("access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert_eq!(
            set("access-control-expose-headers").as_deref(),
            Some("x-request-id")
        );
        // The upstream's own Vary is kept: Origin is added to it.
        assert!(edits
            .iter()
            .any(|e| matches!(e, HeaderEdit::Append(n, v) if n == "vary" && v == "Origin")));
    }
    // The API's cors runs after the product's rate limit (its <base /> comes first): the
    // third call is denied before the cors policy is reached, and carries no CORS headers.
    let d = c.decide(&request("GET", &h), 0, &store).unwrap();
    assert_eq!(d.outcome, Outcome::RateLimited);
    assert_eq!(
        header(&d.response.unwrap(), "access-control-allow-origin"),
        None
    );
    // With cors first, a denial after it carries the headers, so the browser can read it.
    let first = r#"<policies><inbound>
        <cors><allowed-origins><origin>https://app.contoso.com</origin></allowed-origins></cors>
        <base />
    </inbound></policies>"#;
    let c = catalog("", first);
    let store = MemoryStore::new();
    for _ in 0..2 {
        c.decide(&request("GET", &h), 0, &store).unwrap();
    }
    let d = c.decide(&request("GET", &h), 0, &store).unwrap();
    assert_eq!(d.outcome, Outcome::RateLimited);
    let r = d.response.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(APP)
    );
}

/// An actual call from an origin no `cors` allows: a GET or HEAD is ended with an empty 200
/// (the default `terminate-unmatched-request="true"`), any other method goes on without CORS
/// headers, and with `terminate-unmatched-request="false"` a GET goes on too.
#[test]
fn an_actual_call_from_another_origin_is_ended_or_let_through_without_headers() {
    let c = catalog("", API_CORS);
    let h = headers(&[
        ("Ocp-Apim-Subscription-Key", "k"),
        ("Origin", "https://evil.example"),
    ]);
    let d = c
        .decide(&request("GET", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::CorsUnmatched);
    let r = d.response.unwrap();
    assert_eq!((r.status, r.body.as_str(), r.headers.len()), (200, "", 0));
    let d = c
        .decide(&request("PUT", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    let call = d.call.unwrap();
    let edits = c.respond(&call, 200, &|_| false).unwrap();
    assert!(edits.is_empty(), "{edits:?}");
    let lenient = API_CORS.replace(
        "allow-credentials=\"true\"",
        "terminate-unmatched-request=\"false\"",
    );
    let c = catalog("", &lenient);
    let d = c
        .decide(&request("GET", &h), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    // Without Origin, cors does nothing.
    let plain = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c
        .decide(&request("GET", &plain), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    assert!(c
        .respond(&d.call.unwrap(), 200, &|_| false)
        .unwrap()
        .is_empty());
}

#[test]
fn misplaced_or_contradictory_cors_is_refused_with_its_place() {
    let origins = "<allowed-origins><origin>https://a.example</origin></allowed-origins>";
    let cases = [
        (
            format!("<policies><outbound><cors>{origins}</cors></outbound></policies>"),
            "<cors> is not allowed in the outbound section",
        ),
        (
            format!("<policies><inbound><choose><when condition=\"@(true)\"><cors>{origins}</cors></when></choose></inbound></policies>"),
            "<cors> must be a direct child of <inbound>",
        ),
        (
            format!("<policies><inbound><cors>{origins}</cors><cors>{origins}</cors></inbound></policies>"),
            "<cors> may appear only once in a policy document",
        ),
        (
            "<policies><inbound><cors allow-credentials=\"true\"><allowed-origins><origin>*</origin></allowed-origins></cors></inbound></policies>".to_string(),
            "allow-credentials=\"true\" cannot be used with the origin '*'",
        ),
        (
            "<policies><inbound><cors><allowed-methods><method>GET</method></allowed-methods></cors></inbound></policies>".to_string(),
            "<cors> needs <allowed-origins>",
        ),
    ];
    for (policy, message) in cases {
        let doc = json!({
            "apis": [{"name": "orders", "properties": {"path": "orders"}, "policy": policy}]
        });
        let e = match Catalog::load(&doc, LoadOptions::default()) {
            Ok(_) => panic!("{policy} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(message), "{policy}: {e}");
        assert!(e.contains("line 1, column"), "{policy}: {e}");
    }
}
