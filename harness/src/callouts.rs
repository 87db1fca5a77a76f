//! Who answers a replayed filter's callouts (`apim-edge replay --wasm --callout`): for each
//! cluster the proxy is said to have, a fixed answer read from a file, or a real server the
//! callout is forwarded to (HTTP/1.1 for `proxy_http_call`, gRPC over HTTP/2 for
//! `proxy_grpc_call`), as Envoy's cluster would reach it. Time stays virtual: the host waits
//! for each answer, which arrives at the callout's dispatch time plus the rule's latency
//! (`CLUSTER=TARGET@20ms`; none by default), or fails at the callout's timeout when that is
//! sooner, as Envoy's would.

use crate::host::{Answer, Callout, CalloutKind, Responder};
use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// How long a forwarded callout may take before it fails as a timed-out one does.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a cluster's callouts go.
#[derive(Debug, Clone)]
enum Target {
    /// Answered with 200 (gRPC: OK) and these bytes.
    Fixed(Vec<u8>),
    /// Forwarded to the server at this address.
    Server(SocketAddr),
}

/// `--callout` rules, by cluster: where its callouts go, and how long their answers take.
pub struct CalloutRules {
    rules: Vec<(String, Target, Duration)>,
    runtime: tokio::runtime::Runtime,
}

impl CalloutRules {
    /// Reads `CLUSTER=FILE` and `CLUSTER=HOST:PORT` rules, each with an optional latency
    /// (`@20ms`, `@1.5ms`). A value that names an existing file is a file; otherwise it must be
    /// an address.
    pub fn parse(rules: &[String]) -> Result<Self> {
        let rules = rules
            .iter()
            .map(|rule| {
                let (cluster, value) = rule
                    .split_once('=')
                    .filter(|(c, v)| !c.is_empty() && !v.is_empty())
                    .ok_or_else(|| {
                        anyhow!(
                            "--callout: expected CLUSTER=FILE or CLUSTER=HOST:PORT, not {rule:?}"
                        )
                    })?;
                let (value, latency) = match value.rsplit_once('@') {
                    Some((v, l)) if !Path::new(value).is_file() => (
                        v,
                        latency(l).with_context(|| {
                            format!("--callout {rule}: the latency must be milliseconds, as @20ms")
                        })?,
                    ),
                    _ => (value, Duration::ZERO),
                };
                let target = if Path::new(value).is_file() {
                    Target::Fixed(
                        std::fs::read(value)
                            .with_context(|| format!("--callout {rule}: cannot read {value}"))?,
                    )
                } else {
                    Target::Server(resolve(value).with_context(|| {
                        format!("--callout {rule}: {value} is neither a file nor HOST:PORT")
                    })?)
                };
                Ok((cluster.to_string(), target, latency))
            })
            .collect::<Result<Vec<_>>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for forwarded callouts")?;
        Ok(CalloutRules { rules, runtime })
    }

    /// The clusters the rules name.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|(c, _, _)| c.as_str())
    }

    fn rule(&self, cluster: &str) -> Option<(&Target, Duration)> {
        self.rules
            .iter()
            .find(|(c, _, _)| c == cluster)
            .map(|(_, t, l)| (t, *l))
    }
}

/// `20ms`, `0.5ms`: a latency in milliseconds, finite and not negative.
fn latency(text: &str) -> Result<Duration> {
    let ms: f64 = text
        .strip_suffix("ms")
        .ok_or_else(|| anyhow!("no 'ms'"))?
        .parse()?;
    if !ms.is_finite() || !(0.0..=3_600_000.0).contains(&ms) {
        bail!("out of range");
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn resolve(value: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let (_, port) = value.rsplit_once(':').ok_or_else(|| anyhow!("no port"))?;
    port.parse::<u16>().map_err(|_| anyhow!("no port"))?;
    value
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("{value} resolves to no address"))
}

impl Responder for CalloutRules {
    fn latency(&self, c: &Callout) -> Duration {
        self.rule(&c.cluster).map_or(Duration::ZERO, |(_, l)| l)
    }

    fn answer(&self, c: &Callout) -> Option<Answer> {
        match self.rule(&c.cluster)?.0 {
            Target::Fixed(body) => Some(Answer {
                status: if c.kind == CalloutKind::Http { 200 } else { 0 },
                headers: Vec::new(),
                body: body.clone(),
            }),
            Target::Server(addr) => {
                let forwarded = self.runtime.block_on(async {
                    tokio::time::timeout(FORWARD_TIMEOUT, forward(*addr, c)).await
                });
                // A failed or timed-out call is one without an answer, as Envoy reports it.
                forwarded.ok()?.ok()
            }
        }
    }
}

/// Sends one callout to `addr` and reads its whole answer.
async fn forward(addr: SocketAddr, c: &Callout) -> Result<Answer> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let io = TokioIo::new(tcp);
    let pseudo = |name: &str| {
        c.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    match &c.kind {
        CalloutKind::Http => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let mut request = hyper::Request::builder()
                .method(pseudo(":method").unwrap_or("GET"))
                .uri(pseudo(":path").unwrap_or("/"))
                .header("host", pseudo(":authority").unwrap_or(&c.cluster));
            for (n, v) in c.headers.iter().filter(|(n, _)| !n.starts_with(':')) {
                request = request.header(n, v);
            }
            let response = sender
                .send_request(request.body(Full::new(Bytes::from(c.body.clone())))?)
                .await?;
            let status = response.status().as_u16();
            let headers = pairs(response.headers());
            let body = response.into_body().collect().await?.to_bytes().to_vec();
            Ok(Answer {
                status,
                headers,
                body,
            })
        }
        CalloutKind::Grpc { service, method } => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            // One length-prefixed, uncompressed message.
            let mut framed = vec![0u8];
            framed.extend_from_slice(&u32::try_from(c.body.len())?.to_be_bytes());
            framed.extend_from_slice(&c.body);
            let mut request = hyper::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/{service}/{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            for (n, v) in &c.headers {
                request = request.header(n, v);
            }
            let response = sender
                .send_request(request.body(Full::new(Bytes::from(framed)))?)
                .await?;
            let head = response.headers().clone();
            let collected = response.into_body().collect().await?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let body = collected.to_bytes();
            // grpc-status in the trailers, or in the headers of a trailers-only answer.
            let status = trailers
                .get("grpc-status")
                .or_else(|| head.get("grpc-status"))
                .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
                .unwrap_or(2); // UNKNOWN
            let message = match body.get(5..) {
                Some(m) if body.first() == Some(&0) => m.to_vec(),
                Some(_) => bail!("a compressed gRPC answer"),
                None => Vec::new(),
            };
            Ok(Answer {
                status,
                headers: pairs(&head),
                body: message,
            })
        }
    }
}

fn pairs(map: &hyper::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}
