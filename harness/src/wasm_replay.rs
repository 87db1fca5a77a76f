//! Replaying a trace through the filter's `.wasm` in the wasmtime host ([`crate::host`]): each
//! request is one proxy-wasm stream (create, request headers and body, response headers and
//! body, log, done, delete) at the trace's own time, and the result has the shape of native
//! replay. Workers are VMs sharing one shared-data store: taken in turn (deterministic, for
//! conformance) or on threads of their own (to stress compare-and-swap).

use crate::host::{Host, HostCalls, LocalReply, Responder, Vm, ROOT};
use crate::replay::{DecisionRecord, UpstreamChanges};
use crate::trace::Entry;
use anyhow::Result;
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// How a replay runs.
pub struct Options<'a> {
    /// VMs (Envoy's worker threads).
    pub workers: usize,
    /// Each VM on a thread of its own, instead of taking requests in turn.
    pub parallel: bool,
    /// Answers the callouts the filter makes (its `snapshotSource` fetches).
    pub responder: &'a dyn Responder,
    /// Advanced once per request.
    pub progress: &'a ProgressBar,
    /// Print the filter's log lines of at least this level (proxy-wasm's: 0 trace to 5
    /// critical) on standard error, each with its request; `None`: none.
    pub log_level: Option<i32>,
}

/// The proxy-wasm log levels by number.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "critical"];

/// Takes the VM's log lines since the last call, printing those of at least `level` with what
/// they came from (`request N`, or the VM's start).
fn print_logs(vm: &mut Vm, level: Option<i32>, what: &str) {
    let logs = std::mem::take(&mut vm.store.data_mut().logs);
    let Some(level) = level else { return };
    for (l, line) in logs.iter().filter(|(l, _)| *l >= level) {
        let name = usize::try_from(*l)
            .ok()
            .and_then(|l| LEVELS.get(l))
            .unwrap_or(&"?");
        eprintln!("{what}: [{name}] {line}");
    }
}

/// A trace time (ms) on the host's clock (ns).
fn nanos(at: apim_edge_policies::Millis) -> u64 {
    u64::try_from(at).unwrap_or(0).saturating_mul(1_000_000)
}

/// The outcome a replay gives a request its VM could not decide: the VM had failed (a trap,
/// a panic, a call stopped at its deadline), earlier or on this very request. Not an engine
/// outcome: the host's.
pub const VM_FAILED: &str = "vm_failed";

/// The outcome of a request the filter paused and neither resumed nor answered: Envoy ends it
/// when the stream's idle timeout fires, with [`STALLED_STATUS`] `stream timeout`.
pub const STALLED: &str = "stream_timeout";
/// The status Envoy answers a stalled stream with.
pub const STALLED_STATUS: u16 = 504;

/// Decides one recorded request in `vm`, as stream `context`: first the VM's clock moves to the
/// request's time, running the ticks due on the way (callouts answered by `responder`).
///
/// A VM that traps is failed from then on, as in Envoy: the request it trapped on gets 503 with
/// an empty body (500 under Service Extensions, [`Profile::failed_status`]), and every later
/// one what Envoy's plugin `failure_policy` says ([`Plugin::fail_open`](crate::host::Plugin)):
/// 503 again, or the upstream's answer as if the filter were not there. Their outcome is
/// [`VM_FAILED`]. (Under Service Extensions, [`replay`] gives the next request a fresh VM.)
///
/// [`Profile::failed_status`]: crate::profile::Profile::failed_status
pub fn replay_one(
    vm: &mut Vm,
    context: i32,
    index: usize,
    e: &Entry,
    responder: &dyn Responder,
) -> Result<DecisionRecord> {
    if vm.failed.is_some() {
        return Ok(failed_vm(vm, index, e, false));
    }
    let record = match stream(vm, context, index, e, responder) {
        Ok(record) => record,
        Err(_) if vm.failed.is_some() => return Ok(failed_vm(vm, index, e, true)),
        Err(err) => return Err(err),
    };
    // The response has gone to the client: a trap from here on fails the VM for later requests.
    let completed = (|| -> Result<()> {
        vm.call1("proxy_on_log", context)?;
        vm.call1r("proxy_on_done", context)?;
        vm.call1("proxy_on_delete", context)?;
        // What the call sent at completion (shared counters) lands before the next call.
        vm.answer_callouts(responder)?;
        Ok(())
    })();
    match completed {
        Err(err) if vm.failed.is_none() => Err(err),
        _ => Ok(record),
    }
}

