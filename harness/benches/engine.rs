//! Per-decision cost of the native engine (criterion): an admitted keyed call under a product
//! rate limit and quota (many subscribers; one calling once a second; one near its limit), a
//! 401, and a 429.
//!
//! Then the issue's case alone ([`starter`]): a product whose policy is only a rate limit and a
//! quota (APIM's Starter product), an API and an operation without policies, and one
//! subscriber calling once a second; the decision by itself, and the whole call.
//!
//! Then [`tiers`]: a by-key limit alone, and the same limit picked by `choose` after a
//! `set-variable`.
//!
//! And [`jwt`]: a decision under `validate-jwt` with an RS256 token.
//!
//! Beside them, two parts that every keyed call pays whatever the design around them: the
//! SHA-256 of the key (the catalog holds only digests), and one counter found in the memory
//! store and handed to a change (a lock, the name hashed and compared).
//!
//! The admitted case rotates over the 10,000 subscriptions of a synthetic catalog with the clock
//! advancing 1 ms per call, so each subscription sees a call every 10 s: a sliding window then
//! holds about 6 admissions, as at a busy edge with many consumers. Each iteration is the whole
//! call: decide, respond, complete.

use apim_edge_harness::synth::{self, Sizes};
use apim_edge_policies::{
    key_digest, Catalog, Completion, CounterName, CounterStore, LoadOptions, MemoryStore, Outcome,
    Request,
};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const SIZES: Sizes = Sizes {
    subscriptions: 10_000,
    apis: 100,
    products: 50,
};

fn bench(c: &mut Criterion) {
    let catalog = Catalog::load(&synth::catalog(SIZES), LoadOptions::default()).unwrap();
    // Subscription i is in product i % 50, and calls an item of its first API.
    let callers = synth::Callers::new(SIZES);
    let req = |i: usize| callers.request(i);
    let done = Completion {
        status: 200,
        request_bytes: 0,
        response_bytes: 512,
    };

    let store = MemoryStore::new();
    let mut i = 0usize;
    let mut now = 1_767_225_600_000i64;
    // The rate limit holds about 6 admissions per subscription once every one has been called.
    for _ in 0..(2 * SIZES.subscriptions) {
        let d = catalog.decide(&req(i), now, &store).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed);
        i = (i + 1) % SIZES.subscriptions;
        now += 1;
    }
    c.bench_function("decide/admitted keyed call (rate-limit + quota)", |b| {
        b.iter(|| {
            let decided = catalog.decide(black_box(&req(i)), now, &store);
            let call = decided.as_ref().unwrap().call.as_ref().unwrap();
            black_box(catalog.respond(call, 200, &|_| false).unwrap());
            catalog.complete(call, done, now, &store).unwrap();
            i = (i + 1) % SIZES.subscriptions;
            now += 1;
        })
    });

    // One subscriber alone: the same work with its data in cache, calling once a second (61
    // admissions in its window), or every 70 ms, near its limit of 1,000 a minute (857).
    for (name, step) in [
        (
            "decide/admitted keyed call, one subscriber at 1 call/s",
            1_000,
        ),
        ("decide/admitted keyed call, one subscriber every 70 ms", 70),
    ] {
        let one_store = MemoryStore::new();
        let one = req(0);
        let mut one_now = now;
        c.bench_function(name, |b| {
            b.iter(|| {
                let decided = catalog.decide(black_box(&one), one_now, &one_store);
                let call = decided.as_ref().unwrap().call.as_ref().unwrap();
                black_box(catalog.respond(call, 200, &|_| false).unwrap());
                catalog.complete(call, done, one_now, &one_store).unwrap();
                one_now += step;
            })
        });
    }

    let bad = vec![(
        "Ocp-Apim-Subscription-Key".to_string(),
        "not-a-key".to_string(),
    )];
    let invalid = Request {
        headers: &bad,
        ..req(0)
    };
    c.bench_function("decide/401 invalid key", |b| {
        b.iter(|| {
            let decided = catalog.decide(black_box(&invalid), now, &store);
            assert_eq!(decided.as_ref().unwrap().outcome, Outcome::InvalidKey);
            black_box(decided)
        })
    });

    // Subscription 0 at its limit: every further call within the window is a 429.
    let limited = MemoryStore::new();
    let first = req(0);
    let calls = 1000; // product-0's rate limit
    for _ in 0..calls {
        assert_eq!(
            catalog.decide(&first, now, &limited).unwrap().outcome,
            Outcome::Allowed
        );
    }
    // Spread over the window the admissions would be distinct entries; here they share one
    // instant, which is the cheapest case for the window but the same path through the engine.
    c.bench_function("decide/429 rate limited", |b| {
        b.iter(|| {
            let decided = catalog.decide(black_box(&first), now + 1, &limited);
            assert_eq!(decided.as_ref().unwrap().outcome, Outcome::RateLimited);
            black_box(decided)
        })
    });
}

fn parts(c: &mut Criterion) {
    let key = synth::key_of(0);
    c.bench_function("part/SHA-256 of a subscription key", |b| {
        b.iter(|| black_box(key_digest(black_box(&key))))
    });
    // A name of the usual length: kind, subscription, the limit's place in its product.
    let name = &CounterName::new("rl", "sub-0", "product:product-0/rate-limit");
    let store = MemoryStore::new();
    store
        .update(name, &mut |state| {
            state.set(&[0; 24]);
            true
        })
        .unwrap();
    c.bench_function("part/one counter found in the memory store", |b| {
        b.iter(|| {
            store
                .update(black_box(name), &mut |state| {
                    black_box(state.bytes());
                    false
                })
                .unwrap()
        })
    });
}

