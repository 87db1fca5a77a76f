//! Recorded traffic (SPEC §6): JSON Lines, one request per line, with optional expectations;
//! or a HAR 1.2 file (browser devtools, mitmproxy), whose recorded responses can become the
//! expectations.

use anyhow::{anyhow, bail, Context, Result};
use apim_edge_policies::{parse_rfc3339, Millis};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a trace line expects the gateway to answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expect {
    pub status: Option<u16>,
    pub outcome: Option<String>,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    /// Headers the response must not carry: `null` in `expect.headers` (an extension of
    /// SPEC §6). Lower-case names.
    pub absent: Vec<String>,
    pub body: Option<String>,
    /// Who the call resolved to (an extension of SPEC §6): absent, not checked; `null`, none.
    pub identity: BTreeMap<&'static str, Option<String>>,
    /// What the gateway changes in the request on its way upstream (an extension of SPEC §6).
    pub upstream: Option<ExpectUpstream>,
}

/// What a trace line expects the gateway to change in the request on its way upstream: the
/// path and query it sends, and headers by lower-case name (`null`: removed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpectUpstream {
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: BTreeMap<String, Option<String>>,
}

fn expect_upstream(v: &Value) -> Result<ExpectUpstream> {
    if !v.is_object() {
        bail!("expect.upstream: expected an object");
    }
    let headers = match v.get("headers") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Null => Ok((k.to_ascii_lowercase(), None)),
                Value::String(s) => Ok((k.to_ascii_lowercase(), Some(s.clone()))),
                _ => bail!("expect.upstream.headers.{k}: expected a string or null"),
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("expect.upstream.headers: expected an object"),
    };
    Ok(ExpectUpstream {
        method: str_field(v, "method")
            .context("expect.upstream")?
            .map(str::to_string),
        path: str_field(v, "path")
            .context("expect.upstream")?
            .map(str::to_string),
        headers,
    })
}

/// The identity fields `expect` may carry.
pub const IDENTITY: [&str; 4] = ["api", "operation", "product", "subscription"];

/// One recorded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub at: Millis,
    pub method: String,
    pub host: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub client_ip: Option<IpAddr>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream_status: u16,
    pub expect: Option<Expect>,
}

impl Entry {
    /// The request's path and query, as a proxy's `:path`.
    pub fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// The default `--start`: the origin of relative `t` times.
pub const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// Splits an absolute URL or a path-and-query into host, path and query.
fn split_url(url: &str) -> (Option<String>, String, String) {
    let (host, rest) = match url.split_once("://") {
        Some((_, after)) => {
            let end = after.find(['/', '?']).unwrap_or(after.len());
            (Some(after[..end].to_string()), &after[end..])
        }
        None => (None, url),
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = if path.is_empty() { "/" } else { path };
    (host, path.to_string(), query.to_string())
}

/// `expect.headers` without the headers it expects absent (`null`).
fn present(v: Option<&Value>) -> Value {
    match v {
        Some(Value::Object(m)) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

fn headers_of(v: &Value) -> Result<Vec<(String, String)>> {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .ok_or_else(|| anyhow!("headers.{k}: expected a string"))?;
                Ok((k.clone(), v.to_string()))
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, pair)| match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(n), Value::String(v)]) => Ok((n.clone(), v.clone())),
                _ => bail!("headers[{i}]: expected a [name, value] pair of strings"),
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => bail!("headers: expected an object or a list of [name, value] pairs"),
    }
}

fn u64_field(v: &Value, name: &str) -> Result<Option<u64>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| anyhow!("{name}: expected a whole number")),
    }
}

fn str_field<'v>(v: &'v Value, name: &str) -> Result<Option<&'v str>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_str()
            .map(Some)
            .ok_or_else(|| anyhow!("{name}: expected a string")),
    }
}

fn status(n: u64, what: &str) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| anyhow!("{what}: {n} is not an HTTP status"))
}

/// The largest request or response body a trace may record: the wasmtime host hands the
/// filter a body of that many bytes.
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// How far from `--start` a relative time `t` may lie, in seconds (about 317 years).
pub const MAX_RELATIVE_SECONDS: f64 = 1e10;

/// A body's byte count, within [`MAX_BODY_BYTES`].
fn body_bytes(v: &Value, name: &str) -> Result<u64> {
    let n = u64_field(v, name)?.unwrap_or(0);
    if n > MAX_BODY_BYTES {
        bail!("{name}: {n} is more than {MAX_BODY_BYTES} bytes (64 MiB)");
    }
    Ok(n)
}

