//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch (by the merge
//! keys of the built-in list fields), and server-side apply (field ownership per manager, conflicts,
//! removal of fields a manager stops applying).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::resources::ResourceDef;
use super::status::ApiError;

/// How a list field merges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// Items are maps identified by this field (`containers` by `name`).
    Keyed(&'static str),
    /// Items are scalars forming a set (`finalizers`).
    Set,
    /// The list is replaced whole.
    Atomic,
}

/// The list semantics of the field at `path` (field names, list positions left out).
pub fn list_kind(def: &ResourceDef, version: &str, path: &[String]) -> ListKind {
    let last = path.last().map(String::as_str).unwrap_or_default();
    if path.len() == 2 && path[0] == "metadata" {
        return match last {
            "ownerReferences" => ListKind::Keyed("uid"),
            "finalizers" => ListKind::Set,
            _ => ListKind::Atomic,
        };
    }
    if def.is_crd() {
        return crd_list_kind(def.schema(version), path);
    }
    let in_container = path.iter().any(|p| {
        matches!(
            p.as_str(),
            "containers" | "initContainers" | "ephemeralContainers"
        )
    });
    match last {
        "containers" | "initContainers" | "ephemeralContainers" => ListKind::Keyed("name"),
        "ports" if in_container => ListKind::Keyed("containerPort"),
        "ports" => ListKind::Keyed("port"),
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
            ListKind::Keyed("name")
        }
        "volumeMounts" => ListKind::Keyed("mountPath"),
        "volumeDevices" => ListKind::Keyed("devicePath"),
        "conditions" => ListKind::Keyed("type"),
        "hostAliases" => ListKind::Keyed("ip"),
        "topologySpreadConstraints" => ListKind::Keyed("topologyKey"),
        "finalizers" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

fn crd_list_kind(schema: Option<&Value>, path: &[String]) -> ListKind {
    let Some(mut s) = schema else {
        return ListKind::Atomic;
    };
    for seg in path {
        // Step through array items transparently.
        while s["type"] == "array" {
            s = &s["items"];
        }
        s = match s["properties"].get(seg) {
            Some(next) => next,
            None => return ListKind::Atomic,
        };
    }
    match s["x-kubernetes-list-type"].as_str() {
        Some("set") => ListKind::Set,
        Some("map") => {
            let key = s["x-kubernetes-list-map-keys"][0]
                .as_str()
                .unwrap_or("name");
            // Keys are few and fixed in practice; leak to get a 'static name.
            ListKind::Keyed(Box::leak(key.to_string().into_boxed_str()))
        }
        _ => ListKind::Atomic,
    }
}

/// Removes `$`-directives, recursively.
pub fn clean(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch. `kinds` gives the list semantics by path.
pub fn strategic_merge(
    target: &mut Value,
    patch: &Value,
    kinds: &dyn Fn(&[String]) -> ListKind,
) -> Result<(), ApiError> {
    let Some(pm) = patch.as_object() else {
        return Err(ApiError::bad_request(
            "invalid JSON document: a strategic merge patch must be an object",
        ));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let mut path = Vec::new();
    smp_map(target, pm, &mut path, kinds)
}

fn smp_map(
    target: &mut Value,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
    kinds: &dyn Fn(&[String]) -> ListKind,
) -> Result<(), ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = clean(&Value::Object(patch.clone()));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unknown patch type: {other}"
            )));
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(remove)) = (
                target.get_mut(field).and_then(Value::as_array_mut),
                v.as_array(),
            ) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        let t = target.as_object_mut().expect("made an object above");
        path.push(k.clone());
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(sub) => {
                if sub.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                } else {
                    let entry = t.entry(k.clone()).or_insert(Value::Null);
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    smp_map(entry, sub, path, kinds)?;
                }
            }
            Value::Array(items) => {
                let kind = kinds(path);
                let entry = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                smp_list(entry, items, kind, path, kinds)?;
            }
            scalar => {
                t.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: BTreeSet<&str> = retain.iter().filter_map(Value::as_str).collect();
        if let Some(t) = target.as_object_mut() {
            t.retain(|k, _| keep.contains(k.as_str()));
        }
    }
    Ok(())
}

fn smp_list(
    target: &mut Value,
    items: &[Value],
    kind: ListKind,
    path: &mut Vec<String>,
    kinds: &dyn Fn(&[String]) -> ListKind,
) -> Result<(), ApiError> {
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace || kind == ListKind::Atomic || !target.is_array() {
        let kept: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(clean)
            .collect();
        *target = Value::Array(kept);
        return Ok(());
    }
    let list = target.as_array_mut().expect("checked above");
    match kind {
        ListKind::Set => {
            for i in items {
                if !list.contains(i) {
                    list.push(i.clone());
                }
            }
        }
        ListKind::Keyed(key) => {
            for item in items {
                let Some(im) = item.as_object() else {
                    return Err(ApiError::bad_request(format!(
                        "unable to find api field in struct for merge key {key:?}: list items must be objects"
                    )));
                };
                let Some(kv) = im.get(key) else {
                    return Err(ApiError::bad_request(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    )));
                };
                let pos = list.iter().position(|x| x.get(key) == Some(kv));
                if im.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(p) = pos {
                        list.remove(p);
                    }
                    continue;
                }
                match pos {
                    Some(p) => smp_map(&mut list[p], im, path, kinds)?,
                    None => list.push(clean(item)),
                }
            }
        }
        ListKind::Atomic => unreachable!("handled above"),
    }
    Ok(())
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &[u8]) -> Result<(), ApiError> {
    let ops: json_patch::Patch = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    json_patch::patch(target, &ops).map_err(|e| {
        let mut err = ApiError::new(422, "Invalid", e.to_string());
        err.details = None;
        err
    })
}

