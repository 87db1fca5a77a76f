//! The host's side of the proxy-wasm ABI, seen from a small guest written in WebAssembly text:
//! statuses on bad pointers, ticks on the virtual clock, HTTP and gRPC callouts answered by a
//! scripted responder. (Header maps and compare-and-swap are unit tests in `host.rs`.)

use anyhow::{anyhow, Result};
use apim_edge_harness::host::{Answer, Callout, CalloutKind, Host, NoUpstreams, Vm};

/// A guest that records what the host tells it in its memory:
/// - 0: ticks so far; 8: the clock at the last tick (ns);
/// - 16, 20: the last HTTP callout answer's header count and body size; 52: the status of
///   reading that body; 56: its first byte;
/// - 28: the last gRPC message size; 32: the last gRPC close code; 36: what get_status said.
const GUEST: &str = r#"
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call"
    (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data"
    (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; "upstream" at 1024; an empty header map at 1040; "svc" at 1048, "Do" at 1056.
  (data (i32.const 1024) "upstream")
  (data (i32.const 1040) "\00\00\00\00")
  (data (i32.const 1048) "svc")
  (data (i32.const 1056) "Do")
  (global $heap (mut i32) (i32.const 8192))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $n))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $set_tick (i32.const 1000)))
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    (drop (call $now (i32.const 8)))
    (drop (call $http_call (i32.const 1024) (i32.const 8) (i32.const 1040) (i32.const 4)
      (i32.const 0) (i32.const 0) (i32.const 1040) (i32.const 4) (i32.const 1000)
      (i32.const 24))))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (i32.store (i32.const 16) (local.get 2))
    (i32.store (i32.const 20) (local.get 3))
    (i32.store (i32.const 52)
      (call $get_buffer (i32.const 4) (i32.const 0) (local.get 3) (i32.const 44) (i32.const 48)))
    (i32.store8 (i32.const 56) (i32.load8_u (i32.load (i32.const 44)))))
  (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
    (i32.store (i32.const 28) (local.get 2)))
  (func (export "proxy_on_grpc_close") (param i32 i32 i32)
    (i32.store (i32.const 32) (local.get 2))
    (drop (call $get_status (i32.const 36) (i32.const 40) (i32.const 44))))
  (func (export "set_tick") (param i32) (result i32) (call $set_tick (local.get 0)))
  (func (export "grpc") (param i32) (result i32)
    (call $grpc_call (i32.const 1024) (i32.const 8) (i32.const 1048) (i32.const 3)
      (i32.const 1056) (i32.const 2) (i32.const 1040) (i32.const 4) (i32.const 1024)
      (i32.const 8) (i32.const 1000) (local.get 0)))
  (func (export "now_at") (param i32) (result i32) (call $now (local.get 0)))
  (func (export "property_at") (param i32) (result i32)
    (call $get_property (local.get 0) (i32.const 8) (i32.const 40) (i32.const 44)))
  (func (export "http_call_with_map") (param i32 i32) (result i32)
    (call $http_call (i32.const 1024) (i32.const 8) (local.get 0) (local.get 1)
      (i32.const 0) (i32.const 0) (i32.const 1040) (i32.const 4) (i32.const 1000)
      (i32.const 24)))
  (func (export "set_shared_value_at") (param i32) (result i32)
    (call $set_shared (i32.const 1024) (i32.const 8) (local.get 0) (i32.const 4) (i32.const 0)))
)
"#;

/// A host over the guest. The module is written once per process: tests run in parallel, and
/// one test rewriting the file while another reads it would be a race.
fn guest() -> Result<Host> {
    static MODULE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = match MODULE.get() {
        Some(p) => p,
        None => {
            let bytes = wat::parse_str(GUEST)?;
            let path =
                std::env::temp_dir().join(format!("apim-edge-abi-{}.wasm", std::process::id()));
            // Written under another name and renamed: a reader never sees a partial file.
            let partial = path.with_extension(format!("{:?}.part", std::thread::current().id()));
            std::fs::write(&partial, bytes)?;
            std::fs::rename(&partial, &path)?;
            MODULE.get_or_init(|| path)
        }
    };
    Host::load(path)
}

