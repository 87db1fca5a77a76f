//! A fleet of real Envoys sharing counters through the counter service and real Redis
//! (SPEC §7): exact limits across proxies, a Redis Cluster, and what each `onUnavailable` does
//! when Redis or the service goes away.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_e2e::fleet::{self, CounterService, Redis, RedisCluster};
use apim_edge_e2e::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Fleet tests share two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn catalog(product_policy: &str, api_policy: &str) -> Value {
    let api_policy = (!api_policy.is_empty()).then_some(api_policy);
    json!({
        "apis": [{"name": "load", "path": "load", "policy": api_policy,
                  "operations": [
                      {"name": "get-item", "method": "GET", "urlTemplate": "/items/{id}"},
                      {"name": "put-item", "method": "PUT", "urlTemplate": "/items/{id}",
                       "policy": "<policies><inbound><base /><rate-limit calls=\"1\" renewal-period=\"300\" /></inbound></policies>"}]}],
        "products": [{"name": "bulk", "apis": ["load"], "policy": product_policy}],
        "subscriptions": [
            {"name": "bulk-sub", "properties": {"scope": "/products/bulk", "primaryKey": "bulk-key"}},
            {"name": "other-sub", "properties": {"scope": "/products/bulk", "primaryKey": "other-key"}}]
    })
}

/// Three Envoys of two workers each, sharing counters through `service`.
fn fleet(
    upstream: &Upstream,
    snapshot: &Value,
    counters: Value,
    service: &CounterService,
) -> Vec<Envoy> {
    let config = json!({"snapshot": snapshot, "counters": counters});
    (0..3)
        .map(|_| start_envoy_in_fleet(upstream, &config, None, Some(service.port), 2).unwrap())
        .collect()
}

fn shared(timeout_ms: u64, on_unavailable: &str) -> Value {
    json!({"cluster": "apim-counters", "timeoutMs": timeout_ms, "onUnavailable": on_unavailable})
}

