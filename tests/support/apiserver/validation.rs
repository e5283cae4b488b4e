//! Validation as kube-apiserver's strategies do it, for the fields that matter here: object
//! metadata everywhere, then Deployments, ReplicaSets, pod templates, Services, Leases, Events,
//! ConfigMaps and Namespaces; the CEL rules and patterns of CRDs (`schema.rs`, which also
//! validates custom resources). What is not checked is listed in the module documentation of
//! `apiserver.rs`.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::kinds::Kind;
use super::resources::{Builtin, ResourceDef};
use super::selectors::LabelSelector;
use super::status::FieldError;

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn dns1123_label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| is_lower_alnum(c) || c == '-')
        && s.starts_with(is_lower_alnum)
        && s.ends_with(is_lower_alnum)
}

pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if dns1123_label_ok(s) {
        Ok(())
    } else {
        Err(DNS1123_LABEL_MSG.into())
    }
}

pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| is_lower_alnum(c) || c == '-')
                && part.starts_with(is_lower_alnum)
                && part.ends_with(is_lower_alnum)
        })
    {
        Ok(())
    } else {
        Err(DNS1123_SUBDOMAIN_MSG.into())
    }
}

pub fn dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if dns1123_label_ok(s) && s.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(DNS1035_LABEL_MSG.into())
    }
}

fn qualified_name_part_ok(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// Label and annotation keys: `[prefix/]name`.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
    }
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !qualified_name_part_ok(name) {
        return Err(QUALIFIED_NAME_MSG.into());
    }
    Ok(())
}

pub fn label_value(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if s.is_empty() || qualified_name_part_ok(s) {
        Ok(())
    } else {
        Err(LABEL_VALUE_MSG.into())
    }
}

/// IANA service names (container port names): ≤15 lowercase alphanumerics and '-', at least one
/// letter, no leading, trailing or double '-'.
fn iana_svc_name(s: &str) -> Result<(), String> {
    if s.len() > 15 {
        return Err("must be no more than 15 characters".into());
    }
    if !s.chars().all(|c| is_lower_alnum(c) || c == '-') {
        return Err(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into(),
        );
    }
    if s.contains("--") {
        return Err("must not contain consecutive hyphens".into());
    }
    if !s.chars().any(|c| c.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not begin or end with a hyphen".into());
    }
    Ok(())
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Name validation by resource.
fn name_rule(def: &ResourceDef) -> fn(&str) -> Result<(), String> {
    match def.builtin {
        Some(Builtin::Service) => dns1035_label,
        Some(Builtin::Namespace) => dns1123_label,
        _ => dns1123_subdomain,
    }
}

/// `ValidateObjectMeta` (+ update rules when `old` is given).
pub fn object_meta(def: &ResourceDef, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = &obj["metadata"];
    let name = s(&meta["name"]);
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if let Err(e) = name_rule(def)(name) {
        errs.push(FieldError::invalid("metadata.name", json!(name), e));
    }
    let namespace = s(&meta["namespace"]);
    if def.namespaced && namespace.is_empty() {
        errs.push(FieldError::required("metadata.namespace", ""));
    }
    if !def.namespaced && !namespace.is_empty() {
        errs.push(FieldError::forbidden(
            "metadata.namespace",
            "not allowed on this type",
        ));
    }
    errs.extend(labels(&meta["labels"], "metadata.labels"));
    if let Some(annotations) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in annotations {
            total += k.len() + s(v).len();
            if let Err(e) = qualified_name(k) {
                errs.push(FieldError::invalid("metadata.annotations", json!(k), e));
            }
        }
        if total > 256 * 1024 {
            errs.push(FieldError::too_long("metadata.annotations", 256 * 1024));
        }
    }
    if let Some(refs) = meta["ownerReferences"].as_array() {
        let mut controllers = 0;
        for (i, r) in refs.iter().enumerate() {
            let path = format!("metadata.ownerReferences[{i}]");
            for field in ["apiVersion", "kind", "name", "uid"] {
                if s(&r[field]).is_empty() {
                    errs.push(FieldError::invalid(
                        format!("{path}.{field}"),
                        json!(""),
                        format!("{field} must not be empty"),
                    ));
                }
            }
            if r["controller"].as_bool() == Some(true) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            errs.push(FieldError::invalid(
                "metadata.ownerReferences",
                json!(refs),
                "Only one reference can have Controller set to true",
            ));
        }
    }
    for (i, f) in meta["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Err(e) = qualified_name(s(f)) {
            errs.push(FieldError::invalid(
                format!("metadata.finalizers[{i}]"),
                f.clone(),
                e,
            ));
        }
    }
    if let Some(old) = old {
        let om = &old["metadata"];
        if om.get("deletionTimestamp").is_some() {
            let before: Vec<&Value> = om["finalizers"].as_array().into_iter().flatten().collect();
            for f in meta["finalizers"].as_array().into_iter().flatten() {
                if !before.contains(&f) {
                    errs.push(FieldError::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    ));
                    break;
                }
            }
        }
        if s(&meta["name"]) != s(&om["name"]) {
            errs.push(FieldError::invalid(
                "metadata.name",
                meta["name"].clone(),
                "field is immutable",
            ));
        }
        if s(&meta["namespace"]) != s(&om["namespace"]) {
            errs.push(FieldError::invalid(
                "metadata.namespace",
                meta["namespace"].clone(),
                "field is immutable",
            ));
        }
    }
    errs
}

