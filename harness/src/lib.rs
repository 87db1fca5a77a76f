//! # apim-edge-harness
//!
//! The `apim-edge` command line and the pieces it is made of: reading recorded traffic
//! ([`trace`]), replaying it through the engine ([`replay`]), generating synthetic catalogs
//! for benchmarks ([`synth`]), and Envoy bootstraps for the filter ([`envoy`]).

pub mod envoy;
pub mod replay;
pub mod synth;
pub mod trace;
