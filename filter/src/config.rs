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

/// The plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    pub snapshot: Value,
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
        let snapshot = match (doc.get("snapshot"), doc.get("snapshotSource")) {
            (Some(s), _) if s.is_object() => s.clone(),
            (Some(_), _) => return Err(fault("snapshot", "expected an object (the catalog snapshot)")),
            (None, Some(_)) => {
                return Err(fault(
                    "snapshotSource",
                    "fetching the snapshot from a cluster is not implemented in this build; give it inline as \"snapshot\"",
                ))
            }
            (None, None) => return Err(fault("snapshot", "required")),
        };
        Ok(FilterConfig {
            snapshot,
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

    #[test]
    fn defaults_and_flags() {
        let c = FilterConfig::parse(br#"{"snapshot": {}, "stripSubscriptionKey": true}"#).unwrap();
        assert_eq!(c.unsupported, UnsupportedPolicies::Reject);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert!(c.strip_subscription_key && !c.identity_headers);
    }

    #[test]
    fn faults_name_their_path() {
        let e = |t: &str| FilterConfig::parse(t.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            e(r#"{"snapshot": {}, "failureMode": "maybe"}"#),
            "failureMode: expected \"closed\" or \"open\""
        );
        assert_eq!(
            e(r#"{"snapshot": {}, "identityHeaders": "yes"}"#),
            "identityHeaders: expected a boolean"
        );
        assert_eq!(e(r#"{}"#), "snapshot: required");
        assert_eq!(
            e(r#"{"snapshot": []}"#),
            "snapshot: expected an object (the catalog snapshot)"
        );
        assert!(e("{").starts_with("(configuration): not valid JSON"));
    }
}
