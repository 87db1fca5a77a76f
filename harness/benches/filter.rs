//! The full proxy-wasm cycle of one request through the filter's `.wasm` in the wasmtime host
//! (criterion): context create, request headers, response headers, log, done, delete, and the
//! host reading back what the filter decided. Beside each, the same request through the native
//! engine with the same bookkeeping (`replay::replay_one`), so the ratio is measured in one run.
//!
//! Cases: an admitted keyed call under a product rate limit and quota (rotating over 10,000
//! subscriptions, 1 ms apart, as in the engine bench), a 401 and a 429.

use apim_edge_harness::host::{Host, NoUpstreams};
use apim_edge_harness::replay;
use apim_edge_harness::synth::{self, key_of, Sizes};
use apim_edge_harness::trace::Entry;
use apim_edge_harness::{build, wasm_replay};
use apim_edge_policies::{Catalog, LoadOptions, MemoryStore};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const SIZES: Sizes = Sizes {
    subscriptions: 10_000,
    apis: 100,
    products: 50,
};

const START: i64 = 1_767_225_600_000;

fn call(i: usize, key: &str) -> Entry {
    Entry {
        at: START,
        method: "GET".into(),
        host: "api.contoso.com".into(),
        path: synth::path_of(SIZES, i),
        query: String::new(),
        headers: vec![("Ocp-Apim-Subscription-Key".into(), key.into())],
        client_ip: Some("192.0.2.1".parse().unwrap()),
        request_bytes: 0,
        response_bytes: 512,
        upstream_status: 200,
        expect: None,
    }
}

fn bench(c: &mut Criterion) {
    let doc = synth::catalog(SIZES);
    let catalog = Catalog::load(&doc, LoadOptions::default()).unwrap();
    let host = Host::load(&build::filter_wasm()).unwrap();
    let config = serde_json::json!({ "snapshot": doc }).to_string();
    let mut vm = host
        .vm_at(config.as_bytes(), START as u64 * 1_000_000)
        .unwrap();
    let store = MemoryStore::new();
    let mut calls: Vec<Entry> = (0..SIZES.subscriptions)
        .map(|i| call(i, &key_of(i)))
        .collect();

    // Warm both sides: every subscription called twice, so each window holds entries.
    let mut now = START;
    let mut k = 0usize;
    let mut next = |calls: &mut Vec<Entry>| {
        let i = k % SIZES.subscriptions;
        k += 1;
        now += 1;
        calls[i].at = now;
        i
    };
    for _ in 0..2 * SIZES.subscriptions {
        let i = next(&mut calls);
        let w = wasm_replay::replay_one(&mut vm, 2, i, &calls[i], &NoUpstreams).unwrap();
        let n = replay::replay_one(&catalog, &store, i, &calls[i]);
        assert_eq!((w.outcome, n.outcome), ("allowed", "allowed"));
    }

    let mut group = c.benchmark_group("cycle");
    group.bench_function("wasm/admitted keyed call (rate-limit + quota)", |b| {
        b.iter(|| {
            let i = next(&mut calls);
            black_box(wasm_replay::replay_one(&mut vm, 2, i, &calls[i], &NoUpstreams).unwrap())
        })
    });
    group.bench_function("native/admitted keyed call (rate-limit + quota)", |b| {
        b.iter(|| {
            let i = next(&mut calls);
            black_box(replay::replay_one(&catalog, &store, i, &calls[i]))
        })
    });

    let invalid = call(0, "not-a-key");
    let check = |outcome: &str, want: &str| assert_eq!(outcome, want);
    check(
        wasm_replay::replay_one(&mut vm, 2, 0, &invalid, &NoUpstreams)
            .unwrap()
            .outcome,
        "invalid_key",
    );
    group.bench_function("wasm/401 invalid key", |b| {
        b.iter(|| {
            black_box(wasm_replay::replay_one(&mut vm, 2, 0, &invalid, &NoUpstreams).unwrap())
        })
    });
    group.bench_function("native/401 invalid key", |b| {
        b.iter(|| black_box(replay::replay_one(&catalog, &store, 0, &invalid)))
    });

    // Subscription 0 (product-0: 1,000 calls a minute) at its limit, in both stores.
    let mut limited = call(0, &key_of(0));
    limited.at = now + 1;
    for _ in 0..1000 {
        wasm_replay::replay_one(&mut vm, 2, 0, &limited, &NoUpstreams).unwrap();
        replay::replay_one(&catalog, &store, 0, &limited);
    }
    check(
        wasm_replay::replay_one(&mut vm, 2, 0, &limited, &NoUpstreams)
            .unwrap()
            .outcome,
        "rate_limited",
    );
    check(
        replay::replay_one(&catalog, &store, 0, &limited).outcome,
        "rate_limited",
    );
    group.bench_function("wasm/429 rate limited", |b| {
        b.iter(|| {
            black_box(wasm_replay::replay_one(&mut vm, 2, 0, &limited, &NoUpstreams).unwrap())
        })
    });
    group.bench_function("native/429 rate limited", |b| {
        b.iter(|| black_box(replay::replay_one(&catalog, &store, 0, &limited)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
