//! How long the filter's VM takes to load a catalog: `Host::vm` (instantiate, start, and
//! `on_configure` with the snapshot inline), in the wasmtime host.
//!
//! `cargo run --example wasm_load -p apim-edge-harness -- FILTER.wasm SNAPSHOT.json [RUNS]`

use anyhow::{Context, Result};
use apim_edge_harness::host::Host;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (wasm, snapshot) = (
        args.get(1).context("FILTER.wasm")?,
        args.get(2).context("SNAPSHOT.json")?,
    );
    let runs: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let snapshot: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(snapshot)?)?;
    let config = serde_json::json!({ "snapshot": snapshot }).to_string();
    let host = Host::load(std::path::Path::new(wasm))?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let vm = host.vm(config.as_bytes())?;
        times.push(started.elapsed());
        drop(vm);
    }
    times.sort();
    println!(
        "VM load of {} bytes of configuration: median {:?} over {runs} runs ({times:?})",
        config.len(),
        times[runs / 2]
    );
    Ok(())
}
