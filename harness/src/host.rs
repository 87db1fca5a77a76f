//! The wasmtime host: runs a proxy-wasm module (ABI 0.2.1) outside any proxy.
//!
//! The module is compiled once ([`Host::load`]); each worker gets its own instance ([`Vm`]),
//! and all the VMs of a host share one shared-data store and one queue registry, as Envoy's
//! worker threads do. Each VM has a virtual clock, read by both
//! `proxy_get_current_time_nanoseconds` and WASI's `clock_time_get`, so replays are
//! deterministic. Host functions answer with the ABI's status codes as Envoy does (the Rust SDK
//! traps on a status it does not expect). A guest that runs longer than [`CALL_DEADLINE`] is
//! interrupted (wasmtime epochs), and a trap is an error that says where, never a hang.

use crate::profile::Profile;
use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use wasmtime::{
    Caller, Config, Engine, Extern, Instance, Linker, Memory, Module, ResourceLimiter, Store,
    TypedFunc, Val,
};

/// A wasmtime result as an anyhow one, with context.
fn wt<T>(r: wasmtime::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| anyhow::Error::from(e).context(what()))
}

/// The fuel a callback outside the profile's billed ones gets: as good as no limit (the
/// deadline still holds).
const UNBILLED_FUEL: u64 = u64::MAX / 2;

/// How long one call into the guest may run.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);
const EPOCH_TICK: Duration = Duration::from_millis(10);

// proxy-wasm ABI 0.2.1 statuses.
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const INVALID_MEMORY_ACCESS: i32 = 6;
const EMPTY: i32 = 7;
const CAS_MISMATCH: i32 = 8;
const INTERNAL_FAILURE: i32 = 10;
const UNIMPLEMENTED: i32 = 12;

// Buffer and map types.
const HTTP_REQUEST_BODY: i32 = 0;
const HTTP_RESPONSE_BODY: i32 = 1;
const HTTP_CALL_RESPONSE_BODY: i32 = 4;
const GRPC_CALL_MESSAGE: i32 = 5;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;
const REQUEST_HEADERS: i32 = 0;
const RESPONSE_HEADERS: i32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;

/// Locks a mutex; a thread that panicked while holding it leaves its data usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shared-data value and its CAS value.
type Entry = (Vec<u8>, u32);

/// State every VM of a host shares: shared data with compare-and-swap, queues, metrics.
#[derive(Default)]
pub struct Shared {
    /// Hashed with hashbrown's default hasher (foldhash), not SipHash: every counter update
    /// looks its slot up twice.
    data: Mutex<hashbrown::HashMap<Box<str>, Entry>>,
    next_cas: AtomicU32,
    queues: Mutex<Vec<(String, VecDeque<Vec<u8>>)>>,
    metrics: Mutex<Vec<(String, i64)>>,
}

impl Shared {
    /// Envoy's semantics: `cas` 0 writes unconditionally, as does any write to a missing key;
    /// otherwise the key's current CAS value must match.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> bool {
        let mut data = lock(&self.data);
        let next = |counter: &AtomicU32| {
            counter
                .fetch_add(1, Ordering::SeqCst)
                .wrapping_add(1)
                .max(1)
        };
        match data.get_mut(key) {
            Some((_, current)) if cas != 0 && cas != *current => false,
            // Rewritten in place: a counter's slot keeps its buffer from one update to the next.
            Some((bytes, current)) => {
                bytes.clear();
                bytes.extend_from_slice(value);
                *current = next(&self.next_cas);
                true
            }
            None => {
                data.insert(key.into(), (value.to_vec(), next(&self.next_cas)));
                true
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).get(key).cloned()
    }

    /// Copies `key`'s value into `out` (replacing what it held) and returns its CAS value;
    /// `None` when there is no such key. `out` keeps its buffer across calls.
    pub fn get_into(&self, key: &str, out: &mut Vec<u8>) -> Option<u32> {
        let data = lock(&self.data);
        let (bytes, cas) = data.get(key)?;
        out.clear();
        out.extend_from_slice(bytes);
        Some(*cas)
    }

    /// Applies `f` to metric `id`'s value; `None` when there is no such metric.
    fn metric<R>(&self, id: i32, f: impl FnOnce(&mut i64) -> R) -> Option<R> {
        lock(&self.metrics).get_mut(id as usize).map(|(_, v)| f(v))
    }

    /// Every metric and its value, as tests read them.
    pub fn metrics(&self) -> Vec<(String, i64)> {
        lock(&self.metrics).clone()
    }
}

/// A response the guest sent on its own (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The state of one stream (HTTP context) as the guest sees it.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub local_reply: Option<LocalReply>,
    /// Properties the guest set (path elements joined by `.`).
    pub properties: HashMap<String, Vec<u8>>,
    /// `source.address` as Envoy gives it (`ip:port`).
    pub source_address: Option<String>,
    /// The guest resumed the paused request (`proxy_continue_stream`).
    pub request_resumed: bool,
}

type CalloutResponse = (Vec<(String, String)>, Vec<u8>);

/// What a callout asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutKind {
    /// `proxy_http_call`.
    Http,
    /// `proxy_grpc_call` (unary).
    Grpc { service: String, method: String },
}

/// A callout the guest dispatched, waiting for an answer.
#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    pub context: u32,
    pub kind: CalloutKind,
    /// The upstream (Envoy cluster) named.
    pub cluster: String,
    /// HTTP headers, or gRPC initial metadata.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The timeout the guest gave, in milliseconds (0: none).
    pub timeout_ms: u32,
    /// When it was dispatched, on the VM's virtual clock.
    pub sent_ns: u64,
}

/// The answer to a callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status, or the gRPC status code (0 is OK).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Answers callouts: scripted in tests, by rules in replay. `None` is a failed call (reset,
/// timeout, no such cluster), which Envoy reports with no headers (HTTP) or `UNAVAILABLE` (gRPC).
pub trait Responder: Sync {
    fn answer(&self, callout: &Callout) -> Option<Answer>;

    /// How long after its dispatch the callout's answer arrives (virtual time). One that
    /// would arrive after the callout's timeout fails as a timed-out call does, at the timeout.
    fn latency(&self, _callout: &Callout) -> Duration {
        Duration::ZERO
    }
}

impl<F: Fn(&Callout) -> Option<Answer> + Sync> Responder for F {
    fn answer(&self, callout: &Callout) -> Option<Answer> {
        self(callout)
    }
}

/// A responder for which every callout fails.
pub struct NoUpstreams;

impl Responder for NoUpstreams {
    fn answer(&self, _: &Callout) -> Option<Answer> {
        None
    }
}

/// The gRPC status Envoy reports for a call that got no answer.
const GRPC_UNAVAILABLE: u16 = 14;

/// Missed ticks run one by one up to this many in one [`Vm::advance`]; the rest coalesce into
/// one, as a timer whose event loop was busy fires once.
const MAX_TICKS_PER_ADVANCE: u32 = 1000;

