//! The decision for one call (SPEC §3): route to an API and operation, find the key and the
//! subscription, pick the product context, and run the effective program. A call then has two
//! more moments: [`Catalog::respond`] when the upstream's response headers arrive (outbound
//! header changes, remaining-calls headers), and [`Catalog::complete`] when the exchange is
//! over (bandwidth, `increment-condition`).

use crate::catalog::{Catalog, PathApis, Program};
use crate::clock::Millis;
use crate::counters::own::{self, OwnLimits, OwnVerdicts};
use crate::counters::{
    self, CounterName, CounterStore, FixedWindows, KeptName, StoreError, Verdict,
};
use crate::expr::{Expr, Facts, Member, NullReference, Value};
use crate::keys::key_digest;
use crate::policy::{
    ip_number, ExistsAction, KeyedLimit, Nested, SetHeader, Step, SubscriptionLimit, Text,
};
use crate::response::{self, LocalResponse};
use crate::route::{first_segments, segments, Below, PathShape};
use crate::snapshot::SubscriptionScope;
use arrayvec::ArrayString;
use smallvec::SmallVec;
use std::borrow::Cow;
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
struct SavedRequest {
    method: String,
    host: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    client_ip: Option<IpAddr>,
}

impl SavedRequest {
    fn of(r: &Request) -> Self {
        SavedRequest {
            method: r.method.to_string(),
            host: r.host.to_string(),
            path: r.path.to_string(),
            query: r.query.to_string(),
            headers: r.headers.to_vec(),
            client_ip: r.client_ip,
        }
    }

    fn request(&self) -> Request<'_> {
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
    InternalError,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
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
        Outcome::InternalError,
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
            Outcome::InternalError => "internal_error",
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
    pub api: u32,
    pub operation: Option<u32>,
    pub product: Option<u32>,
    pub subscription: Option<u32>,
    pub key: Option<KeySource>,
}

/// Work left for the completion of an allowed call.
#[derive(Debug, Clone)]
enum Pending {
    /// Add the exchange's bytes to a quota window.
    Bandwidth {
        key: KeptName,
        windows: FixedWindows,
    },
    /// Add them to the quota's part of a subscription's own counters of a document.
    OwnBandwidth {
        key: KeptName,
        windows: FixedWindows,
    },
    /// `rate-limit-by-key` with an `increment-condition`.
    SlidingIf {
        key: KeptName,
        period: Millis,
        n: u32,
        condition: u32,
    },
    /// `quota-by-key` with an `increment-condition`.
    FixedIf {
        key: KeptName,
        windows: FixedWindows,
        n: u64,
        condition: u32,
        bandwidth: bool,
    },
}

/// A counted admission, taken back when a later limit denies the call.
#[derive(Debug, Clone)]
enum Reservation<'a> {
    /// In a subscription's own counters of a document: the rate limit's admission at
    /// `rate_at`, the quota's in the window of `(period, start)`.
    Own {
        owner: &'a str,
        document: &'a str,
        rate_at: Option<Millis>,
        quota: Option<(Millis, Millis)>,
    },
    Sliding {
        counter: Counter<'a>,
        at: Millis,
        n: u32,
    },
    Fixed {
        counter: Counter<'a>,
        windows: FixedWindows,
        start: Millis,
        n: u64,
    },
}

/// A counter as a limit names it: the parts of its name. A reservation keeps these rather than
/// the name, which it needs only when a call is denied.
#[derive(Debug, Clone)]
struct Counter<'a> {
    kind: &'static str,
    owner: &'a str,
    name: Cow<'a, str>,
}

impl Counter<'_> {
    /// The counter's stable name, `kind|owner|name` (`rl|sub-1|product:starter/rate-limit`).
    fn name(&self) -> CounterName<'_> {
        CounterName::new(self.kind, self.owner, &self.name)
    }
}

/// The kind of a subscription's own counters of a document (`sl|sub-1|product:starter`).
const OWN_KIND: &str = "sl";

/// A remaining-calls or total-calls header of the allowed response: the limit step that names
/// it, and the value's digits (kept here, so that the response borrows them rather than
/// allocates).
#[derive(Debug, Clone, Copy)]
struct LimitHeader {
    step: u32,
    total: bool,
    value: Digits,
}

/// The decimal digits of a number (a u64 has at most 20), kept where the response borrows them.
#[derive(Debug, Clone, Copy, Default)]
struct Digits(ArrayString<20>);

impl Digits {
    /// Writes `value`'s digits where they are kept.
    fn set(&mut self, value: u64) {
        self.0.clear();
        // A u64 has at most 20 digits: the push always fits.
        let _ = self.0.try_push_str(itoa::Buffer::new().format(value));
    }

    fn as_str(&self) -> &str {
        &self.0
    }
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
}

impl CallContext {
    /// Leaves work for the completion.
    fn pend(&mut self, p: Pending) {
        self.later.get_or_insert_default().pending.push(p);
    }

    fn pending(&self) -> &[Pending] {
        self.later.as_deref().map_or(&[], |l| &l.pending)
    }