/// `ValidateLabels`.
pub fn labels(labels: &Value, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(m) = labels.as_object() {
        for (k, v) in m {
            if let Err(e) = qualified_name(k) {
                errs.push(FieldError::invalid(path, json!(k), e));
            }
            if let Err(e) = label_value(s(v)) {
                errs.push(FieldError::invalid(path, v.clone(), e));
            }
        }
    }
    errs
}

/// Kind-specific validation (`strategy.Validate` / `ValidateUpdate`).
pub fn builtin(b: Builtin, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    match b {
        Builtin::Deployment => workload(obj, old, true),
        Builtin::ReplicaSet => workload(obj, old, false),
        Builtin::Service => service(obj, old),
        Builtin::Lease => lease(obj),
        Builtin::Event => event(obj, false, old.is_some()),
        Builtin::EventsV1 => event(obj, true, old.is_some()),
        Builtin::Pod => {
            let mut errs = pod_spec(&obj["spec"], "spec", false);
            if let Some(old) = old {
                // Pod updates may change little more than the image; keep the container list.
                let names = |v: &Value| -> Vec<String> {
                    v["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| s(&c["name"]).to_string())
                        .collect()
                };
                if names(obj) != names(old) {
                    errs.push(FieldError::forbidden(
                        "spec",
                        "pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                    ));
                }
            }
            errs
        }
        Builtin::ConfigMap => config_map(obj),
        Builtin::Job => job(obj, old),
        Builtin::Other(Kind::CustomResourceDefinition) => super::schema::crd(obj),
        Builtin::Namespace | Builtin::Other(_) => Vec::new(),
    }
}

fn workload(obj: &Value, old: Option<&Value>, deployment: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    if let Some(r) = spec["replicas"].as_i64()
        && r < 0
    {
        errs.push(FieldError::invalid(
            "spec.replicas",
            json!(r),
            "must be greater than or equal to 0",
        ));
    }
    let selector = &spec["selector"];
    let mut selector_ok = false;
    if selector.is_null() {
        errs.push(FieldError::required("spec.selector", ""));
    } else {
        match LabelSelector::from_object(selector) {
            Err(e) => errs.push(FieldError::invalid("spec.selector", selector.clone(), e)),
            Ok(sel) if sel.is_empty() => errs.push(FieldError::invalid(
                "spec.selector",
                selector.clone(),
                if deployment {
                    "empty selector is invalid for deployment"
                } else {
                    "empty selector is invalid for replicaset"
                },
            )),
            Ok(sel) => {
                selector_ok = true;
                errs.extend(labels(
                    &selector["matchLabels"],
                    "spec.selector.matchLabels",
                ));
                let template_labels = &spec["template"]["metadata"]["labels"];
                if !sel.matches_object(&spec["template"]) {
                    errs.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        template_labels.clone(),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        }
    }
    errs.extend(labels(
        &spec["template"]["metadata"]["labels"],
        "spec.template.metadata.labels",
    ));
    if spec["template"].is_null() {
        errs.push(FieldError::required("spec.template", ""));
    } else {
        errs.extend(pod_spec(
            &spec["template"]["spec"],
            "spec.template.spec",
            true,
        ));
    }
    if let Some(min_ready) = spec["minReadySeconds"].as_i64()
        && min_ready < 0
    {
        errs.push(FieldError::invalid(
            "spec.minReadySeconds",
            json!(min_ready),
            "must be greater than or equal to 0",
        ));
    }
    if deployment {
        if let Some(limit) = spec["revisionHistoryLimit"].as_i64()
            && limit < 0
        {
            errs.push(FieldError::invalid(
                "spec.revisionHistoryLimit",
                json!(limit),
                "must be greater than or equal to 0",
            ));
        }
        if let Some(deadline) = spec["progressDeadlineSeconds"].as_i64() {
            if deadline <= 0 {
                errs.push(FieldError::invalid(
                    "spec.progressDeadlineSeconds",
                    json!(deadline),
                    "must be greater than 0",
                ));
            }
            let min_ready = spec["minReadySeconds"].as_i64().unwrap_or(0);
            if deadline <= min_ready {
                errs.push(FieldError::invalid(
                    "spec.progressDeadlineSeconds",
                    json!(deadline),
                    "must be greater than minReadySeconds",
                ));
            }
        }
        let strategy = &spec["strategy"];
        match s(&strategy["type"]) {
            "Recreate" => {
                if !strategy["rollingUpdate"].is_null() {
                    errs.push(FieldError::forbidden(
                        "spec.strategy.rollingUpdate",
                        "may not be specified when strategy `type` is 'Recreate'",
                    ));
                }
            }
            "RollingUpdate" => {
                let ru = &strategy["rollingUpdate"];
                let zero = |v: &Value| {
                    matches!(v, Value::Number(n) if n.as_i64() == Some(0))
                        || v.as_str() == Some("0%")
                };
                if zero(&ru["maxUnavailable"]) && zero(&ru["maxSurge"]) {
                    errs.push(FieldError::invalid(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        ru["maxUnavailable"].clone(),
                        "may not be 0 when `maxSurge` is 0",
                    ));
                }
            }
            other => errs.push(FieldError::not_supported(
                "spec.strategy.type",
                json!(other),
                &["Recreate", "RollingUpdate"],
            )),
        }
    }
    if let Some(old) = old
        && selector_ok
        && old["spec"]["selector"] != spec["selector"]
    {
        errs.push(FieldError::invalid(
            "spec.selector",
            spec["selector"].clone(),
            "field is immutable",
        ));
    }
    errs
}

/// `ValidateJob` / `ValidateJobUpdate` for the fields a check's Job has.
fn job(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    for field in [
        "parallelism",
        "completions",
        "backoffLimit",
        "activeDeadlineSeconds",
    ] {
        if let Some(n) = spec[field].as_i64()
            && n < 0
        {
            errs.push(FieldError::invalid(
                format!("spec.{field}"),
                json!(n),
                "must be greater than or equal to 0",
            ));
        }
    }
    let selector = &spec["selector"];
    if selector.is_null() {
        errs.push(FieldError::required("spec.selector", ""));
    } else if spec["manualSelector"] != true
        && selector["matchLabels"]["batch.kubernetes.io/controller-uid"] != obj["metadata"]["uid"]
    {
        errs.push(FieldError::invalid(
            "spec.selector",
            selector.clone(),
            "`selector` not auto-generated",
        ));
    } else {
        match LabelSelector::from_object(selector) {
            Err(e) => errs.push(FieldError::invalid("spec.selector", selector.clone(), e)),
            Ok(sel) => {
                if !sel.matches_object(&spec["template"]) {
                    errs.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        spec["template"]["metadata"]["labels"].clone(),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        }
    }
    errs.extend(labels(
        &spec["template"]["metadata"]["labels"],
        "spec.template.metadata.labels",
    ));
    if spec["template"].is_null() {
        errs.push(FieldError::required("spec.template", ""));
    } else {
        let pod = &spec["template"]["spec"];
        errs.extend(pod_spec(pod, "spec.template.spec", false));
        let restart = s(&pod["restartPolicy"]);
        if ["Always", "OnFailure", "Never"].contains(&restart)
            && !["OnFailure", "Never"].contains(&restart)
        {
            errs.push(FieldError::not_supported(
                "spec.template.spec.restartPolicy",
                json!(restart),
                &["OnFailure", "Never"],
            ));
        }
    }
    if let Some(old) = old {
        for field in ["selector", "completionMode"] {
            if old["spec"][field] != spec[field] {
                errs.push(FieldError::invalid(
                    format!("spec.{field}"),
                    spec[field].clone(),
                    "field is immutable",
                ));
            }
        }
        // The template may change only while the Job is suspended.
        if old["spec"]["template"] != spec["template"] && spec["suspend"] != true {
            errs.push(FieldError::invalid(
                "spec.template",
                spec["template"].clone(),
                "field is immutable",
            ));
        }
    }
    errs
}

/// `ValidatePodSpec` for the fields a Deployment's template usually has.
fn pod_spec(spec: &Value, path: &str, template: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    if containers.is_empty() {
        errs.push(FieldError::required(format!("{path}.containers"), ""));
    }
    let mut names = BTreeSet::new();
    let volumes: BTreeSet<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| s(&v["name"]).to_string())
        .collect();
    for (list, field) in [
        (
            spec["initContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            "initContainers",
        ),
        (containers, "containers"),
    ] {
        for (i, c) in list.iter().enumerate() {
            let cpath = format!("{path}.{field}[{i}]");
            let name = s(&c["name"]);
            if name.is_empty() {
                errs.push(FieldError::required(format!("{cpath}.name"), ""));
            } else if let Err(e) = dns1123_label(name) {
                errs.push(FieldError::invalid(format!("{cpath}.name"), json!(name), e));
            } else if !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("{cpath}.name"), json!(name)));
            }
            if s(&c["image"]).trim().is_empty() {
                errs.push(FieldError::required(format!("{cpath}.image"), ""));
            }
            let mut port_names = BTreeSet::new();
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let ppath = format!("{cpath}.ports[{j}]");
                match p["containerPort"].as_i64() {
                    Some(n) if (1..=65535).contains(&n) => {}
                    Some(n) => errs.push(FieldError::invalid(
                        format!("{ppath}.containerPort"),
                        json!(n),
                        "must be between 1 and 65535, inclusive",
                    )),
                    None => errs.push(FieldError::required(format!("{ppath}.containerPort"), "")),
                }
                if let Some(pn) = p["name"].as_str() {
                    if let Err(e) = iana_svc_name(pn) {
                        errs.push(FieldError::invalid(format!("{ppath}.name"), json!(pn), e));
                    } else if !port_names.insert(pn.to_string()) {
                        errs.push(FieldError::duplicate(format!("{ppath}.name"), json!(pn)));
                    }
                }
                let proto = s(&p["protocol"]);
                if !["TCP", "UDP", "SCTP"].contains(&proto) {
                    errs.push(FieldError::not_supported(
                        format!("{ppath}.protocol"),
                        json!(proto),
                        &["SCTP", "TCP", "UDP"],
                    ));
                }
            }
            for (j, m) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = s(&m["name"]);
                if !volumes.contains(name) {
                    errs.push(FieldError::invalid(
                        format!("{cpath}.volumeMounts[{j}].name"),
                        json!(name),
                        "Not found",
                    ));
                }
                if s(&m["mountPath"]).is_empty() {
                    errs.push(FieldError::required(
                        format!("{cpath}.volumeMounts[{j}].mountPath"),
                        "",
                    ));
                }
            }
            for (j, e) in c["env"].as_array().into_iter().flatten().enumerate() {
                let name = s(&e["name"]);
                if name.is_empty() || name.contains('=') {
                    errs.push(FieldError::invalid(
                        format!("{cpath}.env[{j}].name"),
                        json!(name),
                        "a valid environment variable name must consist only of printable ASCII characters other than '='",
                    ));
                }
            }
        }
    }
    let restart = s(&spec["restartPolicy"]);
    if template && restart != "Always" {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            json!(restart),
            &["Always"],
        ));
    } else if !["Always", "OnFailure", "Never"].contains(&restart) {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            json!(restart),
            &["Always", "OnFailure", "Never"],
        ));
    }
    let dns = s(&spec["dnsPolicy"]);
    if !["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"].contains(&dns) {
        errs.push(FieldError::not_supported(
            format!("{path}.dnsPolicy"),
            json!(dns),
            &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        ));
    }
    errs
}