pub struct VmState {
    shared: Arc<Shared>,
    pub now_ns: u64,
    plugin_config: Vec<u8>,
    /// The plugin's names and VM configuration, as the proxy's configuration gives them.
    plugin: Arc<Plugin>,
    pub stream: Stream,
    pub logs: Vec<(i32, String)>,
    pub tick_period_ms: u32,
    /// When the next tick is due on the virtual clock, while a tick period is set.
    pub next_tick_ns: Option<u64>,
    pub callouts: Vec<Callout>,
    /// The proxy's clusters, when known ([`Host::with_clusters`]).
    clusters: Option<Arc<HashSet<String>>>,
    /// The context the guest acts for (the one called, or the one it set as effective): its
    /// callouts are answered to it.
    pub effective: u32,
    /// The answer to the callout being handled: headers and body.
    callout_response: Option<CalloutResponse>,
    /// The status `proxy_get_status` reports: the last gRPC call closed.
    grpc_status: u32,
    next_token: u32,
    random: u64,
    metric_ids: HashMap<u32, usize>,
    /// The guest's memory and allocator, found once at instantiation.
    memory: Option<Memory>,
    alloc: Option<TypedFunc<i32, i32>>,
    /// The buffer values are copied through on their way to the guest, kept between calls.
    scratch: Vec<u8>,
    /// The runtime the host behaves as.
    pub profile: Profile,
    /// The size the guest's memory was refused, past the profile's limit.
    pub memory_refused: Option<usize>,
    /// While counting host calls: the calls made of each counted import since the callback
    /// began, by the import's index in [`Vm::host_calls`]'s names.
    host_calls_now: Option<Vec<u64>>,
}

impl ResourceLimiter for VmState {
    /// Under a profile with a memory limit, growing past it terminates the plugin (a trap), as
    /// Service Extensions terminates a plugin over its memory.
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match self.profile.memory_limit() {
            Some(limit) if desired > limit => {
                self.memory_refused = Some(desired);
                Err(wasmtime::Error::msg(format!(
                    "the guest's memory would grow to {desired} bytes, past the limit of {limit}"
                )))
            }
            _ => Ok(true),
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

/// What Envoy's plugin configuration gives a VM besides its plugin configuration: the names
/// the guest reads as properties, and the VM configuration (`vm_config.configuration`).
#[derive(Debug, Clone)]
pub struct Plugin {
    /// `plugin_name` (Envoy's `name`).
    pub name: String,
    /// `plugin_root_id` (Envoy's `root_id`).
    pub root_id: String,
    /// `plugin_vm_id` (Envoy's `vm_config.vm_id`).
    pub vm_id: String,
    /// The bytes `proxy_on_vm_start` is told the size of.
    pub vm_config: Vec<u8>,
    /// Envoy's `failure_policy: FAIL_OPEN`: once the VM has failed, requests go on without
    /// the filter instead of getting 503.
    pub fail_open: bool,
}

impl Default for Plugin {
    /// The names the apim-edge bootstraps give, and no VM configuration.
    fn default() -> Self {
        Plugin {
            name: "apim-edge".into(),
            root_id: "apim-edge".into(),
            vm_id: "apim-edge".into(),
            vm_config: Vec::new(),
            fail_open: false,
        }
    }
}

/// A compiled module and the state its VMs share.
pub struct Host {
    engine: Engine,
    module: Module,
    pub shared: Arc<Shared>,
    plugin: Arc<Plugin>,
    /// The proxy's clusters, when the host was told them: a callout to another fails at
    /// dispatch (`None`: every callout is dispatched, for the responder to answer).
    clusters: Option<Arc<HashSet<String>>>,
    profile: Profile,
    /// Count the guest's calls into the host ([`Host::counting_host_calls`]).
    count_host_calls: bool,
}

fn ticker(engine: &Engine) {
    let engine = engine.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(EPOCH_TICK);
        engine.increment_epoch();
    });
}

/// The engine VMs run on: one that meters fuel (for a profile with a CPU budget), one that
/// does not (metering costs every call).
fn engine(fuel: bool) -> Result<Engine> {
    static ENGINES: [OnceLock<Engine>; 2] = [OnceLock::new(), OnceLock::new()];
    let cell = &ENGINES[usize::from(fuel)];
    if let Some(e) = cell.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(fuel);
    #[cfg(feature = "profiling")]
    if std::env::var_os("APIM_EDGE_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config)?;
    // Two first callers may each make one: the ticker must tick the one that is kept, which
    // every VM then uses (ticking the other, a runaway guest would never be stopped).
    let mut kept_ours = false;
    let kept = cell.get_or_init(|| {
        kept_ours = true;
        engine
    });
    if kept_ours {
        ticker(kept);
    }
    Ok(kept.clone())
}

impl Host {
    /// Compiles a module. Imports the host does not provide are an error that names them.
    pub fn load(wasm: &Path) -> Result<Host> {
        Host::load_as(wasm, Profile::Envoy)
    }

    /// [`Host::load`] for a host that behaves as `profile`.
    pub fn load_as(wasm: &Path, profile: Profile) -> Result<Host> {
        let engine = engine(profile.fuel_per_callback().is_some())?;
        let bytes =
            std::fs::read(wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
        let module = wt(Module::new(&engine, &bytes), || {
            format!("{} is not a wasm module", wasm.display())
        })?;
        let linker = linker(&engine)?;
        let mut probe = Store::new(&engine, blank_state());
        let unknown: Vec<String> = module
            .imports()
            .filter(|i| linker.get_by_import(&mut probe, i).is_none())
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "{} imports what this host does not provide: {}",
                wasm.display(),
                unknown.join(", ")
            );
        }
        Ok(Host {
            engine,
            module,
            shared: Arc::new(Shared::default()),
            plugin: Arc::new(Plugin::default()),
            clusters: None,
            profile,
            count_host_calls: false,
        })
    }

    /// The runtime this host behaves as.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The plugin's names and VM configuration ([`Plugin::default`] until set).
    pub fn with_plugin(mut self, plugin: Plugin) -> Host {
        self.plugin = Arc::new(plugin);
        self
    }

    /// The proxy's clusters: as in Envoy, a callout to a cluster not among them fails at
    /// dispatch with `BadArgument`, and nothing is sent.
    /// The same host, its VMs counting every call the guest makes into the host (each import,
    /// WASI's included), per callback ([`Vm::host_calls`]). Counting wraps each import, so it
    /// costs time: it is for the table, not for benchmarks.
    pub fn counting_host_calls(mut self) -> Host {
        self.count_host_calls = true;
        self
    }

    pub fn with_clusters(mut self, clusters: impl IntoIterator<Item = String>) -> Host {
        self.clusters = Some(Arc::new(clusters.into_iter().collect()));
        self
    }

    /// A new VM (a worker): instantiated, started and configured with `plugin_config`, its
    /// clock at the epoch.
    pub fn vm(&self, plugin_config: &[u8]) -> Result<Vm> {
        self.vm_at(plugin_config, 0)
    }

    /// A new VM whose virtual clock starts at `now_ns` (nanoseconds since the Unix epoch).
    pub fn vm_at(&self, plugin_config: &[u8], now_ns: u64) -> Result<Vm> {
        let mut state = blank_state();
        state.now_ns = now_ns;
        state.shared = self.shared.clone();
        state.plugin_config = plugin_config.to_vec();
        state.clusters = self.clusters.clone();
        state.plugin = self.plugin.clone();
        state.profile = self.profile;
        let mut store = Store::new(&self.engine, state);
        store.set_epoch_deadline(deadline_ticks());
        if self.profile.memory_limit().is_some() {
            store.limiter(|s| s as &mut dyn ResourceLimiter);
        }
        let mut linker = linker(&self.engine)?;
        restrict(&mut linker, &self.module, self.profile)?;
        let counted = match self.count_host_calls {
            true => count_calls(&mut linker, &mut store, &self.module)?,
            false => Vec::new(),
        };
        let instance = wt(linker.instantiate(&mut store, &self.module), || {
            "instantiating the module".into()
        })?;
        let memory = match instance.get_export(&mut store, "memory") {
            Some(Extern::Memory(m)) => Some(m),
            _ => None,
        };
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .ok();
        let s = store.data_mut();
        s.memory = memory;
        s.alloc = alloc;
        let mut vm = Vm {
            store,
            instance,
            exports: Vec::new(),
            failed: None,
            fuel_peaks: Vec::new(),
            host_calls: HostCalls {
                imports: counted,
                callbacks: Vec::new(),
            },
        };
        if vm.instance.get_func(&mut vm.store, "_initialize").is_some() {
            vm.call::<(), ()>("_initialize", ())?;
        }
        vm.call2("proxy_on_context_create", ROOT, 0)?;
        let vm_config_size = self.plugin.vm_config.len() as i32;
        if vm.call2r("proxy_on_vm_start", ROOT, vm_config_size)? == 0 {
            bail!("proxy_on_vm_start returned false{}", vm.log_tail());
        }
        let size = plugin_config.len() as i32;
        if vm.call2r("proxy_on_configure", ROOT, size)? == 0 {
            bail!("proxy_on_configure returned false{}", vm.log_tail());
        }
        Ok(vm)
    }
}