    fn saved(&self) -> Option<&SavedRequest> {
        self.later.as_deref().and_then(|l| l.saved.as_ref())
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
    #[error("policy expression failed: {0} is null")]
    Expression(&'static str),
}

impl From<NullReference> for EngineError {
    fn from(n: NullReference) -> Self {
        EngineError::Expression(n.0)
    }
}

impl Decision<'_> {
    /// The decision for an internal failure under `failureMode: closed`.
    pub fn internal_error(call: Option<CallContext>) -> Self {
        Decision {
            outcome: Outcome::InternalError,
            response: Some(response::internal_error()),
            upstream: HeaderEdits::new(),
            call,
        }
    }

    fn deny(outcome: Outcome, response: LocalResponse, call: Option<CallContext>) -> Self {
        Decision {
            outcome,
            response: Some(response),
            upstream: HeaderEdits::new(),
            call,
        }
    }
}

/// A path without its leading and trailing slashes.
fn trim_slashes(path: &str) -> &str {
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
fn host_of(host: &str) -> &str {
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

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A query parameter's value, `+` and percent-escapes decoded.
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
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

/// What expressions see during a call.
struct CallFacts<'c, 'r> {
    catalog: &'c Catalog,
    id: Identity,
    request: Request<'r>,
    status: Option<u16>,
}

impl<'c> CallFacts<'c, '_> {
    /// A member that is text of the catalog, borrowed for as long as the catalog lives:
    /// `Some(None)` when it is null for this call, `None` when the member is not catalog text.
    fn catalog_member(&self, m: Member) -> Option<Option<&'c str>> {
        let c = self.catalog;
        let api = &c.apis[self.id.api as usize];
        let op = self.id.operation.map(|o| &api.operations[o as usize]);
        let product = self.id.product.map(|p| &c.products[p as usize]);
        let sub = self.id.subscription.map(|s| &c.subscriptions[s as usize]);
        Some(match m {
            Member::SubscriptionId => sub.map(|s| s.name.as_str()),
            Member::SubscriptionName => sub.map(|s| s.display_name.as_str()),
            Member::ProductId => product.map(|p| p.name.as_str()),
            Member::ProductName => product.map(|p| p.display_name.as_str()),
            Member::ApiId => Some(&api.name),
            Member::ApiName => Some(&api.display_name),
            Member::OperationId => op.map(|o| o.name.as_str()),
            Member::OperationName => op.map(|o| o.display_name.as_str()),
            Member::OperationMethod => Some(op?.method.as_str()),
            _ => return None,
        })
    }
}

impl Facts for CallFacts<'_, '_> {
    fn member(&self, m: Member) -> Option<String> {
        if let Some(text) = self.catalog_member(m) {
            return text.map(str::to_string);
        }
        let api = &self.catalog.apis[self.id.api as usize];
        Some(match m {
            Member::SubscriptionKey => {
                self.id.subscription?;
                match self.id.key? {
                    KeySource::Header => {
                        header(self.request.headers, &api.header_lower)?.to_string()
                    }
                    KeySource::Query => query_param(self.request.query, &api.query_name)?,
                }
            }
            Member::ApiPath => format!("/{}", api.path_text),
            // Without an operation (catalog text otherwise).
            Member::OperationMethod => self.request.method.to_string(),
            Member::RequestIpAddress => self.request.client_ip?.to_string(),
            Member::RequestMethod => self.request.method.to_string(),
            Member::RequestUrlPath => self.request.path.to_string(),
            Member::ResponseStatusCode => self.status?.to_string(),
            // Catalog text, answered above.
            Member::SubscriptionId
            | Member::SubscriptionName
            | Member::ProductId
            | Member::ProductName
            | Member::ApiId
            | Member::ApiName
            | Member::OperationId
            | Member::OperationName => return None,
        })
    }
    fn status(&self) -> Option<u16> {
        self.status
    }
    fn header(&self, lower_name: &str) -> Option<&str> {
        header(self.request.headers, lower_name)
    }
    fn query(&self, name: &str) -> Option<String> {
        query_param(self.request.query, name)
    }
}

fn eval_text<'t>(t: &'t Text, facts: &dyn Facts) -> Result<Cow<'t, str>, NullReference> {
    match t {
        Text::Literal(s) => Ok(Cow::Borrowed(s)),
        Text::Expr(e) => Ok(Cow::Owned(e.eval(facts)?.into_text())),
    }
}

/// [`eval_text`] for a header value: a value that is catalog text (`@(context.Api.Id)`) is
/// borrowed, not copied.
fn eval_value<'c>(t: &'c Text, facts: &CallFacts<'c, '_>) -> Result<Cow<'c, str>, NullReference> {
    if let Text::Expr(Expr::Member(m)) = t {
        if let Some(text) = facts.catalog_member(*m) {
            return text.map(Cow::Borrowed).ok_or(NullReference(m.owner()));
        }
    }
    eval_text(t, facts)
}

fn eval_condition(e: &Expr, facts: &dyn Facts) -> Result<bool, NullReference> {
    Ok(e.eval(facts)? == Value::Bool(true))
}

