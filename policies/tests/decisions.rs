//! Decisions through the public engine API, for what replay output does not show: the edits
//! made to the upstream request, where the key was found, internal failures, and the rule that a
//! call denied by any limit consumes none.

// Test helpers may unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_policies::{
    Catalog, Completion, HeaderEdit, KeyLocation, LoadOptions, MemoryStore, Outcome, Request,
};
use serde_json::json;

fn catalog(product_policy: &str, api_policy: &str) -> Catalog {
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"displayName": "Orders", "path": "orders"}, "policy": api_policy}],
        "products": [{"name": "p", "apis": ["orders"], "policy": product_policy},
                     {"name": "open", "properties": {"subscriptionRequired": false}, "apis": []}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn request<'a>(h: &'a [(String, String)], query: &'a str) -> Request<'a> {
    Request {
        method: "GET",
        host: "api.contoso.com",
        path: "/orders/1",
        query,
        headers: h,
        client_ip: Some("192.0.2.7".parse().unwrap()),
    }
}

#[test]
fn inbound_set_header_edits_the_upstream_request() {
    let c = catalog(
        "<policies><inbound><base /></inbound></policies>",
        r#"<policies><inbound>
            <set-header name="x-who" exists-action="override"><value>@(context.Subscription.Id + "/" + context.Product.Name + "/" + context.Api.Name)</value></set-header>
            <set-header name="x-client" exists-action="skip"><value>edge</value></set-header>
            <set-header name="x-new" exists-action="skip"><value>1</value></set-header>
            <set-header name="x-list" exists-action="append"><value>a</value><value>@(context.Request.IpAddress)</value></set-header>
            <set-header name="x-secret" exists-action="delete" />
        </inbound></policies>"#,
    );
    let h = headers(&[
        ("Ocp-Apim-Subscription-Key", "k"),
        ("X-Client", "mine"),
        ("x-secret", "s"),
    ]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    assert!(d.response.is_none());
    assert_eq!(
        d.upstream.to_vec(),
        vec![
            HeaderEdit::Set("x-who".into(), "s/p/Orders".into()),
            HeaderEdit::Set("x-new".into(), "1".into()),
            HeaderEdit::Append("x-list".into(), "a".into()),
            HeaderEdit::Append("x-list".into(), "192.0.2.7".into()),
            HeaderEdit::Remove("x-secret".into()),
        ]
    );
    let call = d.call.unwrap();
    assert_eq!(
        c.key_location(&call),
        Some(KeyLocation::Header("Ocp-Apim-Subscription-Key".into()))
    );
}

#[test]
fn the_key_location_names_the_query_parameter() {
    let c = catalog("<policies />", "<policies />");
    let h = headers(&[]);
    let d = c
        .decide(
            &request(&h, "a=1&subscription-key=k"),
            0,
            &MemoryStore::new(),
        )
        .unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(
        c.key_location(d.call.as_ref().unwrap()),
        Some(KeyLocation::Query("subscription-key".into()))
    );
}

#[test]
fn a_limit_that_denies_takes_back_what_earlier_limits_counted() {
    // The rate limit (product) admits, the by-key quota (API) then denies: the rate limit's
    // slot must be given back, or the second subscriber call below would be refused.
    let c = catalog(
        r#"<policies><inbound><rate-limit calls="2" renewal-period="60" /><base /></inbound></policies>"#,
        r#"<policies><inbound><base /><quota-by-key calls="1" renewal-period="3600" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;x-tenant&quot;, &quot;&quot;))" /></inbound></policies>"#,
    );
    let store = MemoryStore::new();
    let t1 = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("x-tenant", "t1")]);
    let t2 = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("x-tenant", "t2")]);
    let outcome =
        |h: &[(String, String)], now| c.decide(&request(h, ""), now, &store).unwrap().outcome;
    assert_eq!(outcome(&t1, 0), Outcome::Allowed);
    assert_eq!(outcome(&t1, 1_000), Outcome::QuotaExceeded);
    assert_eq!(outcome(&t1, 2_000), Outcome::QuotaExceeded);
    // Two rate-limit slots: one used at 0; the denied calls used none.
    assert_eq!(outcome(&t2, 3_000), Outcome::Allowed);
}

