//! Host profiles: the host behaving as Google's Service Extensions (no shared data, timers,
//! metrics or callouts; 16 MiB of memory; about 1 ms of CPU per billed callback) against small
//! guests written in WebAssembly text, and the apim-edge filter running under that profile.

use anyhow::Result;
use apim_edge_harness::build::{conformance_traces, filter_wasm, workspace_root as root};
use apim_edge_harness::host::Host;
use apim_edge_harness::profile::Profile;
use std::path::PathBuf;
use std::process::Command;

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const UNIMPLEMENTED: i32 = 12;

/// A guest with one export per host call it tries, each returning the call's status; `grow`
/// grows memory by N pages; `proxy_on_request_headers` and `spin` loop N times.
const GUEST: &str = r#"
(module
  (import "env" "proxy_get_shared_data"
    (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 17)
  (data (i32.const 1024) "upstream")
  (data (i32.const 1040) "\00\00\00\00")
  (global $heap (mut i32) (i32.const 8192))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $n))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (call $loop (i32.const 10000000))
    (i32.const 1))
  (func $loop (param $n i32)
    (block $done (loop $again
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $again))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $loop (local.get 1))
    (i32.const 0))
  (func (export "get_shared") (result i32)
    (call $get_shared (i32.const 1024) (i32.const 8) (i32.const 0) (i32.const 4) (i32.const 8)))
  (func (export "set_tick") (result i32) (call $set_tick (i32.const 1000)))
  (func (export "define_metric") (result i32)
    (call $define_metric (i32.const 0) (i32.const 1024) (i32.const 8) (i32.const 0)))
  (func (export "http_call") (result i32)
    (call $http_call (i32.const 1024) (i32.const 8) (i32.const 1040) (i32.const 4)
      (i32.const 0) (i32.const 0) (i32.const 1040) (i32.const 4) (i32.const 1000)
      (i32.const 24)))
  (func (export "now") (result i32) (call $now (i32.const 0)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
)
"#;

fn guest(profile: Profile) -> Result<Host> {
    static MODULE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let path = MODULE.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("apim-edge-profile-{}.wasm", std::process::id()));
        let partial = path.with_extension("part");
        std::fs::write(&partial, wat::parse_str(GUEST).unwrap()).unwrap();
        std::fs::rename(&partial, &path).unwrap();
        path
    });
    Host::load_as(path, profile)
}

#[test]
fn service_extensions_answers_unimplemented_for_what_it_lacks_and_envoy_does_not() -> Result<()> {
    let mut envoy = guest(Profile::Envoy)?.vm(b"{}")?;
    let mut se = guest(Profile::ServiceExtensions)?.vm(b"{}")?;
    let call = |vm: &mut apim_edge_harness::host::Vm, name: &str| vm.call::<(), i32>(name, ());
    assert_eq!(call(&mut envoy, "get_shared")?, NOT_FOUND);
    for f in ["set_tick", "define_metric", "http_call"] {
        assert_eq!(call(&mut envoy, f)?, OK, "{f} in Envoy");
    }
    for f in ["get_shared", "set_tick", "define_metric", "http_call"] {
        assert_eq!(
            call(&mut se, f)?,
            UNIMPLEMENTED,
            "{f} in Service Extensions"
        );
    }
    // What it offers still works.
    assert_eq!(call(&mut se, "now")?, OK);
    Ok(())
}

#[test]
fn memory_past_16_mib_terminates_the_plugin_under_service_extensions_only() -> Result<()> {
    // The guest starts at 17 pages; 256 pages are 16 MiB.
    let mut se = guest(Profile::ServiceExtensions)?.vm(b"{}")?;
    assert_eq!(
        se.call::<i32, i32>("grow", 256 - 17)?,
        17,
        "up to the limit"
    );
    assert_eq!(se.memory_size(), 16 << 20);
    let err = se.call::<i32, i32>("grow", 1).unwrap_err();
    assert!(
        format!("{err:#}").contains("past the limit of 16777216; it was terminated"),
        "{err:#}"
    );
    assert!(se.failed.is_some(), "the VM is dead");

    let mut envoy = guest(Profile::Envoy)?.vm(b"{}")?;
    assert_eq!(envoy.call::<i32, i32>("grow", 256)?, 17);
    Ok(())
}

#[test]
fn a_request_callback_past_its_cpu_budget_is_terminated_but_configuration_is_not_billed(
) -> Result<()> {
    // proxy_on_configure looped 10 million times (well past 4 million fuel) and the VM started.
    let host = guest(Profile::ServiceExtensions)?;
    let mut vm = host.vm(b"{}")?;
    let configure = vm
        .fuel_peaks
        .iter()
        .find(|(n, _)| n == "proxy_on_configure");
    assert!(
        configure.is_some_and(|(_, f)| *f > 10_000_000),
        "{:?}",
        vm.fuel_peaks
    );
    // A request callback within its budget runs; one past it is terminated.
    vm.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (2, 100_000, 1))?;
    let err = vm
        .call::<(i32, i32, i32), i32>("proxy_on_request_headers", (3, 2_000_000, 1))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("more than its CPU budget (4000000 fuel)"),
        "{err:#}"
    );
    // Envoy meters nothing.
    let mut envoy = guest(Profile::Envoy)?.vm(b"{}")?;
    envoy.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (2, 2_000_000, 1))?;
    assert!(envoy.fuel_peaks.is_empty());
    Ok(())
}

