//! `choose` and `set-variable` through the public engine API: the branch that runs is the first
//! whose condition holds (else `otherwise`), a limit counts only when its branch runs, and
//! variables set inbound are seen by later steps, by the outbound section and at completion.
//! APIM's policy reference: "Control flow" and "Set variable".

// Test helpers may unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_policies::{
    Catalog, Completion, HeaderEdit, LoadOptions, MemoryStore, Outcome, Request,
};
use proptest::prelude::*;
use serde_json::json;

fn catalog(product_policy: &str) -> Catalog {
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"displayName": "Orders", "path": "orders"}}],
        "products": [{"name": "p", "apis": ["orders"], "policy": product_policy}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k", "displayName": "Gold app"}}]
    });
    Catalog::load(&doc, LoadOptions::default()).unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut h = vec![("Ocp-Apim-Subscription-Key".to_string(), "k".to_string())];
    h.extend(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    h
}

fn request(h: &[(String, String)]) -> Request<'_> {
    Request {
        method: "GET",
        host: "api.contoso.com",
        path: "/orders/1",
        query: "",
        headers: h,
        client_ip: Some("192.0.2.7".parse().unwrap()),
    }
}

/// The value of a header the response edits set.
fn set_value(edits: &[HeaderEdit<'_>], name: &str) -> Option<String> {
    edits.iter().rev().find_map(|e| match e {
        HeaderEdit::Set(n, v) if n.eq_ignore_ascii_case(name) => Some(v.to_string()),
        _ => None,
    })
}

#[test]
fn the_first_true_when_runs_else_otherwise() {
    let c = catalog(
        r#"<policies><inbound><base />
            <choose>
              <when condition="@(context.Request.Headers.GetValueOrDefault("x-tier", "") == "gold")">
                <set-header name="x-branch" exists-action="override"><value>gold</value></set-header>
              </when>
              <when condition="@(context.Request.Headers.ContainsKey("x-tier"))">
                <set-header name="x-branch" exists-action="override"><value>other</value></set-header>
              </when>
              <otherwise>
                <set-header name="x-branch" exists-action="override"><value>none</value></set-header>
              </otherwise>
            </choose>
            <set-header name="x-after" exists-action="override"><value>1</value></set-header>
        </inbound></policies>"#,
    );
    for (tier, branch) in [
        (Some("gold"), "gold"),
        (Some("silver"), "other"),
        (None, "none"),
    ] {
        let h = headers(&tier.map(|t| vec![("x-tier", t)]).unwrap_or_default());
        let d = c.decide(&request(&h), 0, &MemoryStore::new()).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(set_value(&d.upstream, "x-branch").as_deref(), Some(branch));
        // Whatever branch ran, the step after the choose runs.
        assert_eq!(set_value(&d.upstream, "x-after").as_deref(), Some("1"));
    }
}

#[test]
fn a_limit_in_a_branch_that_does_not_run_counts_nothing() {
    let c = catalog(
        r#"<policies><inbound><base />
            <choose>
              <when condition="@(context.Request.Headers.GetValueOrDefault("x-tier", "") == "free")">
                <rate-limit calls="1" renewal-period="60" />
              </when>
            </choose>
        </inbound></policies>"#,
    );
    let store = MemoryStore::new();
    let gold = headers(&[("x-tier", "gold")]);
    for t in 0..5 {
        let d = c.decide(&request(&gold), t * 1000, &store).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed, "gold call {t}");
    }
    let free = headers(&[("x-tier", "free")]);
    let d = c.decide(&request(&free), 6000, &store).unwrap();
    assert_eq!(d.outcome, Outcome::Allowed, "the free tier's first call");
    let d = c.decide(&request(&free), 7000, &store).unwrap();
    assert_eq!(d.outcome, Outcome::RateLimited);
    assert_eq!(d.response.unwrap().status, 429);
}

#[test]
fn variables_reach_later_steps_the_outbound_section_and_the_completion() {
    let c = catalog(
        r#"<policies>
          <inbound><base />
            <set-variable name="tier" value="bronze" />
            <set-variable name="tier" value="@(context.Subscription.Name.StartsWith("Gold") ? "gold" : (string)context.Variables["tier"])" />
            <set-variable name="weight" value="@(context.Request.Headers.GetValueOrDefault("x-weight", "1").Length + 1)" />
            <rate-limit-by-key calls="5" renewal-period="60" counter-key="@((string)context.Variables["tier"])"
                increment-count="@(context.Variables.GetValueOrDefault<int>("weight", 1))"
                increment-condition="@(context.Response.StatusCode &lt; 400 &amp;&amp; (string)context.Variables["tier"] == "gold")"
                remaining-calls-header-name="x-left" />
          </inbound>
          <outbound><base />
            <choose>
              <when condition="@(context.Variables.ContainsKey("tier"))">
                <set-variable name="seen" value="@((string)context.Variables["tier"] + "/" + context.Response.StatusCode)" />
                <set-header name="x-tier" exists-action="override"><value>@((string)context.Variables["seen"])</value></set-header>
              </when>
            </choose>
          </outbound>
        </policies>"#,
    );
    let store = MemoryStore::new();
    let h = headers(&[]);
    let done = Completion {
        status: 200,
        request_bytes: 0,
        response_bytes: 0,
    };
    // Each completed call counts its weight, 2 ("1".Length + 1), under the tier's key, as the
    // increment-condition (reading the inbound variable at completion) holds. A call is
    // admitted while the counter is under 5: three calls make 6, and the fourth is refused.
    // (With the condition false nothing would count; with a weight of 1, the fourth would pass.)
    for t in 0..3 {
        let d = c.decide(&request(&h), t * 1000, &store).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed, "call {t}");
        let call = d.call.unwrap();
        let edits = c.respond(&call, 200, &|_| false).unwrap();
        assert_eq!(set_value(&edits, "x-tier").as_deref(), Some("gold/200"));
        c.complete(&call, done, t * 1000, &store).unwrap();
    }
    let d = c.decide(&request(&h), 4000, &store).unwrap();
    assert_eq!(d.outcome, Outcome::RateLimited);
}

