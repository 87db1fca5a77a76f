//! What the edge does around APIM's decision (SPEC §5): the filter configuration ([`config`]),
//! the changes a call makes on its way upstream (the subscription key stripped from header and
//! query, identity headers added and client-sent copies of them removed), and what an internal
//! failure answers under `failureMode`. Decided here once, so that native replay, the filter in
//! the wasmtime host and the filter in Envoy apply the very same edits.

pub mod config;

use crate::catalog::Catalog;
use crate::decide::{
    decode_component, header, Decision, HeaderEdit, HeaderEdits, Outcome, Request,
};
use crate::ids::ApiId;
use config::{EdgeOptions, FailureMode};
use std::borrow::Cow;

/// The identity headers `identityHeaders` adds upstream: the product's and the subscription's
/// ARM names.
pub const IDENTITY_HEADERS: [&str; 2] = ["x-apim-product-id", "x-apim-subscription-id"];

/// APIM's default key names, stripped when no catalog is loaded yet to say the API's own.
const DEFAULT_KEY_HEADER: &str = "ocp-apim-subscription-key";
const DEFAULT_KEY_QUERY: &str = "subscription-key";

/// Where an API reads its subscription key: the header (lower-case) and the query parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyNames<'c> {
    pub header_lower: &'c str,
    pub query: &'c str,
}

/// The path and query with every parameter named `name` (after percent-decoding, as the key
/// is read) removed; `None` when there is none to remove.
fn without_parameter(path: &str, query: &str, name: &str) -> Option<String> {
    let mut removed = false;
    let mut out = String::with_capacity(path.len() + query.len() + 1);
    out.push_str(path);
    let mut first = true;
    for pair in query.split('&') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if decode_component(key) == name {
            removed = true;
            continue;
        }
        if pair.is_empty() {
            continue;
        }
        out.push(if first { '?' } else { '&' });
        first = false;
        out.push_str(pair);
    }
    removed.then_some(out)
}

impl EdgeOptions {
    /// The edits of a call that goes upstream, after the policies' own: the key stripped (both
    /// places, whichever the key was read from), then the identity headers. `req` has the path
    /// and query the call goes upstream with; `rewritten` says the policies changed them, so
    /// that `:path` is set even when no key is stripped.
    pub(crate) fn upstream_edits<'c>(
        &self,
        req: &Request,
        key: KeyNames<'c>,
        identity: [Option<&'c str>; 2],
        rewritten: bool,
        out: &mut HeaderEdits<'c>,
    ) {
        let mut path = None;
        if self.strip_subscription_key {
            if header(req.headers, key.header_lower).is_some() {
                out.push(HeaderEdit::Remove(Cow::Borrowed(key.header_lower)));
            }
            path = without_parameter(req.path, req.query, key.query);
        }
        if path.is_none() && rewritten {
            path = Some(crate::decide::join(req.path, req.query));
        }
        if let Some(path) = path {
            out.push(HeaderEdit::Set(Cow::Borrowed(":path"), Cow::Owned(path)));
        }
        if self.identity_headers {
            for (name, value) in IDENTITY_HEADERS.into_iter().zip(identity) {
                if header(req.headers, name).is_some() {
                    out.push(HeaderEdit::Remove(Cow::Borrowed(name)));
                }
                if let Some(v) = value {
                    out.push(HeaderEdit::Set(Cow::Borrowed(name), Cow::Borrowed(v)));
                }
            }
        }
    }

    /// The decision for a call that could not be decided: APIM's 500 under `closed`; under
    /// `open` the call goes upstream, with the key stripped all the same.
    fn failure<'c>(&self, req: &Request, key: KeyNames<'c>) -> Decision<'c> {
        match self.failure_mode {
            FailureMode::Closed => Decision::internal_error(None),
            FailureMode::Open => {
                let mut upstream = HeaderEdits::new();
                self.upstream_edits(req, key, [None, None], false, &mut upstream);
                Decision {
                    outcome: Outcome::InternalError,
                    response: None,
                    upstream,
                    metrics: Vec::new(),
                    call: None,
                }
            }
        }
    }

    /// The decision for a call that arrives before any snapshot has loaded (a `snapshotSource`
    /// still being fetched): a failure, with APIM's default key names stripped under `open`.
    pub fn unloaded(&self, req: &Request) -> Decision<'static> {
        let key = KeyNames {
            header_lower: DEFAULT_KEY_HEADER,
            query: DEFAULT_KEY_QUERY,
        };
        self.failure(req, key)
    }
}