#[test]
fn a_header_check_that_denies_takes_back_the_product_rate_limit_and_quota() {
    // The product counts the call in its rate limit and quota, then the API's header check
    // denies it: neither may keep it, or the call with the header below would be refused.
    let c = catalog(
        r#"<policies><inbound><rate-limit calls="1" renewal-period="60" /><quota calls="1" renewal-period="3600" /><base /></inbound></policies>"#,
        r#"<policies><inbound><base /><check-header name="x-team" failed-check-httpcode="401" failed-check-error-message="no team" ignore-case="true" /></inbound></policies>"#,
    );
    let store = MemoryStore::new();
    let without = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let with = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("x-team", "a")]);
    let outcome =
        |h: &[(String, String)], now| c.decide(&request(h, ""), now, &store).unwrap().outcome;
    assert_eq!(outcome(&without, 0), Outcome::HeaderCheckFailed);
    assert_eq!(outcome(&with, 1_000), Outcome::Allowed);
    assert_eq!(outcome(&with, 2_000), Outcome::RateLimited);
}

#[test]
fn a_call_that_fails_after_the_product_limits_takes_back_what_they_counted() {
    // API "a" reads the operation of a call to an API without operations, which is null: the
    // call fails after the product's rate limit counted it, and gives the count back, so that
    // the one call the limit allows is still there for API "b".
    let doc = json!({
        "apis": [{"name": "a", "properties": {"path": "a"},
                  "policy": "<policies><inbound><base /><set-header name=\"x-op\"><value>@(context.Operation.Id)</value></set-header></inbound></policies>"},
                 {"name": "b", "properties": {"path": "b"}}],
        "products": [{"name": "p", "apis": ["a", "b"],
                      "policy": r#"<policies><inbound><rate-limit calls="1" renewal-period="60" /><base /></inbound></policies>"#}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
    });
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let call = |path| Request {
        path,
        ..request(&h, "")
    };
    let err = c.decide(&call("/a/x"), 0, &store).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy expression failed: context.Operation is null"
    );
    let outcome = |path, now| c.decide(&call(path), now, &store).unwrap().outcome;
    assert_eq!(outcome("/b/x", 1_000), Outcome::Allowed);
    assert_eq!(outcome("/b/x", 2_000), Outcome::RateLimited);
}

#[test]
fn a_nested_limit_that_denies_takes_back_the_product_rate_limit() {
    // The product's rate limit is the policy's only step; its limit nested for API "a" denies
    // the second call to "a", which must give the product's count back: the product then has
    // room for exactly one call to "b".
    let doc = json!({
        "apis": [{"name": "a", "properties": {"path": "a"}}, {"name": "b", "properties": {"path": "b"}}],
        "products": [{"name": "p", "apis": ["a", "b"],
                      "policy": r#"<policies><inbound><rate-limit calls="2" renewal-period="60"><api name="a" calls="1" renewal-period="60" /></rate-limit><base /></inbound></policies>"#}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}]
    });
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let outcome = |path, now| {
        let req = Request {
            path,
            ..request(&h, "")
        };
        c.decide(&req, now, &store).unwrap().outcome
    };
    assert_eq!(outcome("/a/x", 0), Outcome::Allowed);
    assert_eq!(outcome("/a/x", 1_000), Outcome::RateLimited);
    assert_eq!(outcome("/b/x", 2_000), Outcome::Allowed);
    assert_eq!(outcome("/b/x", 3_000), Outcome::RateLimited);
}

#[test]
fn reading_a_null_context_member_is_an_internal_error() {
    let doc = json!({
        "apis": [{"name": "orders", "path": "orders", "subscriptionRequired": false,
                  "policy": "<policies><inbound><set-header name=\"x\"><value>@(context.Subscription.Id)</value></set-header></inbound></policies>"}]
    });
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let h = headers(&[]);
    let err = c
        .decide(&request(&h, ""), 0, &MemoryStore::new())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy expression failed: context.Subscription is null"
    );
}

#[test]
fn outbound_sees_the_response_status_and_the_remaining_calls() {
    let c = catalog(
        r#"<policies><inbound><rate-limit calls="3" renewal-period="60" remaining-calls-header-name="x-left" /><base /></inbound><outbound><base /><set-header name="x-status"><value>@("s" + context.Response.StatusCode)</value></set-header><set-header name="server" exists-action="skip"><value>edge</value></set-header></outbound></policies>"#,
        "<policies />",
    );
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let store = MemoryStore::new();
    let d = c.decide(&request(&h, ""), 0, &store).unwrap();
    let call = d.call.unwrap();
    let edits = c
        .respond(&call, 201, &|name: &str| {
            name.eq_ignore_ascii_case("server")
        })
        .unwrap();
    assert_eq!(
        edits.to_vec(),
        vec![
            HeaderEdit::Set("x-status".into(), "s201".into()),
            HeaderEdit::Set("x-left".into(), "2".into())
        ]
    );
    c.complete(
        &call,
        Completion {
            status: 201,
            request_bytes: 0,
            response_bytes: 10,
        },
        0,
        &store,
    )
    .unwrap();
}

#[test]
fn a_decision_never_carries_the_key() {
    // Decisions are logged; the key a call presented must not be in them.
    let c = catalog("<policies />", "<policies />");
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k-not-logged")]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(d.outcome, Outcome::InvalidKey);
    assert!(!format!("{d:?}").contains("k-not-logged"));
}

#[test]
fn routing_finds_deep_api_paths() {
    let deep: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let doc = json!({
        "apis": [{"name": "deep", "path": deep.join("/"), "subscriptionRequired": false},
                 {"name": "root", "path": "", "subscriptionRequired": false}]
    });
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let h = headers(&[]);
    let route = |path: &str| {
        let d = c
            .decide(
                &Request {
                    path,
                    ..request(&h, "")
                },
                0,
                &MemoryStore::new(),
            )
            .unwrap();
        c.names(d.call.as_ref().unwrap()).0.to_string()
    };
    assert_eq!(route(&format!("/{}/leaf/x", deep.join("/"))), "deep");
    assert_eq!(route("/s0/s1/other"), "root");
    // Deeper than every API path, in upper case and with doubled slashes.
    assert_eq!(
        route(&format!("//{}//LEAF/x", deep.join("/").to_uppercase())),
        "deep"
    );
    assert_eq!(route(&format!("/{}", deep[..16].join("/"))), "root");

    // With only an API at the root, every path is its.
    let doc = json!({"apis": [{"name": "root", "path": "", "subscriptionRequired": false}]});
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    for path in ["/", "/a", "//a/B/c/"] {
        let req = Request {
            path,
            ..request(&h, "")
        };
        let d = c.decide(&req, 0, &MemoryStore::new()).unwrap();
        assert_eq!(c.names(d.call.as_ref().unwrap()).0, "root", "{path}");
    }
}

#[test]
fn skip_sees_a_header_an_earlier_policy_deleted_as_absent() {
    let c = catalog(
        "<policies />",
        r#"<policies><inbound>
            <set-header name="x-a" exists-action="delete" />
            <set-header name="x-a" exists-action="skip"><value>edge</value></set-header>
        </inbound></policies>"#,
    );
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("x-a", "client")]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(
        d.upstream.to_vec(),
        vec![
            HeaderEdit::Remove("x-a".into()),
            HeaderEdit::Set("x-a".into(), "edge".into())
        ]
    );
}

#[test]
fn a_header_value_that_is_one_context_member_is_that_members_text() {
    // Catalog text (borrowed from the catalog), and a member that falls back to the request
    // (the method, as the API lists no operations).
    let c = catalog(
        "<policies><inbound><base /></inbound></policies>",
        r#"<policies><inbound>
            <set-header name="x-api" exists-action="override"><value>@(context.Api.Name)</value></set-header>
            <set-header name="x-product" exists-action="override"><value>@(context.Product.Id)</value></set-header>
            <set-header name="x-method" exists-action="override"><value>@(context.Operation.Method)</value></set-header>
        </inbound></policies>"#,
    );
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(
        d.upstream.to_vec(),
        vec![
            HeaderEdit::Set("x-api".into(), "Orders".into()),
            HeaderEdit::Set("x-product".into(), "p".into()),
            HeaderEdit::Set("x-method".into(), "GET".into()),
        ]
    );
}

#[test]
fn long_subscription_names_keep_their_own_rate_limits() {
    // Two names longer than the ones kept inline, alike in their first 60 characters.
    let prefix = "a".repeat(60);
    let (first, second) = (format!("{prefix}-first"), format!("{prefix}-second"));
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"}}],
        "products": [{"name": "p", "apis": ["orders"],
                      "policy": r#"<policies><inbound><rate-limit calls="1" renewal-period="60" /><base /></inbound></policies>"#}],
        "subscriptions": [
            {"name": first, "properties": {"scope": "/products/p", "primaryKey": "k1"}},
            {"name": second, "properties": {"scope": "/products/p", "primaryKey": "k2"}}
        ]
    });
    let c = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let store = MemoryStore::new();
    let call = |key: &str, now| {
        let h = headers(&[("Ocp-Apim-Subscription-Key", key)]);
        c.decide(&request(&h, ""), now, &store).unwrap().outcome
    };
    assert_eq!(call("k1", 0), Outcome::Allowed);
    assert_eq!(call("k2", 1), Outcome::Allowed);
    assert_eq!(call("k1", 2), Outcome::RateLimited);
    assert_eq!(call("k2", 3), Outcome::RateLimited);
    assert_eq!(store.len(), 2);
}

#[test]
fn a_rate_limit_and_a_quota_side_by_side_count_a_call_in_both_or_neither() {
    // APIM's usual product policy: the two limits share one counter per subscription.
    let c = catalog(
        r#"<policies><inbound><rate-limit calls="3" renewal-period="100" remaining-calls-header-name="x-left" /><quota calls="2" renewal-period="10" /><base /></inbound></policies>"#,
        "<policies />",
    );
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let left = |now| {
        let d = c.decide(&request(&h, ""), now, &store).unwrap();
        let edits = d
            .call
            .as_ref()
            .filter(|_| d.outcome == Outcome::Allowed)
            .map(|call| format!("{:?}", c.respond(call, 200, &|_| false).unwrap().to_vec()));
        (d.outcome, edits)
    };
    let header = |n: &str| {
        let edits = vec![HeaderEdit::Set("x-left".into(), n.to_string().into())];
        Some(format!("{edits:?}"))
    };
    assert_eq!(left(0), (Outcome::Allowed, header("2")));
    assert_eq!(left(1_000), (Outcome::Allowed, header("1")));
    // The quota is used up: the call is denied and the rate limit does not count it.
    assert_eq!(left(2_000), (Outcome::QuotaExceeded, None));
    // The quota renews at 10 s; the rate limit has admitted two calls of three, not three.
    assert_eq!(left(10_000), (Outcome::Allowed, header("0")));
    assert_eq!(left(11_000), (Outcome::RateLimited, None));
    assert_eq!(store.len(), 1);
}

#[test]
fn a_step_between_a_rate_limit_and_a_quota_keeps_their_counts() {
    // The same limits, counted together when side by side and one by one with a step
    // between: a policy edit that puts a step there (or takes it away) keeps what was counted.
    let side_by_side = catalog(
        r#"<policies><inbound><rate-limit calls="3" renewal-period="60" /><quota calls="4" renewal-period="3600" /><base /></inbound></policies>"#,
        "<policies />",
    );
    let apart = catalog(
        r#"<policies><inbound><rate-limit calls="3" renewal-period="60" /><set-header name="x-edge" exists-action="override"><value>1</value></set-header><quota calls="4" renewal-period="3600" /><base /></inbound></policies>"#,
        "<policies />",
    );
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let outcome = |c: &Catalog, now| c.decide(&request(&h, ""), now, &store).unwrap().outcome;
    assert_eq!(outcome(&side_by_side, 0), Outcome::Allowed);
    assert_eq!(outcome(&apart, 1_000), Outcome::Allowed);
    assert_eq!(outcome(&side_by_side, 2_000), Outcome::Allowed);
    assert_eq!(outcome(&apart, 3_000), Outcome::RateLimited);
    assert_eq!(outcome(&side_by_side, 4_000), Outcome::RateLimited);
    // A minute on, the rate limit has room again; the quota has one call left of four.
    assert_eq!(outcome(&apart, 61_000), Outcome::Allowed);
    assert_eq!(outcome(&side_by_side, 62_000), Outcome::QuotaExceeded);
    assert_eq!(outcome(&apart, 63_000), Outcome::QuotaExceeded);
}

/// APIM's `quota-by-key` and `rate-limit-by-key`: "if multiple policies would increment the same
/// key value, it is incremented only once per request". One key value at product and API scope
/// counts each call once, so a limit of N admits N calls, not N / 2.
#[test]
fn one_key_value_at_two_scopes_is_counted_once_per_request() {
    for (element, limit, denied) in [
        ("quota-by-key", "calls=\"3\" renewal-period=\"3600\"", 403),
        (
            "rate-limit-by-key",
            "calls=\"3\" renewal-period=\"60\"",
            429,
        ),
    ] {
        let policy = format!(
            r#"<policies><inbound><base /><{element} {limit} counter-key="@(context.Subscription.Id)" /></inbound></policies>"#
        );
        let c = catalog(&policy, &policy);
        let store = MemoryStore::new();
        let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
        let statuses: Vec<u16> = (0..5)
            .map(|i| {
                let d = c.decide(&request(&h, ""), 1_000 + i, &store).unwrap();
                d.response.map_or(200, |r| r.status)
            })
            .collect();
        assert_eq!(statuses, [200, 200, 200, denied, denied], "{element}");
    }
}

/// Two limits on one key value: the call counts once, and each limit holds at its own number;
/// a call the smaller limit denies is taken back from the counter, so it counts in neither.
#[test]
fn one_key_value_under_two_limits_counts_once_and_each_limit_holds() {
    let product = r#"<policies><inbound><base /><rate-limit-by-key calls="4" renewal-period="60" counter-key="@(context.Subscription.Id)" /></inbound></policies>"#;
    let api = r#"<policies><inbound><base /><rate-limit-by-key calls="2" renewal-period="60" counter-key="@(context.Subscription.Id)" remaining-calls-header-name="x-left" /></inbound></policies>"#;
    let c = catalog(product, api);
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let mut left = Vec::new();
    let statuses: Vec<u16> = (0..4)
        .map(|i| {
            let d = c.decide(&request(&h, ""), 1_000 + i, &store).unwrap();
            if let Some(call) = &d.call {
                if d.response.is_none() {
                    let edits = c.respond(call, 200, &|_| false).unwrap();
                    left.extend(edits.iter().filter_map(|e| match e {
                        HeaderEdit::Set(n, v) if n == "x-left" => Some(v.to_string()),
                        _ => None,
                    }));
                }
            }
            d.response.map_or(200, |r| r.status)
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(left, ["1", "0"]);
    // The denied calls were taken back: with the smaller limit gone (another API policy), the
    // larger admits exactly two more in the same window.
    let c2 = catalog(product, "<policies><inbound><base /></inbound></policies>");
    let more: Vec<u16> = (0..3)
        .map(|i| {
            let d = c2.decide(&request(&h, ""), 2_000 + i, &store).unwrap();
            d.response.map_or(200, |r| r.status)
        })
        .collect();
    assert_eq!(more, [200, 200, 429]);
}

/// APIM runs the backend section after inbound: a `return-response` there answers instead of
/// the upstream, after the inbound limits counted the call.
#[test]
fn a_return_response_in_the_backend_section_answers_the_call() {
    let c = catalog(
        r#"<policies><inbound><rate-limit calls="1" renewal-period="60" /><base /></inbound></policies>"#,
        r#"<policies><inbound><base /></inbound><backend><return-response><set-status code="503" reason="down" /><set-header name="retry-after" exists-action="override"><value>120</value></set-header><set-body>{"down": true}</set-body></return-response></backend></policies>"#,
    );
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c.decide(&request(&h, ""), 0, &store).unwrap();
    assert_eq!(d.outcome, Outcome::Returned);
    let r = d.response.unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, r#"{"down": true}"#));
    assert!(r
        .headers
        .iter()
        .any(|(n, v)| n == "retry-after" && v == "120"));
    // The product's rate limit counted it: the next call is limited before the backend.
    let d = c.decide(&request(&h, ""), 1_000, &store).unwrap();
    assert_eq!(d.outcome, Outcome::RateLimited);
}

/// `return-response` in outbound replaces the upstream's response (APIM allows it there);
/// in on-error it is not supported at the edge yet and refused under `reject`.
#[test]
fn an_outbound_return_response_is_the_answer_and_on_error_is_refused() {
    let c = catalog(
        "<policies><inbound><base /></inbound></policies>",
        r#"<policies><inbound><base /></inbound><outbound><set-header name="x-lost" exists-action="override"><value>1</value></set-header><return-response><set-status code="502" reason="bad" /><set-body>no</set-body></return-response></outbound></policies>"#,
    );
    let store = MemoryStore::new();
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c.decide(&request(&h, ""), 0, &store).unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    let call = d.call.unwrap();
    let r = c.outbound_response(&call, 200).unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (502, "no"));
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"},
                  "policy": "<policies><on-error><return-response><set-status code=\"500\" /></return-response></on-error></policies>"}]
    });
    let e = Catalog::load(&doc, LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("<return-response> in the on-error section is not supported"),
        "{e}"
    );
}

