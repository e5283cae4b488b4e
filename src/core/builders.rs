//! Small builders shared by the unit tests: Deployment `shop/web` in the shapes the API server
//! sends it, as JSON. One place, so that every test speaks of the same object.

use serde_json::{Value, json};

use crate::core::rollout::{Phase, RolloutState};
use crate::core::spec::{
    ANNOTATION_HOLD, ANNOTATION_STABLE_HASH, ANNOTATION_STATE, ANNOTATION_STEPS, LABEL_ENABLED,
    Weight,
};
use crate::core::template;

/// The brief's steps: 5 %, 2 minutes, 50 %, wait for promote.
pub const STEPS: &str = "- setWeight: 5\n- pause: {duration: 2m}\n- setWeight: 50\n- pause: {}\n";

/// The pod template running `image`, as the API server returns it (`creationTimestamp: null`).
pub fn mk_template(image: &str) -> Value {
    json!({
        "metadata": {"creationTimestamp": null, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}]}]}
    })
}

/// The identity of [`mk_template`]`(image)`.
pub fn mk_hash(image: &str) -> String {
    template::hash(&mk_template(image))
}

/// Deployment `shop/web`, opted in with [`STEPS`], 4 replicas, its template running `image`.
pub fn mk_deployment(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "6b1c7a0e-0d6c-4d59-9b0e-2b0c7f8a4e11",
            "resourceVersion": "1200",
            "generation": 3,
            "labels": {"app": "web", LABEL_ENABLED: "true"},
            "annotations": {ANNOTATION_STEPS: STEPS},
        },
        "spec": {
            "replicas": 4,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": {"app": "web"}},
            "template": mk_template(image),
        }
    })
}

pub fn with_annotation(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["annotations"][key] = json!(value);
    object
}

/// `web` as the webhook stores it after `image` was applied over `stable`: held by fledge.
pub fn mk_held(stable: &str, image: &str) -> Value {
    let mut d = with_annotation(mk_deployment(image), ANNOTATION_HOLD, "true");
    d["spec"]["paused"] = json!(true);
    with_annotation(d, ANNOTATION_STABLE_HASH, &mk_hash(stable))
}

/// A stored state in `phase` at `step` with `weight`, about the template `hash`.
pub fn mk_state(phase: Phase, hash: &str, step: usize, weight: Weight) -> RolloutState {
    RolloutState {
        phase,
        hash: hash.into(),
        step,
        weight,
        message: String::new(),
        step_started: None,
        unavailable_since: None,
        saved_routes: Default::default(),
        checks: Default::default(),
        policy: None,
    }
}

/// `object` with `state` stored in `fledge.dev/state`.
pub fn with_state(object: Value, state: &RolloutState) -> Value {
    let text = serde_json::to_string(state).unwrap_or_default();
    with_annotation(object, ANNOTATION_STATE, &text)
}

/// A web check `name` measuring every 10 s, `count` times (`None`: unbounded), passing when
/// `result < 0.01`; the machine and schedule tests judge it with [`mk_judged`].
pub fn mk_check(name: &str, count: Option<u32>) -> crate::core::analysis::Check {
    use crate::core::analysis::{Check, NoData, Provider, WebRequest};
    use std::time::Duration;
    Check {
        name: name.to_owned(),
        interval: Duration::from_secs(10),
        count,
        initial_delay: Duration::ZERO,
        success_condition: crate::core::analysis::Condition::compile("result < 0.01").ok(),
        failure_condition: None,
        failure_limit: 0,
        inconclusive_limit: 0,
        consecutive_error_limit: 4,
        no_data: NoData::Inconclusive,
        dry_run: false,
        starting_step: None,
        provider: Provider::Web(WebRequest {
            url: "http://checks.shop/{{canaryService}}".into(),
            method: "GET".into(),
            headers: Vec::new(),
            body: None,
            json_path: None,
            timeout: Duration::from_secs(5),
        }),
    }
}

/// A judgement of `outcome` on `value`.
pub fn mk_judged(
    outcome: crate::core::analysis::Outcome,
    value: &str,
) -> crate::core::analysis::condition::Judgement {
    use crate::core::analysis::Outcome;
    crate::core::analysis::condition::Judgement {
        outcome,
        value: value.to_owned(),
        detail: match outcome {
            Outcome::Failed => format!("{value} is not \"result < 0.01\""),
            Outcome::Successful | Outcome::Inconclusive | Outcome::Error => String::new(),
        },
    }
}

/// What the controller reads off `deployment`, without policies or opted-in namespaces.
pub fn mk_facts(deployment: &Value) -> crate::core::observe::DeploymentFacts {
    crate::core::observe::DeploymentFacts::read(
        deployment,
        &crate::core::policy::PolicySnapshot::default(),
    )
}