#[test]
fn an_expression_that_throws_is_an_internal_failure() {
    let c = catalog(
        r#"<policies><inbound><base />
            <choose>
              <when condition="@((int)context.Variables["missing"] > 1)">
                <set-header name="x-a" exists-action="override"><value>a</value></set-header>
              </when>
            </choose>
        </inbound></policies>"#,
    );
    let h = headers(&[]);
    let err = c.decide(&request(&h), 0, &MemoryStore::new()).unwrap_err();
    assert!(
        err.to_string().starts_with("policy expression failed:"),
        "{err}"
    );
}

#[test]
fn base_inside_choose_and_a_second_rate_limit_are_refused_with_their_place() {
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"}}],
        "products": [{"name": "p", "apis": ["orders"], "policy": "<policies><inbound>\n<choose><when condition=\"@(true)\"><base /></when></choose>\n</inbound></policies>"}],
    });
    let e = Catalog::load(&doc, LoadOptions::default()).err().unwrap().0[0].to_string();
    assert!(
        e.contains("line 2") && e.contains("<base /> inside <choose>"),
        "{e}"
    );
    let doc = json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"}}],
        "products": [{"name": "p", "apis": ["orders"], "policy": r#"<policies><inbound><choose><when condition="@(true)"><rate-limit calls="1" renewal-period="1" /></when><otherwise><rate-limit calls="2" renewal-period="1" /></otherwise></choose></inbound></policies>"#}],
    });
    let e = Catalog::load(&doc, LoadOptions::default()).err().unwrap().0[0].to_string();
    assert!(e.contains("<rate-limit> may appear only once"), "{e}");
}

/// A random policy: limits and `choose`s, nested.
#[derive(Debug, Clone)]
enum Item {
    /// A by-key limit with a key of its own, large enough never to deny.
    Limit,
    /// `when`s on request headers (header index, value) with their branches, and maybe an
    /// `otherwise`.
    Choose(Vec<((usize, bool), Vec<Item>)>, Option<Vec<Item>>),
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    let leaf = Just(Item::Limit);
    let tree = leaf.prop_recursive(3, 24, 4, |inner| {
        let block = proptest::collection::vec(inner, 0..3);
        (
            proptest::collection::vec(((0..3usize, any::<bool>()), block.clone()), 1..4),
            proptest::option::of(block),
        )
            .prop_map(|(whens, otherwise)| Item::Choose(whens, otherwise))
    });
    proptest::collection::vec(tree, 1..4)
}

/// Writes the policy, numbering the limits in document order.
fn write(items: &[Item], next: &mut usize, out: &mut String) {
    for item in items {
        match item {
            Item::Limit => {
                let i = *next;
                *next += 1;
                out.push_str(&format!(
                    r#"<rate-limit-by-key calls="100000" renewal-period="60" counter-key="k{i}" remaining-calls-header-name="x-left-{i}" />"#
                ));
            }
            Item::Choose(whens, otherwise) => {
                out.push_str("<choose>");
                for ((h, v), block) in whens {
                    out.push_str(&format!(
                        r#"<when condition="@(context.Request.Headers.GetValueOrDefault(&quot;x-h{h}&quot;, &quot;0&quot;) == &quot;{}&quot;)">"#,
                        u8::from(*v)
                    ));
                    write(block, next, out);
                    out.push_str("</when>");
                }
                if let Some(block) = otherwise {
                    out.push_str("<otherwise>");
                    write(block, next, out);
                    out.push_str("</otherwise>");
                }
                out.push_str("</choose>");
            }
        }
    }
}

