//! apim-edge-counters: counters shared by a fleet of proxies (SPEC §7).
//!
//! The filter in every proxy sends a call's counter operations (the engine's
//! [`apim_edge_policies::CounterPlan`]) to this service over gRPC; the service applies them to
//! Redis with the engine's own window rules ([`apim_edge_policies::apply_plan`]), all or
//! nothing, and answers each. The protocol is `proto/counters.proto`.
//!
//! - [`wire`]: the protocol's messages and their conversions to the engine's types (all the
//!   filter's `.wasm` takes of this crate: the `service` feature off).
//! - `store`: the Redis store: a call's counters read, decided and written back in one
//!   compare-and-set script, or counter by counter where a Redis Cluster keeps them on
//!   different shards.
//! - `service`: the gRPC service, its metrics, its admin port.

pub mod wire;

#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod store;

/// The protocol's generated messages (and, with the `service` feature, its server and client).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/apim_edge.counters.v1.rs"));
}

/// The gRPC service's full name and its one method, as a proxy's callout names them.
pub const SERVICE: &str = "apim_edge.counters.v1.Counters";
pub const APPLY: &str = "Apply";
