//! End-to-end test support: the stand-in with fledge's real webhook and controller, a user's
//! Deployment and Service, and the real `fledge` binary run against it.
use fledge::runtime::policies::PolicyWatch;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::{ApiServer, ApiServerConfig, ControllerConfig};
use fledge::core::objects::SplitApi;
use fledge::core::rollout::{Phase, RolloutState, read_state};
use fledge::runtime::controller;

pub const DEPLOYMENTS: &str = "apps/v1/deployments";
pub const SERVICES: &str = "v1/services";
pub const SPLITS: &str = "split.smi-spec.io/v1alpha2/trafficsplits";
pub const NS: &str = "shop";
pub const WAIT: Duration = Duration::from_secs(30);

/// The stand-in with fledge's webhook registered and fledge's controller running against it.
pub struct Cluster {
    pub api: ApiServer,
    /// The webhook's and the controller's metrics, as `/metrics` serves them.
    pub metrics: Arc<fledge::runtime::server::ServerMetrics>,
    _webhook: super::webhook::FledgeWebhook,
    pub controller_task: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.controller_task.abort();
    }
}

pub async fn cluster() -> Cluster {
    cluster_with(ControllerConfig::default()).await
}

/// [`cluster`] with the stand-in's deployment controller configured (e.g. readiness delays).
pub async fn cluster_with(controller: ControllerConfig) -> Cluster {
    cluster_configured(|config| config.controller = controller).await
}

/// The Gateway API HTTPRoute CRD (v1.6.1), as `extra_crds` takes it.
pub fn gateway_api_crd() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/crds/gateway-api-v1.6.1-httproutes.yaml"
    ))
    .expect("the Gateway API CRD in ../shared/crds")
}

/// [`cluster_with`] with more CRDs installed (YAML text).
pub async fn cluster_with_crds(controller: ControllerConfig, extra_crds: Vec<String>) -> Cluster {
    cluster_configured(|config| {
        config.controller = controller;
        config.extra_crds = extra_crds;
    })
    .await
}

/// [`cluster`] with the stand-in configured by `configure` (e.g. its legacy encoding).
pub async fn cluster_configured(configure: impl FnOnce(&mut ApiServerConfig)) -> Cluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("fledge=debug"))
        .with_test_writer()
        .try_init();
    let webhook = super::webhook::start();
    let mut config = ApiServerConfig {
        webhooks: vec![webhook.config.clone()],
        namespaces: vec![NS.into()],
        ..ApiServerConfig::default()
    };
    configure(&mut config);
    let api = ApiServer::start(config).await;
    let metrics = Arc::new(fledge::runtime::server::ServerMetrics::default());
    let controller = start_controller(&api, &metrics);
    Cluster {
        metrics,
        api,
        _webhook: webhook,
        controller_task: controller,
    }
}

pub fn start_controller(
    api: &ApiServer,
    metrics: &fledge::runtime::server::ServerMetrics,
) -> tokio::task::JoinHandle<()> {
    start_controller_with(
        api,
        api.client(),
        metrics,
        fledge::runtime::clock::Clock::system(),
    )
}

/// [`start_controller`] with its own client (e.g. one that names a user) and clock.
pub fn start_controller_with(
    api: &ApiServer,
    client: kube::Client,
    metrics: &fledge::runtime::server::ServerMetrics,
    clock: fledge::runtime::clock::Clock,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(controller::run(
        client,
        controller::ControllerConfig {
            namespace: Some(NS.into()),
            split_api: SplitApi::V1Alpha2,
            metrics: metrics.controller.clone(),
            prometheus_address: None,
            policies: PolicyWatch::spawn(api.client(), Some(NS.into())),
            clock,
        },
        std::future::pending(),
    ))
}

pub fn deployment(image: &str, steps: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": "web", "namespace": NS,
            "labels": {"app": "web", "fledge.dev/enabled": "true"},
            "annotations": {"fledge.dev/steps": steps},
        },
        "spec": {
            "replicas": 4,
            "progressDeadlineSeconds": 30,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    })
}

pub fn root_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