impl VmState {
    /// The plugin the VM runs as.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }
}

fn blank_state() -> VmState {
    VmState {
        shared: Arc::new(Shared::default()),
        now_ns: 0,
        plugin_config: Vec::new(),
        plugin: Arc::new(Plugin::default()),
        stream: Stream::default(),
        logs: Vec::new(),
        tick_period_ms: 0,
        next_tick_ns: None,
        callouts: Vec::new(),
        clusters: None,
        callout_response: None,
        grpc_status: 0,
        effective: ROOT as u32,
        next_token: 0,
        random: 0x9e37_79b9_7f4a_7c15,
        metric_ids: HashMap::new(),
        memory: None,
        alloc: None,
        scratch: Vec::new(),
        profile: Profile::Envoy,
        memory_refused: None,
        host_calls_now: None,
    }
}

/// Makes the host functions `profile` does not offer answer `Unimplemented`, with the
/// signature the module imports them with.
fn restrict(linker: &mut Linker<VmState>, module: &Module, profile: Profile) -> Result<()> {
    let missing = profile.unimplemented();
    if missing.is_empty() {
        return Ok(());
    }
    linker.allow_shadowing(true);
    for import in module.imports() {
        let (true, Some(ty)) = (
            import.module() == "env" && missing.contains(&import.name()),
            import.ty().func().cloned(),
        ) else {
            continue;
        };
        wt(
            linker.func_new("env", import.name(), ty, |_, _, results| {
                if let Some(status) = results.first_mut() {
                    *status = Val::I32(UNIMPLEMENTED);
                }
                Ok(())
            }),
            || format!("restricting {}", import.name()),
        )?;
    }
    Ok(())
}

/// Wraps each function the module imports so that a call to it is counted in the store's
/// [`VmState`] before the host's own runs. Returns the imports' names, by index.
fn count_calls(
    linker: &mut Linker<VmState>,
    store: &mut Store<VmState>,
    module: &Module,
) -> Result<Vec<String>> {
    linker.allow_shadowing(true);
    let mut names = Vec::new();
    for import in module.imports() {
        let (Some(ty), Some(Extern::Func(host))) = (
            import.ty().func().cloned(),
            linker.get(&mut *store, import.module(), import.name()).ok(),
        ) else {
            continue;
        };
        let ix = names.len();
        names.push(import.name().to_string());
        wt(
            linker.func_new(
                import.module(),
                import.name(),
                ty,
                move |mut caller, params, results| {
                    if let Some(counts) = caller.data_mut().host_calls_now.as_mut() {
                        counts[ix] += 1;
                    }
                    host.call(&mut caller, params, results)
                },
            ),
            || format!("counting calls to {}", import.name()),
        )?;
    }
    store.data_mut().host_calls_now = Some(vec![0; names.len()]);
    Ok(names)
}

fn deadline_ticks() -> u64 {
    (CALL_DEADLINE.as_millis() / EPOCH_TICK.as_millis()) as u64
}

/// The root context's id.
pub const ROOT: i32 = 1;

/// Typed exports by name and signature (a handful: a list is the fastest lookup).
type Exports = Vec<(
    (String, std::any::TypeId),
    Box<dyn std::any::Any + Send + Sync>,
)>;

/// One instance of the module: a worker VM.
pub struct Vm {
    pub store: Store<VmState>,
    instance: Instance,
    /// The guest's exports, looked up and type-checked once per name and signature.
    exports: Exports,
    /// Why the VM failed (a trap, or a call stopped at its deadline). Envoy calls a failed VM
    /// no more, and neither does the host: every later call is an error.
    pub failed: Option<String>,
    /// Under a profile with a CPU budget: the most fuel each callback has burned in one call.
    pub fuel_peaks: Vec<(String, u64)>,
    /// With [`Host::counting_host_calls`]: the guest's calls into the host, per callback.
    pub host_calls: HostCalls,
}

/// The guest's calls into the host, by the callback they were made in.
#[derive(Debug, Clone, Default)]
pub struct HostCalls {
    /// The imports counted, by index.
    pub imports: Vec<String>,
    /// Each callback called: its name, how many times, and the calls of each import it made
    /// in all (by the imports' index).
    pub callbacks: Vec<(String, u64, Vec<u64>)>,
}

impl HostCalls {
    /// Adds `other`'s counts (of the same module) to these.
    pub fn add(&mut self, other: &HostCalls) {
        if self.imports.is_empty() {
            self.imports = other.imports.clone();
        }
        for (name, calls, counts) in &other.callbacks {
            let at = match self.callbacks.iter().position(|(n, _, _)| n == name) {
                Some(at) => at,
                None => {
                    self.callbacks
                        .push((name.clone(), 0, vec![0; self.imports.len()]));
                    self.callbacks.len() - 1
                }
            };
            let mine = &mut self.callbacks[at];
            mine.1 += calls;
            for (m, c) in mine.2.iter_mut().zip(counts) {
                *m += c;
            }
        }
    }

    /// A table for people: per callback, its calls, host calls per call, and the imports it
    /// called (calls per callback call), the most called first.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (name, calls, counts) in &self.callbacks {
            let total: u64 = counts.iter().sum();
            let per = |n: u64| n as f64 / (*calls).max(1) as f64;
            out.push_str(&format!(
                "{name}: {calls} calls, {:.2} host calls each",
                per(total)
            ));
            let mut used: Vec<(&String, u64)> = self
                .imports
                .iter()
                .zip(counts.iter().copied())
                .filter(|(_, n)| *n > 0)
                .collect();
            used.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let used: Vec<String> = used
                .iter()
                .map(|(i, n)| format!("{i} {:.2}", per(*n)))
                .collect();
            if !used.is_empty() {
                out.push_str(&format!(": {}", used.join(", ")));
            }
            out.push('\n');
        }
        out
    }
}

