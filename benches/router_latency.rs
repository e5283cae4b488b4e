//! `fledge abort` → the canary takes no traffic, for each router, through the API server stand-in
//! (Gateway API CRD installed) with fledge's real webhook and controller: the TrafficSplit's canary
//! weight 0 (smi), the HTTPRoute's canary share 0 (gateway-api, fledge's own route and the user's),
//! and for pod ratio the canary scaled to no pod (its ReplicaSet with no ready pod: the pods have left
//! the root Service's endpoints). `cargo bench --bench router_latency` (FLEDGE_BENCH_RUNS, default 30).
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fledge::core::rollout::Phase;
use fledge::core::rollout::machine::Command;
use fledge::core::routes::canary_share;
use serde_json::{Value, json};
use support::apiserver::ControllerConfig;
use support::e2e::{
    Cluster, DEPLOYMENTS, NS, SPLITS, WAIT, apply, cluster_with_crds, deployment, gateway_api_crd,
    root_service, state, user_route,
};

const ROUTES: &str = "gateway.networking.k8s.io/v1/httproutes";
const STEPS: &str = "- setWeight: 50\n- pause: {}\n";

/// What tells that the canary takes no traffic any more.
#[derive(Clone, Copy)]
enum Gone {
    SplitWeight,
    RouteShare(&'static str),
    CanaryPods,
}

impl Gone {
    fn done(self, c: &Cluster) -> bool {
        match self {
            Gone::SplitWeight => c
                .api
                .get(SPLITS, NS, "web")
                .is_none_or(|s| s["spec"]["backends"][1]["weight"].as_u64() == Some(0)),
            Gone::RouteShare(route) => c.api.get(ROUTES, NS, route).is_none_or(|r| {
                r["spec"]["rules"]
                    .as_array()
                    .and_then(|rules| canary_share(rules, "web-canary"))
                    .is_none_or(|w| w.basis_points() == 0)
            }),
            Gone::CanaryPods => c
                .api
                .list("apps/v1/replicasets", Some(NS))
                .iter()
                .filter(|rs| rs["metadata"]["labels"]["fledge.dev/track"] == "canary")
                .all(|rs| rs["status"]["readyReplicas"].as_u64().unwrap_or(0) == 0),
        }
    }
}

fn with_router(mut d: Value, router: &[(&str, &str)]) -> Value {
    for (k, v) in router {
        d["metadata"]["annotations"][*k] = json!(v);
    }
    d
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} runs",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        samples.len(),
    );
}

async fn measure(
    name: &str,
    router: &[(&str, &str)],
    user_route_too: bool,
    gone: &[(&str, Gone)],
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let c = cluster_with_crds(ControllerConfig::default(), vec![gateway_api_crd()]).await;
    apply(&c.api, root_service()).await;
    if user_route_too {
        c.api.create(ROUTES, NS, user_route()).await?;
    }
    apply(&c.api, with_router(deployment("web:0", STEPS), router)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
        })
        .await?;
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); gone.len()];
    for run in 1..=runs {
        apply(
            &c.api,
            with_router(deployment(&format!("web:{run}"), STEPS), router),
        )
        .await;
        c.api
            .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
                state(d)
                    .is_some_and(|s| s.phase == Phase::Paused && s.weight.basis_points() == 5000)
            })
            .await?;
        let started = Instant::now();
        fledge::runtime::commands::run(c.api.client(), NS, "web", Command::Abort).await?;
        let mut pending: Vec<usize> = (0..gone.len()).collect();
        while !pending.is_empty() {
            pending.retain(|i| {
                if gone[*i].1.done(&c) {
                    samples[*i].push(started.elapsed());
                    false
                } else {
                    true
                }
            });
            tokio::time::sleep(Duration::from_millis(1)).await;
            if started.elapsed() > WAIT {
                return Err(
                    format!("{name}: the canary still takes traffic after {WAIT:?}").into(),
                );
            }
        }
        c.api
            .wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
            .await?;
    }
    for ((what, _), samples) in gone.iter().zip(samples) {
        report(&format!("{name}: fledge abort -> {what}"), samples);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::var("FLEDGE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    measure(
        "smi",
        &[],
        false,
        &[("TrafficSplit canary weight 0", Gone::SplitWeight)],
        runs,
    )
    .await?;
    measure(
        "gateway-api (GAMMA)",
        &[("fledge.dev/router", "gateway-api")],
        false,
        &[("HTTPRoute canary share 0", Gone::RouteShare("web"))],
        runs,
    )
    .await?;
    measure(
        "gateway-api (the user's route)",
        &[
            ("fledge.dev/router", "gateway-api"),
            ("fledge.dev/http-routes", "web-public"),
        ],
        true,
        &[("HTTPRoute canary share 0", Gone::RouteShare("web-public"))],
        runs,
    )
    .await?;
    measure(
        "pod-ratio",
        &[("fledge.dev/router", "pod-ratio")],
        false,
        &[(
            "no ready canary pod (out of the root Service)",
            Gone::CanaryPods,
        )],
        runs,
    )
    .await?;
    Ok(())
}