pub fn image(d: &Value) -> &str {
    d["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

pub fn state(d: Option<&Value>) -> Option<RolloutState> {
    let annotations = d?["metadata"]["annotations"].as_object()?;
    let map = annotations
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    read_state(Some(&map)).ok().flatten()
}

pub fn phase(d: Option<&Value>) -> Option<Phase> {
    state(d).map(|s| s.phase)
}

/// The canary weights the TrafficSplit carried, in order, repeats removed.
pub fn split_weights(api: &ApiServer) -> Vec<u64> {
    numbers_in_history(
        api,
        "trafficsplits.split.smi-spec.io",
        "web",
        "/spec/backends/1/weight",
    )
}

/// The number at JSON pointer `at` in each stored version of `resource` `name` in [`NS`], in
/// order, repeats in a row removed; versions without it are skipped.
pub fn numbers_in_history(api: &ApiServer, resource: &str, name: &str, at: &str) -> Vec<u64> {
    let mut numbers: Vec<u64> = api
        .history_of(resource, NS, name)
        .iter()
        .filter_map(|r| r.object.pointer(at)?.as_u64())
        .collect();
    numbers.dedup();
    numbers
}

/// A kubeconfig that points at the stand-in, namespace [`NS`] by default.
pub fn kubeconfig(api: &ApiServer) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fledge-kubeconfig-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    std::fs::write(&kubeconfig, api.kubeconfig_yaml(NS)).unwrap();
    kubeconfig
}

/// Runs `command` (with `KUBECONFIG` pointing at the stand-in) to its end, off the async runtime.
pub async fn run_command(
    api: &ApiServer,
    mut command: std::process::Command,
) -> std::process::Output {
    command.env("KUBECONFIG", kubeconfig(api));
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// Runs the real `fledge` binary against the stand-in; it must succeed. Returns its stdout.
pub async fn fledge(api: &ApiServer, args: &[&str]) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fledge"));
    command.args(args);
    let output = run_command(api, command).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub async fn apply(api: &ApiServer, object: Value) {
    let client = api.client();
    let resource: kube::Api<kube::api::DynamicObject> = match object["kind"].as_str() {
        Some("Service") => kube::Api::namespaced_with(
            client,
            NS,
            &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        ),
        _ => kube::Api::namespaced_with(
            client,
            NS,
            &kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
        ),
    };
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    resource
        .patch(
            &name,
            &kube::api::PatchParams::apply("kubectl").force(),
            &kube::api::Patch::Apply(&object),
        )
        .await
        .unwrap();
}

/// The reasons of the Events recorded so far, oldest first.
pub fn event_reasons(api: &ApiServer) -> Vec<String> {
    api.events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

/// How many Events with this reason were recorded.
pub fn events_with_reason(api: &ApiServer, reason: &str) -> usize {
    api.events()
        .iter()
        .filter(|e| e["reason"] == reason)
        .count()
}

/// Waits until none of the objects fledge creates for `web` exists.
pub async fn wait_until_nothing_is_left(api: &ApiServer) {
    for (gvr, name) in [
        (DEPLOYMENTS, "web-canary"),
        (SPLITS, "web"),
        (SERVICES, "web-canary"),
        (SERVICES, "web-stable"),
    ] {
        api.wait_for(gvr, NS, name, WAIT, |d| d.is_none())
            .await
            .unwrap();
    }
}

/// Waits until `web` is paused at `step`.
pub async fn wait_paused_at(api: &ApiServer, step: usize) {
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
        phase(d) == Some(Phase::Paused) && state(d).is_some_and(|s| s.step == step)
    })
    .await
    .unwrap();
}

/// Waits for the rollout to reach `phase`.
pub async fn wait_phase(api: &ApiServer, wanted: Phase) -> Value {
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| phase(d) == Some(wanted))
        .await
        .unwrap()
        .unwrap()
}

pub async fn stable_v1(steps: &str) -> Cluster {
    with_stable_v1(cluster().await, steps).await
}

/// `c` with the root Service and v1 of `web` applied and available.
pub async fn with_stable_v1(c: Cluster, steps: &str) -> Cluster {
    apply(&c.api, root_service()).await;
    apply(&c.api, deployment("web:1", steps)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
        })
        .await
        .unwrap();
    c
}

/// The images `web`'s own pods run: those of its ReplicaSets with replicas, sorted. A held
/// Deployment keeps running the stable one whatever its `spec.template` shows.
pub fn running_images(api: &ApiServer) -> Vec<String> {
    let Some(web) = api.get(DEPLOYMENTS, NS, "web") else {
        return Vec::new();
    };
    let uid = web["metadata"]["uid"].clone();
    let mut images: Vec<String> = api
        .list("apps/v1/replicasets", Some(NS))
        .iter()
        .filter(|rs| rs["metadata"]["ownerReferences"][0]["uid"] == uid)
        .filter(|rs| rs["spec"]["replicas"].as_u64().unwrap_or(0) > 0)
        .map(|rs| image(rs).to_owned())
        .collect();
    images.sort();
    images
}

/// `web` shows `applied` (the user's template, untouched) and is held paused, while its pods
/// still run `stable`.
pub fn assert_held(api: &ApiServer, applied: &str, stable: &str) {
    let web = api.get(DEPLOYMENTS, NS, "web").expect("web");
    assert_eq!(
        image(&web),
        applied,
        "the Deployment shows what was applied"
    );
    assert_eq!(web["spec"]["paused"], json!(true), "held with spec.paused");
    assert_eq!(
        running_images(api),
        vec![stable.to_owned()],
        "the stable pods keep running"
    );
}

/// The user's gateway route: a rule to `web`, a rule to another Service, filters, matches.
pub fn user_route() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web-public", "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "edge", "sectionName": "https"}, {"name": "internal"}],
            "hostnames": ["shop.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-via", "value": "edge"}]}}],
                    "backendRefs": [{"name": "web", "port": 80}],
                    "timeouts": {"request": "10s"},
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/static"}}],
                    "backendRefs": [{"name": "cdn", "port": 80}],
                },
            ],
        },
    })
}
