//! The policy language: compiling one scope's policy document into the steps the edge runs.
//!
//! A document is read once, at load time (named values substituted, either XML format), and each
//! section becomes a list of [`Node`]s: a compiled [`Step`] or the place of `<base />`. The
//! catalog then inlines scopes into effective programs. Placement rules are APIM's; elements
//! outside the edge subset are refused or skipped as the configuration says.

use crate::clock::{parse_rfc3339, Millis, YEAR_ONE};
use crate::cors::{self, Allowed, Cors};
use crate::error::LoadError;
use crate::expr::{self, Expr, Ty};
use crate::jwt::{self, JwtCheck, JwtFault, TokenSource};
use crate::xml::{self, Element, Pos};
use hashbrown::HashMap;
use std::borrow::Cow;
use std::net::IpAddr;

/// What to do with a policy element outside the edge subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnsupportedPolicies {
    /// Refuse the snapshot, naming the element and its scope (the default).
    #[default]
    Reject,
    /// Skip the element and warn once, as APIM's self-hosted gateway does.
    Skip,
}

/// The level a policy document is attached at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScopeKind {
    Global,
    Product,
    Api,
    Operation,
}

/// A policy document's scope: its kind, how errors name it, and the stable identifier that
/// counters of its limits are keyed by (the same across reloads).
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub kind: ScopeKind,
    pub label: String,
    pub id: String,
}

pub(crate) const SECTIONS: [&str; 4] = ["inbound", "backend", "outbound", "on-error"];

/// Elements APIM allows once per policy definition (its policy reference: "this policy can be
/// used only once per policy definition").
const ONCE_PER_DOCUMENT: [&str; 3] = ["rate-limit", "quota", "cors"];
pub(crate) const INBOUND: usize = 0;
pub(crate) const BACKEND: usize = 1;
pub(crate) const OUTBOUND: usize = 2;
pub(crate) const ON_ERROR: usize = 3;

/// One entry of a compiled section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    /// `<base />`: the enclosing scope's section goes here.
    Base,
    /// An index into the catalog's step arena.
    Step(u32),
}

/// A scope's compiled document: each section, or `None` where the document has none (which
/// inherits the section whole, as if it held only `<base />`).
#[derive(Debug, Clone, Default)]
pub(crate) struct ScopePolicy {
    pub sections: [Option<Vec<Node>>; 4],
}

/// A text that is either literal or a policy expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Text {
    Literal(String),
    Expr(Expr),
}

/// A limit's size: calls and/or kilobytes per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allowance {
    pub calls: Option<u64>,
    pub bandwidth_kb: Option<u64>,
    /// Milliseconds; 0 (quotas only) never renews.
    pub period: Millis,
}

/// A nested `<api>` or `<operation>` limit, matched by `name` or `id`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Nested {
    pub name: Option<String>,
    pub id: Option<String>,
    pub counter: String,
    pub allowance: Allowance,
    pub operations: Vec<Nested>,
}

/// `rate-limit` (sliding window) or `quota` (fixed windows), per subscription.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SubscriptionLimit {
    /// The policy document it stands in (its scope's id): a subscription's own counters of the
    /// document's rate limit and quota are kept together under it.
    pub document: String,
    /// `document/element`: the name its nested counters are named under, and its own counter
    /// was in builds that kept the rate limit's and the quota's apart.
    pub counter: String,
    pub allowance: Option<Allowance>,
    pub nested: Vec<Nested>,
    pub retry_after_header: Cow<'static, str>,
    pub remaining_header: Option<String>,
    pub total_header: Option<String>,
}

/// `rate-limit-by-key` or `quota-by-key`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeyedLimit {
    pub allowance: Allowance,
    pub counter_key: Text,
    pub increment_condition: Option<Expr>,
    pub increment_count: Text,
    pub first_period_start: Millis,
    /// The middle of the counter's name, made at load: the period (and for `quota-by-key` the
    /// first period's start), so that limits with different windows never share a counter.
    pub window: String,
    pub retry_after_header: Cow<'static, str>,
    pub remaining_header: Option<String>,
    pub total_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExistsAction {
    Override,
    Skip,
    Append,
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SetHeader {
    pub name: String,
    pub action: ExistsAction,
    pub values: Vec<Text>,
}

/// An inclusive range of addresses of one family (IPv4 as IPv4-mapped IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddressRange {
    pub from: u128,
    pub to: u128,
}

pub(crate) fn ip_number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6),
        },
    }
}

/// A step of an effective program.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    RateLimit(SubscriptionLimit),
    Quota(SubscriptionLimit),
    RateLimitByKey(KeyedLimit),
    QuotaByKey(KeyedLimit),
    CheckHeader {
        name: String,
        status: u16,
        message: String,
        ignore_case: bool,
        values: Vec<String>,
    },
    IpFilter {
        allow: bool,
        ranges: Vec<AddressRange>,
    },
    SetHeader(SetHeader),
    /// `return-response` and `mock-response`.
    Respond {
        status: u16,
        headers: Vec<SetHeader>,
        body: Text,
    },
    /// `set-variable`: a literal value is a string.
    SetVariable {
        name: String,
        value: Text,
    },
    /// A `<when>` of a `<choose>`: when the condition is false, the next `skip` steps of the
    /// program (the branch, and the jump after it) are passed over.
    Unless {
        condition: Expr,
        skip: u32,
    },
    /// The end of a `<when>` branch that ran: the next `n` steps (the other branches) are
    /// passed over.
    Skip(u32),
    ValidateJwt(Box<JwtCheck>),
    /// `cors`: a preflight is answered from it; an actual call from an allowed origin gets its
    /// headers, one from another origin is ended or let through as it says.
    Cors(Box<Cors>),
    /// `set-method`: the method the upstream gets.
    SetMethod(Text),
    /// `emit-metric`: add `value` to the proxy's counter `metric` (`apim_edge.metric.` and the
    /// namespace and name, made safe for a stats name).
    EmitMetric {
        metric: String,
        value: Text,
    },
    /// `set-query-parameter`: as `set-header`, on the query's parameters of that name.
    SetQueryParameter(SetHeader),
    /// `rewrite-uri`: what follows the API's path becomes the template, filled with the
    /// operation's parameters; the call's other query parameters follow when `copy_unmatched`.
    RewriteUri {
        template: Text,
        copy_unmatched: bool,
    },
}

/// Why an element could not be compiled.
enum Fault {
    /// Outside the edge subset: refused or skipped as configured.
    Unsupported(Pos, String),
    /// Not valid APIM: always a load error.
    Invalid(Pos, String),
}

type Compiled<T> = Result<T, Fault>;

/// Compiles documents into the shared step arena.
pub(crate) struct Compiler<'a> {
    pub steps: &'a mut Vec<Step>,
    pub named_values: &'a HashMap<String, String>,
    /// The snapshot's policy fragments, by name.
    pub fragments: &'a HashMap<String, String>,
    /// The snapshot's JWK sets, by `openid-config` URL.
    pub jwks: &'a HashMap<String, serde_json::Value>,
    pub unsupported: UnsupportedPolicies,
    pub warnings: &'a mut Vec<String>,
    pub errors: &'a mut Vec<LoadError>,
    /// The steering texts of the document being compiled ([`steering`]).
    pub steering: String,
    /// The fragments being included, innermost last: a fragment that includes itself is refused.
    pub including: Vec<String>,
    /// For each document compiled: its scope and the policy elements it uses, for `check`.
    pub usage: Vec<(String, Vec<String>)>,
}

