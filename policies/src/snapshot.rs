//! The catalog snapshot (SPEC §2): reading the JSON document into plain definitions, in either
//! resource shape (REST `{"name", "properties": {...}}` or the flat shape of `az ... -o json`),
//! with full or short ARM ids, and validating it. Keys become SHA-256 digests here.

use crate::clock::{parse_rfc3339, Millis};
use crate::error::LoadError;
use crate::ids::{ApiId, ProductId};
use crate::json::{Node, Result};
use crate::keys::{key_digest, parse_digest_hex, Digest};
use crate::route::{segments, UrlTemplate};
use hashbrown::HashMap;
use serde_json::Value;

pub(crate) struct OperationDef {
    pub name: String,
    pub display_name: String,
    pub method: String,
    pub template: UrlTemplate,
    pub policy: Option<(String, String)>,
}

pub(crate) struct ApiDef {
    pub name: String,
    pub display_name: String,
    /// Lower-case segments joined by `/`, no leading or trailing slash.
    pub path: String,
    /// The path as written, for the missing-key realm.
    pub path_text: String,
    pub hostnames: Vec<String>,
    pub subscription_required: bool,
    pub header_name: String,
    pub query_name: String,
    pub operations: Vec<OperationDef>,
    /// The policy text and the JSON path it came from.
    pub policy: Option<(String, String)>,
}

pub(crate) struct ProductDef {
    pub name: String,
    pub display_name: String,
    pub subscription_required: bool,
    /// Sorted.
    pub apis: Vec<ApiId>,
    pub policy: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscriptionScope {
    Product(ProductId),
    Api(ApiId),
    AllApis,
    Service,
}

pub(crate) struct SubscriptionDef {
    pub name: String,
    pub display_name: String,
    pub scope: SubscriptionScope,
    pub state: String,
    /// Quota windows start here: `startDate`, else `createdDate`, else the epoch.
    pub origin: Millis,
    pub keys: Vec<Digest>,
    /// The owner's user id (`context.User.Id`): the last segment of `ownerId`.
    pub user: Option<String>,
}

pub(crate) struct Snapshot {
    pub service: String,
    /// The service's `location` (`context.Deployment.Region`).
    pub location: Option<String>,
    pub global_policy: Option<(String, String)>,
    pub named_values: HashMap<String, String>,
    /// Policy fragments by name (`include-fragment`): each a `<fragment>` document.
    pub policy_fragments: HashMap<String, String>,
    /// JWK sets by `openid-config` URL (`validate-jwt`), as the URL's `jwks_uri` serves them.
    pub jwks: HashMap<String, serde_json::Value>,
    pub apis: Vec<ApiDef>,
    pub products: Vec<ProductDef>,
    pub subscriptions: Vec<SubscriptionDef>,
}

impl Snapshot {
    /// Whether any policy text (fragments and named values included) contains `needle`: a
    /// cheap, conservative test of what the policies may read, made before they are compiled.
    pub(crate) fn mentions(&self, needle: &str) -> bool {
        let policy =
            |p: &Option<(String, String)>| p.as_ref().is_some_and(|(t, _)| t.contains(needle));
        policy(&self.global_policy)
            || self
                .apis
                .iter()
                .any(|a| policy(&a.policy) || a.operations.iter().any(|o| policy(&o.policy)))
            || self.products.iter().any(|p| policy(&p.policy))
            || self.policy_fragments.values().any(|t| t.contains(needle))
            || self.named_values.values().any(|t| t.contains(needle))
    }
}

pub(crate) const SUBSCRIPTION_STATES: [&str; 6] = [
    "active",
    "submitted",
    "suspended",
    "cancelled",
    "expired",
    "rejected",
];

/// The identifier a reference names: `starter`, `/products/starter` or a full ARM id.
fn reference<'v>(text: &'v str, collection: &str) -> &'v str {
    let marker = format!("/{collection}/");
    match text.rfind(&marker) {
        Some(i) => text[i + marker.len()..].trim_end_matches('/'),
        None => text,
    }
}

