//! # apim-edge-filter
//!
//! The proxy-wasm filter: a thin adapter between the proxy-wasm ABI (0.2.1) and the engine,
//! `apim-edge-policies`, which makes every decision. This crate only translates:
//!
//! The plugin configuration (SPEC §5) and every edge behaviour around the decision (key
//! stripping, identity headers, what a failure answers) are the engine's
//! ([`apim_edge_policies::edge`]): the filter applies the edits a decision carries.
//!
//! - [`headers`]: header maps read from the host without the SDK's panic on bytes that are not
//!   UTF-8;
//! - [`slots`]: the engine's counters on proxy-wasm shared data, with memory bounded;
//! - [`snapshots`]: fetched snapshots shared between worker VMs, one fetch at a time;
//! - [`fleet`]: counters a fleet shares, through the counter service (SPEC §7);
//! - [`runtime`]: what the runtime offers (shared data, metrics), and counters held in the VM
//!   where it has no shared data (Service Extensions);
//! - the root context (one per worker VM): loads the snapshot, creates the counter slots,
//!   defines the metrics;
//! - the HTTP context (one per call): the request, the upstream's response, completion.
//!
//! Nothing here panics on bad input: decisions return errors and the configuration's
//! `failureMode` decides what an internal failure does.

/// Talc instead of the default dlmalloc: the filter allocates on every call, and dlmalloc was the
/// top guest symbol in the profile.
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

pub mod fleet;
pub mod headers;
pub mod runtime;
pub mod slots;
pub mod snapshots;

#[cfg(test)]
pub(crate) mod testing {
    //! Shared data with Envoy's semantics, for native tests: the VM-local store has them.
    pub use crate::runtime::VmData as EnvoyLike;
}

#[cfg(target_arch = "wasm32")]
mod proxy;
