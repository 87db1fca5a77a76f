//! The decision for one call (SPEC §3): route to an API and operation, find the key and the
//! subscription, pick the product context, and run the effective program. A call then has two
//! more moments: [`Catalog::respond`] when the upstream's response headers arrive (outbound
//! header changes, remaining-calls headers), and [`Catalog::complete`] when the exchange is
//! over (bandwidth, `increment-condition`).
//!
//! Its rooms: [`request`] (the call as the proxy hands it over), [`facts`] (what expressions
//! see), [`limits`] (counting under the program's limits); routing is [`crate::route`]'s.

mod facts;
mod limits;
mod line;
mod request;
pub(crate) mod shared;

use crate::catalog::{Catalog, Program};
use crate::clock::Millis;
use crate::cors::{self, AnswerHeader};
use crate::counters::op::{CounterOp, Counting, Local, OpResult};
use crate::counters::{CounterStore, StoreError};
use crate::expr::{EvalError, Value, Variables};
use crate::ids::{ApiId, OperationId, ProductId, SubscriptionId};
use crate::jwt::{self, TokenSource};
use crate::keys::key_digest;
use crate::policy::{ip_number, SetHeader, Step, Text};
use crate::response::{self, LocalResponse};
use crate::snapshot::SubscriptionScope;
use facts::*;
use limits::*;
pub(crate) use line::join;
use line::RequestLine;
pub use request::Request;
pub(crate) use request::*;
use smallvec::SmallVec;
use std::borrow::Cow;

/// What happened to a call (SPEC §4), as printed in decision logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    Returned,
    ApiNotFound,
    OperationNotFound,
    MissingKey,
    InvalidKey,
    RateLimited,
    QuotaExceeded,
    BandwidthExceeded,
    IpForbidden,
    HeaderCheckFailed,
    /// `validate-jwt` refused the token (or found none).
    JwtInvalid,
    InternalError,
    /// Shared counters unreachable, under `onUnavailable: "deny"` (SPEC §7).
    CountersUnavailable,
    /// A CORS preflight from an allowed origin, answered at the edge with its headers.
    CorsPreflight,
    /// A cross-origin call (a preflight, or a `GET`/`HEAD`) from an origin no `cors` allows,
    /// ended with an empty 200 (`terminate-unmatched-request`).
    CorsUnmatched,
}

impl Outcome {
    pub const ALL: [Outcome; 16] = [
        Outcome::Allowed,
        Outcome::Returned,
        Outcome::ApiNotFound,
        Outcome::OperationNotFound,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::BandwidthExceeded,
        Outcome::IpForbidden,
        Outcome::HeaderCheckFailed,
        Outcome::JwtInvalid,
        Outcome::InternalError,
        Outcome::CountersUnavailable,
        Outcome::CorsPreflight,
        Outcome::CorsUnmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Returned => "returned",
            Outcome::ApiNotFound => "api_not_found",
            Outcome::OperationNotFound => "operation_not_found",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::BandwidthExceeded => "bandwidth_exceeded",
            Outcome::IpForbidden => "ip_forbidden",
            Outcome::HeaderCheckFailed => "header_check_failed",
            Outcome::JwtInvalid => "jwt_invalid",
            Outcome::InternalError => "internal_error",
            Outcome::CountersUnavailable => "counters_unavailable",
            Outcome::CorsPreflight => "cors_preflight",
            Outcome::CorsUnmatched => "cors_unmatched",
        }
    }
}

/// A change to a header map. Names as the policy wrote them; compare without case. Names and
/// literal values are borrowed from the catalog; computed values are owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit<'a> {
    /// Replace every value of the header with this one.
    Set(Cow<'a, str>, Cow<'a, str>),
    /// Add a value, keeping the others.
    Append(Cow<'a, str>, Cow<'a, str>),
    Remove(Cow<'a, str>),
}

/// The header changes of one phase, in order. Most calls make one or two, kept inline.
pub type HeaderEdits<'a> = SmallVec<[HeaderEdit<'a>; 2]>;

