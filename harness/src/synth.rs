//! Synthetic catalogs for benchmarks: many APIs, products and subscriptions, each product with a
//! rate limit and a quota, each API with operations and a policy. Deterministic: the same sizes
//! give the same document, and subscription `i` has the key [`key_of`]`(i)`. A matching trace
//! ([`trace`]) calls every subscription in turn, for latency benchmarks.

use apim_edge_policies::Request;
use serde_json::{json, Value};

/// Sizes of a synthetic catalog.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub subscriptions: usize,
    pub apis: usize,
    pub products: usize,
}

/// The primary key of synthetic subscription `i`.
pub fn key_of(i: usize) -> String {
    format!("synth-key-{i:08}")
}

/// APIs of product `p`: a run of consecutive APIs, so every API is in some product.
pub fn product_apis(s: Sizes, p: usize) -> Vec<usize> {
    let per = (s.apis * 2)
        .div_ceil(s.products.max(1))
        .clamp(1, s.apis.max(1));
    (0..per)
        .map(|k| (p * s.apis / s.products.max(1) + k) % s.apis.max(1))
        .collect()
}

/// Builds the snapshot document.
pub fn catalog(s: Sizes) -> Value {
    let apis: Vec<Value> = (0..s.apis)
        .map(|a| {
            json!({
                "name": format!("api-{a}"),
                "properties": {"displayName": format!("API {a}"), "path": format!("svc/api-{a}"), "subscriptionRequired": true},
                "operations": [
                    {"name": "list", "properties": {"method": "GET", "urlTemplate": "/items"}},
                    {"name": "get", "properties": {"method": "GET", "urlTemplate": "/items/{id}"}},
                    {"name": "create", "properties": {"method": "POST", "urlTemplate": "/items"}}
                ],
                "policy": "<policies><inbound><base /><set-header name=\"x-api\" exists-action=\"override\"><value>@(context.Api.Id)</value></set-header></inbound><backend><base /></backend><outbound><base /></outbound></policies>"
            })
        })
        .collect();
    let products: Vec<Value> = (0..s.products)
        .map(|p| {
            let members: Vec<String> = product_apis(s, p).into_iter().map(|a| format!("api-{a}")).collect();
            json!({
                "name": format!("product-{p}"),
                "properties": {"displayName": format!("Product {p}"), "subscriptionRequired": true, "state": "published"},
                "apis": members,
                "policy": format!("<policies><inbound><rate-limit calls=\"{}\" renewal-period=\"60\" remaining-calls-header-name=\"x-ratelimit-remaining\" /><quota calls=\"{}\" renewal-period=\"86400\" /><base /></inbound></policies>", 1000 + p, 1_000_000 + p)
            })
        })
        .collect();
    let subscriptions: Vec<Value> = (0..s.subscriptions)
        .map(|i| {
            json!({
                "name": format!("sub-{i}"),
                "properties": {
                    "scope": format!("/products/product-{}", i % s.products.max(1)),
                    "state": "active",
                    "displayName": format!("Subscriber {i}"),
                    "createdDate": "2026-01-01T00:00:00Z",
                    "primaryKey": key_of(i),
                    "secondaryKey": format!("synth-secondary-{i:08}")
                }
            })
        })
        .collect();
    json!({
        "schemaVersion": 1,
        "service": {"name": "synth", "policy": "<policies><inbound><ip-filter action=\"forbid\"><address-range from=\"198.51.100.0\" to=\"198.51.100.255\" /></ip-filter></inbound><backend><forward-request /></backend><outbound /></policies>"},
        "apis": apis,
        "products": products,
        "subscriptions": subscriptions
    })
}

/// The path of a call subscription `i` may make: an item of its product's first API.
pub fn path_of(s: Sizes, i: usize) -> String {
    let product = i % s.products.max(1);
    format!("/svc/api-{}/items/42", product_apis(s, product)[0])
}

/// Every subscription's call, for the engine's benchmarks: its key header and its path.
pub struct Callers {
    headers: Vec<Vec<(String, String)>>,
    paths: Vec<String>,
}

impl Callers {
    pub fn new(s: Sizes) -> Self {
        Callers {
            headers: (0..s.subscriptions)
                .map(|i| vec![("Ocp-Apim-Subscription-Key".to_string(), key_of(i))])
                .collect(),
            paths: (0..s.subscriptions).map(|i| path_of(s, i)).collect(),
        }
    }

    /// Subscription `i`'s `GET` of [`path_of`], with its key, from 192.0.2.1.
    pub fn request(&self, i: usize) -> Request<'_> {
        Request {
            method: "GET",
            host: "api.contoso.com",
            path: &self.paths[i],
            query: "",
            headers: &self.headers[i],
            client_ip: Some([192, 0, 2, 1].into()),
        }
    }
}

/// The issue's own case, for the engine's benchmarks: a product (Starter) whose only policy is a
/// rate limit (1,000 calls a minute, with a remaining-calls header) and a quota, an API `echo`
/// with one operation and no policy, and one subscription with the key [`STARTER_KEY`]; its
/// call is [`starter_request`].
pub fn starter() -> Value {
    json!({
        "apis": [{"name": "echo", "properties": {"path": "echo"},
                  "operations": [{"name": "get", "properties": {"method": "GET", "urlTemplate": "/resource"}}]}],
        "products": [{"name": "starter", "apis": ["echo"],
                      "policy": "<policies><inbound><rate-limit calls=\"1000\" renewal-period=\"60\" remaining-calls-header-name=\"x-ratelimit-remaining\" /><quota calls=\"1000000\" renewal-period=\"604800\" /><base /></inbound></policies>"}],
        "subscriptions": [{"name": "sub-1", "properties": {"scope": "/products/starter", "primaryKey": STARTER_KEY}}]
    })
}

/// The key of [`starter`]'s subscription.
pub const STARTER_KEY: &str = "starter-key-1";

/// [`starter`]'s call: `GET /echo/resource` with `headers` (its key, from [`starter_headers`]).
pub fn starter_request(headers: &[(String, String)]) -> Request<'_> {
    Request {
        method: "GET",
        host: "api.contoso.com",
        path: "/echo/resource",
        query: "",
        headers,
        client_ip: Some([192, 0, 2, 1].into()),
    }
}

/// The headers of [`starter`]'s call: its key.
pub fn starter_headers() -> Vec<(String, String)> {
    vec![(
        "Ocp-Apim-Subscription-Key".to_string(),
        STARTER_KEY.to_string(),
    )]
}

/// A JSON Lines trace of `calls` keyed calls, 1 ms apart, rotating over the subscriptions:
/// each is admitted (the rate limits allow 1,000 calls a minute per subscription).
pub fn trace(s: Sizes, calls: usize) -> String {
    let mut out = String::new();
    for k in 0..calls {
        let i = k % s.subscriptions.max(1);
        let line = json!({
            "t": k as f64 / 1000.0,
            "method": "GET",
            "url": format!("https://api.contoso.com{}", path_of(s, i)),
            "headers": {"Ocp-Apim-Subscription-Key": key_of(i)},
            "clientIp": "192.0.2.1",
            "responseBytes": 512
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}