fn parse_scope(text: &str) -> Option<(&'static str, &str)> {
    let rest = match text.find("/service/") {
        Some(i) => {
            let after = &text[i + "/service/".len()..];
            match after.find('/') {
                Some(j) => &after[j..],
                None => "",
            }
        }
        None => text,
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Some(("service", ""));
    }
    if rest == "/apis" {
        return Some(("apis", ""));
    }
    if let Some(api) = rest.strip_prefix("/apis/") {
        return (!api.contains('/')).then_some(("api", api));
    }
    if let Some(p) = rest.strip_prefix("/products/") {
        return (!p.contains('/')).then_some(("product", p));
    }
    None
}

/// A policy given as text, or as an ARM policy resource (`{"properties": {"value": ...}}`).
fn policy_text(node: Option<Node>) -> Result<Option<(String, String)>> {
    let Some(node) = node else { return Ok(None) };
    if let Some(s) = node.value.as_str() {
        return Ok(Some((s.to_string(), node.path)));
    }
    let props = node.properties();
    match props.field("value") {
        Some(v) => Ok(Some((v.as_str()?.to_string(), v.path))),
        None => Err(node.error("expected a policy document (a string)")),
    }
}

fn name_of(node: &Node, props: &Node) -> Result<String> {
    if let Some(n) = node.opt_str("name")? {
        return Ok(n.to_string());
    }
    if let Some(id) = node.opt_str("id")?.or(props.opt_str("id")?) {
        let last = id.trim_end_matches('/').rsplit('/').next().unwrap_or(id);
        return Ok(last.to_string());
    }
    Err(node.error("a resource needs a 'name' (or an 'id')"))
}

fn date(props: &Node, field: &str) -> Result<Option<Millis>> {
    match props.field(field) {
        None => Ok(None),
        Some(n) => {
            let s = n.as_str()?;
            parse_rfc3339(s)
                .or_else(|| parse_rfc3339(&format!("{s}Z")))
                .map(Some)
                .ok_or_else(|| n.error(format!("expected an RFC 3339 date and time, not \"{s}\"")))
        }
    }
}

fn key(props: &Node, plain: &str, digest: &str) -> Result<Option<Digest>> {
    if let Some(n) = props.field(plain) {
        let k = n.as_str()?;
        if k.is_empty() {
            return Err(n.error("a subscription key must not be empty"));
        }
        return Ok(Some(key_digest(k)));
    }
    if let Some(n) = props.field(digest) {
        let d = n.as_str()?;
        return parse_digest_hex(d)
            .map(Some)
            .ok_or_else(|| n.error("expected 64 hex digits (SHA-256 of the key)"));
    }
    Ok(None)
}

/// Records an identifier, refusing duplicates (ARM names are case-insensitive).
fn unique(
    seen: &mut HashMap<String, u32>,
    name: &str,
    index: usize,
    node: &Node,
    what: &str,
    errors: &mut Vec<LoadError>,
) {
    if seen
        .insert(name.to_ascii_lowercase(), index as u32)
        .is_some()
    {
        errors.push(node.error(format!("duplicate {what} '{name}'")));
    }
}

pub(crate) fn read(doc: &Value) -> std::result::Result<Snapshot, Vec<LoadError>> {
    let root = Node::root(doc);
    let mut errors = Vec::new();
    let snapshot = read_into(&root, &mut errors).map_err(|e| vec![e])?;
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(errors)
    }
}

