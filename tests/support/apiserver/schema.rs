//! Custom resources and their structural schemas, as kube-apiserver handles them.
//!
//! When a request is decoded ([`prune_default`]): fields the schema does not know are pruned
//! (their paths reported for `fieldValidation`), non-nullable `null`s without a default dropped,
//! `default`s applied (also inside defaulted values). When the written object is validated
//! ([`validate`], after admission and the strategy, as upstream's `customResourceStrategy`):
//! types, `enum`, `required`, `minProperties`/`maxProperties`, `minItems`/`maxItems`,
//! `minLength`/`maxLength`, `pattern`, `minimum`/`maximum` (and their `exclusive` forms),
//! `multipleOf`; uniqueness in `x-kubernetes-list-type: set|map` lists; then, unless an error
//! above blocks them as upstream's `hasBlockingErr` does, the CEL rules (`cel.rs`), with
//! `oldSelf` on updates. On updates, as with upstream's ratcheting (CRDValidationRatcheting,
//! on by default since 1.30): a node whose value is unchanged is not checked against the schema,
//! and the errors of its rules that do not name `oldSelf` become warnings. Old values are matched
//! by field, by map key, and by key in `x-kubernetes-list-type: map` lists; other list items
//! have none.
//!
//! When a CRD is written ([`crd`]): each version's rules must compile, their `message`,
//! `messageExpression`, `reason` and `fieldPath` must be valid, `oldSelf` may not be used under
//! a list that is not a map list, and `pattern`s must compile.
//!
//! Not checked: `format`, `uniqueItems`, `allOf`/`anyOf`/`oneOf`/`not`, metadata of embedded
//! resources; the messages of `maxItems` and `maxProperties` follow `field.TooMany`.

use serde_json::{Map, Value, json};

use super::cel::{self, OldSelf, Want};
use super::status::{FieldError, FieldErrorKind};

/// The keys of a resource (the root, or an `x-kubernetes-embedded-resource`) that its schema
/// does not govern.
fn type_meta(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

fn is_embedded(schema: &Value) -> bool {
    schema["x-kubernetes-embedded-resource"] == true
}

/// `path.key` (`key` at the root).
fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A field error's path as `field.Path` prints it: `<nil>` for the root.
fn shown(path: &str) -> &str {
    if path.is_empty() { "<nil>" } else { path }
}

// ---------------------------------------------------------------------------------------------
// Decoding: pruning and defaulting

/// Prunes, drops non-nullable nulls without defaults and defaults `obj` (a whole object whose
/// `apiVersion`, `kind` and `metadata` are left alone). Returns the pruned fields' paths.
pub fn prune_default(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune(schema, obj, "", true, &mut unknown);
    default(schema, obj, true);
    unknown
}

fn prune(schema: &Value, v: &mut Value, path: &str, embedded: bool, unknown: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            let additional = schema.get("additionalProperties");
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if embedded && type_meta(&key) {
                    continue;
                }
                let sub = props
                    .and_then(|p| p.get(&key))
                    .or(additional.filter(|a| a.is_object()));
                let sub_path = child(path, &key);
                match sub {
                    Some(sub) => {
                        let Some(x) = map.get_mut(&key) else { continue };
                        if x.is_null() {
                            // `PruneNonNullableNullsWithoutDefaults`; one with a default is
                            // defaulted below.
                            if sub["nullable"] != true && sub.get("default").is_none() {
                                map.remove(&key);
                            }
                        } else {
                            prune(sub, x, &sub_path, is_embedded(sub), unknown);
                        }
                    }
                    None if preserve || additional == Some(&Value::Bool(true)) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(sub_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    prune(
                        item_schema,
                        item,
                        &item_path,
                        is_embedded(item_schema),
                        unknown,
                    );
                }
            }
        }
        _ => {}
    }
}