fn service(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    let kind = s(&spec["type"]);
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&kind) {
        errs.push(FieldError::not_supported(
            "spec.type",
            json!(kind),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let headless = s(&spec["clusterIP"]) == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && !headless && kind != "ExternalName" {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match p["name"].as_str() {
            Some(n) if !n.is_empty() => {
                if let Err(e) = dns1123_label(n) {
                    errs.push(FieldError::invalid(format!("{path}.name"), json!(n), e));
                } else if !names.insert(n.to_string()) {
                    errs.push(FieldError::duplicate(format!("{path}.name"), json!(n)));
                }
            }
            _ if ports.len() > 1 => errs.push(FieldError::required(format!("{path}.name"), "")),
            _ => {}
        }
        match p["port"].as_i64() {
            Some(n) if (1..=65535).contains(&n) => {}
            other => errs.push(FieldError::invalid(
                format!("{path}.port"),
                json!(other),
                "must be between 1 and 65535, inclusive",
            )),
        }
        match &p["targetPort"] {
            Value::Number(n) if n.as_i64().is_some_and(|n| (1..=65535).contains(&n)) => {}
            Value::String(name) if iana_svc_name(name).is_ok() => {}
            other => errs.push(FieldError::invalid(
                format!("{path}.targetPort"),
                other.clone(),
                "must be between 1 and 65535, inclusive",
            )),
        }
        let proto = s(&p["protocol"]);
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            errs.push(FieldError::not_supported(
                format!("{path}.protocol"),
                json!(proto),
                &["SCTP", "TCP", "UDP"],
            ));
        }
    }
    errs.extend(labels(&spec["selector"], "spec.selector"));
    if let Some(old) = old {
        let old_ip = s(&old["spec"]["clusterIP"]);
        let new_ip = s(&spec["clusterIP"]);
        if !old_ip.is_empty() && old_ip != new_ip && s(&old["spec"]["type"]) != "ExternalName" {
            errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                json!(new_ip),
                "may not change once set",
            ));
        }
    }
    errs
}