/// The naive model: the limits a request with these header values runs, in order.
fn taken(items: &[Item], next: &mut usize, values: &[bool; 3], out: &mut Vec<usize>) {
    for item in items {
        match item {
            Item::Limit => {
                out.push(*next);
                *next += 1;
            }
            Item::Choose(whens, otherwise) => {
                let mut chosen = None;
                for (i, ((h, v), _)) in whens.iter().enumerate() {
                    if chosen.is_none() && values[*h] == *v {
                        chosen = Some(i);
                    }
                }
                for (i, (_, block)) in whens.iter().enumerate() {
                    let mut sink = Vec::new();
                    let target = if chosen == Some(i) {
                        &mut *out
                    } else {
                        &mut sink
                    };
                    taken(block, next, values, target);
                }
                if let Some(block) = otherwise {
                    let mut sink = Vec::new();
                    let target = if chosen.is_none() {
                        &mut *out
                    } else {
                        &mut sink
                    };
                    taken(block, next, values, target);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random branch structures and random requests: each call runs exactly the limits the
    /// naive model says, and each limit's count is the number of calls that ran it.
    #[test]
    fn choose_counts_only_the_branches_taken(
        policy in items(),
        calls in proptest::collection::vec(any::<[bool; 3]>(), 1..12),
    ) {
        let mut doc = String::from("<policies><inbound><base />");
        let mut limits = 0;
        write(&policy, &mut limits, &mut doc);
        doc.push_str("</inbound></policies>");
        let c = catalog(&doc);
        let store = MemoryStore::new();
        let mut counted = vec![0u64; limits];
        for (n, values) in calls.iter().enumerate() {
            let v: Vec<String> = values.iter().map(|b| u8::from(*b).to_string()).collect();
            let h = headers(&[("x-h0", &v[0]), ("x-h1", &v[1]), ("x-h2", &v[2])]);
            let d = c.decide(&request(&h), n as i64 * 10, &store).unwrap();
            prop_assert_eq!(d.outcome, Outcome::Allowed);
            let edits = c.respond(d.call.as_ref().unwrap(), 200, &|_| false).unwrap();
            let mut expected = Vec::new();
            taken(&policy, &mut 0, values, &mut expected);
            for &i in &expected {
                counted[i] += 1;
            }
            for (i, count) in counted.iter().enumerate() {
                let left = set_value(&edits, &format!("x-left-{i}"));
                if expected.contains(&i) {
                    prop_assert_eq!(left, Some((100_000 - count).to_string()), "limit {} in {}", i, doc);
                } else {
                    prop_assert_eq!(left, None, "limit {} ran, but its branch was not taken: {}", i, doc);
                }
            }
        }
    }
}

/// `context.User.Id` is the owner of the call's subscription (the last segment of its
/// `ownerId`), `context.Deployment.Region` the service's `location`, and
/// `context.Request.OriginalUrl` the URL as received (the edge rewrites none): a policy can
/// pick a branch by user and region, as APIM's reference examples do.
#[test]
fn user_region_and_original_url_are_readable() {
    let policy = r#"<policies><inbound><base />
        <choose>
          <when condition="@(context.User.Id == "1" &amp;&amp; "West US".Equals(context.Deployment.Region, StringComparison.OrdinalIgnoreCase))">
            <set-header name="x-branch" exists-action="override"><value>admin-west</value></set-header>
          </when>
          <otherwise>
            <set-header name="x-branch" exists-action="override"><value>other</value></set-header>
          </otherwise>
        </choose>
        <set-header name="x-original" exists-action="override"><value>@(context.Request.OriginalUrl.Host + context.Request.OriginalUrl.Path)</value></set-header>
    </inbound></policies>"#;
    let load = |owner: &str, location: &str| {
        let doc = json!({
            "service": {"name": "contoso", "location": location},
            "apis": [{"name": "orders", "properties": {"path": "orders"}}],
            "products": [{"name": "p", "apis": ["orders"], "policy": policy}],
            "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k",
                "ownerId": owner}}]
        });
        Catalog::load(&doc, LoadOptions::default()).unwrap()
    };
    let h = headers(&[]);
    for (owner, location, branch) in [
        ("/subscriptions/x/resourceGroups/r/providers/Microsoft.ApiManagement/service/contoso/users/1", "westus", "other"),
        ("/users/1", "West US", "admin-west"),
        ("/users/1", "west us", "admin-west"),
        ("/users/2", "West US", "other"),
    ] {
        let c = load(owner, location);
        let d = c.decide(&request(&h), 0, &MemoryStore::new()).unwrap();
        assert_eq!(d.outcome, Outcome::Allowed, "{owner} {location}");
        assert_eq!(
            set_value(&d.upstream, "x-branch").as_deref(),
            Some(branch),
            "{owner} {location}"
        );
        assert_eq!(
            set_value(&d.upstream, "x-original").as_deref(),
            Some("api.contoso.com/orders/1")
        );
    }
}

/// APIM's `context.User` is null for a subscription without an owner: reading its `Id`
/// throws, which is an internal failure as any throwing expression is.
#[test]
fn the_user_of_a_subscription_without_owner_is_null() {
    let c = catalog(
        r#"<policies><inbound><base /><set-header name="x-user" exists-action="override"><value>@(context.User.Id)</value></set-header></inbound></policies>"#,
    );
    let h = headers(&[]);
    let e = match c.decide(&request(&h), 0, &MemoryStore::new()) {
        Ok(d) => panic!("decided {:?}", d.outcome),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("context.User is null"), "{e}");
}
