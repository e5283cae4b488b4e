//! The analysis providers against real counterparts: the real Prometheus server scraping an
//! exporter the test drives, an HTTP stub that records what it is sent, and Jobs in the API
//! server stand-in.
mod support;

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use serde_json::{Value, json};

use fledge::core::analysis::schedule::job_name;
use fledge::core::analysis::{
    Check, JobCheck, NoData, PrometheusAuth, PrometheusQuery, Provider, Reading, SecretValue,
    Variables, WebRequest,
};
use fledge::runtime::analysis::{
    LABEL_CANARY_HASH, LABEL_CHECK, LABEL_DEPLOYMENT, MeasureContext, delete_jobs, http_client,
    measure,
};
use support::apiserver::{ApiServer, ApiServerConfig, ChangeKind, ControllerConfig};
use support::http_stub::HttpStub;
use support::prometheus::Prometheus;

const NS: &str = "shop";
const HASH: &str = "0123456789abcdef0123";
const JOBS: &str = "batch/v1/jobs";
const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    api: ApiServer,
    ctx: MeasureContext,
}

/// The stand-in (no deployment controller) with namespace `shop` and Deployment `web`, and a
/// context measuring for its canary.
async fn fixture() -> Fixture {
    let api = ApiServer::start(ApiServerConfig {
        namespaces: vec![NS.into()],
        controller: ControllerConfig {
            enabled: false,
            ..ControllerConfig::default()
        },
        ..ApiServerConfig::default()
    })
    .await;
    let deployment = api
        .create(
            "apps/v1/deployments",
            NS,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
                    },
                },
            }),
        )
        .await
        .expect("the Deployment");
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: "web".into(),
        uid: deployment["metadata"]["uid"].as_str().unwrap().into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let ctx = MeasureContext {
        client: api.client(),
        http: http_client().expect("an HTTP client"),
        namespace: NS.into(),
        default_prometheus: None,
        variables: Variables {
            namespace: NS.into(),
            deployment: "web".into(),
            canary_service: "web-canary".into(),
            stable_service: "web-stable".into(),
            root_service: "web".into(),
            canary_hash: HASH.into(),
            stable_pod_template_hash: "5d8f9c".into(),
            interval: "30s".into(),
        },
        owner,
    };
    Fixture { api, ctx }
}

fn check(name: &str, provider: Provider) -> Check {
    Check {
        name: name.into(),
        interval: Duration::from_secs(30),
        count: Some(1),
        initial_delay: Duration::ZERO,
        success_condition: None,
        failure_condition: None,
        failure_limit: 0,
        inconclusive_limit: 0,
        consecutive_error_limit: 0,
        no_data: NoData::default(),
        dry_run: false,
        starting_step: None,
        provider,
    }
}

fn prometheus(query: &str, address: Option<&str>) -> Check {
    check(
        "errors",
        Provider::Prometheus(PrometheusQuery {
            query: query.into(),
            address: address.map(String::from),
            timeout: Duration::from_secs(5),
            auth: None,
        }),
    )
}

fn web(url: &str, json_path: Option<&str>) -> WebRequest {
    WebRequest {
        url: url.into(),
        method: "GET".into(),
        headers: Vec::new(),
        body: None,
        json_path: json_path.map(String::from),
        timeout: Duration::from_secs(5),
    }
}

