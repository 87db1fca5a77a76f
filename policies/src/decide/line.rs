//! The request line as the inbound policies rewrite it on its way upstream: `set-method`,
//! `set-query-parameter` and `rewrite-uri`. What they change is kept beside the request as it
//! came (which `context.Request.OriginalUrl` and the subscription key still read); expressions
//! after them read the new method, path and query, and the call goes upstream with them.

use super::request::{decode_component, Request};
use crate::policy::ExistsAction;
use std::borrow::Cow;

/// What the inbound policies changed of the request line; `None` where nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestLine {
    pub method: Option<String>,
    /// The path and the query (without its `?`), changed together.
    pub url: Option<(String, String)>,
}

impl RequestLine {
    #[cfg(test)]
    pub fn is_changed(&self) -> bool {
        self.method.is_some() || self.url.is_some()
    }

    pub fn method<'a>(&'a self, req: &Request<'a>) -> &'a str {
        self.method.as_deref().unwrap_or(req.method)
    }

    pub fn path<'a>(&'a self, req: &Request<'a>) -> &'a str {
        self.url.as_ref().map_or(req.path, |(p, _)| p)
    }

    pub fn query<'a>(&'a self, req: &Request<'a>) -> &'a str {
        self.url.as_ref().map_or(req.query, |(_, q)| q)
    }

    /// `set-query-parameter`: `name`'s parameters as `action` says with `values` (already
    /// evaluated). Parameters are told apart by their decoded names; the others keep their
    /// place and their bytes. Overridden values take the place of the first they replace; new
    /// ones go at the end. Values and names are percent-encoded.
    pub fn set_query_parameter(
        &mut self,
        req: &Request,
        name: &str,
        action: ExistsAction,
        values: &[Cow<'_, str>],
    ) {
        let query = self.query(req);
        let named =
            |pair: &str| decode_component(pair.split_once('=').map_or(pair, |(k, _)| k)) == name;
        let present = query.split('&').any(named);
        let fresh = || {
            values
                .iter()
                .map(|v| format!("{}={}", encode(name), encode(v)))
        };
        let mut pairs: Vec<String> = Vec::new();
        match action {
            ExistsAction::Skip if present => return,
            ExistsAction::Delete if !present => return,
            ExistsAction::Append | ExistsAction::Skip => {
                pairs.extend(
                    query
                        .split('&')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string),
                );
                pairs.extend(fresh());
            }
            ExistsAction::Delete => {
                pairs.extend(
                    query
                        .split('&')
                        .filter(|p| !p.is_empty() && !named(p))
                        .map(str::to_string),
                );
            }
            ExistsAction::Override => {
                let mut placed = false;
                for p in query.split('&').filter(|p| !p.is_empty()) {
                    if !named(p) {
                        pairs.push(p.to_string());
                    } else if !placed {
                        placed = true;
                        pairs.extend(fresh());
                    }
                }
                if !placed {
                    pairs.extend(fresh());
                }
            }
        }
        let path = self.path(req).to_string();
        self.url = Some((path, pairs.join("&")));
    }

    /// `rewrite-uri`: what follows the API's path (`depth` segments of the path as it came)
    /// becomes `template` with its `{name}`s filled from `parameters` (an unknown name is
    /// empty); the template's query comes first, then, with `copy_unmatched`, the call's
    /// parameters that neither the operation's template (`matched`) nor the new template names.
    pub fn rewrite(
        &mut self,
        req: &Request,
        depth: usize,
        template: &str,
        parameters: &[(&str, &str)],
        matched: &[&str],
        copy_unmatched: bool,
    ) {
        let filled = fill(template, parameters);
        let (new_path, new_query) = filled.split_once('?').unwrap_or((&filled, ""));
        // The API's path as the call wrote it: the first `depth` segments.
        let path = self.path(req);
        let below = crate::route::below(path, depth);
        let prefix = path[..path.len() - below.len()].trim_end_matches('/');
        let mut out_path = String::with_capacity(prefix.len() + new_path.len() + 1);
        out_path.push_str(prefix);
        if !new_path.starts_with('/') {
            out_path.push('/');
        }
        out_path.push_str(new_path);
        let mut pairs: Vec<String> = new_query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if copy_unmatched {
            let names: Vec<String> = pairs
                .iter()
                .map(|p| decode_component(p.split_once('=').map_or(p, |(k, _)| k)))
                .collect();
            for p in self.query(req).split('&').filter(|p| !p.is_empty()) {
                let name = decode_component(p.split_once('=').map_or(p, |(k, _)| k));
                if !matched.contains(&name.as_str()) && !names.contains(&name) {
                    pairs.push(p.to_string());
                }
            }
        }
        self.url = Some((out_path, pairs.join("&")));
    }