/// Applies `set-header` to a header map's view, producing edits.
fn set_header<'c>(
    h: &'c SetHeader,
    facts: &CallFacts<'c, '_>,
    exists: &dyn Fn(&str) -> bool,
    edits: &mut HeaderEdits<'c>,
) -> Result<(), NullReference> {
    // The latest edit of this header decides; without one, the header map as it came.
    let present = || {
        edits
            .iter()
            .rev()
            .find_map(|e| match e {
                HeaderEdit::Set(n, _) | HeaderEdit::Append(n, _)
                    if n.eq_ignore_ascii_case(&h.name) =>
                {
                    Some(true)
                }
                HeaderEdit::Remove(n) if n.eq_ignore_ascii_case(&h.name) => Some(false),
                _ => None,
            })
            .unwrap_or_else(|| exists(&h.name))
    };
    match h.action {
        ExistsAction::Delete => edits.push(HeaderEdit::Remove(Cow::Borrowed(&h.name))),
        ExistsAction::Skip if present() => {}
        action => {
            for (i, v) in h.values.iter().enumerate() {
                let v = eval_value(v, facts)?;
                if i == 0 && action != ExistsAction::Append {
                    edits.push(HeaderEdit::Set(Cow::Borrowed(&h.name), v));
                } else {
                    edits.push(HeaderEdit::Append(Cow::Borrowed(&h.name), v));
                }
            }
        }
    }
    Ok(())
}

fn nested_matches(n: &Nested, name: &str, display: &str) -> bool {
    n.id.as_deref()
        .is_some_and(|id| id.eq_ignore_ascii_case(name))
        || n.name
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case(name) || x == display)
}

/// Denial from a limit's verdict; a 429 names its wait in the limit's `retry_after_header`.
fn limit_denial(
    v: Verdict,
    retry_after_header: impl FnOnce() -> Cow<'static, str>,
) -> Option<(Outcome, LocalResponse)> {
    match v {
        Verdict::Admitted { .. } => None,
        Verdict::RateLimited { wait } => Some((
            Outcome::RateLimited,
            response::rate_limited(wait, retry_after_header()),
        )),
        Verdict::QuotaExceeded { bandwidth, seconds } => Some((
            if bandwidth {
                Outcome::BandwidthExceeded
            } else {
                Outcome::QuotaExceeded
            },
            response::quota_exceeded(bandwidth, seconds),
        )),
    }
}

/// One run of a request program.
struct Run<'a, 's> {
    catalog: &'a Catalog,
    store: &'s dyn CounterStore,
    now: Millis,
    reservations: SmallVec<[Reservation<'a>; 2]>,
    /// The step being run must reserve what it counts ([`crate::catalog::StepPlan`]).
    reserve: bool,
    /// The by-key counters this call has met, so that each counts the call once however many
    /// policies name the same key value (APIM: "if multiple policies would increment the same
    /// key value, it is incremented only once per request").
    keyed: SmallVec<[KeyedCount<'a>; 1]>,
}

/// A by-key counter a call has met: by kind, window and key value, and the weight it counted
/// the call with (none yet when its `increment-condition` leaves that to the completion).
#[derive(Debug, Clone)]
struct KeyedCount<'a> {
    kind: &'static str,
    window: &'a str,
    value: Cow<'a, str>,
    counted: u64,
}

impl<'a> Run<'a, '_> {
    fn release_all(&mut self) {
        for r in self.reservations.drain(..).rev() {
            // Best effort: a failed release under-admits, never over-admits.
            let _ = match r {
                Reservation::Own {
                    owner,
                    document,
                    rate_at,
                    quota,
                } => own::release(
                    self.store,
                    &CounterName::new(OWN_KIND, owner, document),
                    rate_at,
                    quota,
                ),
                Reservation::Sliding { counter, at, n } => {
                    counters::sliding_release(self.store, &counter.name(), at, n)
                }
                Reservation::Fixed {
                    counter,
                    windows,
                    start,
                    n,
                } => windows.release(self.store, &counter.name(), start, n),
            };
        }
    }