fn u32_at(vm: &mut Vm, at: usize) -> Result<u32> {
    let bytes = vm.memory_bytes(at, 4)?;
    Ok(u32::from_le_bytes(
        bytes.try_into().map_err(|_| anyhow!("4 bytes"))?,
    ))
}

fn u64_at(vm: &mut Vm, at: usize) -> Result<u64> {
    let bytes = vm.memory_bytes(at, 8)?;
    Ok(u64::from_le_bytes(
        bytes.try_into().map_err(|_| anyhow!("8 bytes"))?,
    ))
}

const SECOND: u64 = 1_000_000_000;
const T0: u64 = 1_767_225_600 * SECOND; // 2026-01-01T00:00:00Z

const OK: i32 = 0;
const BAD_ARGUMENT: i32 = 2;
const INVALID_MEMORY_ACCESS: i32 = 6;

#[test]
fn ticks_fall_due_on_the_virtual_clock() -> Result<()> {
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    assert_eq!(vm.store.data().next_tick_ns, Some(T0 + SECOND));
    // Half a period: nothing due.
    assert_eq!(vm.advance(T0 + SECOND / 2, &NoUpstreams)?, 0);
    assert_eq!(u32_at(&mut vm, 0)?, 0);
    // Three and a half periods from the start: three ticks, each at its own time.
    assert_eq!(vm.advance(T0 + 7 * SECOND / 2, &NoUpstreams)?, 3);
    assert_eq!(u32_at(&mut vm, 0)?, 3);
    assert_eq!(u64_at(&mut vm, 8)?, T0 + 3 * SECOND);
    assert_eq!(vm.store.data().now_ns, T0 + 7 * SECOND / 2);
    assert_eq!(vm.store.data().next_tick_ns, Some(T0 + 4 * SECOND));
    // A period of 0 stops the timer.
    assert_eq!(vm.call1r("set_tick", 0)?, OK);
    assert_eq!(vm.advance(T0 + 100 * SECOND, &NoUpstreams)?, 0);
    // A new period counts from the moment it is set.
    assert_eq!(vm.call1r("set_tick", 250)?, OK);
    assert_eq!(vm.advance(T0 + 101 * SECOND, &NoUpstreams)?, 4);
    assert_eq!(u64_at(&mut vm, 8)?, T0 + 101 * SECOND);
    Ok(())
}

#[test]
fn a_long_gap_runs_a_bounded_number_of_ticks() -> Result<()> {
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    // A day of one-second ticks: the first 999 run one by one, the rest coalesce into one at
    // the last due time.
    assert_eq!(vm.advance(T0 + 86_400 * SECOND, &NoUpstreams)?, 1000);
    assert_eq!(u64_at(&mut vm, 8)?, T0 + 86_400 * SECOND);
    assert_eq!(vm.store.data().next_tick_ns, Some(T0 + 86_401 * SECOND));
    Ok(())
}

#[test]
fn http_callouts_are_answered_by_the_responder() -> Result<()> {
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    let seen = std::sync::Mutex::new(Vec::<Callout>::new());
    let responder = |c: &Callout| {
        seen.lock().ok()?.push(c.clone());
        Some(Answer {
            status: 200,
            headers: vec![("etag".into(), "\"v1\"".into())],
            body: b"hello".to_vec(),
        })
    };
    assert_eq!(vm.advance(T0 + SECOND, &responder)?, 1);
    let seen = seen.into_inner().map_err(|_| anyhow!("poisoned"))?;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].cluster.as_str(), &seen[0].kind, seen[0].token),
        ("upstream", &CalloutKind::Http, 1)
    );
    // :status and etag; five bytes of body, readable as HTTP_CALL_RESPONSE_BODY.
    assert_eq!(u32_at(&mut vm, 16)?, 2);
    assert_eq!(u32_at(&mut vm, 20)?, 5);
    assert_eq!(u32_at(&mut vm, 52)?, 0);
    assert_eq!(vm.memory_bytes(56, 1)?, b"h");
    assert!(vm.store.data().callouts.is_empty());
    // A failed call arrives with no headers, as Envoy reports a reset or a timeout.
    assert_eq!(vm.advance(T0 + 2 * SECOND, &NoUpstreams)?, 1);
    assert_eq!((u32_at(&mut vm, 16)?, u32_at(&mut vm, 20)?), (0, 0));
    Ok(())
}