// ---------------------------------------------------------------------------------------------
// Field ownership (server-side apply)

/// One step in a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    /// A map field.
    F(String),
    /// A keyed list item, by its key field and value (JSON text).
    K(&'static str, String),
    /// A set list value (JSON text).
    V(String),
}

pub type FieldPath = Vec<Seg>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Whether a manager entry came from apply or from other writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// What one manager owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    pub api_version: String,
    pub fields: FieldSet,
    /// When the manager last changed the object (`metav1.Time`).
    pub time: String,
}

/// Field owners of one object: (manager, operation, subresource) → what it owns.
pub type Managers = BTreeMap<(String, Operation, String), Owned>;

/// `metadata.managedFields` as kube-apiserver encodes them: one entry per (manager, operation,
/// subresource), sorted by operation, time, manager, apiVersion and subresource, with the
/// fields in the FieldsV1 format (`{"f:spec": {"f:replicas": {}}}`, keyed list items as
/// `k:{"name":"web"}` with `.` for the item, set members as `v:"x"`).
pub fn managed_fields(managers: &Managers) -> Vec<Value> {
    let mut entries: Vec<(&(String, Operation, String), &Owned)> = managers.iter().collect();
    entries.sort_by(|(a, x), (b, y)| {
        (a.1.name(), &x.time, &a.0, &x.api_version, &a.2).cmp(&(
            b.1.name(),
            &y.time,
            &b.0,
            &y.api_version,
            &b.2,
        ))
    });
    entries
        .into_iter()
        .map(|((manager, op, sub), owned)| {
            let mut e = serde_json::json!({
                "manager": manager,
                "operation": op.name(),
                "apiVersion": owned.api_version,
                "time": owned.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(&owned.fields),
            });
            if !sub.is_empty() {
                e["subresource"] = Value::String(sub.clone());
            }
            e
        })
        .collect()
}

fn fields_v1(fields: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in fields {
        let mut node = &mut root;
        for seg in path {
            let (key, item) = match seg {
                Seg::F(f) => (format!("f:{f}"), false),
                Seg::K(k, v) => (format!("k:{{{:?}:{v}}}", k), true),
                Seg::V(v) => (format!("v:{v}"), false),
            };
            node = &mut node[key.as_str()];
            if item {
                node["."] = Value::Object(Map::new());
            }
        }
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
    }
    root
}

/// Whether a write's `metadata.managedFields` asks to reset ownership (`[]` or `[{}]`, as
/// upstream's `isResetManagedFields`).
pub fn is_reset(managed_fields: Option<&Value>) -> bool {
    match managed_fields.and_then(Value::as_array).map(Vec::as_slice) {
        Some([]) => true,
        Some([only]) => only.as_object().is_some_and(Map::is_empty),
        _ => false,
    }
}

