//! # apim-edge-harness
//!
//! The `apim-edge` command line and the pieces it is made of: reading recorded traffic
//! ([`trace`]), replaying it through the engine ([`replay`]), generating synthetic catalogs
//! for benchmarks ([`synth`]), Envoy bootstraps for the filter ([`envoy`]), and the wasmtime
//! host that runs the filter's `.wasm` outside a proxy ([`host`], [`wasm_replay`]), and the
//! latency benchmark of both ([`bench`]); replays can share counters through a real counter
//! service ([`counters`]), and forward any callout to a real server ([`callouts`]). The host behaves as Envoy or as
//! Service Extensions ([`profile`]).

pub mod bench;
pub mod build;
pub mod callouts;
pub mod counters;
pub mod envoy;
pub mod host;
pub mod profile;
pub mod replay;
pub mod synth;
pub mod trace;
pub mod usage;
pub mod wasm_replay;
