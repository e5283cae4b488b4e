//! Selection, exhaustively over small worlds: a namespaced and a cluster policy, each with a
//! priority, a selector that matches or not, and the Deployment naming one, the other, or none.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::json;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

/// `RolloutPolicy NS/NAME` with `priority` selecting `app=SELECTS`.
pub fn mk_policy(namespace: &str, name: &str, priority: i32, selects: &str) -> Policy {
    Policy {
        id: PolicyId {
            kind: PolicyKind::RolloutPolicy,
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        },
        generation: 1,
        namespace_selector: None,
        rules: PolicyRules {
            selector: Some(selector(&[("app", selects)])),
            priority,
            steps: Some(vec![json!({"setWeight": 20}), json!({"pause": {}})]),
            ..PolicyRules::default()
        },
    }
}

/// `ClusterRolloutPolicy NAME` for namespaces labelled `team=TEAM`.
pub fn mk_cluster_policy(name: &str, priority: i32, team: &str) -> Policy {
    Policy {
        id: PolicyId {
            kind: PolicyKind::ClusterRolloutPolicy,
            namespace: None,
            name: name.to_owned(),
        },
        namespace_selector: Some(selector(&[("team", team)])),
        ..mk_policy("", name, priority, "web")
    }
}

fn world(policies: Vec<Policy>) -> PolicySnapshot {
    PolicySnapshot {
        policies,
        namespaces: BTreeMap::from([
            ("shop".to_owned(), labels(&[("team", "a")])),
            ("other".to_owned(), labels(&[("team", "b")])),
        ]),
    }
}

fn chosen(
    snapshot: &PolicySnapshot,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<String>, SelectionError> {
    snapshot
        .select("shop", &labels(&[("app", "web")]), annotations)
        .map(|p| p.map(|p| p.id.to_string()))
}

#[test]
fn every_small_world_picks_as_the_rules_say() {
    let priorities = [0, 10];
    // What each policy's selector aims at: this Deployment or another app.
    let aims = ["web", "cart"];
    let names = [None, Some("local"), Some("global"), Some("absent")];
    let mut worlds = 0;
    for np in priorities {
        for cp in priorities {
            for n_aim in aims {
                for c_team in ["a", "b"] {
                    for named in names {
                        worlds += 1;
                        let local = mk_policy("shop", "local", np, n_aim);
                        let global = mk_cluster_policy("global", cp, c_team);
                        let snapshot = world(vec![global.clone(), local.clone()]);
                        let annotations = match named {
                            Some(n) => labels(&[(ANNOTATION_POLICY, n)]),
                            None => BTreeMap::new(),
                        };
                        let local_in = n_aim == "web";
                        let global_in = c_team == "a";
                        let expected: Result<Option<&str>, &str> = match named {
                            Some("absent") => Err("missing"),
                            Some("local") if local_in => Ok(Some("RolloutPolicy shop/local")),
                            Some("global") if global_in => Ok(Some("ClusterRolloutPolicy global")),
                            Some(_) => Err("not selected"),
                            None => match (local_in, global_in) {
                                (false, false) => Ok(None),
                                (true, false) => Ok(Some("RolloutPolicy shop/local")),
                                (false, true) => Ok(Some("ClusterRolloutPolicy global")),
                                (true, true) if np > cp => Ok(Some("RolloutPolicy shop/local")),
                                (true, true) if cp > np => Ok(Some("ClusterRolloutPolicy global")),
                                (true, true) => Err("tie"),
                            },
                        };
                        let got = chosen(&snapshot, &annotations);
                        let case = format!(
                            "local {np} {n_aim}, global {cp} team={c_team}, named {named:?}: {got:?}"
                        );
                        match (expected, &got) {
                            (Ok(want), Ok(have)) => assert_eq!(want, have.as_deref(), "{case}"),
                            (Err("missing"), Err(SelectionError::Missing { name, .. })) => {
                                assert_eq!(name, "absent", "{case}")
                            }
                            (Err("not selected"), Err(SelectionError::NotSelected { .. })) => {}
                            (Err("tie"), Err(SelectionError::Tie { priority, .. })) => {
                                assert_eq!(*priority, np, "{case}")
                            }
                            _ => panic!("{case}"),
                        }
                    }
                }
            }
        }
    }
    assert_eq!(worlds, 64);
}

#[test]
fn a_named_policy_is_looked_up_namespaced_first_then_cluster() {
    let local = mk_policy("shop", "defaults", 0, "web");
    let global = mk_cluster_policy("defaults", 100, "a");
    let elsewhere = mk_policy("other", "team-b", 0, "web");
    let snapshot = world(vec![global, elsewhere, local]);
    let named = |n: &str| chosen(&snapshot, &labels(&[(ANNOTATION_POLICY, n)]));
    assert_eq!(
        named("defaults").unwrap().as_deref(),
        Some("RolloutPolicy shop/defaults")
    );
    // Another namespace's policy is not this Deployment's to pick.
    assert_eq!(
        named("team-b").unwrap_err().to_string(),
        "fledge.dev/policy: no RolloutPolicy \"team-b\" in namespace \"shop\" and no ClusterRolloutPolicy \"team-b\"; create it or remove the annotation"
    );
}

#[test]
fn a_tie_names_both_policies() {
    let snapshot = world(vec![
        mk_policy("shop", "b", 5, "web"),
        mk_policy("shop", "a", 5, "web"),
        mk_policy("shop", "low", 1, "web"),
    ]);
    assert_eq!(
        chosen(&snapshot, &BTreeMap::new()).unwrap_err().to_string(),
        "RolloutPolicy shop/a and RolloutPolicy shop/b both select this Deployment with priority 5; give one a higher priority, or name one in fledge.dev/policy"
    );
}

#[test]
fn selectors_cover_expressions_and_unknown_namespaces() {
    let mut p = mk_cluster_policy("all", 0, "a");
    p.namespace_selector = None;
    p.rules.selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["db".into()]),
            },
        ]),
    });
    let snapshot = world(vec![p]);
    assert!(
        snapshot
            .select("nowhere", &labels(&[("tier", "web")]), &BTreeMap::new())
            .unwrap()
            .is_some()
    );
    assert!(
        snapshot
            .select("nowhere", &labels(&[("tier", "db")]), &BTreeMap::new())
            .unwrap()
            .is_none()
    );
    // A selector fledge cannot read selects nothing.
    let mut broken = mk_policy("shop", "broken", 0, "web");
    broken.rules.selector.as_mut().unwrap().match_expressions = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
            key: "app".into(),
            operator: "Near".into(),
            values: None,
        },
    ]);
    assert_eq!(
        chosen(&world(vec![broken]), &BTreeMap::new()).unwrap(),
        None
    );
}