/// Where the call's subscription key was found, so an adapter can strip it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    Header(String),
    Query(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeySource {
    Header,
    Query,
}

/// Who a call is: API, operation, product context, subscription, and where its key was.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub api: ApiId,
    pub operation: Option<OperationId>,
    pub product: Option<ProductId>,
    pub subscription: Option<SubscriptionId>,
    pub key: Option<KeySource>,
}

/// A routed call: who it is, and what is left to do for it after the inbound phase.
///
/// Kept within 128 bytes, so that moving it into its [`Decision`] is a few moves rather than a
/// call to copy memory (a test checks the size).
#[derive(Debug, Clone)]
pub struct CallContext {
    pub(crate) id: Identity,
    program: u32,
    /// Headers for the allowed response (remaining-calls and total-calls).
    limit_headers: SmallVec<[LimitHeader; 2]>,
    /// Work for after the upstream, which most calls do not have.
    later: Option<Box<Later>>,
}

/// What an allowed call leaves for after the inbound phase, in one allocation when it is one
/// thing to count (a bandwidth quota, a deferred by-key limit) or the request.
#[derive(Debug, Clone, Default)]
struct Later {
    pending: SmallVec<[Pending; 1]>,
    /// The request, kept only when a later phase evaluates an expression that may read it.
    saved: Option<SavedRequest>,
    /// The variables the inbound phase set, kept only when a later phase may read them.
    variables: Variables,
    /// The `Access-Control-*` headers a `cors` gave the call, for its response.
    cors: Vec<AnswerHeader>,
}

impl CallContext {
    /// A call routed to `api` (and `operation`), before its key is looked for.
    fn routed(api: ApiId, operation: Option<OperationId>) -> Self {
        CallContext {
            id: Identity {
                api,
                operation,
                product: None,
                subscription: None,
                key: None,
            },
            program: 0,
            limit_headers: SmallVec::new(),
            later: None,
        }
    }

    /// Leaves work for the completion.
    fn pend(&mut self, p: Pending) {
        self.later.get_or_insert_default().pending.push(p);
    }

    fn pending(&self) -> &[Pending] {
        self.later.as_deref().map_or(&[], |l| &l.pending)
    }

    /// Does the call leave anything to count when it completes (a bandwidth quota, a by-key
    /// limit counted after the response)? When not, [`Catalog::complete`] does nothing and a
    /// proxy need not call it, nor read the clock for it.
    pub fn counts_at_completion(&self) -> bool {
        !self.pending().is_empty()
    }

    fn variables(&self) -> &[(String, Value)] {
        self.later.as_deref().map_or(&[], |l| &l.variables)
    }

    fn saved(&self) -> Option<&SavedRequest> {
        self.later.as_deref().and_then(|l| l.saved.as_ref())
    }

    /// The request as later phases see it (as the inbound policies left it) and the path and
    /// query it came with: the saved copy, or an empty request when the program reads none
    /// after the inbound phase.
    fn later_request(&self) -> (Request<'_>, (&str, &str)) {
        match self.saved() {
            Some(s) => (s.request(), s.original()),
            None => (
                Request {
                    method: "",
                    host: "",
                    path: "",
                    query: "",
                    headers: &[],
                    client_ip: None,
                },
                ("", ""),
            ),
        }
    }
}

/// The decision on a call.
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    pub outcome: Outcome,
    /// The response to send instead of calling the upstream (every outcome but `allowed`).
    pub response: Option<LocalResponse>,
    /// For `allowed`: changes to the request before it goes upstream.
    pub upstream: HeaderEdits<'a>,
    /// What `emit-metric` steps that ran add to the proxy's counters: name, amount. Emitted
    /// whatever the outcome, as APIM emits when the policy runs.
    pub metrics: Vec<(&'a str, u64)>,
    /// `None` only when no API matched.
    pub call: Option<CallContext>,
}

/// What is known when an allowed exchange completes.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// An internal failure: the configuration's `failureMode` decides what the call gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An expression threw, as APIM's would: what was null, or what went wrong.
    #[error("policy expression failed: {0}")]
    Expression(String),
}

