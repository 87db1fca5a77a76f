//! Deciding a call on counters a fleet of proxies shares (SPEC §7), in two passes around one
//! exchange with a counter service: [`Catalog::plan`] runs the call's program with every limit
//! assumed to admit and returns the counter operations it made; the service applies them to
//! the shared store, all or nothing ([`apply_plan`]); [`Catalog::decide_answered`] runs the
//! program again with the service's answers. The two passes make the same operations in the
//! same order up to the first denial, and the service takes back what a denied call counted,
//! so the decision is the one a local decision on the shared store would make.

use super::CallContext;
use super::{Catalog, Completion, Decision, EngineError, Outcome, Request};
use crate::clock::Millis;
use crate::counters::op::{
    apply_all_or_nothing, Answered, CounterOp, OpResult, OwnedOp, Recording,
};
use crate::counters::{CounterStore, StoreError};
use crate::edge::config::OnUnavailable;
use crate::response;

/// The counter operations of one call, for a counter service to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterPlan {
    pub ops: Vec<OwnedOp>,
    /// The call is denied after its limits by a step that counts nothing (a header check, an
    /// IP filter, a failure): what the operations count is to be taken back even when none
    /// denies, so that the answers only say which limit, if any, denies first.
    pub then_release: bool,
}

/// What a counter service does with a plan: applies its operations to `store` at the call's
/// time, all or nothing, and answers each up to the first that denies.
pub fn apply_plan(
    plan: &CounterPlan,
    store: &dyn CounterStore,
    now: Millis,
) -> Result<Vec<OpResult>, StoreError> {
    let ops: Vec<CounterOp<'_>> = plan.ops.iter().map(OwnedOp::op).collect();
    apply_all_or_nothing(&ops, store, now, plan.then_release)
}

