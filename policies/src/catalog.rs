//! The loaded catalog: every API, product and subscription of a snapshot, indexed for routing
//! and key lookup, with each (product context, API, operation) compiled into its effective
//! program once, at load time. Nothing is parsed per request.

use crate::clock::Millis;
use crate::counters::{own::OwnLimits, FixedWindows};
use crate::edge::config::EdgeOptions;
use crate::error::{LoadError, LoadErrors};
use crate::ids::{ApiId, OperationId, ProductId, SubscriptionId};
use crate::keys::KeyIndex;
pub use crate::policy::UnsupportedPolicies;
use crate::policy::{
    self, Compiler, Scope, ScopeKind, ScopePolicy, Step, BACKEND, INBOUND, OUTBOUND,
};
use crate::route::UrlTemplate;
use crate::snapshot::{self, SubscriptionScope};
use arrayvec::ArrayString;
use hashbrown::HashMap;

/// How a snapshot is loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub unsupported: UnsupportedPolicies,
    /// What the edge does around the decision (key stripping, identity headers, failures).
    pub edge: EdgeOptions,
}

pub(crate) struct Operation {
    pub name: String,
    pub display_name: String,
    pub method: String,
    pub template: UrlTemplate,
}

pub(crate) struct Api {
    pub name: String,
    pub display_name: String,
    pub path: String,
    /// How many segments `path` has: the operation's template matches what follows them.
    pub depth: usize,
    pub path_text: String,
    pub hostnames: Vec<String>,
    pub subscription_required: bool,
    pub header_name: String,
    pub header_lower: String,
    pub query_name: String,
    pub operations: Vec<Operation>,
    /// The product without subscriptions that runs keyless calls, if any.
    pub open_product: Option<ProductId>,
    /// The program of the API's first operation outside any product; the operations' follow in
    /// order (one program when it lists none).
    pub program: u32,
}

pub(crate) struct Product {
    pub name: String,
    pub display_name: String,
    /// Sorted, without repeats.
    pub apis: Vec<ApiId>,
    /// For each of `apis`, the program of its first operation in this product, as
    /// [`Api::program`]. The scope check's search finds it too.
    pub programs: Vec<u32>,
}

pub(crate) struct Subscription {
    pub name: String,
    /// The name as counters are keyed by (ARM names ignore case).
    pub counter_id: CounterId,
    pub display_name: String,
    pub scope: SubscriptionScope,
    pub active: bool,
    pub origin: Millis,
    /// The owner's user id, kept only when some policy reads `context.User`.
    pub user: Option<Box<str>>,
}

/// A subscription's name as its counters are keyed by. Kept inside the subscription when it
/// is short, as nearly every one is (a GUID is 36 bytes), so that counting a call does not
/// fetch it from another place in memory.
pub(crate) enum CounterId {
    Inline(ArrayString<INLINE_COUNTER_ID>),
    Heap(Box<str>),
}

const INLINE_COUNTER_ID: usize = 40;

impl CounterId {
    fn new(id: String) -> Self {
        match ArrayString::from(&id) {
            Ok(inline) => CounterId::Inline(inline),
            Err(_) => CounterId::Heap(id.into_boxed_str()),
        }
    }
}

impl std::ops::Deref for CounterId {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            CounterId::Inline(s) => s,
            CounterId::Heap(s) => s,
        }
    }
}

/// An effective program: step indices for the phases before and after the upstream.
pub(crate) struct Program {
    /// Inbound, then backend.
    pub request: Box<[u32]>,
    /// For each step of `request`: how it runs ([`StepPlan`]).
    pub plans: Box<[StepPlan]>,
    pub response: Box<[u32]>,
    /// A later phase evaluates an expression that may read the request: keep a copy.
    pub keeps_request: bool,
    /// A later phase may read variables the inbound phase set: keep them.
    pub keeps_variables: bool,
}

/// How a step of a program runs, found at load from the steps around it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StepPlan {
    /// Counted with the step after it ([`counted_together`]).
    pub with_next: bool,
    /// A later step (or a limit nested in this one, counted after it) may deny the call or
    /// fail, so what this step counts is reserved, to be taken back then. Where nothing after
    /// it can, the call is final once it is counted.
    pub reserve: bool,
    /// For a `rate-limit` or `quota` (with its partner when `with_next`): the subscription's
    /// own limits it counts ([`crate::counters::own`]), an index into
    /// [`Catalog::own_limits`]. `None` when neither has calls or bandwidth of its own.
    pub own: Option<u32>,
}