/// The deepest fragments may include fragments.
const MAX_FRAGMENT_DEPTH: usize = 8;

/// Is this a possible named-value name (letters, digits, `.`, `-`, `_`)?
pub(crate) fn is_named_value_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Replaces `{{name}}` from the named values; an unknown name is an error at its position.
/// A `{{` that does not open a well-formed reference is left as it is.
pub(crate) fn substitute_named_values(
    text: &str,
    named: &HashMap<String, String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(found) = text[i..].find("{{") {
        let open = i + found;
        let reference = text[open + 2..]
            .find("}}")
            .map(|close| &text[open + 2..open + 2 + close])
            .filter(|name| is_named_value_name(name));
        let Some(name) = reference else {
            out.push_str(&text[i..open + 2]);
            i = open + 2;
            continue;
        };
        let value = named
            .get(name)
            .or_else(|| {
                named
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
            .ok_or_else(|| (open, format!("named value '{name}' is not defined")))?;
        out.push_str(&text[i..open]);
        out.push_str(value);
        i = open + 2 + name.len() + 2;
    }
    out.push_str(&text[i..]);
    Ok(out)
}

impl Compiler<'_> {
    fn error(&mut self, scope: &Scope, pos: Pos, message: String) {
        self.errors.push(LoadError::Policy {
            scope: scope.label.clone(),
            line: pos.line,
            column: pos.column,
            message,
        });
    }

    /// Compiles one document; faults are recorded and the scope's result is `None`.
    pub fn document(&mut self, source: &str, scope: &Scope) -> Option<ScopePolicy> {
        let text = match substitute_named_values(source, self.named_values) {
            Ok(t) => t,
            Err((offset, message)) => {
                let pos = xml::position_of(source, offset);
                self.error(scope, pos, message);
                return None;
            }
        };
        let root = match xml::parse_document(&text) {
            Ok(r) => r,
            Err(e) => {
                self.error(scope, e.pos, e.message);
                return None;
            }
        };
        if root.name != "policies" {
            self.error(
                scope,
                root.pos,
                format!("the root element is <{}>, expected <policies>", root.name),
            );
            return None;
        }
        let before = self.errors.len();
        let mut used = std::collections::BTreeSet::new();
        for section in &root.children {
            policy_elements(&section.children, &mut used);
        }
        self.usage.push((
            scope.label.clone(),
            used.into_iter().map(str::to_string).collect(),
        ));
        self.steering.clear();
        steering(&root, &mut self.steering);
        // What included fragments hold steers too: their whole text, to be safe.
        let mut ids = Vec::new();
        fragment_ids(&root, &mut ids);
        for id in ids {
            if let Some(f) = self.fragments.get(id) {
                self.steering.push_str(f);
            }
        }
        let mut policy = ScopePolicy::default();
        let mut once: Vec<(String, Pos)> = Vec::new();
        for section in &root.children {
            let Some(index) = SECTIONS.iter().position(|s| *s == section.name) else {
                self.error(
                    scope,
                    section.pos,
                    format!("<{}> is not a policy section", section.name),
                );
                continue;
            };
            if policy.sections[index].is_some() {
                self.error(
                    scope,
                    section.pos,
                    format!("section <{}> appears twice", section.name),
                );
                continue;
            }
            let mut nodes = Vec::new();
            self.nodes(
                &section.children,
                scope,
                index,
                &mut once,
                false,
                &mut nodes,
            );
            policy.sections[index] = Some(nodes);
        }
        (self.errors.len() == before).then_some(policy)
    }

    /// Compiles a list of elements (a section, or a branch of a `<choose>`) into `out`.
    fn nodes(
        &mut self,
        children: &[Element],
        scope: &Scope,
        section: usize,
        once: &mut Vec<(String, Pos)>,
        in_branch: bool,
        out: &mut Vec<Node>,
    ) {
        for el in children {
            if section != INBOUND && section != BACKEND && mentions(el, "UtcNow") {
                // The proxy's response and log callbacks are not given the call's time.
                let why = format!(
                    "DateTime.UtcNow in the {} section is not supported at the edge ({})",
                    SECTIONS[section], scope.label
                );
                self.fault(scope, el, Fault::Unsupported(el.pos, why));
                continue;
            }
            if ONCE_PER_DOCUMENT.contains(&el.name.as_str()) {
                if let Some(first) = once.iter().find(|(n, _)| *n == el.name) {
                    let (line, column) = (first.1.line, first.1.column);
                    self.error(
                        scope,
                        el.pos,
                        format!(
                            "<{}> may appear only once in a policy document (the first is at line {line}, column {column})",
                            el.name
                        ),
                    );
                    continue;
                }
                once.push((el.name.clone(), el.pos));
            }
            if el.name == "cors" && in_branch {
                // A preflight runs the inbound section's top-level cors policies only.
                self.error(
                    scope,
                    el.pos,
                    "<cors> must be a direct child of <inbound> (not in a <choose> or a fragment)"
                        .into(),
                );
                continue;
            }
            if el.name == "include-fragment" {
                match self.fragment(el, scope, section, once) {
                    Ok(nodes) => out.extend(nodes),
                    Err(f) => self.fault(scope, el, f),
                }
                continue;
            }
            if el.name == "choose" {
                match self.choose(el, scope, section, once) {
                    Ok(nodes) => out.extend(nodes),
                    Err(f) => self.fault(scope, el, f),
                }
                continue;
            }
            match self.element(el, scope, section) {
                // A branch's steps are counted by the jumps around them: a scope inlined
                // there would move them.
                Ok(Some(Node::Base)) if in_branch => self.fault(
                    scope,
                    el,
                    Fault::Unsupported(
                        el.pos,
                        format!(
                            "<base /> inside <choose> or a fragment is not supported at the edge ({})",
                            scope.label
                        ),
                    ),
                ),
                Ok(Some(node)) => out.push(node),
                Ok(None) => {}
                Err(f) => self.fault(scope, el, f),
            }
        }
    }

    /// An element that could not be compiled: an error, or under `skip` a warning for an
    /// element outside the subset that can neither deny, limit nor authenticate.
    fn fault(&mut self, scope: &Scope, el: &Element, fault: Fault) {
        match fault {
            Fault::Invalid(pos, m) => self.error(scope, pos, m),
            Fault::Unsupported(pos, m) => match self.unsupported {
                UnsupportedPolicies::Reject => self.error(scope, pos, m),
                UnsupportedPolicies::Skip => match self.guard(el) {
                    Some(why) => self.error(scope, pos, format!("{m}; it is not skipped: {why}")),
                    None => {
                        let w = format!(
                            "{} policy, line {}, column {}: skipped: {m}",
                            scope.label, pos.line, pos.column
                        );
                        if !self.warnings.contains(&w) {
                            self.warnings.push(w);
                        }
                    }
                },
            },
        }
    }

    /// Why an element must not be skipped, if it must not.
    fn guard(&self, el: &Element) -> Option<String> {
        if let Some(guard) = guard_within(el) {
            return Some(if guard == el.name {
                format!("<{guard}> can deny, limit or authenticate calls")
            } else {
                format!(
                    "<{}> holds <{guard}>, which can deny, limit or authenticate calls",
                    el.name
                )
            });
        }
        let name = el.attr("name").filter(|_| el.name == "set-variable")?;
        self.steering
            .contains(&format!("\"{name}\""))
            .then(|| format!("variable '{name}' steers a <choose> or a limit of this document"))
    }

    /// `<include-fragment>`: the fragment's elements compiled in its place (a fragment holds no
    /// `<base />`). Faults inside it are named by the fragment and their place in it.
    fn fragment(
        &mut self,
        el: &Element,
        scope: &Scope,
        section: usize,
        once: &mut Vec<(String, Pos)>,
    ) -> Compiled<Vec<Node>> {
        let id = required(el, "fragment-id")?;
        let Some((name, source)) = self.fragments.get_key_value(id).or_else(|| {
            self.fragments
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(id))
        }) else {
            return Err(Fault::Invalid(
                el.pos,
                format!("fragment '{id}' is not in the snapshot's policyFragments"),
            ));
        };
        if self.including.iter().any(|f| f == name) || self.including.len() >= MAX_FRAGMENT_DEPTH {
            return Err(Fault::Invalid(
                el.pos,
                format!(
                    "fragment '{id}' includes itself, or fragments nest more than {MAX_FRAGMENT_DEPTH} deep"
                ),
            ));
        }
        let inner = Scope {
            kind: scope.kind,
            label: format!("fragment '{name}' (included by {})", scope.label),
            id: scope.id.clone(),
        };
        let text = match substitute_named_values(source, self.named_values) {
            Ok(t) => t,
            Err((offset, message)) => {
                self.error(&inner, xml::position_of(source, offset), message);
                return Ok(Vec::new());
            }
        };
        let root = match xml::parse_document(&text) {
            Ok(r) => r,
            Err(e) => {
                self.error(&inner, e.pos, e.message);
                return Ok(Vec::new());
            }
        };
        if root.name != "fragment" {
            self.error(
                &inner,
                root.pos,
                format!("the root element is <{}>, expected <fragment>", root.name),
            );
            return Ok(Vec::new());
        }
        self.including.push(name.clone());
        let mut out = Vec::new();
        self.nodes(&root.children, &inner, section, once, true, &mut out);
        self.including.pop();
        Ok(out)
    }

    /// `<choose>`: each `<when>` becomes a conditional jump over its branch, and each branch
    /// but the last ends with a jump over the rest; `<otherwise>` is the last branch.
    fn choose(
        &mut self,
        el: &Element,
        scope: &Scope,
        section: usize,
        once: &mut Vec<(String, Pos)>,
    ) -> Compiled<Vec<Node>> {
        let mut branches: Vec<(Option<Expr>, Vec<Node>)> = Vec::new();
        let mut otherwise = false;
        for c in &el.children {
            if otherwise {
                return Err(Fault::Invalid(
                    c.pos,
                    "<otherwise> must be the last element of <choose>".into(),
                ));
            }
            let condition = match c.name.as_str() {
                "when" => {
                    let v = c.attr("condition").ok_or_else(|| missing(c, "condition"))?;
                    Some(match text(c, "'condition'", v, Ty::Bool)? {
                        Text::Expr(e) => e,
                        Text::Literal(l) => match l.trim().to_ascii_lowercase().as_str() {
                            "true" => Expr::Bool(true),
                            "false" => Expr::Bool(false),
                            _ => {
                                return Err(Fault::Invalid(
                                    c.pos,
                                    format!(
                                        "'condition' of <when> must be an expression, not \"{l}\""
                                    ),
                                ))
                            }
                        },
                    })
                }
                "otherwise" => {
                    otherwise = true;
                    None
                }
                other => {
                    return Err(Fault::Invalid(
                        c.pos,
                        format!("<{other}> is not allowed inside <choose>"),
                    ))
                }
            };
            let mut body = Vec::new();
            self.nodes(&c.children, scope, section, once, true, &mut body);
            branches.push((condition, body));
        }
        // From the last branch back: what follows a branch is known when it is laid out.
        let mut tail: Vec<Node> = Vec::new();
        for (condition, body) in branches.into_iter().rev() {
            let mut block = Vec::with_capacity(body.len() + 2);
            let jump = !tail.is_empty();
            if let Some(condition) = condition {
                let skip = body.len() + usize::from(jump);
                block.push(self.push(Step::Unless {
                    condition,
                    skip: skip as u32,
                }));
            }
            block.extend(body);
            if jump {
                block.push(self.push(Step::Skip(tail.len() as u32)));
            }
            block.extend(tail);
            tail = block;
        }
        Ok(tail)
    }

    fn push(&mut self, step: Step) -> Node {
        self.steps.push(step);
        Node::Step(self.steps.len() as u32 - 1)
    }

    fn element(&mut self, el: &Element, scope: &Scope, section: usize) -> Compiled<Option<Node>> {
        let sname = SECTIONS[section];
        let only = |sections: &[usize]| -> Compiled<()> {
            if sections.contains(&section) {
                Ok(())
            } else {
                Err(Fault::Invalid(
                    el.pos,
                    format!("<{}> is not allowed in the {sname} section", el.name),
                ))
            }
        };
        let step = match el.name.as_str() {
            "base" => return Ok(Some(Node::Base)),
            // Tracing is for APIM's own debugging tools: accepted, nothing to do at the edge.
            "trace" => {
                required(el, "source")?;
                return Ok(None);
            }
            "forward-request" => {
                only(&[BACKEND])?;
                // The proxy's router forwards the call; nothing to do at the edge.
                return Ok(None);
            }
            "rate-limit" => {
                only(&[INBOUND])?;
                if scope.kind == ScopeKind::Global {
                    return Err(Fault::Invalid(
                        el.pos,
                        "<rate-limit> is allowed only at product, API or operation scope".into(),
                    ));
                }
                Step::RateLimit(subscription_limit(el, scope, false)?)
            }
            "quota" => {
                only(&[INBOUND])?;
                if scope.kind != ScopeKind::Product {
                    return Err(Fault::Invalid(
                        el.pos,
                        "<quota> is allowed only at product scope".into(),
                    ));
                }
                Step::Quota(subscription_limit(el, scope, true)?)
            }
            "rate-limit-by-key" => {
                only(&[INBOUND])?;
                Step::RateLimitByKey(keyed_limit(el, false)?)
            }
            "quota-by-key" => {
                only(&[INBOUND])?;
                Step::QuotaByKey(keyed_limit(el, true)?)
            }
            "check-header" => {
                only(&[INBOUND])?;
                let status = int_attr(el, "failed-check-httpcode")?
                    .ok_or_else(|| missing(el, "failed-check-httpcode"))?;
                Step::CheckHeader {
                    name: required(el, "name")?.to_ascii_lowercase(),
                    status: u16::try_from(status)
                        .ok()
                        .filter(|s| (100..600).contains(s))
                        .ok_or_else(|| {
                            Fault::Invalid(el.pos, format!("'{status}' is not an HTTP status"))
                        })?,
                    message: required(el, "failed-check-error-message")?.to_string(),
                    ignore_case: bool_attr(el, "ignore-case")?.unwrap_or(false),
                    values: el
                        .children
                        .iter()
                        .filter(|c| c.name == "value")
                        .map(|c| literal(c, "value", &c.text).map(str::to_string))
                        .collect::<Compiled<_>>()?,
                }
            }
            "ip-filter" => {
                only(&[INBOUND])?;
                ip_filter(el)?
            }
            "validate-jwt" => {
                only(&[INBOUND])?;
                Step::ValidateJwt(Box::new(validate_jwt(el, self.jwks)?))
            }
            "cors" => {
                only(&[INBOUND])?;
                Step::Cors(Box::new(cors(el)?))
            }
            "set-header" => Step::SetHeader(set_header(el)?),
            "set-method" => {
                only(&[INBOUND])?;
                let method = text(el, "the method", el.text.trim(), Ty::Str)?;
                if let Text::Literal(m) = &method {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        return Err(Fault::Invalid(
                            el.pos,
                            format!("<set-method> needs an HTTP method, not \"{m}\""),
                        ));
                    }
                }
                Step::SetMethod(method)
            }
            "emit-metric" => {
                if section != INBOUND {
                    return Err(Fault::Unsupported(
                        el.pos,
                        format!(
                            "<emit-metric> in the {sname} section is not supported at the edge ({})",
                            scope.label
                        ),
                    ));
                }
                let (metric, value, dimensions) = emit_metric(el)?;
                if dimensions {
                    let w = format!(
                        "{} policy, line {}, column {}: <emit-metric> becomes Envoy counter {metric}; its dimensions are not carried",
                        scope.label, el.pos.line, el.pos.column
                    );
                    if !self.warnings.contains(&w) {
                        self.warnings.push(w);
                    }
                }
                Step::EmitMetric { metric, value }
            }
            "set-query-parameter" => {
                only(&[INBOUND, BACKEND])?;
                let p = set_header(el)?;
                if p.action != ExistsAction::Delete && p.values.is_empty() {
                    return Err(Fault::Invalid(
                        el.pos,
                        "<set-query-parameter> needs a <value> unless it deletes".into(),
                    ));
                }
                Step::SetQueryParameter(p)
            }
            "rewrite-uri" => {
                only(&[INBOUND])?;
                let template = required(el, "template")?;
                // APIM takes a template with or without its leading '/'.
                let template = text(el, "'template'", template, Ty::Str)?;
                Step::RewriteUri {
                    template,
                    copy_unmatched: bool_attr(el, "copy-unmatched-params")?.unwrap_or(true),
                }
            }
            "set-variable" => {
                let name = required(el, "name")?;
                let value = el.attr("value").ok_or_else(|| missing(el, "value"))?;
                Step::SetVariable {
                    name: name.to_string(),
                    // A literal is a string; an expression keeps whatever type it gives.
                    value: text(el, "'value'", value, Ty::Str)?,
                }
            }
            // APIM places mock-response in inbound, outbound and on-error only.
            "mock-response" if section == BACKEND => {
                return Err(Fault::Invalid(
                    el.pos,
                    format!("<mock-response> is not allowed in the {sname} section"),
                ))
            }
            // The backend section runs after inbound, before the upstream: a response there
            // answers instead of the upstream, as one in inbound does.
            "return-response" if section == BACKEND => return_response(el)?,
            // In outbound, a response replaces the upstream's.
            "return-response" if section == OUTBOUND => return_response(el)?,
            "return-response" | "mock-response" if section == ON_ERROR => {
                return Err(Fault::Unsupported(
                    el.pos,
                    format!(
                        "<{}> in the {sname} section is not supported at the edge ({})",
                        el.name, scope.label
                    ),
                ))
            }
            "return-response" => return_response(el)?,
            "mock-response" => {
                let status = int_attr(el, "status-code")?.unwrap_or(200);
                let mut headers = Vec::new();
                if let Some(ct) = el.attr("content-type") {
                    headers.push(SetHeader {
                        name: "content-type".into(),
                        action: ExistsAction::Override,
                        values: vec![Text::Literal(ct.to_string())],
                    });
                }
                Step::Respond {
                    status: status_code(el, status)?,
                    headers,
                    body: Text::Literal(String::new()),
                }
            }
            other => {
                return Err(Fault::Unsupported(
                    el.pos,
                    format!(
                        "<{other}> is not supported at the edge ({}, {sname} section)",
                        scope.label
                    ),
                ))
            }
        };
        self.steps.push(step);
        Ok(Some(Node::Step(self.steps.len() as u32 - 1)))
    }
}