fn apim_edge(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apim-edge"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// A file of this test run's own, holding `text`.
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apim-edge-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `apim-edge replay` of `trace` through the filter's `.wasm` under `profile`; `source` is
/// `--snapshot FILE` or `--plugin-config FILE`, `more` any further arguments.
fn replay_under(
    profile: &str,
    source: [&str; 2],
    trace: &std::path::Path,
    more: &[&str],
) -> std::process::Output {
    let wasm = filter_wasm();
    let mut args = vec!["replay", source[0], source[1]];
    args.extend(["--trace", trace.to_str().unwrap()]);
    args.extend(["--wasm", wasm.to_str().unwrap(), "--host-profile", profile]);
    args.extend(more);
    apim_edge(&args)
}

const SAMPLE: [&str; 2] = ["--snapshot", "tests/catalog/sample.json"];

/// The filter under Service Extensions meets every expectation of the sample traces, except
/// those of `validate-jwt` with RS256 and ES256 (see the next test): per-VM counters decide as
/// shared ones do on one worker.
#[test]
fn the_filter_meets_the_traces_under_service_extensions() {
    for t in conformance_traces() {
        if t.trace.ends_with("jwt.jsonl") {
            continue;
        }
        let trace_args = t.args();
        let config: Vec<&str> = trace_args[2..].iter().map(String::as_str).collect();
        let mut more = vec!["--check"];
        more.extend(config);
        let out = replay_under("service-extensions", SAMPLE, &t.trace, &more);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.contains(", 0 mismatched"),
            "{}:\n{stderr}",
            t.trace.display()
        );
        assert!(
            stderr.contains("linear memory") && stderr.contains("of 16777216 bytes"),
            "{stderr}"
        );
    }
}

/// RS256 and ES256 signatures take the filter far more than 1 ms of normalised CPU to verify
/// (about 15 and 22 million wasm instructions): under Service Extensions the request gets 500
/// and the plugin is terminated; a fresh VM decides the next request, an HS256 token's, right.
#[test]
fn jwt_signatures_past_the_cpu_budget_get_500_and_a_fresh_vm_serves_the_next_call() {
    let trace = root().join("tests/traces/jwt.jsonl");
    let text = std::fs::read_to_string(&trace).unwrap();
    let calls: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    // The first three: RS256, ES256 and HS256 tokens, all valid.
    let path = scratch("three.jsonl", &calls[..3].join("\n"));
    let out = replay_under("service-extensions", SAMPLE, &path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{stdout}");
    for r in &records[..2] {
        assert_eq!(r["status"], 500, "{r}");
        assert_eq!(r["outcome"], "vm_failed", "{r}");
        assert_eq!(
            r["body"], "",
            "a terminated plugin answers 500 with no body: {r}"
        );
    }
    assert_eq!(records[2]["status"], 200, "{}", records[2]);
    assert_eq!(records[2]["outcome"], "allowed", "{}", records[2]);
}

/// Counters are each VM's own: a quota of 3 calls per hour, six calls over two VMs in turn,
/// admits all six under Service Extensions, and three under Envoy (shared data).
#[test]
fn counters_are_per_vm_instance_under_service_extensions() {
    let line = |minute: u32| {
        format!(
            r#"{{"at": "2026-01-05T10:{minute:02}:00Z", "method": "GET", "url": "https://api.contoso.com/echo/items/1", "headers": {{"Ocp-Apim-Subscription-Key": "trial-primary"}}}}"#
        )
    };
    let trace: Vec<String> = (0..6).map(|i| line(30 + i)).collect();
    let path = scratch("six.jsonl", &trace.join("\n"));
    let admitted = |profile: &str| {
        let out = replay_under(profile, SAMPLE, &path, &["--workers", "2"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        stdout.matches(r#""outcome":"allowed""#).count()
    };
    assert_eq!(admitted("envoy"), 3);
    assert_eq!(admitted("service-extensions"), 6);
}

#[test]
fn snapshot_source_is_refused_where_the_runtime_has_no_timers_or_callouts() {
    let config = scratch(
        "config.json",
        r#"{"snapshotSource": {"cluster": "apim-config", "authority": "config", "path": "/s.json", "refreshSeconds": 10}}"#,
    );
    let trace = scratch(
        "one.jsonl",
        r#"{"t": 0, "method": "GET", "url": "/echo/items/1"}"#,
    );
    let config = config.to_str().unwrap();
    let out = replay_under(
        "service-extensions",
        ["--plugin-config", config],
        &trace,
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("proxy_on_configure returned false"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "snapshotSource needs timers and callouts, which this runtime does not offer"
        ),
        "{stderr}"
    );
}