/// The distinct own limits of the programs' steps, each kept once ([`StepPlan::own`]).
#[derive(Default)]
struct OwnLimitsTable {
    limits: Vec<OwnLimits>,
    index: HashMap<OwnLimits, u32>,
}

impl OwnLimitsTable {
    fn index_of(&mut self, own: OwnLimits) -> u32 {
        *self.index.entry(own).or_insert_with(|| {
            self.limits.push(own);
            (self.limits.len() - 1) as u32
        })
    }
}

/// Whether a step may deny a call or fail, so that what earlier steps counted must be taken
/// back. A `set-header` or `return-response` with only literal values can do neither (a
/// `return-response` ends the call, but what was counted stays counted).
fn may_deny_or_fail(step: &Step) -> bool {
    let literal = |h: &policy::SetHeader| {
        h.values
            .iter()
            .all(|v| matches!(v, policy::Text::Literal(_)))
    };
    match step {
        Step::SetHeader(h) => !literal(h),
        Step::Respond { headers, body, .. } => {
            !headers.iter().all(literal) || matches!(body, policy::Text::Expr(_))
        }
        Step::SetVariable { value, .. } => matches!(value, policy::Text::Expr(_)),
        Step::SetQueryParameter(p) => !literal(p),
        Step::SetMethod(m)
        | Step::RewriteUri { template: m, .. }
        | Step::EmitMetric { value: m, .. } => {
            matches!(m, policy::Text::Expr(_))
        }
        Step::Skip(_) => false,
        _ => true,
    }
}

/// Does a step read the client's address: an `ip-filter`, or an expression anywhere in it
/// that reads `context.Request.IpAddress`? Every text of every step is looked at.
fn reads_client_address(step: &Step) -> bool {
    use crate::expr::Member::RequestIpAddress as Ip;
    let text = |t: &policy::Text| matches!(t, policy::Text::Expr(e) if e.reads_member(Ip));
    let header = |h: &policy::SetHeader| h.values.iter().any(text);
    match step {
        Step::IpFilter { .. } => true,
        Step::RateLimit(_) | Step::Quota(_) | Step::CheckHeader { .. } | Step::Skip(_) => false,
        Step::RateLimitByKey(k) | Step::QuotaByKey(k) => {
            text(&k.counter_key)
                || text(&k.increment_count)
                || k.increment_condition
                    .as_ref()
                    .is_some_and(|e| e.reads_member(Ip))
        }
        Step::SetHeader(h) | Step::SetQueryParameter(h) => header(h),
        Step::Respond { headers, body, .. } => headers.iter().any(header) || text(body),
        Step::SetVariable { value, .. } => text(value),
        Step::Unless { condition, .. } => condition.reads_member(Ip),
        Step::ValidateJwt(j) => matches!(&j.source, crate::jwt::TokenSource::Value(t) if text(t)),
        Step::Cors(_) => false,
        Step::SetMethod(t)
        | Step::RewriteUri { template: t, .. }
        | Step::EmitMetric { value: t, .. } => text(t),
    }
}

/// The expressions a step evaluates, for what a program must keep for its later phases.
fn expressions(step: &Step) -> Vec<&crate::expr::Expr> {
    fn texts(t: &policy::Text) -> Option<&crate::expr::Expr> {
        match t {
            policy::Text::Expr(e) => Some(e),
            policy::Text::Literal(_) => None,
        }
    }
    let mut out: Vec<&crate::expr::Expr> = Vec::new();
    match step {
        Step::SetHeader(h) => out.extend(h.values.iter().filter_map(texts)),
        Step::Respond { headers, body, .. } => {
            out.extend(
                headers
                    .iter()
                    .flat_map(|h| h.values.iter().filter_map(texts)),
            );
            out.extend(texts(body));
        }
        Step::SetVariable { value, .. } => out.extend(texts(value)),
        Step::SetQueryParameter(p) => out.extend(p.values.iter().filter_map(texts)),
        Step::SetMethod(m)
        | Step::RewriteUri { template: m, .. }
        | Step::EmitMetric { value: m, .. } => out.extend(texts(m)),
        Step::Unless { condition, .. } => out.push(condition),
        Step::RateLimitByKey(k) | Step::QuotaByKey(k) => out.extend(k.increment_condition.as_ref()),
        _ => {}
    }
    out
}

