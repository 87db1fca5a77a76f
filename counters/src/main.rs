//! `apim-edge-counters`: the counter service a fleet of apim-edge filters shares (SPEC §7).

use anyhow::{Context, Result};
use apim_edge_counters::metrics::{serve_admin, Metrics};
use apim_edge_counters::pb::counters_server::CountersServer;
use apim_edge_counters::service::CounterService;
use apim_edge_counters::store::{ApplyMode, Redis, SharedStore};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Counters shared by a fleet of apim-edge proxies, on Redis.
///
/// Every proxy's filter sends the counter operations of each call here (gRPC,
/// `apim_edge.counters.v1.Counters/Apply`, see counters/proto/counters.proto); the service
/// applies them to Redis with the engine's window rules, all or nothing, taking the time from
/// the call. Stateless: run as many replicas as needed against one Redis or Redis Cluster.
/// Logs go to stderr; SIGTERM (or Ctrl-C) stops taking calls, finishes those under way and
/// exits 0.
#[derive(Parser, Debug)]
#[command(name = "apim-edge-counters", version)]
struct Args {
    /// Address to serve gRPC on (HTTP/2, cleartext).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// A single Redis server.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        conflicts_with = "redis_cluster"
    )]
    redis: String,
    /// A Redis Cluster: some of its nodes, comma-separated
    /// (`redis://h1:p1,redis://h2:p2,...`).
    #[arg(long, value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// Address of the admin port: `GET /metrics` (Prometheus text) and `GET /ready`.
    #[arg(long, default_value = "127.0.0.1:9091")]
    admin: SocketAddr,
    /// How long one Redis command may take before the call fails (the proxy then decides as
    /// its `onUnavailable` says).
    #[arg(long, default_value_t = 1000)]
    redis_timeout_ms: u64,
    /// How a call's counters are applied: `transaction` (one compare-and-set script per call
    /// where its counters share a slot) or `per-counter` (one per counter; for comparison).
    #[arg(long, value_enum, default_value = "transaction")]
    apply: ApplyMode,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
    let redis = if args.redis_cluster.is_empty() {
        Redis::single(&args.redis, timeout).with_context(|| format!("--redis {}", args.redis))?
    } else {
        Redis::cluster(&args.redis_cluster, timeout)
            .await
            .with_context(|| format!("--redis-cluster {}", args.redis_cluster.join(",")))?
    };
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(SharedStore::new(
        redis,
        args.apply,
        timeout,
        metrics.clone(),
    ));
    let admin = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("--admin {}", args.admin))?;
    tokio::spawn(serve_admin(admin, metrics.clone()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    eprintln!(
        "apim-edge-counters: serving on {} (admin {}), counters in {}",
        args.listen,
        args.admin,
        if args.redis_cluster.is_empty() {
            args.redis.clone()
        } else {
            format!("the Redis Cluster {}", args.redis_cluster.join(","))
        }
    );
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            CountersServer::new(CounterService { store, metrics }),
            tokio_stream_listener(listener),
            stopped(),
        )
        .await
        .context("serving")?;
    eprintln!("apim-edge-counters: stopped");
    Ok(())
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    // Every answer goes out at once: a call waits on it.
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// SIGTERM or Ctrl-C.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("apim-edge-counters: stopping: finishing the calls under way");
}
