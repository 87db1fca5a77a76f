//! The filter configuration (SPEC §5): the proxy-wasm plugin configuration, read in
//! `on_configure`. Faults name their JSON path.

use apim_edge_policies::UnsupportedPolicies;
use serde_json::Value;

/// What an internal failure does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Answer 500 with an APIM-shaped body.
    Closed,
    /// Let the call through (and count the failure).
    Open,
}

/// Where the snapshot is fetched from, and how often it is checked for a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSource {
    /// The proxy's cluster to call.
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub refresh_seconds: u64,
}

/// The plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    /// The inline snapshot; with a source too, it serves until a fetched one loads.
    pub snapshot: Option<Value>,
    pub source: Option<SnapshotSource>,
    pub unsupported: UnsupportedPolicies,
    pub failure_mode: FailureMode,
    pub strip_subscription_key: bool,
    pub identity_headers: bool,
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn fault(path: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.to_string(),
        message: message.into(),
    }
}

fn flag(doc: &Value, name: &str) -> Result<bool, ConfigError> {
    match doc.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(fault(name, "expected a boolean")),
    }
}

fn snapshot_source(src: &Value) -> Result<SnapshotSource, ConfigError> {
    if !src.is_object() {
        return Err(fault("snapshotSource", "expected an object"));
    }
    let text = |name: &str| -> Result<Option<String>, ConfigError> {
        match src.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(fault(
                &format!("snapshotSource.{name}"),
                "expected a non-empty string",
            )),
        }
    };
    let cluster = text("cluster")?.ok_or_else(|| fault("snapshotSource.cluster", "required"))?;
    let refresh_seconds = match src.get("refreshSeconds") {
        None | Some(Value::Null) => 10,
        Some(v) => v.as_u64().filter(|s| *s >= 1).ok_or_else(|| {
            fault(
                "snapshotSource.refreshSeconds",
                "expected a whole number of seconds, at least 1",
            )
        })?,
    };
    Ok(SnapshotSource {
        authority: text("authority")?.unwrap_or_else(|| cluster.clone()),
        path: text("path")?.unwrap_or_else(|| "/snapshot.json".into()),
        cluster,
        refresh_seconds,
    })
}

impl FilterConfig {
    pub fn parse(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|e| fault("(configuration)", format!("not valid JSON: {e}")))?;
        if !doc.is_object() {
            return Err(fault("(configuration)", "expected a JSON object"));
        }
        let unsupported = match doc.get("unsupportedPolicies").and_then(Value::as_str) {
            None if doc.get("unsupportedPolicies").is_none_or(Value::is_null) => {
                UnsupportedPolicies::Reject
            }
            Some("reject") => UnsupportedPolicies::Reject,
            Some("skip") => UnsupportedPolicies::Skip,
            _ => {
                return Err(fault(
                    "unsupportedPolicies",
                    "expected \"reject\" or \"skip\"",
                ))
            }
        };
        let failure_mode = match doc.get("failureMode").and_then(Value::as_str) {
            None if doc.get("failureMode").is_none_or(Value::is_null) => FailureMode::Closed,
            Some("closed") => FailureMode::Closed,
            Some("open") => FailureMode::Open,
            _ => return Err(fault("failureMode", "expected \"closed\" or \"open\"")),
        };
        let snapshot = match doc.get("snapshot") {
            None | Some(Value::Null) => None,
            Some(s) if s.is_object() => Some(s.clone()),
            Some(_) => {
                return Err(fault(
                    "snapshot",
                    "expected an object (the catalog snapshot)",
                ))
            }
        };
        let source = match doc.get("snapshotSource") {
            None | Some(Value::Null) => None,
            Some(src) => Some(snapshot_source(src)?),
        };
        if snapshot.is_none() && source.is_none() {
            return Err(fault("snapshot", "required (or a snapshotSource)"));
        }
        Ok(FilterConfig {
            snapshot,
            source,
            unsupported,
            failure_mode,
            strip_subscription_key: flag(&doc, "stripSubscriptionKey")?,
            identity_headers: flag(&doc, "identityHeaders")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn defaults_and_flags() -> R {
        let c = FilterConfig::parse(br#"{"snapshot": {}, "stripSubscriptionKey": true}"#)?;
        assert_eq!(c.unsupported, UnsupportedPolicies::Reject);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert!(c.strip_subscription_key && !c.identity_headers);
        Ok(())
    }

    #[test]
    fn a_source_with_defaults() -> R {
        let c = FilterConfig::parse(br#"{"snapshotSource": {"cluster": "apim-config"}}"#)?;
        assert_eq!(
            c.source,
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
    fn faults_name_their_path() -> R {
        let e = |t: &str| FilterConfig::parse(t.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            e(r#"{"snapshot": {}, "failureMode": "maybe"}"#),
            "failureMode: expected \"closed\" or \"open\""
        );
        assert_eq!(
            e(r#"{"snapshot": {}, "identityHeaders": "yes"}"#),
            "identityHeaders: expected a boolean"
        );
        assert_eq!(e(r#"{}"#), "snapshot: required (or a snapshotSource)");
        assert_eq!(
            e(r#"{"snapshotSource": {}}"#),
            "snapshotSource.cluster: required"
        );
        assert_eq!(
            e(r#"{"snapshotSource": {"cluster": "c", "refreshSeconds": 0}}"#),
            "snapshotSource.refreshSeconds: expected a whole number of seconds, at least 1"
        );
        assert_eq!(
            e(r#"{"snapshot": []}"#),
            "snapshot: expected an object (the catalog snapshot)"
        );
        assert!(e("{").starts_with("(configuration): not valid JSON"));
        Ok(())
    }
}