/// Reads one trace line.
pub fn parse_line(line: &str, start: Millis) -> Result<Entry> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    if !v.is_object() {
        bail!("expected a JSON object");
    }
    let at = match (str_field(&v, "at")?, v.get("t")) {
        (Some(at), _) => {
            parse_rfc3339(at).ok_or_else(|| anyhow!("at: not an RFC 3339 time: {at}"))?
        }
        (None, Some(t)) => {
            let secs = t
                .as_f64()
                .filter(|s| s.abs() <= MAX_RELATIVE_SECONDS)
                .ok_or_else(|| {
                    anyhow!("t: expected seconds from --start, at most {MAX_RELATIVE_SECONDS:e} either way")
                })?;
            start + (secs * 1000.0).round() as Millis
        }
        (None, None) => start,
    };
    let method = str_field(&v, "method")?
        .ok_or_else(|| anyhow!("method: required"))?
        .to_string();
    let url = str_field(&v, "url")?.ok_or_else(|| anyhow!("url: required"))?;
    let (url_host, path, query) = split_url(url);
    let headers = headers_of(v.get("headers").unwrap_or(&Value::Null))?;
    let host = url_host
        .or(str_field(&v, "host")?.map(str::to_string))
        .or_else(|| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("host"))
                .map(|(_, h)| h.clone())
        })
        .unwrap_or_else(|| "localhost".to_string());
    let client_ip = str_field(&v, "clientIp")?
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| anyhow!("clientIp: not an IP address: {ip}"))
        })
        .transpose()?;
    let expect = match v.get("expect") {
        None | Some(Value::Null) => None,
        Some(e) => Some(Expect {
            status: u64_field(e, "status")?
                .map(|s| status(s, "expect.status"))
                .transpose()?,
            outcome: str_field(e, "outcome")?.map(str::to_string),
            headers: headers_of(&present(e.get("headers")))
                .context("expect")?
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            absent: match e.get("headers") {
                Some(Value::Object(m)) => m
                    .iter()
                    .filter(|(_, v)| v.is_null())
                    .map(|(k, _)| k.to_ascii_lowercase())
                    .collect(),
                _ => Vec::new(),
            },
            body: str_field(e, "body")?.map(str::to_string),
            identity: IDENTITY
                .iter()
                .filter_map(|name| match e.get(*name) {
                    None => None,
                    Some(Value::Null) => Some(Ok((*name, None))),
                    Some(Value::String(s)) => Some(Ok((*name, Some(s.clone())))),
                    Some(_) => Some(Err(anyhow!("expect.{name}: expected a string or null"))),
                })
                .collect::<Result<_>>()?,
            upstream: match e.get("upstream") {
                None | Some(Value::Null) => None,
                Some(u) => Some(expect_upstream(u)?),
            },
        }),
    };
    Ok(Entry {
        at,
        method,
        host,
        path,
        query,
        headers,
        client_ip,
        request_bytes: body_bytes(&v, "requestBytes")?,
        response_bytes: body_bytes(&v, "responseBytes")?,
        upstream_status: u64_field(&v, "upstreamStatus")?
            .map(|s| status(s, "upstreamStatus"))
            .transpose()?
            .unwrap_or(200),
        expect,
    })
}

/// Reads a JSON Lines trace; blank lines and lines starting with `//` are skipped.
pub fn parse(text: &str, start: Millis) -> Result<Vec<Entry>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with("//"))
        .map(|(i, l)| parse_line(l, start).with_context(|| format!("line {}", i + 1)))
        .collect()
}

/// The shape of a trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Har,
}

/// Tells a HAR file (one JSON object with a `log`) from JSON Lines.
pub fn format_of(text: &str) -> Format {
    let head = text.trim_start();
    if head.starts_with('{') {
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) {
            if m.contains_key("log") {
                return Format::Har;
            }
        }
    }
    Format::JsonLines
}

/// Reads a trace of either shape. `expect_recorded` (HAR only) makes each entry's recorded
/// response status its expectation.
pub fn read(text: &str, start: Millis, expect_recorded: bool) -> Result<Vec<Entry>> {
    match format_of(text) {
        Format::Har => parse_har(text, expect_recorded),
        Format::JsonLines if expect_recorded => {
            bail!("--expect-recorded needs a HAR file; JSON Lines traces carry `expect` themselves")
        }
        Format::JsonLines => parse(text, start),
    }
}

