//! Analysis end to end through the API server stand-in: fledge's real webhook and controller,
//! checks measured against real servers (an HTTP server in the test for web checks, a real
//! Prometheus for metric checks, stand-in Jobs for job checks).
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};
use support::e2e::*;

use fledge::core::analysis::Outcome;
use fledge::core::analysis::schedule::RunPhase;
use fledge::core::rollout::Phase;

/// What the test's health endpoint answers, changed by the test as it goes.
#[derive(Clone)]
struct Health {
    /// `{"errors": <this>}`; `None` answers `{}` (no value at the JSONPath).
    errors: Arc<Mutex<Option<f64>>>,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    /// The `svc` query parameter of the last request: the expanded `{{canaryService}}`.
    last_service: Arc<Mutex<String>>,
}

impl Health {
    fn set(&self, errors: Option<f64>, status: u16) {
        *self.errors.lock().unwrap() = errors;
        self.status.store(status, Ordering::SeqCst);
    }
}

async fn health_server() -> (SocketAddr, Health) {
    let health = Health {
        errors: Arc::new(Mutex::new(Some(0.0))),
        status: Arc::new(AtomicU16::new(200)),
        hits: Arc::default(),
        last_service: Arc::default(),
    };
    async fn answer(
        State(h): State<Health>,
        Query(query): Query<std::collections::HashMap<String, String>>,
    ) -> (StatusCode, axum::Json<Value>) {
        h.hits.fetch_add(1, Ordering::SeqCst);
        *h.last_service.lock().unwrap() = query.get("svc").cloned().unwrap_or_default();
        let body = match *h.errors.lock().unwrap() {
            Some(e) => json!({"errors": e}),
            None => json!({}),
        };
        let status = StatusCode::from_u16(h.status.load(Ordering::SeqCst)).unwrap();
        (status, axum::Json(body))
    }
    let app = axum::Router::new()
        .route("/health", get(answer))
        .with_state(health.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, health)
}

/// A web check `name` on the test's health endpoint, with `extra` YAML fields.
fn web_check(name: &str, addr: SocketAddr, extra: &str) -> String {
    let mut text = format!(
        "- name: {name}\n  interval: 1s\n  successCondition: result < 0.01\n  web:\n    url: http://{addr}/health?svc={{{{canaryService}}}}\n    jsonPath: $.errors\n    timeout: 2s\n"
    );
    for line in extra.lines() {
        text.push_str(&format!("  {line}\n"));
    }
    text
}

/// `web` at `image` with `steps` and the checks `analysis`.
fn analysed(image: &str, steps: &str, analysis: &str) -> Value {
    let mut d = deployment(image, steps);
    d["metadata"]["annotations"]["fledge.dev/analysis"] = json!(analysis);
    d
}

/// A cluster with the root Service and v1 of `web` (with `steps` and `checks`) available.
async fn stable_analysed(steps: &str, checks: &str) -> Cluster {
    let c = cluster().await;
    apply(&c.api, root_service()).await;
    apply(&c.api, analysed("web:1", steps, checks)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
        })
        .await
        .unwrap();
    c
}

