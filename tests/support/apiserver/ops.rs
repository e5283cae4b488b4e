//! The write paths (create, update, patch, apply, delete), shared by the HTTP handlers, the
//! test helpers and the background controllers. The order of steps follows kube-apiserver:
//! decode (+ defaults) → mutating admission → resourceVersion precondition → strategy
//! (`PrepareForCreate`/`PrepareForUpdate`) → validation → storage (no-op writes skipped).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Value, json};

use super::admission::{self, Attributes};
use super::patch::{self, FieldSet, Managers, Operation, Owned, Seg};
use super::resources::{Builtin, Generation, ResourceDef};
use super::status::{ApiError, FieldError};
use super::store::{Entry, Key};
use super::{Inner, UserInfo, lock, now, schema, typed, validation};

/// Which part of an object a request addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    /// `autoscaling/v1` Scale of Deployments and ReplicaSets.
    Scale,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Main => "",
            Sub::Status => "status",
            Sub::Scale => "scale",
        }
    }
}

/// `fieldValidation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// Who asks and how.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub user: UserInfo,
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub field_validation: FieldValidation,
    /// `fieldValidation` as the request spelled it (empty when absent), for webhook options.
    pub field_validation_param: String,
    pub user_agent: String,
    /// `Warning` headers to return.
    pub warnings: Vec<String>,
}

impl Ctx {
    pub fn for_user(user: UserInfo) -> Self {
        Ctx {
            user,
            dry_run: false,
            field_manager: None,
            field_validation: FieldValidation::Warn,
            field_validation_param: String::new(),
            user_agent: String::new(),
            warnings: Vec::new(),
        }
    }

    /// A control-plane component (GC, controllers).
    pub fn system(name: &str) -> Self {
        let mut ctx = Ctx::for_user(UserInfo {
            username: name.into(),
            uid: String::new(),
            groups: vec!["system:authenticated".into()],
            extra: Default::default(),
        });
        ctx.field_manager = Some(name.rsplit(':').next().unwrap_or(name).to_string());
        ctx
    }

    fn manager(&self) -> String {
        if let Some(m) = &self.field_manager {
            return m.clone();
        }
        // Upstream derives the default manager from the User-Agent (up to the first '/').
        let ua = self.user_agent.split('/').next().unwrap_or_default();
        if ua.is_empty() {
            "unknown".into()
        } else {
            ua.into()
        }
    }
}

/// Patch content types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply { force: bool },
}

/// A write request.
#[derive(Clone, Debug)]
pub enum Write {
    Create(Value),
    Update(Value),
    Patch(PatchKind, Vec<u8>),
}

/// Delete options (query or `DeleteOptions` body).
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

enum Attempt {
    Retry,
    Fail(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        Attempt::Fail(e)
    }
}

/// The stored form as the API version `version` shows it.
pub fn to_version(def: &ResourceDef, version: &str, stored: &Value) -> Value {
    if def.builtin == Some(Builtin::EventsV1) {
        return typed::event_from_core(stored);
    }
    let mut v = stored.clone();
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(def.api_version(version)));
        m.insert("kind".into(), json!(def.kind));
    }
    v
}

/// The encoding of an object (in its version's form) on the wire: as stored, or with
/// [`super::ApiServerConfig::legacy_creation_timestamp`], as API servers before 1.35 wrote it.
pub fn encode(def: &ResourceDef, v: &mut Value, legacy: bool) {
    if let Some(b) = def.builtin.filter(|_| legacy) {
        typed::add_legacy_null_timestamps(b, v);
    }
}

/// The storage form of an object written through `def`.
pub fn from_version(def: &ResourceDef, v: &Value) -> Value {
    if def.builtin == Some(Builtin::EventsV1) {
        return typed::event_to_core(v);
    }
    let mut out = v.clone();
    if let Some(m) = out.as_object_mut() {
        m.insert(
            "apiVersion".into(),
            json!(def.api_version(&def.versions[0].name)),
        );
        m.insert("kind".into(), json!(def.kind));
    }
    out
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Equal but for the `metadata` fields named in `skip` (without copying either).
fn same_except(a: &Value, b: &Value, skip: &[&str]) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    if a.len() != b.len() {
        return false;
    }
    a.iter().all(|(k, av)| {
        let Some(bv) = b.get(k) else {
            return false;
        };
        if k != "metadata" {
            return av == bv;
        }
        let (Some(am), Some(bm)) = (av.as_object(), bv.as_object()) else {
            return av == bv;
        };
        fn without<'a>(
            m: &'a serde_json::Map<String, Value>,
            skip: &[&str],
        ) -> Vec<(&'a str, &'a Value)> {
            m.iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v))
                .collect()
        }
        without(am, skip) == without(bm, skip)
    })
}