    /// The path and query for `:path`.
    #[cfg(test)]
    pub fn target(&self, req: &Request) -> String {
        join(self.path(req), self.query(req))
    }
}

/// `path?query`, or the path alone when the query is empty.
pub(crate) fn join(path: &str, query: &str) -> String {
    match query.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{query}"),
    }
}

/// A template with each `{name}` replaced by its parameter's value (empty when none).
fn fill(template: &str, parameters: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &rest[open + 1..open + close];
        let name = name.strip_prefix('*').unwrap_or(name);
        if let Some((_, v)) = parameters.iter().find(|(n, _)| *n == name) {
            out.push_str(v);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(path: &'a str, query: &'a str) -> Request<'a> {
        Request {
            method: "GET",
            host: "h",
            path,
            query,
            headers: &[],
            client_ip: None,
        }
    }

    fn set(query: &str, action: ExistsAction, values: &[&str]) -> String {
        let r = req("/echo/a", query);
        let mut line = RequestLine::default();
        let values: Vec<Cow<str>> = values.iter().map(|v| Cow::Borrowed(*v)).collect();
        line.set_query_parameter(&r, "x", action, &values);
        line.target(&r)
    }

    #[test]
    fn set_query_parameter_acts_as_its_exists_action_says() {
        use ExistsAction::*;
        assert_eq!(
            set("a=1&x=2&b=3&x=4", Override, &["9"]),
            "/echo/a?a=1&x=9&b=3"
        );
        assert_eq!(set("a=1", Override, &["8", "9"]), "/echo/a?a=1&x=8&x=9");
        assert_eq!(set("a=1&x=2", Skip, &["9"]), "/echo/a?a=1&x=2");
        assert_eq!(set("a=1", Skip, &["9"]), "/echo/a?a=1&x=9");
        assert_eq!(set("x=2", Append, &["9"]), "/echo/a?x=2&x=9");
        assert_eq!(set("a=1&%78=2&b", Delete, &[]), "/echo/a?a=1&b");
        assert_eq!(set("", Override, &["a b&c"]), "/echo/a?x=a%20b%26c");
    }

    #[test]
    fn skip_of_a_present_parameter_changes_nothing() {
        let r = req("/echo/a", "x=2");
        let mut line = RequestLine::default();
        line.set_query_parameter(&r, "x", ExistsAction::Skip, &[Cow::Borrowed("9")]);
        assert!(!line.is_changed());
    }

    #[test]
    fn rewrite_keeps_the_api_path_and_fills_the_template() {
        let r = req("/Shop/stores/12/orders/7", "a=b&c=d&e");
        let mut line = RequestLine::default();
        let params = [("store", "12"), ("order", "7"), ("b", "b")];
        line.rewrite(
            &r,
            1,
            "/v2/US/{store}/{order}?City=city",
            &params,
            &["a"],
            true,
        );
        assert_eq!(line.target(&r), "/Shop/v2/US/12/7?City=city&c=d&e");
        let mut line = RequestLine::default();
        line.rewrite(&r, 1, "/put", &params, &["a"], false);
        assert_eq!(line.target(&r), "/Shop/put");
        let mut line = RequestLine::default();
        line.rewrite(&r, 1, "/x/{missing}/y", &params, &[], true);
        assert_eq!(line.target(&r), "/Shop/x//y?a=b&c=d&e");
    }
}