/// Reads a HAR 1.2 (or 1.3) file: one entry per recorded exchange, in file order.
///
/// - `startedDateTime` is the call's time; `request.url` gives host, path and query.
/// - HTTP/2 pseudo-headers (`:authority`, ...) are dropped; the URL already says them.
/// - `bodySize` (or, when unknown, the post data or content size) gives the byte counts.
/// - The recorded status is the upstream's answer. An entry with status 0 (a browser's aborted
///   or blocked request) has no response: it gets upstream status 200 and no expectation.
/// - HAR records no client address, so `clientIp` is absent.
pub fn parse_har(text: &str, expect_recorded: bool) -> Result<Vec<Entry>> {
    let har = har::from_str(text).map_err(|e| {
        let detail = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        anyhow!("not a HAR file: {e}{detail}")
    })?;
    // HAR 1.2 and 1.3 entries are distinct types with the same fields.
    macro_rules! exchanges {
        ($log:expr) => {
            $log.entries
                .into_iter()
                .map(|e| Exchange {
                    started: e.started_date_time,
                    method: e.request.method,
                    url: e.request.url,
                    headers: e
                        .request
                        .headers
                        .into_iter()
                        .map(|h| (h.name, h.value))
                        .collect(),
                    request_body: e.request.body_size,
                    request_text: e.request.post_data.and_then(|p| p.text).map(|t| t.len()),
                    status: e.response.status,
                    response_body: e.response.body_size,
                    content_size: e.response.content.size,
                })
                .collect::<Vec<_>>()
        };
    }
    let exchanges = match har.log {
        har::Spec::V1_2(log) => exchanges!(log),
        har::Spec::V1_3(log) => exchanges!(log),
    };
    exchanges
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            x.entry(expect_recorded)
                .with_context(|| format!("log.entries[{i}]"))
        })
        .collect()
}

/// The fields of a HAR entry that replay uses, whichever HAR version carried them.
struct Exchange {
    started: String,
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    request_body: i64,
    request_text: Option<usize>,
    status: i64,
    response_body: i64,
    content_size: i64,
}

