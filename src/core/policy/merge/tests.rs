use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::core::policy::tests::mk_policy;
use crate::core::policy::{GuardRails, PromotionWindow, RouterName, Weekday};
use crate::core::spec::{ANNOTATION_ROOT_SERVICE, Router};

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn w(percent: &str) -> Weight {
    Weight::parse_percent(percent).unwrap()
}

/// `RolloutPolicy shop/defaults`: 5 → 25 → 50 with pauses, an error-rate check it requires, the
/// mesh router, guard-rails and office-hours windows.
fn defaults() -> Policy {
    let mut p = mk_policy("shop", "defaults", 10, "web");
    p.rules.steps = Some(vec![
        json!({"setWeight": 5}),
        json!({"pause": {"duration": "5m"}}),
        json!({"setWeight": 25}),
        json!({"pause": {"duration": "5m"}}),
        json!({"setWeight": 50}),
        json!({"analysis": {"checks": ["error-rate"]}}),
    ]);
    p.rules.analysis = Some(vec![
        json!({"name": "error-rate", "interval": "1m", "count": 3,
               "successCondition": "result < 0.01",
               "web": {"url": "http://metrics/{{namespace}}/{{deployment}}"}}),
        json!({"name": "latency", "interval": "1m",
               "successCondition": "result < 0.3",
               "web": {"url": "http://metrics/latency"}}),
    ]);
    p.rules.router = Some(RouterName::GatewayApi);
    p.rules.progress_deadline_seconds = Some(300);
    p.rules.guard_rails = Some(GuardRails {
        max_step_weight: Some(25),
        min_pause: Some("1m".into()),
        required_checks: Some(vec!["error-rate".into()]),
        allowed_routers: Some(vec![RouterName::Smi, RouterName::GatewayApi]),
    });
    p.rules.promotion_windows = Some(vec![PromotionWindow {
        days: vec![Weekday::Mon, Weekday::Fri],
        start: "09:00".into(),
        end: "16:00".into(),
        time_zone: "Europe/Berlin".into(),
    }]);
    p
}

fn problems(annotations: &BTreeMap<String, String>, policy: &Policy) -> Vec<String> {
    resolve("web", annotations, Some(policy))
        .unwrap_err()
        .problems
}

#[test]
fn the_policy_fills_in_what_the_deployment_leaves_out() {
    let policy = defaults();
    assert!(
        policy_problems(&policy).is_empty(),
        "{:?}",
        policy_problems(&policy)
    );
    let spec = resolve("web", &BTreeMap::new(), Some(&policy)).unwrap();
    assert_eq!(spec.steps.len(), 6);
    assert_eq!(spec.steps[0], Step::SetWeight(w("5")));
    assert_eq!(
        spec.router,
        Router::GatewayApi {
            http_routes: vec![]
        }
    );
    let names: Vec<&str> = spec.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["error-rate", "latency"]);
    assert_eq!(
        spec.policy.as_ref().unwrap().to_string(),
        "RolloutPolicy shop/defaults"
    );
    assert_eq!(spec.progress_deadline, Some(Duration::from_secs(300)));
    assert!(!spec.windows.is_empty());
    assert_eq!(spec.root_service, "web");
}

#[test]
fn the_deployments_own_annotations_override_the_defaults() {
    let own = annotations(&[
        (
            ANNOTATION_STEPS,
            "- setWeight: 20\n- pause: {duration: 2m}\n- setWeight: 40\n",
        ),
        (ANNOTATION_ROUTER, "smi"),
        (ANNOTATION_ROOT_SERVICE, "web-public"),
    ]);
    let spec = resolve("web", &own, Some(&defaults())).unwrap();
    assert_eq!(spec.steps.len(), 3);
    assert_eq!(spec.router, Router::Smi);
    assert_eq!(spec.root_service, "web-public");
    // No analysis of its own: the policy's checks, as background checks of the new steps.
    let names: Vec<&str> = spec.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["error-rate", "latency"]);
}

#[test]
fn required_checks_run_whatever_the_deployment_says() {
    let own = annotations(&[(
        ANNOTATION_ANALYSIS,
        "- name: smoke\n  interval: 30s\n  successCondition: result == 1\n  web: {url: http://smoke}\n",
    )]);
    let spec = resolve("web", &own, Some(&defaults())).unwrap();
    let names: Vec<&str> = spec.checks.iter().map(|c| c.name.as_str()).collect();
    // Its own check replaces the policy's optional one; the required one is added.
    assert_eq!(names, ["smoke", "error-rate"]);

    let redefined = annotations(&[(
        ANNOTATION_ANALYSIS,
        "- name: error-rate\n  dryRun: true\n  interval: 1m\n  successCondition: 'true'\n  web: {url: http://x}\n",
    )]);
    assert_eq!(
        problems(&redefined, &defaults())[0],
        "fledge.dev/analysis[0].name: \"error-rate\" is a required check of RolloutPolicy shop/defaults, which runs as the policy defines it; give yours another name"
    );
}

