//! What an operator takes away from `envoy/`: the example bootstrap and the bootstraps that
//! `apim-edge envoy-config` writes are accepted by Envoy (`--mode validate`) and agree with each
//! other; the Istio and Envoy Gateway manifests carry a plugin configuration the filter accepts.

use apim_edge_e2e::{envoy_bin, filter_wasm, root};
use apim_edge_policies::FilterConfig;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn validate(config: &Path) {
    filter_wasm();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .current_dir(root())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("OK"),
        "{}: {text}",
        config.display()
    );
}

/// `apim-edge envoy-config ARGS`, its output parsed.
fn generate(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO"))
        .args([
            "run",
            "-q",
            "-p",
            "apim-edge-harness",
            "--bin",
            "apim-edge",
            "--",
            "envoy-config",
        ])
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

const FILTER: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters/0/typed_config/config";

#[test]
fn generated_bootstraps_are_valid_envoy_configuration() {
    let dir = std::env::temp_dir().join(format!("apim-edge-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, args) in [
        (
            "inline.json",
            vec!["--snapshot", "tests/catalog/sample.json"],
        ),
        ("source.json", vec!["--snapshot-source", "127.0.0.1:9000"]),
        (
            "counters.json",
            vec![
                "--snapshot",
                "tests/catalog/sample.json",
                "--counters",
                "127.0.0.1:9090",
            ],
        ),
    ] {
        let path = dir.join(name);
        let boot = generate(&args);
        std::fs::write(&path, boot.to_string()).unwrap();
        validate(&path);
        let config = boot.pointer(FILTER).unwrap()["configuration"]["value"]
            .as_str()
            .unwrap()
            .to_string();
        let config = FilterConfig::parse(config.as_bytes()).unwrap();
        assert!(
            config.strip_subscription_key,
            "{name}: keys are stripped by default"
        );
    }
    // --counters: the filter's counters name an HTTP/2 cluster at the service.
    let boot: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("counters.json")).unwrap()).unwrap();
    let config = boot.pointer(FILTER).unwrap()["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let counters = FilterConfig::parse(config.as_bytes())
        .unwrap()
        .counters
        .unwrap();
    let cluster = boot["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == counters.cluster.as_str())
        .unwrap();
    assert!(cluster.pointer("/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/explicit_http_config/http2_protocol_options").is_some());
    // Unless the configuration says otherwise.
    let keep = dir.join("keep-keys.json");
    std::fs::write(&keep, r#"{"stripSubscriptionKey": false}"#).unwrap();
    let boot = generate(&[
        "--snapshot",
        "tests/catalog/sample.json",
        "--config",
        keep.to_str().unwrap(),
    ]);
    let config = boot.pointer(FILTER).unwrap()["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !FilterConfig::parse(config.as_bytes())
            .unwrap()
            .strip_subscription_key
    );
}

#[test]
fn the_example_bootstrap_is_valid_and_is_what_the_generator_writes() {
    validate(&root().join("envoy/bootstrap.yaml"));
    let mut example = yaml("envoy/bootstrap.yaml");
    let mut generated = generate(&["--snapshot", "envoy/example-snapshot.json"]);
    for boot in [&mut example, &mut generated] {
        let filter = boot.pointer_mut(FILTER).unwrap();
        // The configuration is JSON text: compare what it says, not its layout.
        let text = filter["configuration"]["value"]
            .as_str()
            .unwrap()
            .to_string();
        filter["configuration"]["value"] = serde_json::from_str(&text).unwrap();
        // The generator writes an absolute path to the module.
        let file = filter["vm_config"]["code"]["local"]["filename"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            file.ends_with("target/wasm32-wasip1/release/apim_edge_filter.wasm"),
            "{file}"
        );
        filter["vm_config"]["code"]["local"]["filename"] = Value::Null;
    }
    assert_eq!(example, generated);
}

#[test]
fn the_istio_wasm_plugin_runs_before_authorization_and_fails_closed() {
    let plugin = yaml("envoy/istio/wasmplugin.yaml");
    assert_eq!(plugin["kind"], "WasmPlugin");
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["spec"]["phase"], "AUTHN");
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_CLOSE");
    let config =
        FilterConfig::parse(plugin["spec"]["pluginConfig"].to_string().as_bytes()).unwrap();
    assert_eq!(config.snapshot_source.unwrap().path, "/snapshot.json");
}

#[test]
fn the_envoy_gateway_policy_carries_a_configuration_the_filter_accepts() {
    let policy = yaml("envoy/gateway/extension-policy.yaml");
    assert_eq!(policy["kind"], "EnvoyExtensionPolicy");
    assert_eq!(policy["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
    let wasm = &policy["spec"]["wasm"][0];
    assert_eq!(wasm["failOpen"], false);
    let config = FilterConfig::parse(wasm["config"].to_string().as_bytes()).unwrap();
    assert!(config.strip_subscription_key && config.identity_headers);
    assert!(config.counters.is_some());
}
