//! The command line's contract: exit codes, error messages that name what is wrong, `check`,
//! `seal` and `synth`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn apim_edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apim-edge"))
        .args(args)
        .output()
        .unwrap()
}

fn sample() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/catalog/sample.json")
        .to_string_lossy()
        .into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("apim-edge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn check_prints_a_summary() {
    let out = apim_edge(&["check", &sample()]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("apis           11 (6 operations)"), "{s}");
    assert!(s.contains("subscriptions  16 (11 active, 17 keys)"), "{s}");
}

#[test]
fn a_broken_snapshot_exits_2_naming_the_json_path() {
    let p = scratch("broken.json");
    std::fs::write(
        &p,
        r#"{"apis": [], "products": [{"name": "a"}, {"name": "b", "properties": {"subscriptionRequired": "yes"}}]}"#,
    )
    .unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(
        e.contains("products[1].properties.subscriptionRequired: expected a boolean"),
        "{e}"
    );
}

#[test]
fn an_unsupported_policy_is_refused_or_skipped() {
    let p = scratch("cors.json");
    std::fs::write(
        &p,
        r#"{"apis": [{"name": "a", "path": "a", "policy": "<policies>\n<inbound>\n  <cors />\n</inbound></policies>"}]}"#,
    )
    .unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(
        e.contains("API 'a' policy, line 3, column 3: <cors> is not supported at the edge"),
        "{e}"
    );
    let out = apim_edge(&["check", "--skip-unsupported", p.to_str().unwrap()]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("warnings       1"), "{s}");
    assert!(s.contains("skipped: <cors>"), "{s}");
}

#[test]
fn an_unreadable_trace_exits_2_naming_the_line() {
    let t = scratch("bad.jsonl");
    std::fs::write(
        &t,
        "{\"method\": \"GET\", \"url\": \"/\"}\n{\"url\": \"/\"}\n",
    )
    .unwrap();
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        &sample(),
        "--trace",
        t.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("line 2: method: required"), "{e}");
}

#[test]
fn seal_leaves_no_plain_key_and_the_same_decisions() {
    let sealed = scratch("sealed.json");
    let out = apim_edge(&["seal", &sample(), sealed.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&sealed).unwrap();
    assert!(!text.contains("starter-primary"));
    assert!(!text.contains("\"primaryKey\""));
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/traces/keys.jsonl");
    let out = apim_edge(&[
        "replay",
        "--snapshot",
        sealed.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--check",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn synth_makes_a_catalog_that_loads() {
    let out = apim_edge(&[
        "synth",
        "--subscriptions",
        "200",
        "--apis",
        "20",
        "--products",
        "10",
    ]);
    assert!(out.status.success());
    let p = scratch("synth.json");
    std::fs::write(&p, &out.stdout).unwrap();
    let out = apim_edge(&["check", p.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("apis           20 (60 operations)"), "{s}");
    assert!(
        s.contains("subscriptions  200 (200 active, 400 keys)"),
        "{s}"
    );
}

/// The configuration is read by the engine's own parser, as the filter reads it: a file that is
/// not a configuration object, or a setting of the wrong type, is exit 2 naming what is wrong.
#[test]
fn a_configuration_that_is_not_one_exits_2_naming_the_fault() {
    let trace = scratch("one.jsonl");
    std::fs::write(&trace, r#"{"method": "GET", "url": "/echo/items/1"}"#).unwrap();
    let cases = [
        (
            "string.json",
            r#""a string""#,
            "expected a JSON object (the filter configuration)",
        ),
        (
            "array.json",
            "[1]",
            "expected a JSON object (the filter configuration)",
        ),
        (
            "mode.json",
            r#"{"failureMode": "sometimes"}"#,
            "failureMode: unknown variant `sometimes`",
        ),
        (
            "strip.json",
            r#"{"stripSubscriptionKey": "yes"}"#,
            "stripSubscriptionKey: invalid type",
        ),
    ];
    for (name, text, message) in cases {
        let config = scratch(name);
        std::fs::write(&config, text).unwrap();
        let out = apim_edge(&[
            "replay",
            "--snapshot",
            &sample(),
            "--trace",
            trace.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
    }
}
