//! Replaying a trace through the native engine: one decision per request on a virtual clock
//! (the trace's own times), printed as SPEC §6's JSON objects and compared with expectations.

use crate::trace::{Entry, Expect};
use apim_edge_policies::{edge, Catalog, Completion, CounterStore, HeaderEdit, Outcome, Request};
use serde::Serialize;
use std::collections::BTreeMap;

/// One line of replay output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionRecord {
    pub index: usize,
    pub status: u16,
    pub outcome: &'static str,
    pub api: Option<String>,
    pub operation: Option<String>,
    pub product: Option<String>,
    pub subscription: Option<String>,
    /// Headers the gateway set on its own response, names lower-case.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// For a call that goes upstream, what the gateway changed in the request on its way (an
    /// extension of SPEC §6): absent when nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamChanges>,
}

/// What the gateway changed in a request on its way upstream (the policies' `set-header`, the
/// key stripped, identity headers). Only changes are shown: a replay never echoes the request's
/// own headers, its subscription key among them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UpstreamChanges {
    /// The method the upstream receives, when a policy changed it (`set-method`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The path and query the upstream receives, when they changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Each header that changed (lower-case name): its value upstream (repeated values joined
    /// with ", "), or `null` when removed.
    pub headers: BTreeMap<String, Option<String>>,
}

impl UpstreamChanges {
    /// The changes between a request as received and as sent upstream; `None` when none.
    pub fn between(
        (method_in, path_in, headers_in): (&str, &str, &BTreeMap<String, String>),
        (method_out, path_out, headers_out): (&str, &str, &BTreeMap<String, String>),
    ) -> Option<Self> {
        let mut headers = BTreeMap::new();
        for (name, value) in headers_out {
            if headers_in.get(name) != Some(value) {
                headers.insert(name.clone(), Some(value.clone()));
            }
        }
        for name in headers_in.keys() {
            if !headers_out.contains_key(name) {
                headers.insert(name.clone(), None);
            }
        }
        let path = (path_in != path_out).then(|| path_out.to_string());
        let method = (method_in != method_out).then(|| method_out.to_string());
        (method.is_some() || path.is_some() || !headers.is_empty()).then_some(UpstreamChanges {
            method,
            path,
            headers,
        })
    }

    /// The changes `edits` make to the recorded request `e`.
    fn of(e: &Entry, edits: &[HeaderEdit]) -> Option<Self> {
        if edits.is_empty() {
            return None;
        }
        let target = e.target();
        let (_, before) = edge::apply_to_request(&target, &e.headers, &[]);
        let (path, after) = edge::apply_to_request(&target, &e.headers, edits);
        // The last `:method` set, if any.
        let method = edits
            .iter()
            .rev()
            .find_map(|x| match x {
                HeaderEdit::Set(n, v) if n == ":method" => Some(&**v),
                _ => None,
            })
            .unwrap_or(&e.method);
        Self::between((&e.method, &target, &before), (method, &path, &after))
    }
}

/// Applies edits to a header map (names lower-case).
fn apply(map: &mut BTreeMap<String, String>, edits: &[HeaderEdit]) {
    for e in edits {
        match e {
            HeaderEdit::Set(n, v) => {
                map.insert(n.to_ascii_lowercase(), v.to_string());
            }
            HeaderEdit::Append(n, v) => {
                map.entry(n.to_ascii_lowercase())
                    .and_modify(|old| {
                        old.push_str(", ");
                        old.push_str(v);
                    })
                    .or_insert_with(|| v.to_string());
            }
            HeaderEdit::Remove(n) => {
                map.remove(&n.to_ascii_lowercase());
            }
        }
    }
}

