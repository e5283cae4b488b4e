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

fn run_of(d: Option<&Value>, check: &str) -> Option<fledge::core::analysis::schedule::CheckRun> {
    state(d)?.checks.get(check).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analysis_step_measures_and_a_healthy_canary_is_promoted() {
    let (addr, health) = health_server().await;
    let steps = "- setWeight: 20\n- analysis: {checks: [smoke]}\n- setWeight: 60\n";
    let checks = web_check("smoke", addr, "count: 2");
    let c = stable_v1(steps).await;
    apply(&c.api, analysed("web:1", steps, &checks)).await;
    apply(&c.api, analysed("web:2", steps, &checks)).await;
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(image(&done), "web:2");
    assert_eq!(split_weights(&c.api), vec![0, 2000, 6000, 10_000, 0]);
    assert_eq!(*health.last_service.lock().unwrap(), "web-canary");
    let run = run_of(Some(&done), "smoke").unwrap();
    assert_eq!((run.phase, run.taken, run.successful), (RunPhase::Successful, 2, 2));
    let indexes: Vec<u32> = run.measurements.iter().map(|m| m.index).collect();
    assert_eq!(indexes, [0, 1]);
    assert!(
        run.measurements[1].at.duration_since(run.measurements[0].at)
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
    let c = stable_v1(steps).await;
    apply(&c.api, analysed("web:1", steps, &checks)).await;
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
    assert!(s.message.contains("kubectl fledge retry web"), "{}", s.message);
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
        web_check("availability", addr, "consecutiveErrorLimit: 2\nstartingStep: 2")
    );
    let c = stable_v1(steps).await;
    apply(&c.api, analysed("web:1", steps, &checks)).await;
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
    assert!(s.message.contains("kubectl fledge promote web"), "{}", s.message);
    assert_eq!(events_with_reason(&c.api, "AnalysisInconclusive"), 1);
    // Still held a while later: nothing measures an inconclusive run again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(phase(c.api.get(DEPLOYMENTS, NS, "web").as_ref()), Some(Phase::Paused));
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
