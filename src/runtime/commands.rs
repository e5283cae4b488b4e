//! `fledge status`, `promote`, `abort` and `retry`: read a Deployment's rollout, or change its
//! stored state with the pure [`command`](crate::core::rollout::machine::command). The controller does
//! the rest, level-triggered. `fledge status --watch` is [`watch`].

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde_json::{Value, json};

use crate::core::admission;
use crate::core::objects::{self, SplitApi};
use crate::core::observe::DeploymentFacts;
use crate::core::policy::PolicySnapshot;
use crate::core::rollout::machine::{self, Command};
use crate::core::rollout::{Phase, RolloutState};
use crate::core::spec::{
    ANNOTATION_STATE, CanarySpec, LABEL_ENABLED, Router, Step, Weight, format_duration,
};
use crate::runtime::events;
use crate::runtime::policies as policy_watch;
use crate::runtime::traffic::{TrafficError, TrafficObjects};

pub mod analysis;
pub mod policies;
pub mod watch;

pub use analysis::CheckStatus;

/// How many times a command reads again after a conflicting write.
const ATTEMPTS: usize = 10;
/// Cells in the weight bar: one per 10 %.
const BAR_CELLS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Deployment {namespace}/{name} not found")]
    NotFound { namespace: String, name: String },
    #[error("{0}")]
    Refused(String),
    #[error("{name} kept changing while the command was written; try again")]
    Conflicts { name: String },
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("watching Deployments: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
    #[error("the watch on Deployments ended")]
    WatchEnded,
    #[error("writing the status: {0}")]
    Output(#[from] std::io::Error),
}

/// What `fledge status NAME -o json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub namespace: String,
    pub phase: Phase,
    /// 1-based; `steps` when all are done.
    pub step: usize,
    pub steps: usize,
    /// Canary traffic share (in JSON the percentage text, `"12.5"`).
    pub weight: Weight,
    pub message: String,
    /// Time left in a timed pause, e.g. `1m30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_left: Option<String>,
    /// The pending canary's template hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// `fledge.dev/router`: `smi`, `gateway-api` or `pod-ratio`.
    pub router: &'static str,
    /// The traffic objects it uses, e.g. `TrafficSplit web`, `HTTPRoute web-public (yours)`.
    pub traffic: Vec<String>,
    /// The current canary's checks (`fledge.dev/analysis`), by name; empty without any.
    pub analysis: Vec<CheckStatus>,
    /// The policy that governs it (the one fixed in a canary in flight), e.g.
    /// `RolloutPolicy shop/defaults`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// The objects a router sends traffic with, for Deployment `name`.
fn traffic_objects(router: &Router, name: &str, root_service: &str) -> Vec<String> {
    match router {
        Router::Smi => vec![format!("TrafficSplit {name}")],
        Router::GatewayApi { http_routes } if http_routes.is_empty() => {
            vec![format!(
                "HTTPRoute {name} (GAMMA, parent Service {root_service})"
            )]
        }
        Router::GatewayApi { http_routes } => http_routes
            .iter()
            .map(|r| format!("HTTPRoute {r} (yours)"))
            .collect(),
        Router::PodRatio => vec![format!("Service {root_service} (pod ratio)")],
    }
}

/// The status of one Deployment, as plain values.
pub fn status_of(deployment: &Value, policies: &PolicySnapshot, now: Timestamp) -> Status {
    let facts = DeploymentFacts::read(deployment, policies);
    let policy = facts.policy.as_ref().map(|p| p.id.to_string());
    let state = facts.state.as_ref().ok().cloned().flatten();
    let steps = facts.spec.as_ref().map_or(0, |s| s.steps.len());
    let namespace = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pending = facts.pending().map(str::to_owned);
    let root_service = facts
        .spec
        .as_ref()
        .map_or(facts.name.as_str(), |s| s.root_service.as_str());
    let traffic = traffic_objects(&facts.router, &facts.name, root_service);
    let router = facts.router.name();
    let Some(state) = state else {
        let message = match (&facts.invalid, &pending, &facts.state) {
            (_, _, Err(e)) => e.to_string(),
            (Some(invalid), _, _) => invalid.clone(),
            (None, Some(hash), _) => format!("canary {hash} is waiting for the controller"),
            (None, None, _) => "no canary".to_owned(),
        };
        return Status {
            name: facts.name.clone(),
            namespace,
            phase: Phase::Idle,
            step: 0,
            steps,
            weight: Weight::ZERO,
            message,
            pause_left: None,
            canary: pending,
            router,
            traffic,
            analysis: Vec::new(),
            policy,
        };
    };
    let pause_left = match (
        state.phase,
        facts.spec.as_ref().and_then(|s| s.steps.get(state.step)),
    ) {
        (Phase::Paused, Some(Step::PauseFor(d))) => state
            .step_started
            .map(|started| format_duration(machine::pause_left(started, *d, now))),
        _ => None,
    };
    Status {
        name: facts.name.clone(),
        namespace,
        phase: state.phase,
        step: (state.step + 1).min(steps),
        steps,
        weight: state.weight,
        message: state.message.clone(),
        pause_left,
        canary: Some(state.hash.clone()),
        router,
        traffic,
        analysis: analysis::check_statuses(&state, facts.spec.as_ref(), now),
        policy,
    }
}

/// One line of `fledge status`.
pub fn status_line(s: &Status) -> String {
    let pause = s
        .pause_left
        .as_ref()
        .map(|left| format!(" ({left} left)"))
        .unwrap_or_default();
    format!(
        "{:<24} {:<11} {:<15} step {}/{}  weight {:>6}% {}  {}{pause}",
        s.name,
        s.phase.to_string(),
        format!("via {}", s.router),
        s.step,
        s.steps,
        s.weight.to_string(),
        weight_bar(s.weight),
        s.message,
    )
}

/// What `fledge status` prints in text: a line per Deployment, each followed by an indented line
/// per check of its canary, or why there is none.
pub fn status_text(statuses: &[Status], namespace: &str) -> String {
    if statuses.is_empty() {
        return format!("no Deployment in {namespace} is opted in to fledge\n");
    }
    let mut out = String::new();
    for s in statuses {
        out += &status_line(s);
        out.push('\n');
        if let Some(policy) = &s.policy {
            out += &format!("  policy: {policy}\n");
        }
        for check in &s.analysis {
            out += &analysis::check_line(check);
            out.push('\n');
        }
    }
    out
}

/// The canary weight as ten cells, `[##--------]` for 20 %. Any traffic fills a cell, so that a
/// first step of 1 % does not look like none.
fn weight_bar(weight: Weight) -> String {
    let filled = match u32::from(weight.basis_points()) {
        0 => 0,
        bp => (bp * BAR_CELLS / u32::from(Weight::FULL.basis_points())).max(1),
    };
    format!(
        "[{}{}]",
        "#".repeat(filled as usize),
        "-".repeat((BAR_CELLS - filled) as usize)
    )
}

/// The status of `name`, or of every opted-in Deployment when `name` is `None`.
pub async fn status(
    client: Client,
    namespace: &str,
    name: Option<&str>,
) -> Result<Vec<Status>, CommandError> {
    let policies = policy_watch::list(&client, Some(namespace)).await?;
    let api = deployments(client, namespace);
    let deployments = match name {
        Some(name) => vec![
            api.get_opt(name)
                .await?
                .ok_or_else(|| CommandError::NotFound {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })?,
        ],
        // In an opted-in namespace every Deployment takes part unless it opts out.
        None if policies.namespace_opted_in(namespace) => {
            api.list(&ListParams::default().labels(&format!("{LABEL_ENABLED}!=false")))
                .await?
                .items
        }
        None => {
            api.list(&ListParams::default().labels(&format!("{LABEL_ENABLED}=true")))
                .await?
                .items
        }
    };
    let now = Timestamp::now();
    deployments
        .iter()
        .map(|d| Ok(status_of(&serde_json::to_value(d)?, &policies, now)))
        .collect()
}

/// What a command did.
#[derive(Debug)]
pub struct Applied {
    /// The state it stored.
    pub state: RolloutState,
    /// Why its Event could not be recorded, if it could not (the command took effect anyway).
    pub unrecorded: Option<kube::Error>,
}

/// Deployments as the JSON the API server returns: a pod template's identity is the hash of exactly
/// that JSON, which typed structs would change.
fn deployments(client: Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &ApiResource::erase::<Deployment>(&()))
}