/// Does the element's text, an attribute of it, or anything inside it hold `word`?
fn mentions(el: &Element, word: &str) -> bool {
    el.text.contains(word)
        || el.attrs.iter().any(|(_, v)| v.contains(word))
        || el.children.iter().any(|c| mentions(c, word))
}

/// Can this element deny a call, limit it or authenticate it? Such an element is never skipped
/// (SPEC §3a): skipping it would open a door its policy closes.
fn can_deny(name: &str) -> bool {
    name.starts_with("validate-")
        || name.starts_with("check-")
        || name.ends_with("-token-limit")
        || matches!(
            name,
            "rate-limit"
                | "rate-limit-by-key"
                | "quota"
                | "quota-by-key"
                | "ip-filter"
                | "limit-concurrency"
                | "return-response"
                | "mock-response"
        )
}

/// The first element within `el` (itself included) that can deny, limit or authenticate.
fn guard_within(el: &Element) -> Option<&str> {
    if can_deny(&el.name) {
        return Some(&el.name);
    }
    el.children.iter().find_map(guard_within)
}

/// The texts that steer what a document denies or limits: the conditions of its `<when>`s and
/// the attributes of its limits and checks. A `set-variable` whose name they quote is not
/// skipped either: a variable that picks a branch or a counter key guards as they do.
fn steering(el: &Element, out: &mut String) {
    if el.name == "when" || can_deny(&el.name) {
        for (_, v) in &el.attrs {
            out.push_str(v);
            out.push('\n');
        }
        out.push_str(&el.text);
        out.push('\n');
    }
    for c in &el.children {
        steering(c, out);
    }
}