/// The plan of each step of a program's request phase.
fn plans(steps: &[Step], request: &[u32], own: &mut OwnLimitsTable) -> Box<[StepPlan]> {
    let step = |i: usize| request.get(i).map(|&ix| &steps[ix as usize]);
    (0..request.len())
        .map(|i| {
            let with_next =
                step(i + 1).is_some_and(|next| step(i).is_some_and(|s| counted_together(s, next)));
            // A partner counted in the same update is not "later"; a limit's nested limits are.
            let after = i + 1 + usize::from(with_next);
            let nested = step(i).is_some_and(|s| match s {
                Step::RateLimit(l) | Step::Quota(l) => !l.nested.is_empty(),
                _ => false,
            });
            let partner = if with_next { step(i + 1) } else { None };
            StepPlan {
                with_next,
                reserve: nested
                    || (after..request.len()).any(|j| step(j).is_some_and(may_deny_or_fail)),
                own: step(i)
                    .and_then(|s| own_limits(s, partner))
                    .map(|o| own.index_of(o)),
            }
        })
        .collect()
}

/// The own limits of a `rate-limit` or `quota` step and of the `partner` counted with it, in
/// their order in the program; the quota's origin is left for the call to set.
fn own_limits(first: &Step, partner: Option<&Step>) -> Option<OwnLimits> {
    let mut own = OwnLimits {
        rate: None,
        quota: None,
        quota_first: false,
    };
    for (i, step) in std::iter::once(first).chain(partner).enumerate() {
        let (limit, quota) = match step {
            Step::RateLimit(l) => (l, false),
            Step::Quota(l) => (l, true),
            _ => continue,
        };
        let Some(a) = limit.allowance else { continue };
        if quota {
            own.quota = Some(FixedWindows {
                origin: 0,
                period: a.period,
                calls: a.calls,
                bandwidth_kb: a.bandwidth_kb,
            });
            own.quota_first = i == 0;
        } else {
            own.rate = Some((a.calls.unwrap_or(u64::MAX), a.period));
        }
    }
    (own.rate.is_some() || own.quota.is_some()).then_some(own)
}

/// Whether two steps that follow each other in a program are counted in one update: a
/// `rate-limit` and a `quota` of one document, neither with nested limits, whose own counters are
/// one state ([`crate::counters::own`]). Adjacency depends on what each program inlines at
/// `<base />`, so it is found per program, at load.
pub(crate) fn counted_together(first: &Step, second: &Step) -> bool {
    match (first, second) {
        (Step::RateLimit(a), Step::Quota(b)) | (Step::Quota(a), Step::RateLimit(b)) => {
            a.document == b.document && a.nested.is_empty() && b.nested.is_empty()
        }
        _ => false,
    }
}

/// The expressions a program evaluates after its inbound phase: its outbound steps', and the
/// `increment-condition`s of its by-key limits (evaluated when the exchange completes).
fn later_expressions<'s>(
    steps: &'s [Step],
    request: &[u32],
    response: &[u32],
) -> Vec<&'s crate::expr::Expr> {
    let deferred = request.iter().filter_map(|&i| match &steps[i as usize] {
        Step::RateLimitByKey(k) | Step::QuotaByKey(k) => k.increment_condition.as_ref(),
        _ => None,
    });
    let outbound = response
        .iter()
        .flat_map(|&i| expressions(&steps[i as usize]));
    deferred.chain(outbound).collect()
}

/// Does a program evaluate, after the inbound phase, an expression that may read the request?
fn keeps_request(steps: &[Step], request: &[u32], response: &[u32]) -> bool {
    !later_expressions(steps, request, response).is_empty()
}

/// Does a program set variables in its inbound phase that a later phase may read?
fn keeps_variables(steps: &[Step], request: &[u32], response: &[u32]) -> bool {
    request
        .iter()
        .any(|&i| matches!(steps[i as usize], Step::SetVariable { .. }))
        && later_expressions(steps, request, response)
            .iter()
            .any(|e| e.reads_variables())
}

/// The APIs at one path: those bound to hostnames, and the first bound to none. Most paths have
/// one API bound to none, found without looking at the host or at the API.
#[derive(Debug, Default)]
pub(crate) struct PathApis {
    pub bound: Vec<ApiId>,
    pub open: Option<ApiId>,
}