/// A key given twice (two header fields, or the parameter repeated) is read as HTTP and .NET
/// read a repeated field, its values joined with `,`: no subscription's key, even when both are
/// the same valid key (docs/choices.md).
#[test]
fn a_key_given_twice_is_no_key() {
    let c = catalog("<policies />", "<policies />");
    let once = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c
        .decide(&request(&once, ""), 0, &MemoryStore::new())
        .unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    for (h, query) in [
        (
            headers(&[
                ("Ocp-Apim-Subscription-Key", "k"),
                ("ocp-apim-subscription-key", "k"),
            ]),
            "",
        ),
        (
            headers(&[
                ("Ocp-Apim-Subscription-Key", "k"),
                ("Ocp-Apim-Subscription-Key", "x"),
            ]),
            "",
        ),
        (headers(&[]), "subscription-key=k&subscription-key=k"),
    ] {
        let d = c
            .decide(&request(&h, query), 0, &MemoryStore::new())
            .unwrap();
        assert_eq!(d.outcome, Outcome::InvalidKey, "{h:?} {query}");
        assert_eq!(d.response.unwrap().status, 401);
    }
}

/// A path holding a dot segment (`..`, `.`, plain or percent-encoded) routes to no API: a
/// proxy that normalises paths has removed them, and one that did not would hand the upstream
/// a path that leaves the API it was decided for.
#[test]
fn a_path_with_dot_segments_routes_to_no_api() {
    let c = catalog("<policies />", "<policies />");
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    for path in [
        "/orders/../admin",
        "/orders/%2e%2e/admin",
        "/orders/./1",
        "/orders/1/..",
    ] {
        let mut r = request(&h, "");
        r.path = path;
        let d = c.decide(&r, 0, &MemoryStore::new()).unwrap();
        assert_eq!(d.outcome, Outcome::ApiNotFound, "{path}");
        assert_eq!(d.response.unwrap().status, 404, "{path}");
    }
}

