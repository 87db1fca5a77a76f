//! The outside corpus (`tests/corpus/apim-policies`, 118 real APIM policy documents): every
//! document is read without a panic; under `reject` each one compiles or is refused with an
//! error that names the first unsupported element or expression with its line and column; under
//! `skip` every document loads unless skipping would open a door. Each document is loaded as a
//! product's policy, with a placeholder for every named value it references, and the corpus's
//! fragments (an empty placeholder for one it does not hold).

// Test helpers may unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use apim_edge_policies::{Catalog, LoadError, LoadOptions, UnsupportedPolicies};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/apim-policies");
    let mut docs = Vec::new();
    for sub in ["policy-toolkit", "policy-snippets"] {
        for e in std::fs::read_dir(dir.join(sub)).expect("the corpus is in tests/corpus") {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "xml") {
                docs.push(p);
            }
        }
    }
    docs.sort();
    docs
}

/// A placeholder for every `{{name}}` the document references. "1" serves where a number is
/// expected as well as where text is; a signing key gets base64.
fn named_values(doc: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for piece in doc.split("{{").skip(1) {
        if let Some((name, _)) = piece.split_once("}}") {
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                // A signing key of validate-jwt is base64.
                let value = if doc.contains(&format!("<key>{{{{{name}}}}}</key>")) {
                    "c2VjcmV0"
                } else {
                    "1"
                };
                out.insert(name.to_string(), value.to_string());
            }
        }
    }
    out
}

/// The one document APIM itself refuses: its C# has an unterminated string literal
/// (`context.Variables["latlong=""` on line 41), so it is not a policy in either format.
const BROKEN: &str = "call-out-to-an-http-endpoint-and-cache-the-response.xml";

/// A policy fragment is not a policy document: APIM includes its content where
/// `<include-fragment>` stands. It is loaded that way here, as a product's inbound section.
fn as_policy(doc: &str) -> String {
    if doc.contains("<fragment>") {
        doc.replacen("<fragment>", "<policies><inbound>", 1)
            .replacen("</fragment>", "</inbound></policies>", 1)
    } else {
        doc.to_string()
    }
}

/// The corpus's fragments by file name (as `include-fragment` names them), and an empty
/// placeholder for each fragment a document includes that the corpus does not hold.
fn fragments(doc: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for path in corpus() {
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("<fragment>") {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            out.insert(stem, text);
        }
    }
    for piece in doc.split("fragment-id=\"").skip(1) {
        if let Some((id, _)) = piece.split_once('"') {
            out.entry(id.to_string())
                .or_insert_with(|| "<fragment />".to_string());
        }
    }
    out
}

fn load(doc: &str, mode: UnsupportedPolicies) -> Result<Catalog, Vec<LoadError>> {
    let doc = &as_policy(doc);
    let snapshot = json!({
        "policyFragments": fragments(doc),
        "namedValues": named_values(doc),
        "apis": [{"name": "api", "path": "api"}],
        "products": [{"name": "product", "apis": ["api"], "policy": doc}]
    });
    Catalog::load(
        &snapshot,
        LoadOptions {
            unsupported: mode,
            ..LoadOptions::default()
        },
    )
    .map_err(|e| e.0)
}

/// The reason of a refusal, without its position: `<cors> is not supported`, `expression`.
fn reason(message: &str) -> String {
    if message.starts_with("expression") {
        return "expression outside the subset".into();
    }
    if let Some(start) = message.find('<') {
        if let Some(end) = message[start..].find('>') {
            let element = &message[start..=start + end];
            if message.contains("is not supported") {
                return format!("{element} not supported");
            }
        }
    }
    if message.contains("expression") {
        return "expression outside the subset".into();
    }
    message.to_string()
}

#[test]
fn the_corpus_has_118_documents() {
    assert_eq!(corpus().len(), 118);
}