/// The names of the policy elements in a list, and in the branches of its `choose`s.
fn policy_elements<'e>(list: &'e [Element], out: &mut std::collections::BTreeSet<&'e str>) {
    for el in list {
        out.insert(&el.name);
        if el.name == "choose" {
            for branch in &el.children {
                policy_elements(&branch.children, out);
            }
        }
    }
}

/// The fragments a document includes, by the names it gives.
fn fragment_ids<'e>(el: &'e Element, out: &mut Vec<&'e str>) {
    if el.name == "include-fragment" {
        out.extend(el.attr("fragment-id"));
    }
    for c in &el.children {
        fragment_ids(c, out);
    }
}

/// `<cors>`: origins (required), methods (default `GET`, `POST`), headers (default none),
/// exposed headers, the preflight's lifetime; `*` allows all of a kind.
fn cors(el: &Element) -> Compiled<Cors> {
    const CHILDREN: [&str; 4] = [
        "allowed-origins",
        "allowed-methods",
        "allowed-headers",
        "expose-headers",
    ];
    if let Some(c) = el
        .children
        .iter()
        .find(|c| !CHILDREN.contains(&c.name.as_str()))
    {
        return Err(Fault::Invalid(
            c.pos,
            format!("<{}> is not allowed inside <cors>", c.name),
        ));
    }
    let child = |name: &str| el.children.iter().find(|c| c.name == name);
    // The items of a list, literal, each trimmed; `*` among them allows all.
    let items = |list: &Element, item: &str| -> Compiled<(bool, Vec<String>)> {
        let mut any = false;
        let mut out = Vec::new();
        for c in &list.children {
            if c.name != item {
                return Err(Fault::Invalid(
                    c.pos,
                    format!("<{}> is not allowed inside <{}>", c.name, list.name),
                ));
            }
            let value = literal(c, item, &c.text)?.trim();
            if value == "*" {
                any = true;
            } else if !value.is_empty() {
                out.push(value.to_string());
            }
        }
        Ok((any, out))
    };
    let allowed = |(any, list): (bool, Vec<String>)| match any {
        true => Allowed::Any,
        false => Allowed::Listed(list),
    };
    let origins_el = child("allowed-origins")
        .ok_or_else(|| Fault::Invalid(el.pos, "<cors> needs <allowed-origins>".into()))?;
    let (any_origin, listed) = items(origins_el, "origin")?;
    if !any_origin && listed.is_empty() {
        return Err(Fault::Invalid(
            origins_el.pos,
            "<allowed-origins> needs at least one <origin>".into(),
        ));
    }
    let origins = allowed((
        any_origin,
        listed
            .iter()
            .map(|o| cors::normal_origin(o).to_string())
            .collect(),
    ));
    let allow_credentials = bool_attr(el, "allow-credentials")?.unwrap_or(false);
    if allow_credentials && origins == Allowed::Any {
        return Err(Fault::Invalid(
            el.pos,
            "allow-credentials=\"true\" cannot be used with the origin '*': name the origins"
                .into(),
        ));
    }
    let methods_el = child("allowed-methods");
    Ok(Cors {
        allow_credentials,
        terminate_unmatched: bool_attr(el, "terminate-unmatched-request")?.unwrap_or(true),
        origins,
        methods: match methods_el {
            Some(m) => allowed(items(m, "method")?),
            None => Allowed::Listed(vec!["GET".into(), "POST".into()]),
        },
        max_age: match methods_el {
            Some(m) => int_attr(m, "preflight-result-max-age")?,
            None => None,
        },
        headers: match child("allowed-headers") {
            Some(h) => allowed(items(h, "header")?),
            None => Allowed::Listed(Vec::new()),
        },
        expose: match child("expose-headers") {
            Some(h) => items(h, "header")?.1,
            None => Vec::new(),
        },
    })
}

