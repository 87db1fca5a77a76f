//! Envoy bootstraps for the filter: a listener with the HTTP connection manager, the wasm filter
//! with its configuration, the router, the upstream cluster, an access log of the filter's
//! properties, and the admin listener (with Prometheus stats at `/stats/prometheus`).
//! `apim-edge envoy-config`, the end-to-end tests and the main job all use this one builder.

use serde_json::{json, Value};
use std::path::PathBuf;

/// The access log's format: [`ACCESS_LOG_FORMAT`], with the formatter extension that gives
/// `%REQ_WITHOUT_QUERY%`.
fn log_format() -> Value {
    json!({
        "text_format_source": {"inline_string": ACCESS_LOG_FORMAT},
        "formatters": [{"name": "envoy.formatter.req_without_query", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"}}]
    })
}

/// The access-log line: method, path without its query (where a subscription key may be),
/// status, and the filter's decision (SPEC §4 outcome, product,
/// subscription) from its properties, which Envoy keeps as filter state.
pub const ACCESS_LOG_FORMAT: &str = "ACCESS %REQ(:METHOD)% %REQ_WITHOUT_QUERY(:PATH)% %RESPONSE_CODE% outcome=%FILTER_STATE(wasm.apim_edge.outcome:PLAIN)% product=%FILTER_STATE(wasm.apim_edge.product:PLAIN)% subscription=%FILTER_STATE(wasm.apim_edge.subscription:PLAIN)% index=%REQ(X-APIM-EDGE-INDEX)%\n";

/// A usage record (SPEC §8) as Envoy's JSON access log writes one: the call's time, its
/// identity and outcome from the filter's state (`null` where none), status and bytes.
/// `apim-edge usage` reads these lines.
pub fn usage_log_format() -> Value {
    let state = |field: &str| format!("%FILTER_STATE(wasm.apim_edge.{field}:PLAIN)%");
    json!({"json_format": {
        "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
        "api": state("api"),
        "operation": state("operation"),
        "product": state("product"),
        "subscription": state("subscription"),
        "outcome": state("outcome"),
        "status": "%RESPONSE_CODE%",
        "requestBytes": "%BYTES_RECEIVED%",
        "responseBytes": "%BYTES_SENT%"
    }})
}

/// What a bootstrap is made of.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub listen: u16,
    pub admin: u16,
    /// The upstream's host (an IP address) and port.
    pub upstream: (String, u16),
    pub wasm: PathBuf,
    /// The filter configuration (SPEC §5).
    pub filter_config: Value,
    /// Where the access log goes; `None`: standard output.
    pub access_log: Option<PathBuf>,
    /// Where usage records (SPEC §8) go, one JSON object per call; `None`: not written.
    pub usage_log: Option<PathBuf>,
    /// Worker VMs with the same `vm_id` share their shared data, hence their counters.
    pub vm_id: String,
    /// A cluster `apim-config` at this host and port, for `snapshotSource`.
    pub config_server: Option<(String, u16)>,
    /// A cluster `apim-counters` (HTTP/2) at this host and port: the counter service of a
    /// fleet (SPEC §7), named by the filter configuration's `counters`.
    pub counters: Option<(String, u16)>,
}

/// The cluster name `envoy-config --counters` writes and its filter configuration names.
pub const COUNTERS_CLUSTER: &str = "apim-counters";

/// A static cluster `name` of one endpoint.
pub fn cluster(name: &str, (host, port): &(String, u16)) -> Value {
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint":
            {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]}})
}

impl Bootstrap {
    /// The bootstrap as Envoy reads it (JSON is YAML).
    pub fn to_json(&self) -> Value {
        let access_log = match &self.access_log {
            Some(path) => json!({"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": log_format()}}),
            None => json!({"name": "envoy.access_loggers.stdout", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": log_format()}}),
        };
        let mut access_logs = vec![access_log];
        if let Some(path) = &self.usage_log {
            access_logs.push(json!({"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": usage_log_format()}}));
        }
        let mut clusters = vec![cluster("upstream", &self.upstream)];
        if let Some(c) = &self.config_server {
            clusters.push(cluster("apim-config", c));
        }
        if let Some(c) = &self.counters {
            let mut counters = cluster(COUNTERS_CLUSTER, c);
            // gRPC: HTTP/2 to the service.
            counters["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}});
            clusters.push(counters);
        }
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin}}},
            "static_resources": {
                "listeners": [{
                    "name": "apim-edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.listen}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "apim",
                            // The client address (for ip-filter) from X-Forwarded-For.
                            "use_remote_address": false,
                            "xff_num_trusted_hops": 0,
                            // The filter and the upstream see one path: dot segments resolved
                            // and doubled slashes merged before the filter decides.
                            "normalize_path": true,
                            "merge_slashes": true,
                            "access_log": access_logs,
                            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
                            "http_filters": [
                                {"name": "envoy.filters.http.wasm", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": "apim-edge",
                                        "vm_config": {"vm_id": self.vm_id, "runtime": "envoy.wasm.runtime.v8",
                                                      "code": {"local": {"filename": self.wasm}}},
                                        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                                          "value": self.filter_config.to_string()}}}},
                                {"name": "envoy.filters.http.router", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
                "clusters": clusters
            }
        })
    }
}
