//! Built-in kinds: checking against the typed k8s-openapi structs (as kube-apiserver decodes into
//! Go structs: wrong types are a 400, fields the structs lack are reported), defaulting
//! (`SetDefaults_*` for the fields Deployments, ReplicaSets, pod templates, Services and
//! Namespaces have), the encoding of embedded ObjectMeta by older API servers, and the conversion
//! between core/v1 and events.k8s.io/v1 Events.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::resources::Builtin;

pub(super) fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Decodes `v` as the typed struct of `b` and encodes it back (a 400 when that fails); returns the
/// paths of fields that the type does not have. The object itself is stored as sent: a newer
/// API server knows fields these structs lack.
pub fn check(b: Builtin, v: &Value) -> Result<Vec<String>, String> {
    use k8s_openapi::api;
    let out = match b {
        Builtin::Namespace => round_trip::<api::core::v1::Namespace>(v),
        Builtin::Service => round_trip::<api::core::v1::Service>(v),
        Builtin::ConfigMap => round_trip::<api::core::v1::ConfigMap>(v),
        Builtin::Pod => round_trip::<api::core::v1::Pod>(v),
        Builtin::Event => round_trip::<api::core::v1::Event>(v),
        Builtin::EventsV1 => round_trip::<api::events::v1::Event>(v),
        Builtin::Deployment => round_trip::<api::apps::v1::Deployment>(v),
        Builtin::ReplicaSet => round_trip::<api::apps::v1::ReplicaSet>(v),
        Builtin::Lease => round_trip::<api::coordination::v1::Lease>(v),
        Builtin::Job => round_trip::<api::batch::v1::Job>(v),
        Builtin::Other(kind) => super::kinds::decode(kind, v),
    }?;
    let mut unknown = Vec::new();
    unknown_fields(v, &out, "", &mut unknown);
    Ok(unknown)
}

/// Removes `null` values, recursively: Go decodes them to zero values, which are not encoded
/// again (`omitempty`/`omitzero`).
pub fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// How API servers before Kubernetes 1.35 encoded an embedded ObjectMeta without a
/// creationTimestamp (the pod template's): Go's zero `metav1.Time` as `"creationTimestamp": null`.
pub fn add_legacy_null_timestamps(b: Builtin, v: &mut Value) {
    if !matches!(b, Builtin::Deployment | Builtin::ReplicaSet) {
        return;
    }
    if let Some(t) = v.pointer_mut("/spec/template").filter(|t| t.is_object()) {
        obj(&mut t["metadata"])
            .entry("creationTimestamp")
            .or_insert(Value::Null);
    }
}

/// Paths present (non-null) in `input` but missing from `output`.
pub fn unknown_fields(input: &Value, output: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match b.get(k) {
                    None if !v.is_null() => out.push(path),
                    Some(w) => unknown_fields(v, w, &path, out),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, w, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("just made an object")
}

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), value);
    }
}

/// Applies the API server's defaults for `b` to a decoded object.
pub fn default(b: Builtin, v: &mut Value) {
    match b {
        Builtin::Deployment => {
            let spec = obj(&mut v["spec"]);
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = obj(spec.entry("strategy").or_insert(json!({})));
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = obj(strategy.entry("rollingUpdate").or_insert(json!({})));
                set_default(ru, "maxUnavailable", json!("25%"));
                set_default(ru, "maxSurge", json!("25%"));
            }
            default_template(&mut v["spec"]["template"]);
        }
        Builtin::ReplicaSet => {
            set_default(obj(&mut v["spec"]), "replicas", json!(1));
            default_template(&mut v["spec"]["template"]);
        }
        Builtin::Pod => {
            default_pod_spec(&mut v["spec"]);
            set_default(obj(&mut v["spec"]), "enableServiceLinks", json!(true));
        }
        Builtin::Service => {
            let spec = obj(&mut v["spec"]);
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            if spec["type"] != "ExternalName" {
                set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    let port = p["port"].clone();
                    let p = obj(p);
                    set_default(p, "protocol", json!("TCP"));
                    set_default(p, "targetPort", port);
                }
            }
        }
        Builtin::Namespace => {
            let name = v["metadata"]["name"].clone();
            if name.is_string() {
                let labels = obj(&mut v["metadata"]["labels"]);
                labels.insert("kubernetes.io/metadata.name".into(), name);
            }
            set_default(obj(&mut v["spec"]), "finalizers", json!(["kubernetes"]));
        }
        Builtin::Job => {
            // `SetDefaults_Job`.
            let template_labels = v["spec"]["template"]["metadata"]["labels"].clone();
            if v["metadata"]["labels"]
                .as_object()
                .is_none_or(|m| m.is_empty())
                && template_labels.as_object().is_some_and(|m| !m.is_empty())
            {
                v["metadata"]["labels"] = template_labels;
            }
            let spec = obj(&mut v["spec"]);
            if spec.get("completions").is_none_or(Value::is_null)
                && spec.get("parallelism").is_none_or(Value::is_null)
            {
                spec.insert("completions".into(), json!(1));
            }
            set_default(spec, "parallelism", json!(1));
            let per_index = spec
                .get("backoffLimitPerIndex")
                .is_some_and(|v| !v.is_null());
            set_default(
                spec,
                "backoffLimit",
                json!(if per_index { i32::MAX } else { 6 }),
            );
            set_default(spec, "completionMode", json!("NonIndexed"));
            set_default(spec, "suspend", json!(false));
            let replacement = if spec.get("podFailurePolicy").is_some_and(|v| !v.is_null()) {
                "Failed"
            } else {
                "TerminatingOrFailed"
            };
            set_default(spec, "podReplacementPolicy", json!(replacement));
            default_template(&mut v["spec"]["template"]);
        }
        Builtin::ConfigMap
        | Builtin::Event
        | Builtin::EventsV1
        | Builtin::Lease
        | Builtin::Other(_) => {}
    }
}