fn run_of(d: Option<&Value>, check: &str) -> Option<fledge::core::analysis::schedule::CheckRun> {
    state(d)?.checks.get(check).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analysis_step_measures_and_a_healthy_canary_is_promoted() {
    let (addr, health) = health_server().await;
    let steps = "- setWeight: 20\n- analysis: {checks: [smoke]}\n- setWeight: 60\n";
    let checks = web_check("smoke", addr, "count: 2");
    let c = stable_analysed(steps, &checks).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(image(&done), "web:2");
    assert_eq!(split_weights(&c.api), vec![0, 2000, 6000, 10_000, 0]);
    assert_eq!(*health.last_service.lock().unwrap(), "web-canary");
    let run = run_of(Some(&done), "smoke").unwrap();
    assert_eq!(
        (run.phase, run.taken, run.successful),
        (RunPhase::Successful, 2, 2)
    );
    let indexes: Vec<u32> = run.measurements.iter().map(|m| m.index).collect();
    assert_eq!(indexes, [0, 1]);
    assert!(
        run.measurements[1]
            .at
            .duration_since(run.measurements[0].at)
            >= k8s_openapi::jiff::SignedDuration::from_millis(900),
        "one interval apart"
    );
    assert_eq!(events_with_reason(&c.api, "AnalysisPassed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_background_check_aborts_within_an_interval_and_says_why() {
    let (addr, health) = health_server().await;
    let steps = "- setWeight: 20\n- pause: {}\n- setWeight: 60\n";
    let checks = web_check("error-rate", addr, "failureLimit: 1");
    let c = stable_analysed(steps, &checks).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            run_of(d, "error-rate").is_some_and(|r| r.successful >= 2)
        })
        .await
        .unwrap();
    health.set(Some(0.071), 200);
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    let s = state(Some(&aborted)).unwrap();
    assert!(
        s.message.starts_with(
            r#"error-rate: 0.071 is not "result < 0.01" (2 failures, limit 1): aborted, traffic back to stable."#
        ),
        "{}",
        s.message
    );
    assert!(
        s.message.contains("kubectl fledge retry web"),
        "{}",
        s.message
    );
    let run = &s.checks["error-rate"];
    assert_eq!(run.phase, RunPhase::Failed);
    let failed: Vec<_> = run
        .measurements
        .iter()
        .filter(|m| m.outcome == Outcome::Failed)
        .collect();
    assert_eq!(failed.len(), 2);
    // The first failure to the abort: one interval, give or take the measurement.
    let first = failed[0].at;
    let second = failed[1].at;
    assert!(second.duration_since(first) < k8s_openapi::jiff::SignedDuration::from_millis(2500));
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api).last(), Some(&0));
    assert_held(&c.api, "web:2", "web:1");
    assert_eq!(events_with_reason(&c.api, "AnalysisFailed"), 1);
    assert!(events_with_reason(&c.api, "MeasurementFailed") >= 1);
    let text = fledge(&c.api, &["status", "web"]).await;
    assert!(text.contains("error-rate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_data_holds_the_canary_until_promote_and_errors_abort_past_their_limit() {
    let (addr, health) = health_server().await;
    let steps = "- setWeight: 20\n- analysis: {checks: [smoke]}\n- setWeight: 60\n- pause: {}\n";
    let checks = format!(
        "{}{}",
        web_check("smoke", addr, ""),
        web_check(
            "availability",
            addr,
            "consecutiveErrorLimit: 2\nstartingStep: 2"
        )
    );
    let c = stable_analysed(steps, &checks).await;
    health.set(None, 200);
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    let held = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            run_of(d, "smoke").is_some_and(|r| r.phase == RunPhase::Inconclusive)
                && phase(d) == Some(Phase::Paused)
        })
        .await
        .unwrap()
        .unwrap();
    let s = state(Some(&held)).unwrap();
    assert_eq!(s.weight.to_string(), "20");
    assert!(s.message.contains("smoke: no data"), "{}", s.message);
    assert!(
        s.message.contains("kubectl fledge promote web"),
        "{}",
        s.message
    );
    assert_eq!(events_with_reason(&c.api, "AnalysisInconclusive"), 1);
    // Still held a while later: nothing measures an inconclusive run again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        phase(c.api.get(DEPLOYMENTS, NS, "web").as_ref()),
        Some(Phase::Paused)
    );
    health.set(Some(0.0), 503);
    fledge(&c.api, &["promote", "web"]).await;
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    let s = state(Some(&aborted)).unwrap();
    let run = &s.checks["availability"];
    assert_eq!((run.phase, run.consecutive_errors), (RunPhase::Error, 3));
    assert!(
        s.message.starts_with("availability: ")
            && s.message.contains("(3 errors in a row, limit 2)"),
        "{}",
        s.message
    );
    assert!(s.message.contains("503"), "{}", s.message);
    assert_eq!(events_with_reason(&c.api, "AnalysisError"), 1);
}

/// The error-rate check of the issue, on the test's Prometheus, over a short window.
fn error_rate_check(prom: &support::prometheus::Prometheus, extra: &str) -> String {
    let mut text = format!(
        "- name: error-rate\n  interval: 2s\n  successCondition: result < 0.01\n  prometheus:\n    address: {}\n    query: sum(rate(http_requests_total{{service=\"{{{{canaryService}}}}\",code=~\"5..\"}}[5s])) / sum(rate(http_requests_total{{service=\"{{{{canaryService}}}}\"}}[5s]))\n",
        prom.url()
    );
    for line in extra.lines() {
        text.push_str(&format!("  {line}\n"));
    }
    text
}