fn read_into(root: &Node, errors: &mut Vec<LoadError>) -> Result<Snapshot> {
    root.expect_object()?;
    if let Some(v) = root.field("schemaVersion") {
        if v.value.as_u64() != Some(1) {
            return Err(v.error("unsupported schemaVersion (this build reads 1)"));
        }
    }
    let (service, location, global_policy) = match root.field("service") {
        Some(s) => {
            s.expect_object()?;
            let p = s.properties();
            let name = s.opt_str("name")?.unwrap_or("apim").to_string();
            // An ARM resource's location is beside its properties.
            let location = match s.opt_str("location")? {
                Some(l) => Some(l),
                None => p.opt_str("location")?,
            };
            (
                name,
                location.map(str::to_string),
                policy_text(s.field("policy").or(p.field("policy")))?,
            )
        }
        None => ("apim".to_string(), None, None),
    };

    let mut named_values = HashMap::new();
    if let Some(nv) = root.field("namedValues") {
        if nv.value.is_array() {
            for item in nv.items()? {
                let p = item.properties();
                let name = p
                    .opt_str("displayName")?
                    .map(str::to_string)
                    .map_or_else(|| name_of(&item, &p), Ok)?;
                let value = p.req_str("value")?;
                named_values.insert(name, value.to_string());
            }
        } else {
            for (k, v) in nv.members()? {
                named_values.insert(k.to_string(), v.as_str()?.to_string());
            }
        }
    }

    // Fragments: `{"name": "<fragment>...</fragment>"}`, or the ARM list whose items carry
    // `properties.value`.
    let mut policy_fragments = HashMap::new();
    if let Some(pf) = root.field("policyFragments") {
        if pf.value.is_array() {
            for item in pf.items()? {
                let p = item.properties();
                let name = name_of(&item, &p)?;
                let value = p.req_str("value")?;
                policy_fragments.insert(name, value.to_string());
            }
        } else {
            for (k, v) in pf.members()? {
                policy_fragments.insert(k.to_string(), v.as_str()?.to_string());
            }
        }
    }

    let mut jwks = HashMap::new();
    if let Some(j) = root.field("jwks") {
        for (url, set) in j.members()? {
            set.expect_object()?;
            jwks.insert(url.to_string(), set.value.clone());
        }
    }

    let mut apis = Vec::new();
    let mut api_ids: HashMap<String, u32> = HashMap::new();
    if let Some(list) = root.field("apis") {
        for (i, node) in list.items()?.into_iter().enumerate() {
            node.expect_object()?;
            let api = read_api(&node)?;
            unique(&mut api_ids, &api.name, i, &node, "API", errors);
            apis.push(api);
        }
    }

    let mut products = Vec::new();
    let mut product_ids: HashMap<String, u32> = HashMap::new();
    if let Some(list) = root.field("products") {
        for (i, node) in list.items()?.into_iter().enumerate() {
            node.expect_object()?;
            let p = node.properties();
            let name = name_of(&node, &p)?;
            let mut members = Vec::new();
            let api_list = node.field("apis").or(p.field("apis"));
            if let Some(list) = api_list {
                for a in list.items()? {
                    let text = match a.value.as_str() {
                        Some(s) => s,
                        None => a
                            .opt_str("name")?
                            .or(a.opt_str("id")?)
                            .ok_or_else(|| a.error("expected an API name or id"))?,
                    };
                    let id = reference(text, "apis");
                    match api_ids.get(&id.to_ascii_lowercase()) {
                        Some(&ix) => members.push(ApiId(ix)),
                        None => errors.push(a.error(format!("API '{id}' does not exist"))),
                    }
                }
            }
            members.sort_unstable();
            members.dedup();
            unique(&mut product_ids, &name, i, &node, "product", errors);
            products.push(ProductDef {
                display_name: p.opt_str("displayName")?.unwrap_or(&name).to_string(),
                subscription_required: p.opt_bool("subscriptionRequired")?.unwrap_or(true),
                apis: members,
                policy: policy_text(node.field("policy").or(p.field("policy")))?,
                name,
            });
            if let Some(s) = p.field("state") {
                let s_text = s.as_str()?;
                if s_text != "published" && s_text != "notPublished" {
                    errors.push(s.error(format!(
                        "expected 'published' or 'notPublished', not \"{s_text}\""
                    )));
                }
            }
        }
    }

    // An API may be in at most one open product.
    let mut open: HashMap<ApiId, usize> = HashMap::new();
    for (pi, p) in products.iter().enumerate() {
        if p.subscription_required {
            continue;
        }
        for a in &p.apis {
            if let Some(other) = open.insert(*a, pi) {
                errors.push(LoadError::Snapshot {
                    path: format!("products[{pi}].apis"),
                    message: format!(
                        "API '{}' is already in the open product '{}'; an API can be in at most one product without subscriptions",
                        apis[a.index()].name, products[other].name
                    ),
                });
            }
        }
    }

    let mut subscriptions = Vec::new();
    let mut sub_ids: HashMap<String, u32> = HashMap::new();
    if let Some(list) = root.field("subscriptions") {
        for (i, node) in list.items()?.into_iter().enumerate() {
            node.expect_object()?;
            let p = node.properties();
            let name = name_of(&node, &p)?;
            let scope_node = p.field("scope").ok_or_else(|| {
                Node {
                    value: p.value,
                    path: format!("{}.scope", p.path),
                }
                .error("required")
            })?;
            let scope_text = scope_node.as_str()?;
            let scope = match parse_scope(scope_text) {
                Some(("service", _)) => SubscriptionScope::Service,
                Some(("apis", _)) => SubscriptionScope::AllApis,
                Some(("api", a)) => match api_ids.get(&a.to_ascii_lowercase()) {
                    Some(&ix) => SubscriptionScope::Api(ApiId(ix)),
                    None => {
                        errors.push(scope_node.error(format!("API '{a}' does not exist")));
                        continue;
                    }
                },
                Some((_, prod)) => match product_ids.get(&prod.to_ascii_lowercase()) {
                    Some(&ix) => SubscriptionScope::Product(ProductId(ix)),
                    None => {
                        errors.push(scope_node.error(format!("product '{prod}' does not exist")));
                        continue;
                    }
                },
                None => {
                    errors.push(scope_node.error(format!(
                        "expected /products/{{id}}, /apis/{{id}}, /apis or /, not \"{scope_text}\""
                    )));
                    continue;
                }
            };
            let state_node = p.field("state");
            let state = match &state_node {
                Some(s) => s.as_str()?.to_string(),
                None => "active".to_string(),
            };
            if !SUBSCRIPTION_STATES.contains(&state.as_str()) {
                errors.push(state_node.map_or_else(
                    || node.error("bad state"),
                    |s| {
                        s.error(format!(
                            "expected one of {}, not \"{state}\"",
                            SUBSCRIPTION_STATES.join(", ")
                        ))
                    },
                ));
            }
            let origin = match date(&p, "startDate")? {
                Some(t) => t,
                None => date(&p, "createdDate")?.unwrap_or(0),
            };
            let keys: Vec<Digest> = [
                key(&p, "primaryKey", "primaryKeySha256")?,
                key(&p, "secondaryKey", "secondaryKeySha256")?,
            ]
            .into_iter()
            .flatten()
            .collect();
            let user = p
                .opt_str("ownerId")?
                .and_then(|o| o.trim_end_matches('/').rsplit('/').next())
                .filter(|u| !u.is_empty())
                .map(str::to_string);
            unique(&mut sub_ids, &name, i, &node, "subscription", errors);
            subscriptions.push(SubscriptionDef {
                user,
                display_name: p.opt_str("displayName")?.unwrap_or(&name).to_string(),
                name,
                scope,
                state,
                origin,
                keys,
            });
        }
    }

    Ok(Snapshot {
        service,
        location,
        global_policy,
        named_values,
        policy_fragments,
        jwks,
        apis,
        products,
        subscriptions,
    })
}