impl Catalog {
    /// The first pass: the counter operations the call makes when every limit admits. An
    /// empty plan means the call meets no counter, and the decision of this pass is final.
    pub fn plan<'c>(
        &'c self,
        req: &Request,
        now: Millis,
    ) -> (Result<Decision<'c>, EngineError>, CounterPlan) {
        let recording = Recording::default();
        let decided = self.decide_counting(req, now, &recording);
        // With every limit admitting, a denial here comes from a step that counts nothing;
        // a returned response keeps what was counted (the call was admitted).
        let then_release = match &decided {
            Ok(d) => !matches!(d.outcome, Outcome::Allowed | Outcome::Returned),
            Err(_) => true,
        };
        let plan = CounterPlan {
            ops: recording.ops.into_inner(),
            then_release,
        };
        (decided, plan)
    }

    /// The second pass: the call decided with the counter service's answers to its plan.
    pub fn decide_answered<'c>(
        &'c self,
        req: &Request,
        now: Millis,
        answers: &[OpResult],
    ) -> Result<Decision<'c>, EngineError> {
        let answered = Answered {
            answers,
            next: std::cell::Cell::new(0),
        };
        self.decide_counting(req, now, &answered)
    }

    /// The decision for a call whose shared counters could not be reached (the service or its
    /// Redis down, a timeout, an answer that cannot be read), as `onUnavailable` says: with
    /// this proxy's own counters in `local`, with every limit admitting, or APIM-shaped 503.
    pub fn decide_unavailable<'c>(
        &'c self,
        req: &Request,
        now: Millis,
        on_unavailable: OnUnavailable,
        local: &dyn CounterStore,
    ) -> Result<Decision<'c>, EngineError> {
        match on_unavailable {
            OnUnavailable::Local => self.decide(req, now, local),
            OnUnavailable::Allow => self.plan(req, now).0,
            OnUnavailable::Deny => Ok(Decision::deny(
                Outcome::CountersUnavailable,
                response::counters_unavailable(),
                None,
            )),
        }
    }

    /// The counter operations of an allowed call's completion (bandwidth, by-key limits whose
    /// `increment-condition` held): applied as they are, nothing to take back.
    pub fn completion_ops(
        &self,
        call: &CallContext,
        done: Completion,
        now: Millis,
    ) -> Result<Vec<OwnedOp>, EngineError> {
        let recording = Recording::default();
        self.complete_counting(call, done, now, &recording)?;
        Ok(recording.ops.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::MemoryStore;
    use crate::LoadOptions;
    use proptest::prelude::*;

    /// A product with a rate limit and a quota side by side, an API with a by-key limit on the
    /// tenant header at two scopes, a quota-by-key counted at completion, and a header check
    /// after the limits: every kind of counter, and a denial that counts nothing.
    fn catalog() -> Catalog {
        let product = r#"<policies><inbound>
            <rate-limit calls="4" renewal-period="20" remaining-calls-header-name="x-left" />
            <quota calls="9" renewal-period="3600" />
            <rate-limit-by-key calls="3" renewal-period="10" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;x-tenant&quot;, &quot;none&quot;))" />
            <base /></inbound></policies>"#;
        let api = r#"<policies><inbound><base />
            <rate-limit-by-key calls="2" renewal-period="10" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;x-tenant&quot;, &quot;none&quot;))" />
            <quota-by-key calls="5" renewal-period="300" counter-key="@(context.Subscription.Id)" increment-condition="@(context.Response.StatusCode &lt; 400)" />
            <check-header name="x-deny" failed-check-httpcode="403" failed-check-error-message="denied"><value>no</value></check-header>
            </inbound></policies>"#;
        let doc = serde_json::json!({
            "apis": [{"name": "a", "properties": {"path": "a"}, "policy": api}],
            "products": [{"name": "p", "apis": ["a"], "policy": product}],
            "subscriptions": [
                {"name": "s1", "properties": {"scope": "/products/p", "primaryKey": "k1"}},
                {"name": "s2", "properties": {"scope": "/products/p", "primaryKey": "k2"}}]
        });
        Catalog::load(&doc, LoadOptions::default()).unwrap()
    }

    fn request<'r>(path: &'r str, headers: &'r [(String, String)]) -> Request<'r> {
        Request {
            method: "GET",
            host: "h",
            path,
            query: "",
            headers,
            client_ip: None,
        }
    }

    /// One call of the random sequences: when, whose key, which tenant, whether it fails the
    /// header check, and the upstream's status.
    type Call = (u16, bool, bool, bool, bool);

    fn decide_both(
        c: &Catalog,
        local: &MemoryStore,
        shared: &MemoryStore,
        now: Millis,
        (_, second, tenant_b, deny, fails): Call,
    ) -> (Outcome, Outcome) {
        let h: Vec<(String, String)> = vec![
            (
                "ocp-apim-subscription-key".into(),
                if second { "k2" } else { "k1" }.into(),
            ),
            ("x-tenant".into(), if tenant_b { "b" } else { "a" }.into()),
            ("x-deny".into(), if deny { "yes" } else { "no" }.into()),
        ];
        let req = request("/a/x", &h);
        let done = Completion {
            status: if fails { 500 } else { 200 },
            request_bytes: 0,
            response_bytes: 0,
        };
        // Locally, as a single proxy decides.
        let d = c.decide(&req, now, local).unwrap();
        if let (Outcome::Allowed, Some(call)) = (d.outcome, &d.call) {
            c.complete(call, done, now, local).unwrap();
        }
        // In two passes around a counter service on another store.
        let (first, plan) = c.plan(&req, now);
        let outcome = if plan.ops.is_empty() {
            first.unwrap().outcome
        } else {
            let answers = apply_plan(&plan, shared, now).unwrap();
            let d2 = c.decide_answered(&req, now, &answers).unwrap();
            if let (Outcome::Allowed, Some(call)) = (d2.outcome, &d2.call) {
                for op in c.completion_ops(call, done, now).unwrap() {
                    op.op().apply(shared, now).unwrap();
                }
            }
            d2.outcome
        };
        (d.outcome, outcome)
    }

    proptest! {
        /// Any sequence of calls decides the same locally and in two passes around a counter
        /// service: every outcome, so every counter behind them.
        #[test]
        fn two_passes_decide_as_one_local_decision(
            calls in proptest::collection::vec(
                (0u16..3_000, any::<bool>(), any::<bool>(), proptest::bool::weighted(0.15), proptest::bool::weighted(0.2)),
                1..60,
            )
        ) {
            let c = catalog();
            let (local, shared) = (MemoryStore::new(), MemoryStore::new());
            let mut now = 1_000_000;
            for call in calls {
                now += Millis::from(call.0);
                let (one, two) = decide_both(&c, &local, &shared, now, call);
                prop_assert_eq!(one, two, "at {}", now);
            }
        }
    }

    #[test]
    fn a_call_that_meets_no_counter_has_an_empty_plan() {
        let c = catalog();
        let h: Vec<(String, String)> = vec![];
        let req = request("/nowhere", &h);
        let (d, plan) = c.plan(&req, 0);
        assert_eq!(d.unwrap().outcome, Outcome::ApiNotFound);
        assert!(plan.ops.is_empty());
    }

    #[test]
    fn a_header_check_after_the_limits_asks_for_them_back() {
        let c = catalog();
        let shared = MemoryStore::new();
        let h: Vec<(String, String)> = vec![
            ("ocp-apim-subscription-key".into(), "k1".into()),
            ("x-deny".into(), "yes".into()),
        ];
        let req = request("/a/x", &h);
        let (d, plan) = c.plan(&req, 0);
        assert_eq!(d.unwrap().outcome, Outcome::HeaderCheckFailed);
        assert!(plan.then_release && !plan.ops.is_empty());
        for _ in 0..10 {
            let answers = apply_plan(&plan, &shared, 0).unwrap();
            let d = c.decide_answered(&req, 0, &answers).unwrap();
            assert_eq!(d.outcome, Outcome::HeaderCheckFailed);
        }
        // Ten denied calls counted nowhere: the rate limit of 4 still admits.
        let ok: Vec<(String, String)> = vec![
            ("ocp-apim-subscription-key".into(), "k1".into()),
            ("x-deny".into(), "no".into()),
        ];
        let req = Request {
            headers: &ok,
            ..req
        };
        let (_, plan) = c.plan(&req, 1);
        let answers = apply_plan(&plan, &shared, 1).unwrap();
        assert_eq!(
            c.decide_answered(&req, 1, &answers).unwrap().outcome,
            Outcome::Allowed
        );
    }

    #[test]
    fn unreachable_counters_decide_as_on_unavailable_says() {
        let c = catalog();
        let h: Vec<(String, String)> = vec![
            ("ocp-apim-subscription-key".into(), "k1".into()),
            ("x-deny".into(), "no".into()),
        ];
        let req = request("/a/x", &h);
        let local = MemoryStore::new();
        // deny: SPEC §4's 503, counting nothing.
        let d = c
            .decide_unavailable(&req, 0, OnUnavailable::Deny, &local)
            .unwrap();
        assert_eq!(d.outcome, Outcome::CountersUnavailable);
        let r = d.response.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            r#"{"statusCode": 503, "message": "Service Unavailable"}"#
        );
        // allow: every limit admits, past all of them (the tightest admits 2); nobody counted, so
        // no remaining-calls header is made up.
        for _ in 0..6 {
            let d = c
                .decide_unavailable(&req, 0, OnUnavailable::Allow, &local)
                .unwrap();
            assert_eq!(d.outcome, Outcome::Allowed);
            let call = d.call.unwrap();
            assert!(c.respond(&call, 200, &|_| false).unwrap().is_empty());
        }
        // local: this proxy's own counters, the API's by-key rate limit of 2 enforced.
        let outcomes: Vec<Outcome> = (0..3)
            .map(|_| {
                c.decide_unavailable(&req, 0, OnUnavailable::Local, &local)
                    .unwrap()
                    .outcome
            })
            .collect();
        assert_eq!(
            outcomes,
            [Outcome::Allowed, Outcome::Allowed, Outcome::RateLimited]
        );
    }
}
