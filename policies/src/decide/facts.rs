//! What policy expressions see during a call (`context.*`), and evaluating a policy's texts,
//! conditions and `set-header` elements against it.

use super::*;
use crate::catalog::Catalog;
use crate::expr::{EvalError, Expr, Facts, Member, Value, Variables};
use crate::policy::{ExistsAction, SetHeader, Text};
use std::borrow::Cow;

/// What expressions see during a call.
pub(crate) struct CallFacts<'c, 'r> {
    pub(crate) catalog: &'c Catalog,
    pub(crate) id: Identity,
    /// The request as the policies so far have left it (`set-method`, `rewrite-uri`, ...).
    pub(crate) request: Request<'r>,
    /// The path and query as the call came.
    pub(crate) original: (&'r str, &'r str),
    pub(crate) status: Option<u16>,
    /// The call's time, where the proxy gave it (`DateTime.UtcNow`).
    pub(crate) now: Option<Millis>,
    /// The call's variables as `set-variable` has left them so far.
    pub(crate) variables: &'r [(String, Value)],
}

impl<'c, 'r> CallFacts<'c, 'r> {
    /// What an inbound step's expressions see: no response yet.
    pub(crate) fn inbound(
        catalog: &'c Catalog,
        id: Identity,
        request: Request<'r>,
        original: (&'r str, &'r str),
        now: Millis,
        variables: &'r [(String, Value)],
    ) -> Self {
        CallFacts {
            catalog,
            id,
            request,
            original,
            status: None,
            now: Some(now),
            variables,
        }
    }
}

impl<'c> CallFacts<'c, '_> {
    /// A member that is text of the catalog, borrowed for as long as the catalog lives:
    /// `Some(None)` when it is null for this call, `None` when the member is not catalog text.
    pub(crate) fn catalog_member(&self, m: Member) -> Option<Option<&'c str>> {
        let c = self.catalog;
        let api = &c.apis[self.id.api.index()];
        let op = self.id.operation.map(|o| &api.operations[o.index()]);
        let product = self.id.product.map(|p| &c.products[p.index()]);
        let sub = self.id.subscription.map(|s| &c.subscriptions[s.index()]);
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
            Member::UserId => sub.and_then(|s| s.user.as_deref()),
            Member::DeploymentRegion => Some(c.region.as_str()),
            _ => return None,
        })
    }
}

impl Facts for CallFacts<'_, '_> {
    fn member(&self, m: Member) -> Option<String> {
        if let Some(text) = self.catalog_member(m) {
            return text.map(str::to_string);
        }
        let api = &self.catalog.apis[self.id.api.index()];
        Some(match m {
            Member::SubscriptionKey => {
                self.id.subscription?;
                match self.id.key? {
                    KeySource::Header => {
                        key_header(self.request.headers, &api.header_lower)?.into_owned()
                    }
                    KeySource::Query => key_param(self.original.1, &api.query_name)?,
                }
            }
            Member::ApiPath => format!("/{}", api.path_text),
            // Without an operation (catalog text otherwise).
            Member::OperationMethod => self.request.method.to_string(),
            Member::RequestIpAddress => self.request.client_ip?.to_string(),
            Member::RequestMethod => self.request.method.to_string(),
            Member::RequestUrlPath => self.request.path.to_string(),
            Member::RequestOriginalUrlPath => self.original.0.to_string(),
            Member::RequestUrlHost => host_of(self.request.host).to_string(),
            Member::ResponseStatusCode => self.status?.to_string(),
            // Catalog text, answered above.
            Member::SubscriptionId
            | Member::SubscriptionName
            | Member::ProductId
            | Member::ProductName
            | Member::ApiId
            | Member::ApiName
            | Member::OperationId
            | Member::OperationName
            | Member::UserId
            | Member::DeploymentRegion => return None,
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
    fn now(&self) -> Option<i64> {
        self.now
    }
    fn variable(&self, name: &str) -> Option<&Value> {
        self.variables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

pub(crate) fn eval_text<'t>(t: &'t Text, facts: &dyn Facts) -> Result<Cow<'t, str>, EvalError> {
    match t {
        Text::Literal(s) => Ok(Cow::Borrowed(s)),
        Text::Expr(e) => Ok(Cow::Owned(e.eval(facts)?.into_text())),
    }
}

/// [`eval_text`] for a header value: a value that is catalog text (`@(context.Api.Id)`) is
/// borrowed, not copied.
pub(crate) fn eval_value<'c>(
    t: &'c Text,
    facts: &CallFacts<'c, '_>,
) -> Result<Cow<'c, str>, EvalError> {
    if let Text::Expr(Expr::Member(m)) = t {
        if let Some(text) = facts.catalog_member(*m) {
            return text.map(Cow::Borrowed).ok_or(EvalError::Null(m.owner()));
        }
    }
    eval_text(t, facts)
}

pub(crate) fn eval_condition(e: &Expr, facts: &dyn Facts) -> Result<bool, EvalError> {
    Ok(e.eval(facts)? == Value::Bool(true))
}

/// Applies `set-header` to a header map's view, producing edits.
pub(crate) fn set_header<'c>(
    h: &'c SetHeader,
    facts: &CallFacts<'c, '_>,
    exists: &dyn Fn(&str) -> bool,
    edits: &mut HeaderEdits<'c>,
) -> Result<(), EvalError> {
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

/// The value `set-variable` stores: a literal is a string; an expression keeps its type.
pub(crate) fn variable_value(value: &Text, facts: &dyn Facts) -> Result<Value, EvalError> {
    match value {
        Text::Literal(s) => Ok(Value::Str(s.clone())),
        Text::Expr(e) => e.eval(facts),
    }
}

/// Sets a variable, replacing an earlier value of the same name.
pub(crate) fn set_variable(variables: &mut Variables, name: &str, value: Value) {
    match variables.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => *v = value,
        None => variables.push((name.to_string(), value)),
    }
}
