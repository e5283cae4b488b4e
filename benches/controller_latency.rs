//! How fast the controller reacts, through the API server stand-in with fledge's real webhook:
//! from applying a new template to the canary Deployment existing with the TrafficSplit set; from
//! `fledge abort` to no canary traffic; from a revert (`kubectl apply` of the stable template) to
//! no canary traffic; from a check's server answering a failing value to no canary traffic. And
//! what a settled Deployment costs: the API requests the controller makes when it reconciles one.
//! `cargo bench --bench controller_latency` (FLEDGE_BENCH_RUNS, default 50).
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fledge::core::objects::SplitApi;
use fledge::core::rollout::machine::Command;
use fledge::runtime::controller;
use serde_json::{Value, json};
use support::apiserver::{ApiServer, ApiServerConfig, UserInfo};

const NS: &str = "bench";
const WAIT: Duration = Duration::from_secs(30);
const SPLITS: &str = "split.smi-spec.io/v1alpha2/trafficsplits";
const DEPLOYMENTS: &str = "apps/v1/deployments";

fn deployment(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS,
                     "labels": {"app": "web", "fledge.dev/enabled": "true"},
                     "annotations": {"fledge.dev/steps": "- setWeight: 50\n- pause: {}\n"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": image}]}}},
    })
}

async fn apply(api: &ApiServer, object: &Value) -> Result<(), Box<dyn std::error::Error>> {
    let resource = match object["kind"].as_str() {
        Some("Service") => {
            kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&())
        }
        _ => kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
    };
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(api.client(), NS, &resource);
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    api.patch(
        name,
        &kube::api::PatchParams::apply("bench").force(),
        &kube::api::Patch::Apply(object),
    )
    .await?;
    Ok(())
}

fn canary_weight(split: Option<&Value>) -> Option<u64> {
    split?["spec"]["backends"][1]["weight"].as_u64()
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} runs (target p99 < 100 ms: {})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        samples.len(),
        if at(0.99) < Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        }
    );
}

/// A check's server that always answers an error rate of 50 %, and the moment it last answered.
async fn failing_check_server() -> Result<
    (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    ),
    Box<dyn std::error::Error>,
> {
    use std::sync::{Arc, Mutex};
    let answered: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stamp = answered.clone();
    let app = axum::Router::new().route(
        "/errors",
        axum::routing::get(move || {
            let stamp = stamp.clone();
            async move {
                if let Ok(mut at) = stamp.lock() {
                    *at = Some(Instant::now());
                }
                axum::Json(json!({"errors": 0.5}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, answered))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::var("FLEDGE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let webhook = support::webhook::start();
    let api = ApiServer::start(ApiServerConfig {
        webhooks: vec![webhook.config.clone()],
        namespaces: vec![NS.into()],
        record_history: false,
        ..ApiServerConfig::default()
    })
    .await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("fledge");
    let metrics = controller::ControllerMetrics::register(&mut registry);
    let reconciles = |registry: &prometheus_client::registry::Registry| -> u64 {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, registry);
        text.lines()
            .filter(|l| l.starts_with("fledge_controller_reconciles_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // The controller under its own name, so that its requests can be counted.
    let fledge_user = UserInfo::service_account("fledge", "fledge");
    let controller = tokio::spawn(controller::run(
        api.client_as(fledge_user.clone()),
        controller::ControllerConfig {
            namespace: Some(NS.into()),
            split_api: SplitApi::V1Alpha2,
            metrics: metrics.clone(),
            prometheus_address: None,
            policies: fledge::runtime::policies::PolicyWatch::spawn(
                api.client_as(fledge_user.clone()),
                Some(NS.into()),
            ),
            clock: fledge::runtime::clock::Clock::system(),
        },
        std::future::pending(),
    ));
    apply(
        &api,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
                         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
    )
    .await?;
    apply(&api, &deployment("web:0")).await?;
    api.wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
        d.is_some_and(|d| d["status"]["availableReplicas"] == 2)
    })
    .await?;
    let (mut to_canary, mut to_stable, mut reverted) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let started = Instant::now();
        apply(&api, &deployment(&format!("web:{run}"))).await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| s.is_some())
            .await?;
        api.wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_some())
            .await?;
        to_canary.push(started.elapsed());
        api.wait_for(SPLITS, NS, "web", WAIT, |s| canary_weight(s) == Some(5000))
            .await?;
        let started = Instant::now();
        fledge::runtime::commands::run(api.client(), NS, "web", Command::Abort).await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| {
            canary_weight(s).is_none_or(|w| w == 0)
        })
        .await?;
        to_stable.push(started.elapsed());
        api.wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
            .await?;
        // Another template, and then the stable one again: a rollback.
        apply(&api, &deployment(&format!("web:{run}b"))).await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| canary_weight(s) == Some(5000))
            .await?;
        let started = Instant::now();
        apply(&api, &deployment("web:0")).await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| {
            canary_weight(s).is_none_or(|w| w == 0)
        })
        .await?;
        reverted.push(started.elapsed());
        api.wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
            .await?;
    }
    // A failing measurement: from the moment the check's server answered with a bad value to
    // no canary traffic. The check starts at the pause, after the 50 % step.
    let (check_addr, answered) = failing_check_server().await?;
    let mut failed = Vec::new();
    for run in 1..=runs {
        let mut d = deployment(&format!("web:f{run}"));
        d["metadata"]["annotations"]["fledge.dev/analysis"] = json!(format!(
            "- name: error-rate\n  interval: 1s\n  startingStep: 1\n  successCondition: result < 0.01\n  web:\n    url: http://{check_addr}/errors\n    jsonPath: $.errors\n"
        ));
        apply(&api, &d).await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| canary_weight(s) == Some(5000))
            .await?;
        api.wait_for(SPLITS, NS, "web", WAIT, |s| {
            canary_weight(s).is_none_or(|w| w == 0)
        })
        .await?;
        let done = Instant::now();
        let answered_at = answered
            .lock()
            .map_err(|_| "poisoned")?
            .take()
            .ok_or("the check's server was never asked")?;
        failed.push(done.saturating_duration_since(answered_at));
        api.wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
            .await?;
    }
    apply(&api, &deployment("web:0")).await?;
    // A settled Deployment: changes that are not fledge's business make the controller
    // reconcile it; count what that costs beyond its watches.
    api.wait_for(SPLITS, NS, "web", WAIT, |s| s.is_none())
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = api.requests_by(&fledge_user).len();
    let reconciled_before = reconciles(&registry);
    let touches = 20;
    for i in 0..touches {
        let mut touched = deployment("web:0");
        touched["metadata"]["labels"]["touched"] = json!(i.to_string());
        apply(&api, &touched).await?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let settled: Vec<_> = api.requests_by(&fledge_user)[before..]
        .iter()
        .filter(|r| r.verb != "watch" && r.verb != "list")
        .cloned()
        .collect();
    let writes = settled
        .iter()
        .filter(|r| !matches!(r.verb, "get" | "list" | "watch"))
        .count();
    println!(
        "settled Deployment: {touches} changes that are not fledge's business, {} reconciles, {} API requests beyond the watches, {writes} of them writes (target 0 writes: {})",
        reconciles(&registry) - reconciled_before,
        settled.len(),
        if writes == 0 { "met" } else { "NOT met" }
    );
    report(
        "new template applied -> canary Deployment and TrafficSplit exist",
        to_canary,
    );
    report("fledge abort -> canary weight 0", to_stable);
    report("failing measurement answered -> canary weight 0", failed);
    report(
        "revert (stable template applied) -> canary weight 0",
        reverted,
    );
    controller.abort();
    Ok(())
}
