//! End to end through the API server stand-in with the Gateway API CRD installed (schema enforced):
//! each router's weights at every step to Succeeded and after an abort, header routes and mirrors
//! present then gone, the user's route identical afterwards, pod-ratio replica counts and
//! effective weights, the revert on every router, and a router whose CRD is missing.
mod support;

use serde_json::{Value, json};
use support::apiserver::ControllerConfig;
use support::e2e::*;

use fledge::core::rollout::Phase;
use fledge::core::routes::canary_share;

/// The gateway mode on the user's route `web-public`.
const GATEWAY_MODE: [(&str, &str); 2] = [
    ("fledge.dev/router", "gateway-api"),
    ("fledge.dev/http-routes", "web-public"),
];
const ROUTES: &str = "gateway.networking.k8s.io/v1/httproutes";
const ROUTE_RESOURCE: &str = "httproutes.gateway.networking.k8s.io";

async fn gateway_cluster(steps: &str, router: &[(&str, &str)]) -> Cluster {
    let c = cluster_with_crds(ControllerConfig::default(), vec![gateway_api_crd()]).await;
    apply(&c.api, root_service()).await;
    apply(&c.api, with_router(deployment("web:1", steps), router)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
        })
        .await
        .unwrap();
    c
}

fn with_router(mut d: Value, router: &[(&str, &str)]) -> Value {
    for (k, v) in router {
        d["metadata"]["annotations"][*k] = json!(v);
    }
    d
}

/// The canary shares the route `name` carried, in order, repeats removed (basis points).
fn route_weights(c: &Cluster, name: &str) -> Vec<u16> {
    let mut weights: Vec<u16> = c
        .api
        .history_of(ROUTE_RESOURCE, NS, name)
        .iter()
        .filter_map(|r| {
            let rules = r.object["spec"]["rules"].as_array()?;
            canary_share(rules, "web-canary").map(|w| w.basis_points())
        })
        .collect();
    weights.dedup();
    weights
}

fn rule_names(route: &Value) -> Vec<String> {
    route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

fn has_mirror(route: &Value) -> bool {
    route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["filters"].as_array().into_iter().flatten())
        .any(|f| f["type"] == "RequestMirror")
}

async fn wait_step(c: &Cluster, phase: Phase, step: usize) {
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            support::e2e::phase(d) == Some(phase) && state(d).is_some_and(|s| s.step == step)
        })
        .await
        .unwrap();
}

/// Applies v2 on `router` and sees it wait: a status message with `says`, one warning Event
/// `reason`, and no canary pod before its traffic is in place.
async fn v2_waits(c: &Cluster, steps: &str, router: &[(&str, &str)], says: &str, reason: &str) {
    apply(&c.api, with_router(deployment("web:2", steps), router)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.message.contains(says))
        })
        .await
        .unwrap();
    assert_eq!(events_with_reason(&c.api, reason), 1);
    assert!(c.api.get(DEPLOYMENTS, NS, "web-canary").is_none());
}