    /// `rate-limit` and `quota` steps of one document: one alone, or the two when they stand
    /// side by side without nested limits. Their own counters are counted in one update (see
    /// [`own`]); then a lone limit's nested counters that match, each on its own.
    fn subscription_limits(
        &mut self,
        limits: &[(u32, &'a SubscriptionLimit, bool)],
        own: Option<&OwnLimits>,
        call: &mut CallContext,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let Some(sub) = call.id.subscription else {
            return Ok(None); // counted per subscription: keyless calls are not limited
        };
        let subscription = &self.catalog.subscriptions[sub as usize];
        // Each limit's headline: the remaining and total calls of its first counter with calls.
        let mut headlines: [Option<(u64, u64)>; 2] = [None; 2];
        if let Some(&(mut own)) = own {
            if let Some(q) = &mut own.quota {
                q.origin = subscription.origin;
            }
            let mut verdicts = OwnVerdicts::default();
            let document = &limits[0].1.document;
            self.admit_own(
                &subscription.counter_id,
                document,
                &own,
                call,
                &mut verdicts,
            )?;
            for (i, &(_, limit, quota)) in limits.iter().enumerate() {
                let verdict = match quota {
                    true => verdicts.quota.map(|(v, _)| v),
                    false => verdicts.rate,
                };
                let Some(verdict) = verdict else { continue };
                if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
                    return Ok(Some(denial));
                }
                if let (Verdict::Admitted { remaining }, Some(calls)) =
                    (verdict, limit.allowance.and_then(|a| a.calls))
                {
                    headlines[i] = Some((remaining, calls));
                }
            }
        }
        if let [(_, limit, quota)] = *limits {
            if let Some(denial) = self.nested_limits(limit, quota, call, &mut headlines[0])? {
                return Ok(Some(denial));
            }
        }
        // Read where they lie: copied out, the headlines' bytes would be loaded wider than they
        // were just stored, and wait for the stores.
        for (&(step, limit, _), headline) in limits.iter().zip(&headlines) {
            let named = limit.remaining_header.is_some() || limit.total_header.is_some();
            if let (&Some((remaining, total)), true) = (headline, named) {
                self.limit_headers(
                    call,
                    step,
                    [&limit.remaining_header, &limit.total_header],
                    remaining,
                    total,
                );
            }
        }
        Ok(None)
    }

    /// A subscription's own counters of `document` ([`own`]): one update, reserved as one
    /// when the step's plan says so.
    fn admit_own(
        &mut self,
        owner: &'a str,
        document: &'a str,
        own: &OwnLimits,
        call: &mut CallContext,
        verdicts: &mut OwnVerdicts,
    ) -> Result<(), EngineError> {
        let key = &CounterName::new(OWN_KIND, owner, document);
        own.admit(self.store, key, self.now, verdicts)?;
        let admitted = |v: Option<Verdict>| v.is_none_or(|v| matches!(v, Verdict::Admitted { .. }));
        if admitted(verdicts.rate) && admitted(verdicts.quota.map(|(v, _)| v)) {
            if let Some(windows) = own.quota.filter(|w| w.bandwidth_kb.is_some()) {
                call.pend(Pending::OwnBandwidth {
                    key: KeptName::of(key),
                    windows,
                });
            }
            if !self.reserve {
                return Ok(());
            }
            self.reservations.push(Reservation::Own {
                owner,
                document,
                rate_at: own.rate.map(|_| self.now),
                quota: own
                    .quota
                    .zip(verdicts.quota)
                    .map(|(w, (_, start))| (w.period, start)),
            });
        }
        Ok(())
    }

    /// The `<api>` limits nested in a `rate-limit` or `quota` that match the call, and their
    /// `<operation>` limits that match, each counted on its own. `headline` is set by the first
    /// with calls, unless the limit's own counter set it.
    fn nested_limits(
        &mut self,
        limit: &'a SubscriptionLimit,
        quota: bool,
        call: &mut CallContext,
        headline: &mut Option<(u64, u64)>,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        if limit.nested.is_empty() {
            return Ok(None);
        }
        let Some(sub) = call.id.subscription else {
            return Ok(None);
        };
        let c = self.catalog;
        let subscription = &c.subscriptions[sub as usize];
        let api = &c.apis[call.id.api as usize];
        let op = call.id.operation.map(|o| &api.operations[o as usize]);
        let mut counters: SmallVec<[(&str, crate::policy::Allowance); 4]> = SmallVec::new();
        for n in &limit.nested {
            if nested_matches(n, &api.name, &api.display_name) {
                counters.push((&n.counter, n.allowance));
                if let Some(op) = op {
                    for o in &n.operations {
                        if nested_matches(o, &op.name, &op.display_name) {
                            counters.push((&o.counter, o.allowance));
                        }
                    }
                }
            }
        }
        for &(counter, a) in &counters {
            let counter = Counter {
                kind: if quota { "q" } else { "rl" },
                owner: &subscription.counter_id,
                name: Cow::Borrowed(counter),
            };
            let verdict = if quota {
                let windows = FixedWindows {
                    origin: subscription.origin,
                    period: a.period,
                    calls: a.calls,
                    bandwidth_kb: a.bandwidth_kb,
                };
                self.admit_fixed(counter, windows, 1, call)?
            } else {
                self.admit_sliding(counter, a.calls.unwrap_or(u64::MAX), a.period, 1)?
            };
            if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
                return Ok(Some(denial));
            }
            if let (Verdict::Admitted { remaining }, None, Some(calls)) =
                (verdict, *headline, a.calls)
            {
                *headline = Some((remaining, calls));
            }
        }
        Ok(None)
    }