#[test]
fn a_callout_to_a_cluster_the_proxy_lacks_fails_at_dispatch() -> Result<()> {
    // The guest calls cluster "upstream": a proxy without it refuses, as Envoy does, and
    // nothing is queued for an answer.
    let host = guest()?.with_clusters(["apim-counters".to_string()]);
    let mut vm = host.vm_at(b"", T0)?;
    assert_eq!(vm.call1r("grpc", 24)?, BAD_ARGUMENT);
    assert!(vm.store.data().callouts.is_empty());
    // With it, the call goes out.
    let host = guest()?.with_clusters(["upstream".to_string()]);
    let mut vm = host.vm_at(b"", T0)?;
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    assert_eq!(vm.store.data().callouts.len(), 1);
    Ok(())
}

#[test]
fn grpc_calls_are_answered_by_the_responder() -> Result<()> {
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    let pending = vm.store.data().callouts.clone();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].kind,
        CalloutKind::Grpc {
            service: "svc".into(),
            method: "Do".into()
        }
    );
    assert_eq!(pending[0].body, b"upstream");
    let ok = |_: &Callout| {
        Some(Answer {
            status: 0,
            headers: vec![],
            body: b"abc".to_vec(),
        })
    };
    assert_eq!(vm.answer_callouts(&ok)?, 1);
    assert_eq!(u32_at(&mut vm, 28)?, 3);
    // No answer: closed with UNAVAILABLE (14), which get_status reports too.
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    assert_eq!(vm.answer_callouts(&NoUpstreams)?, 1);
    assert_eq!((u32_at(&mut vm, 32)?, u32_at(&mut vm, 36)?), (14, 14));
    Ok(())
}

#[test]
fn bad_pointers_are_invalid_memory_access() -> Result<()> {
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    let page = 65_536;
    // A return pointer inside memory, at its very end, across its end, far outside it.
    assert_eq!(vm.call1r("now_at", 64)?, OK);
    assert_eq!(vm.call1r("now_at", page - 8)?, OK);
    assert_eq!(vm.call1r("now_at", page - 4)?, INVALID_MEMORY_ACCESS);
    assert_eq!(vm.call1r("now_at", i32::MAX)?, INVALID_MEMORY_ACCESS);
    assert_eq!(vm.call1r("now_at", -1)?, INVALID_MEMORY_ACCESS);
    // An argument outside memory.
    assert_eq!(vm.call1r("property_at", page - 4)?, INVALID_MEMORY_ACCESS);
    assert_eq!(
        vm.call1r("set_shared_value_at", page)?,
        INVALID_MEMORY_ACCESS
    );
    assert_eq!(vm.call1r("set_shared_value_at", 1024)?, OK);
    // A header map that lies outside memory, and one that is not a header map.
    assert_eq!(
        vm.call2r("http_call_with_map", page - 2, 4)?,
        INVALID_MEMORY_ACCESS
    );
    assert_eq!(vm.call2r("http_call_with_map", 1024, 8)?, BAD_ARGUMENT);
    assert!(vm.store.data().callouts.is_empty());
    Ok(())
}

/// Answers with OK after a latency set per call: the first call's answer takes `first`, every
/// later one `later`. Records the tokens in the order it was asked to answer.
struct Slow {
    first: std::time::Duration,
    later: std::time::Duration,
    asked: std::sync::Mutex<Vec<u32>>,
}

impl apim_edge_harness::host::Responder for Slow {
    fn answer(&self, c: &Callout) -> Option<Answer> {
        self.asked.lock().ok()?.push(c.token);
        Some(Answer {
            status: 0,
            headers: vec![],
            body: b"abc".to_vec(),
        })
    }
    fn latency(&self, c: &Callout) -> std::time::Duration {
        if c.token == 1 {
            self.first
        } else {
            self.later
        }
    }
}

