//! End to end through the API server stand-in: fledge's real webhook over TLS and its real
//! controller, driven like a user (apply v1, apply v2).
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::apiserver::{ApiServer, ControllerConfig};
use support::e2e::*;

use fledge::core::objects::SplitApi;
use fledge::core::rollout::Phase;
use fledge::runtime::controller;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_template_walks_the_steps_to_promotion() {
    let steps =
        "- setWeight: 5\n- pause: {duration: 1s}\n- setWeight: 50\n- pause: {}\n- setWeight: 100\n";
    let c = stable_v1(steps).await;

    let replicasets_before = c.api.list("apps/v1/replicasets", Some(NS)).len();
    apply(&c.api, deployment("web:2", steps)).await;
    assert_held(&c.api, "web:2", "web:1");
    assert_eq!(
        c.api.list("apps/v1/replicasets", Some(NS)).len(),
        replicasets_before,
        "no new ReplicaSet while held"
    );

    wait_paused_at(&c.api, 3).await;
    let canary = c.api.get(DEPLOYMENTS, NS, "web-canary").unwrap();
    assert_eq!(image(&canary), "web:2");
    assert_eq!(canary["spec"]["replicas"], 2);
    let stable_svc = c.api.get(SERVICES, NS, "web-stable").unwrap();
    assert!(stable_svc["spec"]["selector"]["pod-template-hash"].is_string());
    assert_eq!(split_weights(&c.api), vec![0, 500, 5000]);

    let status: Value =
        serde_json::from_str(&fledge(&c.api, &["status", "web", "-o", "json"]).await).unwrap();
    assert_eq!(
        (
            status["phase"].as_str(),
            status["step"].as_u64(),
            status["steps"].as_u64(),
            status["weight"].as_str()
        ),
        (Some("Paused"), Some(4), Some(5), Some("50"))
    );
    assert!(
        fledge(&c.api, &["status"])
            .await
            .contains("paused until `fledge promote web`")
    );
    fledge(&c.api, &["promote", "web"]).await;
    let done = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            phase(d) == Some(Phase::Succeeded)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(image(&done), "web:2");
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api), vec![0, 500, 5000, 10_000, 0]);
    assert_eq!(events_with_reason(&c.api, "Promoted"), 1);
    assert!(
        !c.api.webhook_calls().is_empty(),
        "the API server called fledge's webhook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_never_becomes_available_is_aborted_at_the_progress_deadline() {
    let c = stable_v1("- setWeight: 50\n").await;
    let mut broken = deployment("web:broken", "- setWeight: 50\n");
    broken["spec"]["progressDeadlineSeconds"] = json!(2);
    broken["spec"]["template"]["metadata"]["annotations"] =
        json!({support::apiserver::NEVER_READY_ANNOTATION: "true"});
    apply(&c.api, broken.clone()).await;
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    assert!(
        state(Some(&aborted))
            .unwrap()
            .message
            .contains("progressDeadlineSeconds")
    );
    // The abort keeps the user's apply visible, and held.
    assert_held(&c.api, "web:broken", "web:1");
    c.api
        .wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
        .await
        .unwrap();
    // No traffic ever went to the canary, which had no ready pod.
    assert!(
        split_weights(&c.api).iter().all(|w| *w == 0),
        "{:?}",
        split_weights(&c.api)
    );
    // Applying the same template again (a GitOps resync) keeps it aborted: no restart loop.
    apply(&c.api, broken).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_eq!(phase(Some(&after)), Some(Phase::Aborted));
    assert!(c.api.get(DEPLOYMENTS, NS, "web-canary").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_out_mid_canary_removes_what_fledge_created() {
    let steps = "- setWeight: 20\n- pause: {}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    assert!(c.api.get(SPLITS, NS, "web").is_some());
    let mut opted_out = deployment("web:2", steps);
    opted_out["metadata"]["labels"] = json!({"app": "web", "fledge.dev/enabled": "false"});
    apply(&c.api, opted_out).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(
        split_weights(&c.api).last(),
        Some(&0),
        "traffic went back to stable before the split went"
    );
    assert!(
        c.api.get(SERVICES, NS, "web").is_some(),
        "the root Service is never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_by_command_then_retry() {
    let steps = "- setWeight: 30\n- pause: {}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    fledge(&c.api, &["abort", "web", "-n", NS]).await;
    let aborted = wait_phase(&c.api, Phase::Aborted).await;
    assert!(
        state(Some(&aborted))
            .unwrap()
            .message
            .contains("fledge retry web"),
        "the message says how to go on"
    );
    assert_held(&c.api, "web:2", "web:1");
    c.api
        .wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| d.is_none())
        .await
        .unwrap();
    assert_eq!(split_weights(&c.api), vec![0, 3000, 0]);
    fledge(&c.api, &["retry", "web"]).await;
    wait_phase(&c.api, Phase::Paused).await;
    assert_eq!(
        image(&c.api.get(DEPLOYMENTS, NS, "web-canary").unwrap()),
        "web:2"
    );
    assert_eq!(split_weights(&c.api), vec![0, 3000, 0, 3000]);
    // Both commands are on the record, the abort as a warning.
    let aborted = c
        .api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "Aborted")
        .unwrap();
    assert_eq!(
        (
            aborted["type"].as_str(),
            aborted["reportingComponent"].as_str()
        ),
        (Some("Warning"), Some("fledge-cli"))
    );
    assert_eq!(events_with_reason(&c.api, "Retried"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_template_mid_canary_replaces_it_and_starts_over() {
    let steps = "- setWeight: 10\n- pause: {}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    apply(&c.api, deployment("web:3", steps)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| {
            d.is_some_and(|d| image(d) == "web:3")
        })
        .await
        .unwrap();
    let paused = c
        .api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            phase(d) == Some(Phase::Paused)
                && state(d).is_some_and(|s| {
                    s.hash
                        != state(Some(&c.api.get(DEPLOYMENTS, NS, "web").unwrap()))
                            .map(|_| String::new())
                            .unwrap_or_default()
                })
        })
        .await
        .unwrap()
        .unwrap();
    assert_held(&c.api, image(&paused), "web:1");
    let reasons = event_reasons(&c.api);
    assert!(
        reasons.contains(&"CanaryReplaced".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acontroller_task_killed_mid_rollout_is_replaced_without_replaying_anything() {
    let steps =
        "- setWeight: 10\n- pause: {duration: 2s}\n- setWeight: 60\n- pause: {duration: 1s}\n";
    let mut c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    // Killed in the middle of the first pause, and again at the next weight.
    wait_paused_at(&c.api, 1).await;
    c.controller_task.abort();
    let paused_at = state(c.api.get(DEPLOYMENTS, NS, "web").as_ref())
        .unwrap()
        .step_started;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.controller_task = start_controller(&c.api, &c.metrics);
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.step >= 3)
        })
        .await
        .unwrap();
    c.controller_task.abort();
    c.controller_task = start_controller(&c.api, &c.metrics);
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(image(&done), "web:2");
    wait_until_nothing_is_left(&c.api).await;
    // The pause kept its stored start; every weight was written once, in order; one promotion.
    assert!(paused_at.is_some());
    assert_eq!(split_weights(&c.api), vec![0, 1000, 6000, 10_000, 0]);
    assert_eq!(events_with_reason(&c.api, "Promoted"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_mid_canary_rescales_the_canary_and_deleting_removes_everything() {
    let steps = "- setWeight: 20\n- pause: {}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    assert_eq!(
        c.api.get(DEPLOYMENTS, NS, "web-canary").unwrap()["spec"]["replicas"],
        1
    );
    let mut scaled = deployment("web:2", steps);
    scaled["spec"]["replicas"] = json!(10);
    apply(&c.api, scaled).await;
    // ceil(10 × 20 %) = 2 canary pods; the stable scales itself.
    c.api
        .wait_for(DEPLOYMENTS, NS, "web-canary", WAIT, |d| {
            d.is_some_and(|d| d["spec"]["replicas"] == 2)
        })
        .await
        .unwrap();
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_eq!(web["spec"]["replicas"].as_u64(), Some(10));
    assert_held(&c.api, "web:2", "web:1");
    assert_eq!(phase(Some(&web)), Some(Phase::Paused));

    c.api.delete(DEPLOYMENTS, NS, "web").await.unwrap();
    wait_until_nothing_is_left(&c.api).await;
    assert!(
        c.api.get(SERVICES, NS, "web").is_some(),
        "the root Service is the user's"
    );
}

/// One replica of `fledge serve`'s controller half: it runs the controller only while it holds
/// the Lease. Counts how often it started leading.
fn replica(
    api: &ApiServer,
    identity: &str,
    started: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let client = api.client();
    let policies = fledge::runtime::policies::PolicyWatch::spawn(client.clone(), Some(NS.into()));
    let lease = fledge::runtime::lease::LeaseConfig {
        name: "fledge-controller".into(),
        namespace: NS.into(),
        identity: identity.into(),
        duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(200),
    };
    let lead = move || {
        started.fetch_add(1, Ordering::SeqCst);
        controller::run(
            client.clone(),
            controller::ControllerConfig {
                namespace: Some(NS.into()),
                split_api: SplitApi::V1Alpha2,
                metrics: controller::ControllerMetrics::default(),
                prometheus_address: None,
                policies: policies.clone(),
                clock: fledge::runtime::clock::Clock::system(),
            },
            std::future::pending(),
        )
    };
    tokio::spawn(fledge::runtime::lease::run_while_leader(
        api.client(),
        lease,
        lead,
        std::future::pending(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_lease_holder_runs_the_controller() {
    let steps = "- setWeight: 25\n- pause: {}\n";
    let c = stable_v1(steps).await;
    c.controller_task.abort();
    let (a_started, b_started) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = replica(&c.api, "replica-a", a_started.clone());
    c.api
        .wait_for(
            "coordination.k8s.io/v1/leases",
            NS,
            "fledge-controller",
            WAIT,
            |l| l.is_some_and(|l| l["spec"]["holderIdentity"] == "replica-a"),
        )
        .await
        .unwrap();
    let b = replica(&c.api, "replica-b", b_started.clone());
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    assert_eq!(
        (
            a_started.load(Ordering::SeqCst),
            b_started.load(Ordering::SeqCst)
        ),
        (1, 0)
    );

    // The leader dies: after the Lease expires the other replica takes over and finishes.
    a.abort();
    let lease = c
        .api
        .wait_for(
            "coordination.k8s.io/v1/leases",
            NS,
            "fledge-controller",
            WAIT,
            |l| l.is_some_and(|l| l["spec"]["holderIdentity"] == "replica-b"),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    for _ in 0..50 {
        if b_started.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b_started.load(Ordering::SeqCst), 1);
    fledge(&c.api, &["promote", "web"]).await;
    let done = wait_phase(&c.api, Phase::Succeeded).await;
    assert_eq!(image(&done), "web:2");
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api), vec![0, 2500, 10_000, 0]);
    b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_root_service_is_a_status_message_and_an_event() {
    let steps = "- setWeight: 10\n";
    let c = stable_v1(steps).await;
    c.api.delete(SERVICES, NS, "web").await.unwrap();
    apply(&c.api, deployment("web:2", steps)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            state(d).is_some_and(|s| s.message.starts_with("root Service web not found"))
        })
        .await
        .unwrap();
    assert!(
        fledge(&c.api, &["status", "web"])
            .await
            .contains("root Service web not found")
    );
    let warned = c
        .api
        .events()
        .iter()
        .any(|e| e["reason"] == "RootServiceMissing" && e["type"] == "Warning");
    assert!(warned);
    assert!(
        c.api.get(SPLITS, NS, "web").is_none(),
        "nothing is routed without it"
    );
}

/// `(phase, step)` of a stored rollout state: what a kill point is named by.
type Position = (Phase, usize);

fn position(d: Option<&Value>) -> Option<Position> {
    state(d).map(|s| (s.phase, s.step))
}

/// The stored rollout states of `web`, oldest first, with repeats removed.
fn state_history(api: &ApiServer) -> Vec<fledge::core::rollout::RolloutState> {
    let mut states: Vec<_> = api
        .history_of("deployments.apps", NS, "web")
        .iter()
        .filter_map(|r| state(Some(&r.object)))
        .collect();
    states.dedup();
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_at_every_step_boundary_and_mid_every_pause_changes_nothing_observable()
{
    let steps = "- setWeight: 10\n- pause: {duration: 2s}\n- setWeight: 40\n- pause: {}\n\
                 - setWeight: 70\n- pause: {duration: 2s}\n";
    let timed_pauses = [(1, Duration::from_secs(2)), (5, Duration::from_secs(2))];
    // Pods take 400 ms to become ready, so every weight step and the promotion hold long enough
    // for the kill to land while the controller is at that step.
    let cluster = cluster_with(ControllerConfig {
        ready_delay: Duration::from_millis(400),
        ..ControllerConfig::default()
    })
    .await;
    let mut c = with_stable_v1(cluster, steps).await;
    apply(&c.api, deployment("web:2", steps)).await;

    let mut killed_at: Vec<(Position, &str)> = Vec::new();
    let mut handled: Option<Position> = None;
    let mut mid_pause_done: Vec<usize> = Vec::new();
    loop {
        let web = c
            .api
            .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
                let Some(s) = state(d) else { return false };
                let mid_pause_due = timed_pauses.iter().any(|(step, length)| {
                    s.phase == Phase::Paused
                        && s.step == *step
                        && !mid_pause_done.contains(step)
                        && s.step_started.is_some_and(|started| {
                            let half =
                                k8s_openapi::jiff::SignedDuration::try_from(*length / 2).unwrap();
                            k8s_openapi::jiff::Timestamp::now() >= started + half
                        })
                });
                Some((s.phase, s.step)) != handled || mid_pause_due
            })
            .await
            .unwrap();
        let at = position(web.as_ref()).unwrap();
        let kind = if Some(at) == handled {
            mid_pause_done.push(at.1);
            "mid-pause"
        } else {
            "boundary"
        };
        handled = Some(at);
        c.controller_task.abort();
        killed_at.push((at, kind));
        if at == (Phase::Paused, 3) {
            // The manual gate is opened while no controller runs.
            fledge(&c.api, &["promote", "web"]).await;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.controller_task = start_controller(&c.api, &c.metrics);
        if at.0 == Phase::Succeeded {
            break;
        }
    }
    wait_until_nothing_is_left(&c.api).await;

    use Phase::*;
    // Every position the rollout was stored in, each with a kill right after it was written. The
    // last pause goes on to the promotion in the pass that ends it: (Progressing, 6) is never
    // stored. Nor is (Progressing, 2): the first pause sized the canary for 40 %, so the pass that
    // ends it finds the pods ready and sets the weight at once. A weight's pass enters the pause
    // after it, so (Progressing, 1), (Progressing, 3) and (Progressing, 5) are not stored either.
    let every_position = vec![
        (Progressing, 0),
        (Paused, 1),
        (Paused, 3),
        (Progressing, 4),
        (Paused, 5),
        (Promoting, 6),
        (Succeeded, 6),
    ];
    let boundaries: Vec<Position> = killed_at
        .iter()
        .filter(|(_, kind)| *kind == "boundary")
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(boundaries, every_position);
    let mid_pauses: Vec<Position> = killed_at
        .iter()
        .filter(|(_, kind)| *kind == "mid-pause")
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(mid_pauses, [(Paused, 1), (Paused, 5)]);
    // Every weight once, in order; the stable template changed once; the canary Deployment was
    // created once; nothing is left.
    assert_eq!(split_weights(&c.api), vec![0, 1000, 4000, 7000, 10_000, 0]);
    let mut stable_images: Vec<String> = c
        .api
        .history_of("deployments.apps", NS, "web")
        .iter()
        .map(|r| image(&r.object).to_owned())
        .collect();
    stable_images.dedup();
    assert_eq!(stable_images, ["web:1", "web:2"]);
    let canary_creations = c
        .api
        .history_of("deployments.apps", NS, "web-canary")
        .iter()
        .filter(|r| matches!(r.kind, support::apiserver::ChangeKind::Added))
        .count();
    assert_eq!(canary_creations, 1);
    // No step started twice, so no pause lost the time it had already waited; and each timed
    // pause lasted its length.
    let states = state_history(&c.api);
    let positions: Vec<Position> = {
        let mut p: Vec<Position> = states.iter().map(|s| (s.phase, s.step)).collect();
        p.dedup();
        p
    };
    assert_eq!(
        positions, every_position,
        "the same history as without kills"
    );
    let started = |step: usize| {
        let mut starts: Vec<_> = states
            .iter()
            .filter(|s| s.step == step && matches!(s.phase, Progressing | Paused | Promoting))
            .map(|s| s.step_started)
            .collect();
        starts.dedup();
        assert_eq!(starts.len(), 1, "step {step} started {starts:?}");
        starts[0].unwrap()
    };
    for (step, length) in timed_pauses {
        // The next step stored: a step the pass that ended the pause went through is not.
        let next = positions
            .iter()
            .map(|(_, s)| *s)
            .find(|s| *s > step)
            .unwrap();
        let ended = started(next);
        let waited = ended.duration_since(started(step));
        assert!(
            waited >= k8s_openapi::jiff::SignedDuration::try_from(length).unwrap(),
            "pause at step {step} lasted {waited:?}"
        );
    }
    let reasons = event_reasons(&c.api);
    // Each transition announced once, though every one of them was interrupted.
    assert_eq!(
        reasons,
        [
            "CanaryStarted",
            "WeightSet",
            "Paused",
            "PauseEnded",
            "WeightSet",
            "Paused",
            "Resumed",
            "WeightSet",
            "Paused",
            "PauseEnded",
            "Promoting",
            "Promoted"
        ]
    );
}

/// The ReplicaSets of `web`: (name, image, the `spec.replicas` it was written with, in order,
/// repeats removed).
fn replicaset_history(api: &ApiServer) -> Vec<(String, String, Vec<u64>)> {
    let web_uid = api.get(DEPLOYMENTS, NS, "web").unwrap()["metadata"]["uid"].clone();
    let mut sets: Vec<(String, String, Vec<u64>)> = Vec::new();
    for r in api.history() {
        if r.resource != "replicasets.apps"
            || r.object["metadata"]["ownerReferences"][0]["uid"] != web_uid
        {
            continue;
        }
        let replicas = r.object["spec"]["replicas"].as_u64().unwrap_or(0);
        match sets.iter_mut().find(|(name, ..)| *name == r.name) {
            Some((.., sizes)) if sizes.last() != Some(&replicas) => sizes.push(replicas),
            Some(_) => {}
            None => sets.push((r.name.clone(), image(&r.object).to_owned(), vec![replicas])),
        }
    }
    sets
}

/// Resource versions of the changes to `name` of `resource`, by kind of change.
fn changes(api: &ApiServer, resource: &str, name: &str) -> Vec<(u64, Value)> {
    api.history_of(resource, NS, name)
        .into_iter()
        .map(|r| {
            let deleted = matches!(r.kind, support::apiserver::ChangeKind::Deleted);
            (
                r.resource_version,
                if deleted { Value::Null } else { r.object },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_mid_canary_is_an_instant_rollback() {
    let steps = "- setWeight: 30\n- pause: {}\n";
    let c = stable_v1(steps).await;
    let stable_sets = replicaset_history(&c.api);
    apply(&c.api, deployment("web:2", steps)).await;
    assert_held(&c.api, "web:2", "web:1");
    wait_phase(&c.api, Phase::Paused).await;

    // `kubectl apply` of the previous manifest.
    apply(&c.api, deployment("web:1", steps)).await;
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_ne!(
        web["spec"]["paused"], true,
        "unpaused by the webhook at once"
    );
    assert!(
        web["metadata"]["annotations"]
            .get("fledge.dev/hold")
            .is_none()
    );
    assert!(
        web["metadata"]["annotations"]
            .get("fledge.dev/stable-hash")
            .is_none()
    );
    let rolled_back = wait_phase(&c.api, Phase::RolledBack).await;
    assert!(
        state(Some(&rolled_back))
            .unwrap()
            .message
            .starts_with("rolled back")
    );
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api), vec![0, 3000, 0]);
    assert_eq!(events_with_reason(&c.api, "RolledBack"), 1);
    // In order: weight 0, then the canary Deployment, then the split, then the Services.
    let split = changes(&c.api, "trafficsplits.split.smi-spec.io", "web");
    let zero = split
        .iter()
        .rev()
        .find(|(_, o)| o["spec"]["backends"][1]["weight"] == 0)
        .map(|(rv, _)| *rv)
        .unwrap();
    let split_gone = split.last().unwrap();
    assert!(split_gone.1.is_null());
    let canary_gone = changes(&c.api, "deployments.apps", "web-canary")
        .last()
        .unwrap()
        .0;
    let services_gone = changes(&c.api, "services", "web-stable").last().unwrap().0;
    assert!(zero < canary_gone && canary_gone < split_gone.0 && split_gone.0 < services_gone);
    // No new ReplicaSet and no pod restarted: the stable ReplicaSet never changed size.
    c.api.controller().settle(WAIT).await.unwrap();
    assert_eq!(replicaset_history(&c.api), stable_sets);
    assert_eq!(running_images(&c.api), ["web:1"]);
    // A revert is not an abort: the reverted template applied again is a fresh canary.
    apply(&c.api, deployment("web:2", steps)).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            phase(d) == Some(Phase::Paused)
        })
        .await
        .unwrap();
    assert_eq!(events_with_reason(&c.api, "CanaryStarted"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rollout_resume_of_a_held_deployment_is_denied_and_a_gitops_sync_keeps_the_hold() {
    let steps = "- setWeight: 30\n- pause: {}\n";
    let c = stable_v1(steps).await;
    apply(&c.api, deployment("web:2", steps)).await;
    wait_phase(&c.api, Phase::Paused).await;
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(c.api.client(), NS);
    // What `kubectl rollout resume` sends: a strategic merge patch under its field manager.
    let resume = kube::api::PatchParams {
        field_manager: Some("kubectl-rollout".into()),
        ..Default::default()
    };
    let err = deployments
        .patch(
            "web",
            &resume,
            &kube::api::Patch::Strategic(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert!(
        status.message.contains("kubectl fledge promote web")
            && status.message.contains("kubectl fledge abort web"),
        "{}",
        status.message
    );
    // A GitOps tool clearing `paused` is never refused: the hold is set again.
    let mut sync = deployment("web:2", steps);
    sync["spec"]["paused"] = json!(false);
    apply(&c.api, sync).await;
    assert_held(&c.api, "web:2", "web:1");
    assert_eq!(
        phase(c.api.get(DEPLOYMENTS, NS, "web").as_ref()),
        Some(Phase::Paused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_with_the_controller_killed_at_every_boundary_rolls_back_once() {
    let steps = "- setWeight: 30\n- pause: {}\n";
    let cluster = cluster_with(ControllerConfig {
        ready_delay: Duration::from_millis(400),
        ..ControllerConfig::default()
    })
    .await;
    let mut c = with_stable_v1(cluster, steps).await;
    let stable_sets = replicaset_history(&c.api);
    apply(&c.api, deployment("web:2", steps)).await;
    use Phase::*;
    // The weight's pass enters the pause after it: (Progressing, 1) is never stored.
    for wanted in [(Progressing, 0), (Paused, 1)] {
        c.api
            .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
                position(d) == Some(wanted)
            })
            .await
            .unwrap();
        c.controller_task.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.controller_task = start_controller(&c.api, &c.metrics);
    }
    // The revert lands while no controller runs; then a kill right after the rollback is stored.
    c.controller_task.abort();
    apply(&c.api, deployment("web:1", steps)).await;
    c.controller_task = start_controller(&c.api, &c.metrics);
    wait_phase(&c.api, RolledBack).await;
    c.controller_task.abort();
    c.controller_task = start_controller(&c.api, &c.metrics);
    wait_until_nothing_is_left(&c.api).await;

    assert_eq!(split_weights(&c.api), vec![0, 3000, 0]);
    assert_eq!(
        event_reasons(&c.api),
        ["CanaryStarted", "WeightSet", "Paused", "RolledBack"]
    );
    let positions: Vec<Position> = {
        let mut p: Vec<Position> = state_history(&c.api)
            .iter()
            .map(|s| (s.phase, s.step))
            .collect();
        p.dedup();
        p
    };
    assert_eq!(positions, [(Progressing, 0), (Paused, 1), (RolledBack, 1)]);
    c.api.controller().settle(WAIT).await.unwrap();
    assert_eq!(replicaset_history(&c.api), stable_sets);
    let web = c.api.get(DEPLOYMENTS, NS, "web").unwrap();
    assert_ne!(web["spec"]["paused"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_unpauses_and_rolls_out_with_the_users_strategy_on_a_legacy_api_server() {
    // An API server from before templates lost `creationTimestamp: null`, which fledge must
    // hash as it is sent; a small watch history, so fledge's watchers meet 410 Gone and relist;
    // lists at resourceVersion 0 served a few changes stale, as a watch cache may.
    let c = cluster_configured(|config| {
        config.legacy_creation_timestamp = true;
        config.history_limit = 40;
        config.rv0_lag = 3;
        config.controller = ControllerConfig {
            ready_delay: Duration::from_millis(100),
            ..ControllerConfig::default()
        };
    })
    .await;
    let steps = "- setWeight: 25\n- setWeight: 50\n";
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    let with_strategy = |image: &str| {
        let mut d = deployment(image, steps);
        d["spec"]["strategy"] = strategy.clone();
        d
    };
    apply(&c.api, root_service()).await;
    apply(&c.api, with_strategy("web:1")).await;
    c.api
        .wait_for(DEPLOYMENTS, NS, "web", WAIT, |d| {
            d.is_some_and(|d| d["status"]["availableReplicas"] == 4)
        })
        .await
        .unwrap();
    // What a client reads (fledge's caches included).
    let on_the_wire: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        c.api.client(),
        NS,
        &kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
    );
    let web = on_the_wire.get("web").await.unwrap();
    assert!(
        web.data["spec"]["template"]["metadata"]
            .as_object()
            .unwrap()
            .contains_key("creationTimestamp"),
        "the legacy encoding is on: {:?}",
        web.data
    );
    let before = c.api.controller().rollout_steps("shop/web").len();
    apply(&c.api, with_strategy("web:2")).await;
    assert_held(&c.api, "web:2", "web:1");
    wait_phase(&c.api, Phase::Succeeded).await;
    wait_until_nothing_is_left(&c.api).await;
    assert_eq!(split_weights(&c.api), vec![0, 2500, 5000, 10_000, 0]);
    assert_eq!(running_images(&c.api), ["web:2"]);
    // The Deployment controller rolled the promotion out step by step, within maxSurge 1 and
    // maxUnavailable 0.
    let rollout = &c.api.controller().rollout_steps("shop/web")[before..];
    assert!(rollout.len() >= 4, "{rollout:?}");
    for step in rollout {
        assert!(step.new_replicas + step.old_replicas <= 5, "{rollout:?}");
        assert!(step.available >= 4, "{rollout:?}");
    }
}

/// `web` at v1, its controller on a manual clock (set at `started`) and a user of its own, then
/// `web:2` applied and paused at step 1 (the first timed pause).
async fn paused_on_a_manual_clock(
    steps: &str,
) -> (
    Cluster,
    fledge::runtime::clock::Clock,
    jiff::Timestamp,
    support::apiserver::UserInfo,
) {
    let mut c = stable_v1(steps).await;
    c.controller_task.abort();
    let started: jiff::Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
    let clock = fledge::runtime::clock::Clock::manual(started);
    let user = support::apiserver::UserInfo::user("fledge-controller");
    c.controller_task = start_controller_with(
        &c.api,
        c.api.client_as(user.clone()),
        &c.metrics,
        clock.clone(),
    );
    apply(&c.api, deployment("web:2", steps)).await;
    wait_paused_at(&c.api, 1).await;
    (c, clock, started, user)
}

/// A pause that ends when a full apply of the canary's objects is due too (the last one is over a
/// minute old on fledge's clock): the next weight is written first, and only then is the root
/// Service read again and the Services written, so that the refresh does not make the step late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_due_with_a_full_apply_writes_its_weight_before_the_refresh() {
    // 10 % and 20 % of 4 replicas are both one canary pod: the step is a weight write alone.
    let steps = "- setWeight: 10\n- pause: {duration: 30s}\n- setWeight: 20\n- pause: {}\n";
    let (c, clock, started, user) = paused_on_a_manual_clock(steps).await;
    assert_eq!(split_weights(&c.api), vec![0, 1000]);
    let before = c.api.requests_by(&user).len();

    clock.set(started + jiff::SignedDuration::from_secs(61));
    wait_paused_at(&c.api, 3).await;
    assert_eq!(split_weights(&c.api), vec![0, 1000, 2000]);
    let pass: Vec<(&str, String, String)> = c.api.requests_by(&user)[before..]
        .iter()
        .filter(|r| r.verb != "watch" && r.verb != "list" && r.resource != "events")
        .map(|r| {
            (
                r.verb,
                r.resource.clone(),
                r.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let at = |verb: &str, resource: &str, name: &str| {
        pass.iter()
            .position(|(v, r, n)| (*v, r.as_str(), n.as_str()) == (verb, resource, name))
            .unwrap_or_else(|| panic!("no {verb} {resource}/{name} in {pass:?}"))
    };
    let weight = at("patch", "trafficsplits", "web");
    assert!(
        weight < at("get", "services", "web") && weight < at("patch", "services", "web-canary"),
        "the weight first, then the refresh: {pass:?}"
    );
}

#[tokio::test]
async fn the_canary_deployment_is_written_only_when_its_size_changes() {
    // 4 replicas: 10 % is one canary pod, 50 % two; the timed pause grows the canary for 50 %.
    let steps = "- setWeight: 10\n- pause: {duration: 30s}\n- setWeight: 50\n- pause: {}\n";
    let (c, clock, started, user) = paused_on_a_manual_clock(steps).await;
    // Under REAPPLY: no refresh of the canary's objects falls in this test.
    clock.set(started + jiff::SignedDuration::from_secs(31));
    wait_paused_at(&c.api, 3).await;
    assert_eq!(split_weights(&c.api), vec![0, 1000, 5000]);
    let writes = c
        .api
        .requests_by(&user)
        .iter()
        .filter(|r| (r.verb, r.resource.as_str()) == ("patch", "deployments"))
        .filter(|r| r.name.as_deref() == Some("web-canary"))
        .count();
    let generations = numbers_in_history(
        &c.api,
        "deployments.apps",
        "web-canary",
        "/metadata/generation",
    );
    // fledge's own state writes move the Deployment's generation, and the canary copies none
    // of what they change: each write of the canary is a new spec for it.
    assert_eq!(writes, generations.len(), "{generations:?}");
}
