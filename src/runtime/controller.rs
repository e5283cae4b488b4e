//! The controller: the IO around [`crate::core::rollout::machine`]. It watches Deployments and the objects
//! fledge owns, reads an observation off them, asks the state machine for the next step, converges
//! the cluster to its target with server-side apply, and stores the state with optimistic
//! concurrency. Level-triggered: a controller killed at any point resumes from what is stored.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::sync::atomic::AtomicU64;

use crate::core::objects::{self, LABEL_MANAGED_BY, SplitApi};
use crate::core::observe::{self, DeploymentFacts};
use crate::core::rollout::machine::{self, Target};
use crate::core::rollout::{Phase, RolloutState};
use crate::core::spec::{
    ANNOTATION_CANARY_HASH, ANNOTATION_CANARY_TEMPLATE, ANNOTATION_STATE, CANARY_SUFFIX,
    STABLE_SUFFIX, Weight,
};
use crate::runtime::events::{self, Reporter};

/// Field manager for server-side apply, and the Event reporter.
pub const MANAGER: &str = "fledge";
/// How soon to look again when waiting on something without a known end (a missing Service).
const RETRY: Duration = Duration::from_secs(10);
/// How often to look at a settled Deployment anyway.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Objects(#[from] objects::ObjectError),
    #[error("encoding {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch one namespace only; all when `None`.
    pub namespace: Option<String>,
    pub split_api: SplitApi,
    pub metrics: Metrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanaryLabels {
    namespace: String,
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    deployment: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The controller's Prometheus metrics (served at the webhook's `/metrics`).
#[derive(Clone, Debug)]
pub struct Metrics {
    weight: Family<CanaryLabels, Gauge<f64, AtomicU64>>,
    phase: Family<PhaseLabels, Gauge>,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            weight: Family::default(),
            phase: Family::default(),
            reconciles: Family::default(),
            // 1 ms … ~16 s: a reconcile is a few API calls.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl Metrics {
    /// New metrics, registered under `fledge_`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics::default();
        registry.register(
            "canary_weight_percent",
            "Canary traffic share, by Deployment",
            metrics.weight.clone(),
        );
        registry.register(
            "canary_phase",
            "1 for the rollout's current phase, 0 for the others, by Deployment",
            metrics.phase.clone(),
        );
        registry.register(
            "controller_reconciles",
            "Reconciles, by result (ok, error)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "controller_reconcile_duration_seconds",
            "Time one reconcile takes",
            metrics.duration.clone(),
        );
        metrics
    }

    fn record(&self, namespace: &str, deployment: &str, state: Option<&RolloutState>) {
        let canary = CanaryLabels {
            namespace: namespace.to_owned(),
            deployment: deployment.to_owned(),
        };
        let phase_labels = |phase: Phase| PhaseLabels {
            namespace: namespace.to_owned(),
            deployment: deployment.to_owned(),
            phase: phase_name(phase),
        };
        match state {
            Some(state) => {
                self.weight
                    .get_or_create(&canary)
                    .set(f64::from(state.weight.basis_points()) / 100.0);
                for phase in Phase::ALL {
                    self.phase
                        .get_or_create(&phase_labels(phase))
                        .set(i64::from(phase == state.phase));
                }
            }
            None => {
                self.weight.remove(&canary);
                for phase in Phase::ALL {
                    self.phase.remove(&phase_labels(phase));
                }
            }
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Idle => "Idle",
        Phase::Progressing => "Progressing",
        Phase::Paused => "Paused",
        Phase::Promoting => "Promoting",
        Phase::Succeeded => "Succeeded",
        Phase::Aborted => "Aborted",
    }
}