const GATEWAY_STEPS: &str = "\
- setMirrorRoute: {name: shadow, percentage: 20}
- setWeight: 10
- setHeaderRoute: {name: beta, match: [{headerName: x-beta, headerValue: {exact: \"1\"}}]}
- pause: {}
- setHeaderRoute: {name: beta}
- setMirrorRoute: {name: shadow}
- setWeight: 50
- pause: {}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mode_splits_the_users_route_and_gives_it_back_exactly() {
    let router = GATEWAY_MODE;
    let c = gateway_cluster(GATEWAY_STEPS, &router).await;
    c.api
        .create(ROUTES, NS, user_route())
        .await
        .expect("the route is valid");
    let original = c.api.get(ROUTES, NS, "web-public").unwrap()["spec"].clone();

    apply(
        &c.api,
        with_router(deployment("web:2", GATEWAY_STEPS), &router),
    )
    .await;
    wait_step(&c, Phase::Paused, 3).await;
    let live = c.api.get(ROUTES, NS, "web-public").unwrap();
    assert_eq!(rule_names(&live), vec!["fledge-beta-0"], "the header route");
    assert!(has_mirror(&live), "the mirror");
    assert_eq!(
        live["spec"]["rules"][1], original["rules"][1],
        "other rules stay"
    );
    assert_eq!(live["spec"]["parentRefs"], original["parentRefs"]);
    assert_eq!(
        live["spec"]["rules"][0]["filters"][0],
        original["rules"][0]["filters"][0]
    );
    assert!(
        c.api.get(SPLITS, NS, "web").is_none(),
        "no TrafficSplit with gateway-api"
    );
    fledge(&c.api, &["promote", "web"]).await;
    wait_step(&c, Phase::Paused, 7).await;
    let live = c.api.get(ROUTES, NS, "web-public").unwrap();
    assert!(rule_names(&live).is_empty(), "the header route is gone");
    assert!(!has_mirror(&live), "the mirror is gone");
    fledge(&c.api, &["promote", "web"]).await;
    wait_phase(&c.api, Phase::Succeeded).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(route_weights(&c, "web-public"), vec![0, 1000, 5000, 10_000]);
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        original,
        "the user's route after promotion"
    );
    let after = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref()).unwrap();
    assert!(
        after.saved_routes.is_empty(),
        "the saved rules are forgotten"
    );

    // Abort: traffic back, the route restored exactly.
    apply(
        &c.api,
        with_router(deployment("web:3", GATEWAY_STEPS), &router),
    )
    .await;
    wait_step(&c, Phase::Paused, 3).await;
    fledge(&c.api, &["abort", "web"]).await;
    wait_phase(&c.api, Phase::Aborted).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        original,
        "the user's route after an abort"
    );
    assert_eq!(
        route_weights(&c, "web-public"),
        vec![0, 1000, 5000, 10_000, 0, 1000]
    );

    // The revert: the stable template again mid-canary.
    apply(
        &c.api,
        with_router(deployment("web:4", GATEWAY_STEPS), &router),
    )
    .await;
    wait_step(&c, Phase::Paused, 3).await;
    apply(
        &c.api,
        with_router(deployment("web:2", GATEWAY_STEPS), &router),
    )
    .await;
    wait_phase(&c.api, Phase::RolledBack).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        original,
        "the user's route after a revert"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_route_waits_with_a_message_and_goes_on_when_it_appears() {
    let steps = "- setWeight: 20\n- pause: {}\n";
    let c = gateway_cluster(steps, &GATEWAY_MODE).await;
    v2_waits(
        &c,
        steps,
        &GATEWAY_MODE,
        "HTTPRoute web-public",
        "HTTPRouteMissing",
    )
    .await;
    c.api.create(ROUTES, NS, user_route()).await.unwrap();
    wait_phase(&c.api, Phase::Paused).await;
    assert_eq!(route_weights(&c, "web-public"), vec![0, 2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gamma_mode_owns_a_route_with_the_root_service_as_parent() {
    let steps = "- setHeaderRoute: {name: beta, match: [{headerName: x-beta, headerValue: {prefix: v2}}]}\n- setWeight: 5\n- pause: {}\n- setWeight: 50\n- pause: {duration: 1s}\n";
    let router = [("fledge.dev/router", "gateway-api")];
    let c = gateway_cluster(steps, &router).await;
    apply(&c.api, with_router(deployment("web:2", steps), &router)).await;
    wait_step(&c, Phase::Paused, 2).await;
    let route = c.api.get(ROUTES, NS, "web").unwrap();
    assert_eq!(
        route["spec"]["parentRefs"],
        json!([{"group": "", "kind": "Service", "name": "web", "port": 80}])
    );
    assert_eq!(rule_names(&route), vec!["fledge-beta-0"]);
    assert_eq!(
        route["metadata"]["ownerReferences"][0]["name"], "web",
        "owned by the Deployment"
    );
    fledge(&c.api, &["promote", "web"]).await;
    wait_phase(&c.api, Phase::Succeeded).await;
    wait_until_nothing_is_left(&c.api).await;
    c.api
        .wait_for(ROUTES, NS, "web", WAIT, |r| r.is_none())
        .await
        .unwrap();
    assert_eq!(route_weights(&c, "web"), vec![0, 500, 5000, 10_000, 0]);

    // Abort, and the revert.
    apply(&c.api, with_router(deployment("web:3", steps), &router)).await;
    wait_step(&c, Phase::Paused, 2).await;
    fledge(&c.api, &["abort", "web"]).await;
    wait_phase(&c.api, Phase::Aborted).await;
    c.api
        .wait_for(ROUTES, NS, "web", WAIT, |r| r.is_none())
        .await
        .unwrap();
    assert_eq!(
        route_weights(&c, "web"),
        vec![0, 500, 5000, 10_000, 0, 500, 0]
    );
    apply(&c.api, with_router(deployment("web:4", steps), &router)).await;
    wait_step(&c, Phase::Paused, 2).await;
    apply(&c.api, with_router(deployment("web:2", steps), &router)).await;
    wait_phase(&c.api, Phase::RolledBack).await;
    c.api
        .wait_for(ROUTES, NS, "web", WAIT, |r| r.is_none())
        .await
        .unwrap();
    assert_eq!(route_weights(&c, "web").last(), Some(&0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ratio_sizes_the_canary_and_reports_the_effective_weight() {
    let steps = "- setWeight: 5\n- pause: {}\n- setWeight: 40\n- pause: {}\n";
    let router = [("fledge.dev/router", "pod-ratio")];
    let c = gateway_cluster(steps, &router).await;
    apply(&c.api, with_router(deployment("web:2", steps), &router)).await;
    wait_step(&c, Phase::Paused, 1).await;
    let canary = c.api.get(DEPLOYMENTS, NS, "web-canary").unwrap();
    assert_eq!(canary["spec"]["replicas"], 1);
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_eq!(
        web["spec"]["replicas"], 4,
        "the user's Deployment is never scaled"
    );
    let weight_set: Vec<String> = c
        .api
        .events()
        .iter()
        .filter(|e| e["reason"] == "WeightSet")
        .filter_map(|e| {
            e["note"]
                .as_str()
                .or(e["message"].as_str())
                .map(str::to_owned)
        })
        .collect();
    assert!(
        weight_set[0].contains("asked 5 %; with 4 stable pods the nearest is 20 % (1 canary pod)"),
        "{weight_set:?}"
    );
    assert!(c.api.get(SPLITS, NS, "web").is_none());
    assert!(c.api.get(ROUTES, NS, "web").is_none());
    let status: Value =
        serde_json::from_str(&fledge(&c.api, &["status", "web", "-o", "json"]).await).unwrap();
    assert_eq!(status["router"], "pod-ratio");
    assert_eq!(status["traffic"], json!(["Service web (pod ratio)"]));
    assert!(
        fledge(&c.api, &["status", "web"])
            .await
            .contains("via pod-ratio"),
        "the text names the router"
    );
    fledge(&c.api, &["promote", "web"]).await;
    wait_step(&c, Phase::Paused, 3).await;
    // 40 % beside 4 stable pods: 3 canary pods are 42.86 %, 2 are 33.33 %.
    assert_eq!(
        c.api.get(DEPLOYMENTS, NS, "web-canary").unwrap()["spec"]["replicas"],
        3
    );
    fledge(&c.api, &["abort", "web"]).await;
    wait_phase(&c.api, Phase::Aborted).await;
    wait_until_nothing_is_left(&c.api).await;
    let replicas = numbers_in_history(&c.api, "deployments.apps", "web-canary", "/spec/replicas");
    assert_eq!(
        replicas,
        vec![0, 1, 3, 0],
        "scaled to no pod before it goes"
    );

    // The revert.
    apply(&c.api, with_router(deployment("web:3", steps), &router)).await;
    wait_step(&c, Phase::Paused, 1).await;
    apply(&c.api, with_router(deployment("web:1", steps), &router)).await;
    wait_phase(&c.api, Phase::RolledBack).await;
    wait_until_nothing_is_left(&c.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gateway_api_crd_only_its_deployments_wait() {
    let steps = "- setWeight: 20\n- pause: {}\n";
    let c = stable_v1(steps).await;
    let router = [("fledge.dev/router", "gateway-api")];
    v2_waits(
        &c,
        steps,
        &router,
        "router gateway-api",
        "RouterUnavailable",
    )
    .await;
    // The same Deployment on smi goes on.
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    assert_eq!(split_weights(&c.api), vec![0, 2000]);
}

/// Creates the CRDs in `yaml` through the API, as `kubectl apply -f` does.
async fn install_crds(c: &Cluster, yaml: &str) {
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let crd = <Value as serde::Deserialize>::deserialize(doc).unwrap();
        if crd["kind"] == "CustomResourceDefinition" {
            c.api
                .create("apiextensions.k8s.io/v1/customresourcedefinitions", "", crd)
                .await
                .expect("the CRD is created");
        }
    }
}

/// A router's CRD installed while a Deployment waits for it: the canary goes on within seconds
/// (the controller retries a waiting router every 2 s), and its weight is in the new object.
async fn goes_on_once_the_crd_is_installed(
    c: &Cluster,
    router: &[(&str, &str)],
    crd: &str,
    says: &str,
) {
    let steps = "- setWeight: 20\n- pause: {}\n";
    v2_waits(c, steps, router, says, "RouterUnavailable").await;
    let state = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref()).unwrap();
    assert!(
        state.message.contains("install its CRD"),
        "{}",
        state.message
    );
    let installed = std::time::Instant::now();
    install_crds(c, crd).await;
    wait_phase(&c.api, Phase::Paused).await;
    let took = installed.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    assert!(c.api.get(DEPLOYMENTS, NS, "web-canary").is_some());
    assert_eq!(events_with_reason(&c.api, "RouterUnavailable"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_goes_on_within_seconds_once_its_crd_is_installed() {
    let c = stable_v1("- setWeight: 20\n- pause: {}\n").await;
    let router = [("fledge.dev/router", "gateway-api")];
    goes_on_once_the_crd_is_installed(&c, &router, &gateway_api_crd(), "router gateway-api").await;
    assert_eq!(route_weights(&c, "web"), vec![0, 2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smi_goes_on_within_seconds_once_the_trafficsplit_crd_is_installed() {
    let c = with_stable_v1(
        cluster_configured(|config| config.trafficsplit_versions = Vec::new()).await,
        "- setWeight: 20\n- pause: {}\n",
    )
    .await;
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/crds/trafficsplit-linkerd-smi.yaml"
    ))
    .unwrap();
    goes_on_once_the_crd_is_installed(&c, &[], &crd, "router smi").await;
    assert_eq!(split_weights(&c.api), vec![0, 2000]);
}

/// The resource version of the first stored state in `phase`.
fn first_state_in(c: &Cluster, phase: Phase) -> u64 {
    c.api
        .history_of("deployments.apps", NS, "web")
        .iter()
        .find(|r| state(Some(&r.object)).is_some_and(|s| s.phase == phase))
        .map(|r| r.resource_version)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fledge_abort_turns_the_gateway_api_route_before_it_writes_the_state() {
    let steps = "- setWeight: 50\n- pause: {}\n";
    // GAMMA: the route's canary share is 0 before the state says Aborted.
    let router = [("fledge.dev/router", "gateway-api")];
    let c = gateway_cluster(steps, &router).await;
    apply(&c.api, with_router(deployment("web:2", steps), &router)).await;
    wait_step(&c, Phase::Paused, 1).await;
    c.controller_task.abort();
    fledge(&c.api, &["abort", "web"]).await;
    let zero = c
        .api
        .history_of(ROUTE_RESOURCE, NS, "web")
        .iter()
        .find(|r| {
            r.object["spec"]["rules"].as_array().is_some_and(|rules| {
                canary_share(rules, "web-canary").is_none_or(|w| w.basis_points() == 0)
            }) && r.resource_version > first_state_in(&c, Phase::Paused)
        })
        .map(|r| r.resource_version)
        .unwrap_or_else(|| {
            panic!(
                "the command did not turn the route itself: {:?}",
                c.api
                    .history_of(ROUTE_RESOURCE, NS, "web")
                    .iter()
                    .map(|r| (r.resource_version, r.object["spec"]["rules"].clone()))
                    .collect::<Vec<_>>()
            )
        });
    assert!(zero < first_state_in(&c, Phase::Aborted));
}

fn routes_api(c: &Cluster) -> kube::Api<kube::api::DynamicObject> {
    kube::Api::namespaced_with(
        c.api.client(),
        NS,
        &fledge::runtime::traffic::route_resource(),
    )
}

/// `kubectl edit`: the route as it is now, changed by `edit`, written back with its
/// resourceVersion.
async fn edit_route(c: &Cluster, edit: impl Fn(&mut Value)) {
    let routes = routes_api(c);
    let route = routes.get("web-public").await.unwrap();
    let mut value = serde_json::to_value(&route).unwrap();
    edit(&mut value);
    let edited: kube::api::DynamicObject = serde_json::from_value(value).unwrap();
    routes
        .replace("web-public", &Default::default(), &edited)
        .await
        .expect("the edited route is valid");
}

/// The user's changes, on the route's spec (split or not: the user's rules come first).
fn users_edit(spec: &mut Value) {
    spec["hostnames"] = json!(["shop.example.com", "www.shop.example.com"]);
    spec["rules"][0]["timeouts"] = json!({"request": "20s"});
    spec["rules"][0]["filters"][0]["requestHeaderModifier"]["add"][0]["value"] = json!("edge-2");
    let mut rules = spec["rules"].as_array().cloned().unwrap();
    rules.push(json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}],
        // As the API server defaults it.
        "backendRefs": [{"group": "", "kind": "Service", "name": "docs", "port": 8080, "weight": 1}],
    }));
    spec["rules"] = Value::Array(rules);
}

fn users_second_edit(spec: &mut Value) {
    spec["rules"][0]["timeouts"] = json!({"request": "30s", "backendRequest": "5s"});
}

/// Waits until the route carries the canary share `bp` and passes `check`.
async fn wait_route(c: &Cluster, bp: u16, check: impl Fn(&Value) -> bool) -> Value {
    c.api
        .wait_for(ROUTES, NS, "web-public", WAIT, |r| {
            r.is_some_and(|r| {
                r["spec"]["rules"].as_array().is_some_and(|rules| {
                    canary_share(rules, "web-canary").map(|w| w.basis_points()) == Some(bp)
                }) && check(r)
            })
        })
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_edits_to_the_route_mid_canary_are_kept_through_promotion_and_abort() {
    let steps = "\
- setWeight: 10
- setHeaderRoute: {name: beta, match: [{headerName: x-beta, headerValue: {exact: \"1\"}}]}
- pause: {}
- setWeight: 50
- pause: {}
";
    let c = gateway_cluster(steps, &GATEWAY_MODE).await;
    c.api.create(ROUTES, NS, user_route()).await.unwrap();
    let mut edited = c.api.get(ROUTES, NS, "web-public").unwrap()["spec"].clone();
    users_edit(&mut edited);

    apply(
        &c.api,
        with_router(deployment("web:2", steps), &GATEWAY_MODE),
    )
    .await;
    wait_step(&c, Phase::Paused, 2).await;
    // `kubectl edit` of the split route: a timeout, a filter, hostnames, a new rule at the end.
    edit_route(&c, |r| users_edit(&mut r["spec"])).await;
    fledge(&c.api, &["promote", "web"]).await;
    let live = wait_route(&c, 5000, |r| {
        r["spec"]["rules"][0]["timeouts"]["request"] == "20s"
            && rule_names(r) == vec!["fledge-beta-0"]
            && r["spec"]["rules"].as_array().unwrap().last().unwrap()["name"] == "fledge-beta-0"
    })
    .await;
    wait_step(&c, Phase::Paused, 4).await;
    let spec = &live["spec"];
    assert_eq!(spec["hostnames"], edited["hostnames"], "hostnames kept");
    assert_eq!(spec["rules"][0]["filters"], edited["rules"][0]["filters"]);
    assert_eq!(spec["rules"][1], edited["rules"][1], "the other rule stays");
    assert_eq!(
        spec["rules"][2], edited["rules"][2],
        "the new rule is the user's"
    );
    assert_eq!(
        spec["rules"][3]["timeouts"], edited["rules"][0]["timeouts"],
        "the header route is built from the edited rule"
    );
    assert!(events_with_reason(&c.api, "HTTPRouteChanged") >= 1);
    let saved = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref()).unwrap();
    assert_eq!(
        saved.saved_routes["web-public"],
        edited["rules"].as_array().unwrap().clone(),
        "the edit is what fledge saved"
    );

    // The user re-applies their route from Git (SSA, force): no fledge fields, another change.
    let mut from_git = user_route();
    from_git["spec"] = edited.clone();
    users_second_edit(&mut from_git["spec"]);
    let mut edited_twice = edited.clone();
    users_second_edit(&mut edited_twice);
    routes_api(&c)
        .patch(
            "web-public",
            &kube::api::PatchParams::apply("argocd").force(),
            &kube::api::Patch::Apply(&from_git),
        )
        .await
        .unwrap();
    fledge(&c.api, &["promote", "web"]).await;
    wait_phase(&c.api, Phase::Succeeded).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        edited_twice,
        "the user's edits after promotion"
    );

    // Abort with an edit fledge has not seen yet: the restore keeps it too.
    apply(
        &c.api,
        with_router(deployment("web:3", steps), &GATEWAY_MODE),
    )
    .await;
    wait_step(&c, Phase::Paused, 2).await;
    c.controller_task.abort();
    edit_route(&c, |r| {
        r["spec"]["rules"][1]["timeouts"] = json!({"request": "3s"});
    })
    .await;
    let mut edited_thrice = edited_twice.clone();
    edited_thrice["rules"][1]["timeouts"] = json!({"request": "3s"});
    fledge(&c.api, &["abort", "web"]).await;
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        edited_thrice,
        "`fledge abort` restores the route with the edit"
    );
    let metrics = std::sync::Arc::new(fledge::runtime::server::ServerMetrics::default());
    let _controller = support::e2e::start_controller(&c.api, &metrics);
    wait_phase(&c.api, Phase::Aborted).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(
        c.api.get(ROUTES, NS, "web-public").unwrap()["spec"],
        edited_thrice,
        "the user's edits after an abort"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_reset_by_a_sync_during_a_pause_is_split_again_within_seconds() {
    let steps = "- setWeight: 10\n- pause: {}\n- setWeight: 50\n";
    let c = gateway_cluster(steps, &GATEWAY_MODE).await;
    c.api.create(ROUTES, NS, user_route()).await.unwrap();
    apply(
        &c.api,
        with_router(deployment("web:2", steps), &GATEWAY_MODE),
    )
    .await;
    wait_step(&c, Phase::Paused, 1).await;
    wait_route(&c, 1000, |_| true).await;
    // A GitOps sync puts the route back as it is in Git: all traffic to the root Service again.
    routes_api(&c)
        .patch(
            "web-public",
            &kube::api::PatchParams::apply("argocd").force(),
            &kube::api::Patch::Apply(&user_route()),
        )
        .await
        .unwrap();
    // Nothing else happens (no promote, no timed pause, and the next resync is minutes away):
    // fledge reads the route again by itself, well within the wait.
    wait_route(&c, 1000, |_| true).await;
    assert_eq!(
        phase(c.api.get(DEPLOYMENTS, NS, "web").as_ref()),
        Some(Phase::Paused)
    );
}
