//! # apim-edge-policies: the engine
//!
//! Everything apim-edge knows about Azure API Management lives here, once: the catalog snapshot
//! ([`Catalog::load`]), the policy language (read in both of APIM's XML formats and compiled at
//! load time), and the per-request decision ([`Catalog::decide`], [`Catalog::respond`],
//! [`Catalog::complete`]). The proxy-wasm filter and the wasmtime host only translate to and from
//! these types.
//!
//! The engine is pure: it never reads a clock or spawns a thread. Time comes in as
//! [`Millis`] (milliseconds since the Unix epoch) and counters live behind the
//! [`CounterStore`] trait (compare-and-swap on opaque bytes), which the filter implements on
//! proxy-wasm shared data and the host in memory.

mod catalog;
mod clock;
mod cors;
mod counters;
mod decide;
pub mod edge;
mod error;
mod expr;
mod ids;
mod json;
mod jwt;
mod keys;
mod policy;
mod response;
mod route;
mod snapshot;
mod xml;

pub use catalog::{Catalog, LoadOptions, Summary, UnsupportedPolicies};
pub use clock::{format_timespan, parse_rfc3339, Millis};
pub use counters::lease::LeasedPlan;
pub use counters::op::{CounterOp, Leasable, OpResult, OwnedOp};
pub use counters::own::{OwnLimits, OwnVerdicts};
pub use counters::{
    counter_expiry, Change, CounterName, CounterStore, MemoryStore, State, StoreError,
    BY_KEY_QUOTA, BY_KEY_RATE, MAX_ATTEMPTS,
};
pub use counters::{FixedWindows, Verdict};
pub use decide::shared::{apply_plan, CounterPlan};
pub use decide::{
    CallContext, Completion, Decision, EngineError, HeaderEdit, HeaderEdits, KeyLocation, Outcome,
    Request,
};
pub use edge::config::{
    ConfigError, EdgeOptions, FailureMode, FilterConfig, FilterState, Leases, OnUnavailable,
    SharedCounters, SnapshotSource,
};
pub use edge::IDENTITY_HEADERS;
pub use error::{LoadError, LoadErrors};
pub use ids::{ApiId, OperationId, ProductId, SubscriptionId};
pub use keys::{digest_hex, key_digest};
pub use response::LocalResponse;
pub use snapshot::seal;