/// Requests to `web-canary` as the exporter counts them, every 100 ms: `errors` of each 100 fail
/// (the test changes it as it goes).
fn traffic(prom: &support::prometheus::Prometheus, errors: Arc<AtomicU16>) -> impl Fn() + use<> {
    let count = prom.exporter().counter();
    let task = tokio::spawn(async move {
        loop {
            let failing = u64::from(errors.load(Ordering::SeqCst));
            count("web-canary", "200", 100 - failing);
            count("web-canary", "500", failing);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    move || task.abort()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_promotes_a_healthy_canary_and_aborts_it_once_its_error_rate_rises() {
    let prom = support::prometheus::Prometheus::start().await;
    let errors = Arc::new(AtomicU16::new(0));
    let stop_traffic = traffic(&prom, errors.clone());
    prom.wait_for_scrape().await;
    prom.wait_for_scrape().await;
    let steps =
        "- setWeight: 20\n- pause: {duration: 5s}\n- setWeight: 60\n- pause: {duration: 2s}\n";
    let checks = error_rate_check(&prom, "");
    let c = stable_analysed(steps, &checks).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    let run = run_of(Some(&done), "error-rate").unwrap();
    assert!(run.successful >= 3, "{run:?}");
    assert_eq!(
        (run.failed, run.errors, run.inconclusive),
        (0, 0, 0),
        "{run:?}"
    );
    assert_eq!(run.measurements.last().unwrap().value, "0");
    let metrics = c.metrics.encode().unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            r#"fledge_analysis_measurements_total{namespace="shop",deployment="web",check="error-rate",outcome="Successful"}"#
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"fledge_analysis_last_value{namespace="shop",deployment="web",check="error-rate"} 0"#
        ),
        "{metrics}"
    );

    // The same canary again (v3), and its error rate rises after its first good measurements.
    let checks = error_rate_check(&prom, "");
    apply(
        &c.api,
        analysed("web:3", "- setWeight: 20\n- pause: {}\n", &checks),
    )
    .await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| {
                s.checks
                    .get("error-rate")
                    .is_some_and(|r| r.successful >= 2)
            })
        })
        .await
        .unwrap();
    errors.store(10, Ordering::SeqCst);
    let rose = k8s_openapi::jiff::Timestamp::now();
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    stop_traffic();
    let s = state(Some(&aborted)).unwrap();
    let run = &s.checks["error-rate"];
    let failed = run.measurements.last().unwrap();
    assert_eq!((failed.outcome, run.failed), (Outcome::Failed, 1));
    assert!(
        s.message.starts_with("error-rate: 0.")
            && s.message
                .contains(r#"is not "result < 0.01" (1 failure, limit 0)"#),
        "{}",
        s.message
    );
    // One interval (2 s) plus the scrape and the rate window catching up.
    assert!(
        failed.at.duration_since(rose) < k8s_openapi::jiff::SignedDuration::from_secs(6),
        "aborted {} after the rise",
        failed.at.duration_since(rose)
    );
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api).last(), Some(&0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_vector_is_inconclusive_and_a_stopped_prometheus_aborts_at_the_error_limit() {
    let mut prom = support::prometheus::Prometheus::start().await;
    let steps = "- setWeight: 20\n- pause: {}\n";
    // No traffic at all: the query returns an empty vector.
    let checks = error_rate_check(&prom, "");
    let c = stable_analysed(steps, &checks).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    let held = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            run_of(d, "error-rate").is_some_and(|r| r.phase == RunPhase::Inconclusive)
        })
        .await
        .unwrap()
        .unwrap();
    let run = run_of(Some(&held), "error-rate").unwrap();
    assert_eq!(run.measurements[0].outcome, Outcome::Inconclusive);
    assert_eq!(state(Some(&held)).unwrap().weight.to_string(), "20");

    // Traffic, a measurement that passes, then Prometheus goes away.
    let errors = Arc::new(AtomicU16::new(0));
    let stop_traffic = traffic(&prom, errors);
    prom.wait_for_scrape().await;
    prom.wait_for_scrape().await;
    let checks = error_rate_check(&prom, "consecutiveErrorLimit: 2");
    apply(&c.api, analysed("web:3", steps, &checks)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.hash != state(Some(&held)).unwrap().hash)
                && run_of(d, "error-rate").is_some_and(|r| r.successful >= 1)
        })
        .await
        .unwrap();
    prom.stop().await;
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    stop_traffic();
    let s = state(Some(&aborted)).unwrap();
    let run = &s.checks["error-rate"];
    assert_eq!((run.phase, run.consecutive_errors), (RunPhase::Error, 3));
    assert!(
        s.message.contains("(3 errors in a row, limit 2)"),
        "{}",
        s.message
    );
    assert!(s.message.contains("Connection refused"), "{}", s.message);
    assert_eq!(events_with_reason(&c.api, "AnalysisError"), 1);
    assert!(events_with_reason(&c.api, "MeasurementError") >= 1);
}

fn smoke_job() -> String {
    "- name: smoke\n  job:\n    spec:\n      backoffLimit: 0\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n            - name: smoke\n              image: curlimages/curl:8.11.1\n              args: [\"-fsS\", \"http://{{canaryService}}/healthz\"]\n".to_owned()
}

