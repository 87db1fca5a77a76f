//! The counter service alone, under load: calls per second and latency (p50, p99) of `Apply`
//! against one local Redis, from 32 concurrent callers, for calls of 1 subscription (every call
//! contends for one counter) and of 10,000, in both apply modes. A load generator of its own
//! (`cargo bench -p apim-edge-counters --bench service`); it starts `redis-server` and the
//! service, and stops them. `RUN_SECONDS` sets each run's length (default 5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::zombie_processes
)]

use apim_edge_counters::pb::counters_client::CountersClient;
use apim_edge_counters::wire;
use apim_edge_policies::{Catalog, LoadOptions, Request};
use hdrhistogram::Histogram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {port}");
}

/// A product with a rate limit and a quota that never trip, and `subscriptions` subscriptions.
fn catalog(subscriptions: usize) -> Catalog {
    let subs: Vec<_> = (0..subscriptions)
        .map(|i| serde_json::json!({"name": format!("s{i}"), "properties": {"scope": "/products/p", "primaryKey": format!("key-{i}")}}))
        .collect();
    let doc = serde_json::json!({
        "apis": [{"name": "a", "path": "a"}],
        "products": [{"name": "p", "apis": ["a"], "policy": "<policies><inbound><rate-limit calls=\"100000000\" renewal-period=\"60\" /><quota calls=\"1000000000\" renewal-period=\"86400\" /></inbound></policies>"}],
        "subscriptions": subs,
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

fn run(mode: &str, subscriptions: usize, seconds: u64) {
    let (redis_port, port, admin) = (free_port(), free_port(), free_port());
    let _redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_port(redis_port);
    let _service = Killed(
        Command::new(env!("CARGO_BIN_EXE_apim-edge-counters"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .args([
                "--redis",
                &format!("redis://127.0.0.1:{redis_port}"),
                "--apply",
                mode,
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(port);
    // Every call's plan, made by the engine as the filter makes it.
    let catalog = catalog(subscriptions);
    let plans: Vec<Vec<u8>> = (0..subscriptions)
        .map(|i| {
            let headers = vec![("ocp-apim-subscription-key".to_string(), format!("key-{i}"))];
            let req = Request {
                method: "GET",
                host: "h",
                path: "/a/x",
                query: "",
                headers: &headers,
                client_ip: None,
            };
            let (_, plan) = catalog.plan(&req, 1_000_000);
            prost::Message::encode_to_vec(&wire::plan_request(&plan, 1_000_000))
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (calls, hist) = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let mut client = CountersClient::new(channel.clone());
                let plans = plans.clone();
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new(3).unwrap();
                    let mut i = t;
                    while Instant::now() < deadline {
                        let req: apim_edge_counters::pb::ApplyRequest =
                            prost::Message::decode(&plans[i % plans.len()][..]).unwrap();
                        let started = Instant::now();
                        client.apply(req).await.unwrap();
                        hist.record(started.elapsed().as_micros() as u64).unwrap();
                        i += 32;
                    }
                    hist
                })
            })
            .collect();
        let mut all = Histogram::<u64>::new(3).unwrap();
        for t in tasks {
            all.add(t.await.unwrap()).unwrap();
        }
        (all.len(), all)
    });
    println!(
        "| {mode:<11} | {subscriptions:>13} | {:>9.0} | {:>7.2} | {:>7.2} |",
        calls as f64 / seconds as f64,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: run only under bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds = std::env::var("RUN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "counters/benches/service.rs: 32 callers, {seconds} s each, one local redis-server, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| apply mode  | subscriptions | calls/s   | p50 ms  | p99 ms  |");
    println!("|-------------|---------------|-----------|---------|---------|");
    for mode in ["transaction", "per-counter"] {
        for subscriptions in [1, 10_000] {
            run(mode, subscriptions, seconds);
        }
    }
}
