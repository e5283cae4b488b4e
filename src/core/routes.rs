//! Gateway API HTTPRoute rules for a canary, from plain values.
//!
//! One surgery serves both modes of the `gateway-api` router:
//! - at a gateway, on the user's own routes: every backendRef that points at the root Service
//!   becomes a stable and a canary ref with weights; everything else (other rules, other
//!   backends, filters, matches, timeouts, parentRefs) stays as the user wrote it; header routes
//!   and mirrors are added as rules and filters named `fledge-…`. The rules fledge first saw are
//!   saved in the rollout state, and a restore writes exactly them back;
//! - for a mesh (GAMMA), on the route fledge owns: the same surgery on one rule that sends
//!   everything to the root Service.
//!
//! The rules are computed from the user's rules alone, never from what fledge wrote before:
//! applying twice is applying once, and a restore is exact. The user's rules are re-derived from
//! the route as it is now on every pass ([`user_rules`]): fledge's own fields (the stable/canary
//! refs, the `fledge-` rules, the mirror filters to the canary) are taken out again, and whatever
//! else the user changed in the meantime (a timeout, a filter, a new rule) is kept, saved, and
//! is what a restore writes back. Nothing is fought over.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::core::spec::{HeaderMatch, HeaderValue, Mirror, Step, Weight};

pub const ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1";
pub const ROUTE_KIND: &str = "HTTPRoute";
/// Gateway API backend weights are relative integers up to this.
const MAX_BACKEND_WEIGHT: u64 = 1_000_000;
/// The names of the rules fledge adds start with this.
pub const RULE_PREFIX: &str = "fledge-";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "HTTPRoute {0}: no rule sends requests to the root Service {1}; fledge splits only backendRefs that point at it"
    )]
    NoRootReference(String, String),
    #[error(
        "HTTPRoute {0}: already points at {1}, but fledge saved no rules for it; restore the route as you wrote it (without fledge's backends and `fledge-` rules)"
    )]
    AlreadySplit(String, String),
    #[error(
        "HTTPRoute {0}: rule {1}: the weights cannot be split exactly within Gateway API's limit of 1000000; use smaller backend weights"
    )]
    WeightTooLarge(String, usize),
}

/// The header routes and mirrors in effect, in the order their steps first set them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteExtras {
    pub header_routes: Vec<(String, Vec<HeaderMatch>)>,
    pub mirrors: Vec<(String, Mirror)>,
}

impl RouteExtras {
    /// What the steps before `step` left in effect: each `setHeaderRoute`/`setMirrorRoute` sets or
    /// replaces its name, and one without a match (a mirror with `name` alone) removes it.
    pub fn at(steps: &[Step], step: usize) -> RouteExtras {
        let mut extras = RouteExtras::default();
        for s in steps.iter().take(step) {
            match s {
                Step::SetHeaderRoute { name, matches } => {
                    extras.header_routes.retain(|(n, _)| n != name);
                    if !matches.is_empty() {
                        extras.header_routes.push((name.clone(), matches.clone()));
                    }
                }
                Step::SetMirrorRoute { name, mirror } => {
                    extras.mirrors.retain(|(n, _)| n != name);
                    if let Some(mirror) = mirror {
                        extras.mirrors.push((name.clone(), mirror.clone()));
                    }
                }
                _ => {}
            }
        }
        extras
    }

    pub fn is_empty(&self) -> bool {
        self.header_routes.is_empty() && self.mirrors.is_empty()
    }
}

/// The Services of one canary, and the namespace of the Deployment (routes may name another).
#[derive(Clone, Copy, Debug)]
pub struct Backends<'a> {
    pub namespace: &'a str,
    pub root: &'a str,
    pub stable: &'a str,
    pub canary: &'a str,
}

impl Backends<'_> {
    /// A backendRef to the Service `name` in the Deployment's namespace (group "" and kind
    /// Service are the defaults).
    fn is_ref_to(&self, backend: &Value, name: &str) -> bool {
        let group = backend["group"].as_str().unwrap_or("");
        let kind = backend["kind"].as_str().unwrap_or("Service");
        let namespace = backend["namespace"].as_str().unwrap_or(self.namespace);
        group.is_empty()
            && kind == "Service"
            && namespace == self.namespace
            && backend["name"] == name
    }

    fn is_root(&self, backend: &Value) -> bool {
        self.is_ref_to(backend, self.root)
    }

    fn references_root(&self, rule: &Value) -> bool {
        refs(rule).iter().any(|b| self.is_root(b))
    }
}

fn refs(rule: &Value) -> &[Value] {
    rule["backendRefs"].as_array().map_or(&[], Vec::as_slice)
}

fn weight_of(backend: &Value) -> u64 {
    backend["weight"].as_u64().unwrap_or(1)
}

