//! `apim-edge`: replay recorded traffic through the engine, check and seal snapshots, and
//! generate synthetic catalogs. Exit codes: 0 fine, 1 a `--check` mismatch, 2 unusable input.

use anyhow::{anyhow, Context};
use apim_edge_harness::callouts::CalloutRules;
use apim_edge_harness::counters::CounterForwarder;
use apim_edge_harness::envoy::COUNTERS_CLUSTER;
use apim_edge_harness::host::{Answer, Callout, Plugin};
use apim_edge_harness::profile::Profile;
use apim_edge_harness::replay::{mismatches, replay_one};
use apim_edge_harness::{bench, synth, trace, wasm_replay};
use apim_edge_policies::{
    parse_rfc3339, Catalog, FilterConfig, LoadOptions, MemoryStore, UnsupportedPolicies,
};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `println!` that stops quietly when standard output is gone (`apim-edge check | head`)
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that stops quietly when standard output is gone.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "apim-edge",
    version,
    about = "Azure API Management products at the edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UsageFormat {
    Json,
    Csv,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace and print one JSON decision per request.
    Replay {
        #[command(flatten)]
        traffic: Traffic,
        /// Run the filter's .wasm in the wasmtime host instead of the native engine.
        #[arg(long)]
        wasm: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// With --wasm: run each worker VM on a thread of its own (as Envoy's workers run).
        #[arg(long)]
        parallel: bool,
        /// With --wasm: replay natively too, and print every request where the two differ.
        #[arg(long)]
        diff: bool,
        /// Compare each result with the trace's `expect`; exit 1 on any mismatch.
        #[arg(long)]
        check: bool,
        /// With a HAR trace: each entry's recorded response status is its expectation (implies
        /// --check).
        #[arg(long)]
        expect_recorded: bool,
        /// With --wasm: the proxy has cluster CLUSTER (repeatable). Its callouts are answered
        /// with 200 (gRPC: OK) and FILE's bytes, or forwarded to the HTTP/1.1 or gRPC server at
        /// HOST:PORT. A callout to a cluster neither this nor --counters names fails at
        /// dispatch (BadArgument), as to a cluster Envoy does not have. `@20ms` after it: the
        /// answers arrive that long after the dispatch (virtual time), or fail at the callout's
        /// timeout when that is sooner.
        #[arg(long, value_name = "CLUSTER=FILE|HOST:PORT[@MSms]")]
        callout: Vec<String>,
        /// With --wasm: FILE's bytes, as they are, are the plugin configuration (instead of
        /// --config and --snapshot): for filters other than apim-edge.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "snapshot"])]
        plugin_config: Option<PathBuf>,
        /// With --wasm: FILE's bytes are the VM configuration (Envoy's
        /// `vm_config.configuration`).
        #[arg(long, value_name = "FILE")]
        vm_config: Option<PathBuf>,
        /// With --wasm: the plugin's root id (Envoy's `root_id`; default apim-edge).
        #[arg(long)]
        root_id: Option<String>,
        /// With --wasm: after the VM fails (a trap, a panic), requests go upstream without the
        /// filter, as with Envoy's `failure_policy: FAIL_OPEN`; without it they get 503.
        #[arg(long)]
        fail_open: bool,
        /// With --wasm: the filter's counter-service callouts go to apim-edge-counters at
        /// HOST:PORT (SPEC §7), so that replays in several processes share one Redis. Adds
        /// `counters` (cluster apim-counters) to the configuration when it has none.
        #[arg(long, value_name = "HOST:PORT")]
        counters: Option<String>,
        /// `json` (one object per request, SPEC §6) or `table` (for people).
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// With --wasm: print the filter's log lines of this level and above on standard
        /// error, each with the request it came from.
        #[arg(long, value_enum)]
        log_level: Option<LogLevel>,
        /// With --wasm: the runtime the host behaves as: `envoy`, or `service-extensions`
        /// (Google's CDN edge runtime: no shared data, timers, metrics or callouts, 16 MiB of
        /// memory and about 1 ms of CPU per callback; what the VMs used goes to stderr).
        #[arg(long, default_value = "envoy", value_name = "PROFILE")]
        host_profile: Profile,
        /// With --wasm: count the filter's calls into the host, and print per callback how
        /// many it made, and of which functions, on standard error.
        #[arg(long)]
        host_calls: bool,
        /// Also write one usage record per call (SPEC §8) to FILE, as JSON Lines.
        #[arg(long, value_name = "FILE")]
        usage_out: Option<PathBuf>,
    },
    /// Aggregate usage records (from `replay --usage-out`, or Envoy's access log) into the
    /// rows of APIM's reports: calls succeeded (2xx, 3xx), blocked (401, 403, 429), failed
    /// (other 4xx, 5xx), other, and bandwidth (bytes in and out).
    Usage {
        /// Files of usage records, JSON Lines.
        #[arg(long, num_args = 1.., required = true, value_name = "FILE")]
        records: Vec<PathBuf>,
        /// What each row is: APIM's reports/bySubscription, byProduct, byApi, byOperation.
        #[arg(long, value_enum, default_value = "subscription")]
        by: apim_edge_harness::usage::By,
        /// Only calls at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only calls before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Rows per interval too (byTime): an ISO 8601 duration such as PT15M, PT1H, P1D.
        #[arg(long)]
        interval: Option<String>,
        /// `json` (APIM's `{"value": [...], "count": N}`) or `csv`.
        #[arg(long, value_enum, default_value = "json")]
        format: UsageFormat,
        /// A line that is not a usage record is an error (exit 2), not skipped.
        #[arg(long)]
        strict: bool,
    },
    /// Per-request latency (p50 ... max) and requests/s of the native engine and of the .wasm,
    /// one worker each, over a trace replayed in a loop; and their ratio.
    Bench {
        #[command(flatten)]
        traffic: Traffic,
        /// The filter's .wasm, run in the wasmtime host beside the native engine.
        #[arg(long)]
        wasm: Option<PathBuf>,
        /// Requests timed on each side (the trace repeats, shifted later in time each pass).
        #[arg(long, default_value_t = 200_000)]
        requests: usize,
        /// Untimed requests first, on each side.
        #[arg(long, default_value_t = 10_000)]
        warmup: usize,
    },
    /// Validate a snapshot and print a summary, or every error.
    Check {
        snapshot: PathBuf,
        /// Skip policy elements outside the edge subset instead of refusing them.
        #[arg(long)]
        skip_unsupported: bool,
    },
    /// Replace every plain subscription key of a snapshot by its SHA-256 digest.
    Seal { input: PathBuf, output: PathBuf },
    /// Write a ready Envoy bootstrap with the filter (JSON, which Envoy reads as YAML).
    EnvoyConfig {
        /// The snapshot to put inline in the filter configuration.
        #[arg(long, required_unless_present = "snapshot_source")]
        snapshot: Option<PathBuf>,
        /// HOST:PORT serving the snapshot at /snapshot.json (a cluster apim-config), refreshed.
        #[arg(long)]
        snapshot_source: Option<String>,
        #[arg(long, default_value = "127.0.0.1:8081")]
        upstream: String,
        #[arg(long, default_value_t = 8080)]
        listen: u16,
        #[arg(long, default_value_t = 9901)]
        admin: u16,
        /// Envoy's worker threads (a flag of Envoy's: printed in the command to run).
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Workers with the same VM id share counters.
        #[arg(long, default_value = "apim-edge")]
        vm_id: String,
        #[arg(
            long,
            default_value = "target/wasm32-wasip1/release/apim_edge_filter.wasm"
        )]
        wasm: PathBuf,
        /// A file for the access log (default: standard output).
        #[arg(long)]
        access_log: Option<PathBuf>,
        /// Also write a usage record (SPEC §8) per call to FILE, JSON Lines
        /// (`apim-edge usage --records FILE` reads them).
        #[arg(long, value_name = "FILE")]
        usage_log: Option<PathBuf>,
        /// IP:PORT of the counter service (apim-edge-counters), so that a fleet shares its
        /// counters: writes the cluster apim-counters (HTTP/2) and the filter's `counters`
        /// (onUnavailable, timeoutMs from --config when it sets them).
        #[arg(long)]
        counters: Option<String>,
        /// More filter settings (JSON): failureMode, unsupportedPolicies, stripSubscriptionKey
        /// (true unless this file sets it), identityHeaders.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the bootstrap (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a synthetic catalog (JSON) to stdout, for benchmarks.
    Synth {
        #[arg(long, default_value_t = 1000)]
        subscriptions: usize,
        #[arg(long, default_value_t = 10)]
        apis: usize,
        #[arg(long, default_value_t = 5)]
        products: usize,
        /// Also write a trace of this many keyed calls, rotating over the subscriptions.
        #[arg(long, requires = "trace_out")]
        calls: Option<usize>,
        /// Where to write that trace (JSON Lines).
        #[arg(long, requires = "calls")]
        trace_out: Option<PathBuf>,
    },
}