/// What a failed VM's request gets, as Envoy's failed plugin answers it; `now`: the VM failed
/// on this very request (503 whatever the policy).
fn failed_vm(vm: &Vm, index: usize, e: &Entry, now: bool) -> DecisionRecord {
    let state = vm.store.data();
    let status = if state.plugin().fail_open && !now {
        e.upstream_status
    } else {
        state.profile.failed_status()
    };
    DecisionRecord {
        index,
        status,
        outcome: VM_FAILED,
        api: None,
        operation: None,
        product: None,
        subscription: None,
        headers: BTreeMap::new(),
        body: String::new(),
        upstream: None,
    }
}

/// The request and its response through the filter, up to the response reaching the client.
fn stream(
    vm: &mut Vm,
    context: i32,
    index: usize,
    e: &Entry,
    responder: &dyn Responder,
) -> Result<DecisionRecord> {
    vm.advance(nanos(e.at), responder)?;
    let s = vm.store.data_mut();
    s.stream = Default::default();
    let target = e.target();
    let mut headers = vec![
        (":method".to_string(), e.method.clone()),
        (":path".to_string(), target.clone()),
        (":authority".to_string(), e.host.clone()),
        (":scheme".to_string(), "https".to_string()),
    ];
    headers.extend(
        e.headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
    );
    let received = headers.clone();
    s.stream.request_headers = headers;
    s.stream.source_address = e.client_ip.map(|ip| match ip {
        IpAddr::V4(v4) => format!("{v4}:40000"),
        IpAddr::V6(v6) => format!("[{v6}]:40000"),
    });
    s.stream.request_body = vec![0; e.request_bytes as usize];
    let n_headers = s.stream.request_headers.len() as i32;

    s.effective = context as u32;
    vm.call2("proxy_on_context_create", context, ROOT)?;
    let no_body = i32::from(e.request_bytes == 0);
    let action = vm.call3r("proxy_on_request_headers", context, n_headers, no_body)?;
    let mut stalled = false;
    if action != 0 && vm.store.data().stream.local_reply.is_none() {
        // Paused on its callouts: their answers resume or answer it, as in Envoy's event loop.
        vm.answer_callouts(responder)?;
        let s = vm.store.data_mut();
        stalled = s.stream.local_reply.is_none() && !s.stream.request_resumed;
        s.effective = context as u32;
    }
    if stalled {
        // Nothing will move it: Envoy's stream idle timeout ends it with a reply of its own.
        vm.store.data_mut().stream.local_reply = Some(LocalReply {
            status: STALLED_STATUS,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"stream timeout".to_vec(),
        });
    }
    if vm.store.data().stream.local_reply.is_none() && e.request_bytes > 0 {
        vm.call3r("proxy_on_request_body", context, e.request_bytes as i32, 1)?;
    }
    let reply = vm.store.data().stream.local_reply.clone();
    // What the filter changed in the request on its way upstream.
    let upstream = match reply {
        Some(_) => None,
        None => {
            let sent = &vm.store.data().stream.request_headers;
            let pseudo = |name: &str| {
                sent.iter()
                    .find(|(n, _)| n == name)
                    .map_or("", |(_, v)| v.as_str())
            };
            UpstreamChanges::between(
                (&e.method, &target, &collect_regular(&received)),
                (pseudo(":method"), pseudo(":path"), &collect_regular(sent)),
            )
        }
    };
    let (status, headers, body) = match reply {
        // Envoy encodes a reply sent while the request was decided through the filter too: its
        // response callbacks see it, and may change it.
        Some(r) => {
            let s = vm.store.data_mut();
            s.stream.response_headers = vec![(":status".into(), r.status.to_string())];
            s.stream.response_headers.extend(r.headers);
            s.stream.response_body = r.body;
            let body = s.stream.response_body.len() as i32;
            let n = s.stream.response_headers.len() as i32;
            vm.call3r(
                "proxy_on_response_headers",
                context,
                n,
                i32::from(body == 0),
            )?;
            if body > 0 {
                vm.call3r("proxy_on_response_body", context, body, 1)?;
            }
            let s = &vm.store.data().stream;
            let status = s
                .response_headers
                .iter()
                .find(|(n, _)| n == ":status")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(r.status);
            (
                status,
                collect_regular(&s.response_headers),
                String::from_utf8_lossy(&s.response_body).into_owned(),
            )
        }
        None => {
            let s = vm.store.data_mut();
            s.stream.response_headers = vec![(":status".into(), e.upstream_status.to_string())];
            s.stream.response_body = vec![0; e.response_bytes as usize];
            vm.call3r(
                "proxy_on_response_headers",
                context,
                1,
                i32::from(e.response_bytes == 0),
            )?;
            // A local reply sent while the response headers were decided replaces them.
            if let Some(r) = vm.store.data().stream.local_reply.clone() {
                (
                    r.status,
                    collect(&r.headers),
                    String::from_utf8_lossy(&r.body).into_owned(),
                )
            } else {
                if e.response_bytes > 0 {
                    vm.call3r(
                        "proxy_on_response_body",
                        context,
                        e.response_bytes as i32,
                        1,
                    )?;
                }
                let set: Vec<(String, String)> = vm
                    .store
                    .data()
                    .stream
                    .response_headers
                    .iter()
                    .filter(|(n, _)| n != ":status")
                    .cloned()
                    .collect();
                (e.upstream_status, collect(&set), String::new())
            }
        }
    };
    let props = &vm.store.data().stream.properties;
    let prop = |name: &str| {
        props
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let outcome = match props.get("apim_edge.outcome") {
        Some(v) => leak_outcome(v),
        None if stalled => STALLED,
        None => "unknown",
    };
    Ok(DecisionRecord {
        index,
        status,
        outcome,
        api: prop("apim_edge.api"),
        operation: prop("apim_edge.operation"),
        product: prop("apim_edge.product"),
        subscription: prop("apim_edge.subscription"),
        headers,
        body,
        upstream,
    })
}

/// Outcomes are a fixed set; map the guest's text onto the engine's names.
fn leak_outcome(text: &[u8]) -> &'static str {
    apim_edge_policies::Outcome::ALL
        .iter()
        .map(|o| o.as_str())
        .find(|o| o.as_bytes() == text)
        .unwrap_or("unknown")
}

