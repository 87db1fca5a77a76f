//! The filter configuration (SPEC §5), read the same way by the proxy-wasm filter (its plugin
//! configuration) and by the command line (`--config`): serde derive, with faults that name
//! their JSON path.

use crate::catalog::LoadOptions;
use crate::policy::UnsupportedPolicies;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// What an internal failure does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Answer 500 with an APIM-shaped body (the default).
    #[default]
    Closed,
    /// Let the call through (the edge's own edits, key stripping among them, still apply).
    Open,
}

/// The settings of the edge around APIM's decision: they shape what goes upstream and what a
/// failure answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EdgeOptions {
    /// Remove the subscription key (header and query parameter) before the upstream.
    pub strip_subscription_key: bool,
    /// Add `x-apim-product-id` and `x-apim-subscription-id` upstream; always remove client-sent
    /// copies of them.
    pub identity_headers: bool,
    pub failure_mode: FailureMode,
}

/// Where the snapshot is fetched from, and how often it is checked for a new version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSource {
    /// The proxy's cluster to call.
    pub cluster: String,
    /// Default: the cluster's name.
    #[serde(default, deserialize_with = "or_default")]
    pub authority: String,
    #[serde(default = "default_path", deserialize_with = "or_default_path")]
    pub path: String,
    #[serde(default = "default_refresh", deserialize_with = "refresh_seconds")]
    pub refresh_seconds: u64,
}

/// What a call meets when the counter service (or its Redis) cannot answer: a failed
/// exchange, a timeout, an answer that cannot be read (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Decide with this proxy's own counters (the default), and count the fallback.
    #[default]
    Local,
    /// Let every limit admit the call.
    Allow,
    /// Answer 503 `Service Unavailable` (outcome `counters_unavailable`).
    Deny,
}

/// Counters shared by a fleet, through the counter service (SPEC §7).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedCounters {
    /// The proxy's cluster (HTTP/2) of the counter service.
    pub cluster: String,
    /// Default: the cluster's name.
    #[serde(default, deserialize_with = "or_default")]
    pub authority: String,
    /// How long a call waits for the service before `onUnavailable` decides it.
    #[serde(default = "default_timeout", deserialize_with = "timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub on_unavailable: OnUnavailable,
    /// Absent: every limit is decided by the service, call by call (exact).
    #[serde(default)]
    pub lease: Option<Leases>,
}

/// Leases of large limits (not in the SPEC; `docs/design.md`): a proxy takes a share of such a
/// limit from the shared store in one exchange and admits from it locally until it is spent.
/// The fleet never admits more than the limit, and may admit less: at most the unspent
/// leases, `calls` per proxy and counter. Every proxy of a fleet must lease alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Leases {
    /// The most calls one lease takes.
    #[serde(deserialize_with = "lease_calls")]
    pub calls: u64,
    /// Limits of fewer calls than this stay exact, call by call.
    #[serde(default = "default_min_limit")]
    pub min_limit: u64,
    /// How long a share of a rate limit may be spent (for a limit with a period of less than
    /// ten times this, a tenth of the period). A quota's share lasts until its window ends.
    #[serde(default = "default_hold", deserialize_with = "hold_ms")]
    pub hold_ms: u64,
}

/// The plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "a JSON object (the filter configuration)"
)]
pub struct FilterConfig {
    /// The inline snapshot; with a source too, it serves until a fetched one loads.
    #[serde(default, deserialize_with = "snapshot")]
    pub snapshot: Option<Value>,
    #[serde(default)]
    pub snapshot_source: Option<SnapshotSource>,
    #[serde(default, deserialize_with = "or_default")]
    pub unsupported_policies: UnsupportedPolicies,
    #[serde(default, deserialize_with = "or_default")]
    pub failure_mode: FailureMode,
    #[serde(default, deserialize_with = "or_default")]
    pub strip_subscription_key: bool,
    #[serde(default, deserialize_with = "or_default")]
    pub identity_headers: bool,
    /// Absent: counters are this proxy's own (shared data).
    #[serde(default)]
    pub counters: Option<SharedCounters>,
    /// With counters in the proxy's shared data: each worker takes shares of large limits
    /// from them and admits from its own share, instead of updating shared data on every call
    /// (`docs/design.md`, "Worker leases"). Absent: every call updates shared data.
    #[serde(default)]
    pub worker_leases: Option<Leases>,
    /// Which of a call's fields go to Envoy's filter state for its access log
    /// (`wasm.apim_edge.<field>`): all five unless the list names fewer.
    #[serde(default, deserialize_with = "filter_state")]
    pub filter_state: FilterState,
}

