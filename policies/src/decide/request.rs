//! A call as the proxy hands it over: method, host, path, query, headers and client address,
//! the owned copy kept for later phases, and reading a header or a query parameter the way
//! APIM does (`+` and percent-escapes decoded).

use std::net::IpAddr;

/// A call as the proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The host, without a port.
    pub host: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without the `?`.
    pub query: &'a str,
    pub headers: &'a [(String, String)],
    pub client_ip: Option<IpAddr>,
}

/// An owned copy of a request, kept for expressions evaluated after the inbound phase.
#[derive(Debug, Clone)]
pub(crate) struct SavedRequest {
    method: String,
    host: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    client_ip: Option<IpAddr>,
    /// The path and query as the call came, when the policies changed them.
    original: Option<(String, String)>,
}

impl SavedRequest {
    pub(crate) fn of(r: &Request) -> Self {
        SavedRequest {
            method: r.method.to_string(),
            host: r.host.to_string(),
            path: r.path.to_string(),
            query: r.query.to_string(),
            headers: r.headers.to_vec(),
            client_ip: r.client_ip,
            original: None,
        }
    }

    /// The request as the inbound policies left it (`now`), and the path and query it came with.
    pub(crate) fn rewritten(now: &Request, original: &Request) -> Self {
        let mut saved = Self::of(now);
        if (now.path, now.query) != (original.path, original.query) {
            saved.original = Some((original.path.to_string(), original.query.to_string()));
        }
        saved
    }

    /// The path and query the call came with.
    pub(crate) fn original(&self) -> (&str, &str) {
        match &self.original {
            Some((p, q)) => (p, q),
            None => (&self.path, &self.query),
        }
    }

    pub(crate) fn request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            host: &self.host,
            path: &self.path,
            query: &self.query,
            headers: &self.headers,
            client_ip: self.client_ip,
        }
    }
}

/// A path without its leading and trailing slashes.
pub(crate) fn trim_slashes(path: &str) -> &str {
    let b = path.as_bytes();
    let start = b.iter().position(|&c| c != b'/').unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b'/')
        .map_or(start, |last| last + 1);
    // Both ends are next to a '/' or at an end of the text: char boundaries.
    &path[start..end]
}

/// A host without its port.
pub(crate) fn host_of(host: &str) -> &str {
    match host.bytes().position(|b| b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

pub(crate) fn header<'r>(headers: &'r [(String, String)], lower: &str) -> Option<&'r str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(lower))
        .map(|(_, v)| v.as_str())
}

/// A header's value as a subscription key is read from it. A header given more than once is
/// one value, its values joined with `,`, as HTTP (RFC 9110 §5.3) and .NET present a repeated
/// field: two keys in one request are no key of any subscription.
pub(crate) fn key_header<'r>(
    headers: &'r [(String, String)],
    lower: &str,
) -> Option<std::borrow::Cow<'r, str>> {
    let mut values = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(lower))
        .map(|(_, v)| v.as_str());
    let first = values.next()?;
    match values.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for v in values {
                joined.push(',');
                joined.push_str(v);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// A query parameter's value as a subscription key is read from it: repeated, its values
/// joined with `,` (as .NET reads a repeated parameter), which no key equals.
pub(crate) fn key_param(query: &str, name: &str) -> Option<String> {
    let mut values = query_values(query, name);
    let mut key = values.next()?;
    for v in values {
        key.push(',');
        key.push_str(&v);
    }
    Some(key)
}

pub(crate) fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A query parameter's value, `+` and percent-escapes decoded.
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query_values(query, name).next()
}

/// Every value of a query parameter, in order, decoded.
fn query_values<'q>(query: &'q str, name: &'q str) -> impl Iterator<Item = String> + 'q {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode_component(k) == name).then(|| decode_component(v))
    })
}

/// A query component with `+` and percent-escapes decoded.
pub(crate) fn decode_component(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex_value(b[i + 1]), hex_value(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param("a=1&subscription-key=k%2Bx+y", "subscription-key").as_deref(),
            Some("k+x y")
        );
        assert_eq!(query_param("a", "a").as_deref(), Some(""));
        assert_eq!(query_param("a=%", "a").as_deref(), Some("%"));
        assert_eq!(query_param("a=%4", "a").as_deref(), Some("%4"));
        assert_eq!(query_param("", "a"), None);
    }
}