/// A loaded, compiled snapshot. Immutable; a reload builds a new one.
pub struct Catalog {
    pub(crate) service: String,
    /// `context.Deployment.Region`: the service's `location`, or empty.
    pub(crate) region: String,
    pub(crate) apis: Vec<Api>,
    pub(crate) products: Vec<Product>,
    pub(crate) subscriptions: Vec<Subscription>,
    pub(crate) keys: KeyIndex,
    /// Lower-case API path → APIs with that path (differing by hostnames).
    pub(crate) paths: HashMap<String, PathApis>,
    /// The most segments an API path has: routing looks at no longer prefix.
    pub(crate) deepest: usize,
    pub(crate) steps: Vec<Step>,
    pub(crate) programs: Vec<Program>,
    /// The own limits that programs' steps count, each kept once ([`StepPlan::own`]).
    pub(crate) own_limits: Box<[OwnLimits]>,
    /// What the edge does around each decision.
    pub(crate) edge: EdgeOptions,
    warnings: Vec<String>,
    policy_documents: usize,
    /// Each policy document's scope and the elements it uses.
    usage: Vec<(String, Vec<String>)>,
    /// Whether any policy reads the client's address ([`Catalog::reads_client_address`]).
    reads_client_address: bool,
}

pub(crate) const NO_PRODUCT: u32 = u32::MAX;

/// What a catalog holds, for `apim-edge check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub service: String,
    pub apis: usize,
    pub operations: usize,
    pub products: usize,
    pub open_products: usize,
    pub subscriptions: usize,
    pub active_subscriptions: usize,
    pub keys: usize,
    pub policy_documents: usize,
    pub steps: usize,
    pub programs: usize,
}