/// Renders a path as kube-apiserver's conflict messages do: `.spec.containers[name="web"].image`.
pub fn render(path: &FieldPath) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::F(f) => {
                s.push('.');
                s.push_str(f);
            }
            Seg::K(k, v) => s.push_str(&format!("[{k}={v}]")),
            Seg::V(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

fn names(path: &FieldPath) -> Vec<String> {
    path.iter()
        .filter_map(|s| match s {
            Seg::F(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// The leaf fields set in `v`, skipping the identity fields every object has.
pub fn leaves(v: &Value, kinds: &dyn Fn(&[String]) -> ListKind, skip_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(m) = v.as_object() {
        for (k, child) in m {
            if k == "apiVersion" || k == "kind" || (skip_status && k == "status") {
                continue;
            }
            if k == "metadata" {
                for (mk, mv) in child.as_object().into_iter().flatten() {
                    if matches!(
                        mk.as_str(),
                        "name"
                            | "namespace"
                            | "uid"
                            | "resourceVersion"
                            | "generation"
                            | "creationTimestamp"
                            | "deletionTimestamp"
                            | "deletionGracePeriodSeconds"
                            | "managedFields"
                            | "selfLink"
                    ) {
                        continue;
                    }
                    collect(
                        mv,
                        vec![Seg::F("metadata".into()), Seg::F(mk.clone())],
                        kinds,
                        &mut out,
                    );
                }
                continue;
            }
            collect(child, vec![Seg::F(k.clone())], kinds, &mut out);
        }
    }
    out
}

fn collect(v: &Value, path: FieldPath, kinds: &dyn Fn(&[String]) -> ListKind, out: &mut FieldSet) {
    match v {
        Value::Null => {}
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(Seg::F(k.clone()));
                collect(child, p, kinds, out);
            }
        }
        Value::Array(items) => match kinds(&names(&path)) {
            ListKind::Keyed(key) => {
                for item in items {
                    let Some(kv) = item.get(key) else {
                        out.insert(path.clone());
                        return;
                    };
                    let mut p = path.clone();
                    p.push(Seg::K(key, kv.to_string()));
                    collect(item, p, kinds, out);
                }
            }
            ListKind::Set => {
                for item in items {
                    let mut p = path.clone();
                    p.push(Seg::V(item.to_string()));
                    out.insert(p);
                }
            }
            ListKind::Atomic => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The value at `path`.
pub fn get_path<'a>(v: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Seg::F(f) => cur.get(f)?,
            Seg::K(k, kv) => cur
                .as_array()?
                .iter()
                .find(|i| i.get(*k).map(Value::to_string).as_deref() == Some(kv.as_str()))?,
            Seg::V(x) => cur.as_array()?.iter().find(|i| i.to_string() == *x)?,
        };
    }
    Some(cur)
}

/// Removes the field at `path`; keyed list items left with only their key go too, and so do maps
/// that become empty (below the top-level fields).
pub fn remove_path(v: &mut Value, path: &[Seg]) {
    remove_at(v, path, 0);
}

fn remove_at(v: &mut Value, path: &[Seg], depth: usize) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match first {
        Seg::F(f) => {
            let Some(m) = v.as_object_mut() else { return };
            if rest.is_empty() {
                m.remove(f);
                return;
            }
            if let Some(child) = m.get_mut(f) {
                remove_at(child, rest, depth + 1);
                let empty = match child {
                    Value::Object(c) => c.is_empty(),
                    _ => false,
                };
                if empty && depth > 0 {
                    m.remove(f);
                }
            }
        }
        Seg::K(k, kv) => {
            let Some(list) = v.as_array_mut() else { return };
            let Some(pos) = list
                .iter()
                .position(|i| i.get(*k).map(Value::to_string).as_deref() == Some(kv.as_str()))
            else {
                return;
            };
            if rest.is_empty() {
                list.remove(pos);
                return;
            }
            if rest.len() == 1 && rest[0] == Seg::F((*k).to_string()) {
                // Never remove the key alone; the item goes when nothing else is left.
            } else {
                remove_at(&mut list[pos], rest, depth + 1);
            }
            if list[pos]
                .as_object()
                .is_some_and(|o| o.len() <= 1 && o.contains_key(*k))
            {
                list.remove(pos);
            }
        }
        Seg::V(x) => {
            if let Some(list) = v.as_array_mut() {
                list.retain(|i| i.to_string().as_str() != x.as_str());
            }
        }
    }
}

/// Merges an applied configuration into the live object: maps recursively, keyed lists by key,
/// sets by union, everything else replaced. Nulls in the configuration are ignored.
pub fn apply_merge(
    live: &mut Value,
    applied: &Value,
    path: &mut Vec<String>,
    kinds: &dyn Fn(&[String]) -> ListKind,
) {
    match applied {
        Value::Null => {}
        Value::Object(am) => {
            if !live.is_object() {
                *live = Value::Object(Map::new());
            }
            let lm = live.as_object_mut().expect("made an object above");
            for (k, av) in am {
                if av.is_null() {
                    continue;
                }
                path.push(k.clone());
                let entry = lm.entry(k.clone()).or_insert(Value::Null);
                apply_merge(entry, av, path, kinds);
                path.pop();
            }
        }
        Value::Array(items) => match kinds(path) {
            ListKind::Keyed(key) if live.is_array() => {
                let list = live.as_array_mut().expect("checked");
                for item in items {
                    let pos = item
                        .get(key)
                        .and_then(|kv| list.iter().position(|x| x.get(key) == Some(kv)));
                    match pos {
                        Some(p) => apply_merge(&mut list[p], item, path, kinds),
                        None => list.push(item.clone()),
                    }
                }
            }
            ListKind::Set if live.is_array() => {
                let list = live.as_array_mut().expect("checked");
                for item in items {
                    if !list.contains(item) {
                        list.push(item.clone());
                    }
                }
            }
            _ => *live = applied.clone(),
        },
        scalar => *live = scalar.clone(),
    }
}

/// Leaves whose value differs between `old` and `new` (set in `new`), and leaves `old` had that
/// `new` lacks.
pub fn changed_leaves(
    old: Option<&Value>,
    new: &Value,
    kinds: &dyn Fn(&[String]) -> ListKind,
    skip_status: bool,
) -> (FieldSet, FieldSet) {
    let new_leaves = leaves(new, kinds, skip_status);
    let old_leaves = old
        .map(|o| leaves(o, kinds, skip_status))
        .unwrap_or_default();
    let changed = new_leaves
        .iter()
        .filter(|p| old.and_then(|o| get_path(o, p)) != get_path(new, p))
        .cloned()
        .collect();
    let removed = old_leaves.difference(&new_leaves).cloned().collect();
    (changed, removed)
}
