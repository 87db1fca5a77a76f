//! Usage records and reports (SPEC §8), the input of monetization: one record per call
//! (`replay --usage-out`), and records aggregated into the shape of APIM's management API
//! reports (`reports/bySubscription`, `byProduct`, `byApi`, `byOperation`, and with an interval
//! `byTime` within each), as `apim-edge usage` prints them.

use crate::replay::DecisionRecord;
use crate::trace::Entry;
use anyhow::{anyhow, bail, Context, Result};
use apim_edge_policies::{parse_rfc3339, Millis};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// One call, as billing needs it. Identifiers are ARM names; `null` when none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub api: Option<String>,
    pub operation: Option<String>,
    pub product: Option<String>,
    pub subscription: Option<String>,
    /// SPEC §4's outcome; `null` where the filter state does not hold it (`filterState`).
    pub outcome: Option<String>,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// An instant as RFC 3339 text in UTC with milliseconds: `2026-01-01T00:00:00.000Z`.
pub fn rfc3339(at: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

impl UsageRecord {
    /// The record of a replayed call: the request's bytes, and the response's: the upstream's
    /// for a call that went there, the gateway's own body for one it answered.
    pub fn of(entry: &Entry, decided: &DecisionRecord) -> Self {
        let upstream = decided.outcome == "allowed";
        UsageRecord {
            time: rfc3339(entry.at),
            api: decided.api.clone(),
            operation: decided.operation.clone(),
            product: decided.product.clone(),
            subscription: decided.subscription.clone(),
            outcome: Some(decided.outcome.to_string()),
            status: decided.status,
            request_bytes: entry.request_bytes,
            response_bytes: if upstream {
                entry.response_bytes
            } else {
                decided.body.len() as u64
            },
        }
    }
}

/// What a report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Subscription,
    Product,
    Api,
    Operation,
}

/// One row of a report, as APIM's `ReportRecordContract` names its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    pub subscription_id: Option<String>,
    pub product_id: Option<String>,
    pub api_id: Option<String>,
    pub operation_id: Option<String>,
    pub call_count_success: u64,
    pub call_count_blocked: u64,
    pub call_count_failed: u64,
    pub call_count_other: u64,
    pub call_count_total: u64,
    pub bandwidth: u64,
}

/// A report as APIM's management API lists one.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub value: Vec<ReportRow>,
    pub count: usize,
}

/// The report's limits: `[from, to)`, and buckets of `interval` (ISO 8601 text and ms).
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub interval: Option<(String, Millis)>,
}

/// An ISO 8601 duration of days, hours, minutes and seconds (`PT15M`, `PT1H`, `P1D`,
/// `P1DT12H`), in milliseconds; months and years have no fixed length and are refused.
pub fn parse_interval(text: &str) -> Result<Millis> {
    let bad =
        || anyhow!("--interval {text:?}: expected an ISO 8601 duration such as PT15M, PT1H or P1D");
    let rest = text.strip_prefix('P').ok_or_else(bad)?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut ms: Millis = 0;
    let mut take = |part: &str, units: &[(char, Millis)]| -> Result<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = units.iter().find(|(u, _)| *u == c).ok_or_else(bad)?.1;
            let n: Millis = number.parse().map_err(|_| bad())?;
            ms = n
                .checked_mul(unit)
                .and_then(|x| ms.checked_add(x))
                .ok_or_else(bad)?;
            number.clear();
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(bad())
        }
    };
    take(days, &[('W', 604_800_000), ('D', 86_400_000)])?;
    take(time, &[('H', 3_600_000), ('M', 60_000), ('S', 1_000)])?;
    if ms <= 0 || (rest.contains('T') && time.is_empty()) {
        return Err(bad());
    }
    Ok(ms)
}

/// A record as read for a report: borrowed from its line where it can be.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordRef<'a> {
    #[serde(borrow)]
    time: Cow<'a, str>,
    #[serde(borrow)]
    api: Option<Cow<'a, str>>,
    #[serde(borrow)]
    operation: Option<Cow<'a, str>>,
    #[serde(borrow)]
    product: Option<Cow<'a, str>>,
    #[serde(borrow)]
    subscription: Option<Cow<'a, str>>,
    status: u16,
    request_bytes: u64,
    response_bytes: u64,
}

