//! Resident memory of a real `fledge serve` process (webhook and controller) watching opted-in
//! Deployments spread over namespaces, against the API server stand-in, before and with canaries in
//! flight; with its startup, the requests a settled Deployment costs, and the webhook's latency
//! under the burst of template changes that starts the canaries.
//! `cargo bench --bench controller_memory` (FLEDGE_BENCH_DEPLOYMENTS=1000, FLEDGE_BENCH_NAMESPACES=100,
//! FLEDGE_BENCH_CANARIES=100; the issue's scale is 10000 and 1000).
//! With FLEDGE_BENCH_CHECKS=2 every canary also runs two background Prometheus checks every 10 s
//! against a real Prometheus, and the CPU fledge uses over FLEDGE_BENCH_WINDOW seconds (default 30)
//! is reported with the measurements it recorded.
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::apiserver::{ApiServer, ApiServerConfig};
use support::fleet::{self, BenchResult, Fleet};

const STEPS: &str = "- setWeight: 10\n- pause: {}\n";

/// Two kinds of Prometheus check about the canary's Service, `checks` of them, every 10 s.
fn analysis(checks: usize) -> String {
    (0..checks)
        .map(|i| {
            let query = if i % 2 == 0 {
                r#"sum(rate(http_requests_total{service="{{canaryService}}",code=~"5.."}[1m])) or vector(0)"#
            } else {
                r#"sum(rate(http_requests_total{service="{{canaryService}}"}[1m]))"#
            };
            format!(
                "- name: check-{i}\n  interval: 10s\n  successCondition: result >= 0\n  prometheus:\n    query: '{query}'\n"
            )
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BenchResult<()> {
    let fleet = Fleet::from_env(1000);
    let canaries = fleet::env_or("FLEDGE_BENCH_CANARIES", 100).min(fleet.deployments);
    let checks = fleet::env_or("FLEDGE_BENCH_CHECKS", 0);
    let window = Duration::from_secs(fleet::env_or("FLEDGE_BENCH_WINDOW", 30) as u64);
    let prometheus = if checks > 0 {
        let prom = support::prometheus::Prometheus::start().await;
        for i in 0..canaries {
            prom.exporter()
                .requests(&format!("app-{i}-canary"), "200", 100);
        }
        prom.wait_for_scrape().await;
        Some(prom)
    } else {
        None
    };
    let api = ApiServer::start(ApiServerConfig {
        namespaces: fleet.namespace_names(),
        record_history: false,
        ..ApiServerConfig::default()
    })
    .await;
    fleet.create(&api, STEPS).await?;
    let (serve, startup) =
        fleet::start_on(&api, &fleet, &prometheus_args(prometheus.as_ref())).await?;
    startup.print(&fleet);
    let settle = Duration::from_secs(10);
    let settled = fleet::settled_requests(&api, &serve, settle).await;
    let idle = serve.rss_mib()?;
    fleet::print_settled(&fleet, settled, settle, idle);

    api.set_webhooks(vec![serve.webhook()?]);
    let burst = fleet::burst(&api, &serve, &fleet, canaries, |ns, name| {
        let mut d = fleet::deployment(ns, name, "app:2", STEPS);
        if checks > 0 {
            d["metadata"]["annotations"]["fledge.dev/analysis"] = json!(analysis(checks));
        }
        d
    })
    .await?;
    burst.print();
    for i in 0..canaries {
        let (ns, name) = fleet.at(i);
        let waited = api
            .wait_for(fleet::SPLITS, &ns, &name, Duration::from_secs(300), |s| {
                s.is_some_and(|s| s["spec"]["backends"][1]["weight"] == 1000)
            })
            .await;
        if let Err(e) = waited {
            let state = api
                .get(fleet::DEPLOYMENTS, &ns, &name)
                .map(|d| d["metadata"]["annotations"]["fledge.dev/state"].clone());
            return Err(format!("{ns}/{name} never reached 10 % (state {state:?}): {e}").into());
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = serve.rss_mib()?;
    let verdict = |limit: f64| {
        if busy * 1.048_576 < limit {
            "met"
        } else {
            "NOT met"
        }
    };
    println!(
        "fledge serve (webhook + controller), {} opted-in Deployments in {} namespaces: resident {idle:.1} MiB; \
         with {canaries} canaries in flight at 10 %: {busy:.1} MiB (target < 256 MB: {}; aim < 128 MB: {})",
        fleet.deployments,
        fleet.namespaces,
        verdict(256.0),
        verdict(128.0),
    );
    if checks > 0 {
        let before = serve.cpu_seconds()?;
        tokio::time::sleep(window).await;
        let used = serve.cpu_seconds()? - before;
        let rss = serve.rss_mib()?;
        let mut measured = 0;
        let mut other = 0;
        for d in api.list(fleet::DEPLOYMENTS, None) {
            let Some(state) = d["metadata"]["annotations"]["fledge.dev/state"].as_str() else {
                continue;
            };
            let state: fledge::core::rollout::RolloutState = serde_json::from_str(state)?;
            for run in state.checks.values() {
                measured += run.taken;
                other += run.taken - run.successful;
            }
        }
        println!(
            "{canaries} canaries with {checks} Prometheus checks every 10 s each: over {}s, {:.1}% of one core \
             ({used:.2} s CPU), resident {rss:.1} MiB; {measured} measurements recorded in all, {other} not successful",
            window.as_secs(),
            used / window.as_secs_f64() * 100.0,
        );
    }
    Ok(())
}

fn prometheus_args(prometheus: Option<&support::prometheus::Prometheus>) -> Vec<String> {
    prometheus
        .iter()
        .flat_map(|p| ["--prometheus-address".to_owned(), p.url()])
        .collect()
}