/// The catalog and the recorded traffic that `replay` and `bench` run.
#[derive(clap::Args)]
struct Traffic {
    /// The catalog (SPEC §2); optional for `replay --wasm` with `--plugin-config`.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    #[arg(long)]
    trace: PathBuf,
    /// A filter configuration (JSON): unsupportedPolicies and failureMode here, all of it in
    /// the .wasm.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The origin of relative `t` times.
    #[arg(long, default_value = trace::DEFAULT_START)]
    start: String,
}

/// Traffic, loaded.
struct Loaded {
    /// The filter's plugin configuration: `--config` with the snapshot inline.
    plugin: String,
    catalog: Catalog,
    entries: Vec<trace::Entry>,
}

impl Traffic {
    /// The snapshot and the trace (`--snapshot` is required here).
    fn load(&self, expect_recorded: bool) -> Result<Loaded, Unusable> {
        let Some(snapshot) = &self.snapshot else {
            return Err(Unusable(anyhow!(
                "--snapshot is needed (without it, only `replay --wasm --plugin-config` runs)"
            )));
        };
        let (plugin, mut cfg) = plugin_config(self.config.as_deref(), snapshot)?;
        let doc = cfg.snapshot.take().unwrap_or_default();
        let catalog = Catalog::load(&doc, cfg.load_options()).map_err(|e| {
            Unusable(anyhow!(
                "{}: the snapshot does not load:\n{e}",
                snapshot.display()
            ))
        })?;
        let entries = self.entries(expect_recorded)?;
        Ok(Loaded {
            plugin,
            catalog,
            entries,
        })
    }

