//! # apim-edge-filter
//!
//! The proxy-wasm filter: a thin adapter between the proxy-wasm ABI (0.2.1) and the engine,
//! `apim-edge-policies`, which makes every decision. This crate only translates:
//!
//! - [`config`]: the plugin configuration (SPEC §5);
//! - [`slots`]: the engine's counters on proxy-wasm shared data, with memory bounded;
//! - the root context (one per worker VM): loads the snapshot, creates the counter slots,
//!   defines the metrics;
//! - the HTTP context (one per call): the request, the upstream's response, completion.
//!
//! Nothing here panics on bad input: decisions return errors and the configuration's
//! `failureMode` decides what an internal failure does.

pub mod config;
pub mod slots;

#[cfg(target_arch = "wasm32")]
mod proxy;
