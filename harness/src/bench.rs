//! `apim-edge bench`: per-request latency and throughput of the native engine and of the
//! filter's `.wasm` in the wasmtime host, on one worker each, over the same recorded traffic.
//!
//! The trace is replayed in a loop until the requested number of requests, each pass shifted
//! later by the trace's span (plus a second), so virtual time only moves forward and windows
//! behave as in one long recording. Each request is timed whole, as a host sees it: for the
//! engine, decide, respond and complete; for the `.wasm`, the full proxy-wasm stream (create,
//! request headers, response headers, log, done, delete). Latencies go into an HDR histogram
//! (1 ns to 1 s, 3 significant digits).

use crate::host::{Host, NoUpstreams};
use crate::replay::replay_one;
use crate::trace::Entry;
use crate::wasm_replay;
use anyhow::{bail, Result};
use apim_edge_policies::{Catalog, MemoryStore};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// What one side measured.
pub struct Measured {
    pub requests: u64,
    pub elapsed: Duration,
    /// Nanoseconds per request.
    pub latency: Histogram<u64>,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A quantile in nanoseconds.
    pub fn at(&self, quantile: f64) -> u64 {
        self.latency.value_at_quantile(quantile)
    }
}

/// The quantiles reported, with their labels.
pub const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("max", 1.0),
];

/// How much later each pass of the looped trace runs: its span and a second.
fn pass_length(entries: &[Entry]) -> i64 {
    let first = entries.first().map_or(0, |e| e.at);
    let last = entries.iter().map(|e| e.at).max().unwrap_or(first);
    last - first + 1000
}

/// The `k`-th request of the looped trace.
fn request(entries: &[Entry], pass_length: i64, k: usize) -> Entry {
    let pass = (k / entries.len()) as i64;
    let mut e = entries[k % entries.len()].clone();
    e.at += pass * pass_length;
    e.expect = None;
    e
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 1_000_000_000, 3)?)
}

/// Times `requests` requests through `one`, after `warmup` untimed ones.
fn measure(
    entries: &[Entry],
    requests: usize,
    warmup: usize,
    mut one: impl FnMut(usize, &Entry) -> Result<()>,
) -> Result<Measured> {
    if entries.is_empty() {
        bail!("the trace has no requests");
    }
    let pass = pass_length(entries);
    for k in 0..warmup {
        one(k, &request(entries, pass, k))?;
    }
    let mut latency = histogram()?;
    let mut elapsed = Duration::ZERO;
    for k in warmup..warmup + requests {
        let e = request(entries, pass, k);
        let started = Instant::now();
        one(k, &e)?;
        let took = started.elapsed();
        elapsed += took;
        latency.saturating_record(took.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
    Ok(Measured {
        requests: requests as u64,
        elapsed,
        latency,
    })
}

/// The native engine, one thread, counters in memory.
pub fn native(
    catalog: &Catalog,
    entries: &[Entry],
    requests: usize,
    warmup: usize,
) -> Result<Measured> {
    let store = MemoryStore::new();
    measure(entries, requests, warmup, |k, e| {
        std::hint::black_box(replay_one(catalog, &store, k, e));
        Ok(())
    })
}

/// The `.wasm` in one VM of `host`.
pub fn wasm(
    host: &Host,
    plugin_config: &[u8],
    entries: &[Entry],
    requests: usize,
    warmup: usize,
) -> Result<Measured> {
    let mut vm = wasm_replay::worker(host, plugin_config, entries, &NoUpstreams)?;
    measure(entries, requests, warmup, |k, e| {
        let record =
            wasm_replay::replay_one(&mut vm, 2 + (k % 1_000_000) as i32, k, e, &NoUpstreams)?;
        std::hint::black_box(record);
        Ok(())
    })
}

fn duration(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.2} µs", ns as f64 / 1e3),
        _ => format!("{:.2} ms", ns as f64 / 1e6),
    }
}

/// The report: one row per side, and the ratio wasm/native when both ran.
pub fn report(native: &Measured, wasm: Option<&Measured>) -> String {
    let mut out = format!("{:<12} {:>12}", "", "requests/s");
    for (label, _) in QUANTILES {
        out += &format!(" {label:>10}");
    }
    out.push('\n');
    let row = |name: &str, m: &Measured| {
        let mut line = format!("{name:<12} {:>12.0}", m.per_second());
        for (_, q) in QUANTILES {
            line += &format!(" {:>10}", duration(m.at(q)));
        }
        line + "\n"
    };
    out += &row("native", native);
    if let Some(w) = wasm {
        out += &row("wasm", w);
        let mut line = format!(
            "{:<12} {:>12.2}",
            "wasm/native",
            w.per_second() / native.per_second()
        );
        for (_, q) in QUANTILES {
            line += &format!(" {:>9.2}x", w.at(q) as f64 / native.at(q).max(1) as f64);
        }
        out += &line;
        out.push('\n');
    }
    out
}