impl Catalog {
    /// Loads a snapshot from JSON text.
    pub fn load_str(json: &str, options: LoadOptions) -> Result<Catalog, LoadErrors> {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| LoadError::Snapshot {
                path: format!("(line {}, column {})", e.line(), e.column()),
                message: format!("not valid JSON: {e}"),
            })?;
        Self::load(&doc, options)
    }

    /// Loads a snapshot document: validates it, digests its keys and compiles every policy.
    pub fn load(doc: &serde_json::Value, options: LoadOptions) -> Result<Catalog, LoadErrors> {
        let snap = snapshot::read(doc).map_err(LoadErrors)?;
        let mut errors: Vec<LoadError> = Vec::new();
        let mut warnings = Vec::new();
        let mut steps = Vec::new();
        let mut documents = 0usize;

        let mut keys = KeyIndex::default();
        let mut subscriptions = Vec::with_capacity(snap.subscriptions.len());
        // Owners are kept only for policies that read them: a million subscriptions' user ids
        // would otherwise cost tens of megabytes for nothing.
        let reads_user = snap.mentions("context.User");
        for (i, s) in snap.subscriptions.iter().enumerate() {
            for d in &s.keys {
                if let Some(other) = keys.insert(*d, SubscriptionId(i as u32)) {
                    errors.push(LoadError::Snapshot {
                        path: format!("subscriptions[{i}]"),
                        message: format!(
                            "a key of subscription '{}' is also a key of subscription '{}'",
                            s.name,
                            snap.subscriptions[other.index()].name
                        ),
                    });
                }
            }
            subscriptions.push(Subscription {
                name: s.name.clone(),
                counter_id: CounterId::new(s.name.to_ascii_lowercase()),
                display_name: s.display_name.clone(),
                scope: s.scope,
                active: s.state == "active",
                origin: s.origin,
                user: s.user.as_deref().filter(|_| reads_user).map(Box::from),
            });
        }

        let mut compiler = Compiler {
            steps: &mut steps,
            named_values: &snap.named_values,
            fragments: &snap.policy_fragments,
            jwks: &snap.jwks,
            unsupported: options.unsupported,
            warnings: &mut warnings,
            errors: &mut errors,
            steering: String::new(),
            including: Vec::new(),
            usage: Vec::new(),
        };
        let mut compile = |text: &Option<(String, String)>, scope: Scope| -> Option<ScopePolicy> {
            let (src, _) = text.as_ref()?;
            documents += 1;
            compiler.document(src, &scope)
        };
        let global = compile(
            &snap.global_policy,
            Scope {
                kind: ScopeKind::Global,
                label: "global".into(),
                id: "global".into(),
            },
        );
        let product_policies: Vec<Option<ScopePolicy>> = snap
            .products
            .iter()
            .map(|p| {
                compile(
                    &p.policy,
                    Scope {
                        kind: ScopeKind::Product,
                        label: format!("product '{}'", p.name),
                        id: format!("product:{}", p.name.to_ascii_lowercase()),
                    },
                )
            })
            .collect();
        let mut api_policies = Vec::new();
        let mut op_policies = Vec::new();
        for a in &snap.apis {
            let api_id = a.name.to_ascii_lowercase();
            api_policies.push(compile(
                &a.policy,
                Scope {
                    kind: ScopeKind::Api,
                    label: format!("API '{}'", a.name),
                    id: format!("api:{api_id}"),
                },
            ));
            op_policies.push(
                a.operations
                    .iter()
                    .map(|o| {
                        compile(
                            &o.policy,
                            Scope {
                                kind: ScopeKind::Operation,
                                label: format!("operation '{}' of API '{}'", o.name, a.name),
                                id: format!("operation:{api_id}/{}", o.name.to_ascii_lowercase()),
                            },
                        )
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let usage = std::mem::take(&mut compiler.usage);
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }

        let mut apis: Vec<Api> = snap
            .apis
            .iter()
            .map(|a| Api {
                name: a.name.clone(),
                display_name: a.display_name.clone(),
                path: a.path.clone(),
                depth: crate::route::segments(&a.path).count(),
                path_text: a.path_text.clone(),
                hostnames: a.hostnames.clone(),
                subscription_required: a.subscription_required,
                header_lower: a.header_name.to_ascii_lowercase(),
                header_name: a.header_name.clone(),
                query_name: a.query_name.clone(),
                operations: a
                    .operations
                    .iter()
                    .map(|o| Operation {
                        name: o.name.clone(),
                        display_name: o.display_name.clone(),
                        method: o.method.clone(),
                        template: o.template.clone(),
                    })
                    .collect(),
                open_product: None,
                program: 0,
            })
            .collect();
        let mut products: Vec<Product> = snap
            .products
            .iter()
            .map(|p| Product {
                name: p.name.clone(),
                display_name: p.display_name.clone(),
                apis: p.apis.clone(),
                programs: vec![0; p.apis.len()],
            })
            .collect();
        for (pi, p) in snap.products.iter().enumerate() {
            if !p.subscription_required {
                for a in &p.apis {
                    apis[a.index()].open_product = Some(ProductId(pi as u32));
                }
            }
        }

        let mut paths: HashMap<String, PathApis> = HashMap::new();
        let deepest = apis.iter().map(|a| a.depth).max().unwrap_or(0);
        for (i, a) in apis.iter().enumerate() {
            let at = paths.entry(a.path.clone()).or_default();
            if !a.hostnames.is_empty() {
                at.bound.push(ApiId(i as u32));
            } else if at.open.is_none() {
                at.open = Some(ApiId(i as u32));
            }
        }

        // Effective programs: with no product, and in each product that holds the API.
        let mut contexts: Vec<Vec<u32>> = vec![vec![NO_PRODUCT]; apis.len()];
        for (pi, p) in products.iter().enumerate() {
            for a in &p.apis {
                contexts[a.index()].push(pi as u32);
            }
        }
        let mut programs = Vec::new();
        let mut own_limits = OwnLimitsTable::default();
        for (ai, ctxs) in contexts.iter().enumerate() {
            for &pc in ctxs {
                let first = programs.len() as u32;
                if pc == NO_PRODUCT {
                    apis[ai].program = first;
                } else {
                    let p = &mut products[pc as usize];
                    if let Ok(i) = p.apis.binary_search(&ApiId(ai as u32)) {
                        p.programs[i] = first;
                    }
                }
                let product = if pc == NO_PRODUCT {
                    None
                } else {
                    product_policies[pc as usize].as_ref()
                };
                let ops = &op_policies[ai];
                let op_count = ops.len().max(1);
                for oi in 0..op_count {
                    let chain = [
                        global.as_ref(),
                        product,
                        api_policies[ai].as_ref(),
                        ops.get(oi).and_then(Option::as_ref),
                    ];
                    let mut request = policy::inline(&chain, INBOUND);
                    request.extend(policy::inline(&chain, BACKEND));
                    let response = policy::inline(&chain, OUTBOUND);
                    programs.push(Program {
                        keeps_request: keeps_request(&steps, &request, &response),
                        keeps_variables: keeps_variables(&steps, &request, &response),
                        plans: plans(&steps, &request, &mut own_limits),
                        request: request.into_boxed_slice(),
                        response: response.into_boxed_slice(),
                    });
                }
            }
        }

        let reads_client_address = steps.iter().any(reads_client_address);
        Ok(Catalog {
            service: snap.service,
            region: snap.location.clone().unwrap_or_default(),
            apis,
            products,
            subscriptions,
            keys,
            paths,
            deepest,
            steps,
            programs,
            own_limits: own_limits.limits.into_boxed_slice(),
            edge: options.edge,
            warnings: {
                let mut w = warnings;
                w.extend(
                    snap.products
                        .iter()
                        .filter(|p| p.apis.is_empty())
                        .map(|p| format!("product '{}' holds no API", p.name)),
                );
                w
            },
            policy_documents: documents,
            usage,
            reads_client_address,
        })
    }

    /// Each policy document's scope and the policy elements it uses (those of its `choose`
    /// branches too), in load order: what `apim-edge check` shows of a real export.
    pub fn policy_usage(&self) -> &[(String, Vec<String>)] {
        &self.usage
    }

    /// Warnings of the load: skipped policy elements, and the like.
    /// Does any policy read the client's address (`ip-filter`, `context.Request.IpAddress`)?
    /// When none does, a proxy need not look it up for each call: [`Request::client_ip`] may
    /// be `None`.
    ///
    /// [`Request::client_ip`]: crate::Request::client_ip
    pub fn reads_client_address(&self) -> bool {
        self.reads_client_address
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Counts of what the catalog holds.
    pub fn summary(&self) -> Summary {
        Summary {
            service: self.service.clone(),
            apis: self.apis.len(),
            operations: self.apis.iter().map(|a| a.operations.len()).sum(),
            products: self.products.len(),
            open_products: self
                .apis
                .iter()
                .filter_map(|a| a.open_product)
                .collect::<hashbrown::HashSet<_>>()
                .len(),
            subscriptions: self.subscriptions.len(),
            active_subscriptions: self.subscriptions.iter().filter(|s| s.active).count(),
            keys: self.keys_len(),
            policy_documents: self.policy_documents,
            steps: self.steps.len(),
            programs: self.programs.len(),
        }
    }

    fn keys_len(&self) -> usize {
        self.keys.len()
    }

    /// The program of `api`'s first operation in `product`, if the product holds the API.
    pub(crate) fn product_program(&self, product: ProductId, api: ApiId) -> Option<u32> {
        let p = &self.products[product.index()];
        let i = p.apis.binary_search(&api).ok()?;
        p.programs.get(i).copied()
    }

    /// The program of a call of `api` (and `operation`) in `product` (or none).
    pub(crate) fn program(
        &self,
        product: Option<ProductId>,
        api: ApiId,
        operation: Option<OperationId>,
    ) -> u32 {
        let first = match product {
            None => self.apis[api.index()].program,
            Some(p) => self.product_program(p, api).unwrap_or(0),
        };
        first + operation.map_or(0, |o| o.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of a program that are counted with the one after them, by step name.
    fn paired(c: &Catalog, product: &str) -> Vec<&'static str> {
        let p = c.products.iter().position(|p| p.name == product).unwrap() as u32;
        let program = &c.programs[c.program(Some(ProductId(p)), ApiId(0), None) as usize];
        let name = |ix: u32| match &c.steps[ix as usize] {
            Step::RateLimit(_) => "rate-limit",
            Step::Quota(_) => "quota",
            _ => "other",
        };
        program
            .request
            .iter()
            .zip(&program.plans)
            .filter(|(_, plan)| plan.with_next)
            .map(|(&ix, _)| name(ix))
            .collect()
    }

    /// A catalog of one API (`orders`) in one product, whose policy's inbound section is
    /// `inbound`.
    fn with_inbound(inbound: &str) -> Catalog {
        let doc = serde_json::json!({
            "apis": [{"name": "orders", "properties": {"path": "orders"}}],
            "products": [{"name": "p", "apis": ["orders"],
                          "policy": format!("<policies><inbound>{inbound}</inbound></policies>")}]
        });
        Catalog::load(&doc, LoadOptions::default()).unwrap()
    }

    /// The step plans of the product's program in a catalog of [`with_inbound`].
    fn product_plans(c: &Catalog) -> &[StepPlan] {
        &c.programs[c.program(Some(ProductId(0)), ApiId(0), None) as usize].plans
    }

    #[test]
    fn a_step_reserves_what_it_counts_only_when_a_later_step_may_deny_or_fail() {
        let plans = |inbound: &str| {
            let c = with_inbound(inbound);
            product_plans(&c)
                .iter()
                .map(|p| p.reserve)
                .collect::<Vec<_>>()
        };
        let (rate, quota) = (
            r#"<rate-limit calls="5" renewal-period="60" />"#,
            r#"<quota calls="9" renewal-period="60" />"#,
        );
        let literal = r#"<set-header name="x"><value>1</value></set-header>"#;
        let computed = r#"<set-header name="x"><value>@(context.Api.Id)</value></set-header>"#;
        let check = r#"<check-header name="x" failed-check-httpcode="401" failed-check-error-message="no" />"#;
        // Counted together, with nothing after them that can deny: final once counted.
        assert_eq!(
            plans(&format!("{rate}{quota}{literal}")),
            [false, false, false]
        );
        // An expression may fail, a header check may deny.
        assert_eq!(
            plans(&format!("{rate}{quota}{computed}")),
            [true, true, false]
        );
        assert_eq!(plans(&format!("{rate}{check}{quota}")), [true, true, false]);
        // A lone limit's nested limits are counted after its own, and may deny.
        let nested = r#"<rate-limit calls="5" renewal-period="60"><api name="orders" calls="1" renewal-period="60" /></rate-limit>"#;
        assert_eq!(plans(&format!("{nested}{literal}")), [true, false]);
    }

    #[test]
    fn a_limit_steps_own_limits_are_found_at_load_in_the_programs_order() {
        let own = |inbound: &str| {
            let c = with_inbound(inbound);
            let limits = |p: &StepPlan| p.own.map(|o| c.own_limits[o as usize]);
            product_plans(&c).iter().map(limits).collect::<Vec<_>>()
        };
        let (rate, quota) = (
            r#"<rate-limit calls="5" renewal-period="60" />"#,
            r#"<quota calls="9" bandwidth="40" renewal-period="3600" />"#,
        );
        let windows = FixedWindows {
            origin: 0,
            period: 3_600_000,
            calls: Some(9),
            bandwidth_kb: Some(40),
        };
        let both = |quota_first| OwnLimits {
            rate: Some((5, 60_000)),
            quota: Some(windows),
            quota_first,
        };
        // Side by side: the first step's plan has both, in their order.
        assert_eq!(own(&format!("{rate}{quota}"))[0], Some(both(false)));
        assert_eq!(own(&format!("{quota}{rate}"))[0], Some(both(true)));
        // Apart: each its own.
        let check = r#"<check-header name="x" failed-check-httpcode="401" failed-check-error-message="no" />"#;
        let apart = own(&format!("{quota}{check}{rate}"));
        let alone = |rate, quota, quota_first| {
            Some(OwnLimits {
                rate,
                quota,
                quota_first,
            })
        };
        assert_eq!(apart[0], alone(None, Some(windows), true));
        assert_eq!(apart[1], None);
        assert_eq!(apart[2], alone(Some((5, 60_000)), None, false));
        // A limit with only nested limits counts nothing of its own.
        let nested =
            r#"<rate-limit><api name="orders" calls="1" renewal-period="60" /></rate-limit>"#;
        assert_eq!(own(nested), [None]);
    }

    #[test]
    fn a_rate_limit_and_a_quota_are_paired_only_where_they_end_up_side_by_side() {
        // The product's rate limit and quota have `<base />` between them: the service's
        // policy goes there, nothing in one catalog, an ip-filter in the other.
        let catalog = |service_inbound: &str| {
            let doc = serde_json::json!({
                "service": {"name": "s", "policy": format!("<policies><inbound>{service_inbound}</inbound></policies>")},
                "apis": [{"name": "orders", "properties": {"path": "orders"}}],
                "products": [{"name": "p", "apis": ["orders"],
                              "policy": r#"<policies><inbound><rate-limit calls="5" renewal-period="60" /><base /><quota calls="9" renewal-period="60" /></inbound></policies>"#}]
            });
            Catalog::load(&doc, LoadOptions::default()).unwrap()
        };
        assert_eq!(paired(&catalog(""), "p"), ["rate-limit"]);
        let filtered =
            catalog(r#"<ip-filter action="forbid"><address>192.0.2.9</address></ip-filter>"#);
        assert!(paired(&filtered, "p").is_empty());
    }
}