/// A proxy looks up the client's address only when a policy reads it: an `ip-filter`, or
/// `context.Request.IpAddress` in any expression (here a counter key, a condition, a header).
#[test]
fn the_catalog_says_whether_a_policy_reads_the_client_address() {
    let ip = "@(context.Request.IpAddress)";
    let reading = [
        r#"<policies><inbound><ip-filter action="allow"><address>10.0.0.1</address></ip-filter></inbound></policies>"#.to_string(),
        format!(r#"<policies><inbound><rate-limit-by-key calls="1" renewal-period="60" counter-key="{ip}" /></inbound></policies>"#),
        r#"<policies><inbound><choose><when condition="@(context.Request.IpAddress == &quot;x&quot;)"><set-header name="y"><value>1</value></set-header></when></choose></inbound></policies>"#.to_string(),
        r#"<policies><outbound><set-header name="x"><value>@(&quot;a&quot; + context.Request.IpAddress)</value></set-header></outbound></policies>"#.to_string(),
    ];
    let none = "<policies />";
    for policy in &reading {
        assert!(catalog(policy, none).reads_client_address(), "{policy}");
        assert!(catalog(none, policy).reads_client_address(), "{policy}");
    }
    let plain = format!(
        r#"<policies><inbound><rate-limit-by-key calls="1" renewal-period="60" counter-key="@(context.Request.Method)" /><set-header name="x"><value>{}</value></set-header></inbound></policies>"#,
        "IpAddress"
    );
    assert!(!catalog(&plain, none).reads_client_address());
    assert!(!catalog(none, none).reads_client_address());
}

/// `emit-metric` (APIM's "Emit custom metrics"): each that runs adds its value to a counter
/// named by its namespace and name; emitted whatever the call's outcome, as APIM emits when the
/// policy runs; dimensions are accepted, not carried, and said so at load.
#[test]
fn emit_metric_adds_its_value_to_a_counter_whatever_the_outcome() {
    let c = catalog(
        r#"<policies><inbound>
            <emit-metric name="api-requests" namespace="custom metrics"><dimension name="API" /></emit-metric>
            <emit-metric name="weight" value="@(2 + 3)" />
            <check-header name="x-need" failed-check-httpcode="400" failed-check-error-message="need" />
        </inbound></policies>"#,
        "<policies />",
    );
    assert!(
        c.warnings().iter().any(|w| w.contains(
            "<emit-metric> becomes Envoy counter apim_edge.metric.custom_metrics.api-requests; its dimensions are not carried"
        )),
        "{:?}",
        c.warnings()
    );
    let emitted = vec![
        ("apim_edge.metric.custom_metrics.api-requests", 1),
        ("apim_edge.metric.API_Management.weight", 5),
    ];
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k"), ("x-need", "1")]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(d.outcome, Outcome::Allowed);
    assert_eq!(d.metrics, emitted);
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    let d = c.decide(&request(&h, ""), 0, &MemoryStore::new()).unwrap();
    assert_eq!(d.outcome, Outcome::HeaderCheckFailed);
    assert_eq!(d.metrics, emitted);
    // A value a counter cannot take is refused at load, and so is the element in outbound.
    for (policy, message) in [
        (
            r#"<policies><inbound><emit-metric name="m" value="1.5" /></inbound></policies>"#,
            "'value' of <emit-metric> must be a whole number at the edge (an Envoy counter), not \"1.5\"",
        ),
        (
            r#"<policies><outbound><emit-metric name="m" /></outbound></policies>"#,
            "<emit-metric> in the outbound section is not supported at the edge",
        ),
    ] {
        let doc = serde_json::json!({
            "apis": [{"name": "orders", "path": "orders"}],
            "products": [{"name": "p", "apis": ["orders"], "policy": policy}],
        });
        let e = Catalog::load(&doc, LoadOptions::default()).err().unwrap();
        assert!(e.to_string().contains(message), "{e}");
    }
}

/// `DateTime.UtcNow` is the time the proxy decides the call at; after the inbound phase the
/// proxy gives no time, so there it is refused at load (a variable set in inbound carries it).
#[test]
fn utc_now_is_the_decision_time_and_refused_after_inbound() {
    let c = catalog(
        r#"<policies><inbound><set-header name="x-at"><value>@(DateTime.UtcNow.ToString("s"))</value></set-header></inbound></policies>"#,
        "<policies />",
    );
    let h = headers(&[("Ocp-Apim-Subscription-Key", "k")]);
    // 2026-01-05T10:07:09Z.
    let d = c
        .decide(&request(&h, ""), 1_767_607_629_000, &MemoryStore::new())
        .unwrap();
    assert_eq!(
        d.upstream.to_vec(),
        vec![HeaderEdit::Set("x-at".into(), "2026-01-05T10:07:09".into())]
    );
    let doc = serde_json::json!({
        "apis": [{"name": "orders", "path": "orders"}],
        "products": [{"name": "p", "apis": ["orders"], "policy":
            r#"<policies><outbound><choose><when condition="@(DateTime.UtcNow.Hour > 12)"><set-header name="x"><value>pm</value></set-header></when></choose></outbound></policies>"#}],
    });
    let e = Catalog::load(&doc, LoadOptions::default()).err().unwrap();
    assert!(
        e.to_string()
            .contains("DateTime.UtcNow in the outbound section is not supported at the edge"),
        "{e}"
    );
}
