//! The service's metrics, in Prometheus' text format on the admin port (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Metrics {
    /// Calls applied (plans received).
    pub calls: Counter,
    /// Calls a limit denied.
    pub denials: Counter,
    /// Calls that could not be applied (Redis down or slow, a bad message).
    pub errors: Counter,
    /// Redis commands that failed or timed out.
    pub redis_errors: Counter,
    /// Transactions tried again because another call changed their counters first.
    pub conflicts: Counter,
    /// How long each Redis command took.
    pub redis_seconds: Histogram,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        let calls = Counter::default();
        let denials = Counter::default();
        let errors = Counter::default();
        let redis_errors = Counter::default();
        let conflicts = Counter::default();
        let redis_seconds = Histogram::new([
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
        ]);
        let mut registry = Registry::with_prefix("apim_edge_counters");
        registry.register("calls", "Calls applied", calls.clone());
        registry.register("denials", "Calls a limit denied", denials.clone());
        registry.register("errors", "Calls that could not be applied", errors.clone());
        registry.register(
            "redis_errors",
            "Redis commands that failed or timed out",
            redis_errors.clone(),
        );
        registry.register(
            "conflicts",
            "Transactions tried again after a concurrent change",
            conflicts.clone(),
        );
        registry.register(
            "redis_seconds",
            "Latency of Redis commands",
            redis_seconds.clone(),
        );
        Metrics {
            calls,
            denials,
            errors,
            redis_errors,
            conflicts,
            redis_seconds,
            registry,
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` (and `GET /ready`) on `listener`, one short HTTP/1.1 exchange per
/// connection.
pub async fn serve_admin(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.text()),
                "/ready" => ("200 OK", "ready\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}
