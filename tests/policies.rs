//! Rollout policies end to end through the API server stand-in with fledge's CRDs installed (their
//! schemas and CEL rules enforced): a namespace opt-in rolled out with the policy's steps, a
//! Deployment's own steps, a guard-rail denial at apply time, a promotion window opened by moving
//! fledge's clock, a policy edited and then deleted mid-canary, bad policies refused by the API
//! server, and CRDs installed while fledge runs.
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use fledge::core::rollout::Phase;
use fledge::core::template;
use fledge::runtime::clock::Clock;
use fledge::runtime::controller;
use fledge::runtime::policies::PolicyWatch;
use fledge::runtime::server::AppState;
use support::apiserver::{ApiServer, ApiServerConfig};
use support::e2e::*;

const POLICIES: &str = "fledge.dev/v1alpha1/rolloutpolicies";
const CLUSTER_POLICIES: &str = "fledge.dev/v1alpha1/clusterrolloutpolicies";

fn policy_crds() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/fledge/crds/policies.yaml"
    ))
    .expect("charts/fledge/crds/policies.yaml")
}

/// The stand-in with fledge's webhook (both entries of the chart: the label, and the namespace
/// opt-in) and controller, deciding with policies watched from the stand-in, on `clock`.
struct PolicyCluster {
    api: ApiServer,
    watch: PolicyWatch,
    _webhook: support::webhook::FledgeWebhook,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for PolicyCluster {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

async fn policy_cluster(crds: bool, clock: Clock) -> PolicyCluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("fledge=debug"))
        .with_test_writer()
        .try_init();
    let api = ApiServer::start(ApiServerConfig {
        namespaces: vec![NS.into()],
        extra_crds: if crds {
            vec![policy_crds()]
        } else {
            Vec::new()
        },
        ..ApiServerConfig::default()
    })
    .await;
    // As `fledge serve`: one watch that the webhook and the controller share.
    let watch = PolicyWatch::spawn(api.client(), None);
    let webhook = support::webhook::start_with(AppState {
        policies: watch.clone(),
        ..AppState::default()
    });
    // Both entries of the chart: the label's, and the namespace opt-in's.
    api.set_webhooks(webhook.entries.clone());
    let controller = tokio::spawn(controller::run(
        api.client(),
        controller::ControllerConfig {
            namespace: Some(NS.into()),
            split_api: fledge::core::objects::SplitApi::V1Alpha2,
            metrics: controller::ControllerMetrics::default(),
            prometheus_address: None,
            policies: watch.clone(),
            clock,
        },
        std::future::pending(),
    ));
    tokio::time::timeout(WAIT, watch.wait_synced())
        .await
        .expect("the policy watches sync");
    PolicyCluster {
        api,
        watch,
        _webhook: webhook,
        controller,
    }
}

async fn label_namespace(api: &ApiServer, labels: Value) {
    Api::<Namespace>::all(api.client())
        .patch(
            NS,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap();
}

/// `RolloutPolicy shop/defaults` for `app=web`, with `spec` merged over 20 → 40 and guard-rails.
fn defaults(extra: Value) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": "web"}},
        "priority": 10,
        "steps": [{"setWeight": 20}, {"setWeight": 40}],
        "guardRails": {"maxStepWeight": 25},
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "fledge.dev/v1alpha1", "kind": "RolloutPolicy",
        "metadata": {"name": "defaults", "namespace": NS},
        "spec": spec,
    })
}

async fn put_policy(c: &PolicyCluster, policy: Value) {
    let api: Api<DynamicObject> = Api::namespaced_with(
        c.api.client(),
        NS,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "fledge.dev",
            "v1alpha1",
            "RolloutPolicy",
        )),
    );
    let name = policy["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(&policy),
    )
    .await
    .unwrap();
    // Wait until fledge's snapshot holds this generation.
    let generation = c.api.get(POLICIES, NS, &name).unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();
    wait_until(|| {
        c.watch
            .snapshot()
            .policies
            .iter()
            .any(|p| p.id.name == name && p.generation == generation)
    })
    .await;
}

async fn wait_until(mut check: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("in time");
}

/// `web` v1 without any fledge label or annotation: the namespace opts it in.
fn plain(image: &str) -> Value {
    let mut d = deployment(image, "");
    let meta = d["metadata"].as_object_mut().unwrap();
    meta.remove("annotations");
    meta["labels"] = json!({"app": "web"});
    d
}

async fn stable(c: &PolicyCluster, d: Value) {
    apply(&c.api, root_service()).await;
    apply(&c.api, d).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4 && d["spec"]["paused"] != true)
        })
        .await
        .unwrap();
}

