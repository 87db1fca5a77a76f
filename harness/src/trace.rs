//! Recorded traffic (SPEC §6): JSON Lines, one request per line, with optional expectations.

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
    pub body: Option<String>,
    /// Who the call resolved to (an extension of SPEC §6): absent, not checked; `null`, none.
    pub identity: BTreeMap<&'static str, Option<String>>,
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
            let secs = t.as_f64().ok_or_else(|| anyhow!("t: expected seconds"))?;
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
            headers: headers_of(e.get("headers").unwrap_or(&Value::Null))
                .context("expect")?
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
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
        request_bytes: u64_field(&v, "requestBytes")?.unwrap_or(0),
        response_bytes: u64_field(&v, "responseBytes")?.unwrap_or(0),
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
}