impl From<EvalError> for EngineError {
    fn from(e: EvalError) -> Self {
        EngineError::Expression(e.to_string())
    }
}

impl Decision<'_> {
    /// The decision for an internal failure under `failureMode: closed`.
    pub fn internal_error(call: Option<CallContext>) -> Self {
        Decision {
            outcome: Outcome::InternalError,
            response: Some(response::internal_error()),
            upstream: HeaderEdits::new(),
            metrics: Vec::new(),
            call,
        }
    }

    fn deny(outcome: Outcome, response: LocalResponse, call: Option<CallContext>) -> Self {
        Decision {
            outcome,
            response: Some(response),
            upstream: HeaderEdits::new(),
            metrics: Vec::new(),
            call,
        }
    }
}

impl Catalog {
    /// Decides a call at `now`, counting in `store`. An allowed call's upstream edits end with
    /// the edge's own ([`crate::edge`]); an error is an internal failure, which
    /// [`Catalog::failed`] turns into the configuration's answer.
    pub fn decide<'c>(
        &'c self,
        req: &Request,
        now: Millis,
        store: &dyn CounterStore,
    ) -> Result<Decision<'c>, EngineError> {
        self.decide_counting(req, now, &Local(store))
    }

    /// [`Catalog::decide`] with the call's counter operations going to `counting`.
    pub(crate) fn decide_counting<'c, C: Counting + ?Sized>(
        &'c self,
        req: &Request,
        now: Millis,
        counting: &C,
    ) -> Result<Decision<'c>, EngineError> {
        let Some((api_ix, below)) = self.route(req) else {
            return Ok(Decision::deny(
                Outcome::ApiNotFound,
                response::not_found(),
                None,
            ));
        };
        let api = &self.apis[api_ix.index()];
        if let Some((origin, method)) = cors::preflight(req.method, req.headers) {
            if let Some(answer) = self.preflight(api_ix, req, origin, method) {
                return Ok(answer);
            }
        }
        let mut call = CallContext::routed(api_ix, None);
        if !api.operations.is_empty() {
            match self.operation(api_ix, req, below) {
                Some(o) => call.id.operation = Some(o),
                None => {
                    return Ok(Decision::deny(
                        Outcome::OperationNotFound,
                        response::not_found(),
                        Some(call),
                    ))
                }
            }
        }

        // The key: the header, else (only when the header is absent) the query parameter.
        // An empty value counts as absent; a repeated one is its values joined (no key).
        // Only the key's digest is kept.
        let key = match key_header(req.headers, &api.header_lower).filter(|k| !k.is_empty()) {
            Some(k) => {
                call.id.key = Some(KeySource::Header);
                Some(key_digest(&k))
            }
            None => key_param(req.query, &api.query_name)
                .filter(|k| !k.is_empty())
                .map(|k| {
                    call.id.key = Some(KeySource::Query);
                    key_digest(&k)
                }),
        };
        let mut first_program = None;
        match key {
            Some(digest) => {
                let sub = self.keys.find(&digest).filter(|&s| {
                    let s = &self.subscriptions[s.index()];
                    s.active
                        && match s.scope {
                            // The search that finds the API in the product finds its program.
                            SubscriptionScope::Product(p) => {
                                first_program = self.product_program(p, api_ix);
                                first_program.is_some()
                            }
                            SubscriptionScope::Api(a) => a == api_ix,
                            SubscriptionScope::AllApis | SubscriptionScope::Service => true,
                        }
                });
                let Some(sub) = sub else {
                    return Ok(Decision::deny(
                        Outcome::InvalidKey,
                        response::invalid_key(),
                        Some(call),
                    ));
                };
                call.id.subscription = Some(sub);
                if let SubscriptionScope::Product(p) = self.subscriptions[sub.index()].scope {
                    call.id.product = Some(p);
                }
            }
            None => {
                if let Some(p) = api.open_product {
                    call.id.product = Some(p);
                } else if api.subscription_required {
                    let host = host_of(req.host);
                    return Ok(Decision::deny(
                        Outcome::MissingKey,
                        response::missing_key(host, &api.path_text, &api.header_name),
                        Some(call),
                    ));
                }
            }
        }

        call.program = match first_program {
            Some(first) => first + call.id.operation.map_or(0, |o| o.0),
            None => self.program(call.id.product, api_ix, call.id.operation),
        };
        let program: &Program = &self.programs[call.program as usize];
        let mut run = Run {
            catalog: self,
            counting,
            now,
            reservations: SmallVec::new(),
            reserve: true,
            keyed: SmallVec::new(),
        };
        let mut upstream = HeaderEdits::new();
        let mut line = RequestLine::default();
        let mut metrics = Vec::new();
        let result = self.run_request(
            program,
            req,
            &mut call,
            &mut run,
            (&mut upstream, &mut line, &mut metrics),
        );
        match result {
            Ok(None) => {
                let sent = Request {
                    method: line.method(req),
                    path: line.path(req),
                    query: line.query(req),
                    ..*req
                };
                if program.keeps_request {
                    call.later.get_or_insert_default().saved =
                        Some(SavedRequest::rewritten(&sent, req));
                }
                if let Some(method) = line.method.take() {
                    upstream.push(HeaderEdit::Set(
                        Cow::Borrowed(":method"),
                        Cow::Owned(method),
                    ));
                }
                // Who the call is, named only when identity headers are asked for.
                let identity = match self.edge.identity_headers {
                    true => {
                        let (_, _, product, subscription) = self.names(&call);
                        [product, subscription]
                    }
                    false => [None, None],
                };
                let sent = Request {
                    method: req.method,
                    path: line.path(req),
                    query: line.query(req),
                    ..*req
                };
                self.edge.upstream_edits(
                    &sent,
                    self.key_names(api_ix),
                    identity,
                    line.url.is_some(),
                    &mut upstream,
                );
                Ok(Decision {
                    outcome: Outcome::Allowed,
                    response: None,
                    upstream,
                    metrics,
                    call: Some(call),
                })
            }
            Ok(Some((outcome, response))) => {
                if outcome != Outcome::Returned {
                    run.release_all();
                }
                let mut denied = Decision::deny(outcome, response, Some(call));
                denied.metrics = metrics;
                Ok(denied)
            }
            Err(e) => {
                run.release_all();
                Err(e)
            }
        }
    }

    /// A CORS preflight for `api`: answered from the `cors` policies of the call it asks
    /// about (the operation of the requested method, without a product, since a preflight
    /// carries no key), in the order the effective inbound section holds them. `None` when
    /// none applies: the request is then an ordinary `OPTIONS`.
    fn preflight(
        &self,
        api: ApiId,
        req: &Request,
        origin: &str,
        method: &str,
    ) -> Option<Decision<'_>> {
        let asked = Request { method, ..*req };
        let operation = match self.apis[api.index()].operations.is_empty() {
            true => None,
            false => Some(self.operation(api, &asked, None)?),
        };
        let program = &self.programs[self.program(None, api, operation) as usize];
        let mut policies = program
            .request
            .iter()
            .filter_map(|&ix| match &self.steps[ix as usize] {
                Step::Cors(c) => Some(c),
                _ => None,
            })
            .peekable();
        policies.peek()?;
        let requested = header(req.headers, "access-control-request-headers");
        let mut answer = (Outcome::CorsUnmatched, response::empty_ok(Vec::new()));
        for c in policies {
            if c.allows_origin(origin) {
                let headers = c.preflight(origin, method, requested);
                answer = (Outcome::CorsPreflight, response::empty_ok(headers));
                break;
            }
            if c.terminate_unmatched {
                break;
            }
        }
        let call = CallContext::routed(api, operation);
        Some(Decision::deny(answer.0, answer.1, Some(call)))
    }

    fn run_request<'c, C: Counting + ?Sized>(
        &'c self,
        program: &Program,
        req: &Request,
        call: &mut CallContext,
        run: &mut Run<'c, '_, C>,
        (upstream, line, metrics): (
            &mut HeaderEdits<'c>,
            &mut RequestLine,
            &mut Vec<(&'c str, u64)>,
        ),
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let original = *req;
        // What expressions see is made only for a step that evaluates one.
        let mut variables: Variables = Vec::new();
        // The headers of the first `cors` that allowed the call's origin.
        let mut cors_headers: Option<Vec<AnswerHeader>> = None;
        let request = &program.request;
        let mut i = 0;
        while i < request.len() {
            let (ix, plan) = (request[i], program.plans[i]);
            i += 1;
            let step = &self.steps[ix as usize];
            run.reserve = plan.reserve;
            // Expressions of this step see the variables set so far, and the request line as
            // the policies so far have left it.
            let vars: &[(String, Value)] = &variables;
            let now = Request {
                method: line.method(&original),
                path: line.path(&original),
                query: line.query(&original),
                ..original
            };
            let req = &now;
            let facts = || {
                CallFacts::inbound(
                    self,
                    call.id,
                    *req,
                    (original.path, original.query),
                    run.now,
                    vars,
                )
            };
            let mut changed: Option<RequestLine> = None;
            let denial = match step {
                Step::RateLimit(l) | Step::Quota(l) => {
                    let quota = matches!(step, Step::Quota(_));
                    // A rate limit and a quota of one document side by side, found at load
                    // (`counted_together`), are counted in one update.
                    let partner = request.get(i).filter(|_| plan.with_next).and_then(|&next| {
                        match &self.steps[next as usize] {
                            Step::RateLimit(n) => Some((next, n, false)),
                            Step::Quota(n) => Some((next, n, true)),
                            _ => None,
                        }
                    });
                    let own = plan.own.map(|o| &self.own_limits[o as usize]);
                    match partner {
                        Some(partner) => {
                            i += 1;
                            run.subscription_limits(&[(ix, l, quota), partner], own, call)?
                        }
                        None => run.subscription_limits(&[(ix, l, quota)], own, call)?,
                    }
                }
                Step::RateLimitByKey(l) => run.keyed_limit(ix, l, false, call, &facts())?,
                Step::QuotaByKey(l) => run.keyed_limit(ix, l, true, call, &facts())?,
                Step::CheckHeader {
                    name,
                    status,
                    message,
                    ignore_case,
                    values,
                } => {
                    let found: Vec<&str> = req
                        .headers
                        .iter()
                        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.as_str())
                        .collect();
                    let ok = !found.is_empty()
                        && (values.is_empty()
                            || found.iter().any(|f| {
                                values.iter().any(|v| {
                                    if *ignore_case {
                                        v.eq_ignore_ascii_case(f)
                                    } else {
                                        v == f
                                    }
                                })
                            }));
                    (!ok).then(|| {
                        (
                            Outcome::HeaderCheckFailed,
                            response::header_check_failed(*status, message),
                        )
                    })
                }
                Step::IpFilter { allow, ranges } => {
                    let inside = req.client_ip.is_some_and(|ip| {
                        let n = ip_number(ip);
                        ranges.iter().any(|r| r.from <= n && n <= r.to)
                    });
                    (inside != *allow).then(|| {
                        let ip = req.client_ip.map(|i| i.to_string()).unwrap_or_default();
                        (Outcome::IpForbidden, response::ip_forbidden(&ip))
                    })
                }
                Step::SetHeader(h) => {
                    let exists = |name: &str| header(req.headers, name).is_some();
                    set_header(h, &facts(), &exists, upstream)?;
                    None
                }
                Step::EmitMetric { metric, value } => {
                    let n = match value {
                        Text::Literal(l) => l.trim().parse::<u64>().ok(),
                        Text::Expr(e) => match e.eval(&facts())? {
                            Value::Int(n) => u64::try_from(n).ok(),
                            _ => None,
                        },
                    };
                    let n = n.ok_or_else(|| {
                        EngineError::Expression(format!(
                            "the value of <emit-metric> for {metric} is not a whole number of at least 0"
                        ))
                    })?;
                    metrics.push((metric.as_str(), n));
                    None
                }
                Step::SetMethod(m) => {
                    let mut next = line.clone();
                    next.method = Some(eval_text(m, &facts())?.into_owned());
                    changed = Some(next);
                    None
                }
                Step::SetQueryParameter(p) => {
                    let facts = facts();
                    let values = p
                        .values
                        .iter()
                        .map(|v| eval_text(v, &facts))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut next = line.clone();
                    next.set_query_parameter(req, &p.name, p.action, &values);
                    changed = Some(next);
                    None
                }
                Step::RewriteUri {
                    template,
                    copy_unmatched,
                } => {
                    let template = eval_text(template, &facts())?;
                    let a = &self.apis[call.id.api.index()];
                    let op = call.id.operation.map(|o| &a.operations[o.index()].template);
                    let below = crate::route::below(original.path, a.depth);
                    let parameters =
                        op.map_or_else(Vec::new, |t| t.parameters(below, original.query));
                    let matched: Vec<&str> =
                        op.map_or_else(Vec::new, |t| t.query_names().collect());
                    let mut next = line.clone();
                    next.rewrite(
                        req,
                        a.depth,
                        &template,
                        &parameters,
                        &matched,
                        *copy_unmatched,
                    );
                    changed = Some(next);
                    None
                }
                Step::Respond {
                    status,
                    headers,
                    body,
                } => Some((
                    Outcome::Returned,
                    local_response(*status, headers, body, &facts())?,
                )),
                Step::SetVariable { name, value } => {
                    let v = variable_value(value, &facts())?;
                    set_variable(&mut variables, name, v);
                    None
                }
                Step::Unless { condition, skip } => {
                    if !eval_condition(condition, &facts())? {
                        i += *skip as usize;
                    }
                    None
                }
                Step::Skip(n) => {
                    i += *n as usize;
                    None
                }
                Step::Cors(c) => match header(req.headers, "origin") {
                    Some(_) if cors_headers.is_some() => None,
                    Some(origin) if c.allows_origin(origin) => {
                        cors_headers = Some(c.actual(origin));
                        None
                    }
                    // APIM ends an unmatched simple call (GET, HEAD) when told to; any other
                    // goes on without CORS headers, as does one the policy lets through.
                    Some(_)
                        if c.terminate_unmatched
                            && (req.method.eq_ignore_ascii_case("GET")
                                || req.method.eq_ignore_ascii_case("HEAD")) =>
                    {
                        Some((Outcome::CorsUnmatched, response::empty_ok(Vec::new())))
                    }
                    _ => None,
                },
                Step::ValidateJwt(j) => {
                    let raw = match &j.source {
                        TokenSource::Header(n) => header(req.headers, n).map(Cow::Borrowed),
                        TokenSource::Query(n) => query_param(req.query, n).map(Cow::Owned),
                        TokenSource::Value(t) => Some(eval_text(t, &facts())?),
                    };
                    let checked = j
                        .token(raw.as_deref())
                        .and_then(|t| j.verify(t, run.now).map(|()| t));
                    match checked {
                        Ok(token) => {
                            if let Some(name) = &j.output_variable {
                                let v = jwt::token_variable(token);
                                set_variable(&mut variables, name, v);
                            }
                            None
                        }
                        Err(refusal) => Some((
                            Outcome::JwtInvalid,
                            response::jwt_invalid(
                                j.status,
                                j.message.as_deref().unwrap_or(refusal.default_message()),
                            ),
                        )),
                    }
                }
            };
            if let Some(next) = changed {
                *line = next;
            }
            if let Some((outcome, mut response)) = denial {
                // A browser reads a denial only with the CORS headers already granted.
                if let Some(headers) = cors_headers {
                    response.headers.extend(headers);
                }
                return Ok(Some((outcome, response)));
            }
        }
        if program.keeps_variables && !variables.is_empty() {
            call.later.get_or_insert_default().variables = variables;
        }
        if let Some(headers) = cors_headers {
            call.later.get_or_insert_default().cors = headers;
        }
        Ok(None)
    }

    /// The response that replaces the upstream's, when the call's outbound program returns one
    /// (`return-response` or `mock-response` in `outbound`): the first it reaches. Outbound
    /// header changes and remaining-calls headers then do not apply.
    pub fn outbound_response(
        &self,
        call: &CallContext,
        status: u16,
    ) -> Result<Option<LocalResponse>, EngineError> {
        let mut found = None;
        self.run_response(call, status, &mut |step, facts| {
            if let Step::Respond {
                status: s,
                headers,
                body,
            } = step
            {
                found = Some(local_response(*s, headers, body, facts)?);
                return Ok(true);
            }
            Ok(false)
        })?;
        Ok(found)
    }

    /// Runs an allowed call's outbound program at its response: `choose` and `set-variable`
    /// here, every other step that runs handed to `visit`, until it answers `true`.
    fn run_response<'c>(
        &'c self,
        call: &'c CallContext,
        status: u16,
        visit: &mut dyn FnMut(&'c Step, &CallFacts<'c, '_>) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        let program = &self.programs[call.program as usize];
        let (request, original) = call.later_request();
        let mut variables: Variables = call.variables().to_vec();
        let steps = &program.response;
        let mut i = 0;
        while i < steps.len() {
            let step = &self.steps[steps[i] as usize];
            i += 1;
            let facts = CallFacts {
                catalog: self,
                id: call.id,
                request,
                original,
                status: Some(status),
                now: None,
                variables: &variables,
            };
            match step {
                Step::Unless { condition, skip } => {
                    if !eval_condition(condition, &facts)? {
                        i += *skip as usize;
                    }
                }
                Step::Skip(n) => i += *n as usize,
                Step::SetVariable { name, value } => {
                    let v = variable_value(value, &facts)?;
                    set_variable(&mut variables, name, v);
                }
                _ => {
                    if visit(step, &facts)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The changes to the upstream's response headers of an allowed call: the outbound
    /// program, then the remaining-calls and total-calls headers. `response_header_exists` is
    /// asked only where a `set-header` with `exists-action="skip"` needs to know.
    pub fn respond<'c>(
        &'c self,
        call: &'c CallContext,
        status: u16,
        response_header_exists: &dyn Fn(&str) -> bool,
    ) -> Result<HeaderEdits<'c>, EngineError> {
        let mut edits = HeaderEdits::new();
        self.run_response(call, status, &mut |step, facts| {
            if let Step::SetHeader(h) = step {
                set_header(h, facts, response_header_exists, &mut edits)?;
            }
            Ok(false)
        })?;
        for h in &call.limit_headers {
            if let Some(name) = self.limit_header_name(h) {
                edits.push(HeaderEdit::Set(
                    Cow::Borrowed(name),
                    Cow::Borrowed(h.value.as_str()),
                ));
            }
        }
        if let Some(later) = call.later.as_deref() {
            for (name, value) in &later.cors {
                let (name, value) = (Cow::Borrowed(name.as_ref()), Cow::Borrowed(value.as_ref()));
                // The upstream's own `Vary` stays: the origin is one more thing it varies on.
                edits.push(match name.as_ref() {
                    "vary" => HeaderEdit::Append(name, value),
                    _ => HeaderEdit::Set(name, value),
                });
            }
        }
        Ok(edits)
    }

    /// Counts what is counted when an allowed exchange is over: bandwidth, and the
    /// `increment-condition` of by-key limits.
    pub fn complete(
        &self,
        call: &CallContext,
        done: Completion,
        now: Millis,
        store: &dyn CounterStore,
    ) -> Result<(), EngineError> {
        self.complete_counting(call, done, now, &Local(store))
    }

    /// [`Catalog::complete`] with the counter operations going to `counting`.
    pub(crate) fn complete_counting(
        &self,
        call: &CallContext,
        done: Completion,
        now: Millis,
        counting: &dyn Counting,
    ) -> Result<(), EngineError> {
        let (request, original) = call.later_request();
        let facts = CallFacts {
            catalog: self,
            id: call.id,
            request,
            original,
            status: Some(done.status),
            now: Some(now),
            variables: call.variables(),
        };
        let bytes = done.request_bytes.saturating_add(done.response_bytes);
        let condition = |step: u32| -> Result<bool, EngineError> {
            match &self.steps[step as usize] {
                Step::RateLimitByKey(k) | Step::QuotaByKey(k) => match &k.increment_condition {
                    Some(e) => Ok(eval_condition(e, &facts)?),
                    None => Ok(true),
                },
                _ => Ok(true),
            }
        };
        for p in call.pending() {
            let op = match p {
                Pending::Bandwidth { key, windows } => CounterOp::FixedAdd {
                    key: key.name(),
                    windows: *windows,
                    calls: 0,
                    bytes,
                },
                Pending::OwnBandwidth { key, windows } => CounterOp::OwnAddBytes {
                    key: key.name(),
                    windows: *windows,
                    bytes,
                },
                Pending::SlidingIf {
                    key,
                    period,
                    n,
                    condition: step,
                } => {
                    if !condition(*step)? {
                        continue;
                    }
                    CounterOp::SlidingAdd {
                        key: key.name(),
                        period: *period,
                        n: *n,
                    }
                }
                Pending::FixedIf {
                    key,
                    windows,
                    n,
                    condition: step,
                    bandwidth,
                } => {
                    if !condition(*step)? {
                        continue;
                    }
                    CounterOp::FixedAdd {
                        key: key.name(),
                        windows: *windows,
                        calls: *n,
                        bytes: if *bandwidth { bytes } else { 0 },
                    }
                }
            };
            counting.count(op, now)?;
        }
        Ok(())
    }

    /// The names a call is known by in logs: API, operation, product, subscription.
    pub fn names(&self, call: &CallContext) -> (&str, Option<&str>, Option<&str>, Option<&str>) {
        let id = &call.id;
        let api = &self.apis[id.api.index()];
        (
            &api.name,
            id.operation
                .map(|o| api.operations[o.index()].name.as_str()),
            id.product.map(|p| self.products[p.index()].name.as_str()),
            id.subscription
                .map(|s| self.subscriptions[s.index()].name.as_str()),
        )
    }

    /// Where the call's key was found (to strip it before the upstream).
    pub fn key_location(&self, call: &CallContext) -> Option<KeyLocation> {
        let api = &self.apis[call.id.api.index()];
        call.id.key.map(|k| match k {
            KeySource::Header => KeyLocation::Header(api.header_name.clone()),
            KeySource::Query => KeyLocation::Query(api.query_name.clone()),
        })
    }
}

/// A `return-response` or `mock-response`: its status, its headers as its `set-header`
/// elements make them (names lower-case), its body.
fn local_response(
    status: u16,
    headers: &[SetHeader],
    body: &Text,
    facts: &CallFacts<'_, '_>,
) -> Result<LocalResponse, EngineError> {
    let mut edits = HeaderEdits::new();
    for h in headers {
        set_header(h, facts, &|_| false, &mut edits)?;
    }
    let mut out: Vec<(Cow<'static, str>, Cow<'static, str>)> = Vec::new();
    for e in edits {
        match e {
            HeaderEdit::Set(n, v) => {
                let n = n.to_ascii_lowercase();
                out.retain(|(o, _)| *o != n);
                out.push((Cow::Owned(n), Cow::Owned(v.into_owned())));
            }
            HeaderEdit::Append(n, v) => out.push((
                Cow::Owned(n.to_ascii_lowercase()),
                Cow::Owned(v.into_owned()),
            )),
            HeaderEdit::Remove(n) => out.retain(|(o, _)| !o.eq_ignore_ascii_case(&n)),
        }
    }
    Ok(LocalResponse {
        status,
        headers: out,
        body: eval_text(body, facts)?.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moving a call into its decision copies at most 128 bytes, which the compiler does in
    /// place; a larger context is copied by a call to `memcpy` on every decision.
    #[test]
    fn a_call_context_is_moved_without_a_copy_call() {
        assert!(
            std::mem::size_of::<CallContext>() <= 128,
            "{} bytes",
            std::mem::size_of::<CallContext>()
        );
    }
}