/// One row being added up, with the identifiers its records share so far (subscription,
/// product, API, and API and operation; `None` inside: they differ).
struct Acc {
    row: ReportRow,
    ids: [Option<Option<String>>; 4],
}

/// A row's key looked up without building it: the grouping name (the API for `--by
/// operation`, with the operation beside it) and the interval's start. It hashes as the owned
/// key does (the same field types, borrowed).
#[derive(Hash)]
struct KeyRef<'a>(&'a str, Option<&'a str>, Millis);

/// A row's key: what [`KeyRef`] borrows.
type RowKey = (String, Option<String>, Millis);

impl hashbrown::Equivalent<RowKey> for KeyRef<'_> {
    fn equivalent(&self, key: &RowKey) -> bool {
        self.2 == key.2 && self.0 == key.0 && self.1 == key.1.as_deref()
    }
}

impl KeyRef<'_> {
    fn owned(&self) -> RowKey {
        (self.0.to_string(), self.1.map(str::to_string), self.2)
    }
}

/// Records added up into report rows as they are read: memory grows with the rows (groups
/// and intervals), not with the records.
pub struct Aggregate {
    by: By,
    window: Window,
    rows: hashbrown::HashMap<RowKey, Acc>,
}

impl Aggregate {
    pub fn new(by: By, window: Window) -> Self {
        Aggregate {
            by,
            window,
            rows: hashbrown::HashMap::new(),
        }
    }

    /// Adds one record (a JSON line). A record without the grouping identifier (a call that
    /// matched no API, or had no subscription) is in no row of that report.
    pub fn add_line(&mut self, line: &str) -> Result<()> {
        let r: RecordRef = serde_json::from_str(line).context("not a usage record")?;
        let at =
            parse_rfc3339(&r.time).ok_or_else(|| anyhow!("time {:?} is not RFC 3339", r.time))?;
        let w = &self.window;
        if w.from.is_some_and(|f| at < f) || w.to.is_some_and(|t| at >= t) {
            return Ok(());
        }
        let bucket = w
            .interval
            .as_ref()
            .map_or(0, |(_, ms)| at.div_euclid(*ms) * ms);
        let (api, operation) = (r.api.as_deref(), r.operation.as_deref());
        let key = match self.by {
            By::Subscription => r.subscription.as_deref().map(|s| KeyRef(s, None, bucket)),
            By::Product => r.product.as_deref().map(|p| KeyRef(p, None, bucket)),
            By::Api => api.map(|a| KeyRef(a, None, bucket)),
            By::Operation => api.zip(operation).map(|(a, o)| KeyRef(a, Some(o), bucket)),
        };
        let Some(key) = key else { return Ok(()) };
        let seen: [Option<(&str, Option<&str>)>; 4] = [
            r.subscription.as_deref().map(|s| (s, None)),
            r.product.as_deref().map(|p| (p, None)),
            api.map(|a| (a, None)),
            api.zip(operation).map(|(a, o)| (a, Some(o))),
        ];
        let by = self.by;
        let acc = match self.rows.get_mut(&key) {
            Some(acc) => {
                for (have, now) in acc.ids.iter_mut().zip(seen) {
                    let same = match (have.as_ref(), now) {
                        (Some(None), None) => true,
                        (Some(Some(h)), Some((a, None))) => h == a,
                        (Some(Some(h)), Some((a, Some(o)))) => {
                            h.strip_prefix(a).and_then(|x| x.strip_prefix('/')) == Some(o)
                        }
                        _ => false,
                    };
                    if !same {
                        *have = None;
                    }
                }
                acc
            }
            None => {
                let name = match by {
                    By::Operation => operation.unwrap_or_default().to_string(),
                    _ => key.0.to_string(),
                };
                let ids = seen.map(|id| {
                    Some(id.map(|(a, o)| match o {
                        None => a.to_string(),
                        Some(o) => format!("{a}/{o}"),
                    }))
                });
                let row = ReportRow {
                    name,
                    timestamp: w.interval.as_ref().map(|_| rfc3339(bucket)),
                    interval: w.interval.as_ref().map(|(t, _)| t.clone()),
                    subscription_id: None,
                    product_id: None,
                    api_id: None,
                    operation_id: None,
                    call_count_success: 0,
                    call_count_blocked: 0,
                    call_count_failed: 0,
                    call_count_other: 0,
                    call_count_total: 0,
                    bandwidth: 0,
                };
                self.rows.entry(key.owned()).or_insert(Acc { row, ids })
            }
        };
        let row = &mut acc.row;
        match r.status {
            200..=399 => row.call_count_success += 1,
            401 | 403 | 429 => row.call_count_blocked += 1,
            400..=599 => row.call_count_failed += 1,
            _ => row.call_count_other += 1,
        }
        row.call_count_total += 1;
        row.bandwidth = row
            .bandwidth
            .saturating_add(r.request_bytes)
            .saturating_add(r.response_bytes);
        Ok(())
    }

