//! The proxy-wasm contexts: the root context of each worker VM, and one HTTP context per call.

use crate::fleet::{self, CounterService, DEADLINE_EXCEEDED};
use crate::headers;
use crate::runtime::{self, VmData};
use crate::slots::{self, SharedData, SlotStore};
use crate::snapshots;
use apim_edge_policies::{
    apply_plan, CallContext, Catalog, Completion, CounterPlan, Decision, EngineError, FilterConfig,
    FilterState, HeaderEdit, LeasedPlan, Leases, Millis, OnUnavailable, Outcome, Request,
    StoreError,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};
use std::borrow::Cow;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root {
            id,
            ..Root::default()
        })
    });
}}

thread_local! {
    /// The counters of a VM whose runtime has no shared data, held in the VM itself (set once,
    /// when `on_configure` finds shared data missing).
    static VM_DATA: std::cell::OnceCell<VmData> = const { std::cell::OnceCell::new() };
    /// With `workerLeases`: this worker's shares of large limits, taken from the proxy's
    /// shared data and spent here.
    static WORKER_SHARES: VmData = VmData::with_limit(WORKER_SHARES_BYTES);
}

/// The most bytes a worker's shares may take (a share's state is a few dozen bytes, kept in
/// slots as counters are): a share past it is not taken, and calls count in shared data.
const WORKER_SHARES_BYTES: usize = 256 << 10;

/// A call decided with this worker's shares of its large limits (`workerLeases`,
/// `docs/design.md`): the program runs once with every limit admitting, to learn the
/// counter operations it makes; what this worker's shares can answer is answered here; the
/// rest (a share asked for among it) is applied to the proxy's shared data, all or nothing;
/// the program runs again with the answers. Every call a share admits was counted in shared
/// data when the share was taken, so the proxy never admits more than a limit.
fn decide_with_shares<'c>(
    catalog: &'c Catalog,
    req: &Request,
    now: Millis,
    leases: &Leases,
    store: &SlotStore,
) -> Result<Decision<'c>, EngineError> {
    let (decided, plan) = catalog.plan(req, now);
    if plan.ops.is_empty() {
        return decided;
    }
    WORKER_SHARES.with(|shares| {
        let own = SlotStore::new(shares, now);
        // Asked and answered within this call: no other call of this worker can be asking.
        let Ok(leased) = leases.split(&plan, &own, now, 0) else {
            // Shares that cannot be read: the shared counters decide, exactly.
            return catalog.decide(req, now, store);
        };
        let sent = match leased.sent.ops.is_empty() {
            true => Ok(Vec::new()),
            false => apply_plan(&leased.sent, store, now),
        };
        match sent {
            Ok(answers) => {
                let all = leases.settle(&leased, &answers, &own, now);
                catalog.decide_answered(req, now, &all)
            }
            Err(e) => {
                leases.abandon(&leased, &own, now);
                Err(EngineError::Store(e))
            }
        }
    })
}

/// Whether this VM's counters are its own (the runtime has no shared data).
fn counters_in_vm() -> bool {
    VM_DATA.with(|d| d.get().is_some())
}

/// Shared data through the host, or the VM's own data where the runtime has none; counts the
/// compare-and-swap conflicts it meets.
#[derive(Default)]
struct HostSharedData {
    conflicts: std::cell::Cell<u64>,
}

impl SharedData for HostSharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        if let Some(got) = VM_DATA.with(|d| d.get().map(|d| d.get(key))) {
            return got;
        }
        hostcalls::get_shared_data(key)
            .map_err(|s| StoreError::Unavailable(format!("get_shared_data: {s:?}")))
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        if let Some(set) = VM_DATA.with(|d| d.get().map(|d| d.set(key, value, cas))) {
            return set;
        }
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => {
                self.conflicts.set(self.conflicts.get() + 1);
                Ok(false)
            }
            Err(s) => Err(StoreError::Unavailable(format!("set_shared_data: {s:?}"))),
        }
    }
}

fn now_millis() -> Millis {
    let now = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0);
    LAST_NOW.set(now);
    now
}

/// How often a VM adds the calls it counted by outcome to the host's metrics: at most this
/// late, on its next call or tick.
const METRICS_FLUSH: Millis = 1_000;