/// The fields a filter exposes as filter state: each costs the proxy a host call (and an
/// object) per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterState {
    pub outcome: bool,
    pub api: bool,
    pub operation: bool,
    pub product: bool,
    pub subscription: bool,
}

impl Default for FilterState {
    fn default() -> Self {
        FilterState {
            outcome: true,
            api: true,
            operation: true,
            product: true,
            subscription: true,
        }
    }
}

fn filter_state<'de, D: Deserializer<'de>>(d: D) -> Result<FilterState, D::Error> {
    let Some(names) = Option::<Vec<String>>::deserialize(d)? else {
        return Ok(FilterState::default());
    };
    let mut state = FilterState {
        outcome: false,
        api: false,
        operation: false,
        product: false,
        subscription: false,
    };
    for name in names {
        let field = match name.as_str() {
            "outcome" => &mut state.outcome,
            "api" => &mut state.api,
            "operation" => &mut state.operation,
            "product" => &mut state.product,
            "subscription" => &mut state.subscription,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected outcome, api, operation, product or subscription, not \"{other}\""
                )))
            }
        };
        *field = true;
    }
    Ok(state)
}

/// Why a configuration cannot be used: the JSON path of the fault, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// `null` reads as the default, as an absent field does.
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn default_path() -> String {
    "/snapshot.json".into()
}

fn or_default_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_path))
}

fn default_refresh() -> u64 {
    10
}

fn refresh_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Option::<u64>::deserialize(d) {
        Ok(None) => Ok(default_refresh()),
        Ok(Some(s)) if s >= 1 => Ok(s),
        _ => Err(serde::de::Error::custom(
            "expected a whole number of seconds, at least 1",
        )),
    }
}

fn default_timeout() -> u64 {
    50
}

fn default_min_limit() -> u64 {
    1_000
}

fn default_hold() -> u64 {
    1_000
}

fn lease_calls<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match u64::deserialize(d) {
        Ok(n) if (2..=1_000_000).contains(&n) => Ok(n),
        _ => Err(serde::de::Error::custom(
            "expected a whole number of calls, from 2 to 1000000",
        )),
    }
}

fn hold_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match u64::deserialize(d) {
        Ok(ms) if (1..=3_600_000).contains(&ms) => Ok(ms),
        _ => Err(serde::de::Error::custom(
            "expected a whole number of milliseconds, from 1 to 3600000",
        )),
    }
}

fn timeout_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Option::<u64>::deserialize(d) {
        Ok(None) => Ok(default_timeout()),
        Ok(Some(ms)) if (1..=60_000).contains(&ms) => Ok(ms),
        _ => Err(serde::de::Error::custom(
            "expected a whole number of milliseconds, from 1 to 60000",
        )),
    }
}

fn snapshot<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(_) => Err(serde::de::Error::custom(
            "expected an object (the catalog snapshot)",
        )),
    }
}

impl FilterConfig {
    /// Reads a configuration. The inline snapshot is parsed into its tree once, here, and
    /// moved out by the caller ([`Option::take`]) when it is loaded.
    pub fn parse(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        // The text becomes a tree first: the inline snapshot is kept as that tree, and the
        // configuration's own fields are read from it (one deserializer in the filter's code).
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| json_fault(".", e))?;
        let mut config: FilterConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            json_fault(&path, e.into_inner())
        })?;
        if let Some(source) = &mut config.snapshot_source {
            if source.cluster.is_empty() {
                return Err(fault(
                    "snapshotSource.cluster",
                    "expected a non-empty string",
                ));
            }
            if source.authority.is_empty() {
                source.authority = source.cluster.clone();
            }
        }
        if let Some(counters) = &mut config.counters {
            if counters.cluster.is_empty() {
                return Err(fault("counters.cluster", "expected a non-empty string"));
            }
            if counters.authority.is_empty() {
                counters.authority = counters.cluster.clone();
            }
        }
        if config.worker_leases.is_some() && config.counters.is_some() {
            return Err(fault(
                "workerLeases",
                "not with counters: shares of counters a fleet shares are counters.lease",
            ));
        }
        if config.snapshot.is_none() && config.snapshot_source.is_none() {
            return Err(fault("snapshot", "required (or a snapshotSource)"));
        }
        Ok(config)
    }

    /// The edge's settings.
    pub fn edge(&self) -> EdgeOptions {
        EdgeOptions {
            strip_subscription_key: self.strip_subscription_key,
            identity_headers: self.identity_headers,
            failure_mode: self.failure_mode,
        }
    }

    /// How a snapshot is loaded under this configuration.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            unsupported: self.unsupported_policies,
            edge: self.edge(),
        }
    }
}