fn missing(el: &Element, attr: &str) -> Fault {
    Fault::Invalid(
        el.pos,
        format!("<{}> needs the attribute '{attr}'", el.name),
    )
}

fn required<'e>(el: &'e Element, attr: &str) -> Compiled<&'e str> {
    let v = el.attr(attr).ok_or_else(|| missing(el, attr))?;
    literal(el, attr, v)
}

/// A value that must be literal: an expression here is outside the edge subset.
fn literal<'v>(el: &Element, attr: &str, value: &'v str) -> Compiled<&'v str> {
    if expr::is_expression(value) {
        return Err(Fault::Unsupported(
            el.pos,
            format!(
                "expression \"{}\" in '{attr}' of <{}> is not supported at the edge",
                quoted(value),
                el.name
            ),
        ));
    }
    Ok(value)
}

fn int_attr(el: &Element, attr: &str) -> Compiled<Option<u64>> {
    let Some(v) = el.attr(attr) else {
        return Ok(None);
    };
    let v = literal(el, attr, v)?;
    v.trim().parse().map(Some).map_err(|_| {
        Fault::Invalid(
            el.pos,
            format!(
                "'{attr}' of <{}> must be a whole number, not \"{v}\"",
                el.name
            ),
        )
    })
}

fn bool_attr(el: &Element, attr: &str) -> Compiled<Option<bool>> {
    let Some(v) = el.attr(attr) else {
        return Ok(None);
    };
    match literal(el, attr, v)?.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        _ => Err(Fault::Invalid(
            el.pos,
            format!(
                "'{attr}' of <{}> must be true or false, not \"{v}\"",
                el.name
            ),
        )),
    }
}

fn status_code(el: &Element, code: u64) -> Compiled<u16> {
    u16::try_from(code)
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| Fault::Invalid(el.pos, format!("'{code}' is not an HTTP status")))
}

/// An expression as an error quotes it: trimmed, and cut after 120 characters.
fn quoted(value: &str) -> String {
    let t = value.trim();
    match t.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

/// An attribute or text that may be an expression of the given type.
fn text(el: &Element, what: &str, value: &str, ty: Ty) -> Compiled<Text> {
    if !expr::is_expression(value) {
        return Ok(Text::Literal(value.to_string()));
    }
    let (e, t) = expr::compile(value).map_err(|why| {
        let quoted = quoted(value);
        match why.strip_prefix(expr::OVER_LIMIT) {
            Some(limit) => Fault::Invalid(
                el.pos,
                format!(
                    "expression \"{quoted}\" in {what} of <{}> is too large: {limit}",
                    el.name
                ),
            ),
            None => Fault::Unsupported(
                el.pos,
                format!(
                    "expression \"{quoted}\" in {what} of <{}> is not supported at the edge: {why}",
                    el.name
                ),
            ),
        }
    })?;
    if t != ty && !(ty == Ty::Str) {
        return Err(Fault::Invalid(
            el.pos,
            format!(
                "expression \"{}\" in {what} of <{}> gives {t}, expected {ty}",
                value.trim(),
                el.name
            ),
        ));
    }
    Ok(Text::Expr(e))
}

fn allowance(
    el: &Element,
    quota: bool,
    keyed: bool,
    inherited_period: Option<u64>,
) -> Compiled<Allowance> {
    let calls = int_attr(el, "calls")?;
    let bandwidth_kb = if quota {
        int_attr(el, "bandwidth")?
    } else {
        None
    };
    if calls.is_none() && bandwidth_kb.is_none() {
        return Err(if quota {
            Fault::Invalid(
                el.pos,
                format!("<{}> needs 'calls' or 'bandwidth'", el.name),
            )
        } else {
            missing(el, "calls")
        });
    }
    // A nested <api> or <operation> without its own period uses its parent's.
    let seconds = int_attr(el, "renewal-period")?
        .or(inherited_period)
        .ok_or_else(|| missing(el, "renewal-period"))?;
    if !quota && !(1..=300).contains(&seconds) {
        return Err(Fault::Invalid(
            el.pos,
            format!(
                "'renewal-period' of <{}> must be between 1 and 300 seconds, not {seconds}",
                el.name
            ),
        ));
    }
    if quota && keyed && seconds != 0 && seconds < 300 {
        return Err(Fault::Invalid(
            el.pos,
            format!(
                "'renewal-period' of <{}> must be at least 300 seconds (or 0), not {seconds}",
                el.name
            ),
        ));
    }
    Ok(Allowance {
        calls,
        bandwidth_kb,
        period: seconds.saturating_mul(1000).min(i64::MAX as u64) as Millis,
    })
}

fn header_name_attr(el: &Element, attr: &str) -> Compiled<Option<String>> {
    el.attr(attr)
        .map(|v| literal(el, attr, v).map(str::to_ascii_lowercase))
        .transpose()
}

/// The header a 429 names its wait in: `retry-after` (the gateway's own text, never copied per
/// call) unless `retry-after-header-name` renames it.
fn retry_after_name(el: &Element) -> Compiled<Cow<'static, str>> {
    Ok(header_name_attr(el, "retry-after-header-name")?
        .map_or(Cow::Borrowed("retry-after"), Cow::Owned))
}

fn nested(
    el: &Element,
    parent_counter: &str,
    quota: bool,
    kind: &str,
    parent_period: Option<u64>,
) -> Compiled<Nested> {
    let name = el.attr("name").map(str::to_string);
    let id = el.attr("id").map(str::to_string);
    let label = id
        .clone()
        .or_else(|| name.clone())
        .ok_or_else(|| missing(el, "name"))?;
    let counter = format!("{parent_counter}/{kind}:{label}");
    let allowance = allowance(el, quota, false, parent_period)?;
    let period = Some((allowance.period / 1000) as u64);
    let mut operations = Vec::new();
    for c in &el.children {
        if c.name == "operation" && kind == "api" {
            operations.push(nested(c, &counter, quota, "operation", period)?);
        } else {
            return Err(Fault::Invalid(
                c.pos,
                format!("<{}> is not allowed inside <{}>", c.name, el.name),
            ));
        }
    }
    Ok(Nested {
        name,
        id,
        allowance,
        counter,
        operations,
    })
}