#[test]
fn a_jump_over_max_step_weight_is_refused_with_its_place() {
    let own = annotations(&[(
        ANNOTATION_STEPS,
        "- setWeight: 5\n- pause: {duration: 5m}\n- setWeight: 80\n",
    )]);
    assert_eq!(
        problems(&own, &defaults()),
        [
            "fledge.dev/steps[2].setWeight: a jump from 5 to 80 exceeds maxStepWeight 25 of RolloutPolicy shop/defaults; add steps in between"
        ]
    );
    // The first step counts from 0; going down never counts.
    let first = annotations(&[(
        ANNOTATION_STEPS,
        "- setWeight: 30\n- pause: {}\n- setWeight: 10\n",
    )]);
    assert_eq!(problems(&first, &defaults()).len(), 1);
    assert!(
        problems(&first, &defaults())[0]
            .starts_with("fledge.dev/steps[0].setWeight: a jump from 0 to 30")
    );
}

#[test]
fn weight_steps_need_min_pause_between_them() {
    let short = annotations(&[(
        ANNOTATION_STEPS,
        "- setWeight: 5\n- pause: {duration: 30s}\n- pause: {duration: 20s}\n- setWeight: 10\n- pause: {}\n- setWeight: 20\n",
    )]);
    assert_eq!(
        problems(&short, &defaults()),
        [
            "fledge.dev/steps[3].setWeight: 50s of pause since fledge.dev/steps[0] is less than minPause 1m of RolloutPolicy shop/defaults; add a pause such as `- pause: {duration: 1m}` before it"
        ]
    );
    let enough = annotations(&[(
        ANNOTATION_STEPS,
        "- setWeight: 5\n- pause: {duration: 30s}\n- pause: {duration: 30s}\n- setWeight: 10\n",
    )]);
    assert!(resolve("web", &enough, Some(&defaults())).is_ok());
}

#[test]
fn only_allowed_routers() {
    let own = annotations(&[(ANNOTATION_ROUTER, "pod-ratio")]);
    assert_eq!(
        problems(&own, &defaults()),
        [
            "fledge.dev/router: the router pod-ratio is not one of allowedRouters smi, gateway-api of RolloutPolicy shop/defaults"
        ]
    );
}

#[test]
fn a_deployment_that_picks_its_router_does_not_inherit_routes() {
    let mut policy = defaults();
    policy.rules.http_routes = Some(vec!["public".into()]);
    let inherited = resolve("web", &BTreeMap::new(), Some(&policy)).unwrap();
    assert_eq!(
        inherited.router,
        Router::GatewayApi {
            http_routes: vec!["public".into()]
        }
    );
    let smi = resolve(
        "web",
        &annotations(&[(ANNOTATION_ROUTER, "smi")]),
        Some(&policy),
    )
    .unwrap();
    assert_eq!(smi.router, Router::Smi);
}

#[test]
fn a_broken_policy_is_named_with_the_place_in_its_spec() {
    let mut policy = defaults();
    policy.rules.steps.as_mut().unwrap()[1] = json!({"pause": {"duration": "soon"}});
    policy.rules.promotion_windows.as_mut().unwrap()[0].time_zone = "Mars/Olympus".into();
    let found = policy_problems(&policy);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("spec.promotionWindows[0].timeZone: \"Mars/Olympus\""),
        "{found:?}"
    );
    assert!(
        found[1].starts_with("spec.steps[1].pause.duration: "),
        "{found:?}"
    );
    let denied = problems(&BTreeMap::new(), &policy);
    assert!(
        denied[0].starts_with("RolloutPolicy shop/defaults is invalid: spec.promotionWindows[0]"),
        "{denied:?}"
    );
}

#[test]
fn a_policys_own_steps_must_keep_its_guard_rails() {
    let mut policy = defaults();
    policy.rules.steps = Some(vec![
        json!({"setWeight": 5}),
        json!({"pause": {}}),
        json!({"setWeight": 80}),
    ]);
    assert_eq!(
        policy_problems(&policy),
        [
            "fledge.dev/steps[2].setWeight: a jump from 5 to 80 exceeds maxStepWeight 25 of RolloutPolicy shop/defaults; add steps in between"
        ]
    );
}

#[test]
fn a_policy_without_steps_still_has_its_checks_read() {
    let mut policy = defaults();
    policy.rules.steps = None;
    policy.rules.guard_rails = None;
    assert!(
        policy_problems(&policy).is_empty(),
        "{:?}",
        policy_problems(&policy)
    );
    policy.rules.analysis.as_mut().unwrap()[1] =
        json!({"name": "latency", "web": {"url": "http://x"}});
    let found = policy_problems(&policy);
    assert!(
        found.iter().any(|p| p.starts_with("spec.analysis[1]")),
        "{found:?}"
    );
    // And a Deployment without steps under a policy without steps has none.
    assert!(resolve("web", &BTreeMap::new(), Some(&defaults_without_steps())).is_err());
}

fn defaults_without_steps() -> Policy {
    let mut p = defaults();
    p.rules.steps = None;
    p
}

#[test]
fn without_a_policy_the_annotations_stand_alone() {
    let own = annotations(&[(ANNOTATION_STEPS, "- setWeight: 90\n")]);
    let spec = resolve("web", &own, None).unwrap();
    assert_eq!(spec.policy, None);
    assert!(spec.windows.is_empty());
}