/// A fault of serde's at `path` (`.` for the whole document).
fn json_fault(path: &str, e: serde_json::Error) -> ConfigError {
    let (path, message) = match e.classify() {
        // A fault of the text: its line and column say where.
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            (".", format!("not valid JSON: {e}"))
        }
        _ => (path, strip_position(&e.to_string())),
    };
    ConfigError {
        path: if path == "." {
            "(configuration)".into()
        } else {
            path.into()
        },
        message,
    }
}

fn fault(path: &str, message: &str) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// serde_json's message without its " at line L column C" tail: the path says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn err(text: &str) -> String {
        match FilterConfig::parse(text.as_bytes()) {
            Ok(c) => format!("loaded: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_and_flags() -> R {
        let c = FilterConfig::parse(br#"{"snapshot": {}, "stripSubscriptionKey": true}"#)?;
        assert_eq!(c.unsupported_policies, UnsupportedPolicies::Reject);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert!(c.strip_subscription_key && !c.identity_headers);
        let c = FilterConfig::parse(
            br#"{"snapshot": {}, "failureMode": null, "unsupportedPolicies": "skip", "identityHeaders": true, "counters": {"cluster": "x"}}"#,
        )?;
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.unsupported_policies, UnsupportedPolicies::Skip);
        assert!(c.identity_headers);
        Ok(())
    }

    #[test]
    fn shared_counters_with_defaults_and_faults() -> R {
        let c =
            FilterConfig::parse(br#"{"snapshot": {}, "counters": {"cluster": "apim-counters"}}"#)?;
        assert_eq!(
            c.counters,
            Some(SharedCounters {
                cluster: "apim-counters".into(),
                authority: "apim-counters".into(),
                timeout_ms: 50,
                on_unavailable: OnUnavailable::Local,
                lease: None,
            })
        );
        let c = FilterConfig::parse(
            br#"{"snapshot": {}, "counters": {"cluster": "c", "lease": {"calls": 64}}}"#,
        )?;
        assert_eq!(
            c.counters.and_then(|c| c.lease),
            Some(Leases {
                calls: 64,
                min_limit: 1_000,
                hold_ms: 1_000
            })
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "counters": {"cluster": "c", "lease": {"calls": 1}}}"#),
            "counters.lease.calls: expected a whole number of calls, from 2 to 1000000"
        );
        assert_eq!(
            err(
                r#"{"snapshot": {}, "counters": {"cluster": "c", "lease": {"calls": 8, "holdMs": 0}}}"#
            ),
            "counters.lease.holdMs: expected a whole number of milliseconds, from 1 to 3600000"
        );
        let unknown = err(
            r#"{"snapshot": {}, "counters": {"cluster": "c", "lease": {"calls": 8, "size": 2}}}"#,
        );
        assert!(
            unknown.starts_with("counters.lease.size: unknown field `size`"),
            "{unknown}"
        );
        let c = FilterConfig::parse(
            br#"{"snapshot": {}, "counters": {"cluster": "c", "authority": "a", "timeoutMs": 200, "onUnavailable": "deny"}}"#,
        )?;
        let counters = c.counters.ok_or("counters")?;
        assert_eq!(
            (counters.timeout_ms, counters.on_unavailable),
            (200, OnUnavailable::Deny)
        );
        assert_eq!(counters.authority, "a");
        assert!(FilterConfig::parse(br#"{"snapshot": {}}"#)?
            .counters
            .is_none());
        assert_eq!(
            err(r#"{"snapshot": {}, "counters": {"cluster": "c", "onUnavailable": "maybe"}}"#),
            "counters.onUnavailable: unknown variant `maybe`, expected one of `local`, `allow`, `deny`"
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "counters": {"cluster": "c"}, "workerLeases": {"calls": 8}}"#),
            "workerLeases: not with counters: shares of counters a fleet shares are counters.lease"
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "workerLeases": {"calls": 1}}"#),
            "workerLeases.calls: expected a whole number of calls, from 2 to 1000000"
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "filterState": ["outcome", "key"]}"#),
            "filterState: expected outcome, api, operation, product or subscription, not \"key\""
        );
        let some =
            FilterConfig::parse(br#"{"snapshot": {}, "filterState": ["product", "outcome"]}"#)
                .map(|c| c.filter_state)
                .map_err(|e| e.to_string());
        assert_eq!(
            some,
            Ok(FilterState {
                outcome: true,
                api: false,
                operation: false,
                product: true,
                subscription: false
            })
        );
        let all = FilterConfig::parse(br#"{"snapshot": {}, "filterState": null}"#)
            .map(|c| c.filter_state)
            .map_err(|e| e.to_string());
        assert_eq!(all, Ok(FilterState::default()));
        let c = FilterConfig::parse(br#"{"snapshot": {}, "workerLeases": {"calls": 64}}"#)
            .map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.worker_leases.map(|l| (l.calls, l.min_limit, l.hold_ms))),
            Ok(Some((64, 1000, 1000)))
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "counters": {"cluster": "c", "timeoutMs": 0}}"#),
            "counters.timeoutMs: expected a whole number of milliseconds, from 1 to 60000"
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "counters": {"cluster": ""}}"#),
            "counters.cluster: expected a non-empty string"
        );
        Ok(())
    }

    #[test]
    fn a_source_with_defaults() -> R {
        let c = FilterConfig::parse(br#"{"snapshotSource": {"cluster": "apim-config"}}"#)?;
        assert_eq!(
            c.snapshot_source,
            Some(SnapshotSource {
                cluster: "apim-config".into(),
                authority: "apim-config".into(),
                path: "/snapshot.json".into(),
                refresh_seconds: 10
            })
        );
        assert!(c.snapshot.is_none());
        Ok(())
    }

    #[test]
    fn faults_name_their_path() {
        assert_eq!(
            err(r#"{"snapshot": {}, "failureMode": "maybe"}"#),
            "failureMode: unknown variant `maybe`, expected `closed` or `open`"
        );
        assert_eq!(
            err(r#"{"snapshot": {}, "identityHeaders": "yes"}"#),
            "identityHeaders: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(err(r#"{}"#), "snapshot: required (or a snapshotSource)");
        assert_eq!(
            err(r#"{"snapshotSource": {}}"#),
            "snapshotSource: missing field `cluster`"
        );
        assert_eq!(
            err(r#"{"snapshotSource": {"cluster": ""}}"#),
            "snapshotSource.cluster: expected a non-empty string"
        );
        assert_eq!(
            err(r#"{"snapshotSource": {"cluster": "c", "refreshSeconds": 0}}"#),
            "snapshotSource.refreshSeconds: expected a whole number of seconds, at least 1"
        );
        assert_eq!(
            err(r#"{"snapshot": []}"#),
            "snapshot: expected an object (the catalog snapshot)"
        );
        assert!(
            err("{").starts_with("(configuration): not valid JSON"),
            "{}",
            err("{")
        );
        assert!(
            err("{} x").starts_with("(configuration): not valid JSON"),
            "{}",
            err("{} x")
        );
        assert_eq!(
            err(r#""a string""#),
            "(configuration): invalid type: string \"a string\", expected a JSON object (the filter configuration)"
        );
    }

    #[test]
    fn the_inline_snapshot_is_kept_as_parsed() -> R {
        let c = FilterConfig::parse(br#"{"snapshot": {"schemaVersion": 1, "apis": []}}"#)?;
        assert_eq!(
            c.snapshot,
            Some(serde_json::json!({"schemaVersion": 1, "apis": []}))
        );
        Ok(())
    }
}
