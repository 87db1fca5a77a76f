//! `include-fragment` (APIM's policy reference: "Include fragment"): a fragment of the snapshot's
//! `policyFragments` is compiled where it is included, limits and all; a fault inside it is named
//! by the fragment and its place in it; a missing or self-including fragment is refused.

// Test helpers may unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_policies::{Catalog, LoadOptions, MemoryStore, Outcome, Request};
use serde_json::{json, Value};

fn snapshot(product_policy: &str, fragments: Value) -> Value {
    json!({
        "apis": [{"name": "orders", "properties": {"path": "orders"}}],
        "products": [{"name": "p", "apis": ["orders"], "policy": product_policy}],
        "subscriptions": [{"name": "s", "properties": {"scope": "/products/p", "primaryKey": "k"}}],
        "policyFragments": fragments,
    })
}

fn first_error(doc: &Value) -> String {
    Catalog::load(doc, LoadOptions::default()).err().unwrap().0[0].to_string()
}

#[test]
fn a_fragments_limit_counts_where_it_is_included() {
    // Both shapes of the export: a map of names to documents, and ARM's list.
    for fragments in [
        json!({"tight": "<fragment><rate-limit-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"@(context.Subscription.Id)\" /></fragment>"}),
        json!([{"name": "tight", "properties": {"format": "rawxml", "value": "<fragment><rate-limit-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"@(context.Subscription.Id)\" /></fragment>"}}]),
    ] {
        let c = Catalog::load(
            &snapshot(
                r#"<policies><inbound><base /><include-fragment fragment-id="tight" /></inbound></policies>"#,
                fragments,
            ),
            LoadOptions::default(),
        )
        .unwrap();
        let h = vec![("Ocp-Apim-Subscription-Key".to_string(), "k".to_string())];
        let req = Request {
            method: "GET",
            host: "h",
            path: "/orders",
            query: "",
            headers: &h,
            client_ip: None,
        };
        let store = MemoryStore::new();
        assert_eq!(c.decide(&req, 0, &store).unwrap().outcome, Outcome::Allowed);
        assert_eq!(
            c.decide(&req, 1000, &store).unwrap().outcome,
            Outcome::RateLimited
        );
    }
}

#[test]
fn faults_name_the_fragment_and_their_place_in_it() {
    let e = first_error(&snapshot(
        r#"<policies><inbound><include-fragment fragment-id="f" /></inbound></policies>"#,
        json!({"f": "<fragment>\n  <rate-limit-by-key calls=\"x\" renewal-period=\"60\" counter-key=\"a\" />\n</fragment>"}),
    ));
    assert!(
        e.starts_with("fragment 'f' (included by product 'p') policy, line 2, column 3:"),
        "{e}"
    );
    let e = first_error(&snapshot(
        r#"<policies><inbound><include-fragment fragment-id="nope" /></inbound></policies>"#,
        json!({}),
    ));
    assert!(
        e.contains("fragment 'nope' is not in the snapshot's policyFragments"),
        "{e}"
    );
    let e = first_error(&snapshot(
        r#"<policies><inbound><include-fragment fragment-id="loop" /></inbound></policies>"#,
        json!({"loop": "<fragment><include-fragment fragment-id=\"loop\" /></fragment>"}),
    ));
    assert!(e.contains("fragment 'loop' includes itself"), "{e}");
    let e = first_error(&snapshot(
        r#"<policies><inbound><include-fragment fragment-id="b" /></inbound></policies>"#,
        json!({"b": "<fragment><base /></fragment>"}),
    ));
    assert!(e.contains("<base /> inside <choose> or a fragment"), "{e}");
    let e = first_error(&snapshot(
        r#"<policies><inbound><include-fragment fragment-id="w" /></inbound></policies>"#,
        json!({"w": "<policies />"}),
    ));
    assert!(e.contains("expected <fragment>"), "{e}");
}