fn default_template(t: &mut Value) {
    if t.is_null() {
        return;
    }
    default_pod_spec(&mut t["spec"]);
}

fn default_pod_spec(spec: &mut Value) {
    let s = obj(spec);
    set_default(s, "restartPolicy", json!("Always"));
    set_default(s, "terminationGracePeriodSeconds", json!(30));
    set_default(s, "dnsPolicy", json!("ClusterFirst"));
    set_default(s, "securityContext", json!({}));
    set_default(s, "schedulerName", json!("default-scheduler"));
    for field in ["containers", "initContainers"] {
        if let Some(list) = s.get_mut(field).and_then(Value::as_array_mut) {
            for c in list {
                default_container(c);
            }
        }
    }
}

fn default_container(c: &mut Value) {
    let image = c["image"].as_str().unwrap_or_default().to_string();
    let m = obj(c);
    set_default(m, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(m, "terminationMessagePolicy", json!("File"));
    set_default(m, "resources", json!({}));
    // `SetDefaults_Container`: Always for `:latest` or an untagged image, else IfNotPresent.
    let last = image.rsplit('/').next().unwrap_or_default();
    let pull = if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            Some((_, "latest")) | None => "Always",
            Some(_) => "IfNotPresent",
        }
    };
    set_default(m, "imagePullPolicy", json!(pull));
    if let Some(ports) = m.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(obj(p), "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = m.get_mut(probe).filter(|p| p.is_object()) {
            let pm = obj(p);
            set_default(pm, "timeoutSeconds", json!(1));
            set_default(pm, "periodSeconds", json!(10));
            set_default(pm, "successThreshold", json!(1));
            set_default(pm, "failureThreshold", json!(3));
            if let Some(h) = pm.get_mut("httpGet").filter(|h| h.is_object()) {
                set_default(obj(h), "scheme", json!("HTTP"));
            }
        }
    }
    if let Some(env) = m.get_mut("env").and_then(Value::as_array_mut) {
        for e in env {
            if let Some(f) = e
                .pointer_mut("/valueFrom/fieldRef")
                .filter(|f| f.is_object())
            {
                set_default(obj(f), "apiVersion", json!("v1"));
            }
        }
    }
}

/// events.k8s.io/v1 field names and their core/v1 (storage) names.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// events.k8s.io/v1 → core/v1.
pub fn event_to_core(v: &Value) -> Value {
    let mut out = v.clone();
    if let Some(m) = out.as_object_mut() {
        for (from, to) in EVENT_FIELDS {
            if let Some(x) = m.remove(*from) {
                m.insert((*to).to_string(), x);
            }
        }
        m.insert("apiVersion".into(), json!("v1"));
        m.insert("kind".into(), json!("Event"));
    }
    out
}

/// core/v1 → events.k8s.io/v1.
pub fn event_from_core(v: &Value) -> Value {
    let mut out = v.clone();
    if let Some(m) = out.as_object_mut() {
        for (to, from) in EVENT_FIELDS {
            if let Some(x) = m.remove(*from) {
                m.insert((*to).to_string(), x);
            }
        }
        m.insert("apiVersion".into(), json!("events.k8s.io/v1"));
        m.insert("kind".into(), json!("Event"));
        // The core API's empty source reads back as no deprecatedSource.
        if m.get("deprecatedSource")
            .is_some_and(|s| s.as_object().is_some_and(Map::is_empty))
        {
            m.remove("deprecatedSource");
        }
    }
    out
}