impl Vm {
    /// Explains a failed call into the guest: interrupted, or trapped (with its last logs).
    fn failure(&self, e: wasmtime::Error, what: &str) -> anyhow::Error {
        let trap = e.downcast_ref::<wasmtime::Trap>().copied();
        if trap == Some(wasmtime::Trap::OutOfFuel) {
            let budget = self.store.data().profile.fuel_per_callback().unwrap_or(0);
            anyhow!("{what}: the guest burned more than its CPU budget ({budget} fuel) and was terminated")
        } else if let Some(size) = self.store.data().memory_refused {
            let limit = self.store.data().profile.memory_limit().unwrap_or(0);
            anyhow!("{what}: the guest's memory would grow to {size} bytes, past the limit of {limit}; it was terminated")
        } else if trap == Some(wasmtime::Trap::Interrupt) {
            anyhow!("{what}: the guest ran longer than {CALL_DEADLINE:?} and was stopped")
        } else {
            anyhow!("{what}: the guest trapped: {e:#}{}", self.log_tail())
        }
    }

    /// Calls the guest's export `name`, looked up and type-checked on its first call only.
    pub fn call<P, R>(&mut self, name: &str, args: P) -> Result<R>
    where
        P: wasmtime::WasmParams + 'static,
        R: wasmtime::WasmResults + 'static,
    {
        let signature = std::any::TypeId::of::<TypedFunc<P, R>>();
        let known = |exports: &Exports| {
            exports
                .iter()
                .position(|((n, t), _)| *t == signature && n == name)
        };
        let at = match known(&self.exports) {
            Some(at) => at,
            None => {
                let f = wt(
                    self.instance.get_typed_func::<P, R>(&mut self.store, name),
                    || format!("the module does not export {name} with that signature"),
                )?;
                self.exports
                    .push(((name.to_string(), signature), Box::new(f)));
                self.exports.len() - 1
            }
        };
        let Some(f) = self.exports[at].1.downcast_ref::<TypedFunc<P, R>>() else {
            bail!("{name}: cached with another signature");
        };
        if let Some(why) = &self.failed {
            bail!("{name}: not called, the VM failed earlier: {why}");
        }
        self.store.set_epoch_deadline(deadline_ticks());
        let budget = self.store.data().profile.fuel_per_callback();
        // Metered everywhere, limited in the billed callbacks only.
        let budget = budget.map(|b| {
            if crate::profile::BILLED_CALLBACKS.contains(&name) {
                b
            } else {
                UNBILLED_FUEL
            }
        });
        if let Some(budget) = budget {
            wt(self.store.set_fuel(budget), || "setting fuel".into())?;
        }
        let result = f.call(&mut self.store, args);
        self.count_host_calls(name);
        if let Some(budget) = budget {
            let burned = budget - self.store.get_fuel().unwrap_or(0);
            match self.fuel_peaks.iter_mut().find(|(n, _)| n == name) {
                Some((_, peak)) => *peak = (*peak).max(burned),
                None => self.fuel_peaks.push((name.to_string(), burned)),
            }
        }
        result.map_err(|e| {
            let e = self.failure(e, name);
            self.failed = Some(format!("{e:#}"));
            e
        })
    }

    /// Moves the calls counted during callback `name` into [`Vm::host_calls`].
    fn count_host_calls(&mut self, name: &str) {
        let Some(now) = self.store.data_mut().host_calls_now.as_mut() else {
            return;
        };
        let t = &mut self.host_calls;
        let at = match t.callbacks.iter().position(|(n, _, _)| n == name) {
            Some(at) => at,
            None => {
                t.callbacks.push((name.to_string(), 0, vec![0; now.len()]));
                t.callbacks.len() - 1
            }
        };
        let entry = &mut t.callbacks[at];
        entry.1 += 1;
        for (total, n) in entry.2.iter_mut().zip(now.iter_mut()) {
            *total += std::mem::take(n);
        }
    }

    pub fn call1(&mut self, name: &str, a: i32) -> Result<()> {
        self.call(name, a)
    }

    pub fn call1r(&mut self, name: &str, a: i32) -> Result<i32> {
        self.call(name, a)
    }

    pub fn call2(&mut self, name: &str, a: i32, b: i32) -> Result<()> {
        self.call(name, (a, b))
    }

    pub fn call2r(&mut self, name: &str, a: i32, b: i32) -> Result<i32> {
        self.call(name, (a, b))
    }

    pub fn call3(&mut self, name: &str, a: i32, b: i32, c: i32) -> Result<()> {
        self.call(name, (a, b, c))
    }

    pub fn call3r(&mut self, name: &str, a: i32, b: i32, c: i32) -> Result<i32> {
        self.call(name, (a, b, c))
    }

    pub fn call5(&mut self, name: &str, a: i32, b: i32, c: i32, d: i32, e: i32) -> Result<()> {
        self.call(name, (a, b, c, d, e))
    }

