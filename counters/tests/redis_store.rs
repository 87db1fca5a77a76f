//! The Redis store against the engine's in-memory one: random call sequences over every kind
//! of counter decide the same, applied as one transaction per call and counter by counter;
//! and leases (a share of a limit counted at once) answer the same.
//! A real `redis-server` (from Debian's packages; `tests/run.sh` installs it) on a free port.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::zombie_processes
)]

use apim_edge_counters::metrics::Metrics;
use apim_edge_counters::store::{ApplyMode, Redis, SharedStore};
use apim_edge_policies::{
    apply_plan, Catalog, Completion, CounterName, CounterOp, CounterPlan, FixedWindows, Leasable,
    LoadOptions, MemoryStore, Millis, Outcome, OwnLimits, Request,
};
use proptest::prelude::*;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process id of the Redis answering on `port`, when one answers (`INFO server`).
fn redis_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("process_id:") || !text[text.find("process_id:")?..].contains('\n') {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let at = text.find("process_id:")? + "process_id:".len();
    text[at..].lines().next()?.trim().parse().ok()
}

/// A Redis of this test's own on a free port. The port is found by binding and letting go, so
/// a test running beside this one may pick the same: a server that answers with another
/// process id is not ours, and another port is tried.
fn redis_server() -> Server {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (tests/run.sh installs it)");
        for _ in 0..200 {
            if let Some(pid) = redis_pid(port) {
                if pid == child.id() {
                    return Server(child, port);
                }
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("redis-server did not start on a port of its own");
}

/// Every kind of counter: a rate limit and a quota side by side (a subscription's own), by-key
/// limits on a tenant header at two scopes, a quota-by-key counted at completion, an
/// operation's nested rate limit, and a header check after the limits.
fn catalog() -> Catalog {
    let product = r#"<policies><inbound>
        <rate-limit calls="4" renewal-period="20" />
        <quota calls="9" renewal-period="3600" />
        <rate-limit-by-key calls="3" renewal-period="10" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;x-tenant&quot;, &quot;none&quot;))" />
        <base /></inbound></policies>"#;
    let api = r#"<policies><inbound><base />
        <rate-limit-by-key calls="2" renewal-period="10" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;x-tenant&quot;, &quot;none&quot;))" />
        <quota-by-key calls="5" renewal-period="300" counter-key="@(context.Subscription.Id)" increment-condition="@(context.Response.StatusCode &lt; 400)" />
        <check-header name="x-deny" failed-check-httpcode="403" failed-check-error-message="denied"><value>no</value></check-header>
        </inbound></policies>"#;
    let doc = serde_json::json!({
        "apis": [{"name": "a", "properties": {"path": "a"}, "policy": api,
                  "operations": [
                      {"name": "get", "method": "GET", "urlTemplate": "/x"},
                      {"name": "put", "method": "PUT", "urlTemplate": "/x",
                       "policy": "<policies><inbound><base /><rate-limit calls=\"1\" renewal-period=\"30\" /></inbound></policies>"}]}],
        "products": [{"name": "p", "apis": ["a"], "policy": product}],
        "subscriptions": [
            {"name": "s1", "properties": {"scope": "/products/p", "primaryKey": "k1"}},
            {"name": "s2", "properties": {"scope": "/products/p", "primaryKey": "k2"}}]
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

/// The service's store over the Redis at `port` (made on a runtime: its connection manager
/// starts there).
fn shared_store(mode: ApplyMode, port: u16) -> Arc<SharedStore> {
    let redis =
        Redis::single(&format!("redis://127.0.0.1:{port}"), Duration::from_secs(2)).unwrap();
    Arc::new(SharedStore::new(
        redis,
        mode,
        Duration::from_secs(2),
        Arc::new(Metrics::new()),
    ))
}

/// When (ms after the last call), whose key, which tenant, PUT or GET, whether it fails the
/// header check, whether the upstream fails.
type Call = (u16, bool, bool, bool, bool, bool);

fn run(mode: ApplyMode, calls: &[Call], rt: &tokio::runtime::Runtime, port: u16) {
    let c = catalog();
    let local = MemoryStore::new();
    // Two replicas of the service on one Redis, taking calls in turn: what one remembers of a
    // counter the other has changed since is found out and read again.
    let replica = || shared_store(mode, port);
    rt.block_on(async {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    });
    let replicas = rt.block_on(async { [replica(), replica()] });
    let mut now: Millis = 1_000_000;
    for (i, &(dt, second, tenant_b, put, deny, fails)) in calls.iter().enumerate() {
        now += Millis::from(dt);
        let h: Vec<(String, String)> = vec![
            (
                "ocp-apim-subscription-key".into(),
                if second { "k2" } else { "k1" }.into(),
            ),
            ("x-tenant".into(), if tenant_b { "b" } else { "a" }.into()),
            ("x-deny".into(), if deny { "yes" } else { "no" }.into()),
        ];
        let req = Request {
            method: if put { "PUT" } else { "GET" },
            host: "h",
            path: "/a/x",
            query: "",
            headers: &h,
            client_ip: None,
        };
        let done = Completion {
            status: if fails { 500 } else { 200 },
            request_bytes: 0,
            response_bytes: 0,
        };
        let d = c.decide(&req, now, &local).unwrap();
        if let (Outcome::Allowed, Some(call)) = (d.outcome, &d.call) {
            c.complete(call, done, now, &local).unwrap();
        }
        let store = &replicas[i % 2];
        let (first, plan) = c.plan(&req, now);
        let shared = if plan.ops.is_empty() {
            first.unwrap().outcome
        } else {
            let answers = rt.block_on(store.apply(plan, now)).unwrap();
            let d2 = c.decide_answered(&req, now, &answers).unwrap();
            if let (Outcome::Allowed, Some(call)) = (d2.outcome, &d2.call) {
                let ops = c.completion_ops(call, done, now).unwrap();
                let completion = apim_edge_policies::CounterPlan {
                    ops,
                    then_release: false,
                };
                rt.block_on(store.apply(completion, now)).unwrap();
            }
            d2.outcome
        };
        assert_eq!(d.outcome, shared, "{mode:?}: call {i} at {now}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn redis_decides_as_the_memory_store(
        calls in proptest::collection::vec(
            (0u16..3_000, any::<bool>(), any::<bool>(), proptest::bool::weighted(0.2),
             proptest::bool::weighted(0.15), proptest::bool::weighted(0.2)),
            1..50,
        )
    ) {
        let server = redis_server();
        let rt = tokio::runtime::Runtime::new().unwrap();
        run(ApplyMode::Transaction, &calls, &rt, server.1);
        run(ApplyMode::PerCounter, &calls, &rt, server.1);
    }
}

/// One lease at a time, `(ms after the last, which counter, its size, taken back after)`, on
/// each kind of leasable counter, through Redis and in memory.
fn leases(mode: ApplyMode, asks: &[(u16, u8, u8, bool)], rt: &tokio::runtime::Runtime, port: u16) {
    // The client's connection manager starts on the runtime.
    let store = rt.block_on(async { shared_store(mode, port) });
    let memory = MemoryStore::new();
    let quota = FixedWindows {
        origin: 0,
        period: 10_000,
        calls: Some(20),
        bandwidth_kb: None,
    };
    let mut now: Millis = 1_000_000;
    for (i, &(dt, kind, calls, then_release)) in asks.iter().enumerate() {
        now += Millis::from(dt);
        let admit = match kind % 3 {
            0 => Leasable::Sliding {
                calls: 15,
                period: 5_000,
            },
            1 => Leasable::Fixed(quota),
            _ => Leasable::Own(OwnLimits {
                rate: Some((15, 5_000)),
                quota: Some(quota),
                quota_first: kind % 2 == 0,
            }),
        };
        let key = CounterName::new("lease-test", "s", ["r", "q", "o"][usize::from(kind % 3)]);
        let plan = CounterPlan {
            ops: vec![CounterOp::Lease {
                key,
                admit,
                calls: u64::from(calls) + 1,
            }
            .into_owned()],
            then_release,
        };
        let expected = apply_plan(&plan, &memory, now).unwrap();
        let answers = rt.block_on(store.apply(plan, now)).unwrap();
        assert_eq!(answers, expected, "{mode:?}: lease {i} at {now}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn leases_through_redis_answer_as_in_memory(
        asks in proptest::collection::vec(
            (0u16..800, 0u8..6, 0u8..8, proptest::bool::weighted(0.1)),
            1..60,
        )
    ) {
        let server = redis_server();
        let rt = tokio::runtime::Runtime::new().unwrap();
        for mode in [ApplyMode::Transaction, ApplyMode::PerCounter] {
            rt.block_on(async {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", server.1))
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
            });
            leases(mode, &asks, &rt, server.1);
        }
    }
}
