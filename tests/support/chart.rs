//! The Helm chart `charts/fledge`, rendered by the real `helm` (installed by `.ci/install-helm`):
//! its objects as JSON, its CRDs, and its MutatingWebhookConfiguration's webhooks as the
//! stand-in's [`WebhookConfig`]s, so that the end-to-end tests register the very webhooks the
//! chart installs.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::Value;

use super::apiserver::{FailurePolicy, ReinvocationPolicy, WebhookConfig, WebhookRule};

/// The chart's directory.
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/fledge");
/// The release name and namespace the tests render with (README's install command's).
pub const RELEASE: &str = "fledge";
pub const RELEASE_NS: &str = "fledge";

/// `helm ARGS` run in the repository's root. A missing helm is a failure, never a skip.
pub fn helm(args: &[&str]) -> std::process::Output {
    std::process::Command::new("helm")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `helm` ({e}): the chart tests need the real helm on PATH. \
                 Install it with `.ci/install-helm` (as .ci/run does)"
            )
        })
}

/// The objects of a rendered multi-document YAML stream, empty documents left out.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("helm's output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template fledge charts/fledge -n fledge ARGS`: the rendered objects; it must succeed.
pub fn template(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["template", RELEASE, CHART, "-n", RELEASE_NS];
    all.extend_from_slice(args);
    let out = helm(&all);
    assert!(
        out.status.success(),
        "helm {all:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// The CustomResourceDefinitions in the chart's `crds/`, as the files hold them (helm installs
/// them before the templates, and never upgrades them).
pub fn crds() -> Vec<Value> {
    let dir = Path::new(CHART).join("crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.expect("a crds/ entry").path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| documents(&std::fs::read_to_string(f).expect("a CRD file")))
        .collect()
}

/// The chart rendered with its default values, once per test process.
pub fn default_render() -> &'static [Value] {
    static RENDERED: OnceLock<Vec<Value>> = OnceLock::new();
    RENDERED.get_or_init(|| template(&[]))
}

/// The one object of `kind` (and `name`, when given); panics when there is not exactly one.
pub fn only<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} {name:?} in the chart: {found:?}"
    );
    found[0]
}

/// A label selector (`matchLabels`, `matchExpressions`) in the stand-in's selector syntax.
fn selector_text(selector: &Value) -> String {
    let mut parts: Vec<String> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            other => panic!("selector operator {other:?}: translate it here"),
        });
    }
    parts.join(",")
}

/// The stand-in's form of the rendered MutatingWebhookConfiguration's webhooks, in order: each
/// one's name, rules, objectSelector, namespaceSelector, failurePolicy, reinvocationPolicy and
/// timeout as rendered; the URL is the rendered Service's DNS name and path at `port`, the CA bundle
/// `ca_bundle_pem` when given, else the rendered one. The stand-in does not model `matchPolicy`
/// (tests/helm.rs checks it as rendered).
pub fn webhook_configs(
    objects: &[Value],
    port: u16,
    ca_bundle_pem: Option<&str>,
) -> Vec<WebhookConfig> {
    let mwc = only(objects, "MutatingWebhookConfiguration", None);
    mwc["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .map(|hook| stand_in_webhook(hook, port, ca_bundle_pem))
        .collect()
}

fn stand_in_webhook(hook: &Value, port: u16, ca_bundle_pem: Option<&str>) -> WebhookConfig {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let service = &hook["clientConfig"]["service"];
    let rendered_ca = || {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(text(&hook["clientConfig"]["caBundle"]))
            .expect("caBundle is base64");
        String::from_utf8(pem).expect("caBundle is PEM")
    };
    WebhookConfig {
        name: text(&hook["name"]),
        url: format!(
            "https://{}.{}.svc:{port}{}",
            text(&service["name"]),
            text(&service["namespace"]),
            text(&service["path"])
        ),
        connect_to: None,
        ca_bundle_pem: ca_bundle_pem.map_or_else(rendered_ca, str::to_owned),
        rules: hook["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| WebhookRule {
                api_groups: strings(&r["apiGroups"]),
                api_versions: strings(&r["apiVersions"]),
                resources: strings(&r["resources"]),
                operations: strings(&r["operations"]),
            })
            .collect(),
        object_selector: hook
            .get("objectSelector")
            .map(selector_text)
            .filter(|s| !s.is_empty()),
        namespace_selector: hook
            .get("namespaceSelector")
            .map(selector_text)
            .filter(|s| !s.is_empty()),
        failure_policy: match hook["failurePolicy"].as_str() {
            Some("Ignore") => FailurePolicy::Ignore,
            _ => FailurePolicy::Fail,
        },
        reinvocation_policy: match hook["reinvocationPolicy"].as_str() {
            Some("IfNeeded") => ReinvocationPolicy::IfNeeded,
            _ => ReinvocationPolicy::Never,
        },
        timeout: Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10)),
    }
}

/// Writes the rendered Secret's `tls.crt` and `tls.key` (the chart-generated serving certificate)
/// into `dir`, as the pod's Secret volume holds them.
pub fn write_tls_secret(objects: &[Value], dir: &Path) {
    let secret = only(objects, "Secret", None);
    std::fs::create_dir_all(dir).expect("a directory for the certificate");
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][key].as_str().unwrap_or_default())
            .expect("Secret data is base64");
        std::fs::write(dir.join(key), pem).expect("writing the certificate");
    }
}