#[test]
fn answers_arrive_after_their_latency_in_the_order_they_arrive() -> Result<()> {
    use std::time::Duration;
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    // Two calls dispatched at T0: the first answers after 300 ms, the second after 100 ms.
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    let slow = Slow {
        first: Duration::from_millis(300),
        later: Duration::from_millis(100),
        asked: Default::default(),
    };
    assert_eq!(vm.answer_callouts(&slow)?, 2);
    assert_eq!(*slow.asked.lock().map_err(|_| anyhow!("poisoned"))?, [2, 1]);
    // The stream resumed at the last answer's time; the guest reads that clock.
    assert_eq!(vm.store.data().now_ns, T0 + 300_000_000);
    assert_eq!(vm.call1r("now_at", 64)?, OK);
    assert_eq!(u64_at(&mut vm, 64)?, T0 + 300_000_000);
    // Moving the clock to an earlier request's time leaves it where it is.
    vm.advance(T0 + 200_000_000, &NoUpstreams)?;
    assert_eq!(vm.store.data().now_ns, T0 + 300_000_000);
    Ok(())
}

#[test]
fn an_answer_slower_than_the_timeout_fails_at_the_timeout() -> Result<()> {
    use std::time::Duration;
    let host = guest()?;
    let mut vm = host.vm_at(b"", T0)?;
    // The guest's calls have a 1,000 ms timeout; the answer would take 1,500 ms.
    assert_eq!(vm.call1r("grpc", 24)?, OK);
    let slow = Slow {
        first: Duration::from_millis(1_500),
        later: Duration::from_millis(1_500),
        asked: Default::default(),
    };
    assert_eq!(vm.answer_callouts(&slow)?, 1);
    // Never answered: closed at the timeout with UNAVAILABLE (14), as Envoy's gRPC client
    // ends a call past its timeout (a local 504, read as UNAVAILABLE).
    assert!(slow
        .asked
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .is_empty());
    assert_eq!((u32_at(&mut vm, 32)?, u32_at(&mut vm, 36)?), (14, 14));
    assert_eq!(vm.store.data().now_ns, T0 + SECOND);
    // An HTTP call past its timeout arrives with no headers, as a reset does.
    assert_eq!(vm.call2r("http_call_with_map", 1040, 4)?, OK);
    assert_eq!(vm.answer_callouts(&slow)?, 1);
    assert_eq!((u32_at(&mut vm, 16)?, u32_at(&mut vm, 20)?), (0, 0));
    Ok(())
}

/// Counting host calls: each callback's calls into the host, by function. The guest's tick
/// reads the clock and makes one HTTP callout; its VM start sets the tick period.
#[test]
fn host_calls_are_counted_per_callback_and_function() -> Result<()> {
    let host = guest()?.counting_host_calls();
    let mut vm = host.vm_at(b"", T0)?;
    assert_eq!(vm.advance(T0 + 2 * SECOND, &NoUpstreams)?, 2);
    let calls = &vm.host_calls;
    let of = |callback: &str, import: &str| -> Option<(u64, u64)> {
        let (_, n, counts) = calls.callbacks.iter().find(|(c, _, _)| c == callback)?;
        let ix = calls.imports.iter().position(|i| i == import)?;
        Some((*n, counts[ix]))
    };
    assert_eq!(
        of("proxy_on_vm_start", "proxy_set_tick_period_milliseconds"),
        Some((1, 1))
    );
    assert_eq!(
        of("proxy_on_tick", "proxy_get_current_time_nanoseconds"),
        Some((2, 2))
    );
    assert_eq!(of("proxy_on_tick", "proxy_http_call"), Some((2, 2)));
    assert_eq!(
        of("proxy_on_tick", "proxy_set_tick_period_milliseconds"),
        Some((2, 0))
    );
    let table = calls.table();
    assert!(
        table.contains("proxy_on_tick: 2 calls, 2.00 host calls each: proxy_get_current_time_nanoseconds 1.00, proxy_http_call 1.00\n"),
        "{table}"
    );
    // A host that does not count has no table.
    let mut plain = guest()?.vm_at(b"", T0)?;
    plain.advance(T0 + SECOND, &NoUpstreams)?;
    assert!(plain.host_calls.imports.is_empty() && plain.host_calls.callbacks.is_empty());
    Ok(())
}