    /// The trace alone.
    fn entries(&self, expect_recorded: bool) -> Result<Vec<trace::Entry>, Unusable> {
        let start = parse_rfc3339(&self.start)
            .ok_or_else(|| Unusable(anyhow!("--start: not an RFC 3339 time: {}", self.start)))?;
        trace::read(&read(&self.trace)?, start, expect_recorded)
            .map_err(|e| Unusable(anyhow!("{}: {e:#}", self.trace.display())))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Json,
    Table,
}

/// proxy-wasm's log levels, in their order.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// Input that cannot be used: exit 2.
struct Unusable(anyhow::Error);

fn read(path: &Path) -> Result<String, Unusable> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))
        .map_err(Unusable)
}

/// A filter configuration file (`--config`) as JSON, `{}` without one.
fn config_document(path: Option<&Path>) -> Result<serde_json::Value, Unusable> {
    let Some(path) = path else {
        return Ok(serde_json::json!({}));
    };
    let v: serde_json::Value = serde_json::from_str(&read(path)?)
        .with_context(|| format!("{}: not valid JSON", path.display()))
        .map_err(Unusable)?;
    if !v.is_object() {
        return Err(Unusable(anyhow!(
            "{}: expected a JSON object (the filter configuration)",
            path.display()
        )));
    }
    Ok(v)
}

/// Reads a complete plugin configuration with the engine's parser, as the filter does.
fn parse_config(text: &str, path: Option<&Path>) -> Result<FilterConfig, Unusable> {
    FilterConfig::parse(text.as_bytes()).map_err(|e| {
        let name = path.map_or("(configuration)".into(), |p| p.display().to_string());
        Unusable(anyhow!("{name}: {e}"))
    })
}

/// The filter's plugin configuration: `--config` (or `{}`) with the snapshot put inline, as
/// text for the `.wasm` and read for the native engine.
fn plugin_config(
    config: Option<&Path>,
    snapshot: &Path,
) -> Result<(String, FilterConfig), Unusable> {
    let mut plugin = config_document(config)?;
    plugin["snapshot"] = serde_json::from_str(&read(snapshot)?)
        .with_context(|| format!("{}: not valid JSON", snapshot.display()))
        .map_err(Unusable)?;
    let text = plugin.to_string();
    let cfg = parse_config(&text, config)?;
    Ok((text, cfg))
}