/// `structuraldefaulting.Default`: missing (or non-nullable null) properties get their
/// `default`, then everything is defaulted further down, defaults included.
fn default(schema: &Value, v: &mut Value, embedded: bool) {
    let fill = |sub: &Value, x: &mut Value| {
        if x.is_null()
            && sub["nullable"] != true
            && let Some(d) = sub.get("default")
        {
            *x = d.clone();
        }
    };
    match v {
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            for (k, sub) in props.into_iter().flatten() {
                if embedded && type_meta(k) {
                    continue;
                }
                if let Some(d) = sub.get("default")
                    && map
                        .get(k)
                        .is_none_or(|x| x.is_null() && sub["nullable"] != true)
                {
                    map.insert(k.clone(), d.clone());
                }
            }
            let additional = Some(&schema["additionalProperties"]).filter(|a| a.is_object());
            for (k, x) in map.iter_mut() {
                if embedded && type_meta(k) {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(k)) {
                    default(sub, x, is_embedded(sub));
                } else if let Some(sub) = additional {
                    fill(sub, x);
                    default(sub, x, is_embedded(sub));
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for x in items.iter_mut() {
                    fill(sub, x);
                    default(sub, x, is_embedded(sub));
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Validation of a written object

/// Validates `obj` (as its version shows it, after admission and the strategy) against the
/// version's schema; `old` on updates; `earlier` are the errors found before (metadata), which
/// can block the CEL rules as schema errors do. Returns errors and warnings (ratcheted rules).
pub fn validate(
    schema: &Value,
    obj: &Value,
    old: Option<&Value>,
    earlier: &[FieldError],
) -> (Vec<FieldError>, Vec<String>) {
    let mut errs = Vec::new();
    values(schema, obj, old, "", true, &mut errs);
    list_types(schema, obj, "", true, &mut errs);
    let mut warnings = Vec::new();
    if cel::has_rules(schema) {
        if earlier.iter().chain(&errs).any(blocking) {
            errs.push(FieldError::invalid(
                "<nil>",
                json!("null"),
                "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
            ));
        } else {
            let walked = cel::on_big_stack(|| {
                let mut walk = CelWalk::default();
                walk.node(schema, obj, old, "", true, false);
                walk
            });
            match walked {
                Ok(walk) => {
                    errs.extend(walk.errors);
                    warnings = walk.warnings;
                }
                Err(e) => errs.push(FieldError::invalid(
                    "<nil>",
                    json!(cel::shown_type(schema)),
                    e,
                )),
            }
        }
    }
    (errs, warnings)
}

/// Errors after which upstream does not run CEL rules (`hasBlockingErr`).
fn blocking(e: &FieldError) -> bool {
    matches!(
        e.kind,
        FieldErrorKind::NotSupported
            | FieldErrorKind::Required
            | FieldErrorKind::TooLong
            | FieldErrorKind::TooMany
            | FieldErrorKind::TypeInvalid
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The old item that corresponds to `item` in a `x-kubernetes-list-type: map` list (same key
/// values); items of other lists have none.
fn old_item<'a>(schema: &Value, old: Option<&'a Value>, item: &Value) -> Option<&'a Value> {
    if schema["x-kubernetes-list-type"] != "map" {
        return None;
    }
    let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    old?.as_array()?
        .iter()
        .find(|o| keys.iter().all(|k| o.get(*k) == item.get(*k)))
}

/// Go's `%v` of a float64, as go-openapi prints bounds: whole numbers without a fraction.
fn go_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e21 {
        format!("{x:.0}")
    } else {
        x.to_string()
    }
}

/// The OpenAPI value validations (kube-openapi's validator, as `kubeOpenAPIResultToFieldErrors`
/// reports them), on the subtree at `path`.
fn values(
    schema: &Value,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    embedded: bool,
    errs: &mut Vec<FieldError>,
) {
    // Ratcheting: an unchanged value is not checked again.
    if old == Some(v) {
        return;
    }
    let expected = schema["type"].as_str().unwrap_or("");
    if v.is_null() {
        // Only list items can still be null here (the decoder dropped or defaulted the rest).
        if schema["nullable"] != true {
            let expected = if expected.is_empty() {
                "object"
            } else {
                expected
            };
            errs.push(FieldError::type_invalid(
                path,
                json!("null"),
                format!("{path} in body must be of type {expected}: \"null\""),
            ));
        }
        return;
    }
    let actual = type_name(v);
    if schema["x-kubernetes-int-or-string"] == true {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errs.push(FieldError::type_invalid(
                path,
                json!(actual),
                format!("{path} in body must be of type integer,string: {actual:?}"),
            ));
            return;
        }
    } else {
        let type_ok = match expected {
            "" => true,
            "number" => v.is_number(),
            "integer" => actual == "integer",
            other => other == actual,
        };
        if !type_ok {
            errs.push(FieldError::type_invalid(
                path,
                json!(actual),
                format!("{path} in body must be of type {expected}: {actual:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        // Each quoted, numbers too (`strconv.Quote` of the JSON text).
        let supported: Vec<String> = allowed
            .iter()
            .map(|x| match x {
                Value::String(s) => format!("{s:?}"),
                other => format!("{:?}", other.to_string()),
            })
            .collect();
        let mut e = FieldError::not_supported(path, v.clone(), &[]);
        e.detail = format!("supported values: {}", supported.join(", "));
        errs.push(e);
    }
    match v {
        Value::Object(map) => object_values(schema, map, old, path, embedded, errs),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    values(
                        item_schema,
                        item,
                        old_item(schema, old, item),
                        &format!("{path}[{i}]"),
                        is_embedded(item_schema),
                        errs,
                    );
                }
            }
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errs.push(FieldError::too_many(path, items.len(), max));
            }
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errs.push(FieldError::invalid(
                    path,
                    json!(items.len()),
                    format!("{path} in body should have at least {min} items"),
                ));
            }
        }
        Value::String(text) => {
            if let Some(max) = schema["maxLength"].as_u64()
                && text.chars().count() as u64 > max
            {
                errs.push(FieldError::too_long(path, max as usize));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && (text.chars().count() as u64) < min
            {
                errs.push(FieldError::invalid(
                    path,
                    v.clone(),
                    format!("{path} in body should be at least {min} chars long"),
                ));
            }
            // A pattern that does not compile was refused with its CRD (extra CRDs too).
            if let Some(pattern) = schema["pattern"].as_str()
                && let Ok(re) = cel::regex(pattern)
                && !re.is_match(text)
            {
                errs.push(FieldError::invalid(
                    path,
                    v.clone(),
                    format!("{path} in body should match '{pattern}'"),
                ));
            }
        }
        Value::Number(n) => number_values(schema, n.as_f64().unwrap_or_default(), v, path, errs),
        _ => {}
    }
}

fn object_values(
    schema: &Value,
    map: &Map<String, Value>,
    old: Option<&Value>,
    path: &str,
    embedded: bool,
    errs: &mut Vec<FieldError>,
) {
    let props = schema["properties"].as_object();
    let additional = Some(&schema["additionalProperties"]).filter(|a| a.is_object());
    for (key, x) in map {
        if embedded && type_meta(key) {
            continue;
        }
        if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
            let old_x = old.and_then(|o| o.get(key));
            values(sub, x, old_x, &child(path, key), is_embedded(sub), errs);
        }
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        if let Some(r) = r.as_str()
            && !map.contains_key(r)
        {
            errs.push(FieldError::required(child(path, r), ""));
        }
    }
    if path.is_empty() {
        return;
    }
    if let Some(max) = schema["maxProperties"].as_u64()
        && map.len() as u64 > max
    {
        errs.push(FieldError::too_many(path, map.len(), max));
    }
    if let Some(min) = schema["minProperties"].as_u64()
        && (map.len() as u64) < min
    {
        // go-openapi's TooFewProperties carries the minimum as its value.
        errs.push(FieldError::invalid(
            path,
            json!(min),
            format!("{path} in body should have at least {min} properties"),
        ));
    }
}

fn number_values(schema: &Value, x: f64, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(min) = schema["minimum"].as_f64() {
        let exclusive = schema["exclusiveMinimum"] == true;
        if x < min || (exclusive && x == min) {
            let bound = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errs.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body should be {bound} {}", go_number(min)),
            ));
        }
    }
    if let Some(max) = schema["maximum"].as_f64() {
        let exclusive = schema["exclusiveMaximum"] == true;
        if x > max || (exclusive && x == max) {
            let bound = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            errs.push(FieldError::invalid(
                path,
                v.clone(),
                format!("{path} in body should be {bound} {}", go_number(max)),
            ));
        }
    }
    if let Some(m) = schema["multipleOf"].as_f64()
        && m > 0.0
        && (x / m).fract() != 0.0
    {
        errs.push(FieldError::invalid(
            path,
            v.clone(),
            format!("{path} in body should be a multiple of {}", go_number(m)),
        ));
    }
}

/// `structurallisttype.ValidateListSetsAndMaps`: the second of equal items of a `set` list, the
/// second item with a key already seen in a `map` list, are duplicates. Paths as `field.Path`
/// builds them (`spec.m[key]` for a map value).
fn list_types(schema: &Value, v: &Value, path: &str, embedded: bool, errs: &mut Vec<FieldError>) {
    match v {
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            let additional = Some(&schema["additionalProperties"]).filter(|a| a.is_object());
            for (k, x) in map {
                if embedded && type_meta(k) {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(k)) {
                    list_types(sub, x, &child(path, k), is_embedded(sub), errs);
                } else if let Some(sub) = additional {
                    list_types(sub, x, &format!("{path}[{k}]"), is_embedded(sub), errs);
                }
            }
        }
        Value::Array(items) => {
            match schema["x-kubernetes-list-type"].as_str() {
                Some("set") => {
                    for i in first_repeats(items.iter()) {
                        errs.push(duplicate(format!("{path}[{i}]"), &items[i]));
                    }
                }
                Some("map") => {
                    if let Some(i) = items.iter().position(|x| !x.is_object() && !x.is_null()) {
                        errs.push(FieldError::invalid(
                            format!("{path}[{i}]"),
                            items[i].clone(),
                            "must be an object for an array of list-type map",
                        ));
                        return;
                    }
                    let key_fields: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let keys: Vec<Value> = items
                        .iter()
                        .map(|x| {
                            let mut key = Map::new();
                            for f in &key_fields {
                                if let Some(k) = x.get(*f) {
                                    key.insert((*f).to_owned(), k.clone());
                                }
                            }
                            Value::Object(key)
                        })
                        .collect();
                    for i in first_repeats(keys.iter()) {
                        errs.push(duplicate(format!("{path}[{i}]"), &keys[i]));
                    }
                }
                _ => {}
            }
            if let Some(sub) = schema.get("items") {
                for (i, x) in items.iter().enumerate() {
                    list_types(sub, x, &format!("{path}[{i}]"), is_embedded(sub), errs);
                }
            }
        }
        _ => {}
    }
}