fn subscription_limit(el: &Element, scope: &Scope, quota: bool) -> Compiled<SubscriptionLimit> {
    let counter = format!("{}/{}", scope.id, el.name);
    let has_own = el.attr("calls").is_some() || el.attr("bandwidth").is_some();
    let period = int_attr(el, "renewal-period")?;
    let mut nested_limits = Vec::new();
    for c in &el.children {
        if c.name == "api" {
            nested_limits.push(nested(c, &counter, quota, "api", period)?);
        } else {
            return Err(Fault::Invalid(
                c.pos,
                format!("<{}> is not allowed inside <{}>", c.name, el.name),
            ));
        }
    }
    let allowance = if has_own || nested_limits.is_empty() {
        Some(allowance(el, quota, false, None)?)
    } else {
        None
    };
    Ok(SubscriptionLimit {
        document: scope.id.clone(),
        counter,
        allowance,
        nested: nested_limits,
        retry_after_header: retry_after_name(el)?,
        remaining_header: header_name_attr(el, "remaining-calls-header-name")?,
        total_header: header_name_attr(el, "total-calls-header-name")?,
    })
}

fn keyed_limit(el: &Element, quota: bool) -> Compiled<KeyedLimit> {
    let counter_key = text(
        el,
        "'counter-key'",
        el.attr("counter-key")
            .ok_or_else(|| missing(el, "counter-key"))?,
        Ty::Str,
    )?;
    let increment_condition = match el.attr("increment-condition") {
        None => None,
        Some(v) => match text(el, "'increment-condition'", v, Ty::Bool)? {
            Text::Expr(e) => Some(e),
            Text::Literal(l) => match l.trim().to_ascii_lowercase().as_str() {
                "true" => None,
                "false" => Some(Expr::Bool(false)),
                _ => {
                    return Err(Fault::Invalid(
                        el.pos,
                        format!("'increment-condition' must be an expression, not \"{l}\""),
                    ))
                }
            },
        },
    };
    let increment_count = match el.attr("increment-count") {
        None => Text::Literal("1".into()),
        Some(v) => match text(el, "'increment-count'", v, Ty::Int)? {
            Text::Literal(l) if l.trim().parse::<u32>().is_err() => {
                return Err(Fault::Invalid(
                    el.pos,
                    format!("'increment-count' must be a whole number, not \"{l}\""),
                ))
            }
            Text::Literal(l) => Text::Literal(l.trim().to_string()),
            e => e,
        },
    };
    let first_period_start = match el.attr("first-period-start") {
        Some(v) if quota => parse_rfc3339(literal(el, "first-period-start", v)?)
            .or_else(|| parse_rfc3339(&format!("{}Z", v.trim())))
            .ok_or_else(|| {
                Fault::Invalid(
                    el.pos,
                    format!("'first-period-start' is not a date and time: \"{v}\""),
                )
            })?,
        _ => YEAR_ONE,
    };
    let allowance = allowance(el, quota, true, None)?;
    let window = if quota {
        format!("{}|{}", allowance.period, first_period_start)
    } else {
        allowance.period.to_string()
    };
    Ok(KeyedLimit {
        allowance,
        counter_key,
        increment_condition,
        increment_count,
        first_period_start,
        window,
        retry_after_header: retry_after_name(el)?,
        remaining_header: header_name_attr(el, "remaining-calls-header-name")?,
        total_header: header_name_attr(el, "total-calls-header-name")?,
    })
}

fn validate_jwt(el: &Element, jwks: &HashMap<String, serde_json::Value>) -> Compiled<JwtCheck> {
    let sources = [
        el.attr("header-name")
            .map(|h| TokenSource::Header(h.to_ascii_lowercase())),
        el.attr("query-parameter-name")
            .map(|q| TokenSource::Query(q.to_string())),
        el.attr("token-value")
            .map(|v| text(el, "'token-value'", v, Ty::Str).map(TokenSource::Value))
            .transpose()?,
    ];
    let mut given = sources.into_iter().flatten();
    let (Some(source), None) = (given.next(), given.next()) else {
        return Err(Fault::Invalid(
            el.pos,
            "<validate-jwt> needs exactly one of 'header-name', 'query-parameter-name' and 'token-value'"
                .into(),
        ));
    };
    if bool_attr(el, "require-signed-tokens")? == Some(false) {
        return Err(Fault::Unsupported(
            el.pos,
            "unsigned tokens (require-signed-tokens=\"false\") are not accepted at the edge".into(),
        ));
    }
    let status = int_attr(el, "failed-validation-httpcode")?.unwrap_or(401);
    let (keys, audiences, issuers, claims) = jwt::children(el, jwks).map_err(|f| match f {
        JwtFault::Unsupported(m) => Fault::Unsupported(el.pos, m),
        JwtFault::Invalid(m) => Fault::Invalid(el.pos, m),
    })?;
    Ok(JwtCheck {
        source,
        status: status_code(el, status)?,
        message: el
            .attr("failed-validation-error-message")
            .map(|m| literal(el, "failed-validation-error-message", m).map(str::to_string))
            .transpose()?,
        require_expiration: bool_attr(el, "require-expiration-time")?.unwrap_or(true),
        require_scheme: el
            .attr("require-scheme")
            .map(|m| literal(el, "require-scheme", m).map(|s| s.trim().to_string()))
            .transpose()?,
        clock_skew: int_attr(el, "clock-skew")?
            .unwrap_or(0)
            .min(i64::MAX as u64) as i64,
        keys,
        audiences,
        issuers,
        claims,
        output_variable: el
            .attr("output-token-variable-name")
            .map(|m| literal(el, "output-token-variable-name", m).map(str::to_string))
            .transpose()?,
        verified: Default::default(),
    })
}

fn parse_ip(el: &Element, text: &str) -> Compiled<u128> {
    text.trim()
        .parse::<IpAddr>()
        .map(ip_number)
        .map_err(|_| Fault::Invalid(el.pos, format!("\"{text}\" is not an IP address")))
}

fn ip_filter(el: &Element) -> Compiled<Step> {
    let allow = match required(el, "action")? {
        "allow" => true,
        "forbid" => false,
        other => {
            return Err(Fault::Invalid(
                el.pos,
                format!("'action' of <ip-filter> must be allow or forbid, not \"{other}\""),
            ))
        }
    };
    let mut ranges = Vec::new();
    for c in &el.children {
        match c.name.as_str() {
            "address" => {
                let ip = parse_ip(c, literal(c, "address", &c.text)?)?;
                ranges.push(AddressRange { from: ip, to: ip });
            }
            "address-range" => {
                let from = parse_ip(c, required(c, "from")?)?;
                let to = parse_ip(c, required(c, "to")?)?;
                if from > to {
                    return Err(Fault::Invalid(c.pos, "'from' is above 'to'".into()));
                }
                ranges.push(AddressRange { from, to });
            }
            other => {
                return Err(Fault::Invalid(
                    c.pos,
                    format!("<{other}> is not allowed inside <ip-filter>"),
                ))
            }
        }
    }
    Ok(Step::IpFilter { allow, ranges })
}