fn load(path: &Path, unsupported: UnsupportedPolicies) -> Result<Catalog, Unusable> {
    let text = read(path)?;
    let options = LoadOptions {
        unsupported,
        ..LoadOptions::default()
    };
    Catalog::load_str(&text, options).map_err(|e| {
        Unusable(anyhow!(
            "{}: the snapshot does not load:\n{e}",
            path.display()
        ))
    })
}

/// The rules, and the counter service when `--counters` names one.
struct Responders {
    rules: CalloutRules,
    counters: Option<CounterForwarder>,
}

impl apim_edge_harness::host::Responder for Responders {
    fn answer(&self, c: &Callout) -> Option<Answer> {
        if let Some(answer) = self.counters.as_ref().and_then(|f| f.forward(c)) {
            return answer;
        }
        self.rules.answer(c)
    }

    fn latency(&self, c: &Callout) -> std::time::Duration {
        self.rules.latency(c)
    }
}

/// The filter configuration with `counters` (cluster apim-counters) when it has none.
fn with_shared_counters(plugin: &str) -> Result<String, Unusable> {
    let mut doc: serde_json::Value = serde_json::from_str(plugin)
        .context("the filter configuration")
        .map_err(Unusable)?;
    if doc.get("counters").is_none_or(serde_json::Value::is_null) {
        doc["counters"] = serde_json::json!({"cluster": COUNTERS_CLUSTER});
    }
    Ok(doc.to_string())
}

/// The clusters a replay's proxy has, as Envoy would: those `--callout` answers, and the
/// configuration's counter service when `--counters` reaches one. A callout to another fails
/// at dispatch.
fn clusters(rules: &CalloutRules, counters: bool, plugin: &str) -> Vec<String> {
    let mut clusters: Vec<String> = rules.clusters().map(str::to_string).collect();
    if counters {
        let config: serde_json::Value = serde_json::from_str(plugin).unwrap_or_default();
        let cluster = config["counters"]["cluster"]
            .as_str()
            .unwrap_or(COUNTERS_CLUSTER);
        clusters.push(cluster.to_string());
    }
    clusters
}

/// A progress bar on standard error for long replays, drawn only on a terminal.
fn progress_bar(len: usize) -> ProgressBar {
    use std::io::IsTerminal;
    if len < 10_000 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {per_sec}, {eta} left")
    {
        bar.set_style(style);
    }
    bar
}