/// The indices of the first repetition of each value seen more than once.
fn first_repeats<'a>(items: impl Iterator<Item = &'a Value>) -> Vec<usize> {
    let mut seen: Vec<(&Value, usize)> = Vec::new();
    let mut out = Vec::new();
    for (i, x) in items.enumerate() {
        match seen.iter_mut().find(|(v, _)| *v == x) {
            Some((_, times)) => {
                *times += 1;
                if *times == 2 {
                    out.push(i);
                }
            }
            None => seen.push((x, 1)),
        }
    }
    out
}

/// `field.Duplicate`, showing compound values as Go's `%#v` does.
fn duplicate(path: String, v: &Value) -> FieldError {
    let mut e = FieldError::duplicate(path, v.clone());
    if v.is_object() || v.is_array() {
        e.value = Some(Value::String(go_value(v)));
        e.raw_value = true;
    }
    e
}

/// Go's `%#v` of a decoded JSON value.
fn go_value(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let entries: Vec<String> = m
                .iter()
                .map(|(k, x)| format!("{k:?}:{}", go_value(x)))
                .collect();
            format!("map[string]interface {{}}{{{}}}", entries.join(", "))
        }
        Value::Array(items) => {
            let entries: Vec<String> = items.iter().map(go_value).collect();
            format!("[]interface {{}}{{{}}}", entries.join(", "))
        }
        Value::String(s) => format!("{s:?}"),
        Value::Null => "interface {}(nil)".into(),
        other => other.to_string(),
    }
}