/// `emit-metric`: the Envoy counter's name, the value to add (a literal one a whole number, as
/// a counter takes), and whether the element has dimensions.
fn emit_metric(el: &Element) -> Compiled<(String, Text, bool)> {
    let name = required(el, "name")?;
    let namespace = el.attr("namespace").unwrap_or("API Management");
    for (what, text) in [("name", name), ("namespace", namespace)] {
        if expr::is_expression(text) {
            return Err(Fault::Unsupported(
                el.pos,
                format!("an expression in '{what}' of <emit-metric> is not supported at the edge: a counter's name is fixed"),
            ));
        }
    }
    let safe = |t: &str| -> String {
        t.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let metric = format!("apim_edge.metric.{}.{}", safe(namespace), safe(name));
    let value = match el.attr("value") {
        None => Text::Literal("1".into()),
        Some(v) => {
            let value = text(el, "'value'", v, Ty::Int)?;
            if let Text::Literal(l) = &value {
                if l.trim().parse::<u32>().is_err() {
                    return Err(Fault::Unsupported(
                        el.pos,
                        format!("'value' of <emit-metric> must be a whole number at the edge (an Envoy counter), not \"{l}\""),
                    ));
                }
            }
            value
        }
    };
    let dimensions = el.children.iter().any(|c| c.name == "dimension");
    if let Some(other) = el.children.iter().find(|c| c.name != "dimension") {
        return Err(Fault::Invalid(
            other.pos,
            format!("<{}> is not allowed inside <emit-metric>", other.name),
        ));
    }
    Ok((metric, value, dimensions))
}

fn set_header(el: &Element) -> Compiled<SetHeader> {
    let action = match el.attr("exists-action").unwrap_or("override") {
        "override" => ExistsAction::Override,
        "skip" => ExistsAction::Skip,
        "append" => ExistsAction::Append,
        "delete" => ExistsAction::Delete,
        other => {
            return Err(Fault::Invalid(
                el.pos,
                format!(
                    "'exists-action' must be override, skip, append or delete, not \"{other}\""
                ),
            ))
        }
    };
    let values = el
        .children
        .iter()
        .filter(|c| c.name == "value")
        .map(|c| text(c, "the value", &c.text, Ty::Str))
        .collect::<Compiled<Vec<_>>>()?;
    Ok(SetHeader {
        name: required(el, "name")?.to_string(),
        action,
        values,
    })
}

fn return_response(el: &Element) -> Compiled<Step> {
    if el.attr("response-variable-name").is_some() {
        return Err(Fault::Unsupported(
            el.pos,
            "'response-variable-name' of <return-response> is not supported at the edge".into(),
        ));
    }
    let mut status = 200;
    let mut headers = Vec::new();
    let mut body = Text::Literal(String::new());
    for c in &el.children {
        match c.name.as_str() {
            "set-status" => status = status_code(c, int_attr(c, "code")?.unwrap_or(200))?,
            "set-header" => headers.push(set_header(c)?),
            "set-body" => {
                if c.attr("template").is_some() {
                    return Err(Fault::Unsupported(
                        c.pos,
                        "templated <set-body> is not supported at the edge".into(),
                    ));
                }
                body = text(c, "the body", &c.text, Ty::Str)?;
            }
            other => {
                return Err(Fault::Unsupported(
                    c.pos,
                    format!("<{other}> inside <return-response> is not supported at the edge"),
                ))
            }
        }
    }
    Ok(Step::Respond {
        status,
        headers,
        body,
    })
}

/// Inlines scopes, outermost first, into one section's effective program.
pub(crate) fn inline(chain: &[Option<&ScopePolicy>], section: usize) -> Vec<u32> {
    let mut program: Vec<u32> = Vec::new();
    for level in chain {
        let nodes = level.and_then(|p| p.sections[section].as_deref());
        let Some(nodes) = nodes else {
            continue; // inherits the enclosing section whole
        };
        let mut next = Vec::with_capacity(program.len() + nodes.len());
        for n in nodes {
            match n {
                Node::Base => next.extend_from_slice(&program),
                Node::Step(i) => next.push(*i),
            }
        }
        program = next;
    }
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(
        doc: &str,
        kind: ScopeKind,
        mode: UnsupportedPolicies,
    ) -> (Vec<Step>, Result<ScopePolicy, Vec<LoadError>>, Vec<String>) {
        let mut steps = Vec::new();
        let mut warnings = Vec::new();
        let mut errors = Vec::new();
        let mut named = HashMap::new();
        named.insert("limit".to_string(), "7".to_string());
        let scope = Scope {
            kind,
            label: "product 'starter'".into(),
            id: "product:starter".into(),
        };
        let r = Compiler {
            steps: &mut steps,
            named_values: &named,
            fragments: &HashMap::new(),
            jwks: &HashMap::new(),
            unsupported: mode,
            warnings: &mut warnings,
            errors: &mut errors,
            steering: String::new(),
            including: Vec::new(),
            usage: Vec::new(),
        }
        .document(doc, &scope);
        let r = r.ok_or(errors);
        (steps, r, warnings)
    }

    fn ok(doc: &str) -> Vec<Step> {
        let (s, r, _) = compile(doc, ScopeKind::Product, UnsupportedPolicies::Reject);
        r.unwrap();
        s
    }

    fn err(doc: &str, kind: ScopeKind) -> String {
        let (_, r, _) = compile(doc, kind, UnsupportedPolicies::Reject);
        r.unwrap_err()[0].to_string()
    }

    #[test]
    fn rate_limit_with_nested_limits() {
        let steps = ok(
            r#"<policies><inbound><rate-limit calls="{{limit}}" renewal-period="60" remaining-calls-header-name="X-Left">
            <api name="echo" calls="3" renewal-period="10"><operation name="get" calls="1" renewal-period="10"/></api>
        </rate-limit></inbound></policies>"#,
        );
        let Step::RateLimit(rl) = &steps[0] else {
            panic!()
        };
        assert_eq!(rl.allowance.unwrap().calls, Some(7));
        assert_eq!(rl.allowance.unwrap().period, 60_000);
        assert_eq!(rl.remaining_header.as_deref(), Some("x-left"));
        assert_eq!(
            rl.nested[0].operations[0].counter,
            "product:starter/rate-limit/api:echo/operation:get"
        );
    }

    #[test]
    fn every_supported_element_compiles() {
        let steps = ok(r#"<policies><inbound>
            <quota calls="100" bandwidth="40" renewal-period="3600" />
            <rate-limit-by-key calls="5" renewal-period="30" counter-key="@(context.Request.IpAddress)" increment-condition="@(context.Response.StatusCode == 200)" />
            <quota-by-key calls="5" renewal-period="86400" counter-key="@(context.Request.IpAddress)" first-period-start="2026-01-01T00:00:00Z" />
            <check-header name="X-Partner" failed-check-httpcode="401" failed-check-error-message="Not a partner" ignore-case="true"><value>acme</value></check-header>
            <ip-filter action="allow"><address>10.0.0.1</address><address-range from="192.168.0.0" to="192.168.0.255"/></ip-filter>
            <set-header name="x-a" exists-action="append"><value>@("v-" + context.Api.Id)</value></set-header>
            <return-response><set-status code="418" reason="teapot"/><set-header name="x-r"><value>1</value></set-header><set-body>{"a":1}</set-body></return-response>
            <mock-response status-code="204" content-type="application/json"/>
        </inbound><backend><forward-request /></backend><outbound><set-header name="x-b" exists-action="delete" /></outbound></policies>"#);
        assert_eq!(steps.len(), 9);
        assert!(matches!(steps[7], Step::Respond { status: 204, .. }));
    }

    #[test]
    fn placement_rules() {
        assert!(err(
            "<policies><inbound><quota calls=\"1\" renewal-period=\"60\"/></inbound></policies>",
            ScopeKind::Api
        )
        .contains("only at product scope"));
        assert!(err("<policies><inbound><rate-limit calls=\"1\" renewal-period=\"60\"/></inbound></policies>", ScopeKind::Global).contains("only at product, API or operation"));
        assert!(err("<policies><outbound><rate-limit calls=\"1\" renewal-period=\"60\"/></outbound></policies>", ScopeKind::Product).contains("not allowed in the outbound section"));
        assert!(err("<policies><inbound><rate-limit calls=\"1\" renewal-period=\"301\"/></inbound></policies>", ScopeKind::Product).contains("between 1 and 300"));
        assert!(err("<policies><inbound><rate-limit-by-key calls=\"1\" renewal-period=\"600\" counter-key=\"a\"/></inbound></policies>", ScopeKind::Product).contains("between 1 and 300"));
        assert!(err("<policies><inbound><quota-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"a\"/></inbound></policies>", ScopeKind::Product).contains("at least 300"));
        ok("<policies><inbound><quota-by-key calls=\"1\" renewal-period=\"0\" counter-key=\"a\"/></inbound></policies>");
    }

    #[test]
    fn a_response_in_the_backend_section_answers_instead_of_the_upstream() {
        let steps = ok(
            r#"<policies><inbound><base /></inbound><backend><return-response><set-status code="503" reason="down" /><set-body>maintenance</set-body></return-response></backend></policies>"#,
        );
        assert!(
            matches!(&steps[..], [Step::Respond { status: 503, body: Text::Literal(body), .. }] if body == "maintenance"),
            "{steps:?}"
        );
        assert!(err(
            "<policies><backend><mock-response status-code=\"200\" /></backend></policies>",
            ScopeKind::Api
        )
        .contains("<mock-response> is not allowed in the backend section"));
    }

    #[test]
    fn a_rate_limit_or_a_quota_stands_once_in_a_document() {
        let twice = err(
            "<policies><inbound>\n  <rate-limit calls=\"1\" renewal-period=\"60\"/>\n  <quota calls=\"5\" renewal-period=\"60\"/>\n  <rate-limit calls=\"2\" renewal-period=\"30\"/>\n</inbound></policies>",
            ScopeKind::Product,
        );
        assert!(
            twice.contains("line 4, column 3")
                && twice.contains("<rate-limit> may appear only once in a policy document (the first is at line 2, column 3)"),
            "{twice}"
        );
        let quota = err(
            "<policies><inbound><quota calls=\"1\" renewal-period=\"60\"/><quota calls=\"2\" renewal-period=\"60\"/></inbound></policies>",
            ScopeKind::Product,
        );
        assert!(quota.contains("<quota> may appear only once"), "{quota}");
        // One of each, and by-key limits as often as wanted, load.
        ok("<policies><inbound><rate-limit calls=\"1\" renewal-period=\"60\"/><quota calls=\"5\" renewal-period=\"60\"/><rate-limit-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"a\"/><rate-limit-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"b\"/></inbound></policies>");
    }

    #[test]
    fn unsupported_reject_names_element_scope_and_position() {
        let e = err(
            "<policies>\n  <inbound>\n    <cache-lookup />\n  </inbound>\n</policies>",
            ScopeKind::Product,
        );
        assert_eq!(e, "product 'starter' policy, line 3, column 5: <cache-lookup> is not supported at the edge (product 'starter', inbound section)");
        let e = err("<policies><inbound><set-header name=\"a\"><value>@(context.User.Email)</value></set-header></inbound></policies>", ScopeKind::Product);
        assert!(e.contains("expression \"@(context.User.Email)\""), "{e}");
    }

    #[test]
    fn unsupported_skip_warns_once_and_loads() {
        let (steps, r, warnings) = compile(
            "<policies><inbound><cache-lookup /><base /><cache-lookup /></inbound></policies>",
            ScopeKind::Product,
            UnsupportedPolicies::Skip,
        );
        let p = r.unwrap();
        assert!(steps.is_empty());
        assert_eq!(p.sections[INBOUND], Some(vec![Node::Base]));
        assert_eq!(warnings.len(), 2, "{warnings:?}"); // two positions, each once
    }

    #[test]
    fn request_line_policies_are_checked_where_they_stand() {
        let p = ScopeKind::Product;
        assert_eq!(
            err("<policies><inbound><set-method>GET /x</set-method></inbound></policies>", p),
            "product 'starter' policy, line 1, column 20: <set-method> needs an HTTP method, not \"GET /x\""
        );
        assert_eq!(
            err("<policies><outbound><set-method>GET</set-method></outbound></policies>", p),
            "product 'starter' policy, line 1, column 21: <set-method> is not allowed in the outbound section"
        );
        assert_eq!(
            err("<policies><inbound><set-query-parameter name=\"a\" /></inbound></policies>", p),
            "product 'starter' policy, line 1, column 20: <set-query-parameter> needs a <value> unless it deletes"
        );
        assert_eq!(
            err("<policies><inbound><rewrite-uri /></inbound></policies>", p),
            "product 'starter' policy, line 1, column 20: <rewrite-uri> needs the attribute 'template'"
        );
        let steps = ok(
            r#"<policies><inbound><set-query-parameter name="a" exists-action="delete" /><rewrite-uri template="/x" copy-unmatched-params="false" /><set-method>@("P" + "UT")</set-method></inbound></policies>"#,
        );
        assert!(
            matches!(&steps[0], Step::SetQueryParameter(q) if q.action == ExistsAction::Delete)
        );
        assert!(matches!(
            &steps[1],
            Step::RewriteUri {
                copy_unmatched: false,
                ..
            }
        ));
        assert!(matches!(&steps[2], Step::SetMethod(Text::Expr(_))));
    }

    #[test]
    fn missing_named_value_is_named() {
        let e = err(
            "<policies>\n<inbound><set-header name=\"{{nope}}\" /></inbound></policies>",
            ScopeKind::Product,
        );
        assert_eq!(
            e,
            "product 'starter' policy, line 2, column 28: named value 'nope' is not defined"
        );
    }

    #[test]
    fn only_well_formed_references_are_named_values() {
        let named: HashMap<String, String> = [("a-b.c_1".to_string(), "X".to_string())].into();
        assert_eq!(
            substitute_named_values("{{a-b.c_1}}/{{A-B.C_1}}", &named).unwrap(),
            "X/X"
        );
        assert_eq!(
            substitute_named_values("{{x}] and {{a-b.c_1}}", &named).unwrap(),
            "{{x}] and X"
        );
        assert_eq!(
            substitute_named_values("{{ not a name }}", &named).unwrap(),
            "{{ not a name }}"
        );
        assert_eq!(
            substitute_named_values("a {{nope}}", &named).unwrap_err().0,
            2
        );
    }

    #[test]
    fn base_inlines_where_it_stands() {
        let g = ScopePolicy {
            sections: [Some(vec![Node::Step(0)]), None, None, None],
        };
        let p = ScopePolicy {
            sections: [
                Some(vec![Node::Step(1), Node::Base, Node::Step(2)]),
                None,
                None,
                None,
            ],
        };
        let a = ScopePolicy {
            sections: [Some(vec![Node::Base, Node::Step(3)]), None, None, None],
        };
        let o = ScopePolicy {
            sections: [Some(vec![Node::Step(4)]), None, None, None],
        };
        assert_eq!(
            inline(&[Some(&g), Some(&p), Some(&a), None], INBOUND),
            vec![1, 0, 2, 3]
        );
        assert_eq!(
            inline(&[Some(&g), None, Some(&a), None], INBOUND),
            vec![0, 3]
        );
        assert_eq!(
            inline(&[Some(&g), Some(&p), Some(&a), Some(&o)], INBOUND),
            vec![4]
        );
    }
}