/// `total` calls of `method path` with `key`, from 36 concurrent connections spread over the
/// fleet's proxies; the statuses seen, counted.
fn hammer(
    ports: &[u16],
    total: usize,
    method: &str,
    path: &str,
    key: &str,
) -> BTreeMap<u16, usize> {
    let sent = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let threads: Vec<_> = (0..36)
        .map(|i| {
            let port = ports[i % ports.len()];
            let (sent, seen) = (sent.clone(), seen.clone());
            let (method, path, key) = (method.to_string(), path.to_string(), key.to_string());
            std::thread::spawn(move || {
                while sent.fetch_add(1, Ordering::SeqCst) < total {
                    let r = request(
                        port,
                        &method,
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

fn ports(envoys: &[Envoy]) -> Vec<u16> {
    envoys.iter().map(|e| e.port).collect()
}

/// A stat of the filter's, summed over the fleet.
fn stat(envoys: &[Envoy], name: &str) -> u64 {
    envoys
        .iter()
        .flat_map(|e| e.stats(name))
        .filter(|(n, _)| n.ends_with(name))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_quota_of_300_admits_exactly_300_across_three_envoys() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><quota calls="300" renewal-period="86400" /><base /></inbound></policies>"#,
        "",
    );
    for round in 0..3 {
        let redis = Redis::start();
        let service = CounterService::start(&redis.url());
        let envoys = fleet(&upstream, &snapshot, shared(5_000, "deny"), &service);
        let seen = hammer(&ports(&envoys), 400, "GET", "/load/items/1", "bulk-key");
        assert_eq!(seen.get(&200), Some(&300), "round {round}: {seen:?}");
        assert_eq!(seen.get(&403), Some(&100), "round {round}: {seen:?}");
        assert_eq!(stat(&envoys, "apim_edge.counters.unavailable"), 0);
        assert_eq!(service.metric("apim_edge_counters_calls_total"), 400);
    }
}

/// Leases (not in the SPEC; `docs/design.md`): each proxy admits from shares of the product's
/// limits it took from Redis, asking the service about at most half the calls it admits. The fleet never admits more
/// than the quota, and less by at most the shares left unspent: 31 calls per proxy.
#[test]
fn leased_shares_of_a_quota_never_over_admit_and_spare_the_service_half_the_calls() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><rate-limit calls="5000" renewal-period="300" /><quota calls="1000" renewal-period="86400" /><base /></inbound></policies>"#,
        "",
    );
    let mut counters = shared(5_000, "deny");
    counters["lease"] = json!({"calls": 32, "minLimit": 100, "holdMs": 1000});
    for round in 0..2 {
        let redis = Redis::start();
        let service = CounterService::start(&redis.url());
        let envoys = fleet(&upstream, &snapshot, counters.clone(), &service);
        let seen = hammer(&ports(&envoys), 1400, "GET", "/load/items/1", "bulk-key");
        let admitted = seen.get(&200).copied().unwrap_or(0);
        assert!(admitted <= 1000, "round {round}: over-admitted: {seen:?}");
        assert!(admitted >= 1000 - 3 * 31, "round {round}: {seen:?}");
        assert_eq!(
            seen.get(&403),
            Some(&(1400 - admitted)),
            "round {round}: {seen:?}"
        );
        assert_eq!(stat(&envoys, "apim_edge.counters.unavailable"), 0);
        let asked = service.metric("apim_edge_counters_calls_total");
        let leased = stat(&envoys, "apim_edge.counters.leased");
        eprintln!(
            "round {round}: {seen:?}, the service asked {asked} times, {leased} calls leased"
        );
        // Calls past the quota are denied by the service (no share is left to spend); of the
        // calls admitted, at least half were decided from shares, without waiting.
        assert!(
            leased >= 500,
            "round {round}: {leased} calls decided from leases"
        );
    }
}

#[test]
fn a_rate_limit_of_50_per_300_seconds_admits_exactly_50_across_three_envoys() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><rate-limit calls="50" renewal-period="300" /><base /></inbound></policies>"#,
        "",
    );
    for round in 0..3 {
        let redis = Redis::start();
        let service = CounterService::start(&redis.url());
        let envoys = fleet(&upstream, &snapshot, shared(5_000, "deny"), &service);
        let seen = hammer(&ports(&envoys), 150, "GET", "/load/items/1", "bulk-key");
        assert_eq!(seen.get(&200), Some(&50), "round {round}: {seen:?}");
        assert_eq!(seen.get(&429), Some(&100), "round {round}: {seen:?}");
    }
}

#[test]
fn an_operation_limit_that_denies_gives_back_the_products_count() {
    let _one = serial();
    let upstream = start_upstream();
    // The product's quota of 10 counts first; the operation's rate limit of 1 then denies every
    // PUT but one, and what the quota counted for them is given back.
    let snapshot = catalog(
        r#"<policies><inbound><quota calls="10" renewal-period="86400" /><base /></inbound></policies>"#,
        "",
    );
    for round in 0..3 {
        let redis = Redis::start();
        let service = CounterService::start(&redis.url());
        let envoys = fleet(&upstream, &snapshot, shared(5_000, "deny"), &service);
        let puts = hammer(&ports(&envoys), 40, "PUT", "/load/items/1", "bulk-key");
        assert_eq!(puts.get(&200), Some(&1), "round {round}: {puts:?}");
        assert_eq!(puts.get(&429), Some(&39), "round {round}: {puts:?}");
        let gets = hammer(&ports(&envoys), 40, "GET", "/load/items/1", "bulk-key");
        assert_eq!(gets.get(&200), Some(&9), "round {round}: {gets:?}");
        assert_eq!(gets.get(&403), Some(&31), "round {round}: {gets:?}");
    }
}

/// Two subscription names whose counters the cluster keeps on different shards.
fn names_on_different_shards(cluster: &RedisCluster) -> (String, String) {
    let port = cluster.nodes[0].port;
    let node_of = |name: &str| {
        let slot: u16 = fleet::redis_cli(port, &["cluster", "keyslot", &format!("{{{name}}}")])
            .trim()
            .parse()
            .unwrap();
        // `--cluster create` gives three masters equal ranges of the 16384 slots.
        slot / 5462
    };
    let first = "sub-0".to_string();
    let second = (1..100)
        .map(|i| format!("sub-{i}"))
        .find(|n| node_of(n) != node_of(&first))
        .unwrap();
    (first, second)
}

#[test]
fn a_quota_over_a_three_shard_redis_cluster_is_exact() {
    let _one = serial();
    let upstream = start_upstream();
    let cluster = RedisCluster::start(3);
    let (a, b) = names_on_different_shards(&cluster);
    let snapshot = json!({
        "apis": [{"name": "load", "path": "load"}],
        "products": [{"name": "bulk", "apis": ["load"],
                      "policy": r#"<policies><inbound><quota calls="100" renewal-period="86400" /></inbound></policies>"#}],
        "subscriptions": [
            {"name": a, "properties": {"scope": "/products/bulk", "primaryKey": "key-a"}},
            {"name": b, "properties": {"scope": "/products/bulk", "primaryKey": "key-b"}}]
    });
    let service = CounterService::start_with(&["--redis-cluster", &cluster.urls()]);
    let envoys = fleet(&upstream, &snapshot, shared(5_000, "deny"), &service);
    for key in ["key-a", "key-b"] {
        let seen = hammer(&ports(&envoys), 130, "GET", "/load/x", key);
        assert_eq!(seen.get(&200), Some(&100), "{key}: {seen:?}");
        assert_eq!(seen.get(&403), Some(&30), "{key}: {seen:?}");
    }
    // Each subscription's counter lives on one shard, the two on different ones.
    let holders = |name: &str| -> Vec<usize> {
        cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.keys().iter().any(|k| k.contains(&format!("{{{name}}}"))))
            .map(|(i, _)| i)
            .collect()
    };
    let (on_a, on_b) = (holders(&a), holders(&b));
    assert_eq!((on_a.len(), on_b.len()), (1, 1), "{on_a:?} {on_b:?}");
    assert_ne!(on_a, on_b);
}

#[test]
fn redis_keys_hold_no_subscription_key_and_expire_with_their_windows() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><rate-limit calls="50" renewal-period="300" /><quota calls="100" renewal-period="3600" /><base /></inbound></policies>"#,
        r#"<policies><inbound><base /><rate-limit-by-key calls="5" renewal-period="60" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;Ocp-Apim-Subscription-Key&quot;, &quot;&quot;))" /></inbound></policies>"#,
    );
    let redis = Redis::start();
    let service = CounterService::start(&redis.url());
    let envoys = fleet(&upstream, &snapshot, shared(5_000, "deny"), &service);
    let seen = hammer(&ports(&envoys), 8, "GET", "/load/items/1", "bulk-key");
    assert_eq!(seen.get(&200), Some(&5), "{seen:?}");
    let keys = redis.keys();
    assert!(keys.len() >= 2, "{keys:?}");
    for k in &keys {
        assert!(
            !k.contains("bulk-key"),
            "a key names the subscription key: {k}"
        );
        let ttl: i64 = fleet::redis_cli(redis.port, &["pttl", k])
            .trim()
            .parse()
            .unwrap();
        // Every key expires, no later than its longest window (an hour) and the clock skew
        // allowance.
        assert!(ttl > 0 && ttl <= 3_600_000 + 2_000, "{k}: pttl {ttl}");
    }
}

fn get(envoy: &Envoy) -> Response {
    request(
        envoy.port,
        "GET",
        "/load/items/1",
        &[("Ocp-Apim-Subscription-Key".into(), "bulk-key".into())],
    )
}

const UNAVAILABLE_BODY: &str = r#"{"statusCode": 503, "message": "Service Unavailable"}"#;

/// What a proxy of each `onUnavailable` answers now: (deny, local, allow).
fn answers(envoys: &[Envoy]) -> (Response, Response, Response) {
    (get(&envoys[0]), get(&envoys[1]), get(&envoys[2]))
}

fn assert_all_admit(envoys: &[Envoy], when: &str) {
    for (e, mode) in envoys.iter().zip(["deny", "local", "allow"]) {
        let r = get(e);
        assert_eq!(r.status, 200, "{when}: {mode}: {r:?}\n{}", e.log_text());
    }
}

/// Waits (10 s at most) until the `deny` proxy admits a call again.
fn admits_again(envoy: &Envoy, when: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(envoy).status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "{when}: still refused after 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn assert_unavailable_answers(envoys: &[Envoy], when: &str) {
    let (deny, local, allow) = answers(envoys);
    assert_eq!(deny.status, 503, "{when}: deny: {deny:?}");
    assert_eq!(deny.body, UNAVAILABLE_BODY, "{when}");
    assert_eq!(local.status, 200, "{when}: local: {local:?}");
    assert_eq!(allow.status, 200, "{when}: allow: {allow:?}");
}

#[test]
fn redis_or_the_service_gone_each_on_unavailable_answers_and_counting_resumes() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><quota calls="1000" renewal-period="86400" /><base /></inbound></policies>"#,
        "",
    );
    let mut redis = Redis::start();
    let mut service = CounterService::start(&redis.url());
    let envoys: Vec<Envoy> = ["deny", "local", "allow"]
        .iter()
        .map(|mode| {
            let config = json!({"snapshot": snapshot, "counters": shared(5_000, mode)});
            start_envoy_in_fleet(&upstream, &config, None, Some(service.port), 2).unwrap()
        })
        .collect();
    assert_all_admit(&envoys, "with Redis");

    redis.stop();
    assert_unavailable_answers(&envoys, "Redis stopped");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        envoys[0]
            .access_log_text()
            .contains("outcome=counters_unavailable"),
        "{}",
        envoys[0].access_log_text()
    );
    assert!(stat(&envoys[1..2], "apim_edge.counters.fallbacks") >= 1);
    assert_eq!(stat(&envoys[0..1], "apim_edge.counters.fallbacks"), 0);
    assert!(service.metric("apim_edge_counters_errors_total") >= 3);

    redis.restart();
    // The service reconnects by itself: within seconds, without a restart of anything.
    admits_again(&envoys[0], "Redis back");
    let before = service.metric("apim_edge_counters_calls_total");
    let unavailable = stat(&envoys, "apim_edge.counters.unavailable");
    assert_all_admit(&envoys, "Redis back");
    assert_eq!(service.metric("apim_edge_counters_calls_total"), before + 3);
    assert_eq!(stat(&envoys, "apim_edge.counters.unavailable"), unavailable);
    assert!(!redis.keys().is_empty(), "counting resumed in Redis");

    service.kill();
    assert_unavailable_answers(&envoys, "the service killed");
    service.restart();
    admits_again(&envoys[0], "the service back");
    assert_all_admit(&envoys, "the service back");
    for e in &envoys {
        assert!(!e.log_text().contains("panicked"), "{}", e.log_text());
    }
}