/// fledge's own writes carry its field manager, which the webhook recognises.
fn writer() -> PatchParams {
    PatchParams {
        field_manager: Some(admission::FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Sends all traffic of `deployment` to stable through its router's object, as the controller does
/// (`runtime::traffic`). For SMI, in whichever TrafficSplit version the cluster serves (all versions
/// are one stored object); nothing where there is no object.
async fn traffic_to_stable(
    client: &Client,
    namespace: &str,
    deployment: &Value,
    spec: &CanarySpec,
    state: Option<&RolloutState>,
) -> Result<(), CommandError> {
    let split_api = match &spec.router {
        Router::Smi => match served_split_api(client).await? {
            Some(api) => api,
            // No SMI on this cluster: no traffic object to turn.
            None => return Ok(()),
        },
        Router::GatewayApi { .. } | Router::PodRatio => SplitApi::default(),
    };
    let saved = state.map(|s| s.saved_routes.clone()).unwrap_or_default();
    TrafficObjects {
        client,
        namespace,
        deployment,
        split_api,
    }
    .to_stable(&spec.router, &saved)
    .await
    .map_err(|e| match e {
        TrafficError::Kube(e) => CommandError::Kube(e),
        TrafficError::Objects(e) => CommandError::Refused(e.to_string()),
    })
}

/// The TrafficSplit version the cluster prefers, if it serves SMI at all.
async fn served_split_api(client: &Client) -> Result<Option<SplitApi>, CommandError> {
    let group = match kube::discovery::group(client, objects::SPLIT_GROUP).await {
        Ok(group) => group,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(group
        .recommended_kind(objects::SPLIT_KIND)
        .and_then(|(resource, _)| resource.version.parse::<SplitApi>().ok()))
}

/// Who records the Events of `fledge promote|abort|retry`.
fn cli_reporter() -> events::Reporter {
    events::Reporter {
        controller: "fledge-cli".into(),
        instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "fledge-cli".into()),
    }
}

/// Applies `cmd` to the stored state of `name`, with the read resourceVersion as a precondition:
/// on a conflict (the controller wrote in between) it reads again and decides again.
pub async fn run(
    client: Client,
    namespace: &str,
    name: &str,
    cmd: Command,
) -> Result<Applied, CommandError> {
    let api = deployments(client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let deployment = api
            .get_opt(name)
            .await?
            .ok_or_else(|| CommandError::NotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        let value = serde_json::to_value(&deployment)?;
        let policies = policy_watch::list(&client, Some(namespace)).await?;
        let facts = DeploymentFacts::read(&value, &policies);
        let Some(spec) = &facts.spec else {
            return Err(CommandError::Refused(match facts.invalid {
                Some(why) => format!("{name}'s fledge settings are invalid: {why}"),
                None => format!(
                    "{name} is not opted in to fledge ({LABEL_ENABLED}=true and fledge.dev/steps)"
                ),
            }));
        };
        let state = facts
            .state
            .as_ref()
            .map_err(|e| CommandError::Refused(e.to_string()))?;
        let next = machine::command(state.as_ref(), spec, cmd, name, Timestamp::now())
            .map_err(|e| CommandError::Refused(e.0))?;
        // Traffic back to stable before the state says so, as the controller does. Not on pod
        // ratio: the controller, woken by the canary's scale-down before it sees the new state,
        // would scale the canary up again in between; it scales it down itself, in one pass.
        if cmd == Command::Abort && spec.router != Router::PodRatio {
            traffic_to_stable(&client, namespace, &value, spec, state.as_ref()).await?;
        }
        let patch = json!({"metadata": {
            "resourceVersion": value["metadata"]["resourceVersion"],
            "annotations": {ANNOTATION_STATE: serde_json::to_string(&next)?},
        }});
        match api.patch(name, &writer(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                // Announced after the write, unlike the controller's transitions: a command that
                // lost a race is decided again on fresh data and must not have been announced.
                let event = events::transition_event(
                    deployment.object_ref(&ApiResource::erase::<Deployment>(&())),
                    value["metadata"]["annotations"][ANNOTATION_STATE].as_str(),
                    &facts.template_hash,
                    &cmd.event(&next),
                    &cli_reporter(),
                    Timestamp::now(),
                );
                let unrecorded = events::record(&client, &event).await.err();
                return Ok(Applied {
                    state: next,
                    unrecorded,
                });
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CommandError::Conflicts {
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::builders::{mk_hash, mk_held, with_annotation};

    /// `web` held at `web:2` with three steps, and `state` stored when given.
    fn deployment(state: Option<Value>) -> Value {
        let d = with_annotation(
            mk_held("web:1", "web:2"),
            "fledge.dev/steps",
            "- setWeight: 5\n- pause: {duration: 2m}\n- pause: {}\n",
        );
        match state {
            Some(state) => with_annotation(d, ANNOTATION_STATE, &state.to_string()),
            None => d,
        }
    }

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn a_timed_pause_shows_the_time_left() {
        let state = json!({"phase": "Paused", "hash": "c2", "step": 1, "weight": "5", "message": "step 2/3: paused",
                           "stepStarted": t(0).to_string()});
        let s = status_of(&deployment(Some(state)), &PolicySnapshot::default(), t(30));
        assert_eq!(
            (s.phase, s.step, s.steps, s.weight.to_string().as_str()),
            (Phase::Paused, 2, 3, "5")
        );
        assert_eq!(s.pause_left.as_deref(), Some("1m30s"));
        let json = serde_json::to_value(&s).unwrap();
        for key in ["phase", "step", "steps", "weight", "message"] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert!(
            status_line(&s)
                .contains("step 2/3  weight      5% [#---------]  step 2/3: paused (1m30s left)"),
            "{}",
            status_line(&s)
        );
    }

    #[test]
    fn without_a_state_the_pending_canary_waits_for_the_controller() {
        let s = status_of(&deployment(None), &PolicySnapshot::default(), t(0));
        assert_eq!((s.phase, s.step, s.weight), (Phase::Idle, 0, Weight::ZERO));
        let pending = mk_hash("web:2");
        assert_eq!(
            s.message,
            format!("canary {pending} is waiting for the controller")
        );
    }

    #[test]
    fn the_weight_bar_has_a_cell_per_ten_percent_and_shows_any_traffic() {
        let bars: Vec<String> = ["0", "0.01", "5", "20", "99.99", "100"]
            .iter()
            .map(|w| weight_bar(Weight::parse_percent(w).unwrap()))
            .collect();
        assert_eq!(
            bars,
            [
                "[----------]",
                "[#---------]",
                "[#---------]",
                "[##--------]",
                "[#########-]",
                "[##########]"
            ]
        );
    }

    #[test]
    fn status_text_is_a_line_per_deployment_or_says_there_is_none() {
        let s = status_of(&deployment(None), &PolicySnapshot::default(), t(0));
        assert_eq!(
            status_text(&[], "shop"),
            "no Deployment in shop is opted in to fledge\n"
        );
        let two = status_text(&[s.clone(), s.clone()], "shop");
        assert_eq!(two, format!("{}\n{}\n", status_line(&s), status_line(&s)));
    }

    #[test]
    fn the_checks_of_the_canary_are_listed_under_its_line() {
        let state = json!({"phase": "Progressing", "hash": "c2", "step": 1, "weight": "5",
        "message": "step 2/3: analysis: waiting for error-rate (1/3 measurements)",
        "stepStarted": t(0).to_string(),
        "checks": {
            "error-rate": {"step": 1, "started": t(0).to_string(), "phase": "Running",
                "taken": 1, "failed": 1,
                "measurements": [{"index": 0, "at": t(1).to_string(), "value": "0.071",
                    "outcome": "Failed", "detail": "0.071 is not \"result < 0.01\""}]},
            "latency": {"started": t(0).to_string(), "phase": "Successful", "taken": 2,
                "successful": 2}
        }});
        let s = status_of(&deployment(Some(state)), &PolicySnapshot::default(), t(30));
        let names: Vec<(&str, Option<usize>)> = s
            .analysis
            .iter()
            .map(|c| (c.name.as_str(), c.step))
            .collect();
        assert_eq!(names, [("error-rate", Some(2)), ("latency", None)]);
        let text = status_text(std::slice::from_ref(&s), "shop");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], status_line(&s));
        assert!(
            lines[1].starts_with(
                "  error-rate             step 2      Running       last 0.071 (Failed)"
            ),
            "{text}"
        );
        assert!(lines[2].contains(" background  Successful "), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["analysis"][0]["name"], "error-rate");
        assert_eq!(json["analysis"][0]["lastValue"], "0.071");
        assert_eq!(json["analysis"][0]["failed"], 1);
        assert_eq!(json["analysis"][1]["phase"], "Successful");
        // The fields scripts read are unchanged.
        for key in [
            "name",
            "namespace",
            "phase",
            "step",
            "steps",
            "weight",
            "message",
            "canary",
            "router",
            "traffic",
        ] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        let idle = serde_json::to_value(status_of(
            &deployment(None),
            &PolicySnapshot::default(),
            t(0),
        ))
        .unwrap();
        assert_eq!(idle["analysis"], json!([]));
    }
}