fn error_text(reading: &Reading) -> &str {
    match reading {
        Reading::Error(text) => text,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn secret(api: &ApiServer, name: &str, key: &str, value: &str) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(value);
    api.create(
        "v1/secrets",
        NS,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
               "data": {key: encoded}}),
    )
    .await
    .expect("the Secret");
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_values_vectors_no_data_and_errors() {
    let mut f = fixture().await;
    let prom = Prometheus::start().await;
    let exporter = prom.exporter();
    exporter.requests("web-canary", "200", 90);
    exporter.requests("web-canary", "500", 10);
    exporter.requests("web-stable", "200", 100);
    prom.wait_for_scrape().await;
    f.ctx.default_prometheus = Some(prom.url());

    // One sample, with variables expanded, at the default address.
    let ratio = r#"sum(http_requests_total{service="{{canaryService}}",code=~"5.."})
                   / sum(http_requests_total{service="{{canaryService}}"})"#;
    assert_eq!(
        measure(&f.ctx, &prometheus(ratio, None), "").await,
        Reading::Value(json!(0.1))
    );
    // Several samples: a list; the check's own address (with a trailing slash) wins.
    let several = prometheus(
        r#"http_requests_total{service=~"web-.*",code="200"}"#,
        Some(&format!("{}/", prom.url())),
    );
    f.ctx.default_prometheus = Some("http://127.0.0.1:1".into());
    let Reading::Value(Value::Array(values)) = measure(&f.ctx, &several, "").await else {
        panic!("a list")
    };
    let mut values: Vec<f64> = values.iter().map(|v| v.as_f64().unwrap()).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![90.0, 100.0]);
    f.ctx.default_prometheus = Some(prom.url());

    // Nothing there: an empty vector, the scalar of an empty vector, NaN.
    for query in [
        r#"http_requests_total{service="nope"}"#,
        r#"scalar(http_requests_total{service="nope"})"#,
        "0/0",
    ] {
        assert_eq!(
            measure(&f.ctx, &prometheus(query, None), "").await,
            Reading::NoData,
            "{query}"
        );
    }
    assert_eq!(
        measure(&f.ctx, &prometheus("scalar(vector(2))", None), "").await,
        Reading::Value(json!(2.0))
    );

    // Errors name the address and say what is wrong.
    let bad = measure(&f.ctx, &prometheus("sum(", None), "").await;
    let text = error_text(&bad);
    assert!(
        text.starts_with(&format!("Prometheus at {}: bad_data: ", prom.url())),
        "{text}"
    );
    let matrix = measure(&f.ctx, &prometheus("http_requests_total[1m]", None), "").await;
    assert!(
        error_text(&matrix).contains("returned a matrix; use an instant vector or scalar"),
        "{matrix:?}"
    );
    let inf = measure(&f.ctx, &prometheus("1/0", None), "").await;
    assert!(error_text(&inf).contains("+Inf"), "{inf:?}");

    f.ctx.default_prometheus = None;
    let none = measure(&f.ctx, &prometheus("up", None), "").await;
    assert!(
        error_text(&none).contains("prometheus.address")
            && error_text(&none).contains("fledge serve --prometheus-address"),
        "{none:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_is_an_error_until_it_is_back() {
    let mut f = fixture().await;
    let mut prom = Prometheus::start().await;
    prom.exporter().requests("web-canary", "200", 5);
    prom.wait_for_scrape().await;
    f.ctx.default_prometheus = Some(prom.url());
    let query = prometheus(r#"sum(http_requests_total{service="web-canary"})"#, None);
    assert_eq!(
        measure(&f.ctx, &query, "").await,
        Reading::Value(json!(5.0))
    );

    prom.stop().await;
    let down = measure(&f.ctx, &query, "").await;
    let text = error_text(&down);
    assert!(
        text.starts_with(&format!("GET {}/api/v1/query: ", prom.url())),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");

    prom.restart().await;
    assert_eq!(
        measure(&f.ctx, &query, "").await,
        Reading::Value(json!(5.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_auth_comes_from_secrets_and_slow_answers_time_out() {
    let f = fixture().await;
    // Prometheus itself ignores credentials: the stub shows what was sent.
    let stub = HttpStub::start().await;
    stub.answer(
        200,
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"7"]}]}}"#,
    );
    secret(&f.api, "prom-token", "token", "s3cret\n").await;
    let with = |auth: PrometheusAuth, timeout: Duration| {
        let mut c = prometheus("up{service=\"{{canaryService}}\"}", Some(&stub.url()));
        if let Provider::Prometheus(q) = &mut c.provider {
            q.auth = Some(auth);
            q.timeout = timeout;
        }
        c
    };
    let key = |name: &str, key: &str| SecretValue::SecretKey {
        name: name.into(),
        key: key.into(),
    };
    let bearer = with(
        PrometheusAuth::Bearer(key("prom-token", "token")),
        Duration::from_secs(5),
    );
    assert_eq!(
        measure(&f.ctx, &bearer, "").await,
        Reading::Value(json!(7.0))
    );
    let sent = stub.requests().pop().unwrap();
    assert_eq!(sent.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(sent.method, "GET");
    assert_eq!(
        sent.uri,
        "/api/v1/query?query=up%7Bservice%3D%22web-canary%22%7D"
    );

    let basic = with(
        PrometheusAuth::Basic {
            username: SecretValue::Literal("fledge".into()),
            password: key("prom-token", "token"),
        },
        Duration::from_secs(5),
    );
    measure(&f.ctx, &basic, "").await;
    let expected = base64::engine::general_purpose::STANDARD.encode("fledge:s3cret");
    assert_eq!(
        stub.requests().pop().unwrap().header("authorization"),
        Some(format!("Basic {expected}").as_str())
    );

    // Missing Secrets and keys are named.
    let missing = with(
        PrometheusAuth::Bearer(key("nope", "token")),
        Duration::from_secs(5),
    );
    assert_eq!(
        measure(&f.ctx, &missing, "").await,
        Reading::Error("Secret shop/nope not found".into())
    );
    let missing = with(
        PrometheusAuth::Bearer(key("prom-token", "other")),
        Duration::from_secs(5),
    );
    assert_eq!(
        measure(&f.ctx, &missing, "").await,
        Reading::Error("Secret shop/prom-token has no key \"other\"".into())
    );

    // A Prometheus slower than the check's timeout.
    stub.delay(Duration::from_secs(3));
    let slow = with(
        PrometheusAuth::Bearer(key("prom-token", "token")),
        Duration::from_millis(300),
    );
    let started = std::time::Instant::now();
    assert_eq!(
        measure(&f.ctx, &slow, "").await,
        Reading::Error(format!(
            "GET {}/api/v1/query timed out after 300ms",
            stub.url()
        ))
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// Web

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_requests_expand_variables_send_secret_headers_and_read_json_paths() {
    let f = fixture().await;
    let stub = HttpStub::start().await;
    stub.answer(
        200,
        r#"{"service": "web-canary", "checks": [{"ok": true, "ms": 12}, {"ok": true, "ms": 30}]}"#,
    );
    secret(&f.api, "smoke", "key", "k3y").await;
    let request = WebRequest {
        method: "post".into(),
        headers: vec![
            (
                "X-Api-Key".into(),
                SecretValue::SecretKey {
                    name: "smoke".into(),
                    key: "key".into(),
                },
            ),
            (
                "X-Target".into(),
                SecretValue::Literal("{{canaryService}}.{{namespace}}".into()),
            ),
        ],
        body: Some(r#"{"hash": "{{canaryHash}}", "stable": "{{stablePodTemplateHash}}"}"#.into()),
        ..web(
            &format!(
                "{}/check/{{{{deployment}}}}?window={{{{interval}}}}",
                stub.url()
            ),
            Some("$.checks[*].ms"),
        )
    };
    let reading = measure(&f.ctx, &check("smoke", Provider::Web(request.clone())), "").await;
    assert_eq!(reading, Reading::Value(json!([12, 30])));
    let sent = stub.requests().pop().unwrap();
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.uri, "/check/web?window=30s");
    assert_eq!(sent.header("x-api-key"), Some("k3y"));
    assert_eq!(sent.header("x-target"), Some("web-canary.shop"));
    assert_eq!(
        sent.body,
        format!(r#"{{"hash": "{HASH}", "stable": "5d8f9c"}}"#)
    );

    // One node: that value; none: no data; no path: the whole JSON, or the text.
    let one = WebRequest {
        json_path: Some("$.service".into()),
        ..request.clone()
    };
    assert_eq!(
        measure(&f.ctx, &check("smoke", Provider::Web(one)), "").await,
        Reading::Value(json!("web-canary"))
    );
    let none = WebRequest {
        json_path: Some("$.missing".into()),
        ..request.clone()
    };
    assert_eq!(
        measure(&f.ctx, &check("smoke", Provider::Web(none)), "").await,
        Reading::NoData
    );
    stub.content_type("text/plain");
    stub.answer(200, "all good");
    let text = web(&stub.url(), None);
    assert_eq!(
        measure(&f.ctx, &check("smoke", Provider::Web(text)), "").await,
        Reading::Value(json!("all good"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_errors_name_the_request() {
    let f = fixture().await;
    let stub = HttpStub::start().await;
    let url = format!("{}/health", stub.url());

    stub.answer(503, "upstream down");
    let reading = measure(&f.ctx, &check("smoke", Provider::Web(web(&url, None))), "").await;
    assert_eq!(
        reading,
        Reading::Error(format!("GET {url} answered 503: upstream down"))
    );

    stub.answer(200, &"x".repeat(2 << 20));
    let reading = measure(&f.ctx, &check("smoke", Provider::Web(web(&url, None))), "").await;
    assert!(
        error_text(&reading).contains("larger than 1048576 bytes"),
        "{reading:?}"
    );

    stub.answer(200, "{}");
    stub.delay(Duration::from_secs(3));
    let slow = WebRequest {
        timeout: Duration::from_millis(200),
        ..web(&url, None)
    };
    assert_eq!(
        measure(&f.ctx, &check("smoke", Provider::Web(slow)), "").await,
        Reading::Error(format!("GET {url} timed out after 200ms"))
    );

    let bad_path = web(&url, Some("$.["));
    let reading = measure(&f.ctx, &check("smoke", Provider::Web(bad_path)), "").await;
    assert!(
        error_text(&reading).contains("invalid jsonPath"),
        "{reading:?}"
    );
    let reading = measure(
        &f.ctx,
        &check("smoke", Provider::Web(web("not a url", None))),
        "",
    )
    .await;
    assert!(error_text(&reading).contains("invalid URL"), "{reading:?}");
}

// ---------------------------------------------------------------------------------------------
// Jobs

fn job_check(args: &[&str]) -> Check {
    check(
        "smoke",
        Provider::Job(JobCheck {
            spec: json!({
                "backoffLimit": 0,
                "template": {"spec": {"containers": [
                    {"name": "smoke", "image": "curlimages/curl", "args": args}
                ]}},
            }),
        }),
    )
}

fn name(index: u32) -> String {
    job_name("web", HASH, "smoke", "s1", index)
}

fn creates(api: &ApiServer, name: &str) -> usize {
    api.history_of("jobs.batch", NS, name)
        .iter()
        .filter(|r| r.kind == ChangeKind::Added)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_created_owned_and_labelled_and_passes_when_complete() {
    let f = fixture().await;
    let check = job_check(&["http://{{canaryService}}.{{namespace}}/health"]);
    let job = name(0);
    let ctx = f.ctx.clone();
    let (c, j) = (check.clone(), job.clone());
    let running = tokio::spawn(async move { measure(&ctx, &c, &j).await });

    let created = f
        .api
        .wait_for(JOBS, NS, &job, WAIT, |j| j.is_some())
        .await
        .unwrap()
        .unwrap();
    let labels = &created["metadata"]["labels"];
    assert_eq!(labels[LABEL_DEPLOYMENT], "web");
    assert_eq!(labels[LABEL_CANARY_HASH], HASH);
    assert_eq!(labels[LABEL_CHECK], "smoke");
    let owner = &created["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["uid"]),
        (
            &json!("Deployment"),
            &json!("web"),
            &json!(f.ctx.owner.uid.clone())
        )
    );
    let pod = &created["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(
        pod["containers"][0]["args"],
        json!(["http://web-canary.shop/health"])
    );
    assert!(!running.is_finished(), "waits for the Job to end");

    f.api.complete_job(NS, &job).await.unwrap();
    let reading = tokio::time::timeout(WAIT, running).await.unwrap().unwrap();
    assert_eq!(
        reading,
        Reading::Finished {
            passed: true,
            message: format!("Job {NS}/{job} completed; logs: kubectl logs job/{job} -n {NS}")
        }
    );
    assert_eq!(creates(&f.api, &job), 1);

    // Deleting the Deployment deletes its Jobs.
    f.api
        .delete("apps/v1/deployments", NS, "web")
        .await
        .unwrap();
    f.api
        .wait_for(JOBS, NS, &job, WAIT, |j| j.is_none())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_fails_the_measurement_and_names_itself() {
    let f = fixture().await;
    let job = name(1);
    let ctx = f.ctx.clone();
    let j = job.clone();
    let running = tokio::spawn(async move { measure(&ctx, &job_check(&[]), &j).await });
    f.api
        .wait_for(JOBS, NS, &job, WAIT, |j| j.is_some())
        .await
        .unwrap();
    f.api
        .fail_job(
            NS,
            &job,
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )
        .await
        .unwrap();
    let reading = tokio::time::timeout(WAIT, running).await.unwrap().unwrap();
    assert_eq!(
        reading,
        Reading::Finished {
            passed: false,
            message: format!(
                "Job {NS}/{job} failed: BackoffLimitExceeded: Job has reached the specified \
                 backoff limit; logs: kubectl logs job/{job} -n {NS}"
            )
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_job_is_adopted_and_concurrent_measurements_share_one() {
    let f = fixture().await;
    let check = job_check(&[]);

    // Two measurements racing for the same name: one Job, the same reading.
    let job = name(2);
    let (ctx1, ctx2) = (f.ctx.clone(), f.ctx.clone());
    let (c1, c2, j1, j2) = (check.clone(), check.clone(), job.clone(), job.clone());
    let first = tokio::spawn(async move { measure(&ctx1, &c1, &j1).await });
    let second = tokio::spawn(async move { measure(&ctx2, &c2, &j2).await });
    f.api
        .wait_for(JOBS, NS, &job, WAIT, |j| j.is_some())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.api.complete_job(NS, &job).await.unwrap();
    let a = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    let b = tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
    assert_eq!(a, b);
    assert!(matches!(a, Reading::Finished { passed: true, .. }), "{a:?}");
    assert_eq!(creates(&f.api, &job), 1);
    assert_eq!(f.api.list(JOBS, Some(NS)).len(), 1);

    // A restarted controller measuring a Job that already ended gets its result at once,
    // without a second Job.
    let again = tokio::time::timeout(WAIT, measure(&f.ctx, &check, &job))
        .await
        .unwrap();
    assert_eq!(again, a);
    assert_eq!(creates(&f.api, &job), 1);

    // A Job of that name that fledge did not make for this check is not adopted.
    let foreign = name(3);
    f.api
        .create(
            JOBS,
            NS,
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": foreign},
                   "spec": {"template": {"spec": {"restartPolicy": "Never",
                            "containers": [{"name": "x", "image": "x"}]}}}}),
        )
        .await
        .unwrap();
    let reading = measure(&f.ctx, &check, &foreign).await;
    assert!(
        error_text(&reading).contains("was not created by fledge for this check"),
        "{reading:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_errors_and_cleanup() {
    let f = fixture().await;

    // The API server refuses the spec: the error names the Job and says why.
    let bad = check(
        "smoke",
        Provider::Job(JobCheck {
            spec: json!({"template": {"spec": {"restartPolicy": "Always",
                         "containers": [{"name": "x", "image": "x"}]}}}),
        }),
    );
    let reading = measure(&f.ctx, &bad, &name(4)).await;
    let text = error_text(&reading);
    assert!(
        text.starts_with(&format!("Job {NS}/{}: creating: ", name(4)))
            && text.contains("restartPolicy"),
        "{text}"
    );

    // A Job deleted while measured.
    let job = name(5);
    let ctx = f.ctx.clone();
    let j = job.clone();
    let running = tokio::spawn(async move { measure(&ctx, &job_check(&[]), &j).await });
    f.api
        .wait_for(JOBS, NS, &job, WAIT, |j| j.is_some())
        .await
        .unwrap();
    f.api.delete(JOBS, NS, &job).await.unwrap();
    let reading = tokio::time::timeout(WAIT, running).await.unwrap().unwrap();
    assert_eq!(
        reading,
        Reading::Error(format!("Job {NS}/{job} was deleted before it finished"))
    );

    // delete_jobs: all of the Deployment's, or all but the current canary's.
    let jobs: Api<Job> = Api::namespaced(f.api.client(), NS);
    let mut old = f.ctx.clone();
    old.variables.canary_hash = "oldoldoldoldoldoldol".into();
    for (ctx, job) in [
        (&f.ctx, name(6)),
        (
            &old,
            job_name("web", "oldoldoldoldoldoldol", "smoke", "s1", 0),
        ),
    ] {
        let (ctx, job) = (ctx.clone(), job.clone());
        tokio::spawn(async move { measure(&ctx, &job_check(&[]), &job).await });
    }
    f.api
        .wait_for(JOBS, NS, &name(6), WAIT, |j| j.is_some())
        .await
        .unwrap();
    let names = || async {
        let mut names: Vec<String> = jobs
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect();
        names.sort();
        names
    };
    let deadline = std::time::Instant::now() + WAIT;
    while names().await.len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    delete_jobs(f.api.client(), NS, "web", Some(HASH))
        .await
        .unwrap();
    assert_eq!(names().await, vec![name(6)]);
    delete_jobs(f.api.client(), NS, "web", None).await.unwrap();
    assert_eq!(names().await, Vec::<String>::new());
}
