//! The main job: real Envoy with the filter and the sample catalog, in front of a small local
//! upstream; the sample traffic sent through it; each decision printed from Envoy's access log,
//! then the usage report by subscription from its usage records.
//! Leaves nothing running.

use apim_edge_e2e::{root, send_entry, start_envoy, start_upstream};
use apim_edge_harness::trace;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn main() {
    let snapshot: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/catalog/sample.json"))
            .expect("the sample catalog"),
    )
    .expect("the sample catalog is JSON");
    let upstream = start_upstream();
    let envoy = match start_envoy(&upstream, &serde_json::json!({"snapshot": snapshot})) {
        Ok(e) => e,
        Err(log) => {
            eprintln!("Envoy did not start:\n{log}");
            std::process::exit(1);
        }
    };
    println!("Envoy 1.40 (4 workers) with apim-edge on 127.0.0.1:{}, the sample catalog (tests/catalog/sample.json)", envoy.port);

    let mut traces: Vec<_> = std::fs::read_dir(root().join("tests/traces"))
        .expect("the sample traffic")
        .map(|e| e.unwrap().path())
        // Traces only: a trace's configuration (`NAME.config.json`) sits beside it.
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    traces.sort();
    let mut index = 0usize;
    let mut sent: Vec<(usize, String, String)> = Vec::new();
    for path in &traces {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let entries =
            trace::parse(&std::fs::read_to_string(path).unwrap(), 0).expect("a valid trace");
        for e in entries {
            send_entry(
                envoy.port,
                &e,
                &[("x-apim-edge-index".into(), index.to_string())],
            );
            sent.push((index, name.clone(), format!("{} {}", e.method, e.path)));
            index += 1;
        }
    }

    // Every decision, as Envoy's access log recorded it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged: HashMap<usize, (String, String, String, String)> = HashMap::new();
    while logged.len() < sent.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        for line in envoy.access_log_text().lines() {
            let field = |k: &str| {
                line.split(' ')
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or("-")
                    .to_string()
            };
            if let Ok(i) = field("index=").parse::<usize>() {
                let status = line.split(' ').nth(3).unwrap_or("-").to_string();
                logged.insert(
                    i,
                    (
                        status,
                        field("outcome="),
                        field("product="),
                        field("subscription="),
                    ),
                );
            }
        }
    }
    let mut current = String::new();
    for (i, trace_name, req) in &sent {
        if *trace_name != current {
            println!("\n== {trace_name}");
            println!(
                "{:>4}  {:<40} {:>6}  {:<20} {:<10} subscription",
                "#", "request", "status", "outcome", "product"
            );
            current = trace_name.clone();
        }
        let (status, outcome, product, subscription) = logged
            .get(i)
            .cloned()
            .unwrap_or_else(|| ("?".into(), "?".into(), "?".into(), "?".into()));
        let mut r = req.clone();
        if r.len() > 40 {
            r.truncate(37);
            r.push_str("...");
        }
        println!("{i:>4}  {r:<40} {status:>6}  {outcome:<20} {product:<10} {subscription}");
    }
    // Workers add their calls by outcome to the metrics once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let stats = envoy.stats("apim_edge.requests");
    println!("\nEnvoy's counters (admin /stats):");
    for (name, value) in stats.iter().filter(|(_, v)| v != "0") {
        println!("  {name}: {value}");
    }
    // The usage report by subscription (SPEC §8), from the usage records Envoy wrote.
    let mut usage = apim_edge_harness::usage::Aggregate::new(
        apim_edge_harness::usage::By::Subscription,
        apim_edge_harness::usage::Window::default(),
    );
    let skipped = apim_edge_harness::usage::read_into(
        std::slice::from_ref(&envoy.usage_log),
        &mut usage,
        false,
    )
    .unwrap_or(0);
    println!(
        "\nUsage by subscription (`apim-edge usage --records {}`):",
        envoy.usage_log.display()
    );
    println!(
        "  {:<20} {:>8} {:>8} {:>8} {:>6} {:>10}",
        "subscription", "success", "blocked", "failed", "total", "bytes"
    );
    for r in usage.rows() {
        println!(
            "  {:<20} {:>8} {:>8} {:>8} {:>6} {:>10}",
            r.name,
            r.call_count_success,
            r.call_count_blocked,
            r.call_count_failed,
            r.call_count_total,
            r.bandwidth
        );
    }
    if skipped > 0 {
        eprintln!("{skipped} usage lines skipped");
    }
    if logged.len() < sent.len() {
        eprintln!(
            "{} of {} requests missing from the access log",
            sent.len() - logged.len(),
            sent.len()
        );
        std::process::exit(1);
    }
}