    /// The rows, ordered by name (and time). An identifier every record of a row shares is
    /// given (APIM's relative ids: `/subscriptions/NAME`, `/apis/API/operations/OP`); one
    /// they differ in is `null`.
    pub fn rows(self) -> Vec<ReportRow> {
        let mut rows: Vec<(RowKey, Acc)> = self.rows.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.into_iter()
            .map(|(_, acc)| {
                let [s, p, a, o] = acc.ids.map(Option::flatten);
                ReportRow {
                    subscription_id: s.map(|s| format!("/subscriptions/{s}")),
                    product_id: p.map(|p| format!("/products/{p}")),
                    api_id: a.map(|a| format!("/apis/{a}")),
                    operation_id: o.and_then(|ao| {
                        let (a, o) = ao.split_once('/')?;
                        Some(format!("/apis/{a}/operations/{o}"))
                    }),
                    ..acc.row
                }
            })
            .collect()
    }
}

/// Reads JSON Lines files of records into `into`, a line at a time. A line that is not a
/// record is skipped and named on standard error, or with `strict` is an error naming the file
/// and line. Returns how many were skipped.
pub fn read_into(paths: &[std::path::PathBuf], into: &mut Aggregate, strict: bool) -> Result<u64> {
    use std::io::BufRead;
    let mut skipped = 0;
    for path in paths {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if read == 0 {
                break;
            }
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            if let Err(e) = into.add_line(&line) {
                let at = format!("{} line {number}", path.display());
                if strict {
                    return Err(e.context(at));
                }
                skipped += 1;
                eprintln!("skipped {at}: {e:#}");
            }
        }
    }
    Ok(skipped)
}

/// Rows as CSV, with a header line (fields with commas or quotes quoted).
pub fn csv(rows: &[ReportRow]) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let opt = |s: &Option<String>| s.as_deref().map(field).unwrap_or_default();
    let mut out = String::from("name,timestamp,interval,subscriptionId,productId,apiId,operationId,callCountSuccess,callCountBlocked,callCountFailed,callCountOther,callCountTotal,bandwidth\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            field(&r.name),
            opt(&r.timestamp),
            opt(&r.interval),
            opt(&r.subscription_id),
            opt(&r.product_id),
            opt(&r.api_id),
            opt(&r.operation_id),
            r.call_count_success,
            r.call_count_blocked,
            r.call_count_failed,
            r.call_count_other,
            r.call_count_total,
            r.bandwidth
        ));
    }
    out
}

/// `--from`/`--to` text as an instant.
pub fn instant(flag: &str, text: &str) -> Result<Millis> {
    parse_rfc3339(text).ok_or_else(|| anyhow!("{flag} {text:?}: expected an RFC 3339 time"))
}

/// Checks that `to` is after `from` when both are given.
pub fn check_window(w: &Window) -> Result<()> {
    if let (Some(f), Some(t)) = (w.from, w.to) {
        if t <= f {
            bail!("--to must be after --from");
        }
    }
    Ok(())
}