fn read_api(node: &Node) -> Result<ApiDef> {
    let p = node.properties();
    let name = name_of(node, &p)?;
    let path_text = p
        .opt_str("path")?
        .unwrap_or("")
        .trim_matches('/')
        .to_string();
    let path = segments(&path_text)
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join("/");
    let mut hostnames = Vec::new();
    if let Some(h) = node.field("hostnames").or(p.field("hostnames")) {
        for item in h.items()? {
            hostnames.push(item.as_str()?.to_ascii_lowercase());
        }
    }
    let (mut header_name, mut query_name) = (
        "Ocp-Apim-Subscription-Key".to_string(),
        "subscription-key".to_string(),
    );
    if let Some(names) = p.field("subscriptionKeyParameterNames") {
        names.expect_object()?;
        if let Some(h) = names.opt_str("header")? {
            header_name = h.to_string();
        }
        if let Some(q) = names.opt_str("query")? {
            query_name = q.to_string();
        }
    }
    let mut op_policies: HashMap<String, (String, String)> = HashMap::new();
    if let Some(ops) = node.field("operationPolicies") {
        for (k, v) in ops.members()? {
            if let Some(t) = policy_text(Some(v))? {
                op_policies.insert(k.to_ascii_lowercase(), t);
            }
        }
    }
    let mut operations: Vec<OperationDef> = Vec::new();
    if let Some(list) = node.field("operations").or(p.field("operations")) {
        for op in list.items()? {
            op.expect_object()?;
            let op_props = op.properties();
            let op_name = name_of(&op, &op_props)?;
            if operations
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&op_name))
            {
                return Err(op.error(format!("duplicate operation '{op_name}'")));
            }
            let template_node = op_props.field("urlTemplate");
            let template_text = match &template_node {
                Some(t) => t.as_str()?,
                None => "/*",
            };
            let template = UrlTemplate::parse(template_text).map_err(|e| {
                template_node
                    .as_ref()
                    .map_or_else(|| op.error(e.clone()), |t| t.error(e.clone()))
            })?;
            let own_policy = policy_text(op.field("policy").or(op_props.field("policy")))?;
            operations.push(OperationDef {
                display_name: op_props
                    .opt_str("displayName")?
                    .unwrap_or(&op_name)
                    .to_string(),
                method: op_props.req_str("method")?.to_ascii_uppercase(),
                template,
                policy: own_policy.or_else(|| op_policies.remove(&op_name.to_ascii_lowercase())),
                name: op_name,
            });
        }
    }
    if let Some((left, _)) = op_policies.iter().next() {
        return Err(node.error(format!(
            "operationPolicies names operation '{left}', which the API does not list"
        )));
    }
    Ok(ApiDef {
        display_name: p.opt_str("displayName")?.unwrap_or(&name).to_string(),
        subscription_required: p.opt_bool("subscriptionRequired")?.unwrap_or(true),
        policy: policy_text(node.field("policy").or(p.field("policy")))?,
        name,
        path,
        path_text,
        hostnames,
        header_name,
        query_name,
        operations,
    })
}