/// The CEL pass over an object (upstream's `cel.Validator`).
#[derive(Default)]
struct CelWalk {
    errors: Vec<FieldError>,
    warnings: Vec<String>,
}

impl CelWalk {
    /// `inherited`: whether the nearest ancestor that has an old value is unchanged (errors of
    /// rules without `oldSelf` are then ratcheted).
    fn node(
        &mut self,
        schema: &Value,
        v: &Value,
        old: Option<&Value>,
        path: &str,
        embedded: bool,
        inherited: bool,
    ) {
        // Rules check non-null values; a rule on the surrounding object checks presence.
        if v.is_null() {
            return;
        }
        let ratchet = match old {
            Some(o) => o == v,
            None => inherited,
        };
        if let Some(rules) = schema["x-kubernetes-validations"].as_array()
            && !rules.is_empty()
        {
            let this = cel::to_cel(Some(schema), v, embedded);
            let before = old.map(|o| cel::to_cel(Some(schema), o, embedded));
            for rule in rules {
                self.rule(schema, rule, &this, before.as_ref(), path, ratchet);
            }
        }
        match v {
            Value::Object(map) => {
                let props = schema["properties"].as_object();
                let additional = Some(&schema["additionalProperties"]).filter(|a| a.is_object());
                for (k, x) in map {
                    if embedded && type_meta(k) {
                        continue;
                    }
                    let old_x = old.and_then(|o| o.get(k));
                    if let Some(sub) = props.and_then(|p| p.get(k)) {
                        self.node(sub, x, old_x, &child(path, k), is_embedded(sub), ratchet);
                    } else if let Some(sub) = additional {
                        let at = format!("{path}[{k}]");
                        self.node(sub, x, old_x, &at, is_embedded(sub), ratchet);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(sub) = schema.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        let at = format!("{path}[{i}]");
                        let old_x = old_item(schema, old, x);
                        self.node(sub, x, old_x, &at, is_embedded(sub), ratchet);
                    }
                }
            }
            _ => {}
        }
    }