/// The user's rules of `route`, from which fledge splits: when fledge saved rules before, the
/// route's current rules with fledge's own fields taken out ([`user_rules`]), so that the user's
/// edits since are kept; else, when fledge first touches it, the route's own rules, which must
/// reference the root Service and must not carry fledge's changes already (those would be saved
/// as the user's).
pub fn originals(
    route: &str,
    current: &[Value],
    saved: Option<&[Value]>,
    backends: &Backends,
) -> Result<Vec<Value>, RouteError> {
    if let Some(saved) = saved {
        return Ok(user_rules(current, saved, backends));
    }
    let touched = current.iter().any(|rule| {
        rule["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(RULE_PREFIX))
            || refs(rule).iter().any(|b| {
                backends.is_ref_to(b, backends.stable) || backends.is_ref_to(b, backends.canary)
            })
    });
    if touched {
        return Err(RouteError::AlreadySplit(
            route.to_owned(),
            backends.canary.to_owned(),
        ));
    }
    if !current.iter().any(|rule| backends.references_root(rule)) {
        return Err(RouteError::NoRootReference(
            route.to_owned(),
            backends.root.to_owned(),
        ));
    }
    Ok(current.to_vec())
}

/// The rules the user means, read off the route as it is now: `current` without what fledge adds
/// to it. The `fledge-` rules go; mirror filters to the canary Service go; each stable ref that is
/// directly followed by its canary twin (the same ref but for name and weight: what
/// [`split_rules`] writes) becomes one ref to the root Service again. Everything else is the
/// user's and stays, edits made since fledge's last write included.
///
/// The root ref's weight is the sum of the pair's; when a rule's weights are then a multiple of a
/// `saved` rule's with the same refs, that rule's refs are taken as they were saved (the exact
/// weights, or none where the user wrote none); otherwise the weights are divided by their common
/// divisor, and a weight of 1 (the default) is left out. (Alike, a rule whose only filter was
/// fledge's mirror comes back without `filters`, or with `filters: []` when it is a saved rule.) A route without fledge's fields (the user re-applied theirs) is returned as it is.
pub fn user_rules(current: &[Value], saved: &[Value], backends: &Backends) -> Vec<Value> {
    current
        .iter()
        .filter(|rule| !is_fledges_rule(rule))
        .map(|rule| unsplit_rule(rule, saved, backends))
        .collect()
}

fn is_fledges_rule(rule: &Value) -> bool {
    rule["name"]
        .as_str()
        .is_some_and(|n| n.starts_with(RULE_PREFIX))
}

fn is_fledges_mirror(filter: &Value, backends: &Backends) -> bool {
    filter["type"] == "RequestMirror"
        && backends.is_ref_to(&filter["requestMirror"]["backendRef"], backends.canary)
}

/// A backendRef without its name and weight: what a stable ref and its canary twin share.
fn ref_shape(backend: &Value) -> Value {
    let mut shape = backend.clone();
    if let Some(object) = shape.as_object_mut() {
        object.remove("name");
        object.remove("weight");
    }
    shape
}

fn without_weights(refs: &[Value]) -> Vec<Value> {
    refs.iter()
        .map(|b| {
            let mut b = b.clone();
            if let Some(object) = b.as_object_mut() {
                object.remove("weight");
            }
            b
        })
        .collect()
}

/// Whether weights `a` are a positive multiple of `b` (all zero only with all zero).
fn proportional(a: &[u64], b: &[u64]) -> bool {
    let zero = |w: &[u64]| w.iter().all(|&x| x == 0);
    a.len() == b.len()
        && zero(a) == zero(b)
        && (0..a.len()).all(|i| {
            (0..a.len())
                .all(|j| u128::from(a[i]) * u128::from(b[j]) == u128::from(a[j]) * u128::from(b[i]))
        })
}

fn unsplit_rule(rule: &Value, saved: &[Value], backends: &Backends) -> Value {
    let mut rule = rule.clone();
    if let Some(filters) = rule["filters"].as_array() {
        let kept: Vec<Value> = filters
            .iter()
            .filter(|f| !is_fledges_mirror(f, backends))
            .cloned()
            .collect();
        if kept.is_empty() {
            if let Some(object) = rule.as_object_mut() {
                object.remove("filters");
            }
        } else {
            rule["filters"] = Value::Array(kept);
        }
    }
    let current = refs(&rule).to_vec();
    let mut merged = Vec::with_capacity(current.len());
    let mut split = false;
    let mut i = 0;
    while i < current.len() {
        let (b, next) = (&current[i], current.get(i + 1));
        if let Some(next) = next
            && backends.is_ref_to(b, backends.stable)
            && backends.is_ref_to(next, backends.canary)
            && ref_shape(b) == ref_shape(next)
        {
            let mut root = b.clone();
            root["name"] = json!(backends.root);
            root["weight"] = json!(weight_of(b) + weight_of(next));
            merged.push(root);
            split = true;
            i += 2;
        } else {
            merged.push(b.clone());
            i += 1;
        }
    }
    if !split {
        return as_saved_rule(rule, saved);
    }
    let weights: Vec<u64> = merged.iter().map(weight_of).collect();
    let shape = without_weights(&merged);
    let as_saved = saved.iter().map(refs).find(|s| {
        without_weights(s) == shape
            && proportional(&weights, &s.iter().map(weight_of).collect::<Vec<_>>())
    });
    rule["backendRefs"] = Value::Array(match as_saved {
        Some(s) => s.to_vec(),
        None => {
            let divisor = weights.iter().copied().fold(0, gcd).max(1);
            merged
                .into_iter()
                .map(|mut b| {
                    let weight = weight_of(&b) / divisor;
                    if let Some(object) = b.as_object_mut() {
                        // 1 is the default, and what a user writes by leaving it out.
                        if weight == 1 {
                            object.remove("weight");
                        } else {
                            object.insert("weight".into(), json!(weight));
                        }
                    }
                    b
                })
                .collect()
        }
    });
    as_saved_rule(rule, saved)
}

/// `rule`, or the saved rule it is but for an empty `filters` list (which taking fledge's mirror
/// out of cannot tell from none).
fn as_saved_rule(rule: Value, saved: &[Value]) -> Value {
    if rule.get("filters").is_some() {
        return rule;
    }
    saved
        .iter()
        .find(|s| {
            s["filters"].as_array().is_some_and(Vec::is_empty) && {
                let mut s = (*s).clone();
                s.as_object_mut().map(|o| o.remove("filters"));
                s == rule
            }
        })
        .cloned()
        .unwrap_or(rule)
}

/// `original` with every reference to the root Service split into stable and canary at `weight`,
/// then the header routes' rules and the mirrors of `extras`.
pub fn split_rules(
    route: &str,
    original: &[Value],
    backends: &Backends,
    weight: Weight,
    extras: &RouteExtras,
) -> Result<Vec<Value>, RouteError> {
    let mut rules = Vec::with_capacity(original.len());
    let mut added = Vec::new();
    for (i, rule) in original.iter().enumerate() {
        if !backends.references_root(rule) {
            rules.push(rule.clone());
            continue;
        }
        let split = split_refs(refs(rule), backends, weight)
            .ok_or_else(|| RouteError::WeightTooLarge(route.to_owned(), i))?;
        let mut kept = rule.clone();
        kept["backendRefs"] = Value::Array(split.clone());
        let root_port = refs(rule)
            .iter()
            .find(|b| backends.is_root(b))
            .and_then(|b| b.get("port"))
            .cloned();
        let canary_ref = || {
            let mut r = json!({"name": backends.canary});
            if let Some(port) = &root_port {
                r["port"] = port.clone();
            }
            r
        };
        for (name, mirror) in &extras.mirrors {
            let filter = json!({
                "type": "RequestMirror",
                "requestMirror": {"backendRef": canary_ref(), "percent": mirror.percent},
            });
            if mirror.matches.is_empty() {
                push_filter(&mut kept, filter);
            } else {
                let mut copy = narrowed(rule, &format!("{RULE_PREFIX}{name}-{i}"), &mirror.matches);
                copy["backendRefs"] = Value::Array(split.clone());
                push_filter(&mut copy, filter);
                added.push(copy);
            }
        }
        for (name, matches) in &extras.header_routes {
            let mut only_canary = narrowed(rule, &format!("{RULE_PREFIX}{name}-{i}"), matches);
            only_canary["backendRefs"] = json!([canary_ref()]);
            added.push(only_canary);
        }
        rules.push(kept);
    }
    rules.extend(added);
    Ok(rules)
}

/// `rule` under a new name, matching only requests that also carry `headers`: each of its matches
/// (the default "every path" when it has none) gets the headers added.
fn narrowed(rule: &Value, name: &str, headers: &[HeaderMatch]) -> Value {
    let mut copy = rule.clone();
    if let Some(object) = copy.as_object_mut() {
        object.insert("name".into(), json!(name));
    }
    let matches = match rule["matches"].as_array() {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![json!({"path": {"type": "PathPrefix", "value": "/"}})],
    };
    copy["matches"] = Value::Array(
        matches
            .into_iter()
            .map(|mut m| {
                let mut all = m["headers"].as_array().cloned().unwrap_or_default();
                all.extend(headers.iter().map(header_match));
                m["headers"] = Value::Array(all);
                m
            })
            .collect(),
    );
    copy
}

fn push_filter(rule: &mut Value, filter: Value) {
    let mut filters = rule["filters"].as_array().cloned().unwrap_or_default();
    filters.push(filter);
    rule["filters"] = Value::Array(filters);
}

/// Gateway API header matches know `Exact` and `RegularExpression`; a prefix is a regex.
fn header_match(m: &HeaderMatch) -> Value {
    let (kind, value) = match &m.value {
        HeaderValue::Exact(v) => ("Exact", v.clone()),
        HeaderValue::Prefix(v) => ("RegularExpression", format!("^{}.*", regex_escape(v))),
        HeaderValue::Regex(v) => ("RegularExpression", v.clone()),
    };
    json!({"type": kind, "name": m.name, "value": value})
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The backendRefs of one rule with each root ref (weight `r`) split into stable `r × (100 % − w)`
/// and canary `r × w`, every other ref scaled alike; divided by their common divisor only if the
/// largest is over Gateway API's limit. `None` when that still does not fit.
fn split_refs(original: &[Value], backends: &Backends, weight: Weight) -> Option<Vec<Value>> {
    let full = u64::from(Weight::FULL.basis_points());
    let canary = u64::from(weight.basis_points());
    let mut out: Vec<(Value, u64)> = Vec::with_capacity(original.len() + 1);
    for backend in original {
        let r = weight_of(backend);
        if backends.is_root(backend) {
            for (name, w) in [
                (backends.stable, r * (full - canary)),
                (backends.canary, r * canary),
            ] {
                let mut split = backend.clone();
                if let Some(object) = split.as_object_mut() {
                    // Port, namespace, group, kind and filters stay as the user wrote them.
                    object.insert("name".into(), json!(name));
                }
                out.push((split, w));
            }
        } else {
            out.push((backend.clone(), r * full));
        }
    }
    let largest = out.iter().map(|(_, w)| *w).max().unwrap_or(0);
    let divisor = if largest > MAX_BACKEND_WEIGHT {
        out.iter().map(|(_, w)| *w).fold(0, gcd)
    } else {
        1
    };
    if largest / divisor.max(1) > MAX_BACKEND_WEIGHT {
        return None;
    }
    Some(
        out.into_iter()
            .map(|(mut backend, w)| {
                backend["weight"] = json!(w / divisor.max(1));
                backend
            })
            .collect(),
    )
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The one rule of fledge's own GAMMA route before the split: everything to the root Service on
/// `port`.
pub fn mesh_rule(root: &str, port: Option<&Value>) -> Value {
    let mut backend = json!({"name": root});
    if let Some(port) = port {
        backend["port"] = port.clone();
    }
    json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [backend],
    })
}

/// The GAMMA parentRef: the root Service itself (group "", kind Service), on `port`: a Service
/// backendRef must name one port, so the route attaches to that port alone and never sends a
/// request that came in on another port to this one.
pub fn mesh_parent(root: &str, port: Option<&Value>) -> Value {
    let mut parent = json!({"group": "", "kind": "Service", "name": root});
    if let Some(port) = port {
        parent["port"] = port.clone();
    }
    json!([parent])
}

/// The port of the root Service that fledge's GAMMA route splits: the first one that speaks HTTP
/// by its `appProtocol` (`http`, `kubernetes.io/h2c`) or by its name (`http`, `http2`,
/// `http-…`, `http2-…`, Istio's convention), else the first one.
pub fn mesh_port(ports: &[Value]) -> Option<&Value> {
    let http = |p: &&Value| {
        let app = p["appProtocol"].as_str().unwrap_or_default();
        let name = p["name"].as_str().unwrap_or_default();
        matches!(app, "http" | "kubernetes.io/h2c")
            || ["http", "http2"]
                .iter()
                .any(|n| name == *n || name.starts_with(&format!("{n}-")))
    };
    ports
        .iter()
        .find(http)
        .or_else(|| ports.first())
        .and_then(|p| p.get("port"))
}

/// The canary weight a split route sends by its first rule that references the canary, in basis
/// points of that rule's weights: how tests read the weights back off a route.
pub fn canary_share(rules: &[Value], canary: &str) -> Option<Weight> {
    rules.iter().find_map(|rule| {
        let refs = refs(rule);
        let canary_weight = refs.iter().find(|b| b["name"] == canary).map(weight_of)?;
        let stable_weight: u64 = refs
            .iter()
            .filter(|b| b["name"] != canary)
            .map(weight_of)
            .sum();
        let total = canary_weight + stable_weight;
        let bp = (canary_weight * u64::from(Weight::FULL.basis_points()))
            .checked_div(total)
            .unwrap_or(0);
        Weight::from_basis_points(u16::try_from(bp).ok()?)
    })
}

/// The saved rules of the user's routes, by route name (kept in the rollout state).
pub type SavedRules = BTreeMap<String, Vec<Value>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec::HeaderValue;

    const B: Backends = Backends {
        namespace: "shop",
        root: "web",
        stable: "web-stable",
        canary: "web-canary",
    };

    fn w(bp: u16) -> Weight {
        Weight::from_basis_points(bp).unwrap()
    }

    /// A route with several rules, refs to other Services, filters, matches and timeouts.
    fn a_users_rules() -> Vec<Value> {
        serde_json::from_value(json!([
            {
                "name": "api",
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}, {"method": "POST", "path": {"type": "Exact", "value": "/submit"}}],
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-via", "value": "gw"}]}}],
                "backendRefs": [
                    {"name": "web", "port": 80, "weight": 3, "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-r", "value": "1"}]}}]},
                    {"name": "legacy", "port": 8080, "weight": 1},
                ],
                "timeouts": {"request": "10s"},
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                "backendRefs": [{"name": "cdn", "port": 80}],
            },
            {
                "backendRefs": [{"group": "", "kind": "Service", "name": "web", "namespace": "shop", "port": 80}],
            },
            {
                "backendRefs": [{"name": "web", "namespace": "other", "port": 80}, {"group": "example.com", "kind": "Bucket", "name": "web"}],
            },
        ]))
        .unwrap()
    }

    fn extras() -> RouteExtras {
        RouteExtras {
            header_routes: vec![(
                "beta".into(),
                vec![HeaderMatch {
                    name: "x-beta".into(),
                    value: HeaderValue::Prefix("v2.".into()),
                }],
            )],
            mirrors: vec![
                (
                    "all".into(),
                    Mirror {
                        percent: 20,
                        matches: vec![],
                    },
                ),
                (
                    "some".into(),
                    Mirror {
                        percent: 100,
                        matches: vec![HeaderMatch {
                            name: "x-shadow".into(),
                            value: HeaderValue::Exact("1".into()),
                        }],
                    },
                ),
            ],
        }
    }

    #[test]
    fn only_refs_to_the_root_service_are_split() {
        let rules =
            split_rules("r", &a_users_rules(), &B, w(500), &RouteExtras::default()).unwrap();
        let original = a_users_rules();
        assert_eq!(rules.len(), 4);
        // Rule 0: root weight 3 → 3 × 9500 and 3 × 500; the other ref scaled alike, so its share stays.
        assert_eq!(
            rules[0]["backendRefs"],
            json!([
                {"name": "web-stable", "port": 80, "weight": 28_500, "filters": original[0]["backendRefs"][0]["filters"]},
                {"name": "web-canary", "port": 80, "weight": 1_500, "filters": original[0]["backendRefs"][0]["filters"]},
                {"name": "legacy", "port": 8080, "weight": 10_000},
            ])
        );
        for key in ["name", "matches", "filters", "timeouts"] {
            assert_eq!(rules[0][key], original[0][key], "{key}");
        }
        assert_eq!(
            rules[1], original[1],
            "a rule without the root Service stays"
        );
        assert_eq!(
            rules[2]["backendRefs"],
            json!([
                {"group": "", "kind": "Service", "name": "web-stable", "namespace": "shop", "port": 80, "weight": 9500},
                {"group": "", "kind": "Service", "name": "web-canary", "namespace": "shop", "port": 80, "weight": 500},
            ])
        );
        assert_eq!(
            rules[3], original[3],
            "another namespace's web, another kind's web"
        );
        assert_eq!(canary_share(&rules[2..], "web-canary"), Some(w(500)));
    }

    #[test]
    fn weights_stay_exact_to_the_basis_point() {
        let rule = [mesh_rule("web", Some(&json!(80)))];
        for bp in [0, 1, 500, 3333, 5000, 9999, 10_000] {
            let rules = split_rules("r", &rule, &B, w(bp), &RouteExtras::default()).unwrap();
            assert_eq!(rules[0]["backendRefs"][0]["weight"], 10_000 - bp);
            assert_eq!(rules[0]["backendRefs"][1]["weight"], bp);
            assert_eq!(canary_share(&rules, "web-canary"), Some(w(bp)));
        }
        // Large user weights are divided by their common divisor, still exact…
        let big = [
            json!({"backendRefs": [{"name": "web", "weight": 200}, {"name": "x", "weight": 200}]}),
        ];
        let rules = split_rules("r", &big, &B, w(5000), &RouteExtras::default()).unwrap();
        let weights: Vec<u64> = refs(&rules[0]).iter().map(weight_of).collect();
        assert_eq!(weights, vec![1, 1, 2]);
        // …or refused when that is not enough.
        let huge = [
            json!({"backendRefs": [{"name": "web", "weight": 999_983}, {"name": "x", "weight": 1}]}),
        ];
        assert_eq!(
            split_rules("r", &huge, &B, w(1), &RouteExtras::default()),
            Err(RouteError::WeightTooLarge("r".into(), 0))
        );
    }

    #[test]
    fn header_routes_and_mirrors_are_added_to_the_rules_that_reference_the_root_service() {
        let rules = split_rules("r", &a_users_rules(), &B, w(1000), &extras()).unwrap();
        let names: Vec<&str> = rules
            .iter()
            .map(|r| r["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            vec![
                "api",
                "",
                "",
                "",
                "fledge-some-0",
                "fledge-beta-0",
                "fledge-some-2",
                "fledge-beta-2"
            ]
        );
        // The mirror of everything: a RequestMirror filter after the user's filters.
        assert_eq!(
            rules[0]["filters"][1],
            json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web-canary", "port": 80}, "percent": 20}})
        );
        assert_eq!(rules[2]["filters"][0]["requestMirror"]["percent"], 20);
        // The mirror of some: the rule narrowed by the header, split as the rule is, mirrored.
        let some = &rules[4];
        assert_eq!(some["backendRefs"], rules[0]["backendRefs"]);
        assert_eq!(
            some["matches"][0]["headers"],
            json!([{"type": "Exact", "name": "x-shadow", "value": "1"}])
        );
        assert_eq!(some["matches"][1]["method"], "POST");
        assert_eq!(some["filters"].as_array().unwrap().len(), 2);
        // The header route: the rule narrowed by the header, all to the canary.
        let beta = &rules[5];
        assert_eq!(
            beta["backendRefs"],
            json!([{"name": "web-canary", "port": 80}])
        );
        assert_eq!(
            beta["matches"][0],
            json!({"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"type": "RegularExpression", "name": "x-beta", "value": "^v2\\..*"}]})
        );
        assert_eq!(beta["timeouts"], a_users_rules()[0]["timeouts"]);
        // A rule without matches gets the default one, narrowed.
        assert_eq!(
            rules[7]["matches"][0]["path"],
            json!({"type": "PathPrefix", "value": "/"})
        );
    }

    #[test]
    fn apply_then_restore_gives_back_the_route_and_both_are_idempotent() {
        let variants: Vec<Vec<Value>> = vec![
            a_users_rules(),
            vec![mesh_rule("web", None)],
            a_users_rules().into_iter().rev().collect(),
            vec![a_users_rules()[0].clone(), a_users_rules()[0].clone()],
        ];
        let extras_variants = [RouteExtras::default(), extras()];
        for original in &variants {
            for extras in &extras_variants {
                for bp in [0, 1, 5000, 10_000] {
                    let saved = originals("r", original, None, &B).unwrap();
                    assert_eq!(&saved, original);
                    let once = split_rules("r", &saved, &B, w(bp), extras).unwrap();
                    // Doing it again (from the saved rules, as fledge always does) changes nothing…
                    let saved_again = originals("r", &once, Some(&saved), &B).unwrap();
                    assert_eq!(
                        split_rules("r", &saved_again, &B, w(bp), extras).unwrap(),
                        once
                    );
                    // …and a split route is never taken for the user's own.
                    if bp > 0 || !extras.is_empty() || once != *original {
                        assert!(matches!(
                            originals("r", &once, None, &B),
                            Err(RouteError::AlreadySplit(..))
                        ));
                    }
                    // The restore writes the saved rules: the user's route, exactly, twice alike.
                    assert_eq!(&saved_again, original);
                }
            }
        }
    }

    /// The edits a user makes to a route while a canary runs, each as a change of the rules
    /// (applied alike to the split route, as `kubectl edit` does, and to the user's own rules).
    /// A user's change of a route's rules.
    type Edit = fn(&mut Vec<Value>);

    fn edits() -> Vec<(&'static str, Edit)> {
        vec![
            ("nothing", |_| {}),
            ("a timeout", |rules| {
                rules[0]["timeouts"] = json!({"request": "30s", "backendRequest": "5s"});
            }),
            ("a filter before fledge's", |rules| {
                let mut filters = rules[0]["filters"].as_array().cloned().unwrap_or_default();
                filters.insert(
                    0,
                    json!({"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-edit", "value": "1"}]}}),
                );
                rules[0]["filters"] = Value::Array(filters);
            }),
            ("the matches", |rules| {
                rules[0]["matches"] = json!([{"path": {"type": "PathPrefix", "value": "/v2"}}]);
            }),
            ("a new rule to another Service", |rules| {
                rules.push(json!({
                    "matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}],
                    "backendRefs": [{"name": "docs", "port": 8080}],
                }));
            }),
            ("a new rule to the root Service", |rules| {
                rules.push(json!({
                    "name": "health",
                    "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
                    "backendRefs": [{"name": "web", "port": 80}],
                }));
            }),
            ("a rule named", |rules| {
                rules[0]["name"] = json!("renamed");
            }),
            // Fledge's own fields, which come back (on the user's rules these change nothing).
            ("fledge's rules deleted", |rules| {
                rules.retain(|r| !is_fledges_rule(r));
            }),
            ("fledge's mirror deleted", |rules| {
                if let Some(filters) = rules[0].get_mut("filters").and_then(Value::as_array_mut) {
                    filters.retain(|f| f["type"] != "RequestMirror");
                }
            }),
        ]
    }

    #[test]
    fn the_users_edits_mid_canary_are_kept_then_restored_and_fledges_fields_come_back() {
        let variants: Vec<Vec<Value>> = vec![
            a_users_rules(),
            vec![mesh_rule("web", Some(&json!(80)))],
            vec![a_users_rules()[0].clone(), a_users_rules()[2].clone()],
            vec![json!({"filters": [], "backendRefs": [{"name": "web", "port": 80}]})],
        ];
        let extras_variants = [RouteExtras::default(), extras()];
        for original in &variants {
            for extras in &extras_variants {
                for bp in [0, 1, 500, 5000, 10_000] {
                    for (what, edit) in edits() {
                        if original[0]["filters"] == json!([])
                            && ["a timeout", "the matches", "a rule named"].contains(&what)
                        {
                            // An empty `filters` list in a rule the user edited comes back as
                            // none, which means the same: checked alone below.
                            continue;
                        }
                        let at = format!("{what} at {bp} bp, {} rules", original.len());
                        let saved = originals("r", original, None, &B).unwrap();
                        let written = split_rules("r", &saved, &B, w(bp), extras).unwrap();
                        // The user edits the route fledge wrote…
                        let mut edited_route = written.clone();
                        edit(&mut edited_route);
                        let mut meant = original.clone();
                        edit(&mut meant);
                        // …fledge re-reads it and finds the user's rules with the edit in them…
                        let kept = originals("r", &edited_route, Some(&saved), &B).unwrap();
                        assert_eq!(kept, meant, "{at}");
                        // …and re-applies only its own fields: the same as splitting the edit.
                        let again = split_rules("r", &kept, &B, w(bp), extras).unwrap();
                        assert_eq!(
                            again,
                            split_rules("r", &meant, &B, w(bp), extras).unwrap(),
                            "{at}"
                        );
                        // Twice changes nothing: the kept rules are found again as they are.
                        assert_eq!(
                            originals("r", &again, Some(&kept), &B).unwrap(),
                            kept,
                            "{at}"
                        );
                        // The restore gives back the edited route, also from the stale snapshot,
                        // and restoring a restored route changes nothing.
                        for snapshot in [&saved, &kept] {
                            let restored = user_rules(&again, snapshot, &B);
                            assert_eq!(restored, meant, "{at}");
                            assert_eq!(user_rules(&restored, snapshot, &B), meant, "{at}");
                        }
                        // An edit straight after the restore of the stale snapshot is the user's.
                        assert_eq!(user_rules(&edited_route, &saved, &B), meant, "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_emptied_filter_list_in_an_edited_rule_comes_back_as_none() {
        let saved = vec![json!({"filters": [], "backendRefs": [{"name": "web"}]})];
        let mut split = split_rules("r", &saved, &B, w(100), &extras()).unwrap();
        assert_eq!(user_rules(&split, &saved, &B), saved, "unedited: exact");
        split[0]["timeouts"] = json!({"request": "1s"});
        assert_eq!(
            user_rules(&split, &saved, &B),
            vec![json!({"timeouts": {"request": "1s"}, "backendRefs": [{"name": "web"}]})]
        );
    }

    #[test]
    fn a_route_the_user_re_applied_mid_canary_is_theirs_and_split_again() {
        // `kubectl apply` or a GitOps sync puts the user's rules back as they are in Git: no
        // fledge fields, maybe with a change.
        let saved = a_users_rules();
        let mut reapplied = a_users_rules();
        reapplied[0]["timeouts"] = json!({"request": "20s"});
        reapplied.remove(1);
        let kept = originals("r", &reapplied, Some(&saved), &B).unwrap();
        assert_eq!(kept, reapplied);
        let split = split_rules("r", &kept, &B, w(2500), &extras()).unwrap();
        assert_eq!(canary_share(&split[1..2], "web-canary"), Some(w(2500)));
        assert_eq!(user_rules(&split, &saved, &B), reapplied);
    }

    #[test]
    fn weights_come_back_as_saved_or_in_lowest_terms_after_an_edit() {
        let saved = vec![json!({"backendRefs": [
            {"name": "web", "port": 80, "weight": 6},
            {"name": "legacy", "port": 80, "weight": 2},
            {"name": "other"},
        ]})];
        let split = split_rules("r", &saved, &B, w(1234), &RouteExtras::default()).unwrap();
        // Unchanged weights: exactly the saved ones, an absent weight stays absent.
        assert_eq!(user_rules(&split, &saved, &B), saved);
        // The user changed a weight in the split rule: theirs, in lowest terms.
        let mut edited = split.clone();
        edited[0]["backendRefs"][2]["weight"] = json!(40_000);
        assert_eq!(
            user_rules(&edited, &saved, &B)[0]["backendRefs"],
            json!([
                {"name": "web", "port": 80, "weight": 6},
                {"name": "legacy", "port": 80, "weight": 4},
                {"name": "other"},
            ])
        );
        // Without a snapshot (another route's), lowest terms too.
        assert_eq!(
            user_rules(&split, &[], &B)[0]["backendRefs"],
            json!([
                {"name": "web", "port": 80, "weight": 6},
                {"name": "legacy", "port": 80, "weight": 2},
                {"name": "other"},
            ])
        );
    }

    #[test]
    fn refs_to_the_canary_that_fledge_did_not_pair_are_the_users() {
        let saved = vec![mesh_rule("web", None)];
        let current = vec![
            json!({"backendRefs": [{"name": "web-stable", "weight": 1}, {"name": "web-canary", "weight": 1}]}),
            json!({"name": "mine", "backendRefs": [{"name": "web-canary"}]}),
            json!({"backendRefs": [{"name": "web-stable", "port": 80}, {"name": "web-canary", "port": 81}]}),
            json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}], "backendRefs": [{"name": "web"}]}),
        ];
        let kept = user_rules(&current, &saved, &B);
        assert_eq!(kept[0]["backendRefs"], json!([{"name": "web"}]), "as saved");
        assert_eq!(
            kept[1..],
            current[1..],
            "not fledge's pairs, not fledge's mirror"
        );
    }

    #[test]
    fn a_route_without_the_root_service_is_named() {
        let rules = vec![a_users_rules()[1].clone(), a_users_rules()[3].clone()];
        assert_eq!(
            originals("edge", &rules, None, &B).unwrap_err().to_string(),
            "HTTPRoute edge: no rule sends requests to the root Service web; fledge splits only backendRefs that point at it"
        );
    }

    #[test]
    fn extras_follow_the_steps() {
        let header = |name: &str, matches: Vec<HeaderMatch>| Step::SetHeaderRoute {
            name: name.into(),
            matches,
        };
        let m = vec![HeaderMatch {
            name: "x".into(),
            value: HeaderValue::Exact("1".into()),
        }];
        let steps = vec![
            Step::SetMirrorRoute {
                name: "s".into(),
                mirror: Some(Mirror {
                    percent: 5,
                    matches: vec![],
                }),
            },
            header("a", m.clone()),
            Step::SetWeight(w(100)),
            header("b", m.clone()),
            header("a", vec![]),
            Step::SetMirrorRoute {
                name: "s".into(),
                mirror: None,
            },
        ];
        assert!(RouteExtras::at(&steps, 0).is_empty());
        assert_eq!(RouteExtras::at(&steps, 1).mirrors.len(), 1);
        let at4 = RouteExtras::at(&steps, 4);
        assert_eq!(
            at4.header_routes
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        let at6 = RouteExtras::at(&steps, 6);
        assert_eq!(at6.header_routes, vec![("b".into(), m)]);
        assert!(at6.mirrors.is_empty());
    }

    #[test]
    fn the_gamma_route_splits_the_http_port_and_attaches_to_it_alone() {
        let ports = |list: Value| list.as_array().unwrap().clone();
        assert_eq!(
            mesh_port(&ports(
                json!([{"name": "grpc", "port": 9090}, {"name": "http-web", "port": 80}])
            )),
            Some(&json!(80))
        );
        assert_eq!(
            mesh_port(&ports(
                json!([{"name": "metrics", "port": 9100}, {"name": "api", "port": 8080, "appProtocol": "kubernetes.io/h2c"}])
            )),
            Some(&json!(8080))
        );
        assert_eq!(
            mesh_port(&ports(
                json!([{"name": "web", "port": 8000}, {"name": "httpx", "port": 1}])
            )),
            Some(&json!(8000)),
            "none speaks HTTP by name: the first"
        );
        assert_eq!(mesh_port(&[]), None);
        assert_eq!(
            mesh_parent("web", Some(&json!(80))),
            json!([{"group": "", "kind": "Service", "name": "web", "port": 80}])
        );
    }

    #[test]
    fn prefixes_are_escaped_into_regexes() {
        assert_eq!(regex_escape("a.b*c(d)"), "a\\.b\\*c\\(d\\)");
    }
}