/// Waits until the canary of `image` (its own state, not the last one's) settled at `phase`.
async fn settled(c: &PolicyCluster, image: &str, wanted: Phase) -> Value {
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| {
                support::e2e::image(d) == image
                    && state(Some(d)).is_some_and(|s| {
                        s.phase == wanted
                            && template::of_deployment(d).map(template::hash) == Some(s.hash)
                    })
            })
        })
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_opt_in_rolls_out_with_the_policys_steps_and_a_deployment_overrides_them() {
    let c = policy_cluster(true, Clock::system()).await;
    label_namespace(&c.api, json!({"fledge.dev/enabled": "true"})).await;
    put_policy(&c, defaults(json!({}))).await;
    stable(&c, plain("web:1")).await;

    apply(&c.api, plain("web:2")).await;
    let done = settled(&c, "web:2", Phase::Succeeded).await;
    assert_eq!(split_weights(&c.api), vec![0, 2000, 4000, 10000, 0]);
    assert!(
        done["metadata"]["labels"]
            .get("fledge.dev/enabled")
            .is_none()
    );
    // The webhook's second entry held it: the call went to namespaces.deployments.fledge.dev.
    assert!(
        c.api
            .webhook_calls()
            .iter()
            .any(|call| call.webhook == "namespaces.deployments.fledge.dev")
    );
    // The status names the policy, and the policy counts the Deployment.
    let status: Value =
        serde_json::from_str(&fledge(&c.api, &["status", "web", "-o", "json"]).await).unwrap();
    assert_eq!(status["policy"], "RolloutPolicy shop/defaults");
    let listed = fledge(&c.api, &["policies"]).await;
    assert!(
        listed.contains("RolloutPolicy shop/defaults") && listed.contains("shop/web"),
        "{listed}"
    );
    c.api
        .wait_for(POLICIES, NS, "defaults", WAIT, |p| {
            p.is_some_and(|p| {
                p["status"]["deployments"] == 1
                    && p["status"]["observedGeneration"] == p["metadata"]["generation"]
                    && p["status"]["conditions"][0]["type"] == "Ready"
                    && p["status"]["conditions"][0]["status"] == "True"
            })
        })
        .await
        .unwrap();

    // The Deployment's own steps override the policy's defaults (within its guard-rails).
    let mut own = plain("web:3");
    own["metadata"]["annotations"] =
        json!({"fledge.dev/steps": "- setWeight: 10\n- setWeight: 30\n"});
    apply(&c.api, own).await;
    settled(&c, "web:3", Phase::Succeeded).await;
    assert_eq!(
        split_weights(&c.api),
        vec![0, 2000, 4000, 10000, 0, 1000, 3000, 10000, 0]
    );

    // `fledge.dev/enabled: "false"` opts it out of the namespace: v4 rolls out plainly.
    let mut out = plain("web:4");
    out["metadata"]["labels"]["fledge.dev/enabled"] = json!("false");
    apply(&c.api, out).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| {
                d["spec"]["paused"] != true && running_images(&c.api) == vec!["web:4".to_owned()]
            })
        })
        .await
        .unwrap();
}

