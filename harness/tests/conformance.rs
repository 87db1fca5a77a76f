//! Conformance: every trace under `tests/traces` replayed through the `apim-edge` binary
//! against the sample catalog, with `--check` comparing each decision to its `expect`.
//! Decision logs are also kept as insta snapshots for review.

use apim_edge_harness::build::{conformance_traces as traces, ConformanceTrace};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn replay(trace: &ConformanceTrace, check: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_apim-edge"));
    cmd.arg("replay")
        .arg("--snapshot")
        .arg(root().join("tests/catalog/sample.json"))
        .args(trace.args());
    if check {
        cmd.arg("--check");
    }
    cmd.output().unwrap()
}

#[test]
fn every_trace_matches_its_expectations() {
    let all = traces();
    assert!(all.len() >= 10, "traces missing");
    for t in all {
        let out = replay(&t, true);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}:\n{stderr}", t.trace.display());
        assert!(
            stderr.contains(", 0 mismatched"),
            "{}: {stderr}",
            t.trace.display()
        );
    }
}

#[test]
fn every_trace_line_carries_an_expectation() {
    for t in traces() {
        for (i, line) in std::fs::read_to_string(&t.trace)
            .unwrap()
            .lines()
            .enumerate()
        {
            if line.trim().is_empty() || line.starts_with("//") {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let e = &v["expect"];
            assert!(
                e["status"].is_u64() && e["outcome"].is_string(),
                "{} line {}: expect needs status and outcome",
                t.trace.display(),
                i + 1
            );
        }
    }
}

#[test]
fn the_traces_cover_every_outcome_of_spec_section_4() {
    let mut seen = std::collections::BTreeSet::new();
    for t in traces() {
        let out = replay(&t, false);
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen.insert(v["outcome"].as_str().unwrap().to_string());
        }
    }
    for outcome in [
        "allowed",
        "returned",
        "api_not_found",
        "operation_not_found",
        "missing_key",
        "invalid_key",
        "rate_limited",
        "quota_exceeded",
        "bandwidth_exceeded",
        "ip_forbidden",
        "header_check_failed",
    ] {
        assert!(seen.contains(outcome), "no trace produces {outcome}");
    }
}

#[test]
fn check_reports_a_wrong_expectation_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("apim-edge-wrong-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("wrong.jsonl");
    std::fs::write(
        &t,
        r#"{"method": "GET", "url": "https://api.contoso.com/echo/items/1", "expect": {"status": 200, "outcome": "allowed", "operation": "list-items"}}"#,
    )
    .unwrap();
    let out = replay(
        &ConformanceTrace {
            trace: t,
            config: None,
        },
        true,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("status: expected 200, got 401"), "{stderr}");
    assert!(
        stderr.contains("outcome: expected allowed, got missing_key"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"operation: expected Some("list-items"), got Some("get-item")"#),
        "{stderr}"
    );
}

#[test]
fn decision_logs() {
    for t in traces() {
        let out = replay(&t, false);
        assert!(out.status.success());
        let name = t.trace.file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(name, String::from_utf8(out.stdout).unwrap());
    }
}