/// Renders `managers` into `metadata.managedFields` (absent when nobody owns anything).
fn set_managed_fields(obj: &mut Value, managers: &Managers) {
    let entries = patch::managed_fields(managers);
    if let Some(meta) = obj["metadata"].as_object_mut() {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// How a write changes field ownership.
struct Ownership {
    /// The owners before the write (none after a reset).
    before: Arc<Managers>,
    manager: String,
    sub: Sub,
    api_version: String,
    /// The fields of an apply, and whether it forces.
    apply: Option<(FieldSet, bool)>,
}

impl Ownership {
    /// Sets `obj`'s (storage form) managedFields to the owners after this write from `old` (as
    /// `version` shows it); returns them.
    fn stamp(
        &self,
        obj: &mut Value,
        old: Option<&Value>,
        def: &ResourceDef,
        version: &str,
        kinds: &dyn Fn(&[String]) -> patch::ListKind,
    ) -> Arc<Managers> {
        let owners = if self.tracks() {
            let old = old.map(|o| to_version(def, version, o));
            self.after(
                old.as_ref(),
                &to_version(def, version, obj),
                kinds,
                def.status_subresource,
            )
        } else {
            self.before.clone()
        };
        set_managed_fields(obj, &owners);
        owners
    }

    /// Status writes are tracked only once someone applies status (the controllers' frequent
    /// status updates would otherwise pay for it on every write).
    fn tracks(&self) -> bool {
        let sub = self.sub.name();
        self.apply.is_some()
            || self.sub != Sub::Status
            || self
                .before
                .keys()
                .any(|(_, op, s)| *op == Operation::Apply && s == sub)
    }

    /// The owners after a write from `old` to `new` (both as the request's version shows them).
    fn after(
        &self,
        old: Option<&Value>,
        new: &Value,
        kinds: &dyn Fn(&[String]) -> patch::ListKind,
        status_subresource: bool,
    ) -> Arc<Managers> {
        let mut managers = self.before.clone();
        let sub = self.sub.name();
        let now = now();
        let m = Arc::make_mut(&mut managers);
        match &self.apply {
            Some((fields, force)) => {
                if *force {
                    for (k, owned) in m.iter_mut() {
                        if k.0 != self.manager {
                            owned.fields.retain(|p| !fields.contains(p));
                        }
                    }
                }
                let key = (self.manager.clone(), Operation::Apply, sub.to_string());
                // The time moves only when the apply changed something.
                let unchanged =
                    old.is_some_and(|o| same_except(o, new, &["resourceVersion", "managedFields"]));
                let time = match m.get(&key) {
                    Some(prev) if prev.fields == *fields && unchanged => prev.time.clone(),
                    _ => now,
                };
                m.insert(
                    key,
                    Owned {
                        api_version: self.api_version.clone(),
                        fields: fields.clone(),
                        time,
                    },
                );
            }
            None => {
                let skip_status = self.sub == Sub::Main && status_subresource;
                let (mut changed, removed) = patch::changed_leaves(old, new, kinds, skip_status);
                if self.sub == Sub::Status {
                    changed.retain(|p| p.first() == Some(&Seg::F("status".into())));
                }
                for owned in m.values_mut() {
                    owned
                        .fields
                        .retain(|p| !changed.contains(p) && !removed.contains(p));
                }
                if !changed.is_empty() {
                    let entry = m
                        .entry((self.manager.clone(), Operation::Update, sub.to_string()))
                        .or_insert_with(|| Owned {
                            api_version: String::new(),
                            fields: FieldSet::new(),
                            time: String::new(),
                        });
                    entry.fields.extend(changed);
                    entry.api_version = self.api_version.clone();
                    entry.time = now;
                }
            }
        }
        m.retain(|_, owned| !owned.fields.is_empty());
        managers
    }
}

/// The `autoscaling/v1` Scale of a Deployment or ReplicaSet.
pub fn scale_view(obj: &Value) -> Value {
    let meta = &obj["metadata"];
    let mut m = serde_json::Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = meta.get(field) {
            m.insert(field.into(), v.clone());
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": m,
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector_string(&obj["spec"]["selector"]),
        },
    })
}

/// `metav1.LabelSelectorAsSelector(...).String()`.
fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = str_at(e, "/key");
        let mut values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        values.sort_unstable();
        parts.push(match str_at(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    parts.sort();
    parts.join(",")
}

/// The object a Scale write makes: the current one with `spec.replicas` from the Scale, and the
/// Scale's resourceVersion as the precondition.
fn from_scale(
    def: &ResourceDef,
    version: &str,
    current: &Value,
    scale: &Value,
) -> Result<Value, ApiError> {
    let name = str_at(current, "/metadata/name");
    let replicas = match &scale["spec"]["replicas"] {
        Value::Number(n) if n.as_i64().is_some_and(|r| r >= 0) => n.as_i64().unwrap_or(0),
        Value::Null => 0,
        other => {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                name,
                &[FieldError::invalid(
                    "spec.replicas",
                    other.clone(),
                    "must be greater than or equal to 0",
                )],
            ));
        }
    };
    let mut obj = to_version(def, version, current);
    obj["spec"]["replicas"] = json!(replicas);
    match scale["metadata"].get("resourceVersion") {
        Some(rv) if rv.as_str().is_some_and(|s| !s.is_empty()) => {
            obj["metadata"]["resourceVersion"] = rv.clone();
        }
        _ => {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
    }
    if let Some(n) = scale["metadata"].get("name") {
        obj["metadata"]["name"] = n.clone();
    }
    Ok(obj)
}

/// What an immediate delete answers.
pub fn deleted_response(def: &ResourceDef, version: &str, obj: &Value) -> Value {
    let returns_object = def.is_crd()
        || matches!(
            def.builtin,
            Some(Builtin::Service | Builtin::Pod | Builtin::Namespace)
        );
    if returns_object {
        return to_version(def, version, obj);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": obj["metadata"]["name"],
            "group": def.group,
            "kind": def.plural,
            "uid": obj["metadata"]["uid"],
        },
    })
}

/// Parses an apply body: YAML (JSON is YAML).
fn parse_yaml_or_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return Ok(v);
    }
    serde_yaml_ng::from_slice::<Value>(bytes)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

impl Inner {
    fn key(&self, def: &ResourceDef, ns: &str, name: &str) -> Key {
        (
            def.storage.clone(),
            if def.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        )
    }