/// A keyed, admitted call under a product rate limit and quota, and nothing else: the catalog
/// has no global, API or operation policy, so the call is routing, the key, the two limits and
/// the remaining-calls header.
fn starter(c: &mut Criterion) {
    let catalog = Catalog::load(&synth::starter(), LoadOptions::default()).unwrap();
    let headers = synth::starter_headers();
    let req = synth::starter_request(&headers);
    let done = Completion {
        status: 200,
        request_bytes: 0,
        response_bytes: 512,
    };
    let start = 1_767_225_600_000i64;
    // Once a second: 61 admissions in the rate limit's window once it is full.
    let (store, mut now) = (MemoryStore::new(), start);
    c.bench_function(
        "starter/decision (rate-limit + quota only), 1 call/s",
        |b| {
            b.iter(|| {
                // Read where it lies, as the filter and the replay do: moved out of the
                // result, its bytes would be copied just after they were written.
                let decided = catalog.decide(black_box(&req), now, &store);
                assert_eq!(decided.as_ref().unwrap().outcome, Outcome::Allowed);
                black_box(&decided);
                now += 1_000;
            })
        },
    );
    let (store, mut now) = (MemoryStore::new(), start);
    c.bench_function(
        "starter/whole call (rate-limit + quota only), 1 call/s",
        |b| {
            b.iter(|| {
                let decided = catalog.decide(black_box(&req), now, &store);
                let call = decided.as_ref().unwrap().call.as_ref().unwrap();
                black_box(catalog.respond(call, 200, &|_| false).unwrap());
                catalog.complete(call, done, now, &store).unwrap();
                now += 1_000;
            })
        },
    );
}

/// The product of the tiers case: one subscriber, and either a by-key limit on its name, or the
/// same limit picked by a `choose` of two branches (the second taken) after a `set-variable`.
fn tier_catalog(policy: &str) -> Catalog {
    let doc = serde_json::json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"}}],
        "products": [{"name": "tiered", "apis": ["orders"], "policy": policy}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/tiered", "displayName": "Free app", "primaryKey": "tier-key"}}]
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

/// `choose` with two branches and a by-key limit against the plain by-key limit (#20's goal:
/// at most twice its cost).
fn tiers(c: &mut Criterion) {
    const LIMIT: &str = r#"<rate-limit-by-key calls="1000000" renewal-period="60" counter-key="@(context.Subscription.Id)" />"#;
    let plain = tier_catalog(&format!("<policies><inbound>{LIMIT}</inbound></policies>"));
    let chosen = tier_catalog(&format!(
        r#"<policies><inbound>
            <set-variable name="tier" value="@(context.Subscription.Name.StartsWith(&quot;Gold&quot;) ? &quot;gold&quot; : &quot;free&quot;)" />
            <choose>
              <when condition="@((string)context.Variables[&quot;tier&quot;] == &quot;gold&quot;)">
                <rate-limit-by-key calls="2000000" renewal-period="60" counter-key="@(context.Subscription.Id)" />
              </when>
              <otherwise>{LIMIT}</otherwise>
            </choose>
        </inbound></policies>"#
    ));
    let headers = vec![(
        "Ocp-Apim-Subscription-Key".to_string(),
        "tier-key".to_string(),
    )];
    let req = Request {
        method: "GET",
        host: "api.contoso.com",
        path: "/orders/1",
        query: "",
        headers: &headers,
        client_ip: None,
    };
    for (name, catalog) in [
        ("tiers/by-key limit", &plain),
        (
            "tiers/choose of two branches + set-variable + by-key limit",
            &chosen,
        ),
    ] {
        let (store, mut now) = (MemoryStore::new(), 1_767_225_600_000i64);
        c.bench_function(name, |b| {
            b.iter(|| {
                let decided = catalog.decide(black_box(&req), now, &store);
                assert_eq!(decided.as_ref().unwrap().outcome, Outcome::Allowed);
                black_box(&decided);
                now += 1_000;
            })
        });
    }
}

/// `validate-jwt` on the sample catalog's `secure-api`: a valid RS256 token, the first of
/// `tests/traces/jwt.jsonl` (signature, then claims, on every call).
fn jwt(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sample = std::fs::read_to_string(root.join("tests/catalog/sample.json")).unwrap();
    let catalog = Catalog::load_str(&sample, LoadOptions::default()).unwrap();
    let trace = std::fs::read_to_string(root.join("tests/traces/jwt.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(trace.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let auth = first["headers"]["Authorization"]
        .as_str()
        .unwrap()
        .to_string();
    let headers = vec![("Authorization".to_string(), auth)];
    let req = Request {
        method: "GET",
        host: "api.contoso.com",
        path: "/secure/orders",
        query: "",
        headers: &headers,
        client_ip: None,
    };
    let store = MemoryStore::new();
    let now = 1_767_225_600_000i64;
    c.bench_function("jwt/decision with a valid RS256 token", |b| {
        b.iter(|| {
            let decided = catalog.decide(black_box(&req), now, &store);
            assert_eq!(decided.as_ref().unwrap().outcome, Outcome::Allowed);
            black_box(&decided);
        })
    });
}

criterion_group!(benches, bench, starter, tiers, jwt, parts);
criterion_main!(benches);