impl Exchange {
    fn entry(self, expect_recorded: bool) -> Result<Entry> {
        let at = parse_rfc3339(&self.started)
            .ok_or_else(|| anyhow!("startedDateTime: not an RFC 3339 time: {}", self.started))?;
        let (url_host, path, query) = split_url(&self.url);
        let headers: Vec<(String, String)> = self
            .headers
            .into_iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .collect();
        let host = url_host
            .or_else(|| {
                headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("host"))
                    .map(|(_, h)| h.clone())
            })
            .ok_or_else(|| {
                // Without its query: a key may be there.
                let shown = self.url.split('?').next().unwrap_or_default();
                anyhow!("request.url: expected an absolute URL, not {shown} (query left out)")
            })?;
        let known = |n: i64| u64::try_from(n).ok();
        let request_bytes = known(self.request_body)
            .or(self.request_text.map(|n| n as u64))
            .unwrap_or(0);
        let response_bytes = known(self.response_body)
            .or(known(self.content_size))
            .unwrap_or(0);
        if request_bytes.max(response_bytes) > MAX_BODY_BYTES {
            bail!("a body of more than {MAX_BODY_BYTES} bytes (64 MiB)");
        }
        let recorded = match self.status {
            0 => None,
            n => Some(status(
                u64::try_from(n).unwrap_or(u64::MAX),
                "response.status",
            )?),
        };
        let expect = match recorded {
            Some(s) if expect_recorded => Some(Expect {
                status: Some(s),
                ..Expect::default()
            }),
            _ => None,
        };
        Ok(Entry {
            at,
            method: self.method,
            host,
            path,
            query,
            headers,
            client_ip: None,
            request_bytes,
            response_bytes,
            upstream_status: recorded.unwrap_or(200),
            expect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_relative_urls() {
        let e = parse_line(r#"{"t": 1.5, "method": "GET", "url": "https://api.contoso.com/echo/items/1?subscription-key=k", "clientIp": "::1"}"#, 0).unwrap();
        assert_eq!(
            (e.at, e.host.as_str(), e.path.as_str(), e.query.as_str()),
            (
                1500,
                "api.contoso.com",
                "/echo/items/1",
                "subscription-key=k"
            )
        );
        assert_eq!(e.upstream_status, 200);
        let e = parse_line(r#"{"at": "1970-01-01T00:00:02Z", "method": "GET", "url": "/a", "host": "h", "headers": [["X", "1"], ["X", "2"]]}"#, 0).unwrap();
        assert_eq!((e.at, e.host.as_str(), e.headers.len()), (2000, "h", 2));
    }

    #[test]
    fn faults_are_named() {
        let err = parse("\n{\"method\": \"GET\"}", 0).unwrap_err();
        assert_eq!(format!("{err:#}"), "line 2: url: required");
        let err = parse_line(
            r#"{"method": "GET", "url": "/", "expect": {"status": 1000}}"#,
            0,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "expect.status: 1000 is not an HTTP status");
    }

    const HAR: &str = r#"{"log": {"version": "1.2", "creator": {"name": "devtools", "version": "1"},
      "entries": [
        {"startedDateTime": "2026-01-05T10:00:00.250+01:00", "time": 12,
         "request": {"method": "GET", "url": "https://api.contoso.com/echo/items/1?a=b",
                     "httpVersion": "h2", "cookies": [], "queryString": [{"name": "a", "value": "b"}],
                     "headers": [{"name": ":authority", "value": "api.contoso.com"},
                                 {"name": "Ocp-Apim-Subscription-Key", "value": "k"}],
                     "headersSize": -1, "bodySize": 0},
         "response": {"status": 429, "statusText": "", "httpVersion": "h2", "cookies": [],
                      "headers": [], "content": {"size": 80, "mimeType": "application/json"},
                      "redirectURL": "", "headersSize": -1, "bodySize": -1},
         "cache": {}, "timings": {"send": 0, "wait": 10, "receive": 2}},
        {"startedDateTime": "2026-01-05T09:00:01Z", "time": 1,
         "request": {"method": "POST", "url": "https://api.contoso.com/echo/items",
                     "httpVersion": "HTTP/1.1", "cookies": [], "queryString": [], "headers": [],
                     "postData": {"mimeType": "text/plain", "text": "hello"},
                     "headersSize": -1, "bodySize": -1},
         "response": {"status": 0, "statusText": "", "httpVersion": "", "cookies": [],
                      "headers": [], "content": {"size": 0}, "redirectURL": "",
                      "headersSize": -1, "bodySize": -1},
         "cache": {}, "timings": {"send": 0, "wait": 0, "receive": 0}}]}}"#;

    #[test]
    fn har_entries_become_trace_entries() -> Result<()> {
        assert_eq!(format_of(HAR), Format::Har);
        assert_eq!(
            format_of(r#"{"method": "GET", "url": "/"}"#),
            Format::JsonLines
        );
        let entries = read(HAR, 0, true)?;
        let first = &entries[0];
        let at = parse_rfc3339("2026-01-05T09:00:00.250Z").ok_or_else(|| anyhow!("time"))?;
        assert_eq!(first.at, at);
        assert_eq!(
            (
                first.host.as_str(),
                first.path.as_str(),
                first.query.as_str()
            ),
            ("api.contoso.com", "/echo/items/1", "a=b")
        );
        assert_eq!(
            first.headers,
            vec![("Ocp-Apim-Subscription-Key".to_string(), "k".to_string())]
        );
        assert_eq!((first.response_bytes, first.upstream_status), (80, 429));
        assert_eq!(first.expect.as_ref().and_then(|e| e.status), Some(429));
        let second = &entries[1];
        assert_eq!((second.method.as_str(), second.request_bytes), ("POST", 5));
        assert_eq!(
            (second.upstream_status, second.expect.is_none()),
            (200, true)
        );
        // Without --expect-recorded, nothing is expected.
        assert!(read(HAR, 0, false)?.iter().all(|e| e.expect.is_none()));
        Ok(())
    }

    #[test]
    fn har_faults_are_named() {
        let err = read(r#"{"method": "GET", "url": "/"}"#, 0, true).unwrap_err();
        assert!(
            err.to_string()
                .contains("--expect-recorded needs a HAR file"),
            "{err}"
        );
        let err = read(r#"{"log": {"version": "1.1", "entries": []}}"#, 0, false).unwrap_err();
        assert!(err.to_string().starts_with("not a HAR file"), "{err}");
        let bad = HAR.replace("2026-01-05T09:00:01Z", "yesterday");
        let err = read(&bad, 0, false).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "log.entries[1]: startedDateTime: not an RFC 3339 time: yesterday"
        );
    }
}