    fn keyed_limit(
        &mut self,
        step: u32,
        limit: &'a KeyedLimit,
        quota: bool,
        call: &mut CallContext,
        facts: &dyn Facts,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let value = eval_text(&limit.counter_key, facts)?;
        let n: u64 = match &limit.increment_count {
            Text::Literal(l) => l.parse().unwrap_or(1),
            Text::Expr(e) => match e.eval(facts)? {
                Value::Int(i) => i.max(0) as u64,
                _ => 1,
            },
        };
        let a = limit.allowance;
        let kind = if quota { "qk" } else { "rlk" };
        if let Some(met) = self
            .keyed
            .iter()
            .find(|k| k.kind == kind && k.window == limit.window && k.value == value)
        {
            // Counted (or left to count) by an earlier policy of this call: this one only
            // checks its own limit, with the call's weight already in the counter.
            let already = met.counted;
            return self.keyed_check(step, limit, quota, value, already, call);
        }
        self.keyed.push(KeyedCount {
            kind,
            window: &limit.window,
            value: value.clone(),
            counted: if limit.increment_condition.is_some() {
                0
            } else {
                n
            },
        });
        let verdict = if quota {
            let counter = Counter {
                kind: "qk",
                owner: &limit.window,
                name: value,
            };
            let windows = FixedWindows {
                origin: limit.first_period_start,
                period: a.period,
                calls: a.calls,
                bandwidth_kb: a.bandwidth_kb,
            };
            match &limit.increment_condition {
                None => self.admit_fixed(counter, windows, n, call)?,
                Some(_) => {
                    let key = &counter.name();
                    let v = windows.check(self.store, key, self.now)?;
                    call.pend(Pending::FixedIf {
                        key: KeptName::of(key),
                        windows,
                        n,
                        condition: step,
                        bandwidth: a.bandwidth_kb.is_some(),
                    });
                    v
                }
            }
        } else {
            let counter = Counter {
                kind: "rlk",
                owner: &limit.window,
                name: value,
            };
            let calls = a.calls.unwrap_or(u64::MAX);
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            match &limit.increment_condition {
                None => self.admit_sliding(counter, calls, a.period, n)?,
                Some(_) => {
                    let key = &counter.name();
                    let v = counters::sliding_check(self.store, key, calls, a.period, self.now)?;
                    call.pend(Pending::SlidingIf {
                        key: KeptName::of(key),
                        period: a.period,
                        n,
                        condition: step,
                    });
                    v
                }
            }
        };
        if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
            // A denied call leaves nothing to count at completion.
            if let Some(later) = &mut call.later {
                later.pending.retain(|p| !matches!(p, Pending::SlidingIf { condition, .. } | Pending::FixedIf { condition, .. } if *condition == step));
            }
            return Ok(Some(denial));
        }
        if let (Verdict::Admitted { remaining }, Some(calls)) = (verdict, a.calls) {
            let remaining = if limit.increment_condition.is_some() {
                remaining.saturating_sub(n)
            } else {
                remaining
            };
            self.limit_headers(
                call,
                step,
                [&limit.remaining_header, &limit.total_header],
                remaining,
                calls,
            );
        }
        Ok(None)
    }
}

impl<'a> Run<'a, '_> {
    /// A by-key limit whose counter an earlier policy of this call has met: the counter
    /// already holds `already` of this call's weight, so the limit admits when what it holds
    /// without them is under the limit. Nothing is counted or left to count.
    fn keyed_check(
        &mut self,
        step: u32,
        limit: &'a KeyedLimit,
        quota: bool,
        value: Cow<'a, str>,
        already: u64,
        call: &mut CallContext,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let a = limit.allowance;
        let calls = a.calls.map(|c| c.saturating_add(already));
        let verdict = if quota {
            let windows = FixedWindows {
                origin: limit.first_period_start,
                period: a.period,
                calls,
                bandwidth_kb: a.bandwidth_kb,
            };
            windows.check(
                self.store,
                &CounterName::new("qk", &limit.window, &value),
                self.now,
            )?
        } else {
            counters::sliding_check(
                self.store,
                &CounterName::new("rlk", &limit.window, &value),
                calls.unwrap_or(u64::MAX),
                a.period,
                self.now,
            )?
        };
        if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
            return Ok(Some(denial));
        }
        if let (Verdict::Admitted { remaining }, Some(calls)) = (verdict, a.calls) {
            self.limit_headers(
                call,
                step,
                [&limit.remaining_header, &limit.total_header],
                remaining.saturating_sub(already),
                calls,
            );
        }
        Ok(None)
    }

    /// Counts a call of weight `n` in fixed windows. An admission is reserved (taken back if a
    /// later limit denies the call) and, for a bandwidth quota, left for the completion.
    fn admit_fixed(
        &mut self,
        counter: Counter<'a>,
        windows: FixedWindows,
        n: u64,
        call: &mut CallContext,
    ) -> Result<Verdict, EngineError> {
        let key = &counter.name();
        let (v, start) = windows.admit(self.store, key, self.now, n)?;
        if matches!(v, Verdict::Admitted { .. }) {
            if windows.bandwidth_kb.is_some() {
                call.pend(Pending::Bandwidth {
                    key: KeptName::of(key),
                    windows,
                });
            }
            self.reservations.push(Reservation::Fixed {
                counter,
                windows,
                start,
                n,
            });
        }
        Ok(v)
    }

    /// Counts a call of weight `n` in a sliding window, reserved as in [`Self::admit_fixed`].
    fn admit_sliding(
        &mut self,
        counter: Counter<'a>,
        calls: u64,
        period: Millis,
        n: u32,
    ) -> Result<Verdict, EngineError> {
        let key = &counter.name();
        let v = counters::sliding_admit(self.store, key, calls, period, self.now, n)?;
        if matches!(v, Verdict::Admitted { .. }) {
            self.reservations.push(Reservation::Sliding {
                counter,
                at: self.now,
                n,
            });
        }
        Ok(v)
    }

    /// Records the remaining-calls and total-calls headers of limit `step` (those it names); a
    /// later limit's header of the same name replaces an earlier one.
    fn limit_headers(
        &self,
        call: &mut CallContext,
        step: u32,
        [remaining, total]: [&Option<String>; 2],
        left: u64,
        calls: u64,
    ) {
        if let Some(name) = remaining {
            self.limit_header(call, step, false, name, left);
        }
        if let Some(name) = total {
            self.limit_header(call, step, true, name, calls);
        }
    }

    fn limit_header(&self, call: &mut CallContext, step: u32, total: bool, name: &str, value: u64) {
        if !call.limit_headers.is_empty() {
            call.limit_headers
                .retain(|h| self.catalog.limit_header_name(h) != Some(name));
        }
        call.limit_headers.push(LimitHeader {
            step,
            total,
            value: Digits::default(),
        });
        // The digits are set where they are kept ([`Digits::set`]), not moved in afterwards.
        if let Some(h) = call.limit_headers.last_mut() {
            h.value.set(value);
        }
    }
}

