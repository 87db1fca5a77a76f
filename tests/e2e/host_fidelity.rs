//! The wasmtime host as a stand-in for Envoy: a proxy-wasm filter nobody on this project
//! wrote for apim-edge (`tests/guest`, written against the proxy-wasm Rust SDK as any
//! third-party filter is) runs in Envoy 1.40 and in `apim-edge replay --wasm` on the same
//! requests, and the two outcomes are compared: status, the headers the filter set, the body,
//! and whether the VM died. Envoy is the reference; nothing here is expected from the host's
//! own output.
//!
//! The cases: a local reply; the root id and VM configuration the filter reads; a request
//! paused on an HTTP callout and resumed or denied by its answer; two callouts before resuming;
//! a stream never resumed (Envoy's stream idle timeout, 1 s here); a callout to a cluster the
//! proxy lacks, on whose failure the filter panics; and requests after that panic, on the
//! failed VM, with Envoy's `failure_policy` closed and open.

use apim_edge_e2e::{cli_bin, free_port, request, start_envoy_bootstrap, test_guest_wasm};
use apim_edge_harness::envoy::{cluster, Bootstrap};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

/// The requests, in order, on one worker: the panic at `/auth-nowhere` fails the VM for the
/// two after it.
const PATHS: [&str; 11] = [
    "/hello",
    "/about",
    "/auth/odd",
    "/auth/even",
    "/two/even",
    "/two/odd",
    "/other",
    "/stall",
    "/auth-nowhere/x",
    "/hello",
    "/other",
];
/// The index of the request on which the filter panics.
const PANIC_AT: usize = 8;

/// Headers the guest sets on responses (Envoy adds its own, which are not compared).
const GUEST_HEADERS: [&str; 2] = ["hello", "x-guest"];

/// One server for both clusters: to callouts (`Host: auth`) it answers `1` for a path with
/// `odd`, `2` for one with `even`; to anything else (the upstream) an empty 200, which is what
/// the host's replay assumes of an upstream.
fn start_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || answer(conn));
        }
    });
    port
}

fn answer(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut callout = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        let h = h.to_ascii_lowercase();
        callout |= h.starts_with("host:") && h[5..].trim() == "auth";
    }
    let body = match (callout, path.contains("odd"), path.contains("even")) {
        (true, true, _) => "1",
        (true, _, true) => "2",
        _ => "",
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = (&conn).write_all(response.as_bytes());
}

const ROOT_ID: &str = "fidelity-root";
const VM_CONFIG: &str = "vm-bytes";
const PLUGIN_CONFIG: &str = "auth";