    /// Type meta checks, typed decoding or schema pruning and defaulting, `fieldValidation`,
    /// defaults. Returns the storage form; custom resources are validated against their schema
    /// later, with the written object (`schema::validate`).
    fn decode(
        &self,
        def: &ResourceDef,
        version: &str,
        mut body: Value,
        ctx: &mut Ctx,
    ) -> Result<Value, ApiError> {
        let Some(map) = body.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the body of the request is not a JSON object",
            ));
        };
        let expected = def.api_version(version);
        match map.get("apiVersion").and_then(Value::as_str) {
            Some(av) if av != expected => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({expected})"
                )));
            }
            _ => {
                map.insert("apiVersion".into(), json!(expected));
            }
        }
        match map.get("kind").and_then(Value::as_str) {
            Some(k) if k != def.kind => {
                return Err(ApiError::bad_request(format!(
                    "{} in version {version:?} cannot be handled as a {}: the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind, def.kind, def.kind
                )));
            }
            _ => {
                map.insert("kind".into(), json!(def.kind));
            }
        }
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            meta.remove("selfLink");
        }
        let (mut out, unknown) = match def.builtin {
            Some(b) => {
                let unknown = typed::check(b, &body).map_err(|e| {
                    ApiError::bad_request(format!(
                        "{} in version {version:?} cannot be handled as a {}: {e}",
                        def.kind, def.kind
                    ))
                })?;
                typed::strip_nulls(&mut body);
                (body, unknown)
            }
            None => match def.schema(version) {
                Some(schema) => {
                    let unknown = schema::prune_default(schema, &mut body);
                    (body, unknown)
                }
                None => (body, Vec::new()),
            },
        };
        if !unknown.is_empty() {
            match ctx.field_validation {
                FieldValidation::Strict => {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|p| format!("unknown field {p:?}"))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    for p in unknown {
                        ctx.warnings.push(format!("unknown field {p:?}"));
                    }
                }
                FieldValidation::Ignore => {}
            }
        }
        if let Some(b) = def.builtin {
            typed::default(b, &mut out);
        }
        Ok(from_version(def, &out))
    }

    /// Runs the mutating webhooks that match; returns the (patched, re-decoded) storage form.
    #[allow(clippy::too_many_arguments)]
    async fn admit(
        &self,
        def: &ResourceDef,
        version: &str,
        ns: &str,
        name: &str,
        operation: &str,
        mut obj: Value,
        old_stored: Option<&Value>,
        ctx: &mut Ctx,
    ) -> Result<Value, ApiError> {
        let hooks = lock(&self.webhooks).clone();
        if hooks.is_empty() {
            return Ok(obj);
        }
        let legacy = self.legacy_creation_timestamp;
        let old_view = old_stored.map(|o| {
            let mut o = to_version(def, version, o);
            encode(def, &mut o, legacy);
            o
        });
        let old_view = old_view.as_ref();
        let mut view = to_version(def, version, &obj);
        encode(def, &mut view, legacy);
        // The labels namespaceSelector looks at: the namespace's, a Namespace's own.
        let namespace = if def.builtin == Some(Builtin::Namespace) {
            Some(view.clone())
        } else if def.namespaced {
            self.store()
                .get(&("namespaces".into(), String::new(), ns.to_string()))
                .map(|e| (*e.object).clone())
        } else {
            None
        };
        let managed_fields = obj["metadata"].get("managedFields").cloned();
        // Webhooks with `reinvocationPolicy: IfNeeded` called since the last change, and those
        // to call again (once) because a later webhook changed the object after them.
        let mut reinvocable: BTreeSet<usize> = BTreeSet::new();
        let mut reinvoke: BTreeSet<usize> = BTreeSet::new();
        for round in 0..2 {
            for (i, hook) in hooks.iter().enumerate() {
                if round == 1 && !reinvoke.contains(&i) {
                    continue;
                }
                let selected = hook.matches(
                    &def.group,
                    version,
                    &def.plural,
                    operation,
                    Some(&view),
                    old_view,
                ) && hook.namespace_matches(namespace.as_ref());
                if !selected {
                    continue;
                }
                let attrs = Attributes {
                    uid: self.new_uid(),
                    group: &def.group,
                    version,
                    kind: &def.kind,
                    resource: &def.plural,
                    name,
                    namespace: ns,
                    operation,
                    user: &ctx.user,
                    object: &view,
                    old_object: old_view,
                    dry_run: ctx.dry_run,
                    options: admission::options(
                        operation == "CREATE",
                        ctx.dry_run,
                        ctx.field_manager.as_deref(),
                        &ctx.field_validation_param,
                    ),
                };
                match admission::call(hook, &attrs).await {
                    Ok(admitted) => {
                        lock(&self.webhook_calls).push(admitted.call);
                        ctx.warnings.extend(admitted.warnings);
                        if admitted.object != view {
                            // The patched object is decoded and defaulted again, as upstream
                            // does; it keeps the managedFields of this write.
                            let mut quiet = Ctx::for_user(ctx.user.clone());
                            quiet.field_validation = FieldValidation::Ignore;
                            let mut decoded = self
                                .decode(def, version, admitted.object, &mut quiet)
                                .map_err(|e| ApiError::internal(e.message))?;
                            if let Some(m) = &managed_fields {
                                decoded["metadata"]["managedFields"] = m.clone();
                            }
                            view = to_version(def, version, &decoded);
                            encode(def, &mut view, legacy);
                            obj = decoded;
                            reinvoke.append(&mut reinvocable);
                        }
                        if hook.reinvocation_policy == admission::ReinvocationPolicy::IfNeeded {
                            reinvocable.insert(i);
                        }
                    }
                    Err(rejection) => {
                        lock(&self.webhook_calls).push(rejection.call);
                        if rejection.failure
                            && hook.failure_policy == admission::FailurePolicy::Ignore
                        {
                            continue;
                        }
                        return Err(rejection.error);
                    }
                }
            }
            if reinvoke.is_empty() {
                break;
            }
        }
        Ok(obj)
    }

    /// `PrepareForCreate` + `BeforeCreate`.
    fn prepare_create(&self, def: &ResourceDef, obj: &mut Value) {
        let uid = self.new_uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(now());
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("resourceVersion");
            if def.generation == Generation::None {
                m.remove("generation");
            } else {
                m.insert("generation".into(), json!(1));
            }
        }
        match def.builtin {
            Some(Builtin::Deployment | Builtin::ReplicaSet) => obj["status"] = json!({}),
            Some(Builtin::Service) => {
                obj["status"] = json!({"loadBalancer": {}});
                let spec = &mut obj["spec"];
                if spec["type"] != "ExternalName" {
                    let ip = match spec["clusterIP"].as_str() {
                        Some(ip) if !ip.is_empty() => ip.to_string(),
                        _ => self.store().allocate_cluster_ip(),
                    };
                    spec["clusterIP"] = json!(ip);
                    spec["clusterIPs"] = json!([ip]);
                    spec["ipFamilies"] = json!(["IPv4"]);
                    spec["ipFamilyPolicy"] = json!("SingleStack");
                }
            }
            Some(Builtin::Pod) => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            Some(Builtin::Namespace) => obj["status"] = json!({"phase": "Active"}),
            Some(Builtin::Job) => {
                obj["status"] = json!({});
                // The job strategy's `generateSelector`, unless `manualSelector: true`.
                if obj["spec"]["manualSelector"] != true && obj["spec"]["selector"].is_null() {
                    let name = obj["metadata"]["name"].clone();
                    obj["spec"]["selector"] =
                        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
                    let template = &mut obj["spec"]["template"];
                    if template.is_object() {
                        let labels = &mut template["metadata"]["labels"];
                        for (key, value) in [
                            ("batch.kubernetes.io/controller-uid", json!(uid)),
                            ("batch.kubernetes.io/job-name", name.clone()),
                            ("controller-uid", json!(uid)),
                            ("job-name", name.clone()),
                        ] {
                            labels[key] = value;
                        }
                    }
                }
            }
            _ => {
                if def.is_crd()
                    && def.status_subresource
                    && let Some(m) = obj.as_object_mut()
                {
                    m.remove("status");
                }
            }
        }
    }

    /// `PrepareForUpdate` + `BeforeUpdate`.
    fn prepare_update(&self, def: &ResourceDef, sub: Sub, obj: &mut Value, old: &Value) {
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(v) => obj["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let set_or_remove = |obj: &mut Value, field: &str, v: Option<&Value>| match v {
            Some(v) => obj[field] = v.clone(),
            None => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove(field);
                }
            }
        };
        match sub {
            Sub::Main | Sub::Scale => {
                if def.status_subresource {
                    set_or_remove(obj, "status", old.get("status"));
                }
                if def.builtin == Some(Builtin::Service) {
                    let spec = &mut obj["spec"];
                    for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                        if spec.get(field).is_none_or(|v| v.is_null() || v == "")
                            && let Some(v) = old["spec"].get(field)
                        {
                            spec[field] = v.clone();
                        }
                    }
                }
                let bump = match def.generation {
                    Generation::None => false,
                    Generation::Spec => obj.get("spec") != old.get("spec"),
                    Generation::SpecAndAnnotations => {
                        obj.get("spec") != old.get("spec")
                            || obj["metadata"].get("annotations")
                                != old["metadata"].get("annotations")
                    }
                    Generation::AllButMetadata => {
                        let strip = |v: &Value| {
                            let mut v = v.clone();
                            if let Some(m) = v.as_object_mut() {
                                m.remove("metadata");
                                if def.status_subresource {
                                    m.remove("status");
                                }
                            }
                            v
                        };
                        strip(obj) != strip(old)
                    }
                };
                if bump {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    obj["metadata"]["generation"] = json!(g);
                }
            }
            Sub::Status => match def.builtin {
                Some(Builtin::Deployment) => {
                    set_or_remove(obj, "spec", old.get("spec"));
                    let labels = old["metadata"].get("labels").cloned();
                    set_or_remove(&mut obj["metadata"], "labels", labels.as_ref());
                }
                Some(_) => set_or_remove(obj, "spec", old.get("spec")),
                None => {
                    let status = obj.get("status").cloned();
                    let mut next = old.clone();
                    set_or_remove(&mut next, "status", status.as_ref());
                    *obj = next;
                }
            },
        }
    }

    async fn namespace_check(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        if !def.namespaced {
            return Ok(());
        }
        let store = self.store();
        match store.get(&("namespaces".into(), String::new(), ns.to_string())) {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some(e) if e.object["metadata"].get("deletionTimestamp").is_some() => {
                Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        super::status::qualified_resource(&def.group, &def.plural)
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// Create, update, patch or apply. Returns the object as `version` shows it and whether it
    /// was created.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        url_name: &str,
        sub: Sub,
        w: &Write,
        ctx: &mut Ctx,
    ) -> Result<(Value, bool), ApiError> {
        for _ in 0..50 {
            match self
                .write_once(def, version, ns, url_name, sub, w, ctx)
                .await
            {
                Ok((obj, created)) if sub == Sub::Scale => {
                    return Ok((scale_view(&obj), created));
                }
                Ok(done) => return Ok(done),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry) => {
                    ctx.warnings.clear();
                    tokio::task::yield_now().await;
                }
            }
        }
        Err(ApiError::conflict(
            &def.group,
            &def.plural,
            url_name,
            "the object kept changing; giving up after 50 attempts",
        ))
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_once(
        &self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        url_name: &str,
        sub: Sub,
        w: &Write,
        ctx: &mut Ctx,
    ) -> Result<(Value, bool), Attempt> {
        let kinds = |p: &[String]| patch::list_kind(def, version, p);
        let current: Option<Entry> = if url_name.is_empty() {
            None
        } else {
            self.store().get(&self.key(def, ns, url_name)).cloned()
        };
        let managers: Arc<Managers> = current
            .as_ref()
            .map(|c| c.managers.clone())
            .unwrap_or_default();
        let manager = ctx.manager();
        let mut apply_fields: Option<FieldSet> = None;
        let mut force = false;
        let mut create = false;
        let body = match w {
            Write::Create(body) => {
                create = true;
                body.clone()
            }
            Write::Update(body) => {
                if current.is_none() {
                    if def.allow_create_on_update && sub == Sub::Main {
                        create = true;
                    } else {
                        return Err(ApiError::not_found(&def.group, &def.plural, url_name).into());
                    }
                }
                body.clone()
            }
            Write::Patch(PatchKind::Apply { .. }, _) if sub == Sub::Scale => {
                return Err(
                    ApiError::unsupported_media_type("application/apply-patch+yaml").into(),
                );
            }
            Write::Patch(PatchKind::Apply { force: f }, bytes) => {
                force = *f;
                let applied = parse_yaml_or_json(bytes)?;
                if !applied.is_object() {
                    return Err(
                        ApiError::bad_request("apply configuration must be an object").into(),
                    );
                }
                if str_at(&applied, "/apiVersion").is_empty()
                    || str_at(&applied, "/kind").is_empty()
                {
                    return Err(ApiError::bad_request(format!(
                        "error decoding YAML: Object 'Kind' is missing in '{applied}'"
                    ))
                    .into());
                }
                if ctx.field_manager.is_none() {
                    return Err(ApiError::bad_request(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    )
                    .into());
                }
                let skip_status = sub == Sub::Main && def.status_subresource;
                let mut fields = patch::leaves(&applied, &kinds, skip_status);
                if sub == Sub::Status {
                    fields.retain(|p| p.first() == Some(&Seg::F("status".into())));
                }
                let base = match &current {
                    Some(c) => to_version(def, version, &c.object),
                    None => {
                        if sub == Sub::Status {
                            return Err(
                                ApiError::not_found(&def.group, &def.plural, url_name).into()
                            );
                        }
                        create = true;
                        json!({})
                    }
                };
                let me = (manager.clone(), Operation::Apply, sub.name().to_string());
                if !force {
                    let mut conflicts: Vec<(String, String, String)> = Vec::new();
                    for (k, owned) in managers.iter() {
                        if *k == me {
                            continue;
                        }
                        for p in fields.intersection(&owned.fields) {
                            if patch::get_path(&base, p) != patch::get_path(&applied, p) {
                                conflicts.push((
                                    k.0.clone(),
                                    owned.api_version.clone(),
                                    patch::render(p),
                                ));
                            }
                        }
                    }
                    if !conflicts.is_empty() {
                        return Err(apply_conflict(def, url_name, &conflicts).into());
                    }
                }
                let mut merged = base.clone();
                patch::apply_merge(&mut merged, &applied, &mut Vec::new(), &kinds);
                if let Some(previous) = managers.get(&me) {
                    for p in previous.fields.difference(&fields) {
                        let others = managers
                            .iter()
                            .any(|(k, o)| *k != me && o.fields.contains(p));
                        if !others {
                            patch::remove_path(&mut merged, p);
                        }
                    }
                }
                if applied["metadata"]["resourceVersion"].is_string() {
                    merged["metadata"]["resourceVersion"] =
                        applied["metadata"]["resourceVersion"].clone();
                }
                apply_fields = Some(fields);
                merged
            }
            Write::Patch(kind, bytes) => {
                let Some(cur) = &current else {
                    return Err(ApiError::not_found(&def.group, &def.plural, url_name).into());
                };
                let mut doc = if sub == Sub::Scale {
                    scale_view(&cur.object)
                } else {
                    to_version(def, version, &cur.object)
                };
                match kind {
                    PatchKind::Merge => {
                        let p: Value = serde_json::from_slice(bytes).map_err(|e| {
                            ApiError::bad_request(format!("error decoding patch: {e}"))
                        })?;
                        json_patch::merge(&mut doc, &p);
                    }
                    PatchKind::Strategic => {
                        if def.is_crd() {
                            return Err(ApiError::unsupported_media_type(
                                "application/strategic-merge-patch+json",
                            )
                            .into());
                        }
                        let p: Value = serde_json::from_slice(bytes).map_err(|e| {
                            ApiError::bad_request(format!("error decoding patch: {e}"))
                        })?;
                        patch::strategic_merge(&mut doc, &p, &kinds)?;
                    }
                    PatchKind::Json => patch::json_patch(&mut doc, bytes)?,
                    PatchKind::Apply { .. } => unreachable!("handled above"),
                }
                doc
            }
        };

        if !body.is_object() {
            return Err(
                ApiError::bad_request("the body of the request is not a JSON object").into(),
            );
        }
        let body = if sub == Sub::Scale {
            let cur = current.as_ref().expect("checked present above");
            from_scale(def, version, &cur.object, &body)?
        } else {
            body
        };
        let body_name = str_at(&body, "/metadata/name").to_string();
        // PUT must name the object; apply may leave the name to the URL.
        let name_required = matches!(w, Write::Update(_));
        if !url_name.is_empty() && (name_required || !body_name.is_empty()) && body_name != url_name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
            ))
            .into());
        }
        let body_ns = str_at(&body, "/metadata/namespace");
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            let message = if matches!(w, Write::Create(_)) {
                "the namespace of the provided object does not match the namespace sent on the request".to_string()
            } else {
                format!(
                    "the namespace of the object ({body_ns}) does not match the namespace on the URL ({ns})"
                )
            };
            return Err(ApiError::bad_request(message).into());
        }
        // A PUT's resourceVersion is its precondition. A patch starts from the current object, so
        // its result carries the current resourceVersion unless the patch itself sets another:
        // only then is it a precondition (upstream applies a patch again to the fresh object when
        // the storage write races, as GuaranteedUpdate does).
        let precondition = {
            let requested = str_at(&body, "/metadata/resourceVersion");
            let current_rv = current
                .as_ref()
                .map(|c| str_at(&c.object, "/metadata/resourceVersion"))
                .unwrap_or_default();
            if matches!(w, Write::Update(_)) || requested != current_rv {
                requested.to_string()
            } else {
                String::new()
            }
        };
        // Ownership is kept from the live object, whatever managedFields the request carries,
        // unless a main-resource write resets them.
        let reset = sub == Sub::Main
            && apply_fields.is_none()
            && patch::is_reset(body["metadata"].get("managedFields"));
        let ownership = Ownership {
            before: if reset { Arc::default() } else { managers },
            manager,
            sub,
            api_version: def.api_version(version),
            apply: apply_fields.map(|fields| (fields, force)),
        };

        let mut obj = self.decode(def, version, body, ctx)?;
        if def.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        if !url_name.is_empty() {
            obj["metadata"]["name"] = json!(url_name);
        }
        if create {
            let name = str_at(&obj, "/metadata/name").to_string();
            self.namespace_check(def, ns, &name).await?;
        }

        let old_stored = current.as_ref().map(|c| c.object.as_ref());
        let name_for_review = str_at(&obj, "/metadata/name").to_string();
        if sub == Sub::Main {
            // Webhooks see the managedFields this write makes (upstream runs the field manager
            // before mutating admission).
            ownership.stamp(&mut obj, old_stored, def, version, &kinds);
            let op = if create { "CREATE" } else { "UPDATE" };
            obj = self
                .admit(def, version, ns, &name_for_review, op, obj, old_stored, ctx)
                .await?;
        }

        if create {
            if !precondition.is_empty() {
                if matches!(w, Write::Create(_)) {
                    return Err(ApiError::internal(
                        "resourceVersion should not be set on objects to be created",
                    )
                    .into());
                }
                return Err(ApiError::not_found(&def.group, &def.plural, url_name).into());
            }
            let name = str_at(&obj, "/metadata/name").to_string();
            let generate = str_at(&obj, "/metadata/generateName").to_string();
            if name.is_empty() && !generate.is_empty() {
                let generated = format!("{generate}{}", self.name_suffix());
                obj["metadata"]["name"] = json!(generated);
            }
            self.prepare_create(def, &mut obj);
        } else {
            let old = &current
                .as_ref()
                .expect("an update has a current object")
                .object;
            let old_rv = str_at(old, "/metadata/resourceVersion");
            if !precondition.is_empty() && precondition != old_rv {
                return Err(ApiError::stale(&def.group, &def.plural, url_name).into());
            }
            let new_uid = str_at(&obj, "/metadata/uid");
            let old_uid = str_at(old, "/metadata/uid");
            if !new_uid.is_empty() && new_uid != old_uid {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    url_name,
                    &format!("Precondition failed: UID in precondition: {new_uid}, UID in object meta: {old_uid}"),
                )
                .into());
            }
            self.prepare_update(def, sub, &mut obj, old);
        }

        let old_obj = current.as_ref().map(|c| c.object.as_ref());
        let mut errs = validation::object_meta(def, &obj, old_obj);
        if let Some(b) = def.builtin {
            errs.extend(validation::builtin(b, &obj, old_obj));
        }
        if let Some(schema) = def.schema(version) {
            // Custom resources: the schema, its list types and CEL rules, on the object as it
            // will be written, as the version shows it; the old one for transition rules and
            // ratcheting.
            let view = to_version(def, version, &obj);
            let old_view = old_obj.map(|o| to_version(def, version, o));
            let (schema_errs, warnings) = schema::validate(schema, &view, old_view.as_ref(), &errs);
            errs.extend(schema_errs);
            ctx.warnings.extend(warnings);
        }
        let name = str_at(&obj, "/metadata/name").to_string();
        if !errs.is_empty() {
            return Err(ApiError::invalid(&def.kind, &def.group, &name, &errs).into());
        }

        let new_managers = ownership.stamp(&mut obj, old_stored, def, version, &kinds);

        // Commit.
        let key = self.key(def, ns, &name);
        let mut store = self.store();
        let now_entry = store.get(&key).cloned();
        if create {
            if now_entry.is_some() {
                if matches!(w, Write::Create(_)) {
                    return Err(ApiError::already_exists(&def.group, &def.plural, &name).into());
                }
                return Err(Attempt::Retry);
            }
        } else {
            match (&current, &now_entry) {
                (Some(a), Some(b)) if Arc::ptr_eq(&a.object, &b.object) => {}
                _ if !precondition.is_empty() => {
                    return Err(ApiError::stale(&def.group, &def.plural, &name).into());
                }
                _ => return Err(Attempt::Retry),
            }
        }
        if ctx.dry_run {
            if let Some(cur) = &current {
                obj["metadata"]["resourceVersion"] =
                    cur.object["metadata"]["resourceVersion"].clone();
            }
            return Ok((to_version(def, version, &obj), create));
        }
        if let Some(cur) = &current
            && same_except(&cur.object, &obj, &["resourceVersion"])
        {
            return Ok((to_version(def, version, &cur.object), false));
        }
        let terminating = obj["metadata"].get("deletionTimestamp").is_some();
        let no_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if !create && terminating && no_finalizers && def.builtin != Some(Builtin::Namespace) {
            let change = store.delete(&key).expect("checked present");
            return Ok((to_version(def, version, &change.object), false));
        }
        let change = store.put(key, obj, new_managers);
        Ok((to_version(def, version, &change.object), create))
    }

    /// Delete with propagation and preconditions. Returns the answer body and HTTP code.
    pub async fn delete(
        &self,
        def: &Arc<ResourceDef>,
        version: &str,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
        ctx: &mut Ctx,
    ) -> Result<(Value, u16), ApiError> {
        let policy = opts
            .propagation
            .clone()
            .unwrap_or_else(|| "Background".into());
        if !["Background", "Foreground", "Orphan"].contains(&policy.as_str()) {
            return Err(ApiError::invalid(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                &[FieldError::not_supported(
                    "propagationPolicy",
                    json!(policy),
                    &["Foreground", "Background", "Orphan", "nil"],
                )],
            ));
        }
        let key = self.key(def, ns, name);
        loop {
            let Some(current) = self.store().get(&key).cloned() else {
                return Err(ApiError::not_found(&def.group, &def.plural, name));
            };
            let obj = current.object.clone();
            let uid = str_at(&obj, "/metadata/uid");
            let rv = str_at(&obj, "/metadata/resourceVersion");
            if let Some(want) = &opts.uid
                && want != uid
            {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                    ),
                ));
            }
            if let Some(want) = &opts.resource_version
                && want != rv
            {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rv}"
                    ),
                ));
            }
            let namespace = def.builtin == Some(Builtin::Namespace);
            let mut finalizers: Vec<String> = obj["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            let extra = match policy.as_str() {
                "Foreground" => Some("foregroundDeletion"),
                "Orphan" => Some("orphan"),
                _ => None,
            };
            if finalizers.is_empty() && extra.is_none() && !namespace {
                if ctx.dry_run {
                    return Ok((deleted_response(def, version, &obj), 200));
                }
                let mut store = self.store();
                match store.get(&key) {
                    Some(e) if Arc::ptr_eq(&e.object, &current.object) => {}
                    _ => continue,
                }
                let change = store.delete(&key).expect("checked present");
                return Ok((deleted_response(def, version, &change.object), 200));
            }
            let mut next = (*obj).clone();
            if next["metadata"].get("deletionTimestamp").is_none() {
                next["metadata"]["deletionTimestamp"] = json!(now());
                next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            if let Some(f) = extra {
                finalizers.retain(|x| x != "orphan" && x != "foregroundDeletion");
                finalizers.push(f.to_string());
                next["metadata"]["finalizers"] = json!(finalizers);
            }
            if namespace {
                next["status"]["phase"] = json!("Terminating");
            }
            if ctx.dry_run || next == *obj {
                return Ok((to_version(def, version, &next), 200));
            }
            let mut store = self.store();
            match store.get(&key) {
                Some(e) if Arc::ptr_eq(&e.object, &current.object) => {}
                _ => continue,
            }
            let change = store.put(key.clone(), next, current.managers.clone());
            return Ok((to_version(def, version, &change.object), 200));
        }
    }

    /// Creates `object` of `gvr` in `ns` through the whole pipeline.
    pub async fn create_object(
        &self,
        gvr: &str,
        ns: &str,
        object: Value,
        ctx: &mut Ctx,
    ) -> Result<Value, ApiError> {
        let (def, version) = self
            .find(gvr)
            .ok_or_else(|| ApiError::bad_request(format!("unknown resource {gvr}")))?;
        self.write(
            &def,
            &version,
            ns,
            "",
            Sub::Main,
            &Write::Create(object),
            ctx,
        )
        .await
        .map(|(v, _)| v)
    }

    /// Reads, changes with `f` (which returns whether it changed anything), and updates with the
    /// read resourceVersion as precondition, retrying on conflicts. `None` when the object is gone.
    pub async fn modify(
        &self,
        def: &Arc<ResourceDef>,
        ns: &str,
        name: &str,
        sub: Sub,
        ctx: &mut Ctx,
        mut f: impl FnMut(&mut Value) -> bool,
    ) -> Result<Option<Value>, ApiError> {
        let version = def.versions[0].name.clone();
        let key = self.key(def, ns, name);
        loop {
            let Some(entry) = self.store().get(&key).cloned() else {
                return Ok(None);
            };
            let mut obj = to_version(def, &version, &entry.object);
            if !f(&mut obj) {
                return Ok(Some(obj));
            }
            match self
                .write(def, &version, ns, name, sub, &Write::Update(obj), ctx)
                .await
            {
                Ok((v, _)) => return Ok(Some(v)),
                Err(e) if e.code == 409 && e.reason == "Conflict" => continue,
                Err(e) if e.code == 404 => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// `kubectl apply` (client-side): create with the last-applied annotation, or a three-way
    /// merge against the last applied configuration.
    pub async fn kubectl_apply(&self, user: &UserInfo, object: Value) -> Result<Value, ApiError> {
        const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
        let api_version = str_at(&object, "/apiVersion").to_string();
        let kind = str_at(&object, "/kind").to_string();
        let def = self
            .registry()
            .find_kind(&api_version, &kind)
            .ok_or_else(|| {
                ApiError::not_found(
                    "",
                    "resources",
                    &format!("no matches for kind {kind:?} in version {api_version:?}"),
                )
            })?;
        let version = super::resources::split_api_version(&api_version)
            .1
            .to_string();
        let name = str_at(&object, "/metadata/name").to_string();
        let ns = if def.namespaced {
            let ns = str_at(&object, "/metadata/namespace");
            if ns.is_empty() {
                "default".to_string()
            } else {
                ns.to_string()
            }
        } else {
            String::new()
        };
        let mut config = object.clone();
        if let Some(a) = config["metadata"]
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            a.remove(LAST_APPLIED);
        }
        let mut annotated = config.clone();
        annotated["metadata"]["annotations"][LAST_APPLIED] = json!(format!(
            "{}\n",
            serde_json::to_string(&config).unwrap_or_default()
        ));
        let kinds = |p: &[String]| patch::list_kind(&def, &version, p);
        for _ in 0..50 {
            let mut ctx = Ctx::for_user(user.clone());
            ctx.field_manager = Some("kubectl-client-side-apply".into());
            ctx.field_validation = FieldValidation::Strict;
            ctx.field_validation_param = "Strict".into();
            let key = self.key(&def, &ns, &name);
            let current = self
                .store()
                .get(&key)
                .map(|e| to_version(&def, &version, &e.object));
            let result = match current {
                None => {
                    self.write(
                        &def,
                        &version,
                        &ns,
                        "",
                        Sub::Main,
                        &Write::Create(annotated.clone()),
                        &mut ctx,
                    )
                    .await
                }
                Some(live) => {
                    let last: Value = live["metadata"]["annotations"][LAST_APPLIED]
                        .as_str()
                        .and_then(|s| serde_json::from_str(s).ok())
                        .unwrap_or(Value::Null);
                    let mut desired = live.clone();
                    three_way(&mut desired, &last, &annotated, &mut Vec::new(), &kinds);
                    desired["metadata"]["resourceVersion"] =
                        live["metadata"]["resourceVersion"].clone();
                    self.write(
                        &def,
                        &version,
                        &ns,
                        &name,
                        Sub::Main,
                        &Write::Update(desired),
                        &mut ctx,
                    )
                    .await
                }
            };
            match result {
                Ok((v, _)) => return Ok(v),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::conflict(
            &def.group,
            &def.plural,
            &name,
            "kept conflicting",
        ))
    }
}

/// kubectl's three-way merge, resolved directly: fields in `last` but not in `new` are removed
/// from `live`, fields in `new` are set (maps recursively, keyed lists by key), the rest of
/// `live` stays.
fn three_way(
    live: &mut Value,
    last: &Value,
    new: &Value,
    path: &mut Vec<String>,
    kinds: &dyn Fn(&[String]) -> patch::ListKind,
) {
    let Some(nm) = new.as_object() else {
        *live = new.clone();
        return;
    };
    if !live.is_object() {
        *live = json!({});
    }
    let lm = live.as_object_mut().expect("made an object");
    if let Some(last_m) = last.as_object() {
        for k in last_m.keys() {
            if !nm.contains_key(k) {
                lm.remove(k);
            }
        }
    }
    for (k, nv) in nm {
        path.push(k.clone());
        let last_v = last.get(k).unwrap_or(&Value::Null);
        match nv {
            Value::Null => {
                lm.remove(k);
            }
            Value::Object(_) => {
                let entry = lm.entry(k.clone()).or_insert(json!({}));
                three_way(entry, last_v, nv, path, kinds);
            }
            Value::Array(items) => match (kinds(path), lm.get_mut(k)) {
                (patch::ListKind::Keyed(key), Some(Value::Array(live_items))) => {
                    let in_new = |x: &Value| items.iter().any(|i| i.get(key) == x.get(key));
                    if let Some(last_items) = last_v.as_array() {
                        for gone in last_items.iter().filter(|x| !in_new(x)) {
                            live_items.retain(|l| l.get(key) != gone.get(key));
                        }
                    }
                    for item in items {
                        let last_item = last_v
                            .as_array()
                            .and_then(|l| l.iter().find(|x| x.get(key) == item.get(key)))
                            .unwrap_or(&Value::Null);
                        match live_items.iter_mut().find(|l| l.get(key) == item.get(key)) {
                            Some(l) => three_way(l, last_item, item, path, kinds),
                            None => live_items.push(item.clone()),
                        }
                    }
                }
                _ => {
                    lm.insert(k.clone(), nv.clone());
                }
            },
            scalar => {
                lm.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
}

fn apply_conflict(
    def: &ResourceDef,
    name: &str,
    conflicts: &[(String, String, String)],
) -> ApiError {
    let n = conflicts.len();
    let mut by_manager: Vec<(String, String, Vec<String>)> = Vec::new();
    for (m, av, p) in conflicts {
        match by_manager.iter_mut().find(|(bm, _, _)| bm == m) {
            Some(entry) => entry.2.push(p.clone()),
            None => by_manager.push((m.clone(), av.clone(), vec![p.clone()])),
        }
    }
    let message = if n == 1 {
        let (m, av, p) = &conflicts[0];
        format!("Apply failed with 1 conflict: conflict with {m:?} using {av}: {p}")
    } else {
        let parts: Vec<String> = by_manager
            .iter()
            .map(|(m, av, paths)| {
                if paths.len() == 1 {
                    format!("conflict with {m:?} using {av}: {}", paths[0])
                } else {
                    format!("conflicts with {m:?} using {av}:\n- {}", paths.join("\n- "))
                }
            })
            .collect();
        format!("Apply failed with {n} conflicts: {}", parts.join("\n"))
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, av, p)| {
            json!({"reason": "FieldManagerConflict", "message": format!("conflict with {m:?} using {av}"), "field": p})
        })
        .collect();
    let mut e = ApiError::new(409, "Conflict", message);
    e.details =
        Some(json!({"name": name, "group": def.group, "kind": def.plural, "causes": causes}));
    e
}