/// Why the API server refuses to apply `deployment` (as `kubectl apply --server-side` would).
async fn refused_apply(c: &PolicyCluster, deployment: &Value) -> String {
    Api::<DynamicObject>::namespaced_with(
        c.api.client(),
        NS,
        &kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
    )
    .patch(
        "web",
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(deployment),
    )
    .await
    .unwrap_err()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_rail_denies_the_apply_and_names_the_step_and_the_policy() {
    let c = policy_cluster(true, Clock::system()).await;
    put_policy(&c, defaults(json!({}))).await;
    let mut d = deployment(
        "web:1",
        "- setWeight: 5\n- pause: {duration: 5m}\n- setWeight: 80\n",
    );
    d["metadata"]["labels"]["fledge.dev/enabled"] = json!("true");
    let err = refused_apply(&c, &d).await;
    assert!(
        err.contains("fledge.dev/steps[2].setWeight: a jump from 5 to 80 exceeds maxStepWeight 25 of RolloutPolicy shop/defaults"),
        "{err}"
    );
    // A reference to a policy that does not exist is denied too.
    let mut missing = deployment("web:1", "- setWeight: 5\n");
    missing["metadata"]["annotations"]["fledge.dev/policy"] = json!("strict");
    let err = refused_apply(&c, &missing).await;
    assert!(
        err.contains("fledge.dev/policy: no RolloutPolicy \"strict\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_window_holds_the_canary_until_fledges_clock_reaches_it() {
    // Saturday 2026-12-05 12:00 in Berlin; the window opens Monday 09:00 CET.
    let saturday: Timestamp = "2026-12-05T11:00:00Z".parse().unwrap();
    let clock = Clock::manual(saturday);
    let c = policy_cluster(true, clock.clone()).await;
    put_policy(
        &c,
        defaults(
            json!({"promotionWindows": [{"days": ["Mon", "Tue", "Wed", "Thu", "Fri"],
            "start": "09:00", "end": "16:00", "timeZone": "Europe/Berlin"}]}),
        ),
    )
    .await;
    let mut d = plain("web:1");
    d["metadata"]["labels"]["fledge.dev/enabled"] = json!("true");
    stable(&c, d.clone()).await;
    d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
    apply(&c.api, d).await;
    let waiting = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.message.contains("promotion windows"))
        })
        .await
        .unwrap();
    let s = state(waiting.as_ref()).unwrap();
    assert_eq!(
        (s.phase, s.step, s.weight.to_string().as_str()),
        (Phase::Paused, 0, "0")
    );
    assert_eq!(
        s.message,
        "step 1/2: 20% of traffic waits for the promotion windows of RolloutPolicy shop/defaults; the next opens Mon 2026-12-07 09:00 CET (Europe/Berlin)"
    );
    wait_until(|| events_with_reason(&c.api, "OutsidePromotionWindow") == 1).await;
    // Sunday evening: still closed, nothing moves.
    clock.set("2026-12-06T20:00:00Z".parse().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(split_weights(&c.api), vec![0]);
    // Monday 09:00 Berlin: the window opens and the canary goes all the way.
    clock.set("2026-12-07T08:00:00Z".parse().unwrap());
    settled(&c, "web:2", Phase::Succeeded).await;
    assert_eq!(split_weights(&c.api), vec![0, 2000, 4000, 10000, 0]);
    // The wait was announced once, however often the canary was looked at.
    assert_eq!(events_with_reason(&c.api, "OutsidePromotionWindow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edited_mid_canary_applies_to_the_next_canary_and_a_deleted_one_holds() {
    let c = policy_cluster(true, Clock::system()).await;
    put_policy(
        &c,
        defaults(json!({"steps": [{"setWeight": 20}, {"pause": {}}]})),
    )
    .await;
    let mut d = plain("web:1");
    d["metadata"]["labels"]["fledge.dev/enabled"] = json!("true");
    stable(&c, d.clone()).await;
    d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
    apply(&c.api, d.clone()).await;
    wait_phase(&c.api, Phase::Paused).await;

    // Edited mid-canary: this canary keeps 20 % and its two steps.
    put_policy(
        &c,
        defaults(json!({"steps": [{"setWeight": 25}, {"setWeight": 50}, {"pause": {}}]})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref()).unwrap();
    assert_eq!(
        (s.phase, s.step, s.weight.to_string().as_str()),
        (Phase::Paused, 1, "20")
    );
    assert_eq!(
        s.policy
            .as_ref()
            .unwrap()
            .rules
            .steps
            .as_ref()
            .unwrap()
            .len(),
        2
    );
    fledge(&c.api, &["promote", "web"]).await;
    settled(&c, "web:2", Phase::Succeeded).await;
    assert_eq!(split_weights(&c.api), vec![0, 2000, 10000, 0]);
    // Settled, it is governed by the edited generation now, and told so.
    wait_until(|| events_with_reason(&c.api, "PolicyChanged") == 1).await;
    let changed = c
        .api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "PolicyChanged")
        .unwrap();
    assert_eq!(
        changed["message"],
        "web is governed by RolloutPolicy shop/defaults (generation 2), was RolloutPolicy shop/defaults (generation 1); a canary in flight keeps the policy it started with"
    );

    // The next canary runs the edited policy.
    d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:3");
    apply(&c.api, d.clone()).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.phase == Phase::Paused && s.step == 2)
        })
        .await
        .unwrap();
    assert_eq!(split_weights(&c.api), vec![0, 2000, 10000, 0, 2500, 5000]);

    // Deleted mid-canary: the canary holds at 50 % and says why; abort still works.
    c.api.delete(POLICIES, NS, "defaults").await.unwrap();
    let held = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.message.contains("was deleted"))
        })
        .await
        .unwrap();
    assert_eq!(
        state(held.as_ref()).unwrap().message,
        "step 3/3: RolloutPolicy shop/defaults was deleted; the canary holds at 50% (recreate it to go on, or `fledge abort web`)"
    );
    // The Event may be recorded just after the state it goes with.
    wait_until(|| events_with_reason(&c.api, "PolicyMissing") == 1).await;
    fledge(&c.api, &["abort", "web"]).await;
    wait_phase(&c.api, Phase::Aborted).await;
    assert_eq!(split_weights(&c.api).last(), Some(&0));
    // Said once, however often the held canary was looked at.
    assert_eq!(events_with_reason(&c.api, "PolicyMissing"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_refused_by_the_api_server_schema() {
    let c = policy_cluster(true, Clock::system()).await;
    let api = &c.api;
    let refused = |spec: Value| async move {
        api.create(
            POLICIES,
            NS,
            json!({"apiVersion": "fledge.dev/v1alpha1", "kind": "RolloutPolicy",
                   "metadata": {"name": "bad", "namespace": NS}, "spec": spec}),
        )
        .await
        .unwrap_err()
        .to_string()
    };
    let cases = [
        (
            json!({"steps": [{"setWeight": 150}]}),
            "spec.steps[0].setWeight",
        ),
        (
            json!({"steps": [{"setWeight": 5, "pause": {}}]}),
            "spec.steps[0]",
        ),
        (json!({"steps": []}), "spec.steps"),
        (json!({"router": "istio"}), "spec.router"),
        (
            json!({"httpRoutes": ["public"]}),
            "httpRoutes names the HTTPRoutes of router gateway-api",
        ),
        (
            json!({"guardRails": {"requiredChecks": ["error-rate"]}}),
            "every name in guardRails.requiredChecks must be a check of spec.analysis",
        ),
        (
            json!({"router": "pod-ratio", "guardRails": {"allowedRouters": ["smi"]}}),
            "router must be one of guardRails.allowedRouters",
        ),
        (
            json!({"guardRails": {"maxStepWeight": 0}}),
            "spec.guardRails.maxStepWeight",
        ),
        (
            json!({"guardRails": {"minPause": "soon"}}),
            "spec.guardRails.minPause",
        ),
        (
            json!({"promotionWindows": [{"days": ["Sun"], "start": "16:00", "end": "09:00"}]}),
            "start must be before end",
        ),
        (
            json!({"promotionWindows": [{"days": ["Funday"], "start": "09:00", "end": "16:00"}]}),
            "spec.promotionWindows[0].days[0]",
        ),
        (
            json!({"promotionWindows": [{"days": ["Mon"], "start": "9am", "end": "16:00"}]}),
            "spec.promotionWindows[0].start",
        ),
        (
            json!({"analysis": [{"interval": "1m"}]}),
            "spec.analysis[0].name",
        ),
    ];
    for (spec, place) in cases {
        let err = refused(spec.clone()).await;
        assert!(err.contains(place), "{spec}: {err}");
    }
    // A cluster policy's namespaceSelector is checked as a label selector's shape.
    let err = c
        .api
        .create(
            CLUSTER_POLICIES,
            "",
            json!({"apiVersion": "fledge.dev/v1alpha1", "kind": "ClusterRolloutPolicy",
                   "metadata": {"name": "strict"}, "spec": {"namespaceSelector": {"matchLabels": {"team": 5}}}}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.namespaceSelector.matchLabels.team"),
        "{err}"
    );
    // What the schema cannot tell (a time zone), fledge reports in the policy's status.
    put_policy(
        &c,
        defaults(json!({"promotionWindows": [{"days": ["Mon"], "start": "09:00", "end": "16:00", "timeZone": "Mars/Olympus"}]})),
    )
    .await;
    c.api
        .wait_for(POLICIES, NS, "defaults", WAIT, |p| {
            p.is_some_and(|p| {
                p["status"]["conditions"][0]["status"] == "False"
                    && p["status"]["conditions"][0]["message"]
                        .as_str()
                        .is_some_and(|m| {
                            m.starts_with("spec.promotionWindows[0].timeZone: \"Mars/Olympus\"")
                        })
            })
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fledge_runs_without_its_crds_and_picks_them_up_when_installed() {
    let c = policy_cluster(false, Clock::system()).await;
    // Synced (ready) with no policies, and Deployments roll out as before.
    assert!(c.watch.is_synced() && c.watch.snapshot().policies.is_empty());
    let mut d = plain("web:1");
    d["metadata"]["labels"]["fledge.dev/enabled"] = json!("true");
    d["metadata"]["annotations"] = json!({"fledge.dev/steps": "- setWeight: 50\n"});
    stable(&c, d).await;
    // Installed later, as `kubectl apply -f charts/fledge/crds/` does.
    for crd in serde_yaml_ng::Deserializer::from_str(&policy_crds()) {
        let crd: Value = serde::Deserialize::deserialize(crd).unwrap();
        if crd.is_null() {
            continue;
        }
        c.api
            .create("apiextensions.k8s.io/v1/customresourcedefinitions", "", crd)
            .await
            .unwrap();
    }
    c.api
        .wait_for(
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            "",
            "rolloutpolicies.fledge.dev",
            WAIT,
            |crd| {
                crd.is_some_and(|crd| {
                    crd["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Established" && c["status"] == "True")
                    })
                })
            },
        )
        .await
        .unwrap();
    // Picked up on the watch's next try (every 2 s).
    put_policy(&c, defaults(json!({}))).await;
    assert_eq!(c.watch.snapshot().policies.len(), 1);
}