/// Header names lower-case; repeated headers joined with ", " (as native replay does).
fn collect(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (n, v) in pairs {
        out.entry(n.to_ascii_lowercase())
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    out
}

/// [`collect`] without the pseudo-headers.
fn collect_regular(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    let mut map = collect(pairs);
    map.retain(|n, _| !n.starts_with(':'));
    map
}

/// Starts a worker VM at the time of the trace's first request, its first callouts answered.
pub fn worker(
    host: &Host,
    plugin_config: &[u8],
    entries: &[Entry],
    responder: &dyn Responder,
) -> Result<Vm> {
    let start = entries.first().map_or(0, |e| nanos(e.at));
    let mut vm = host.vm_at(plugin_config, start)?;
    vm.answer_callouts(responder)?;
    Ok(vm)
}

/// After a request: a VM that failed is replaced by a fresh one (its state starting over) where
/// the runtime does so ([`Profile::replaces_failed_vm`](crate::profile::Profile)), at the
/// request's time.
fn renew_failed(
    host: &Host,
    plugin_config: &[u8],
    vm: &mut Vm,
    e: &Entry,
    responder: &dyn Responder,
) -> Result<()> {
    if vm.failed.is_some() && host.profile().replaces_failed_vm() {
        let peaks = std::mem::take(&mut vm.fuel_peaks);
        *vm = host.vm_at(plugin_config, nanos(e.at))?;
        vm.fuel_peaks = peaks;
        vm.answer_callouts(responder)?;
    }
    Ok(())
}

/// Replays `entries` over `options.workers` VMs of `host`: in turn, or each on its own thread.
pub fn replay(
    host: &Host,
    plugin_config: &[u8],
    entries: &[Entry],
    options: &Options,
) -> Result<Vec<DecisionRecord>> {
    let workers = options.workers.max(1);
    let (responder, progress) = (options.responder, options.progress);
    if !options.parallel {
        let mut vms = (0..workers)
            .map(|w| {
                let mut vm = worker(host, plugin_config, entries, responder)?;
                print_logs(&mut vm, options.log_level, &format!("worker {w} start"));
                Ok(vm)
            })
            .collect::<Result<Vec<_>>>()?;
        return entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                progress.inc(1);
                let vm = &mut vms[i % workers];
                let r = replay_one(vm, 2 + i as i32, i, e, responder);
                print_logs(vm, options.log_level, &format!("request {i}"));
                renew_failed(host, plugin_config, vm, e, responder)?;
                r
            })
            .collect::<Result<Vec<_>>>()
            .inspect(|_| {
                report_resources(host, &vms);
                let mut calls = HostCalls::default();
                vms.iter().for_each(|vm| calls.add(&vm.host_calls));
                report_host_calls(&calls);
            });
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<DecisionRecord>>>> =
        Mutex::new((0..entries.len()).map(|_| None).collect());
    let started: Vec<Result<HostCalls>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<HostCalls> {
                    let mut vm = worker(host, plugin_config, entries, responder)?;
                    print_logs(&mut vm, options.log_level, "worker start");
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= entries.len() {
                            return Ok(vm.host_calls);
                        }
                        progress.inc(1);
                        let r = replay_one(&mut vm, 2 + i as i32, i, &entries[i], responder);
                        print_logs(&mut vm, options.log_level, &format!("request {i}"));
                        renew_failed(host, plugin_config, &mut vm, &entries[i], responder)?;
                        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    });
    let mut calls = HostCalls::default();
    for s in started {
        calls.add(&s?);
    }
    report_host_calls(&calls);
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("a request was not replayed"))))
        .collect()
}

/// With a host counting host calls: the table of them, on standard error.
fn report_host_calls(calls: &HostCalls) {
    if !calls.imports.is_empty() {
        eprint!("host calls per callback, all workers:\n{}", calls.table());
    }
}

/// Under a profile with limits, what the VMs used of them, on standard error: the linear
/// memory each holds, and the most fuel each callback burned in one call.
fn report_resources(host: &Host, vms: &[Vm]) {
    let profile = host.profile();
    let (Some(memory), Some(fuel)) = (profile.memory_limit(), profile.fuel_per_callback()) else {
        return;
    };
    for (w, vm) in vms.iter().enumerate() {
        let mut peaks = vm.fuel_peaks.clone();
        peaks.sort_by_key(|p| std::cmp::Reverse(p.1));
        let peaks: Vec<String> = peaks.iter().map(|(n, f)| format!("{n} {f}")).collect();
        eprintln!(
            "worker {w}: linear memory {} of {memory} bytes; fuel per callback (budget {fuel}), most first: {}",
            vm.memory_size(),
            peaks.join(", ")
        );
    }
}