/// Envoy with the guest, as `envoy-config` writes a bootstrap but for the guest's settings:
/// its root id, VM and plugin configurations, the failure policy, a stream idle timeout of 1 s,
/// and a cluster `auth` beside `upstream` (both the server). One worker.
fn bootstrap(listen: u16, admin: u16, server: u16, fail_open: bool) -> Value {
    let local = ("127.0.0.1".to_string(), server);
    let mut boot = Bootstrap {
        listen,
        admin,
        upstream: local.clone(),
        wasm: test_guest_wasm(),
        filter_config: Value::Null,
        access_log: None,
        usage_log: None,
        vm_id: "guest".into(),
        config_server: None,
        counters: None,
    }
    .to_json();
    let hcm = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";
    let manager = boot.pointer_mut(hcm).unwrap();
    manager["stream_idle_timeout"] = json!("1s");
    let plugin = manager
        .pointer_mut("/http_filters/0/typed_config/config")
        .unwrap();
    plugin["root_id"] = json!(ROOT_ID);
    plugin["failure_policy"] = json!(if fail_open {
        "FAIL_OPEN"
    } else {
        "FAIL_CLOSED"
    });
    plugin["configuration"]["value"] = json!(PLUGIN_CONFIG);
    plugin["vm_config"]["configuration"] = json!({
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": VM_CONFIG});
    boot["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
        .push(cluster("auth", &local));
    boot
}

/// What one request came to, in the terms compared.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    /// [`GUEST_HEADERS`] present, as `name: value`.
    headers: Vec<String>,
    body: String,
}

fn guest_headers(get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    GUEST_HEADERS
        .iter()
        .filter_map(|n| get(n).map(|v| format!("{n}: {v}")))
        .collect()
}

/// The requests through Envoy, and whether its log shows the VM failing.
fn through_envoy(server: u16, fail_open: bool) -> (Vec<Seen>, bool) {
    let (listen, admin) = (free_port(), free_port());
    let envoy = start_envoy_bootstrap(
        &bootstrap(listen, admin, server, fail_open),
        listen,
        admin,
        1,
    )
    .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    let seen = PATHS
        .iter()
        .map(|path| {
            let r = request(listen, "GET", path, &[]);
            Seen {
                status: r.status,
                headers: guest_headers(|n| r.header(n)),
                body: r.body,
            }
        })
        .collect();
    let log = envoy.log_text();
    (
        seen,
        log.contains("panicked at") && log.contains("proxy_on_request_headers failed"),
    )
}

/// The same requests replayed in the host, and whether it reports the VM failed.
fn through_host(server: u16, fail_open: bool) -> (Vec<Seen>, Vec<String>) {
    let dir = std::env::temp_dir().join(format!(
        "apim-edge-fidelity-{}-{fail_open}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let trace: String = PATHS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}\n", json!({"t": i, "method": "GET", "url": p})))
        .collect();
    let (trace_file, plugin, vm) = (dir.join("trace.jsonl"), dir.join("plugin"), dir.join("vm"));
    std::fs::write(&trace_file, trace).unwrap();
    std::fs::write(&plugin, PLUGIN_CONFIG).unwrap();
    std::fs::write(&vm, VM_CONFIG).unwrap();
    let mut cmd = Command::new(cli_bin());
    cmd.arg("replay")
        .arg("--wasm")
        .arg(test_guest_wasm())
        .arg("--trace")
        .arg(&trace_file)
        .arg("--plugin-config")
        .arg(&plugin)
        .arg("--vm-config")
        .arg(&vm)
        .args(["--root-id", ROOT_ID])
        .args(["--callout", &format!("auth=127.0.0.1:{server}")]);
    if fail_open {
        cmd.arg("--fail-open");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), PATHS.len());
    let seen = records
        .iter()
        .map(|r| Seen {
            status: r["status"].as_u64().unwrap() as u16,
            headers: guest_headers(|n| r["headers"][n].as_str().map(str::to_string)),
            body: r["body"].as_str().unwrap().to_string(),
        })
        .collect();
    let outcomes = records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    (seen, outcomes)
}

/// Compares request by request, naming each difference.
fn compare(fail_open: bool) {
    let server = start_server();
    let (envoy, envoy_vm_died) = through_envoy(server, fail_open);
    let (host, outcomes) = through_host(server, fail_open);
    let differ: Vec<String> = PATHS
        .iter()
        .zip(envoy.iter().zip(&host))
        .filter(|(_, (e, h))| e != h)
        .map(|(p, (e, h))| format!("{p}:\n  envoy {e:?}\n  host  {h:?}"))
        .collect();
    assert!(
        differ.is_empty(),
        "the host differs from Envoy:\n{}",
        differ.join("\n")
    );
    // The VM died in both, at the same request, and only there.
    assert!(envoy_vm_died, "Envoy's log shows no failed VM");
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(
            outcome == "vm_failed",
            i >= PANIC_AT,
            "request {i} ({}): outcome {outcome}",
            PATHS[i]
        );
    }
    // What the comparison covered, as Envoy answered (so that an Envoy that answered nothing
    // useful cannot pass): the local reply, the callout's two answers, the timeout, the
    // failed VM.
    assert_eq!(envoy[0].body, "Hello, World!\n");
    assert_eq!(
        envoy[1].body,
        format!("root_id={ROOT_ID}\nvm_config={VM_CONFIG}\nplugin_config={PLUGIN_CONFIG}\n")
    );
    assert_eq!((envoy[2].status, envoy[3].status), (403, 200));
    assert_eq!((envoy[4].status, envoy[5].status), (200, 403));
    assert_eq!(envoy[7].status, 504);
    // The request the VM failed on gets 503 whatever the policy; those after it, the policy's.
    let after = if fail_open { 200 } else { 503 };
    assert_eq!(
        (envoy[PANIC_AT].status, envoy[PANIC_AT + 1].status),
        (503, after)
    );
}

#[test]
fn a_third_party_filter_behaves_in_the_host_as_in_envoy() {
    compare(false);
}

#[test]
fn after_a_panic_fail_open_lets_requests_through_in_both() {
    compare(true);
}