impl Catalog {
    /// The decision for a call whose [`Catalog::decide`] failed (an internal failure), as the
    /// configuration's `failureMode` says.
    pub fn failed<'c>(&'c self, req: &Request) -> Decision<'c> {
        let key = match self.route_api(req) {
            Some(api) => self.key_names(api),
            None => KeyNames {
                header_lower: DEFAULT_KEY_HEADER,
                query: DEFAULT_KEY_QUERY,
            },
        };
        self.edge.failure(req, key)
    }

    /// Where API `api` reads its key.
    pub(crate) fn key_names(&self, api: ApiId) -> KeyNames<'_> {
        let api = &self.apis[api.index()];
        KeyNames {
            header_lower: &api.header_lower,
            query: &api.query_name,
        }
    }
}

/// Applies `edits` to a request as the upstream would receive it: its path and query
/// (`:path`) and its headers (names lower-case, repeated values joined with ", "), pseudo
/// headers left out. The command line's replay shows the result; proxies apply the same edits
/// to their own header maps.
pub fn apply_to_request(
    path_and_query: &str,
    headers: &[(String, String)],
    edits: &[HeaderEdit],
) -> (String, std::collections::BTreeMap<String, String>) {
    let mut path = path_and_query.to_string();
    let mut map: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for (n, v) in headers {
        append(&mut map, n, v);
    }
    for e in edits {
        match e {
            HeaderEdit::Set(n, v) if n == ":path" => path = v.to_string(),
            HeaderEdit::Set(n, v) => {
                map.insert(n.to_ascii_lowercase(), v.to_string());
            }
            HeaderEdit::Append(n, v) => append(&mut map, n, v),
            HeaderEdit::Remove(n) => {
                map.remove(&n.to_ascii_lowercase());
            }
        }
    }
    map.retain(|n, _| !n.starts_with(':'));
    (path, map)
}

fn append(map: &mut std::collections::BTreeMap<String, String>, name: &str, value: &str) {
    map.entry(name.to_ascii_lowercase())
        .and_modify(|old| {
            old.push_str(", ");
            old.push_str(value);
        })
        .or_insert_with(|| value.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_is_removed_by_its_decoded_name_everywhere() {
        let name = "subscription-key";
        assert_eq!(
            without_parameter("/echo/a", "subscription-key=K", name).as_deref(),
            Some("/echo/a")
        );
        assert_eq!(
            without_parameter("/echo/a", "x=1&subscription%2Dkey=K&y=2", name).as_deref(),
            Some("/echo/a?x=1&y=2")
        );
        assert_eq!(
            without_parameter(
                "/echo/a",
                "subscription-key=K&subscription+key=2&subscription-key",
                name
            )
            .as_deref(),
            Some("/echo/a?subscription+key=2")
        );
        assert_eq!(without_parameter("/echo/a", "x=1&&y", name), None);
        assert_eq!(without_parameter("/echo/a", "", name), None);
    }

    #[test]
    fn edits_reach_the_request_as_the_upstream_sees_it() {
        let headers = vec![
            ("Ocp-Apim-Subscription-Key".to_string(), "K".to_string()),
            ("X-A".to_string(), "1".to_string()),
            ("x-a".to_string(), "2".to_string()),
        ];
        let edits = [
            HeaderEdit::Remove("ocp-apim-subscription-key".into()),
            HeaderEdit::Set(":path".into(), "/echo/a".into()),
            HeaderEdit::Set("X-Apim-Product-Id".into(), "starter".into()),
        ];
        let (path, map) = apply_to_request("/echo/a?subscription-key=K", &headers, &edits);
        assert_eq!(path, "/echo/a");
        assert_eq!(map.get("x-a").map(String::as_str), Some("1, 2"));
        assert_eq!(
            map.get("x-apim-product-id").map(String::as_str),
            Some("starter")
        );
        assert!(!map.contains_key("ocp-apim-subscription-key"));
    }
}