impl Catalog {
    fn limit_header_name(&self, h: &LimitHeader) -> Option<&str> {
        let (remaining, total) = match &self.steps[h.step as usize] {
            Step::RateLimit(l) | Step::Quota(l) => (&l.remaining_header, &l.total_header),
            Step::RateLimitByKey(k) | Step::QuotaByKey(k) => (&k.remaining_header, &k.total_header),
            _ => return None,
        };
        if h.total { total } else { remaining }.as_deref()
    }
}

/// An API path looked up in the catalog's paths: hashed as the `String` keys are, compared
/// where it lies.
#[derive(Hash)]
struct PathText<'a>(&'a str);

impl hashbrown::Equivalent<String> for PathText<'_> {
    fn equivalent(&self, key: &String) -> bool {
        self.0 == key.as_str()
    }
}

impl Catalog {
    /// The API of a request, and the part of its path below the API's (when the path is as it
    /// came, else found again by the operation).
    fn route<'r>(&self, req: &Request<'r>) -> Option<(u32, Option<Below<'r>>)> {
        // Nearly every path is its own normal form: its segments, lower case, joined by single
        // slashes (outer slashes aside). Then it is routed as it is, without a copy, and what is
        // below the API's path has the segments the API's path has not.
        let trimmed = trim_slashes(req.path);
        let shape = PathShape::of(trimmed);
        if shape.needs_normalising() {
            return self.route_normalised(req).map(|a| (a, None));
        }
        let segments = if trimmed.is_empty() {
            0
        } else {
            shape.slashes + 1
        };
        self.longest_api(trimmed, req.host).map(|(a, end)| {
            let depth = self.apis[a as usize].depth;
            (
                a,
                Some(Below::normal(
                    &trimmed[end..],
                    segments.saturating_sub(depth),
                )),
            )
        })
    }

    /// [`Self::route`] for a path with upper case or doubled slashes: routed in its normal form.
    #[cold]
    fn route_normalised(&self, req: &Request) -> Option<u32> {
        let mut joined = String::with_capacity(req.path.len());
        for seg in segments(req.path) {
            if !joined.is_empty() {
                joined.push('/');
            }
            joined.extend(seg.chars().map(|c| c.to_ascii_lowercase()));
        }
        self.longest_api(&joined, req.host).map(|(a, _)| a)
    }

    /// The API for `host` whose path is the longest segment-aligned prefix of `path` (a normal
    /// form, without outer slashes), and that prefix's length. Prefixes are tried longest first,
    /// from the first `deepest` segments (no API path is longer), down to the empty path.
    fn longest_api(&self, path: &str, host: &str) -> Option<(u32, usize)> {
        let mut end = first_segments(path, self.deepest);
        loop {
            if let Some(a) = self
                .paths
                .get(&PathText(&path[..end]))
                .and_then(|apis| self.api_for_host(apis, host))
            {
                return Some((a, end));
            }
            if end == 0 {
                return None;
            }
            // The prefix one segment shorter: up to the '/' before this one's last segment.
            end = path.as_bytes()[..end]
                .iter()
                .rposition(|&b| b == b'/')
                .unwrap_or(0);
        }
    }

    /// Of the APIs at one path, the one bound to `host`, else the one bound to none. The host
    /// is looked at only when an API there is bound to some.
    fn api_for_host(&self, apis: &PathApis, host: &str) -> Option<u32> {
        if apis.bound.is_empty() {
            return apis.open;
        }
        let host = host_of(host);
        let bound = apis.bound.iter().find(|&&a| {
            self.apis[a as usize]
                .hostnames
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
        });
        bound.copied().or(apis.open)
    }

    /// The operation of `api` whose method and template match: the most specific (the most
    /// literal characters), the first listed of equals.
    fn operation(&self, api: u32, req: &Request, below: Option<Below>) -> Option<u32> {
        let a = &self.apis[api as usize];
        let below = below.unwrap_or_else(|| Below::new(crate::route::below(req.path, a.depth)));
        let mut best: Option<(usize, u32)> = None;
        for (i, o) in a.operations.iter().enumerate() {
            // A request's method is nearly always written as its operation's.
            let method = o.method == req.method
                || o.method == "*"
                || o.method.eq_ignore_ascii_case(req.method);
            let specificity = o.template.specificity;
            if method && best.is_none_or(|(s, _)| specificity > s) && o.template.matches(&below) {
                best = Some((specificity, i as u32));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The API a request routes to, if any.
    pub(crate) fn route_api(&self, req: &Request) -> Option<u32> {
        self.route(req).map(|(api, _)| api)
    }

    /// Decides a call at `now`, counting in `store`. An allowed call's upstream edits end with
    /// the edge's own ([`crate::edge`]); an error is an internal failure, which
    /// [`Catalog::failed`] turns into the configuration's answer.
    pub fn decide<'c>(
        &'c self,
        req: &Request,
        now: Millis,
        store: &dyn CounterStore,
    ) -> Result<Decision<'c>, EngineError> {
        let Some((api_ix, below)) = self.route(req) else {
            return Ok(Decision::deny(
                Outcome::ApiNotFound,
                response::not_found(),
                None,
            ));
        };
        let api = &self.apis[api_ix as usize];
        let mut call = CallContext {
            id: Identity {
                api: api_ix,
                operation: None,
                product: None,
                subscription: None,
                key: None,
            },
            program: 0,
            limit_headers: SmallVec::new(),
            later: None,
        };
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
        // An empty value counts as absent.
        // Only the key's digest is kept.
        let key = match header(req.headers, &api.header_lower).filter(|k| !k.is_empty()) {
            Some(k) => {
                call.id.key = Some(KeySource::Header);
                Some(key_digest(k))
            }
            None => query_param(req.query, &api.query_name)
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
                    let s = &self.subscriptions[s as usize];
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
                if let SubscriptionScope::Product(p) = self.subscriptions[sub as usize].scope {
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
            Some(first) => first + call.id.operation.unwrap_or(0),
            None => self.program(call.id.product, api_ix, call.id.operation),
        };
        let program: &Program = &self.programs[call.program as usize];
        let mut run = Run {
            catalog: self,
            store,
            now,
            reservations: SmallVec::new(),
            reserve: true,
            keyed: SmallVec::new(),
        };
        let mut upstream = HeaderEdits::new();
        let result = self.run_request(program, req, &mut call, &mut run, &mut upstream);
        match result {
            Ok(None) => {
                if program.keeps_request {
                    call.later.get_or_insert_default().saved = Some(SavedRequest::of(req));
                }
                let (_, _, product, subscription) = self.names(&call);
                self.edge.upstream_edits(
                    req,
                    self.key_names(api_ix),
                    [product, subscription],
                    &mut upstream,
                );
                Ok(Decision {
                    outcome: Outcome::Allowed,
                    response: None,
                    upstream,
                    call: Some(call),
                })
            }
            Ok(Some((outcome, response))) => {
                if outcome != Outcome::Returned {
                    run.release_all();
                }
                Ok(Decision::deny(outcome, response, Some(call)))
            }
            Err(e) => {
                run.release_all();
                Err(e)
            }
        }
    }

    fn run_request<'c>(
        &'c self,
        program: &Program,
        req: &Request,
        call: &mut CallContext,
        run: &mut Run<'c, '_>,
        upstream: &mut HeaderEdits<'c>,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        // What expressions see, made only for a step that evaluates one (who the call is does
        // not change while its program runs).
        let facts = |id: Identity| CallFacts {
            catalog: self,
            id,
            request: *req,
            status: None,
        };
        let mut steps = program.request.iter().zip(program.plans.iter()).peekable();
        while let Some((&ix, plan)) = steps.next() {
            let step = &self.steps[ix as usize];
            run.reserve = plan.reserve;
            let denial = match step {
                Step::RateLimit(l) | Step::Quota(l) => {
                    let quota = matches!(step, Step::Quota(_));
                    // A rate limit and a quota of one document side by side, found at load
                    // (`counted_together`), are counted in one update.
                    let partner =
                        steps
                            .peek()
                            .filter(|_| plan.with_next)
                            .and_then(|&(&next, _)| match &self.steps[next as usize] {
                                Step::RateLimit(n) => Some((next, n, false)),
                                Step::Quota(n) => Some((next, n, true)),
                                _ => None,
                            });
                    let own = plan.own.map(|o| &self.own_limits[o as usize]);
                    match partner {
                        Some(partner) => {
                            steps.next();
                            run.subscription_limits(&[(ix, l, quota), partner], own, call)?
                        }
                        None => run.subscription_limits(&[(ix, l, quota)], own, call)?,
                    }
                }
                Step::RateLimitByKey(l) => run.keyed_limit(ix, l, false, call, &facts(call.id))?,
                Step::QuotaByKey(l) => run.keyed_limit(ix, l, true, call, &facts(call.id))?,
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
                    set_header(h, &facts(call.id), &exists, upstream)?;
                    None
                }
                Step::Respond {
                    status,
                    headers,
                    body,
                } => {
                    let mut edits = HeaderEdits::new();
                    let facts = facts(call.id);
                    for h in headers {
                        set_header(h, &facts, &|_| false, &mut edits)?;
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
                            HeaderEdit::Remove(n) => {
                                out.retain(|(o, _)| !o.eq_ignore_ascii_case(&n))
                            }
                        }
                    }
                    Some((
                        Outcome::Returned,
                        LocalResponse {
                            status: *status,
                            headers: out,
                            body: body.clone(),
                        },
                    ))
                }
            };
            if denial.is_some() {
                return Ok(denial);
            }
        }
        Ok(None)
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
        let program = &self.programs[call.program as usize];
        let mut edits = HeaderEdits::new();
        let empty: [(String, String); 0] = [];
        let request = match call.saved() {
            Some(s) => s.request(),
            None => Request {
                method: "",
                host: "",
                path: "",
                query: "",
                headers: &empty,
                client_ip: None,
            },
        };
        let facts = CallFacts {
            catalog: self,
            id: call.id,
            request,
            status: Some(status),
        };
        for &ix in program.response.iter() {
            if let Step::SetHeader(h) = &self.steps[ix as usize] {
                set_header(h, &facts, response_header_exists, &mut edits)?;
            }
        }
        for h in &call.limit_headers {
            if let Some(name) = self.limit_header_name(h) {
                edits.push(HeaderEdit::Set(
                    Cow::Borrowed(name),
                    Cow::Borrowed(h.value.as_str()),
                ));
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
        let empty: [(String, String); 0] = [];
        let request = match call.saved() {
            Some(s) => s.request(),
            None => Request {
                method: "",
                host: "",
                path: "",
                query: "",
                headers: &empty,
                client_ip: None,
            },
        };
        let facts = CallFacts {
            catalog: self,
            id: call.id,
            request,
            status: Some(done.status),
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
            match p {
                Pending::Bandwidth { key, windows } => {
                    windows.add(store, &key.name(), now, 0, bytes)?
                }
                Pending::OwnBandwidth { key, windows } => {
                    own::add_bytes(store, &key.name(), windows, now, bytes)?
                }
                Pending::SlidingIf {
                    key,
                    period,
                    n,
                    condition: step,
                } => {
                    if condition(*step)? {
                        counters::sliding_add(store, &key.name(), *period, now, *n)?;
                    }
                }
                Pending::FixedIf {
                    key,
                    windows,
                    n,
                    condition: step,
                    bandwidth,
                } => {
                    if condition(*step)? {
                        windows.add(
                            store,
                            &key.name(),
                            now,
                            *n,
                            if *bandwidth { bytes } else { 0 },
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The names a call is known by in logs: API, operation, product, subscription.
    pub fn names(&self, call: &CallContext) -> (&str, Option<&str>, Option<&str>, Option<&str>) {
        let id = &call.id;
        let api = &self.apis[id.api as usize];
        (
            &api.name,
            id.operation
                .map(|o| api.operations[o as usize].name.as_str()),
            id.product.map(|p| self.products[p as usize].name.as_str()),
            id.subscription
                .map(|s| self.subscriptions[s as usize].name.as_str()),
        )
    }

    /// Where the call's key was found (to strip it before the upstream).
    pub fn key_location(&self, call: &CallContext) -> Option<KeyLocation> {
        let api = &self.apis[call.id.api as usize];
        call.id.key.map(|k| match k {
            KeySource::Header => KeyLocation::Header(api.header_name.clone()),
            KeySource::Query => KeyLocation::Query(api.query_name.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        /// A header's value is the number's decimal text, for every u64: short ones (made in
        /// a register) and long ones (digit by digit), and the 16 digits between.
        #[test]
        fn digits_are_the_numbers_decimal_text(
            v in prop_oneof![0..1_000u64, 0..10u64.pow(16), 10u64.pow(15)..10u64.pow(17), any::<u64>()]
        ) {
            let mut digits = Digits::default();
            digits.set(v);
            prop_assert_eq!(digits.as_str(), v.to_string());
        }
    }

    #[test]
    fn digits_at_the_edges() {
        // Set over longer digits too: the old ones do not show.
        let mut digits = Digits::default();
        let edge = 10u64.pow(16);
        for v in [
            u64::MAX,
            0,
            9,
            10,
            99,
            100,
            999_999,
            edge - 1,
            edge,
            u64::MAX,
            7,
        ] {
            digits.set(v);
            assert_eq!(digits.as_str(), v.to_string());
        }
    }

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