/// The Jobs fledge made for `web`.
fn jobs(c: &Cluster) -> Vec<Value> {
    c.api
        .list("batch/v1/jobs", Some(NS))
        .into_iter()
        .filter(|j| j["metadata"]["labels"]["fledge.dev/deployment"] == "web")
        .collect()
}

async fn wait_for_jobs(c: &Cluster, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        let found = jobs(c);
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {n} Jobs: {:?}", jobs(c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_test_job_gates_the_step_and_a_failed_one_aborts_naming_the_job() {
    let steps = "- setWeight: 20\n- analysis: {checks: [smoke]}\n- setWeight: 60\n";
    let c = stable_analysed(steps, &smoke_job()).await;
    apply(&c.api, analysed("web:2", steps, &smoke_job())).await;
    let job = wait_for_jobs(&c, 1).await.remove(0);
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_eq!(
        job["metadata"]["ownerReferences"][0]["uid"],
        web["metadata"]["uid"]
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][1],
        "http://web-canary/healthz"
    );
    // Waiting for the Job: the step does not pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref()).unwrap();
    assert_eq!(waiting.step, 1, "{}", waiting.message);
    c.api.complete_job(NS, &name).await.unwrap();
    wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(jobs(&c).len(), 1, "one Job per run");
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |_| jobs(&c).is_empty())
        .await
        .unwrap();

    // A failing smoke test aborts, and the message names the Job.
    apply(&c.api, analysed("web:3", steps, &smoke_job())).await;
    let job = wait_for_jobs(&c, 1).await.remove(0);
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    c.api
        .fail_job(
            NS,
            &name,
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )
        .await
        .unwrap();
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    let s = state(Some(&aborted)).unwrap();
    assert!(s.message.starts_with("smoke: "), "{}", s.message);
    assert!(
        s.message
            .contains(&format!("kubectl logs job/{name} -n {NS}")),
        "{}",
        s.message
    );
    assert!(s.message.contains("BackoffLimitExceeded"), "{}", s.message);
    assert_eq!(
        jobs(&c).len(),
        1,
        "an aborted canary keeps its Job for the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_between_measurements_and_during_a_job_neither_repeats_nor_skips() {
    let (addr, _health) = health_server().await;
    let steps = "- setWeight: 20\n- analysis: {checks: [smoke]}\n- setWeight: 60\n- pause: {duration: 4s}\n";
    let checks = format!("{}{}", smoke_job(), web_check("latency", addr, "count: 8"));
    let mut c = stable_analysed(steps, &checks).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    // Killed during the Job, twice, and started again each time.
    let job = wait_for_jobs(&c, 1).await.remove(0);
    for _ in 0..2 {
        c.controller_task.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.controller_task = start_controller(&c.api, &c.metrics);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(
        jobs(&c).len(),
        1,
        "the restarted controller adopted the Job"
    );
    c.api
        .complete_job(NS, job["metadata"]["name"].as_str().unwrap())
        .await
        .unwrap();
    // Killed between the background check's measurements, at random points of its 1 s interval.
    for pause in [450, 1300, 800, 200] {
        c.api
            .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
                run_of(d, "latency").is_some_and(|r| r.taken >= 1)
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(pause)).await;
        c.controller_task.abort();
        tokio::time::sleep(Duration::from_millis(pause / 2)).await;
        c.controller_task = start_controller(&c.api, &c.metrics);
    }
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    let run = run_of(Some(&done), "latency").unwrap();
    let indexes: Vec<u32> = run.measurements.iter().map(|m| m.index).collect();
    assert_eq!(
        indexes,
        (0..8).collect::<Vec<_>>(),
        "no duplicates, no gaps"
    );
    assert_eq!(run.taken, 8);
    assert_eq!(run_of(Some(&done), "smoke").unwrap().taken, 1);
    // The Deployment's history: no stored state ever held a measurement twice.
    let mut seen = std::collections::BTreeSet::new();
    for version in c.api.history_of("deployments.apps", NS, "web") {
        if let Some(s) = state(Some(&version.object))
            && let Some(r) = s.checks.get("latency")
        {
            for m in &r.measurements {
                seen.insert((m.index, m.at));
            }
        }
    }
    let per_index: std::collections::BTreeMap<u32, usize> =
        seen.iter().fold(Default::default(), |mut acc, (i, _)| {
            *acc.entry(*i).or_default() += 1;
            acc
        });
    assert!(
        per_index.values().all(|n| *n == 1),
        "each measurement stored once: {per_index:?}"
    );
}