#[test]
fn a_slow_redis_takes_the_timeout_path() {
    let _one = serial();
    let upstream = start_upstream();
    let snapshot = catalog(
        r#"<policies><inbound><quota calls="1000" renewal-period="86400" /><base /></inbound></policies>"#,
        "",
    );
    let redis = Redis::start();
    let service = CounterService::start(&redis.url());
    let config = json!({"snapshot": snapshot, "counters": shared(200, "deny")});
    let envoy = start_envoy_in_fleet(&upstream, &config, None, Some(service.port), 2).unwrap();
    assert_eq!(get(&envoy).status, 200);
    let port = redis.port;
    let sleeper = std::thread::spawn(move || fleet::redis_cli(port, &["debug", "sleep", "2"]));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let r = get(&envoy);
    assert_eq!(r.status, 503, "after {:?}: {r:?}", started.elapsed());
    assert_eq!(r.body, UNAVAILABLE_BODY);
    assert!(
        stat(std::slice::from_ref(&envoy), "apim_edge.counters.timeouts") >= 1,
        "{:?}\n{}",
        envoy.stats("apim_edge"),
        envoy.log_text()
    );
    // Answered at the filter's timeout, not at Redis' pace.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1_700),
        "{:?}",
        started.elapsed()
    );
    sleeper.join().unwrap();
    assert_eq!(get(&envoy).status, 200);
}