/// Decides one recorded request, completes it, and describes the result. An internal failure
/// is answered as the catalog's configuration says ([`Catalog::failed`]).
pub fn replay_one(
    catalog: &Catalog,
    store: &dyn CounterStore,
    index: usize,
    e: &Entry,
) -> DecisionRecord {
    let req = Request {
        method: &e.method,
        host: &e.host,
        path: &e.path,
        query: &e.query,
        headers: &e.headers,
        client_ip: e.client_ip,
    };
    // Read where it lies: moved out of the result, the decision's bytes would be copied just
    // after they were written.
    let decided = catalog.decide(&req, e.at, store);
    let failed;
    let decision = match &decided {
        Ok(d) => d,
        Err(_) => {
            failed = catalog.failed(&req);
            &failed
        }
    };
    let (api, operation, product, subscription) = match &decision.call {
        Some(c) => {
            let (a, o, p, s) = catalog.names(c);
            (
                Some(a.to_string()),
                o.map(String::from),
                p.map(String::from),
                s.map(String::from),
            )
        }
        None => (None, None, None, None),
    };
    let mut headers = BTreeMap::new();
    let (status, body, outcome) = match (&decision.response, &decision.call) {
        (Some(r), _) => {
            for (n, v) in &r.headers {
                headers.insert(n.to_string(), v.to_string());
            }
            (r.status, r.body.clone(), decision.outcome)
        }
        (None, Some(call)) => {
            let mut outcome = decision.outcome;
            let mut answer = (e.upstream_status, String::new());
            match catalog.outbound_response(call, e.upstream_status) {
                // A return-response in outbound replaces the upstream's response.
                Ok(Some(r)) => {
                    outcome = Outcome::Returned;
                    for (n, v) in &r.headers {
                        headers.insert(n.to_string(), v.to_string());
                    }
                    answer = (r.status, r.body);
                }
                Ok(None) => match catalog.respond(call, e.upstream_status, &|_| false) {
                    Ok(edits) => apply(&mut headers, &edits),
                    Err(_) => outcome = Outcome::InternalError,
                },
                Err(_) => outcome = Outcome::InternalError,
            }
            let done = Completion {
                status: e.upstream_status,
                request_bytes: e.request_bytes,
                response_bytes: e.response_bytes,
            };
            if catalog.complete(call, done, e.at, store).is_err() {
                outcome = Outcome::InternalError;
            }
            (answer.0, answer.1, outcome)
        }
        (None, None) => (e.upstream_status, String::new(), decision.outcome),
    };
    let upstream = decision
        .response
        .is_none()
        .then(|| UpstreamChanges::of(e, &decision.upstream))
        .flatten();
    DecisionRecord {
        index,
        status,
        outcome: outcome.as_str(),
        api,
        operation,
        product,
        subscription,
        headers,
        body,
        upstream,
    }
}

/// Every way a result differs from its expectation.
pub fn mismatches(got: &DecisionRecord, expect: &Expect) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = expect.status {
        if s != got.status {
            out.push(format!("status: expected {s}, got {}", got.status));
        }
    }
    if let Some(o) = &expect.outcome {
        if o != got.outcome {
            out.push(format!("outcome: expected {o}, got {}", got.outcome));
        }
    }
    for (name, want) in &expect.headers {
        match got.headers.get(name) {
            Some(v) if v == want => {}
            Some(v) => out.push(format!("header {name}: expected {want:?}, got {v:?}")),
            None => out.push(format!("header {name}: expected {want:?}, absent")),
        }
    }
    for name in &expect.absent {
        if let Some(v) = got.headers.get(name) {
            out.push(format!("header {name}: expected absent, got {v:?}"));
        }
    }
    for (field, want) in &expect.identity {
        let got_value = match *field {
            "api" => &got.api,
            "operation" => &got.operation,
            "product" => &got.product,
            _ => &got.subscription,
        };
        if got_value != want {
            out.push(format!("{field}: expected {want:?}, got {got_value:?}"));
        }
    }
    if let Some(b) = &expect.body {
        if *b != got.body {
            out.push(format!("body: expected {b:?}, got {:?}", got.body));
        }
    }
    if let Some(want) = &expect.upstream {
        match &got.upstream {
            None => out.push("upstream: expected changes to the request, none made".into()),
            Some(up) => {
                if want.method.is_some() && want.method != up.method {
                    out.push(format!(
                        "upstream method: expected {:?}, got {:?}",
                        want.method, up.method
                    ));
                }
                if want.path.is_some() && want.path != up.path {
                    out.push(format!(
                        "upstream path: expected {:?}, got {:?}",
                        want.path, up.path
                    ));
                }
                for (name, value) in &want.headers {
                    let got_value = up.headers.get(name);
                    if got_value != Some(value) {
                        out.push(format!(
                            "upstream header {name}: expected {value:?}, got {got_value:?}"
                        ));
                    }
                }
            }
        }
    }
    out
}