    /// `len` bytes of the guest's memory from `at`, for tests that read what a guest recorded.
    pub fn memory_bytes(&mut self, at: usize, len: usize) -> Result<Vec<u8>> {
        let Some(memory) = self.store.data().memory else {
            bail!("the module exports no memory");
        };
        memory
            .data(&self.store)
            .get(at..at.saturating_add(len))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| anyhow!("{len} bytes at {at} lie outside the guest's memory"))
    }

    /// The size of the guest's linear memory now, in bytes.
    pub fn memory_size(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |m| m.data_size(&self.store))
    }

    /// The last lines the guest logged, for error messages.
    pub fn log_tail(&self) -> String {
        let logs = &self.store.data().logs;
        let tail: Vec<&str> = logs.iter().rev().take(3).map(|(_, l)| l.as_str()).collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                " (guest log: {})",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
    }

    /// Answers every pending callout with `responder`, each when it arrives (its dispatch
    /// time plus the responder's latency; the timeout, failed, when that is later), the
    /// earliest first, and lets the guest handle each answer on a clock moved to that time
    /// (callouts the guest makes meanwhile are answered too). Returns how many.
    pub fn answer_callouts(&mut self, responder: &dyn Responder) -> Result<usize> {
        let mut answered = 0;
        loop {
            let due = |c: &Callout| {
                let latency = u64::try_from(responder.latency(c).as_nanos()).unwrap_or(u64::MAX);
                let timeout = u64::from(c.timeout_ms) * 1_000_000;
                let timed_out = c.timeout_ms > 0 && latency >= timeout;
                let after = if timed_out { timeout } else { latency };
                (c.sent_ns.saturating_add(after), timed_out)
            };
            let pending = &self.store.data().callouts;
            let Some((ix, (at, timed_out))) = pending
                .iter()
                .map(due)
                .enumerate()
                .min_by_key(|(i, (at, _))| (*at, *i))
            else {
                break;
            };
            let c = self.store.data_mut().callouts.remove(ix);
            let s = self.store.data_mut();
            s.now_ns = s.now_ns.max(at);
            if timed_out {
                // Envoy's async client ends a call past its timeout with a local 504, which
                // gRPC reads as UNAVAILABLE.
                self.deliver_failure(&c, GRPC_UNAVAILABLE)?;
            } else {
                let answer = responder.answer(&c);
                self.deliver(&c, answer)?;
            }
            answered += 1;
        }
        Ok(answered)
    }

    /// Hands a failed callout to the guest: HTTP without headers, gRPC with `code`.
    fn deliver_failure(&mut self, c: &Callout, code: u16) -> Result<()> {
        match c.kind {
            CalloutKind::Http => self.deliver(c, None),
            CalloutKind::Grpc { .. } => {
                let (context, token) = (c.context as i32, c.token as i32);
                self.store.data_mut().effective = c.context;
                self.store.data_mut().grpc_status = u32::from(code);
                self.call3("proxy_on_grpc_close", context, token, i32::from(code))
            }
        }
    }

    /// Hands one answer to the guest as Envoy does.
    fn deliver(&mut self, c: &Callout, answer: Option<Answer>) -> Result<()> {
        let (context, token) = (c.context as i32, c.token as i32);
        self.store.data_mut().effective = c.context;
        match (&c.kind, answer) {
            (CalloutKind::Http, Some(a)) => {
                let mut all = vec![(":status".to_string(), a.status.to_string())];
                all.extend(a.headers);
                let (n, size) = (all.len() as i32, a.body.len() as i32);
                self.store.data_mut().callout_response = Some((all, a.body));
                let r = self.call5("proxy_on_http_call_response", context, token, n, size, 0);
                self.store.data_mut().callout_response = None;
                r
            }
            (CalloutKind::Http, None) => {
                self.store.data_mut().callout_response = Some((Vec::new(), Vec::new()));
                let r = self.call5("proxy_on_http_call_response", context, token, 0, 0, 0);
                self.store.data_mut().callout_response = None;
                r
            }
            (CalloutKind::Grpc { .. }, Some(a)) if a.status == 0 => {
                let size = a.body.len() as i32;
                self.store.data_mut().callout_response = Some((a.headers, a.body));
                let r = self.call3("proxy_on_grpc_receive", context, token, size);
                self.store.data_mut().callout_response = None;
                r
            }
            (CalloutKind::Grpc { .. }, answer) => {
                let code = answer.map_or(GRPC_UNAVAILABLE, |a| a.status);
                self.store.data_mut().grpc_status = u32::from(code);
                self.call3("proxy_on_grpc_close", context, token, i32::from(code))
            }
        }
    }

    /// Moves this VM's virtual clock to `to_ns`, running the ticks that fall due on the way,
    /// each at its own time, and answering the callouts they make with `responder`.
    /// Returns how many ticks ran. The clock never moves backwards (a callout's answer may have
    /// moved it past `to_ns`): then no tick runs.
    pub fn advance(&mut self, to_ns: u64, responder: &dyn Responder) -> Result<u32> {
        let mut ran = 0;
        self.answer_callouts(responder)?;
        while let Some(due) = self.store.data().next_tick_ns.filter(|due| *due <= to_ns) {
            let s = self.store.data_mut();
            let period = u64::from(s.tick_period_ms) * 1_000_000;
            let mut at = due;
            if ran + 1 >= MAX_TICKS_PER_ADVANCE && period > 0 {
                // Coalesce: the last due time at or before `to_ns`.
                at = due + (to_ns - due) / period * period;
            }
            s.now_ns = at;
            s.next_tick_ns = Some(at.saturating_add(period.max(1)));
            s.effective = ROOT as u32;
            self.call1("proxy_on_tick", ROOT)?;
            ran += 1;
            self.answer_callouts(responder)?;
        }
        let s = self.store.data_mut();
        s.now_ns = s.now_ns.max(to_ns);
        Ok(ran)
    }
}

/// The proxy-wasm serialization of a header map.
pub fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    serialize_map_into(pairs, &mut out);
    out
}

/// [`serialize_map`] into `out`, after what it holds.
fn serialize_map_into(pairs: &[(String, String)], out: &mut Vec<u8>) {
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
}

/// Reads a serialized header map; `None` when it is malformed.
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let n = word(0)?;
    // The count comes from the guest: the sizes it promises must be there before anything
    // is allocated for them.
    let mut at = n.checked_mul(8)?.checked_add(4)?;
    if at > bytes.len() {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (k, v) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = bytes.get(at..at.checked_add(k)?)?;
        at = at + k + 1;
        let value = bytes.get(at..at.checked_add(v)?)?;
        at = at + v + 1;
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(out)
}

type C<'a> = Caller<'a, VmState>;

fn memory(c: &mut C) -> Option<Memory> {
    c.data().memory
}

/// The `len` bytes at `ptr` of a guest's memory, where they lie.
fn slice(memory: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    memory.get(ptr..ptr.checked_add(len)?)
}

fn read(c: &mut C, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let m = memory(c)?;
    slice(m.data(&*c), ptr, len).map(<[u8]>::to_vec)
}

