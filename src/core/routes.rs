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
//! The rules are computed from the saved rules alone, never from what fledge wrote before: applying
//! twice is applying once, and a restore is exact.

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

/// The rules to keep for `route` when fledge first touches it: `saved` when fledge saved them
/// before, else the route's own rules, which must reference the root Service and must not carry
/// fledge's changes already (those would be saved as the user's).
pub fn originals(
    route: &str,
    current: &[Value],
    saved: Option<&[Value]>,
    backends: &Backends,
) -> Result<Vec<Value>, RouteError> {
    if let Some(saved) = saved {
        return Ok(saved.to_vec());
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

/// The GAMMA parentRef: the root Service itself (group "", kind Service).
pub fn mesh_parent(root: &str) -> Value {
    json!([{"group": "", "kind": "Service", "name": root}])
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
    fn user_rules() -> Vec<Value> {
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
        let rules = split_rules("r", &user_rules(), &B, w(500), &RouteExtras::default()).unwrap();
        let original = user_rules();
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
        let rules = split_rules("r", &user_rules(), &B, w(1000), &extras()).unwrap();
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
        assert_eq!(beta["timeouts"], user_rules()[0]["timeouts"]);
        // A rule without matches gets the default one, narrowed.
        assert_eq!(
            rules[7]["matches"][0]["path"],
            json!({"type": "PathPrefix", "value": "/"})
        );
    }

    #[test]
    fn apply_then_restore_gives_back_the_route_and_both_are_idempotent() {
        let variants: Vec<Vec<Value>> = vec![
            user_rules(),
            vec![mesh_rule("web", None)],
            user_rules().into_iter().rev().collect(),
            vec![user_rules()[0].clone(), user_rules()[0].clone()],
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

    #[test]
    fn a_route_without_the_root_service_is_named() {
        let rules = vec![user_rules()[1].clone(), user_rules()[3].clone()];
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
    fn prefixes_are_escaped_into_regexes() {
        assert_eq!(regex_escape("a.b*c(d)"), "a\\.b\\*c\\(d\\)");
    }
}