/// Replaces every plain subscription key in a snapshot by its SHA-256 digest; returns how many
/// keys were sealed.
pub fn seal(doc: &mut Value) -> usize {
    let mut sealed = 0;
    let Some(subs) = doc.get_mut("subscriptions").and_then(Value::as_array_mut) else {
        return 0;
    };
    for sub in subs {
        let target = if sub.get("properties").is_some_and(Value::is_object) {
            sub.get_mut("properties")
        } else {
            Some(sub)
        };
        let Some(obj) = target.and_then(Value::as_object_mut) else {
            continue;
        };
        for (plain, digest) in [
            ("primaryKey", "primaryKeySha256"),
            ("secondaryKey", "secondaryKeySha256"),
        ] {
            if let Some(Value::String(k)) = obj.remove(plain) {
                obj.insert(
                    digest.to_string(),
                    Value::String(crate::keys::digest_hex(&key_digest(&k))),
                );
                sealed += 1;
            }
        }
    }
    sealed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(doc: Value) -> String {
        match read(&doc) {
            Ok(_) => panic!("loaded"),
            Err(e) => e[0].to_string(),
        }
    }

    #[test]
    fn names_the_json_path_of_a_type_error() {
        let doc = json!({"apis": [{"name": "a", "properties": {"path": "a"}}],
            "products": [{"name": "p0"}, {"name": "p1"}, {"name": "p2"},
                         {"name": "p3", "properties": {"subscriptionRequired": "yes"}}]});
        assert_eq!(
            err(doc),
            "products[3].properties.subscriptionRequired: expected a boolean"
        );
    }

    #[test]
    fn flat_and_rest_shapes_and_arm_ids() {
        let doc = json!({
        "apis": [{"name": "echo", "path": "/Echo/", "displayName": "Echo"}],
        "products": [{"id": "/subscriptions/x/resourceGroups/r/providers/Microsoft.ApiManagement/service/s/products/gold",
                      "apis": ["/subscriptions/x/resourceGroups/r/providers/Microsoft.ApiManagement/service/s/apis/echo"]}],
        "subscriptions": [
            {"name": "s1", "scope": "/subscriptions/x/resourceGroups/r/providers/Microsoft.ApiManagement/service/s/products/gold", "primaryKey": "k"},
            {"name": "s2", "properties": {"scope": "/apis", "primaryKeySha256": crate::keys::digest_hex(&key_digest("k2"))}},
            {"name": "s3", "properties": {"scope": "/subscriptions/x/resourceGroups/r/providers/Microsoft.ApiManagement/service/s/"}}
        ]});
        let s = read(&doc).unwrap();
        assert_eq!(s.apis[0].path, "echo");
        assert_eq!(s.products[0].name, "gold");
        assert_eq!(s.products[0].apis, vec![ApiId(0)]);
        assert_eq!(
            s.subscriptions[0].scope,
            SubscriptionScope::Product(ProductId(0))
        );
        assert_eq!(s.subscriptions[1].scope, SubscriptionScope::AllApis);
        assert_eq!(s.subscriptions[1].keys, vec![key_digest("k2")]);
        assert_eq!(s.subscriptions[2].scope, SubscriptionScope::Service);
    }

    #[test]
    fn validation_errors() {
        assert_eq!(
            err(json!({"products": [{"name": "p", "apis": ["nope"]}]})),
            "products[0].apis[0]: API 'nope' does not exist"
        );
        assert_eq!(
            err(json!({"subscriptions": [{"name": "s", "scope": "/products/nope"}]})),
            "subscriptions[0].scope: product 'nope' does not exist"
        );
        assert_eq!(
            err(json!({"apis": [{"name": "a"}, {"name": "A"}]})),
            "apis[1]: duplicate API 'A'"
        );
        assert_eq!(
            err(json!({"apis": [{"name": "a"}], "products": [
                {"name": "o1", "subscriptionRequired": false, "apis": ["a"]},
                {"name": "o2", "subscriptionRequired": false, "apis": ["a"]}]})),
            "products[1].apis: API 'a' is already in the open product 'o1'; an API can be in at most one product without subscriptions"
        );
        assert_eq!(
            err(json!({"subscriptions": [{"name": "s", "scope": "/", "primaryKey": ""}]})),
            "subscriptions[0].primaryKey: a subscription key must not be empty"
        );
        assert_eq!(
            err(json!({"subscriptions": [{"name": "s", "scope": "/", "primaryKeySha256": "abc"}]})),
            "subscriptions[0].primaryKeySha256: expected 64 hex digits (SHA-256 of the key)"
        );
        assert_eq!(
            err(json!({"subscriptions": [{"name": "s", "properties": {"scope": "/", "state": "paused"}}]})),
            "subscriptions[0].properties.state: expected one of active, submitted, suspended, cancelled, expired, rejected, not \"paused\""
        );
        assert_eq!(err(json!([])), "(root): expected an object");
        assert_eq!(
            err(json!({"subscriptions": [{"name": "s", "properties": {}}]})),
            "subscriptions[0].properties.scope: required"
        );
    }

    #[test]
    fn seal_replaces_plain_keys() {
        let mut doc = json!({"subscriptions": [
            {"name": "a", "properties": {"scope": "/", "primaryKey": "k1", "secondaryKey": "k2"}},
            {"name": "b", "scope": "/", "primaryKey": "k3"}]});
        assert_eq!(seal(&mut doc), 3);
        let text = doc.to_string();
        assert!(!text.contains("\"k1\"") && !text.contains("primaryKey\""));
        let s = read(&doc).unwrap();
        assert_eq!(s.subscriptions[1].keys, vec![key_digest("k3")]);
    }
}