fn lease(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &obj["spec"];
    if let Some(d) = spec["leaseDurationSeconds"].as_i64()
        && d <= 0
    {
        errs.push(FieldError::invalid(
            "spec.leaseDurationSeconds",
            json!(d),
            "must be greater than 0",
        ));
    }
    if let Some(t) = spec["leaseTransitions"].as_i64()
        && t < 0
    {
        errs.push(FieldError::invalid(
            "spec.leaseTransitions",
            json!(t),
            "must be greater than or equal to 0",
        ));
    }
    errs
}

/// `ValidateEventCreate`/`ValidateEventUpdate`, checked on the core form; `strict` for writes
/// through events.k8s.io/v1, which validates much more than the legacy API.
fn event(obj: &Value, strict: bool, update: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let ns = s(&obj["metadata"]["namespace"]);
    let involved_ns = s(&obj["involvedObject"]["namespace"]);
    if !involved_ns.is_empty() && involved_ns != ns {
        errs.push(FieldError::invalid(
            if strict {
                "regarding.namespace"
            } else {
                "involvedObject.namespace"
            },
            json!(involved_ns),
            "does not match event.namespace",
        ));
    }
    if !strict || update {
        return errs;
    }
    if obj["eventTime"].is_null() {
        errs.push(FieldError::required("eventTime", ""));
    }
    let kind = s(&obj["type"]);
    if kind != "Normal" && kind != "Warning" {
        errs.push(FieldError::invalid(
            "type",
            json!(""),
            format!("has invalid value: {kind}"),
        ));
    }
    for (field, v1) in [
        ("firstTimestamp", "deprecatedFirstTimestamp"),
        ("lastTimestamp", "deprecatedLastTimestamp"),
    ] {
        if !obj[field].is_null() {
            errs.push(FieldError::invalid(v1, json!(""), "needs to be unset"));
        }
    }
    if obj["count"].as_i64().unwrap_or(0) != 0 {
        errs.push(FieldError::invalid(
            "deprecatedCount",
            json!(""),
            "needs to be unset",
        ));
    }
    if !obj["source"]["component"].is_null() || !obj["source"]["host"].is_null() {
        errs.push(FieldError::invalid(
            "deprecatedSource",
            json!(""),
            "needs to be unset",
        ));
    }
    let controller = s(&obj["reportingComponent"]);
    if controller.is_empty() {
        errs.push(FieldError::required("reportingController", ""));
    } else if let Err(e) = qualified_name(controller) {
        errs.push(FieldError::invalid(
            "reportingController",
            json!(controller),
            e,
        ));
    }
    let instance = s(&obj["reportingInstance"]);
    if instance.is_empty() {
        errs.push(FieldError::required("reportingInstance", ""));
    } else if instance.len() > 128 {
        errs.push(FieldError::invalid(
            "reportingInstance",
            json!(""),
            "can have at most 128 characters",
        ));
    }
    for field in ["action", "reason"] {
        let v = s(&obj[field]);
        if v.is_empty() {
            errs.push(FieldError::required(field, ""));
        } else if v.len() > 128 {
            errs.push(FieldError::invalid(
                field,
                json!(""),
                "can have at most 128 characters",
            ));
        }
    }
    if s(&obj["message"]).len() > 1024 {
        errs.push(FieldError::invalid(
            "note",
            json!(""),
            "can have at most 1024 characters",
        ));
    }
    errs
}

fn config_map(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for field in ["data", "binaryData"] {
        for k in obj[field].as_object().into_iter().flatten().map(|(k, _)| k) {
            let ok = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                errs.push(FieldError::invalid(
                    field,
                    json!(k),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
        }
    }
    errs
}