#[test]
fn reject_mode_compiles_or_names_the_first_fault_with_its_position() {
    let mut compiled = Vec::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for path in corpus() {
        let doc = std::fs::read_to_string(&path).unwrap();
        match load(&doc, UnsupportedPolicies::Reject) {
            Ok(_) => compiled.push(path.file_name().unwrap().to_string_lossy().to_string()),
            Err(errors) => {
                let first = &errors[0];
                let LoadError::Policy {
                    line,
                    column,
                    message,
                    scope,
                } = first
                else {
                    panic!("{}: not a policy error: {first}", path.display());
                };
                assert_eq!(scope, "product 'product'");
                assert!(*line >= 1 && *column >= 1);
                if path.ends_with(BROKEN) {
                    assert_eq!((*line, *column), (44, 54), "{first}");
                    assert_eq!(
                        message,
                        "unterminated string literal in a policy expression"
                    );
                    *reasons
                        .entry("not a valid document (APIM refuses it too)".into())
                        .or_default() += 1;
                    continue;
                }
                assert!(
                    message.contains('<') || message.contains("expression \""),
                    "{}: the error names no element or expression: {first}",
                    path.display()
                );
                if std::env::var("CORPUS_DETAIL").is_ok() {
                    eprintln!("{}: {message}", path.file_name().unwrap().to_string_lossy());
                }
                *reasons.entry(reason(message)).or_default() += 1;
            }
        }
    }
    let mut top: Vec<_> = reasons.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    eprintln!(
        "corpus, reject mode: {} of 118 compile: {compiled:?}",
        compiled.len()
    );
    for (r, n) in top.iter().take(15) {
        eprintln!("  {n:3}  {r}");
    }
    assert!(!compiled.is_empty());
}

/// Elements that can deny, limit or authenticate a call (SPEC §3a): never skipped.
fn can_deny(name: &str) -> bool {
    name.starts_with("validate-")
        || name.starts_with("check-")
        || name.ends_with("-token-limit")
        || [
            "rate-limit",
            "rate-limit-by-key",
            "quota",
            "quota-by-key",
            "ip-filter",
            "limit-concurrency",
            "return-response",
            "mock-response",
        ]
        .contains(&name)
}

/// The name of the element that starts at a line and column of a document.
fn element_at(doc: &str, line: usize, column: usize) -> String {
    let text = doc.lines().nth(line - 1).unwrap_or("");
    let rest: String = text.chars().skip(column - 1).collect();
    rest.trim_start_matches('<')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect()
}

/// Under `skip`, a document loads with only elements that shape traffic skipped; one whose
/// skipped element could deny, limit or authenticate (or holds or steers one) is refused, and
/// the refusal says so. No loaded document has a skipped element that can deny.
#[test]
fn skip_mode_skips_only_what_cannot_open_a_door() {
    let (mut loaded, mut refused) = (0, 0);
    for path in corpus() {
        let doc = std::fs::read_to_string(&path).unwrap();
        if path.ends_with(BROKEN) {
            assert!(load(&doc, UnsupportedPolicies::Skip).is_err());
            continue;
        }
        let policy = as_policy(&doc);
        match load(&doc, UnsupportedPolicies::Skip) {
            Ok(catalog) => {
                loaded += 1;
                for w in catalog.warnings() {
                    let (Some(l), Some(c)) =
                        (w.split(", line ").nth(1), w.split(", column ").nth(1))
                    else {
                        continue;
                    };
                    let line: usize = l.split(',').next().unwrap().parse().unwrap();
                    let column: usize = c.split(':').next().unwrap().parse().unwrap();
                    let element = element_at(&policy, line, column);
                    assert!(
                        !can_deny(&element),
                        "{}: <{element}> was skipped: {w}",
                        path.display()
                    );
                }
            }
            Err(errors) => {
                refused += 1;
                let first = errors[0].to_string();
                assert!(
                    first.contains("it is not skipped:"),
                    "{}: refused under skip for another reason: {first}",
                    path.display()
                );
            }
        }
    }
    eprintln!("corpus, skip mode: {loaded} load, {refused} refused (skipping would open a door)");
    assert_eq!(loaded + refused, 117);
    assert!(loaded > 0 && refused > 0);
}