fn run(cli: Cli) -> Result<ExitCode, Unusable> {
    match cli.command {
        Command::Replay {
            traffic,
            wasm,
            workers,
            check,
            format,
            parallel,
            diff,
            expect_recorded,
            callout,
            counters,
            log_level,
            plugin_config,
            vm_config,
            root_id,
            fail_open,
            host_profile,
            host_calls,
            usage_out,
        } => {
            if wasm.is_none()
                && (workers != 1
                    || host_calls
                    || parallel
                    || diff
                    || !callout.is_empty()
                    || counters.is_some()
                    || log_level.is_some()
                    || plugin_config.is_some()
                    || vm_config.is_some()
                    || root_id.is_some()
                    || fail_open
                    || host_profile != Profile::Envoy)
            {
                return Err(Unusable(anyhow!(
                    "--workers, --parallel, --diff, --callout, --counters, --log-level, --plugin-config, --vm-config, --root-id, --fail-open, --host-profile and --host-calls need --wasm"
                )));
            }
            if plugin_config.is_some() && (diff || counters.is_some()) {
                return Err(Unusable(anyhow!(
                    "--diff and --counters need apim-edge's configuration (--snapshot), not --plugin-config"
                )));
            }
            let check = check || expect_recorded;
            let rules = Responders {
                rules: CalloutRules::parse(&callout).map_err(Unusable)?,
                counters: counters
                    .as_deref()
                    .map(CounterForwarder::new)
                    .transpose()
                    .map_err(Unusable)?,
            };
            // apim-edge's catalog and configuration, or another filter's raw configuration.
            let (mut plugin, catalog, entries) = match &plugin_config {
                None => {
                    let Loaded {
                        plugin,
                        catalog,
                        entries,
                    } = traffic.load(expect_recorded)?;
                    (plugin.into_bytes(), Some(catalog), entries)
                }
                Some(path) => {
                    let bytes = std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))
                        .map_err(Unusable)?;
                    (bytes, None, traffic.entries(expect_recorded)?)
                }
            };
            if counters.is_some() {
                plugin = with_shared_counters(&String::from_utf8_lossy(&plugin))?.into_bytes();
            }
            let store = MemoryStore::new();
            let runs = if wasm.is_some() && diff { 2 } else { 1 };
            let progress = progress_bar(entries.len() * runs);
            let native: Vec<_> = match &catalog {
                Some(catalog) => entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        progress.inc(1);
                        replay_one(catalog, &store, i, e)
                    })
                    .collect(),
                None => Vec::new(),
            };
            let records = match &wasm {
                None => native.clone(),
                Some(path) => {
                    let mut identity = Plugin {
                        fail_open,
                        ..Plugin::default()
                    };
                    if let Some(id) = root_id {
                        identity.root_id = id;
                    }
                    if let Some(path) = &vm_config {
                        identity.vm_config = std::fs::read(path)
                            .with_context(|| format!("cannot read {}", path.display()))
                            .map_err(Unusable)?;
                    }
                    let mut host = apim_edge_harness::host::Host::load_as(path, host_profile)
                        .map_err(Unusable)?;
                    if host_calls {
                        host = host.counting_host_calls();
                    }
                    let host = host.with_plugin(identity).with_clusters(clusters(
                        &rules.rules,
                        counters.is_some(),
                        &String::from_utf8_lossy(&plugin),
                    ));
                    let options = wasm_replay::Options {
                        workers,
                        parallel,
                        responder: &rules,
                        progress: &progress,
                        log_level: log_level.map(|l| l as i32),
                    };
                    wasm_replay::replay(&host, &plugin, &entries, &options).map_err(Unusable)?
                }
            };
            progress.finish_and_clear();
            if let Some(path) = &usage_out {
                let mut text = String::new();
                for (e, r) in entries.iter().zip(&records) {
                    let record = apim_edge_harness::usage::UsageRecord::of(e, r);
                    text.push_str(&serde_json::to_string(&record).map_err(|e| Unusable(e.into()))?);
                    text.push('\n');
                }
                std::fs::write(path, text)
                    .with_context(|| format!("cannot write {}", path.display()))
                    .map_err(Unusable)?;
            }
            if diff {
                let mut differ = 0;
                for (n, w) in native.iter().zip(&records) {
                    if n != w {
                        differ += 1;
                        outln!(
                            "request {}:\n  native {}\n  wasm   {}",
                            n.index,
                            serde_json::to_string(n).unwrap_or_default(),
                            serde_json::to_string(w).unwrap_or_default()
                        );
                    }
                }
                eprintln!("diff: {} requests, {differ} differ", records.len());
                return Ok(if differ > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                });
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut failed = 0;
            if format == Format::Table {
                let _ = writeln!(
                    out,
                    "{:>4}  {:<44} {:>6}  {:<20} {:<10} subscription",
                    "#", "request", "status", "outcome", "product"
                );
            }
            for (i, (e, record)) in entries.iter().zip(records).enumerate() {
                if format == Format::Table {
                    let mut request = format!("{} {}", e.method, e.path);
                    if request.len() > 44 {
                        request.truncate(41);
                        request.push_str("...");
                    }
                    let _ = writeln!(
                        out,
                        "{:>4}  {:<44} {:>6}  {:<20} {:<10} {}",
                        i,
                        request,
                        record.status,
                        record.outcome,
                        record.product.as_deref().unwrap_or("-"),
                        record.subscription.as_deref().unwrap_or("-")
                    );
                } else {
                    let line = serde_json::to_string(&record).map_err(|e| Unusable(e.into()))?;
                    let _ = writeln!(out, "{line}");
                }
                if check {
                    if let Some(expect) = &e.expect {
                        let wrong = mismatches(&record, expect);
                        if !wrong.is_empty() {
                            failed += 1;
                            let _ = out.flush();
                            eprintln!(
                                "mismatch at request {i} ({} {}): {}",
                                e.method,
                                e.path,
                                wrong.join("; ")
                            );
                        }
                    }
                }
            }
            let _ = out.flush();
            if check {
                eprintln!("check: {} requests, {} mismatched", entries.len(), failed);
            }
            Ok(if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Usage {
            records,
            by,
            from,
            to,
            interval,
            format,
            strict,
        } => {
            use apim_edge_harness::usage;
            let window = usage::Window {
                from: from
                    .as_deref()
                    .map(|t| usage::instant("--from", t))
                    .transpose()
                    .map_err(Unusable)?,
                to: to
                    .as_deref()
                    .map(|t| usage::instant("--to", t))
                    .transpose()
                    .map_err(Unusable)?,
                interval: interval
                    .map(|t| usage::parse_interval(&t).map(|ms| (t, ms)))
                    .transpose()
                    .map_err(Unusable)?,
            };
            usage::check_window(&window).map_err(Unusable)?;
            let mut aggregate = usage::Aggregate::new(by, window);
            let skipped = usage::read_into(&records, &mut aggregate, strict).map_err(Unusable)?;
            if skipped > 0 {
                eprintln!("usage: {skipped} lines skipped (not usage records)");
            }
            let rows = aggregate.rows();
            match format {
                UsageFormat::Json => {
                    let doc = usage::Report {
                        count: rows.len(),
                        value: rows,
                    };
                    let text =
                        serde_json::to_string_pretty(&doc).map_err(|e| Unusable(e.into()))?;
                    println!("{text}");
                }
                UsageFormat::Csv => print!("{}", usage::csv(&rows)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            traffic,
            wasm,
            requests,
            warmup,
        } => {
            let Loaded {
                plugin,
                catalog,
                entries,
            } = traffic.load(false)?;
            if entries.is_empty() || requests == 0 {
                return Err(Unusable(anyhow!(
                    "nothing to measure: the trace and --requests must not be empty"
                )));
            }
            eprintln!(
                "bench: {requests} requests per side (after {warmup} untimed) from {} ({} distinct), one worker",
                traffic.trace.display(),
                entries.len()
            );
            let native = bench::native(&catalog, &entries, requests, warmup).map_err(Unusable)?;
            let measured_wasm = match &wasm {
                None => None,
                Some(path) => {
                    let host = apim_edge_harness::host::Host::load(path).map_err(Unusable)?;
                    Some(
                        bench::wasm(&host, plugin.as_bytes(), &entries, requests, warmup)
                            .map_err(Unusable)?,
                    )
                }
            };
            out!("{}", bench::report(&native, measured_wasm.as_ref()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            snapshot,
            skip_unsupported,
        } => {
            let mode = if skip_unsupported {
                UnsupportedPolicies::Skip
            } else {
                UnsupportedPolicies::Reject
            };
            let catalog = load(&snapshot, mode)?;
            let s = catalog.summary();
            outln!("snapshot {}: loads", snapshot.display());
            outln!("  service        {}", s.service);
            outln!("  apis           {} ({} operations)", s.apis, s.operations);
            outln!(
                "  products       {} ({} without subscriptions)",
                s.products,
                s.open_products
            );
            outln!(
                "  subscriptions  {} ({} active, {} keys)",
                s.subscriptions,
                s.active_subscriptions,
                s.keys
            );
            outln!(
                "  policies       {} documents, {} steps, {} effective programs",
                s.policy_documents,
                s.steps,
                s.programs
            );
            for (scope, elements) in catalog.policy_usage() {
                outln!("    {scope}: {}", elements.join(", "));
            }
            outln!("  warnings       {}", catalog.warnings().len());
            for w in catalog.warnings() {
                outln!("    {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Seal { input, output } => {
            let text = read(&input)?;
            let mut doc: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", input.display()))
                .map_err(Unusable)?;
            let sealed = apim_edge_policies::seal(&mut doc);
            Catalog::load(
                &doc,
                LoadOptions {
                    unsupported: UnsupportedPolicies::Skip,
                    ..LoadOptions::default()
                },
            )
            .map_err(|e| {
                Unusable(anyhow!(
                    "{}: the snapshot does not load:\n{e}",
                    input.display()
                ))
            })?;
            let text = serde_json::to_string_pretty(&doc).map_err(|e| Unusable(e.into()))?;
            std::fs::write(&output, text + "\n")
                .with_context(|| format!("cannot write {}", output.display()))
                .map_err(Unusable)?;
            eprintln!("sealed {sealed} keys into {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::EnvoyConfig {
            snapshot,
            snapshot_source,
            upstream,
            listen,
            admin,
            concurrency,
            vm_id,
            wasm,
            access_log,
            usage_log,
            counters,
            config,
            out,
        } => {
            let host_port = |text: &str, what: &str| -> Result<(String, u16), Unusable> {
                let (h, p) = text
                    .rsplit_once(':')
                    .and_then(|(h, p)| {
                        Some((h.parse::<std::net::IpAddr>().ok()?, p.parse::<u16>().ok()?))
                    })
                    .ok_or_else(|| Unusable(anyhow!("{what}: expected IP:PORT, not {text:?}")))?;
                Ok((h.to_string(), p))
            };
            let mut filter_config = config_document(config.as_deref())?;
            // Keys are stripped before the upstream unless the configuration says otherwise.
            if filter_config.get("stripSubscriptionKey").is_none() {
                filter_config["stripSubscriptionKey"] = serde_json::Value::Bool(true);
            }
            let doc = match &snapshot {
                Some(path) => {
                    let doc: serde_json::Value = serde_json::from_str(&read(path)?)
                        .with_context(|| format!("{}: not valid JSON", path.display()))
                        .map_err(Unusable)?;
                    filter_config["snapshot"] = doc.clone();
                    Some(doc)
                }
                None => None,
            };
            let config_server = match &snapshot_source {
                Some(s) => {
                    filter_config["snapshotSource"] = serde_json::json!({"cluster": "apim-config", "authority": s, "path": "/snapshot.json", "refreshSeconds": 10});
                    Some(host_port(s, "--snapshot-source")?)
                }
                None => None,
            };
            let counters = match &counters {
                Some(s) => {
                    let set = filter_config
                        .get("counters")
                        .cloned()
                        .filter(serde_json::Value::is_object)
                        .unwrap_or_else(|| serde_json::json!({}));
                    let mut c = set;
                    c["cluster"] = COUNTERS_CLUSTER.into();
                    c["authority"] = COUNTERS_CLUSTER.into();
                    filter_config["counters"] = c;
                    Some(host_port(s, "--counters")?)
                }
                None => None,
            };
            let cfg = parse_config(&filter_config.to_string(), config.as_deref())?;
            if let (Some(doc), Some(path)) = (&doc, &snapshot) {
                Catalog::load(doc, cfg.load_options()).map_err(|e| {
                    Unusable(anyhow!(
                        "{}: the snapshot does not load:\n{e}",
                        path.display()
                    ))
                })?;
            }
            let wasm = std::path::absolute(&wasm).unwrap_or(wasm);
            let boot = apim_edge_harness::envoy::Bootstrap {
                listen,
                admin,
                upstream: host_port(&upstream, "--upstream")?,
                wasm: wasm.clone(),
                filter_config,
                access_log,
                usage_log,
                vm_id,
                config_server,
                counters,
            };
            let text = serde_json::to_string_pretty(&boot.to_json())
                .map_err(|e| Unusable(e.into()))?
                + "\n";
            match &out {
                Some(path) => std::fs::write(path, text)
                    .with_context(|| format!("cannot write {}", path.display()))
                    .map_err(Unusable)?,
                None => out!("{text}"),
            }
            if !wasm.exists() {
                eprintln!("note: {} does not exist yet: cargo build --release --target wasm32-wasip1 -p apim-edge-filter", wasm.display());
            }
            eprintln!(
                "run: envoy -c {} --concurrency {concurrency}",
                out.as_deref()
                    .map_or("BOOTSTRAP".into(), |p| p.display().to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth {
            subscriptions,
            apis,
            products,
            calls,
            trace_out,
        } => {
            if apis == 0 || products == 0 {
                return Err(Unusable(anyhow!(
                    "--apis and --products must be at least 1"
                )));
            }
            let sizes = synth::Sizes {
                subscriptions,
                apis,
                products,
            };
            if let (Some(calls), Some(path)) = (calls, &trace_out) {
                if subscriptions == 0 {
                    return Err(Unusable(anyhow!(
                        "--calls needs --subscriptions of at least 1"
                    )));
                }
                std::fs::write(path, synth::trace(sizes, calls))
                    .with_context(|| format!("cannot write {}", path.display()))
                    .map_err(Unusable)?;
            }
            let doc = synth::catalog(sizes);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            serde_json::to_writer(&mut out, &doc).map_err(|e| Unusable(e.into()))?;
            let _ = writeln!(out);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(Unusable(e)) => {
            eprintln!("apim-edge: {e:#}");
            ExitCode::from(2)
        }
    }
}