    fn rule(
        &mut self,
        schema: &Value,
        rule: &Value,
        this: &cel::Cel,
        old: Option<&cel::Cel>,
        path: &str,
        ratchet: bool,
    ) {
        let text = rule["rule"].as_str().unwrap_or_default().trim();
        if text.is_empty() {
            return;
        }
        let ty = json!(cel::shown_type(schema));
        let at = shown(path);
        let parsed = match cel::parse(text) {
            Ok(p) => p,
            Err(e) => {
                self.errors.push(FieldError::invalid(
                    at,
                    ty,
                    format!("rule compile error: compilation failed: {e}"),
                ));
                return;
            }
        };
        let old_self = match (rule["optionalOldSelf"] == true, old) {
            (true, old) => OldSelf::Optional(old),
            (false, Some(o)) => OldSelf::Value(o),
            // A transition rule runs only where there is an old value to compare with.
            (false, None) if parsed.uses_old_self => return,
            (false, None) => OldSelf::Unbound,
        };
        let message = rule["message"]
            .as_str()
            .map(str::trim)
            .filter(|m| !m.is_empty());
        let rule_text = message.unwrap_or(text);
        match cel::run(&parsed, this, old_self) {
            Ok(cel::Cel::Bool(true)) => return,
            Ok(cel::Cel::Bool(false)) => {}
            Ok(other) => {
                let got = cel::not_bool(&other).unwrap_or("dyn");
                self.errors.push(FieldError::invalid(
                    at,
                    ty,
                    format!("rule gave {got}, not a bool, evaluating rule: {rule_text}"),
                ));
                return;
            }
            Err(e) if e.no_such_overload => {
                self.errors.push(FieldError::invalid(
                    at,
                    ty,
                    format!(
                        "'{}': call arguments did not match a supported operator, function or macro signature for rule: {rule_text}",
                        e.message
                    ),
                ));
                return;
            }
            Err(e) => {
                self.errors.push(FieldError::invalid(
                    at,
                    ty,
                    format!("{} evaluating rule: {rule_text}", e.message),
                ));
                return;
            }
        }
        let detail = rule["messageExpression"]
            .as_str()
            .filter(|m| !m.trim().is_empty())
            .and_then(|m| cel::parse(m).ok())
            .and_then(|p| cel::message(&p, this, old_self))
            .or_else(|| message.map(str::to_owned))
            .unwrap_or_else(|| format!("failed rule: {text}"));
        let field = match rule["fieldPath"]
            .as_str()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .and_then(|p| cel::field_path(p, schema))
        {
            Some(sub) if !sub.is_empty() => child(path, &sub),
            _ => at.to_owned(),
        };
        let err = match rule["reason"].as_str() {
            Some("FieldValueForbidden") => FieldError::forbidden(field, detail),
            Some("FieldValueRequired") => FieldError::required(field, detail),
            Some("FieldValueDuplicate") => FieldError::duplicate(field, ty),
            _ => FieldError::invalid(field, ty, detail),
        };
        if ratchet && !parsed.uses_old_self {
            self.warnings.push(err.to_string());
        } else {
            self.errors.push(err);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRD validation

const REASONS: &[&str] = &[
    "FieldValueDuplicate",
    "FieldValueForbidden",
    "FieldValueInvalid",
    "FieldValueRequired",
];

fn has_newlines(s: &str) -> bool {
    s.contains(['\n', '\r'])
}

/// What `ValidateCustomResourceDefinition` checks of the versions' schemas that matters here:
/// the rules compile (and the rest of each `x-kubernetes-validations` entry is valid) and the
/// patterns compile.
pub fn crd(crd: &Value) -> Vec<FieldError> {
    let checked = cel::on_big_stack(|| {
        let mut errs = Vec::new();
        let versions = crd["spec"]["versions"].as_array();
        for (i, version) in versions.into_iter().flatten().enumerate() {
            if let Some(schema) = version["schema"].get("openAPIV3Schema") {
                let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
                check_schema(schema, &path, true, None, &mut errs);
            }
        }
        errs
    });
    checked.unwrap_or_else(|e| vec![FieldError::invalid("spec.versions", json!(""), e)])
}

/// One schema node and what is under it. `uncorrelatable`: the list (not a map list) this node
/// is under, where `oldSelf` has no meaning.
fn check_schema(
    node: &Value,
    path: &str,
    embedded: bool,
    uncorrelatable: Option<&str>,
    errs: &mut Vec<FieldError>,
) {
    if let Some(pattern) = node["pattern"].as_str()
        && let Err(e) = cel::regex(pattern)
    {
        errs.push(FieldError::invalid(
            format!("{path}.pattern"),
            json!(pattern),
            format!("must be a valid regular expression, but isn't: {e}"),
        ));
    }
    if let Some(rules) = node["x-kubernetes-validations"].as_array() {
        let before = errs.len();
        for (i, rule) in rules.iter().enumerate() {
            check_rule_fields(
                node,
                rule,
                &format!("{path}.x-kubernetes-validations[{i}]"),
                errs,
            );
        }
        // As upstream, the rules are compiled only when the rest is valid.
        if errs.len() == before {
            for (i, rule) in rules.iter().enumerate() {
                let at = format!("{path}.x-kubernetes-validations[{i}]");
                compile_rule(node, rule, &at, embedded, uncorrelatable, errs);
            }
        }
    }
    for (k, sub) in node["properties"].as_object().into_iter().flatten() {
        let at = format!("{path}.properties[{k}]");
        check_schema(sub, &at, is_embedded(sub), uncorrelatable, errs);
    }
    if let Some(items) = node.get("items").filter(|i| i.is_object()) {
        let under = if node["x-kubernetes-list-type"] == "map" {
            uncorrelatable
        } else {
            Some(uncorrelatable.unwrap_or(path))
        };
        check_schema(
            items,
            &format!("{path}.items"),
            is_embedded(items),
            under,
            errs,
        );
    }
    if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
        let at = format!("{path}.additionalProperties");
        check_schema(values, &at, is_embedded(values), uncorrelatable, errs);
    }
}

fn check_rule_fields(node: &Value, rule: &Value, at: &str, errs: &mut Vec<FieldError>) {
    let field = |f: &str| format!("{at}.{f}");
    let text = rule["rule"].as_str().unwrap_or_default().trim();
    let message = rule["message"].as_str().unwrap_or_default();
    if text.is_empty() {
        errs.push(FieldError::required(field("rule"), "rule is not specified"));
    } else if !message.is_empty() && message.trim().is_empty() {
        errs.push(FieldError::invalid(
            field("message"),
            json!(message),
            "message must be non-empty if specified",
        ));
    } else if has_newlines(message.trim()) {
        errs.push(FieldError::invalid(
            field("message"),
            json!(message),
            "message must not contain line breaks",
        ));
    } else if has_newlines(text) && message.trim().is_empty() {
        errs.push(FieldError::required(
            field("message"),
            "message must be specified if rule contains line breaks",
        ));
    }
    let expression = rule["messageExpression"].as_str().unwrap_or_default();
    if !expression.is_empty() && expression.trim().is_empty() {
        errs.push(FieldError::required(
            field("messageExpression"),
            "messageExpression must be non-empty if specified",
        ));
    }
    if let Some(reason) = rule.get("reason")
        && !reason.as_str().is_some_and(|r| REASONS.contains(&r))
    {
        errs.push(FieldError::not_supported(
            field("reason"),
            reason.clone(),
            REASONS,
        ));
    }
    if let Some(fp) = rule["fieldPath"].as_str() {
        let invalid = |detail: &str| FieldError::invalid(field("fieldPath"), json!(fp), detail);
        if !fp.is_empty() && fp.trim().is_empty() {
            errs.push(invalid("fieldPath must be non-empty if specified"));
        }
        if has_newlines(fp) {
            errs.push(invalid("fieldPath must not contain line breaks"));
        }
        if !fp.is_empty() && cel::field_path(fp, node).is_none() {
            errs.push(invalid("fieldPath must be a valid path"));
        }
    }
}

fn compile_rule(
    node: &Value,
    rule: &Value,
    at: &str,
    embedded: bool,
    uncorrelatable: Option<&str>,
    errs: &mut Vec<FieldError>,
) {
    let text = rule["rule"].as_str().unwrap_or_default();
    let optional = rule["optionalOldSelf"] == true;
    let uses_old_self = match cel::compile(text, node, embedded, optional, Want::Bool) {
        Ok(uses) => uses,
        Err(detail) => {
            errs.push(FieldError::invalid_shown(
                format!("{at}.rule"),
                cel::go_rule(rule),
                detail,
            ));
            return;
        }
    };
    if let Some(expression) = rule["messageExpression"]
        .as_str()
        .filter(|e| !e.trim().is_empty())
        && let Err(detail) = cel::compile(expression, node, embedded, optional, Want::String)
    {
        errs.push(FieldError::invalid_shown(
            format!("{at}.messageExpression"),
            cel::go_rule(rule),
            format!("messageExpression {detail}"),
        ));
    }
    if uses_old_self {
        if let Some(list) = uncorrelatable {
            errs.push(FieldError::invalid(
                format!("{at}.rule"),
                json!(text),
                format!("oldSelf cannot be used on the uncorrelatable portion of the schema within {list}"),
            ));
        }
    } else if let Some(flag) = rule.get("optionalOldSelf") {
        errs.push(FieldError::invalid(
            format!("{at}.optionalOldSelf"),
            flag.clone(),
            "may not be set if oldSelf is not used in rule",
        ));
    }
}