fn read_str(c: &mut C, ptr: i32, len: i32) -> Option<String> {
    read(c, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A serialized header map in guest memory: `INVALID_MEMORY_ACCESS` when it lies outside
/// memory, `BAD_ARGUMENT` when it is not a header map.
fn read_map(c: &mut C, ptr: i32, len: i32) -> Result<Vec<(String, String)>, i32> {
    let bytes = read(c, ptr, len).ok_or(INVALID_MEMORY_ACCESS)?;
    deserialize_map(&bytes).ok_or(BAD_ARGUMENT)
}

fn write(c: &mut C, ptr: i32, bytes: &[u8]) -> bool {
    let Some(m) = memory(c) else { return false };
    let Ok(ptr) = usize::try_from(ptr) else {
        return false;
    };
    m.write(&mut *c, ptr, bytes).is_ok()
}

fn write_u32(c: &mut C, ptr: i32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and writes where and how long.
fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> i32 {
    // Taken out for the call (the guest may call back in) and put back: no clone per call.
    let Some(alloc) = c.data_mut().alloc.take() else {
        return INTERNAL_FAILURE;
    };
    let allocated = alloc.call(&mut *c, bytes.len() as i32);
    c.data_mut().alloc = Some(alloc);
    let Ok(ptr) = allocated else {
        return INTERNAL_FAILURE;
    };
    if (ptr == 0 && !bytes.is_empty())
        || !write(c, ptr, bytes)
        || !write_u32(c, ret_ptr, ptr as u32)
        || !write_u32(c, ret_size, bytes.len() as u32)
    {
        return INVALID_MEMORY_ACCESS;
    }
    OK
}

/// Gives the guest what `fill` writes into the VM's scratch buffer (`None`: `NOT_FOUND`). The
/// buffer is kept between calls, so handing over a value allocates nothing on the host.
fn give_from(
    c: &mut C,
    ret_ptr: i32,
    ret_size: i32,
    fill: impl FnOnce(&C, &mut Vec<u8>) -> Option<()>,
) -> i32 {
    let mut scratch = std::mem::take(&mut c.data_mut().scratch);
    scratch.clear();
    let status = match fill(c, &mut scratch) {
        Some(()) => give(c, &scratch, ret_ptr, ret_size),
        None => NOT_FOUND,
    };
    c.data_mut().scratch = scratch;
    status
}

/// A property path as the guest sends it (elements separated by NUL), dotted.
fn property_path(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', ".")
}

fn map_ref(s: &VmState, map_type: i32) -> Option<&[(String, String)]> {
    match map_type {
        REQUEST_HEADERS => Some(&s.stream.request_headers),
        RESPONSE_HEADERS => Some(&s.stream.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => s.callout_response.as_ref().map(|(h, _)| h.as_slice()),
        _ => None,
    }
}

fn map_of(s: &mut VmState, map_type: i32) -> Option<&mut Vec<(String, String)>> {
    match map_type {
        REQUEST_HEADERS => Some(&mut s.stream.request_headers),
        RESPONSE_HEADERS => Some(&mut s.stream.response_headers),
        HTTP_CALL_RESPONSE_HEADERS => s.callout_response.as_mut().map(|(h, _)| h),
        _ => None,
    }
}

/// Replace, add or remove a header: removes the key's values when `remove` is set, then adds
/// `value` (names lower-case, as Envoy keeps them).
fn edit_map(mut c: C, map: i32, key: (i32, i32), value: Option<(i32, i32)>, remove: bool) -> i32 {
    let Some(key) = read_str(&mut c, key.0, key.1) else {
        return INVALID_MEMORY_ACCESS;
    };
    let value = match value {
        Some((p, l)) => match read_str(&mut c, p, l) {
            Some(v) => Some(v),
            None => return INVALID_MEMORY_ACCESS,
        },
        None => None,
    };
    let Some(m) = map_of(c.data_mut(), map) else {
        return NOT_FOUND;
    };
    if remove {
        m.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
    }
    if let Some(v) = value {
        m.push((key.to_ascii_lowercase(), v));
    }
    OK
}

fn property<'s>(s: &'s VmState, path: &str) -> Option<&'s [u8]> {
    match path {
        "source.address" => s.stream.source_address.as_deref().map(str::as_bytes),
        "plugin_name" => Some(s.plugin.name.as_bytes()),
        "plugin_root_id" => Some(s.plugin.root_id.as_bytes()),
        "plugin_vm_id" => Some(s.plugin.vm_id.as_bytes()),
        _ => s.stream.properties.get(path).map(Vec::as_slice),
    }
}

/// The cluster a gRPC callout names: Envoy takes a serialized `GrpcService` (its `envoy_grpc`
/// message's `cluster_name`) or, when the bytes are not one, a cluster's name.
fn grpc_cluster(upstream: &str) -> String {
    fn field(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = bytes.split_first()?;
        let (mut len, mut at) = (0usize, 0);
        loop {
            let b = *rest.get(at)?;
            len |= usize::from(b & 0x7f) << (7 * at);
            at += 1;
            if b & 0x80 == 0 || at > 4 {
                break;
            }
        }
        let rest = rest.get(at..)?;
        Some((tag, rest.get(..len)?, rest.get(len..)?))
    }
    // Field 1 (length-delimited, tag 0x0a), then its field 1: the cluster's name.
    let parsed = field(upstream.as_bytes())
        .filter(|(tag, _, _)| *tag == 0x0a)
        .and_then(|(_, envoy_grpc, _)| field(envoy_grpc))
        .filter(|(tag, name, _)| *tag == 0x0a && !name.is_empty())
        .and_then(|(_, name, _)| std::str::from_utf8(name).ok());
    parsed.map_or_else(|| upstream.to_string(), str::to_string)
}

/// Queues a callout for the responder and writes its token where the guest asked.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    c: &mut C,
    kind: CalloutKind,
    cluster: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: i32,
    ret: i32,
) -> i32 {
    let s = c.data_mut();
    if s.clusters
        .as_ref()
        .is_some_and(|known| !known.contains(&cluster))
    {
        return BAD_ARGUMENT;
    }
    s.next_token += 1;
    let token = s.next_token;
    s.callouts.push(Callout {
        token,
        context: s.effective,
        kind,
        cluster,
        headers,
        body,
        timeout_ms: u32::try_from(timeout_ms).unwrap_or(0),
        sent_ns: s.now_ns,
    });
    if write_u32(c, ret, token) {
        OK
    } else {
        INVALID_MEMORY_ACCESS
    }
}

fn linker(engine: &Engine) -> Result<Linker<VmState>> {
    let mut l: Linker<VmState> = Linker::new(engine);
    let env = "env";
    l.func_wrap(
        env,
        "proxy_log",
        |mut c: C, level: i32, ptr: i32, len: i32| -> i32 {
            match read_str(&mut c, ptr, len) {
                Some(m) => {
                    c.data_mut().logs.push((level, m));
                    OK
                }
                None => INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    l.func_wrap(env, "proxy_get_log_level", |mut c: C, ret: i32| -> i32 {
        if write_u32(&mut c, ret, 2) {
            OK
        } else {
            INVALID_MEMORY_ACCESS
        }
    })?;
    l.func_wrap(
        env,
        "proxy_get_current_time_nanoseconds",
        |mut c: C, ret: i32| -> i32 {
            let now = c.data().now_ns;
            if write(&mut c, ret, &now.to_le_bytes()) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_tick_period_milliseconds",
        |mut c: C, period: i32| -> i32 {
            let s = c.data_mut();
            s.tick_period_ms = period as u32;
            s.next_tick_ns = (period != 0).then(|| {
                s.now_ns
                    .saturating_add(u64::from(period as u32) * 1_000_000)
            });
            OK
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_buffer_bytes",
        |mut c: C, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let s = c.data();
            let buffer: &[u8] = match kind {
                HTTP_REQUEST_BODY => &s.stream.request_body,
                HTTP_RESPONSE_BODY => &s.stream.response_body,
                HTTP_CALL_RESPONSE_BODY | GRPC_CALL_MESSAGE => match &s.callout_response {
                    Some((_, b)) => b,
                    None => return NOT_FOUND,
                },
                PLUGIN_CONFIGURATION => &s.plugin_config,
                VM_CONFIGURATION => &s.plugin.vm_config,
                _ => return NOT_FOUND,
            };
            // Sizes are unsigned in the ABI (usize::MAX arrives as -1).
            let start = (start as u32 as usize).min(buffer.len());
            let end = start.saturating_add(max as u32 as usize).min(buffer.len());
            if start == end {
                return NOT_FOUND;
            }
            let wanted = buffer[start..end].to_vec();
            give(&mut c, &wanted, ret_ptr, ret_size)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_buffer_bytes",
        |mut c: C, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> i32 {
            let Some(data) = read(&mut c, ptr, len) else {
                return INVALID_MEMORY_ACCESS;
            };
            let s = c.data_mut();
            let buffer = match kind {
                HTTP_REQUEST_BODY => &mut s.stream.request_body,
                HTTP_RESPONSE_BODY => &mut s.stream.response_body,
                _ => return NOT_FOUND,
            };
            let start = (start as u32 as usize).min(buffer.len());
            let end = start.saturating_add(size as u32 as usize).min(buffer.len());
            buffer.splice(start..end, data);
            OK
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_header_map_pairs",
        |mut c: C, map: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            give_from(&mut c, ret_ptr, ret_size, |c, out| {
                map_ref(c.data(), map).map(|pairs| serialize_map_into(pairs, out))
            })
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_header_map_pairs",
        |mut c: C, map: i32, ptr: i32, len: i32| -> i32 {
            let pairs = match read_map(&mut c, ptr, len) {
                Ok(p) => p,
                Err(status) => return status,
            };
            match map_of(c.data_mut(), map) {
                Some(m) => {
                    *m = pairs;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_header_map_value",
        |mut c: C, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(key) = read_str(&mut c, kp, kl) else {
                return INVALID_MEMORY_ACCESS;
            };
            give_from(&mut c, ret_ptr, ret_size, |c, out| {
                let pairs = map_ref(c.data(), map)?;
                let (_, v) = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(&key))?;
                out.extend_from_slice(v.as_bytes());
                Some(())
            })
        },
    )?;
    l.func_wrap(
        env,
        "proxy_replace_header_map_value",
        |c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            edit_map(c, map, (kp, kl), Some((vp, vl)), true)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_add_header_map_value",
        |c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            edit_map(c, map, (kp, kl), Some((vp, vl)), false)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_remove_header_map_value",
        |c: C, map: i32, kp: i32, kl: i32| -> i32 { edit_map(c, map, (kp, kl), None, true) },
    )?;
    l.func_wrap(
        env,
        "proxy_get_property",
        |mut c: C, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(m) = memory(&mut c) else {
                return INVALID_MEMORY_ACCESS;
            };
            let Some(path) = slice(m.data(&c), pp, pl).map(property_path) else {
                return INVALID_MEMORY_ACCESS;
            };
            give_from(&mut c, ret_ptr, ret_size, |c, out| {
                out.extend_from_slice(property(c.data(), &path)?);
                Some(())
            })
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_property",
        |mut c: C, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
            let (Some(path), Some(value)) = (read(&mut c, pp, pl), read(&mut c, vp, vl)) else {
                return INVALID_MEMORY_ACCESS;
            };
            c.data_mut()
                .stream
                .properties
                .insert(property_path(&path), value);
            OK
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_shared_data",
        |mut c: C, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> i32 {
            // The key is read where it lies, and the value copied through a buffer the VM
            // keeps: a counter update allocates nothing on the host.
            let Some(m) = memory(&mut c) else {
                return INVALID_MEMORY_ACCESS;
            };
            let mut value = std::mem::take(&mut c.data_mut().scratch);
            let found = match slice(m.data(&c), kp, kl) {
                Some(key) => c
                    .data()
                    .shared
                    .get_into(&String::from_utf8_lossy(key), &mut value)
                    .ok_or(NOT_FOUND),
                None => Err(INVALID_MEMORY_ACCESS),
            };
            let status = match found {
                Ok(cas) => {
                    if give(&mut c, &value, ret_ptr, ret_size) != OK
                        || !write_u32(&mut c, ret_cas, cas)
                    {
                        INVALID_MEMORY_ACCESS
                    } else {
                        OK
                    }
                }
                Err(status) => status,
            };
            c.data_mut().scratch = value;
            status
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_shared_data",
        |mut c: C, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            let Some(m) = memory(&mut c) else {
                return INVALID_MEMORY_ACCESS;
            };
            let memory = m.data(&c);
            let (Some(key), Some(value)) = (slice(memory, kp, kl), slice(memory, vp, vl)) else {
                return INVALID_MEMORY_ACCESS;
            };
            if c.data()
                .shared
                .set(&String::from_utf8_lossy(key), value, cas as u32)
            {
                OK
            } else {
                CAS_MISMATCH
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_register_shared_queue",
        |mut c: C, np: i32, nl: i32, ret: i32| -> i32 {
            let Some(name) = read_str(&mut c, np, nl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let id = {
                let mut q = lock(&c.data().shared.queues);
                match q.iter().position(|(n, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        q.push((name, VecDeque::new()));
                        q.len() - 1
                    }
                }
            };
            if write_u32(&mut c, ret, id as u32) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_resolve_shared_queue",
        |mut c: C, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| -> i32 {
            let Some(name) = read_str(&mut c, np, nl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let id = lock(&c.data().shared.queues)
                .iter()
                .position(|(n, _)| *n == name);
            match id {
                Some(id) => {
                    if write_u32(&mut c, ret, id as u32) {
                        OK
                    } else {
                        INVALID_MEMORY_ACCESS
                    }
                }
                None => NOT_FOUND,
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_enqueue_shared_queue",
        |mut c: C, id: i32, vp: i32, vl: i32| -> i32 {
            let Some(value) = read(&mut c, vp, vl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let mut q = lock(&c.data().shared.queues);
            match q.get_mut(id as usize) {
                Some((_, items)) => {
                    items.push_back(value);
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_dequeue_shared_queue",
        |mut c: C, id: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let item = {
                let mut q = lock(&c.data().shared.queues);
                match q.get_mut(id as usize) {
                    Some((_, items)) => items.pop_front(),
                    None => return NOT_FOUND,
                }
            };
            match item {
                Some(v) => give(&mut c, &v, ret_ptr, ret_size),
                None => EMPTY,
            }
        },
    )?;
    l.func_wrap(env, "proxy_continue_stream", |mut c: C, kind: i32| -> i32 {
        // 0: the request (ABI 0.2.1's stream types).
        if kind == 0 {
            c.data_mut().stream.request_resumed = true;
        }
        OK
    })?;
    l.func_wrap(env, "proxy_close_stream", |_: C, _kind: i32| -> i32 { OK })?;
    l.func_wrap(
        env,
        "proxy_send_local_response",
        |mut c: C,
         status: i32,
         _dp: i32,
         _dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            let Some(body) = read(&mut c, bp, bl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let headers = match read_map(&mut c, hp, hl) {
                Ok(h) => h,
                Err(status) => return status,
            };
            c.data_mut().stream.local_reply = Some(LocalReply {
                status: status as u16,
                headers,
                body,
            });
            OK
        },
    )?;
    l.func_wrap(
        env,
        "proxy_http_call",
        |mut c: C,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         _tp: i32,
         _tl: i32,
         timeout: i32,
         ret: i32|
         -> i32 {
            let (Some(cluster), Some(body)) = (read_str(&mut c, up, ul), read(&mut c, bp, bl))
            else {
                return INVALID_MEMORY_ACCESS;
            };
            let headers = match read_map(&mut c, hp, hl) {
                Ok(h) => h,
                Err(status) => return status,
            };
            dispatch(
                &mut c,
                CalloutKind::Http,
                cluster,
                headers,
                body,
                timeout,
                ret,
            )
        },
    )?;
    // gRPC: unary calls are answered by the responder; streams are not offered.
    l.func_wrap(
        env,
        "proxy_grpc_call",
        |mut c: C,
         up: i32,
         ul: i32,
         sp: i32,
         sl: i32,
         mp: i32,
         ml: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         timeout: i32,
         ret: i32|
         -> i32 {
            let (Some(cluster), Some(service), Some(method), Some(body)) = (
                read_str(&mut c, up, ul),
                read_str(&mut c, sp, sl),
                read_str(&mut c, mp, ml),
                read(&mut c, bp, bl),
            ) else {
                return INVALID_MEMORY_ACCESS;
            };
            let headers = match read_map(&mut c, hp, hl) {
                Ok(h) => h,
                Err(status) => return status,
            };
            let cluster = grpc_cluster(&cluster);
            dispatch(
                &mut c,
                CalloutKind::Grpc { service, method },
                cluster,
                headers,
                body,
                timeout,
                ret,
            )
        },
    )?;
    l.func_wrap(
        env,
        "proxy_grpc_stream",
        |_: C,
         _a: i32,
         _b: i32,
         _c: i32,
         _d: i32,
         _e: i32,
         _f: i32,
         _g: i32,
         _h: i32,
         _ret: i32|
         -> i32 { INTERNAL_FAILURE },
    )?;
    l.func_wrap(
        env,
        "proxy_grpc_send",
        |_: C, _t: i32, _p: i32, _l: i32, _e: i32| -> i32 { NOT_FOUND },
    )?;
    // Cancelling or closing a pending call drops it: its answer is never delivered.
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        l.func_wrap(env, name, |mut c: C, token: i32| -> i32 {
            let callouts = &mut c.data_mut().callouts;
            let before = callouts.len();
            callouts.retain(|x| !(x.token == token as u32 && x.kind != CalloutKind::Http));
            if callouts.len() < before {
                OK
            } else {
                NOT_FOUND
            }
        })?;
    }
    l.func_wrap(
        env,
        "proxy_get_status",
        |mut c: C, code: i32, _mp: i32, ms: i32| -> i32 {
            let status = c.data().grpc_status;
            if write_u32(&mut c, code, status) && write_u32(&mut c, ms, 0) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_set_effective_context",
        |mut c: C, id: i32| -> i32 {
            c.data_mut().effective = id as u32;
            OK
        },
    )?;
    l.func_wrap(env, "proxy_done", |_: C| -> i32 { OK })?;
    // Foreign functions: none here, as in an Envoy without them registered.
    l.func_wrap(
        env,
        "proxy_call_foreign_function",
        |_: C, _np: i32, _nl: i32, _ap: i32, _al: i32, _rp: i32, _rs: i32| -> i32 { NOT_FOUND },
    )?;
    l.func_wrap(
        env,
        "proxy_define_metric",
        |mut c: C, _kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
            let Some(name) = read_str(&mut c, np, nl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let index = {
                let mut m = lock(&c.data().shared.metrics);
                match m.iter().position(|(n, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        m.push((name, 0));
                        m.len() - 1
                    }
                }
            };
            c.data_mut().metric_ids.insert(index as u32, index);
            if write_u32(&mut c, ret, index as u32) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        env,
        "proxy_increment_metric",
        |c: C, id: i32, offset: i64| -> i32 {
            c.data()
                .shared
                .metric(id, |v| *v += offset)
                .map_or(NOT_FOUND, |_| OK)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_record_metric",
        |c: C, id: i32, value: i64| -> i32 {
            c.data()
                .shared
                .metric(id, |v| *v = value)
                .map_or(NOT_FOUND, |_| OK)
        },
    )?;
    l.func_wrap(
        env,
        "proxy_get_metric",
        |mut c: C, id: i32, ret: i32| -> i32 {
            match c.data().shared.metric(id, |v| *v) {
                Some(v) if write(&mut c, ret, &v.to_le_bytes()) => OK,
                Some(_) => INVALID_MEMORY_ACCESS,
                None => NOT_FOUND,
            }
        },
    )?;

    // WASI preview1, as Rust guests import it. Errno 0 is success.
    let wasi = "wasi_snapshot_preview1";
    l.func_wrap(
        wasi,
        "fd_write",
        |mut c: C, fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
            let mut total = 0u32;
            let mut text = Vec::new();
            for i in 0..n.max(0) {
                let Some(iov) = read(&mut c, iovs + i * 8, 8) else {
                    return 21;
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Some(bytes) = read(&mut c, ptr, len) else {
                    return 21;
                };
                total += bytes.len() as u32;
                text.extend(bytes);
            }
            if fd == 1 || fd == 2 {
                c.data_mut().logs.push((
                    if fd == 2 { 4 } else { 2 },
                    String::from_utf8_lossy(&text).trim_end().to_string(),
                ));
            }
            if write_u32(&mut c, written, total) {
                0
            } else {
                21
            }
        },
    )?;
    l.func_wrap(
        wasi,
        "clock_time_get",
        |mut c: C, _clock: i32, _precision: i64, ret: i32| -> i32 {
            let now = c.data().now_ns;
            if write(&mut c, ret, &now.to_le_bytes()) {
                0
            } else {
                21
            }
        },
    )?;
    l.func_wrap(wasi, "random_get", |mut c: C, ptr: i32, len: i32| -> i32 {
        // Deterministic (xorshift), so replays are repeatable.
        let mut bytes = Vec::with_capacity(len.max(0) as usize);
        let mut x = c.data().random;
        for _ in 0..len.max(0) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        c.data_mut().random = x;
        if write(&mut c, ptr, &bytes) {
            0
        } else {
            21
        }
    })?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(wasi, name, |mut c: C, count: i32, size: i32| -> i32 {
            if write_u32(&mut c, count, 0) && write_u32(&mut c, size, 0) {
                0
            } else {
                21
            }
        })?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(wasi, name, |_: C, _a: i32, _b: i32| -> i32 { 0 })?;
    }
    l.func_wrap(
        wasi,
        "proc_exit",
        |_: C, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the guest called proc_exit({code})"
            )))
        },
    )?;
    l.func_wrap(wasi, "sched_yield", |_: C| -> i32 { 0 })?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip() {
        let pairs = vec![
            (":path".to_string(), "/a?b".to_string()),
            ("x-empty".into(), String::new()),
            ("k".into(), "ü".into()),
        ];
        assert_eq!(deserialize_map(&serialize_map(&pairs)), Some(pairs));
        assert_eq!(deserialize_map(&[]), Some(vec![]));
        assert_eq!(deserialize_map(&[9, 0, 0, 0]), None);
        // A count far beyond the bytes given is refused before anything is allocated.
        assert_eq!(deserialize_map(&[0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0]), None);
    }

    #[test]
    fn shared_data_cas_as_envoy_does() {
        let s = Shared::default();
        assert!(s.set("k", b"1", 0)); // a new key
        let (_, cas) = s.get("k").unwrap();
        assert!(!s.set("k", b"2", cas + 1)); // mismatch
        assert!(s.set("k", b"2", cas));
        assert!(s.set("k", b"3", 0)); // cas 0: unconditional
        assert_eq!(s.get("k").unwrap().0, b"3");
        assert!(s.set("new", b"x", 12345)); // a missing key ignores cas, as in Envoy
    }

    #[test]
    fn shared_data_is_read_into_a_kept_buffer_whole_and_alone() {
        let s = Shared::default();
        assert!(s.set("k", b"a longer value", 0));
        assert!(s.set("k", b"short", 0)); // rewritten in place: nothing of the old is left
        let mut out = b"what the buffer held".to_vec();
        let cas = s.get_into("k", &mut out).unwrap();
        assert_eq!(out, b"short");
        assert_eq!(s.get("k"), Some((b"short".to_vec(), cas)));
        assert_eq!(s.get_into("missing", &mut out), None);
    }
}