thread_local! {
    /// The clock as this VM last read it.
    static LAST_NOW: std::cell::Cell<Millis> = const { std::cell::Cell::new(0) };
    /// Calls by outcome (in [`Outcome::ALL`]'s order) not yet added to the host's metrics, and
    /// when they last were: one host call per outcome a second instead of one per call.
    static PENDING_OUTCOMES: RefCell<[i64; Outcome::ALL.len()]> =
        const { RefCell::new([0; Outcome::ALL.len()]) };
    static LAST_FLUSH: std::cell::Cell<Millis> = const { std::cell::Cell::new(0) };
    /// The counters `emit-metric` adds to, by name, defined on first use (`None`: the runtime
    /// has no metrics).
    static EMITTED: RefCell<Vec<(String, Option<u32>)>> = const { RefCell::new(Vec::new()) };
}

/// Adds what a call's `emit-metric` steps emitted to their counters.
fn emit(metrics: &[(&str, u64)]) {
    for (name, n) in metrics {
        let id = EMITTED.with_borrow_mut(|known| {
            if let Some((_, id)) = known.iter().find(|(k, _)| k == name) {
                return *id;
            }
            let id = runtime::define_counter(name);
            known.push((name.to_string(), id));
            id
        });
        if let (Some(id), Ok(n)) = (id, i64::try_from(*n)) {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

/// Counters of what the filter does, by name as Envoy's stats show them.
struct Metrics {
    outcomes: Vec<(Outcome, u32)>,
    snapshot_loads: Option<u32>,
    snapshot_failures: Option<u32>,
    store_failures: Option<u32>,
    cas_conflicts: Option<u32>,
    /// Calls decided without the counter service, as `onUnavailable` says.
    counters_unavailable: Option<u32>,
    /// ... of which the service did not answer in time.
    counters_timeouts: Option<u32>,
    /// ... of which this proxy's own counters decided (`onUnavailable: local`).
    counters_fallbacks: Option<u32>,
    /// Calls whose limits were all answered from this proxy's leases, without the service.
    counters_leased: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = runtime::define_counter;
        Metrics {
            outcomes: Outcome::ALL
                .iter()
                .filter_map(|o| Some((*o, counter(&format!("apim_edge.requests.{}", o.as_str()))?)))
                .collect(),
            snapshot_loads: counter("apim_edge.snapshot.loads"),
            snapshot_failures: counter("apim_edge.snapshot.failures"),
            store_failures: counter("apim_edge.counters.failures"),
            cas_conflicts: counter("apim_edge.counters.cas_conflicts"),
            counters_unavailable: counter("apim_edge.counters.unavailable"),
            counters_timeouts: counter("apim_edge.counters.timeouts"),
            counters_fallbacks: counter("apim_edge.counters.fallbacks"),
            counters_leased: counter("apim_edge.counters.leased"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn conflicts(&self, shared: &HostSharedData) {
        if let (Some(id), n @ 1..) = (self.cas_conflicts, shared.conflicts.get()) {
            let _ = hostcalls::increment_metric(id, n as i64);
        }
    }

    /// Counts a call's outcome in this VM; the counts reach the host's metrics once a
    /// [`METRICS_FLUSH`] has passed since they last did (checked here, on the clock as last
    /// read, and on the root context's tick).
    fn outcome(&self, outcome: Outcome) {
        if self.outcomes.is_empty() {
            return;
        }
        if let Some(ix) = Outcome::ALL.iter().position(|o| *o == outcome) {
            PENDING_OUTCOMES.with_borrow_mut(|p| p[ix] += 1);
        }
        let now = LAST_NOW.get();
        if now.saturating_sub(LAST_FLUSH.get()) >= METRICS_FLUSH {
            self.flush(now);
        }
    }

    /// Adds the outcomes counted in this VM to the host's metrics.
    fn flush(&self, now: Millis) {
        LAST_FLUSH.set(now);
        PENDING_OUTCOMES.with_borrow_mut(|pending| {
            for (o, id) in &self.outcomes {
                if let Some(ix) = Outcome::ALL.iter().position(|x| x == o) {
                    let n = std::mem::take(&mut pending[ix]);
                    if n > 0 {
                        let _ = hostcalls::increment_metric(*id, n);
                    }
                }
            }
        });
    }
}

/// What every call of a VM shares: the configuration, the catalog in force, the metrics.
struct Loaded {
    config: Rc<FilterConfig>,
    catalog: Option<Catalog>,
    metrics: Rc<Metrics>,
    /// The counter service, when the fleet shares counters.
    counters: Option<Rc<CounterService>>,
    /// The root context: completions are sent from it, so that they outlive their call.
    root_id: u32,
}

/// How often a VM with a snapshot in force checks for a newer one.
const LOADED_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a VM without one (its `snapshotSource` not fetched yet) tries: calls fail until
/// then.
const UNLOADED_TICK: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Default)]
struct Root {
    id: u32,
    loaded: Option<Rc<Loaded>>,
    /// The version of the published snapshot in force here (0: the inline one, or none).
    version: u64,
    /// The `ETag` the snapshot in force was fetched with.
    etag: String,
    fetching: Option<u32>,
}

impl Root {
    fn has_catalog(&self) -> bool {
        self.loaded.as_ref().is_some_and(|l| l.catalog.is_some())
    }

    /// Loads a snapshot; on success it replaces the catalog in force (counters live in shared
    /// data under stable names, so they carry over). A snapshot that fails leaves all as it was
    /// and gives the reason; the caller logs it.
    fn install(&mut self, snapshot: &[u8], origin: &str) -> Result<(), String> {
        let doc = serde_json::from_slice::<serde_json::Value>(snapshot)
            .map_err(|e| format!("not valid JSON: {e}"))?;
        self.install_document(&doc, origin)
    }

    /// [`Root::install`] for a document already parsed (the inline snapshot).
    fn install_document(&mut self, doc: &serde_json::Value, origin: &str) -> Result<(), String> {
        let Some(loaded) = self.loaded.clone() else {
            return Err("not configured".into());
        };
        let started = now_millis();
        let result = Catalog::load(doc, loaded.config.load_options()).map_err(|e| {
            let first = e.0.first().map(ToString::to_string).unwrap_or_default();
            format!("{} errors; the first: {first}", e.0.len())
        });
        match result {
            Ok(catalog) => {
                let s = catalog.summary();
                log(
                    LogLevel::Info,
                    &format!(
                        "apim-edge: snapshot from {origin} loaded in {} ms: {} APIs, {} products, {} subscriptions",
                        now_millis() - started,
                        s.apis,
                        s.products,
                        s.subscriptions
                    ),
                );
                for w in catalog.warnings() {
                    log(LogLevel::Warn, &format!("apim-edge: {w}"));
                }
                Metrics::bump(loaded.metrics.snapshot_loads);
                if loaded.config.snapshot_source.is_some() {
                    self.set_tick_period(LOADED_TICK);
                }
                self.loaded = Some(Rc::new(Loaded {
                    config: loaded.config.clone(),
                    catalog: Some(catalog),
                    metrics: loaded.metrics.clone(),
                    counters: loaded.counters.clone(),
                    root_id: self.id,
                }));
                Ok(())
            }
            Err(why) => {
                Metrics::bump(loaded.metrics.snapshot_failures);
                Err(why)
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.fetching != Some(token) {
            return;
        }
        self.fetching = None;
        let Some(loaded) = self.loaded.clone() else {
            return;
        };
        let status =
            headers::map_value(MapType::HttpCallResponseHeaders, ":status").unwrap_or_default();
        match status.as_str() {
            "304" => {}
            "200" => {
                let body = hostcalls::get_buffer(
                    proxy_wasm::types::BufferType::HttpCallResponseBody,
                    0,
                    body_size,
                )
                .ok()
                .flatten()
                .unwrap_or_default();
                let etag = headers::map_value(MapType::HttpCallResponseHeaders, "etag")
                    .unwrap_or_default();
                let installed = self.install(&body, "snapshotSource");
                if let Err(why) = &installed {
                    log(LogLevel::Error, &format!("apim-edge: snapshot from snapshotSource refused, the last good one stays: {why}"));
                }
                if installed.is_ok() {
                    self.etag = etag.clone();
                    match snapshots::publish(&HostSharedData::default(), &etag, &body) {
                        Ok(Some(v)) => self.version = v,
                        Ok(None) => {}
                        Err(e) => log(
                            LogLevel::Error,
                            &format!("apim-edge: cannot share the snapshot: {e}"),
                        ),
                    }
                }
            }
            other => {
                log(LogLevel::Error, &format!("apim-edge: snapshotSource answered {other:?}; the last good snapshot stays"));
                Metrics::bump(loaded.metrics.snapshot_failures);
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let metrics = Rc::new(Metrics::define());
        let config = match FilterConfig::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(
                    LogLevel::Critical,
                    &format!("apim-edge: configuration refused: {e}"),
                );
                Metrics::bump(metrics.snapshot_failures);
                return false;
            }
        };
        if counters_in_vm() || !runtime::shared_data_offered() {
            // Service Extensions and the like: no shared data, and no timers or callouts
            // either, so counters are this VM's own and the snapshot must be inline.
            let needs = match (&config.snapshot_source, &config.counters) {
                (Some(_), _) => Some("snapshotSource"),
                (None, Some(_)) => Some("counters"),
                (None, None) => None,
            };
            if let Some(field) = needs {
                log(
                    LogLevel::Critical,
                    &format!("apim-edge: configuration refused: {field} needs timers and callouts, which this runtime does not offer (it has no shared data either); give the snapshot inline, and counters are per VM instance"),
                );
                return false;
            }
            if !counters_in_vm() {
                VM_DATA.with(|d| {
                    let _ = d.set(VmData::default());
                });
                log(
                    LogLevel::Warn,
                    "apim-edge: this runtime has no shared data: counters are this VM instance's own",
                );
            }
        }
        if config.worker_leases.is_some() {
            // The worker's shares are kept in slots, as counters are.
            let _ = WORKER_SHARES.with(|shares| slots::create_slots(shares));
        }
        if let Err(e) = slots::create_slots(&HostSharedData::default()) {
            log(
                LogLevel::Critical,
                &format!("apim-edge: counters unavailable: {e}"),
            );
            return false;
        }
        // The inline snapshot's JSON is only needed until it is loaded.
        let mut config = config;
        let inline = config.snapshot.take();
        let config = Rc::new(config);
        let previous = self.loaded.take();
        self.loaded = Some(Rc::new(Loaded {
            config: config.clone(),
            catalog: None,
            metrics: metrics.clone(),
            counters: config
                .counters
                .as_ref()
                .map(|c| Rc::new(CounterService::new(c))),
            root_id: self.id,
        }));
        if let Some(inline) = &inline {
            if let Err(why) = self.install_document(inline, "the configuration") {
                log(
                    LogLevel::Critical,
                    &format!("apim-edge: configuration refused: snapshot: {why}"),
                );
                self.loaded = previous;
                return false;
            }
        }
        if config.snapshot_source.is_none() && !metrics.outcomes.is_empty() {
            // Only to add the calls counted by outcome to the metrics when traffic stops.
            self.set_tick_period(LOADED_TICK);
        }
        if let Some(source) = &config.snapshot_source {
            // Check for a newer shared snapshot every second (more often until one is in
            // force); fetch every refreshSeconds.
            self.set_tick_period(if self.has_catalog() {
                LOADED_TICK
            } else {
                UNLOADED_TICK
            });
            log(
                LogLevel::Info,
                &format!(
                    "apim-edge: snapshots from cluster {} {}",
                    source.cluster, source.path
                ),
            );
            self.version = 0;
            self.on_tick();
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(loaded) = self.loaded.clone() else {
            return;
        };
        loaded.metrics.flush(now_millis());
        let Some(source) = loaded.config.snapshot_source.clone() else {
            return;
        };
        // A snapshot another VM fetched and loaded.
        match snapshots::newer(&HostSharedData::default(), self.version) {
            Ok(Some(p)) => {
                self.version = p.version;
                match self.install(&p.body, "a shared fetch") {
                    Ok(()) => self.etag = p.etag,
                    Err(why) => log(
                        LogLevel::Error,
                        &format!(
                            "apim-edge: shared snapshot refused, the last good one stays: {why}"
                        ),
                    ),
                }
            }
            Ok(None) => {}
            Err(e) => log(LogLevel::Error, &format!("apim-edge: {e}")),
        }
        if self.fetching.is_some() {
            return;
        }
        // Until a snapshot is in force, a fetch is tried on every tick, not once a period:
        // calls are failing meanwhile.
        let refresh = match loaded.catalog {
            Some(_) => (source.refresh_seconds as Millis).saturating_mul(1000),
            None => UNLOADED_TICK.as_millis() as Millis,
        };
        match snapshots::take_lease(&HostSharedData::default(), now_millis(), refresh) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log(LogLevel::Error, &format!("apim-edge: {e}"));
                return;
            }
        }
        let etag = snapshots::current(&HostSharedData::default())
            .ok()
            .flatten()
            .map(|(_, e)| e)
            .unwrap_or_else(|| self.etag.clone());
        let mut headers = vec![
            (":method", "GET"),
            (":path", source.path.as_str()),
            (":authority", source.authority.as_str()),
        ];
        if !etag.is_empty() && loaded.catalog.is_some() {
            headers.push(("if-none-match", etag.as_str()));
        }
        match hostcalls::dispatch_http_call(
            &source.cluster,
            headers,
            None,
            vec![],
            std::time::Duration::from_secs(10),
        ) {
            Ok(token) => self.fetching = Some(token),
            Err(e) => {
                // The next tick tries again (the proxy may not have its clusters yet, as
                // while Envoy starts).
                let _ = snapshots::release_lease(&HostSharedData::default());
                log(
                    LogLevel::Error,
                    &format!("apim-edge: cannot call cluster {}: {e:?}", source.cluster),
                );
                Metrics::bump(loaded.metrics.snapshot_failures);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Call {
            id: context_id,
            pending: None,
            leased: None,
            loaded: self.loaded.clone(),
            call: None,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// One call.
struct Call {
    id: u32,
    /// Paused for the counter service: the call's time, with which it is decided again.
    pending: Option<Millis>,
    /// With leases: what this proxy's leases answered of the paused call's plan.
    leased: Option<LeasedPlan>,
    loaded: Option<Rc<Loaded>>,
    call: Option<CallContext>,
    status: u16,
    request_bytes: u64,
    response_bytes: u64,
}

impl Context for Call {
    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        let (Some(now), Some(loaded)) = (self.pending.take(), self.loaded.clone()) else {
            return;
        };
        let Some(catalog) = loaded.catalog.as_ref() else {
            return;
        };
        // Envoy ends a call past its timeout as UNAVAILABLE (its local 504), so a failure is a
        // timeout by its time, too (within a tenth: the timer and the clock differ by a few ms).
        let late = loaded.counters.as_ref().is_some_and(|c| {
            let timeout = c.timeout.as_millis() as Millis;
            now_millis() - now >= timeout - timeout / 10
        });
        let answers = match status {
            0 => fleet::answers(size),
            other if other == DEADLINE_EXCEEDED || late => {
                Metrics::bump(loaded.metrics.counters_timeouts);
                Err(format!("no answer in time (gRPC status {other})"))
            }
            other => Err(format!(
                "gRPC status {other} after {} ms",
                now_millis() - now
            )),
        };
        // With leases, the service answered only what the leases could not.
        let answers = match (self.leased.take(), loaded.counters.as_deref()) {
            (Some(leased), Some(service)) => {
                let shared = HostSharedData::default();
                let settled = service.settle(
                    &leased,
                    answers,
                    &SlotStore::new(&shared, now_millis()),
                    now,
                );
                loaded.metrics.conflicts(&shared);
                settled
            }
            (_, _) => answers,
        };
        let action = with_request(catalog.reads_client_address(), |req| {
            // An answer that does not fit the call's plan is a bad answer, which
            // `onUnavailable` decides as a failed exchange; a policy's own failure still
            // follows `failureMode`.
            let decided = match &answers {
                Ok(answers) => match catalog.decide_answered(req, now, answers) {
                    Err(EngineError::Store(e)) => {
                        self.unavailable(&loaded, catalog, req, now, &format!("bad answer: {e}"))
                    }
                    decided => decided,
                },
                Err(why) => self.unavailable(&loaded, catalog, req, now, why),
            };
            self.finish(&loaded, catalog, req, decided)
        });
        if action == Action::Continue {
            let _ = hostcalls::resume_http_request();
        }
    }
}

/// The client's address from `source.address` (`1.2.3.4:5678`, `[::1]:5678`).
fn client_ip() -> Option<IpAddr> {
    let raw = hostcalls::get_property(vec!["source", "address"])
        .ok()
        .flatten()?;
    let text = String::from_utf8(raw).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let host = match text.strip_prefix('[') {
        Some(rest) => rest.split(']').next()?,
        None => text.rsplit_once(':')?.0,
    };
    host.parse().ok()
}

/// Sets property `name` (a path of one element) to `value` through the ABI directly: the SDK's
/// `set_property` allocates the serialized path on every call, and panics on a status it does
/// not expect. A property the host refuses is only not exposed.
fn set_property(name: &str, value: &[u8]) {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> Status;
    }
    // SAFETY: the host only reads both slices, which live for the call.
    let _ = unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

/// The request as the host holds it, read into strings this VM keeps (given back when `f`
/// returns): one host call for the whole header map, the pseudo-headers among it, and one for
/// the client's address when `address` (no policy needs it otherwise).
fn with_request<R>(address: bool, f: impl FnOnce(&Request) -> R) -> R {
    let mut kept = KeptRequestHeaders(REQUEST_HEADERS.take());
    headers::map_pairs_into(MapType::HttpRequestHeaders, &mut kept.0);
    let headers = kept.0.pairs();
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let method = pseudo(":method").unwrap_or_default();
    let full_path = pseudo(":path").unwrap_or("/");
    let authority = pseudo(":authority").unwrap_or_default();
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let host = authority.split(':').next().unwrap_or("");
    let req = Request {
        method,
        host,
        path,
        query,
        headers,
        client_ip: if address { client_ip() } else { None },
    };
    f(&req)
}

impl Call {
    /// A call decided: an internal failure becomes what `failureMode` says; a denial is
    /// answered here ([`Action::Pause`]); an admitted call gets its upstream edits
    /// ([`Action::Continue`]).
    fn finish<'c>(
        &mut self,
        loaded: &Loaded,
        catalog: &'c Catalog,
        req: &Request,
        decided: Result<Decision<'c>, EngineError>,
    ) -> Action {
        let mut decided = decided;
        let mut failed;
        let decision = match &mut decided {
            Ok(d) => d,
            Err(e) => {
                log(LogLevel::Error, &format!("apim-edge: {e}"));
                Metrics::bump(loaded.metrics.store_failures);
                failed = catalog.failed(req);
                &mut failed
            }
        };
        loaded.metrics.outcome(decision.outcome);
        emit(&decision.metrics);
        self.expose(catalog, decision, &loaded.config.filter_state);
        if let Some(r) = &decision.response {
            Self::answer(r.status, &r.headers, &r.body);
            return Action::Pause;
        }
        // The policies' edits, then the edge's own (the key stripped, identity headers).
        Self::apply(&decision.upstream);
        self.call = decision.call.take();
        Action::Continue
    }

    /// A call whose counter service could not answer, decided as `onUnavailable` says.
    fn unavailable<'c>(
        &self,
        loaded: &Loaded,
        catalog: &'c Catalog,
        req: &Request,
        now: Millis,
        why: &str,
    ) -> Result<Decision<'c>, EngineError> {
        let on_unavailable = loaded
            .counters
            .as_ref()
            .map(|c| c.on_unavailable)
            .unwrap_or_default();
        // Once a second at most: in an outage every call comes here.
        let now_ms = now_millis();
        if LAST_UNAVAILABLE_LOG.get() + 1_000 <= now_ms {
            LAST_UNAVAILABLE_LOG.set(now_ms);
            log(
                LogLevel::Warn,
                &format!(
                    "apim-edge: counter service unavailable ({why}); deciding as onUnavailable {on_unavailable:?} (counted in apim_edge.counters.unavailable)"
                ),
            );
        }
        Metrics::bump(loaded.metrics.counters_unavailable);
        if on_unavailable == OnUnavailable::Local {
            Metrics::bump(loaded.metrics.counters_fallbacks);
        }
        let shared = HostSharedData::default();
        let store = SlotStore::new(&shared, now);
        catalog.decide_unavailable(req, now, on_unavailable, &store)
    }

    /// The call's fields as filter state, for Envoy's access log: those `filterState` names.
    fn expose(&self, catalog: &Catalog, decision: &Decision, fields: &FilterState) {
        let set = |name: &str, value: &str| set_property(name, value.as_bytes());
        if fields.outcome {
            set("apim_edge.outcome", decision.outcome.as_str());
        }
        if let Some(call) = &decision.call {
            let (api, operation, product, subscription) = catalog.names(call);
            for (wanted, name, value) in [
                (fields.api, "apim_edge.api", Some(api)),
                (fields.operation, "apim_edge.operation", operation),
                (fields.product, "apim_edge.product", product),
                (fields.subscription, "apim_edge.subscription", subscription),
            ] {
                if let (true, Some(v)) = (wanted, value) {
                    set(name, v);
                }
            }
        }
    }

    fn apply(edits: &[HeaderEdit]) {
        use proxy_wasm::types::MapType::HttpRequestHeaders as Map;
        for e in edits {
            let _ = match e {
                HeaderEdit::Set(n, v) => hostcalls::set_map_value(Map, n, Some(v)),
                HeaderEdit::Append(n, v) => hostcalls::add_map_value(Map, n, v),
                HeaderEdit::Remove(n) => hostcalls::set_map_value(Map, n, None),
            };
        }
    }

    fn answer(status: u16, headers: &[(Cow<'static, str>, Cow<'static, str>)], body: &str) {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (&**n, &**v)).collect();
        let _ = hostcalls::send_http_response(u32::from(status), headers, Some(body.as_bytes()));
    }
}

thread_local! {
    /// When this VM last logged that the counter service was unavailable.
    static LAST_UNAVAILABLE_LOG: std::cell::Cell<Millis> = const { std::cell::Cell::new(0) };
    /// The strings the request headers are read into, kept from call to call (a VM is one
    /// thread).
    static REQUEST_HEADERS: RefCell<headers::KeptPairs> = RefCell::default();
}

/// The kept request headers while a call is decided; given back when dropped.
struct KeptRequestHeaders(headers::KeptPairs);

impl Drop for KeptRequestHeaders {
    fn drop(&mut self) {
        REQUEST_HEADERS.set(std::mem::take(&mut self.0));
    }
}

impl HttpContext for Call {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(loaded) = self.loaded.clone() else {
            Self::answer(
                500,
                &[],
                "{\"statusCode\": 500, \"message\": \"Internal server error\"}",
            );
            return Action::Pause;
        };
        // The client's address is looked up only where a policy reads it.
        let address = loaded
            .catalog
            .as_ref()
            .is_some_and(|c| c.reads_client_address());
        with_request(address, |req| {
            let Some(catalog) = loaded.catalog.as_ref() else {
                // No snapshot has loaded yet (it is still being fetched): what the engine says a
                // failure does under this configuration.
                let decision = loaded.config.edge().unloaded(req);
                loaded.metrics.outcome(decision.outcome);
                return match &decision.response {
                    Some(r) => {
                        Self::answer(r.status, &r.headers, &r.body);
                        Action::Pause
                    }
                    None => {
                        Self::apply(&decision.upstream);
                        Action::Continue
                    }
                };
            };
            let now = now_millis();
            let Some(service) = &loaded.counters else {
                let shared = HostSharedData::default();
                let store = SlotStore::new(&shared, now);
                let decided = match &loaded.config.worker_leases {
                    Some(leases) => decide_with_shares(catalog, req, now, leases, &store),
                    None => catalog.decide(req, now, &store),
                };
                loaded.metrics.conflicts(&shared);
                return self.finish(&loaded, catalog, req, decided);
            };
            // Counters the fleet shares: the call's plan goes to the counter service, and the
            // call waits for its answers (`on_grpc_call_response`). With leases, what this
            // proxy's leases answer does not go.
            let (decided, plan) = catalog.plan(req, now);
            if plan.ops.is_empty() {
                return self.finish(&loaded, catalog, req, decided);
            }
            let shared = HostSharedData::default();
            let store = SlotStore::new(&shared, now);
            let leased = service.split(&plan, &store, now).unwrap_or_else(|e| {
                // Without this proxy's leases, the service decides the call exactly.
                Metrics::bump(loaded.metrics.store_failures);
                log(LogLevel::Error, &format!("apim-edge: leases: {e}"));
                None
            });
            loaded.metrics.conflicts(&shared);
            if let Some(leased) = leased.as_ref().filter(|l| l.sent.ops.is_empty()) {
                Metrics::bump(loaded.metrics.counters_leased);
                let answers = service.settle(leased, Ok(Vec::new()), &store, now);
                let decided = match answers {
                    Ok(answers) => catalog.decide_answered(req, now, &answers),
                    Err(why) => self.unavailable(&loaded, catalog, req, now, &why),
                };
                return self.finish(&loaded, catalog, req, decided);
            }
            match service.send(leased.as_ref().map_or(&plan, |l| &l.sent), now) {
                Ok(_) => {
                    self.pending = Some(now);
                    self.leased = leased;
                    Action::Pause
                }
                Err(status) => {
                    if let Some(leased) = &leased {
                        let _ = service.settle(leased, Err(String::new()), &store, now);
                    }
                    let why = format!("cannot call the counter service: {status:?}");
                    let decided = self.unavailable(&loaded, catalog, req, now, &why);
                    self.finish(&loaded, catalog, req, decided)
                }
            }
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.request_bytes += body_size as u64;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        use proxy_wasm::types::MapType::HttpResponseHeaders as Map;
        let (Some(catalog), Some(call)) = (
            self.loaded.as_ref().and_then(|l| l.catalog.as_ref()),
            &self.call,
        ) else {
            return Action::Continue;
        };
        self.status = headers::map_value(Map, ":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // A return-response in outbound replaces the upstream's response.
        match catalog.outbound_response(call, self.status) {
            Ok(Some(r)) => {
                if let Some(loaded) = &self.loaded {
                    if loaded.config.filter_state.outcome {
                        set_property("apim_edge.outcome", Outcome::Returned.as_str().as_bytes());
                    }
                    loaded.metrics.outcome(Outcome::Returned);
                }
                Self::answer(r.status, &r.headers, &r.body);
                return Action::Pause;
            }
            Ok(None) => {}
            Err(e) => log(LogLevel::Error, &format!("apim-edge: outbound: {e}")),
        }
        // Asked only where an outbound set-header with exists-action="skip" needs to know.
        let exists = |name: &str| headers::map_value(Map, name).is_some();
        match catalog.respond(call, self.status, &exists) {
            Ok(edits) => {
                for e in &edits {
                    let _ = match e {
                        HeaderEdit::Set(n, v) => hostcalls::set_map_value(Map, n, Some(v)),
                        HeaderEdit::Append(n, v) => hostcalls::add_map_value(Map, n, v),
                        HeaderEdit::Remove(n) => hostcalls::set_map_value(Map, n, None),
                    };
                }
            }
            Err(e) => log(LogLevel::Error, &format!("apim-edge: outbound: {e}")),
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_bytes += body_size as u64;
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(loaded), Some(call)) = (&self.loaded, &self.call) else {
            return;
        };
        let Some(catalog) = loaded.catalog.as_ref() else {
            return;
        };
        // Most calls leave nothing to count: no clock, no store.
        if !call.counts_at_completion() {
            return;
        }
        let now = now_millis();
        let done = Completion {
            status: self.status,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
        };
        if let Some(service) = &loaded.counters {
            // Sent from the root context, without waiting: a call's own callouts end with it.
            let ops = match catalog.completion_ops(call, done, now) {
                Ok(ops) if ops.is_empty() => return,
                Ok(ops) => ops,
                Err(e) => {
                    log(LogLevel::Error, &format!("apim-edge: completion: {e}"));
                    return;
                }
            };
            let plan = CounterPlan {
                ops,
                then_release: false,
            };
            let _ = hostcalls::set_effective_context(loaded.root_id);
            let sent = service.send(&plan, now);
            let _ = hostcalls::set_effective_context(self.id);
            if let Err(status) = sent {
                Metrics::bump(loaded.metrics.counters_unavailable);
                log(
                    LogLevel::Warn,
                    &format!("apim-edge: completion not counted: counter service: {status:?}"),
                );
            }
            return;
        }
        let shared = HostSharedData::default();
        let completed = catalog.complete(call, done, now, &SlotStore::new(&shared, now));
        loaded.metrics.conflicts(&shared);
        if let Err(e) = completed {
            Metrics::bump(loaded.metrics.store_failures);
            log(LogLevel::Error, &format!("apim-edge: completion: {e}"));
        }
    }
}