struct Context {
    client: Client,
    config: Config,
    reporter: Reporter,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let deployments: Api<Deployment> = scoped(&client, &config.namespace);
    let services: Api<Service> = scoped(&client, &config.namespace);
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| MANAGER.into()),
    };
    let context = Arc::new(Context {
        client,
        config,
        reporter,
    });
    Controller::new(deployments.clone(), watcher::Config::default())
        .owns(deployments, owned.clone())
        .owns(services, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn error_policy(deployment: Arc<Deployment>, error: &ControllerError, _: Arc<Context>) -> Action {
    match error {
        // Someone else wrote first (the Deployment controller's status, a user's command): read
        // again and go on at once.
        ControllerError::Kube(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(deployment = %deployment.name_any(), "conflict; reading again");
            Action::requeue(Duration::from_millis(100))
        }
        _ => {
            tracing::warn!(deployment = %deployment.name_any(), %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

#[tracing::instrument(skip_all, fields(deployment = %deployment.name_any()))]
async fn reconcile(
    deployment: Arc<Deployment>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = deployment.namespace().unwrap_or_default();
    let name = deployment.name_any();
    let value = serde_json::to_value(&*deployment).map_err(|source| ControllerError::Json {
        what: "the Deployment",
        source,
    })?;
    let facts = DeploymentFacts::read(&value);
    let state = match &facts.state {
        Ok(state) => state.clone(),
        Err(e) => {
            let event = machine::Event {
                reason: "StateUnreadable",
                message: e.to_string(),
                warning: true,
            };
            publish(&ctx, &deployment, &event).await;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if facts.spec.is_none() && state.is_none() && facts.invalid.is_none() {
        // Not fledge's (this includes the canary Deployments fledge itself creates).
        return Ok(Action::await_change());
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let canary = deployments
        .get_opt(&format!("{name}{CANARY_SUFFIX}"))
        .await?
        .map(serde_json::to_value)
        .transpose()
        .map_err(|source| ControllerError::Json {
            what: "the canary Deployment",
            source,
        })?;
    // Only this Deployment's ReplicaSets (and its canary's, whose labels include the same ones):
    // listing the whole namespace on every pass costs memory and API time with many Deployments.
    let selector = deployment
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let replicasets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let replicasets: Vec<Value> = replicasets
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter_map(|rs| serde_json::to_value(rs).ok())
        .collect();
    let observation = facts.observation(canary.as_ref(), &replicasets);
    let next = machine::next(state.as_ref(), &observation, Timestamp::now());
    ctx.config
        .metrics
        .record(&namespace, &name, next.state.as_ref());
    let changed = next.state.as_ref() != state.as_ref();
    // Leaving fledge: the state goes last, once everything fledge created is gone, so that a
    // failed cleanup is tried again. Otherwise it goes first: the webhook lets the promotion
    // through only once it is stored.
    let leaving = next.state.is_none();
    // Announced before it is stored: see [`events`] for why that records it exactly once.
    if let Some(event) = &next.event {
        publish(&ctx, &deployment, event).await;
    }
    if changed && !leaving {
        store_state(&deployments, &deployment, next.state.as_ref()).await?;
    }
    // Promotion rewrites the Deployment just observed; after a state write it waits for the next
    // pass, on the fresh object.
    let stable_hash = observe::stable_pod_template_hash(&value, &replicasets);
    let converged = converge(
        &ctx,
        &value,
        &facts,
        stable_hash,
        next.target,
        &namespace,
        !changed,
    )
    .await?;
    if changed && leaving {
        store_state(&deployments, &deployment, None).await?;
    }
    if let (Converged::NoRootService(service), Some(stored)) = (&converged, &next.state) {
        let message = format!(
            "root Service {service} not found: fledge copies its ports and selector for the canary; \
             create it, or name another one in fledge.dev/root-service"
        );
        if stored.message != message {
            let with_message = RolloutState {
                message: message.clone(),
                ..stored.clone()
            };
            let event = machine::Event {
                reason: "RootServiceMissing",
                message,
                warning: true,
            };
            publish(&ctx, &deployment, &event).await;
            if !changed {
                store_state(&deployments, &deployment, Some(&with_message)).await?;
            }
        }
    }
    Ok(Action::requeue(match converged {
        // A changed state may allow the next step at once.
        _ if changed => Duration::from_millis(50),
        Converged::Yes => next.requeue.unwrap_or(RESYNC),
        Converged::Waiting | Converged::NoRootService(_) => RETRY,
    }))
}

enum Converged {
    Yes,
    Waiting,
    /// The root Service does not exist: nothing can be routed, which the user must hear about.
    NoRootService(String),
}

async fn converge(
    ctx: &Context,
    deployment: &Value,
    facts: &DeploymentFacts,
    stable_hash: Option<String>,
    target: Target,
    namespace: &str,
    may_promote: bool,
) -> Result<Converged, ControllerError> {
    let name = &facts.name;
    let client = &ctx.client;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let split_api = split_resource(ctx.config.split_api);
    let splits: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &split_api);
    let (size, weight) = match target {
        Target::Canary { size, weight } => (size, weight),
        Target::Promote => (Weight::FULL, Weight::FULL),
        Target::Nothing => return remove(ctx, facts, stable_hash, namespace).await,
    };
    let Some(spec) = &facts.spec else {
        return Ok(Converged::Waiting);
    };
    let Some(root) = services.get_opt(&spec.root_service).await? else {
        return Ok(Converged::NoRootService(spec.root_service.clone()));
    };
    let Some(stable_hash) = stable_hash else {
        return Ok(Converged::Waiting);
    };
    let root = serde_json::to_value(root).map_err(|source| ControllerError::Json {
        what: "the root Service",
        source,
    })?;
    let template: Value = deployment["metadata"]["annotations"][ANNOTATION_CANARY_TEMPLATE]
        .as_str()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|source| ControllerError::Json {
            what: "fledge.dev/canary-template",
            source,
        })?
        .unwrap_or(Value::Null);
    let desired = objects::desired(&objects::Inputs {
        deployment,
        canary_template: &template,
        canary_hash: facts.pending_hash.as_deref().unwrap_or_default(),
        root_service: &root,
        stable_pod_template_hash: &stable_hash,
        size,
        weight,
        split_api: ctx.config.split_api,
    })?;
    let apply = PatchParams::apply(MANAGER).force();
    deployments
        .patch(
            &format!("{name}{CANARY_SUFFIX}"),
            &apply,
            &Patch::Apply(&desired.canary_deployment),
        )
        .await?;
    services
        .patch(
            &format!("{name}{CANARY_SUFFIX}"),
            &apply,
            &Patch::Apply(&desired.canary_service),
        )
        .await?;
    services
        .patch(
            &format!("{name}{STABLE_SUFFIX}"),
            &apply,
            &Patch::Apply(&desired.stable_service),
        )
        .await?;
    splits
        .patch(name, &apply, &Patch::Apply(&desired.traffic_split))
        .await?;
    if may_promote
        && target == Target::Promote
        && facts.pending_hash.as_deref() != Some(facts.stable_hash.as_str())
    {
        // The stable Deployment takes the canary's template, exactly as recorded, only while the
        // stored state is still the one observed (Promoting this canary): a command or a new
        // template written since makes the patch fail. Status updates, which change the
        // resourceVersion all through a rollout, do not.
        let state_path = json_patch::jsonptr::PointerBuf::from_tokens([
            "metadata",
            "annotations",
            ANNOTATION_STATE,
        ])
        .to_string();
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": state_path, "value": deployment["metadata"]["annotations"][ANNOTATION_STATE]},
            {"op": "replace", "path": "/spec/template", "value": template},
        ]))
        .map_err(|source| ControllerError::Json {
            what: "the promotion patch",
            source,
        })?;
        deployments
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
    }
    Ok(Converged::Yes)
}

/// Traffic back to the stable pods first, then fledge's objects deleted.
async fn remove(
    ctx: &Context,
    facts: &DeploymentFacts,
    stable_hash: Option<String>,
    namespace: &str,
) -> Result<Converged, ControllerError> {
    let name = &facts.name;
    let client = &ctx.client;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let split_api = split_resource(ctx.config.split_api);
    let splits: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &split_api);
    let stable_name = format!("{name}{STABLE_SUFFIX}");
    if let Some(split) = splits.get_opt(name).await? {
        let stable_service = services.get_opt(&stable_name).await?;
        if let (Some(hash), Some(service)) = (stable_hash, stable_service) {
            // After a promotion web-stable still selects the old ReplicaSet: re-pin it to the pods
            // that run now before any traffic goes back to it.
            let mut selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
            if selector.get(objects::POD_TEMPLATE_HASH) != Some(&hash) {
                selector.insert(objects::POD_TEMPLATE_HASH.into(), hash);
                // A merge patch: an apply of the selector alone would drop the ports fledge applied.
                let pin = json!({"spec": {"selector": selector}});
                services
                    .patch(&stable_name, &PatchParams::default(), &Patch::Merge(&pin))
                    .await?;
            }
        }
        if !rolled_out_to_stable(&split) {
            let mut all_stable = split.data.clone();
            if let Some(backends) = all_stable["spec"]["backends"].as_array_mut() {
                for backend in backends {
                    let to_stable = backend["service"] == stable_name.as_str();
                    backend["weight"] = json!(if to_stable {
                        Weight::FULL.basis_points()
                    } else {
                        0
                    });
                }
            }
            let body = json!({"apiVersion": split_api.api_version, "kind": "TrafficSplit",
                              "metadata": {"name": name}, "spec": all_stable["spec"]});
            splits
                .patch(
                    name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await?;
        }
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    gone(
        deployments
            .delete(
                &format!("{name}{CANARY_SUFFIX}"),
                &DeleteParams::background(),
            )
            .await,
    )?;
    gone(splits.delete(name, &DeleteParams::background()).await)?;
    gone(
        services
            .delete(
                &format!("{name}{CANARY_SUFFIX}"),
                &DeleteParams::background(),
            )
            .await,
    )?;
    gone(
        services
            .delete(&stable_name, &DeleteParams::background())
            .await,
    )?;
    Ok(Converged::Yes)
}

/// A delete whose object is already gone succeeded.
fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Whether a TrafficSplit already sends nothing to the canary.
fn rolled_out_to_stable(split: &DynamicObject) -> bool {
    split.data["spec"]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["service"]
                .as_str()
                .is_some_and(|s| s.ends_with(CANARY_SUFFIX))
        })
        .all(|b| b["weight"].as_u64() == Some(0) || b["weight"].as_str() == Some("0"))
}

fn split_resource(api: SplitApi) -> ApiResource {
    let (group, version) = api
        .api_version()
        .split_once('/')
        .unwrap_or(("split.smi-spec.io", "v1alpha2"));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api.api_version().into(),
        kind: "TrafficSplit".into(),
        plural: "trafficsplits".into(),
    }
}

/// Writes the state annotation (or removes fledge's annotations when the Deployment left), with the
/// observed resourceVersion as a precondition: a concurrent writer makes this fail with 409 and the
/// reconcile runs again on fresh data.
async fn store_state(
    deployments: &Api<Deployment>,
    deployment: &Deployment,
    state: Option<&RolloutState>,
) -> Result<(), ControllerError> {
    let annotations = match state {
        Some(state) => {
            json!({ ANNOTATION_STATE: serde_json::to_string(state).map_err(|source| ControllerError::Json { what: "the rollout state", source })? })
        }
        None => {
            json!({ ANNOTATION_STATE: null, ANNOTATION_CANARY_HASH: null, ANNOTATION_CANARY_TEMPLATE: null })
        }
    };
    let patch = json!({"metadata": {"resourceVersion": deployment.resource_version(), "annotations": annotations}});
    deployments
        .patch(
            &deployment.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn publish(ctx: &Context, deployment: &Deployment, event: &machine::Event) {
    let announcement = events::transition_event(
        deployment.object_ref(&()),
        deployment.annotations(),
        event,
        &ctx.reporter,
        Timestamp::now(),
    );
    if let Err(e) = events::record(&ctx.client, &announcement).await {
        tracing::warn!(error = %e, reason = event.reason, "could not record an Event");
    }
}