#[test]
fn the_service_drains_and_exits_0_on_sigterm() {
    let _one = serial();
    let redis = Redis::start();
    let mut service = CounterService::start(&redis.url());
    let status = service.terminate().unwrap();
    assert_eq!(status.code(), Some(0), "{}", service.log_text());
    assert!(
        service.log_text().contains("stopping"),
        "{}",
        service.log_text()
    );
}

/// `apim-edge replay --wasm` of `trace` in a process of its own, through the counter service.
fn replay_in_host(
    service: &CounterService,
    snapshot: &std::path::Path,
    trace: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(cli_bin())
        .args(["replay", "--check", "--workers", "2", "--counters"])
        .arg(format!("127.0.0.1:{}", service.port))
        .arg("--snapshot")
        .arg(snapshot)
        .arg("--trace")
        .arg(trace)
        .arg("--wasm")
        .arg(filter_wasm())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("apim-edge-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A catalog whose product has a quota of 30 calls a day, written to `name`.
fn quota_of_30(name: &str) -> std::path::PathBuf {
    let snapshot = scratch(name);
    let policy = r#"<policies><inbound><quota calls="30" renewal-period="86400" /><base /></inbound></policies>"#;
    std::fs::write(&snapshot, catalog(policy, "").to_string()).unwrap();
    snapshot
}

#[test]
fn replays_in_three_host_processes_share_one_redis_exactly() {
    let _one = serial();
    let redis = Redis::start();
    let service = CounterService::start(&redis.url());
    let snapshot = quota_of_30("quota.json");
    // Three processes, 20 calls each, at interleaved times of one day.
    let children: Vec<_> = (0..3)
        .map(|p| {
            let lines: Vec<String> = (0..20)
                .map(|i| {
                    json!({"t": (i * 3 + p) as f64, "method": "GET", "url": "/load/items/1",
                           "headers": {"Ocp-Apim-Subscription-Key": "bulk-key"}})
                    .to_string()
                })
                .collect();
            let trace = scratch(&format!("part-{p}.jsonl"));
            std::fs::write(&trace, lines.join("\n")).unwrap();
            replay_in_host(&service, &snapshot, &trace)
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            *statuses.entry(v["status"].as_u64().unwrap()).or_insert(0) += 1;
        }
    }
    assert_eq!(statuses.get(&200), Some(&30), "{statuses:?}");
    assert_eq!(statuses.get(&403), Some(&30), "{statuses:?}");
}

#[test]
fn apim_windows_hold_across_processes_on_the_virtual_clock() {
    let _one = serial();
    let redis = Redis::start();
    let service = CounterService::start(&redis.url());
    // A quota of 2 an hour, its windows aligned to the subscription's start (10:30); a
    // quota-by-key of 3 an hour on the client address, from its first-period-start (10:15).
    let snapshot = scratch("windows.json");
    std::fs::write(
        &snapshot,
        json!({
            "apis": [{"name": "load", "path": "load",
                      "policy": "<policies><inbound><base /><quota-by-key calls=\"3\" renewal-period=\"3600\" counter-key=\"@(context.Request.IpAddress)\" first-period-start=\"2026-01-05T10:15:00Z\" /></inbound></policies>"}],
            "products": [{"name": "bulk", "apis": ["load"],
                          "policy": "<policies><inbound><quota calls=\"2\" renewal-period=\"3600\" /><base /></inbound></policies>"}],
            "subscriptions": [
                {"name": "a", "properties": {"scope": "/products/bulk", "primaryKey": "key-a", "startDate": "2026-01-05T10:30:00Z"}},
                {"name": "b", "properties": {"scope": "/products/bulk", "primaryKey": "key-b", "startDate": "2026-01-05T10:30:00Z"}}]
        })
        .to_string(),
    )
    .unwrap();
    let call = |at: &str, key: &str, status: u16, retry: Option<&str>| {
        let mut expect = json!({"status": status});
        if let Some(r) = retry {
            expect["headers"] = json!({"retry-after": r});
        }
        json!({"at": at, "method": "GET", "url": "/load/x", "clientIp": "203.0.113.9",
               "headers": {"Ocp-Apim-Subscription-Key": key}, "expect": expect})
        .to_string()
    };
    // The first process: two calls of a fill its 10:30 window, and count twice for the
    // address in its 11:15 window.
    let first = scratch("first.jsonl");
    std::fs::write(
        &first,
        [
            call("2026-01-05T11:16:00Z", "key-a", 200, None),
            call("2026-01-05T11:17:00Z", "key-a", 200, None),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = replay_in_host(&service, &snapshot, &first)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The second process sees them: a's window is full until 11:30 (5 minutes at 11:25, and
    // the denied call counts nowhere); b's first call is the address's third in its 11:15
    // window, its second is refused until 12:15 (48 minutes). At 12:15 both of a's windows
    // are new.
    let second = scratch("second.jsonl");
    std::fs::write(
        &second,
        [
            call("2026-01-05T11:25:00Z", "key-a", 403, Some("300")),
            call("2026-01-05T11:26:00Z", "key-b", 200, None),
            call("2026-01-05T11:27:00Z", "key-b", 403, Some("2880")),
            call("2026-01-05T12:15:00Z", "key-a", 200, None),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = replay_in_host(&service, &snapshot, &second)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--callout CLUSTER=HOST:PORT` forwards the filter's gRPC callouts as they are, so a plain
/// callout rule reaches the counter service as `--counters` does: two replays, one after the
/// other, share one quota of 30 through Redis.
#[test]
fn a_callout_rule_forwards_grpc_to_the_counter_service() {
    let _one = serial();
    let redis = Redis::start();
    let service = CounterService::start(&redis.url());
    let snapshot = quota_of_30("forwarded.json");
    let config = scratch("forwarded.config.json");
    std::fs::write(
        &config,
        json!({"counters": {"cluster": "counters-by-rule"}}).to_string(),
    )
    .unwrap();
    let mut admitted = Vec::new();
    for part in 0..2 {
        let lines: Vec<String> = (0..20)
            .map(|i| {
                json!({"t": (part * 20 + i) as f64, "method": "GET", "url": "/load/items/1",
                       "headers": {"Ocp-Apim-Subscription-Key": "bulk-key"}})
                .to_string()
            })
            .collect();
        let trace = scratch(&format!("forwarded-{part}.jsonl"));
        std::fs::write(&trace, lines.join("\n")).unwrap();
        let out = std::process::Command::new(cli_bin())
            .args(["replay", "--callout"])
            .arg(format!("counters-by-rule=127.0.0.1:{}", service.port))
            .arg("--config")
            .arg(&config)
            .arg("--snapshot")
            .arg(&snapshot)
            .arg("--trace")
            .arg(&trace)
            .arg("--wasm")
            .arg(filter_wasm())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let statuses: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses.len(), 20);
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 403),
            "{statuses:?}"
        );
        admitted.push(statuses.iter().filter(|s| **s == 200).count());
    }
    // The second process saw the first one's 20 calls: only 10 of its own fit.
    assert_eq!(admitted, [20, 10]);
}