#[test]
fn namespace_opt_in_reads_the_namespace_label() {
    let mut snapshot = world(Vec::new());
    assert!(!snapshot.namespace_opted_in("shop"));
    snapshot.namespaces.insert(
        "shop".into(),
        labels(&[(crate::core::spec::LABEL_ENABLED, "true")]),
    );
    assert!(snapshot.namespace_opted_in("shop"));
    assert!(!snapshot.namespace_opted_in("unknown"));
}

#[test]
fn manifests_give_policies_and_namespaces() {
    let objects = [
        json!({"apiVersion": "fledge.dev/v1alpha1", "kind": "RolloutPolicy",
               "metadata": {"name": "defaults"},
               "spec": {"priority": 3, "steps": [{"setWeight": 10}]}}),
        json!({"apiVersion": "fledge.dev/v1alpha1", "kind": "ClusterRolloutPolicy",
               "metadata": {"name": "strict"},
               "spec": {"namespaceSelector": {"matchLabels": {"team": "a"}}}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}),
    ];
    let snapshot = PolicySnapshot::from_objects(&objects).unwrap();
    let ids: Vec<String> = snapshot.policies.iter().map(|p| p.id.to_string()).collect();
    assert_eq!(
        ids,
        [
            "RolloutPolicy default/defaults",
            "ClusterRolloutPolicy strict"
        ]
    );
    assert_eq!(snapshot.policies[0].rules.priority, 3);
    assert_eq!(snapshot.namespace_labels("shop"), &labels(&[("team", "a")]));
    let bad =
        [json!({"kind": "RolloutPolicy", "metadata": {"name": "x"}, "spec": {"priority": "high"}})];
    assert!(
        PolicySnapshot::from_objects(&bad)
            .unwrap_err()
            .starts_with("RolloutPolicy x: ")
    );
}

#[test]
fn the_crds_are_the_ones_in_the_chart() {
    let generated = crds_yaml().unwrap();
    let kept = include_str!("../../../charts/fledge/crds/policies.yaml");
    assert!(
        generated == kept,
        "charts/fledge/crds/policies.yaml is stale: run `cargo run -- crds > charts/fledge/crds/policies.yaml`"
    );
    // Each CRD must stay well under the 256 KiB that client-side `kubectl apply` can annotate.
    for doc in generated.split("\n---\n") {
        assert!(doc.len() < 64 * 1024, "{} bytes", doc.len());
    }
}
