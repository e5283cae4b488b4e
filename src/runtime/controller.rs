//! The controller: read → decide → apply around the pure core.
//!
//! - **read**: the Deployment, its canary, its ReplicaSets and fledge's Services come from
//!   watch-fed caches (kube-runtime reflectors); only the root Service (while a canary needs its
//!   ports) and the traffic object (before it is turned to stable) are read by GET;
//! - **decide**: [`machine::next`] gives the next rollout step, [`converge::writes`] the ordered
//!   writes; both pure;
//! - **apply**: the writes, one by one, each conditioned where it must be.
//!
//! Level-triggered: a controller killed at any point resumes from what is stored.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ApiResource, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::core::admission::FIELD_MANAGER;
use crate::core::analysis::schedule;
use crate::core::analysis::{Outcome, Variables};
use crate::core::converge::{self, OwnedObjects, Write};
use crate::core::objects::{
    self, Desired, LABEL_MANAGED_BY, POD_TEMPLATE_HASH, SplitApi, TRACK_CANARY,
};
use crate::core::observe::{self, DeploymentFacts};
use crate::core::policy::{PolicyId, PolicySnapshot};
use crate::core::rollout::machine;
use crate::core::rollout::{Phase, RolloutState};
use crate::core::routes::{self, Backends, RouteExtras};
use crate::core::spec::{
    ANNOTATION_HOLD, ANNOTATION_STABLE_HASH, ANNOTATION_STATE, CANARY_SUFFIX, CanarySpec,
    LABEL_TRACK, Router, STABLE_SUFFIX, Step, Weight,
};
use crate::runtime::analysis;
use crate::runtime::clock::Clock;
use crate::runtime::events::{self, Reporter};
use crate::runtime::measurements::{Completed, Measurements, Subject};
use crate::runtime::owner_index::OwnerIndex;
use crate::runtime::policies::{self, PolicyWatch};
use crate::runtime::traffic::{
    TrafficError, TrafficObjects, is_fledges, not_served, route_resource, rules_of, split_resource,
    writer,
};

/// Field manager of every write, and the Event reporter.
pub const MANAGER: &str = FIELD_MANAGER;
/// How soon to look again when waiting on something without a known end (a missing Service).
const RETRY: Duration = Duration::from_secs(10);
/// How soon to look again while a router's CRD or a user's route is missing: once it appears, the
/// canary goes on within seconds.
const ROUTER_RETRY: Duration = Duration::from_secs(2);
/// How often the users' routes of a canary in flight are read again (`fledge.dev/http-routes`):
/// fledge does not watch them, so a route reset by a sync mid-canary is split again within this.
const USER_ROUTES_RECHECK: Duration = Duration::from_secs(10);
/// How long the canary's objects, as fledge last applied them, are trusted without a request:
/// a reconcile with the same inputs in this time writes nothing, unless the caches show that
/// someone changed the canary Deployment or a Service since. The traffic object is not watched:
/// an edit of it by hand is undone within this. Measured on fledge's clock.
const REAPPLY: SignedDuration = SignedDuration::from_secs(60);
/// How often to look at a settled Deployment anyway (from the caches: it costs no request).
const RESYNC: Duration = Duration::from_secs(300);
/// Reconciles at once: a bound, so that thousands of Deployments changing together cannot take
/// every core from the webhook.
const CONCURRENCY: u16 = 32;

/// Conditioned writes that fail in a row before the error policy backs off.
const CHANGED_RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    Traffic(#[from] TrafficError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Objects(#[from] objects::ObjectError),
    /// A write conditioned on the Deployment as read (JSON patch `test`s) found it changed:
    /// kube-apiserver answers a failed `test` with 422, not 409.
    #[error("the Deployment changed since it was read: {0}")]
    ChangedSinceRead(kube::Error),
    #[error("encoding {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Watch one namespace only; all when `None`.
    pub namespace: Option<String>,
    pub split_api: SplitApi,
    pub metrics: ControllerMetrics,
    /// Prometheus for checks that name no `address` (`fledge serve --prometheus-address`).
    pub prometheus_address: Option<String>,
    /// The policies and namespace labels, from the watches every replica runs.
    pub policies: PolicyWatch,
    /// What `now` is for pauses, promotion windows and measurement schedules.
    pub clock: Clock,
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
struct MeasurementLabels {
    namespace: String,
    deployment: String,
    check: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    namespace: String,
    deployment: String,
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The controller's Prometheus metrics (served at the webhook's `/metrics`).
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    weight: Family<CanaryLabels, Gauge<f64, AtomicU64>>,
    phase: Family<PhaseLabels, Gauge>,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    pause_lateness: Histogram,
    measurements: Family<MeasurementLabels, Counter>,
    last_value: Family<CheckLabels, Gauge<f64, AtomicU64>>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics {
            weight: Family::default(),
            phase: Family::default(),
            reconciles: Family::default(),
            // 1 ms … ~16 s: a reconcile is a few API calls.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            pause_lateness: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            measurements: Family::default(),
            last_value: Family::default(),
        }
    }
}

impl ControllerMetrics {
    /// New metrics, registered under `fledge_`.
    pub fn register(registry: &mut Registry) -> ControllerMetrics {
        let metrics = ControllerMetrics::default();
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
            "Reconciles, by result (ok, error; deferred: before the caches were listed, or while a Deployment's cache has not seen fledge's own last write of it)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "controller_reconcile_duration_seconds",
            "Time one reconcile takes",
            metrics.duration.clone(),
        );
        registry.register(
            "pause_end_lateness_seconds",
            "From a timed pause's end to the reconcile that ends it",
            metrics.pause_lateness.clone(),
        );
        registry.register(
            "analysis_measurements",
            "Measurements recorded, by Deployment, check and outcome",
            metrics.measurements.clone(),
        );
        registry.register(
            "analysis_last_value",
            "The last numeric value a check measured, by Deployment and check",
            metrics.last_value.clone(),
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
            phase: phase.name(),
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

    fn measured(&self, namespace: &str, deployment: &str, result: &Completed) {
        self.measurements
            .get_or_create(&MeasurementLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                check: result.check().to_owned(),
                outcome: result.judged.outcome.name(),
            })
            .inc();
        if let Ok(value) = result.judged.value.parse::<f64>() {
            self.last_value
                .get_or_create(&CheckLabels {
                    namespace: namespace.to_owned(),
                    deployment: deployment.to_owned(),
                    check: result.check().to_owned(),
                })
                .set(value);
        }
    }

    /// A timed pause that ended `late` after its end.
    fn pause_ended(&self, late: Duration) {
        self.pause_lateness.observe(late.as_secs_f64());
    }

    /// A reconcile put off because the caches are not listed yet, or do not hold fledge's own
    /// last write of the Deployment yet.
    fn deferred(&self) {
        self.reconciles
            .get_or_create(&ResultLabels { result: "deferred" })
            .inc();
    }

    fn reconciled(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }
}

/// The watch-fed caches a reconcile reads from.
struct Caches {
    /// fledge's canary Deployments.
    canaries: Store<DynamicObject>,
    /// fledge's Services.
    services: Store<Service>,
    /// Every ReplicaSet, metadata only: the stable one's `pod-template-hash`.
    replicasets: Store<PartialObjectMeta<ReplicaSet>>,
    replicasets_by_owner: OwnerIndex<PartialObjectMeta<ReplicaSet>>,
    /// The canaries' ReplicaSets, whole: their available pods.
    canary_replicasets: Store<ReplicaSet>,
    canary_replicasets_by_owner: OwnerIndex<ReplicaSet>,
}

impl Caches {
    /// Whether every cache has been listed once: a controller that starts (or restarts) must not
    /// take a cache still empty for a world without canary pods, and turn their traffic off.
    fn ready(&self) -> bool {
        use futures::FutureExt as _;
        [
            self.canaries.wait_until_ready().boxed(),
            self.services.wait_until_ready().boxed(),
            self.replicasets.wait_until_ready().boxed(),
            self.canary_replicasets.wait_until_ready().boxed(),
        ]
        .into_iter()
        .all(|ready| matches!(ready.now_or_never(), Some(Ok(()))))
    }
}

struct Context {
    client: Client,
    config: ControllerConfig,
    reporter: Reporter,
    caches: Caches,
    measurements: Measurements,
    remembered: Arc<Remembered>,
}

/// What the controller remembers of each Deployment between passes. The Deployment watch forgets a
/// Deployment when it is deleted, or missing from a relist, so that churn does not grow these.
#[derive(Default)]
struct Remembered {
    /// Consecutive failures per Deployment, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<DynamicObject>, u32>>,
    /// The policy (and its generation) each opted-in Deployment was last reconciled under, for
    /// `PolicyChanged` Events.
    governed: Mutex<HashMap<ObjectRef<DynamicObject>, Option<Governing>>>,
    /// What was last applied for each canary, by namespace and Deployment name.
    applied: Mutex<HashMap<(String, String), AppliedCanary>>,
    /// For each Deployment fledge wrote, its uid and the `metadata.generation` the write produced
    /// (generations only grow, unlike resourceVersions, which may only be compared for equality):
    /// a cache that shows an older generation of the same object has not seen the write yet, and a
    /// decision made from it would fail the write's own `test` after announcing its Event a
    /// second time.
    written: Mutex<HashMap<(String, String), (String, i64)>>,
}

impl Remembered {
    /// Follows the Deployment watch, after the store has taken each event.
    fn follow(&self, event: &watcher::Event<DynamicObject>, store: &Store<DynamicObject>) {
        match event {
            watcher::Event::Delete(deployment) => {
                let gone = ObjectRef::from_obj_with(deployment, deployment_resource());
                self.keep(|key| *key != gone);
            }
            // A relist: what was deleted while the watch was down sent no Delete.
            watcher::Event::InitDone => self.keep(|key| store.get(key).is_some()),
            _ => {}
        }
    }

    fn keep(&self, keep: impl Fn(&ObjectRef<DynamicObject>) -> bool) {
        let by_name = |(namespace, name): &(String, String)| {
            let key = ObjectRef::new_with(name, deployment_resource());
            keep(&if namespace.is_empty() {
                key
            } else {
                key.within(namespace)
            })
        };
        lock(&self.failures).retain(|key, _| keep(key));
        lock(&self.governed).retain(|key, _| keep(key));
        lock(&self.applied).retain(|key, _| by_name(key));
        lock(&self.written).retain(|key, _| by_name(key));
    }

    /// Whether the cached `deployment` is older than fledge's last write of it: the same object
    /// (uid) at a lower generation.
    fn behind_own_write(&self, deployment: &DynamicObject) -> bool {
        let key = (
            deployment.namespace().unwrap_or_default(),
            deployment.name_any(),
        );
        let mut written = lock(&self.written);
        match written.get(&key) {
            Some((uid, generation))
                if deployment.metadata.uid.as_ref() == Some(uid)
                    && deployment
                        .metadata
                        .generation
                        .is_some_and(|g| g < *generation) =>
            {
                true
            }
            Some(_) => {
                written.remove(&key);
                false
            }
            None => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything the canary's objects are made from, besides the root Service.
#[derive(Clone, Debug, PartialEq)]
struct CanaryInputs {
    /// The Deployment's uid, `metadata.generation` (its spec: replicas, strategy, template) and
    /// labels, which the canary Deployment copies.
    uid: Option<String>,
    generation: Option<i64>,
    labels: Value,
    template_hash: String,
    stable_pod_template_hash: String,
    size: Weight,
    /// The canary Deployment's replicas for `size`: sizes of as many pods make the same canary.
    canary_pods: u64,
    weight: Weight,
    extras: RouteExtras,
    router: Router,
    root_service: String,
}

impl CanaryInputs {
    /// What the Services are made from, besides the root Service.
    fn services_part(&self) -> (&Router, &str, &str) {
        (
            &self.router,
            &self.root_service,
            &self.stable_pod_template_hash,
        )
    }

    /// What the canary Deployment is made from.
    fn canary_part(&self) -> (&Option<String>, Option<i64>, &Value, &str, u64, &Router) {
        (
            &self.uid,
            self.generation,
            &self.labels,
            &self.template_hash,
            self.canary_pods,
            &self.router,
        )
    }
}

/// A canary's objects as fledge last applied them all (at most [`REAPPLY`] ago), while the
/// cached canary Deployment and Services show fledge's writes (or, not caught up yet, what they
/// replaced). Then the same inputs need no request at all, and new ones only the writes of the
/// objects they change: the root Service is not read again, nor the Services written. Most
/// reconciles of a canary in flight are such (its pods becoming ready, a measurement folded in,
/// a pause ending).
#[derive(Clone, Debug)]
struct AppliedCanary {
    inputs: CanaryInputs,
    /// The root Service as read for the last full apply.
    root: Value,
    /// When the last full apply was, on fledge's clock.
    at: Timestamp,
    /// The canary Deployment's generation before and after fledge's last write of it.
    canary_generation: [Option<i64>; 2],
    /// The canary and the stable Service's resourceVersions before and after fledge's write.
    services: [[Option<String>; 2]; 2],
}

/// A policy and the generation of it that governs a Deployment.
type Governing = (PolicyId, i64);

/// apps/v1 Deployments, read as JSON: typed structs would drop what the API server sent
/// (`creationTimestamp: null` in templates, fields newer than fledge), and with it the template's
/// identity.
fn deployment_resource() -> ApiResource {
    ApiResource::erase::<Deployment>(&())
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // A namespace's opt-in or a policy not yet known would look like an opt-out, which releases
    // held canaries: nothing is reconciled before the first sync.
    config.policies.wait_synced().await;
    let policy_changes = config.policies.changes();
    let clock_moves = config.clock.moves();
    let ar = deployment_resource();
    let ns = config.namespace.clone();
    let dynamic = |client: &Client| match &ns {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
        None => Api::<DynamicObject>::all_with(client.clone(), &ar),
    };
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let canary_pods = watcher::Config::default().labels(&format!("{LABEL_TRACK}={TRACK_CANARY}"));
    let strip = |o: &mut DynamicObject| o.managed_fields_mut().clear();

    let deployments_writer = reflector::store::Writer::new(ar.clone());
    let deployments = deployments_writer.as_reader();
    let remembered = Arc::new(Remembered::default());
    let (following, store) = (remembered.clone(), deployments.clone());
    let deployment_stream = watcher(dynamic(&client), watcher::Config::default())
        .default_backoff()
        .modify(observe::trim_for_cache)
        .reflect(deployments_writer)
        .inspect_ok(move |event| following.follow(event, &store))
        .applied_objects();
    let canaries_writer = reflector::store::Writer::new(ar.clone());
    let canaries = canaries_writer.as_reader();
    let canary_stream = watcher(dynamic(&client), owned.clone())
        .default_backoff()
        .modify(strip)
        .reflect(canaries_writer)
        .applied_objects();
    let (services, services_writer) = reflector::store();
    let service_stream = watcher(scoped::<Service>(&client, &config.namespace), owned)
        .default_backoff()
        .modify(|s| s.managed_fields_mut().clear())
        .reflect(services_writer)
        .applied_objects();
    let (replicasets, replicasets_writer) = reflector::store();
    let replicasets_by_owner = OwnerIndex::new(replicasets.clone());
    let indexing = replicasets_by_owner.clone();
    let replicaset_stream = watcher(
        scoped::<PartialObjectMeta<ReplicaSet>>(&client, &config.namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|r| observe::trim_replicaset_for_cache(&mut r.metadata))
    .inspect_ok(move |event| indexing.apply(event))
    .reflect(replicasets_writer)
    .applied_objects();
    let (canary_replicasets, canary_replicasets_writer) = reflector::store();
    let canary_replicasets_by_owner = OwnerIndex::new(canary_replicasets.clone());
    let indexing = canary_replicasets_by_owner.clone();
    let canary_replicaset_stream = watcher(
        scoped::<ReplicaSet>(&client, &config.namespace),
        canary_pods,
    )
    .default_backoff()
    .modify(|r| r.managed_fields_mut().clear())
    .inspect_ok(move |event| indexing.apply(event))
    .reflect(canary_replicasets_writer)
    .applied_objects();

    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| MANAGER.into()),
    };
    let http = match analysis::http_client() {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client of analysis checks; the controller does not run");
            return;
        }
    };
    let (measurements, measured) =
        Measurements::new(client.clone(), http, config.prometheus_address.clone());
    // A measurement that comes in asks for a reconcile of its Deployment.
    let measured = futures::stream::unfold(measured, |mut rx| async move {
        rx.recv().await.map(|deployment| (deployment, rx))
    });
    let context = Arc::new(Context {
        client,
        config,
        reporter,
        caches: Caches {
            canaries,
            services,
            replicasets,
            replicasets_by_owner,
            canary_replicasets,
            canary_replicasets_by_owner,
        },
        measurements,
        remembered,
    });
    // Aborted when the controller stops (a deposed leader writes no status).
    let status_task = AbortOnDrop(tokio::spawn(policies::report_status(
        context.client.clone(),
        deployments.clone(),
        context.config.policies.clone(),
    )));
    let ar_for_mapper = ar.clone();
    Controller::for_stream_with(deployment_stream, deployments, ar.clone())
        .owns_stream_with(canary_stream, ar.clone())
        .owns_stream(service_stream)
        .owns_stream_with(replicaset_stream, ())
        // A canary ReplicaSet belongs to `NAME-canary`, which belongs to `NAME`.
        .watches_stream_with(
            canary_replicaset_stream,
            move |rs: ReplicaSet| {
                let owner = rs
                    .owner_references()
                    .iter()
                    .find(|o| o.controller == Some(true) && o.kind == "Deployment")
                    .and_then(|o| o.name.strip_suffix(CANARY_SUFFIX).map(str::to_owned));
                let namespace = rs.namespace();
                owner.map(|name| {
                    let r = ObjectRef::new_with(&name, ar_for_mapper.clone());
                    match &namespace {
                        Some(ns) => r.within(ns),
                        None => r,
                    }
                })
            },
            (),
        )
        .reconcile_on(measured)
        // A policy or a namespace's labels changed: every Deployment may be governed anew.
        .reconcile_all_on(policy_changes)
        .reconcile_all_on(clock_moves)
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    drop(status_task);
}

/// Aborts the task when dropped, however the owner ends (returned, or cancelled with its future).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

fn error_policy(
    deployment: Arc<DynamicObject>,
    error: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    let key = ObjectRef::from_obj_with(&*deployment, deployment_resource());
    let failures = {
        let mut failures = lock(&ctx.remembered.failures);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    match error {
        // Someone else wrote first (the Deployment controller's status, a user's command): read
        // again and go on at once.
        ControllerError::Kube(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(deployment = %deployment.name_any(), "conflict; reading again");
            Action::requeue(Duration::from_millis(100))
        }
        // The same for a conditioned write. A 422 has other causes too (a value the API server
        // refuses), so after a few in a row it backs off like any failure.
        ControllerError::ChangedSinceRead(_) if failures <= CHANGED_RETRIES => {
            tracing::debug!(deployment = %deployment.name_any(), %error, "changed since read; reading again");
            Action::requeue(Duration::from_millis(100))
        }
        _ => {
            // 1 s, 2 s, 4 s … up to 5 minutes.
            let backoff = Duration::from_secs(1u64 << failures.min(9).saturating_sub(1))
                .min(Duration::from_secs(300));
            tracing::warn!(deployment = %deployment.name_any(), %error, failures, ?backoff, "reconcile failed; retrying");
            Action::requeue(backoff)
        }
    }
}

#[tracing::instrument(skip_all, fields(namespace = %deployment.namespace().unwrap_or_default(), deployment = %deployment.name_any()))]
async fn reconcile(
    deployment: Arc<DynamicObject>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    if !ctx.caches.ready() {
        ctx.config.metrics.deferred();
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    if ctx.remembered.behind_own_write(&deployment) {
        ctx.config.metrics.deferred();
        // The write's watch event starts the next pass; this is for a watch that lost it.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let started = Instant::now();
    let result = reconcile_one(&deployment, &ctx).await;
    ctx.config
        .metrics
        .reconciled(result.is_ok(), started.elapsed());
    if result.is_ok() {
        let key = ObjectRef::from_obj_with(&*deployment, deployment_resource());
        lock(&ctx.remembered.failures).remove(&key);
    }
    result
}

/// What one reconcile read: the Deployment's facts and the world around it.
struct Read {
    value: Value,
    facts: DeploymentFacts,
    canary: Option<Value>,
    canary_replicasets: Vec<Value>,
    owned: OwnedObjects,
    stable_pod_template_hash: Option<String>,
}

/// The read step: everything from the caches.
fn read(
    deployment: &DynamicObject,
    caches: &Caches,
    policies: &PolicySnapshot,
) -> Result<Read, ControllerError> {
    let json = |what, v: Result<Value, serde_json::Error>| {
        v.map_err(|source| ControllerError::Json { what, source })
    };
    let value = json("the Deployment", serde_json::to_value(deployment))?;
    let facts = DeploymentFacts::read(&value, policies);
    let namespace = deployment.namespace().unwrap_or_default();
    let name = &facts.name;
    let canary_name = format!("{name}{CANARY_SUFFIX}");
    let canary = caches
        .canaries
        .get(&ObjectRef::new_with(&canary_name, deployment_resource()).within(&namespace))
        .map(|c| json("the canary Deployment", serde_json::to_value(&*c)))
        .transpose()?;
    let canary_uid = canary.as_ref().and_then(|c| c["metadata"]["uid"].as_str());
    let canary_replicasets = canary_uid
        .map(|uid| caches.canary_replicasets_by_owner.owned_by(&namespace, uid))
        .unwrap_or_default()
        .iter()
        .map(|rs| json("a canary ReplicaSet", serde_json::to_value(&**rs)))
        .collect::<Result<Vec<_>, _>>()?;
    let service = |suffix: &str| {
        caches
            .services
            .get(&ObjectRef::new(&format!("{name}{suffix}")).within(&namespace))
    };
    let owned = OwnedObjects {
        canary_deployment: canary.is_some(),
        canary_service: service(CANARY_SUFFIX).is_some(),
        stable_service: service(STABLE_SUFFIX).map(|s| {
            s.spec
                .as_ref()
                .and_then(|spec| spec.selector.as_ref())
                .and_then(|selector| selector.get(POD_TEMPLATE_HASH).cloned())
        }),
    };
    let uid = deployment.uid();
    let replicasets: Vec<Value> = uid
        .map(|uid| caches.replicasets_by_owner.owned_by(&namespace, &uid))
        .unwrap_or_default()
        .iter()
        .filter_map(|rs| serde_json::to_value(&**rs).ok())
        .collect();
    let stable_pod_template_hash = observe::stable_pod_template_hash(&value, &replicasets);
    Ok(Read {
        value,
        facts,
        canary,
        canary_replicasets,
        owned,
        stable_pod_template_hash,
    })
}

async fn reconcile_one(
    deployment: &DynamicObject,
    ctx: &Context,
) -> Result<Action, ControllerError> {
    let namespace = deployment.namespace().unwrap_or_default();
    let seen = read(deployment, &ctx.caches, &ctx.config.policies.snapshot())?;
    let facts = &seen.facts;
    announce_policy_change(ctx, deployment, facts).await;
    let state = match &facts.state {
        Ok(state) => state.clone(),
        Err(e) => {
            let event = machine::Event {
                reason: "StateUnreadable",
                message: e.to_string(),
                warning: true,
            };
            publish(ctx, deployment, facts, &event).await;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if facts.spec.is_none()
        && state.is_none()
        && facts.invalid.is_none()
        && !facts.needs_release()
        && !seen.owned.canary_deployment
    {
        // Not fledge's (this includes the canary Deployments fledge itself creates).
        return Ok(Action::await_change());
    }
    let key = ObjectRef::from_obj_with(deployment, deployment_resource());
    // The measurements that came in since, folded into what the machine sees; `state` stays the
    // stored one, so that a state with new measurements is a changed state, and stored.
    let mut measured = state.clone();
    let recorded = match (&mut measured, &facts.spec) {
        (Some(s), Some(spec)) if matches!(s.phase, Phase::Progressing | Phase::Paused) => {
            ctx.measurements.fold(&key, s, &spec.checks)
        }
        _ => Vec::new(),
    };
    let observation = facts.observation(seen.canary.as_ref(), &seen.canary_replicasets);
    let now = ctx.config.clock.now();
    let next = machine::next(measured.as_ref(), &observation, now);
    if let (Some(stored), Some(spec)) = (&state, &facts.spec)
        && next.events().any(|e| e.reason == "PauseEnded")
        && let (Some(Step::PauseFor(length)), Some(started)) =
            (spec.steps.get(stored.step), stored.step_started)
        && let Ok(length) = SignedDuration::try_from(*length)
        && let Ok(late) = Duration::try_from(now.duration_since(started) - length)
    {
        ctx.config.metrics.pause_ended(late);
    }
    ctx.config
        .metrics
        .record(&namespace, &facts.name, next.state.as_ref());
    let plan = converge::writes(&converge::World {
        facts,
        stored: state.as_ref(),
        next: &next,
        owned: seen.owned.clone(),
        stable_pod_template_hash: seen.stable_pod_template_hash.as_deref(),
        canary_ready: observation.canary.ready_replicas > 0,
    });
    let changed = next.state.as_ref() != state.as_ref();
    let apply = Apply {
        ctx,
        deployment,
        read: &seen,
        namespace: &namespace,
    };
    for result in &recorded {
        apply
            .announce_measurement(result, next.state.as_ref())
            .await;
    }
    if !plan.iter().any(|w| matches!(w, Write::ApplyCanary { .. })) {
        apply.forget_applied();
    }
    let outcome = apply.all(&plan, next.state.as_ref()).await?;
    let mut soonest = None;
    if let Applied::Done = outcome {
        // Stored: the results it holds are no longer needed.
        ctx.measurements.forget(&key, next.state.as_ref());
        for result in &recorded {
            ctx.config.metrics.measured(&namespace, &facts.name, result);
        }
        apply.clean_up_jobs(state.as_ref(), &next).await;
        if let (Some(stored), Some(spec)) = (&next.state, &facts.spec)
            && matches!(stored.phase, Phase::Progressing | Phase::Paused)
        {
            let (due, wait) = schedule::due(&stored.checks, &spec.checks, now);
            soonest = wait;
            if !due.is_empty() {
                let subject = apply.subject(spec, stored);
                ctx.measurements
                    .start(&subject, &stored.hash, due, &spec.checks);
            }
        }
    }
    let splits_user_routes = facts.spec.as_ref().is_some_and(|spec| {
        matches!(&spec.router, Router::GatewayApi { http_routes } if !http_routes.is_empty())
    }) && matches!(next.target, machine::Target::Canary { .. });
    let requeue = [
        next.requeue,
        soonest,
        splits_user_routes.then_some(USER_ROUTES_RECHECK),
    ]
    .into_iter()
    .flatten()
    .min();
    Ok(Action::requeue(match outcome {
        // A changed state may allow the next step at once.
        Applied::Done if changed => Duration::from_millis(50),
        Applied::Done => requeue.unwrap_or(RESYNC),
        Applied::Waiting => RETRY,
        Applied::WaitingForRouter => ROUTER_RETRY,
        Applied::Saved => Duration::from_millis(50),
    }))
}

enum Applied {
    Done,
    /// Something the writes need is not there yet (the root Service, the stable ReplicaSet).
    Waiting,
    /// The router's API (its CRD) or the user's route is not there yet.
    WaitingForRouter,
    /// The user's route rules were saved in the state before fledge touches them: go on at once.
    Saved,
}

/// The apply step: carries out the decided writes in order.
struct Apply<'a> {
    ctx: &'a Context,
    deployment: &'a DynamicObject,
    read: &'a Read,
    namespace: &'a str,
}

impl Apply<'_> {
    fn deployments(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.ctx.client.clone(),
            self.namespace,
            &deployment_resource(),
        )
    }

    fn splits(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.ctx.client.clone(),
            self.namespace,
            &split_resource(self.ctx.config.split_api),
        )
    }

    fn traffic(&self) -> TrafficObjects<'_> {
        TrafficObjects {
            client: &self.ctx.client,
            namespace: self.namespace,
            deployment: &self.read.value,
            split_api: self.ctx.config.split_api,
        }
    }

    fn routes(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.ctx.client.clone(), self.namespace, &route_resource())
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.ctx.client.clone(), self.namespace)
    }

    fn name(&self) -> &str {
        &self.read.facts.name
    }

    /// Where the measurements of the canary in `state` run, and what their variables stand for.
    fn subject(&self, spec: &CanarySpec, state: &RolloutState) -> Subject {
        let name = self.name();
        Subject {
            deployment: ObjectRef::from_obj_with(self.deployment, deployment_resource()),
            owner: OwnerReference {
                api_version: "apps/v1".to_owned(),
                kind: "Deployment".to_owned(),
                name: name.to_owned(),
                uid: self.deployment.uid().unwrap_or_default(),
                block_owner_deletion: Some(true),
                controller: Some(false),
            },
            variables: Variables {
                namespace: self.namespace.to_owned(),
                deployment: name.to_owned(),
                canary_service: format!("{name}{CANARY_SUFFIX}"),
                stable_service: format!("{name}{STABLE_SUFFIX}"),
                root_service: spec.root_service.clone(),
                canary_hash: state.hash.clone(),
                stable_pod_template_hash: self
                    .read
                    .stable_pod_template_hash
                    .clone()
                    .unwrap_or_default(),
                // Set per check.
                interval: String::new(),
            },
        }
    }

    /// Deletes the Jobs of job checks once their canary is gone: promoted, rolled back, replaced
    /// by a new template or opted out. An aborted canary keeps its Jobs, for `kubectl logs`,
    /// until one of those; they are owned by the Deployment in any case.
    async fn clean_up_jobs(&self, stored: Option<&RolloutState>, next: &machine::Next) {
        let Some(event) = &next.event else {
            return;
        };
        if stored.is_none_or(|s| s.checks.is_empty()) {
            return;
        }
        let keep = match event.reason {
            "Promoted" | "RolledBack" | "OptedOut" => None,
            "CanaryStarted" | "CanaryReplaced" => next.state.as_ref().map(|s| s.hash.as_str()),
            _ => return,
        };
        if let Err(e) =
            analysis::delete_jobs(self.ctx.client.clone(), self.namespace, self.name(), keep).await
        {
            tracing::warn!(error = %e, "could not delete the Jobs of finished checks");
        }
    }

    /// A Warning Event for a measurement that did not succeed, before the state holding it is
    /// stored (named after that transition, so a retry records it once).
    async fn announce_measurement(&self, result: &Completed, next: Option<&RolloutState>) {
        let reason = match result.judged.outcome {
            Outcome::Successful => return,
            Outcome::Failed => "MeasurementFailed",
            Outcome::Inconclusive => "MeasurementInconclusive",
            Outcome::Error => "MeasurementError",
        };
        let counts = next
            .and_then(|s| s.checks.get(result.check()))
            .map(|run| {
                format!(
                    " (failed {}, inconclusive {}, errors in a row {})",
                    run.failed, run.inconclusive, run.consecutive_errors
                )
            })
            .unwrap_or_default();
        let detail = schedule::reason(&result.judged.value, &result.judged.detail);
        let event = machine::Event {
            reason,
            message: format!(
                "{} measurement {}: {detail}{counts}",
                result.check(),
                result.index() + 1
            ),
            warning: true,
        };
        publish(self.ctx, self.deployment, &self.read.facts, &event).await;
    }

    async fn all(
        &self,
        writes: &[Write],
        next_state: Option<&RolloutState>,
    ) -> Result<Applied, ControllerError> {
        // The Events are recorded while the traffic is written, and before the state: a pass
        // that stops before its state is stored announces again, under the same names.
        // One task records them all, in order.
        let events: Vec<&machine::Event> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Announce(event) => Some(event),
                _ => None,
            })
            .collect();
        let mut announcing = (!events.is_empty()).then(|| {
            tokio::spawn(record_all(
                self.ctx.client.clone(),
                announcements(self.ctx, self.deployment, &self.read.facts, &events),
            ))
        });
        for write in writes {
            match write {
                Write::Announce(_) => {}
                Write::ApplyCanary {
                    size,
                    weight,
                    extras,
                } => {
                    if let Some(waiting) = self
                        .apply_canary(*size, *weight, extras, next_state)
                        .await?
                    {
                        return Ok(waiting);
                    }
                }
                Write::StoreState(state) => {
                    joined(&mut announcing).await;
                    self.store_state(Some(state)).await?;
                }
                Write::Unpause => self.unpause().await?,
                Write::RepinStable(hash) => self.repin_stable(hash).await?,
                Write::TrafficToStable(router) => self.traffic_to_stable(router).await?,
                Write::RestoreRoutes(saved) => self.restore_routes(saved).await?,
                Write::DeleteCanaryDeployment => {
                    gone(
                        self.deployments()
                            .delete(
                                &format!("{}{CANARY_SUFFIX}", self.name()),
                                &DeleteParams::background(),
                            )
                            .await,
                    )?;
                }
                Write::DeleteTrafficObject(router) => self.delete_traffic_object(router).await?,
                Write::DeleteServices => {
                    for suffix in [CANARY_SUFFIX, STABLE_SUFFIX] {
                        gone(
                            self.services()
                                .delete(
                                    &format!("{}{suffix}", self.name()),
                                    &DeleteParams::background(),
                                )
                                .await,
                        )?;
                    }
                }
                Write::Release => self.release().await?,
                Write::ForgetState => {
                    joined(&mut announcing).await;
                    self.store_state(None).await?;
                }
                Write::WaitForStableReplicaSet => return Ok(Applied::Waiting),
            }
        }
        joined(&mut announcing).await;
        Ok(Applied::Done)
    }

    /// Server-side apply of the canary's objects: Services, then the traffic, then the canary
    /// Deployment, so that no canary pod is ready before the traffic decides who reaches it.
    /// Only the objects whose inputs changed are written while the memo of the last full apply
    /// holds ([`AppliedCanary`]): a step writes the traffic first, and nothing else it need not.
    /// `Some(…)` when they cannot be made yet.
    async fn apply_canary(
        &self,
        size: Weight,
        weight: Weight,
        extras: &RouteExtras,
        next_state: Option<&RolloutState>,
    ) -> Result<Option<Applied>, ControllerError> {
        let facts = &self.read.facts;
        let Some(spec) = &facts.spec else {
            return Ok(Some(Applied::Waiting));
        };
        let Some(stable_hash) = &self.read.stable_pod_template_hash else {
            return Ok(Some(Applied::Waiting));
        };
        let inputs = CanaryInputs {
            uid: self.read.value["metadata"]["uid"]
                .as_str()
                .map(str::to_owned),
            generation: self.read.value["metadata"]["generation"].as_i64(),
            labels: self.read.value["metadata"]["labels"].clone(),
            template_hash: facts.template_hash.clone(),
            stable_pod_template_hash: stable_hash.clone(),
            size,
            canary_pods: objects::canary_deployment_replicas(
                &spec.router,
                &self.read.value,
                size,
                weight,
            ),
            weight,
            extras: extras.clone(),
            router: spec.router.clone(),
            root_service: spec.root_service.clone(),
        };
        // The users' routes are read on every pass (they are not watched): never skipped.
        let splits_user_routes =
            matches!(&spec.router, Router::GatewayApi { http_routes } if !http_routes.is_empty());
        let memo = (!splits_user_routes)
            .then(|| self.still_applied(&inputs))
            .flatten();
        // The traffic object this pass has written already.
        let mut traffic_written = None;
        if let Some(memo) = memo {
            let due = self.ctx.config.clock.now().duration_since(memo.at) >= REAPPLY;
            if !due && memo.inputs == inputs {
                return Ok(None);
            }
            let traffic_changed = (memo.inputs.weight, &memo.inputs.extras) != (weight, extras);
            if traffic_changed || !due {
                // A step's weight goes out first, from the root Service as last read: when a full
                // apply is due too, reading it again and writing the Services must not make the
                // step late.
                let desired = self.desired(&memo.root, &inputs)?;
                if traffic_changed
                    && let Some(waiting) = self.apply_traffic(&desired, next_state).await?
                {
                    return Ok(Some(waiting));
                }
                if due {
                    traffic_written = desired.traffic;
                } else {
                    let canary_generation = if memo.inputs.canary_part() == inputs.canary_part() {
                        memo.canary_generation
                    } else {
                        self.apply_canary_deployment(&desired).await?
                    };
                    self.remember_applied(AppliedCanary {
                        inputs,
                        canary_generation,
                        ..memo
                    });
                    return Ok(None);
                }
            }
        }
        let Some(root) = self.services().get_opt(&spec.root_service).await? else {
            let message = format!(
                "root Service {} not found: fledge copies its ports and selector for the canary; \
                 create it, or name another one in fledge.dev/root-service",
                spec.root_service
            );
            self.wait_with("RootServiceMissing", message, next_state)
                .await?;
            return Ok(Some(Applied::Waiting));
        };
        let root = serde_json::to_value(root).map_err(|source| ControllerError::Json {
            what: "the root Service",
            source,
        })?;
        let desired = self.desired(&root, &inputs)?;
        let apply = PatchParams::apply(MANAGER).force();
        let mut services: [[Option<String>; 2]; 2] = Default::default();
        for (versions, (suffix, service)) in services.iter_mut().zip([
            (CANARY_SUFFIX, &desired.canary_service),
            (STABLE_SUFFIX, &desired.stable_service),
        ]) {
            let name = format!("{}{suffix}", self.name());
            versions[0] = self.cached_service_version(&name);
            versions[1] = self
                .services()
                .patch(&name, &apply, &Patch::Apply(service))
                .await?
                .metadata
                .resource_version;
        }
        let written = traffic_written.is_some() && traffic_written == desired.traffic;
        if !written && let Some(waiting) = self.apply_traffic(&desired, next_state).await? {
            return Ok(Some(waiting));
        }
        if let Router::GatewayApi { http_routes } = &spec.router
            && let Some(waiting) = self
                .split_user_routes(http_routes, &spec.root_service, weight, extras, next_state)
                .await?
        {
            return Ok(Some(waiting));
        }
        let canary_generation = self.apply_canary_deployment(&desired).await?;
        self.remember_applied(AppliedCanary {
            inputs,
            root,
            at: self.ctx.config.clock.now(),
            canary_generation,
            services,
        });
        Ok(None)
    }

    fn desired(&self, root: &Value, inputs: &CanaryInputs) -> Result<Desired, ControllerError> {
        Ok(objects::desired(&objects::Inputs {
            deployment: &self.read.value,
            canary_hash: &inputs.template_hash,
            root_service: root,
            stable_pod_template_hash: &inputs.stable_pod_template_hash,
            size: inputs.size,
            weight: inputs.weight,
            router: &inputs.router,
            extras: &inputs.extras,
            split_api: self.ctx.config.split_api,
        })?)
    }

    /// The router's own object (TrafficSplit or mesh HTTPRoute), when it has one.
    async fn apply_traffic(
        &self,
        desired: &Desired,
        next_state: Option<&RolloutState>,
    ) -> Result<Option<Applied>, ControllerError> {
        let (Some(traffic), Some(spec)) = (&desired.traffic, &self.read.facts.spec) else {
            return Ok(None);
        };
        let api = match spec.router {
            Router::Smi => self.splits(),
            Router::GatewayApi { .. } | Router::PodRatio => self.routes(),
        };
        let apply = PatchParams::apply(MANAGER).force();
        match api.patch(self.name(), &apply, &Patch::Apply(traffic)).await {
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.router_unavailable(&spec.router, next_state).await?;
                Ok(Some(Applied::WaitingForRouter))
            }
            other => other.map(|_| None).map_err(Into::into),
        }
    }

    /// Applies the canary Deployment: its generation before and after.
    async fn apply_canary_deployment(
        &self,
        desired: &Desired,
    ) -> Result<[Option<i64>; 2], ControllerError> {
        let before = self.cached_canary_generation();
        let canary = self
            .deployments()
            .patch(
                &format!("{}{CANARY_SUFFIX}", self.name()),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired.canary_deployment),
            )
            .await?;
        Ok([before, canary.metadata.generation])
    }

    fn applied_key(&self) -> (String, String) {
        (self.namespace.to_owned(), self.name().to_owned())
    }

    /// A write of the Deployment succeeded, with `written` as the API server's answer: see
    /// [`Remembered::behind_own_write`]. fledge's writes are conditioned on the Deployment as read
    /// and change only what the canary does not copy (annotations, `spec.paused`), so a memo of
    /// the canary's apply made from the read generation holds for the written one, and the next
    /// pass writes no canary.
    fn wrote_deployment(&self, written: &DynamicObject) {
        if let (Some(uid), Some(generation)) = (&written.metadata.uid, written.metadata.generation)
        {
            lock(&self.ctx.remembered.written)
                .insert(self.applied_key(), (uid.clone(), generation));
        }
        let read = self.read.value["metadata"]["generation"].as_i64();
        if let Some(memo) = lock(&self.ctx.remembered.applied).get_mut(&self.applied_key())
            && memo.inputs.uid == written.metadata.uid
            && memo.inputs.generation == read
        {
            memo.inputs.generation = written.metadata.generation;
        }
    }

    /// A JSON patch `test` that the Deployment is still at the generation this pass read:
    /// status writes (the Deployment controller's) do not move it, and every change of the spec
    /// or of the annotations does, so fledge's own writes do not conflict with status. The
    /// resourceVersion for a Deployment without one (never from kube-apiserver).
    fn test_unchanged(&self) -> Value {
        match &self.read.value["metadata"]["generation"] {
            Value::Number(generation) => {
                json!({"op": "test", "path": "/metadata/generation", "value": generation})
            }
            _ => {
                json!({"op": "test", "path": "/metadata/resourceVersion", "value": self.deployment.resource_version()})
            }
        }
    }

    /// Sends a JSON patch conditioned on the Deployment as read.
    async fn patch_unchanged(
        &self,
        ops: Vec<Value>,
        what: &'static str,
    ) -> Result<(), ControllerError> {
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
            .map_err(|source| ControllerError::Json { what, source })?;
        match self
            .deployments()
            .patch(self.name(), &writer(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(written) => {
                self.wrote_deployment(&written);
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 422 => {
                Err(ControllerError::ChangedSinceRead(kube::Error::Api(e)))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn remember_applied(&self, applied: AppliedCanary) {
        lock(&self.ctx.remembered.applied).insert(self.applied_key(), applied);
    }

    fn cached_service_version(&self, name: &str) -> Option<String> {
        self.ctx
            .caches
            .services
            .get(&ObjectRef::new(name).within(self.namespace))
            .and_then(|s| s.metadata.resource_version.clone())
    }

    fn cached_canary_generation(&self) -> Option<i64> {
        self.read
            .canary
            .as_ref()
            .and_then(|c| c["metadata"]["generation"].as_i64())
    }

    /// The memo of the last full apply, when it still holds for these inputs (see
    /// [`AppliedCanary`]), however long ago that was.
    fn still_applied(&self, inputs: &CanaryInputs) -> Option<AppliedCanary> {
        let applied = lock(&self.ctx.remembered.applied)
            .get(&self.applied_key())
            .cloned()?;
        // The cache shows fledge's write, or (not caught up yet) what that write replaced.
        let as_written = |versions: &[Option<String>; 2], now: Option<String>| {
            versions[1].is_some() && versions.contains(&now)
        };
        let canary_generation = self.cached_canary_generation();
        let holds = applied.inputs.services_part() == inputs.services_part()
            && applied.canary_generation[1].is_some()
            && applied.canary_generation.contains(&canary_generation)
            && as_written(
                &applied.services[0],
                self.cached_service_version(&format!("{}{CANARY_SUFFIX}", self.name())),
            )
            && as_written(
                &applied.services[1],
                self.cached_service_version(&format!("{}{STABLE_SUFFIX}", self.name())),
            );
        holds.then_some(applied)
    }

    /// The canary is not applied in this pass: the next one that is starts afresh.
    fn forget_applied(&self) {
        lock(&self.ctx.remembered.applied).remove(&self.applied_key());
    }

    fn backends<'b>(&'b self, root: &'b str, stable: &'b str, canary: &'b str) -> Backends<'b> {
        Backends {
            namespace: self.namespace,
            root,
            stable,
            canary,
        }
    }

    /// The gateway mode: each of the user's routes gets its references to the root Service split.
    /// The user's rules (the first ones fledge finds, then the route as it is now without
    /// fledge's fields, so that edits made since are kept) are saved in the state before any
    /// route is written.
    async fn split_user_routes(
        &self,
        names: &[String],
        root: &str,
        weight: Weight,
        extras: &RouteExtras,
        next_state: Option<&RolloutState>,
    ) -> Result<Option<Applied>, ControllerError> {
        let Some(state) = next_state else {
            return Ok(Some(Applied::Waiting));
        };
        let (stable, canary) = (
            format!("{}{STABLE_SUFFIX}", self.name()),
            format!("{}{CANARY_SUFFIX}", self.name()),
        );
        let backends = self.backends(root, &stable, &canary);
        let mut found = Vec::with_capacity(names.len());
        let mut to_save = routes::SavedRules::new();
        for name in names {
            let route = match self.routes().get_opt(name).await {
                Ok(Some(route)) => route,
                Ok(None) => {
                    let message = format!(
                        "HTTPRoute {name} (fledge.dev/http-routes) not found in namespace {}: the canary waits for it",
                        self.namespace
                    );
                    self.wait_with("HTTPRouteMissing", message, next_state)
                        .await?;
                    return Ok(Some(Applied::WaitingForRouter));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    self.router_unavailable(
                        &Router::GatewayApi {
                            http_routes: names.to_vec(),
                        },
                        next_state,
                    )
                    .await?;
                    return Ok(Some(Applied::WaitingForRouter));
                }
                Err(e) => return Err(e.into()),
            };
            let current = rules_of(&route);
            let saved = state.saved_routes.get(name).map(Vec::as_slice);
            let originals = match routes::originals(name, &current, saved, &backends) {
                Ok(originals) => originals,
                Err(e) => {
                    self.wait_with("HTTPRouteUnusable", e.to_string(), next_state)
                        .await?;
                    return Ok(Some(Applied::WaitingForRouter));
                }
            };
            // First touch, or the user changed the route since fledge wrote it: their rules, with
            // the change, are saved before fledge writes, and are what a restore gives back.
            if saved != Some(originals.as_slice()) {
                if saved.is_some() {
                    let event = machine::Event {
                        reason: "HTTPRouteChanged",
                        message: format!(
                            "HTTPRoute {name} changed since fledge wrote it: the change is kept, and only fledge's backends and rules are written again"
                        ),
                        warning: false,
                    };
                    publish(self.ctx, self.deployment, &self.read.facts, &event).await;
                }
                to_save.insert(name.clone(), originals.clone());
            }
            found.push((name, route, current, originals));
        }
        if !to_save.is_empty() {
            let mut saved_routes = state.saved_routes.clone();
            saved_routes.extend(to_save);
            self.store_state(Some(&RolloutState {
                saved_routes,
                ..state.clone()
            }))
            .await?;
            return Ok(Some(Applied::Saved));
        }
        for (name, route, current, originals) in found {
            let rules = routes::split_rules(name, &originals, &backends, weight, extras)
                .map_err(objects::ObjectError::from)?;
            if rules != current {
                self.write_rules(name, &route, rules).await?;
            }
        }
        Ok(None)
    }

    async fn write_rules(
        &self,
        name: &str,
        route: &DynamicObject,
        rules: Vec<Value>,
    ) -> Result<(), ControllerError> {
        Ok(self.traffic().write_rules(name, route, rules).await?)
    }

    async fn restore_routes(&self, saved: &routes::SavedRules) -> Result<(), ControllerError> {
        Ok(self.traffic().restore_routes(saved).await?)
    }

    /// The router's API is not served (its CRD is not installed): only this Deployment waits, and
    /// says so once, in its status and as a warning Event.
    async fn router_unavailable(
        &self,
        router: &Router,
        next_state: Option<&RolloutState>,
    ) -> Result<(), ControllerError> {
        let api = match router {
            Router::Smi => format!(
                "{} ({})",
                objects::SPLIT_KIND,
                self.ctx.config.split_api.api_version()
            ),
            Router::GatewayApi { .. } | Router::PodRatio => {
                format!("{} ({})", routes::ROUTE_KIND, routes::ROUTE_API_VERSION)
            }
        };
        let message = format!(
            "router {}: the API server does not serve {api}; install its CRD (or pick another fledge.dev/router). The canary waits and goes on once it is there",
            router.name()
        );
        self.wait_with("RouterUnavailable", message, next_state)
            .await
    }

    /// Something the canary needs is missing (the root Service, the router's CRD, a user's
    /// route): the user must hear about it, once: in the status message and as a warning Event.
    async fn wait_with(
        &self,
        reason: &'static str,
        message: String,
        next_state: Option<&RolloutState>,
    ) -> Result<(), ControllerError> {
        let Some(stored) = next_state else {
            return Ok(());
        };
        if stored.message == message {
            return Ok(());
        }
        let event = machine::Event {
            reason,
            message: message.clone(),
            warning: true,
        };
        publish(self.ctx, self.deployment, &self.read.facts, &event).await;
        self.store_state(Some(&RolloutState {
            message,
            ..stored.clone()
        }))
        .await
    }

    /// Promotion: the Deployment is unpaused and rolls the canary's template out with its own
    /// strategy. Conditioned (JSON patch `test`) on the stored state and on `metadata.generation`,
    /// which every change of the spec (a new template) or of the annotations bumps while status
    /// writes do not: a command or a new template since makes it fail, and the pass runs again on
    /// fresh data. (Not a `test` of the template itself: its encoding differs across API server
    /// versions, `creationTimestamp: null`, while the generation is a plain number.)
    async fn unpause(&self) -> Result<(), ControllerError> {
        let value = &self.read.value;
        let ops = vec![
            json!({"op": "test", "path": annotation(ANNOTATION_STATE), "value": value["metadata"]["annotations"][ANNOTATION_STATE]}),
            self.test_unchanged(),
            json!({"op": "replace", "path": "/spec/paused", "value": false}),
            json!({"op": "remove", "path": annotation(ANNOTATION_HOLD)}),
            json!({"op": "remove", "path": annotation(ANNOTATION_STABLE_HASH)}),
        ];
        self.patch_unchanged(ops, "the promotion patch").await
    }

    /// Unpauses (when fledge holds the pause) and removes the hold record.
    async fn release(&self) -> Result<(), ControllerError> {
        let facts = &self.read.facts;
        let mut patch = json!({"metadata": {
            "resourceVersion": self.deployment.resource_version(),
            "annotations": {ANNOTATION_HOLD: null, ANNOTATION_STABLE_HASH: null},
        }});
        if facts.held && facts.paused {
            patch["spec"] = json!({"paused": false});
        }
        let written = self
            .deployments()
            .patch(self.name(), &writer(), &Patch::Merge(&patch))
            .await?;
        self.wrote_deployment(&written);
        Ok(())
    }

    async fn repin_stable(&self, hash: &str) -> Result<(), ControllerError> {
        let stable_name = format!("{}{STABLE_SUFFIX}", self.name());
        let Some(service) = self
            .ctx
            .caches
            .services
            .get(&ObjectRef::new(&stable_name).within(self.namespace))
        else {
            return Ok(());
        };
        // After a promotion NAME-stable still selects the old ReplicaSet: re-pin it to the pods
        // that run now before any traffic goes back to it. A merge patch: an apply of the
        // selector alone would drop the ports fledge applied.
        let mut selector = service
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        selector.insert(POD_TEMPLATE_HASH.into(), hash.to_owned());
        let pin = json!({"spec": {"selector": selector}});
        self.services()
            .patch(&stable_name, &writer(), &Patch::Merge(&pin))
            .await?;
        Ok(())
    }

    /// All traffic on the stable Service, in one write: the router's object at weight 0 when it
    /// exists; with pod ratio, the canary scaled to no pod.
    async fn traffic_to_stable(&self, router: &Router) -> Result<(), ControllerError> {
        // Routes the user named are restored by their own write.
        Ok(self
            .traffic()
            .to_stable(router, &routes::SavedRules::default())
            .await?)
    }

    /// The router's own object goes: the TrafficSplit, or the GAMMA route when it is fledge's.
    async fn delete_traffic_object(&self, router: &Router) -> Result<(), ControllerError> {
        match router {
            Router::Smi => {
                gone(
                    self.splits()
                        .delete(self.name(), &DeleteParams::background())
                        .await,
                )?;
            }
            Router::GatewayApi { .. } => {
                let routes = self.routes();
                if let Some(route) = not_served(routes.get_opt(self.name()).await)?
                    && is_fledges(&route, self.name())
                {
                    gone(
                        routes
                            .delete(self.name(), &DeleteParams::background())
                            .await,
                    )?;
                }
            }
            Router::PodRatio => {}
        }
        Ok(())
    }

    /// Writes the state annotation (or removes it when the Deployment left), conditioned on the
    /// Deployment being unchanged since it was read ([`Self::test_unchanged`]): a concurrent
    /// change of its spec or annotations makes this fail and the reconcile runs again on fresh
    /// data; the Deployment controller's status writes do not.
    async fn store_state(&self, state: Option<&RolloutState>) -> Result<(), ControllerError> {
        let annotations = &self.read.value["metadata"]["annotations"];
        let path = annotation(ANNOTATION_STATE);
        let change = match state {
            Some(state) => {
                let text =
                    serde_json::to_string(state).map_err(|source| ControllerError::Json {
                        what: "the rollout state",
                        source,
                    })?;
                // `add` sets a member whether or not it exists; the map itself may not.
                if annotations.is_object() {
                    json!({"op": "add", "path": path, "value": text})
                } else {
                    json!({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION_STATE: text}})
                }
            }
            None if annotations.get(ANNOTATION_STATE).is_some() => {
                json!({"op": "remove", "path": path})
            }
            // Nothing to remove.
            None => return Ok(()),
        };
        self.patch_unchanged(vec![self.test_unchanged(), change], "the state patch")
            .await
    }
}

/// The JSON pointer to one of the Deployment's annotations.
fn annotation(key: &str) -> String {
    json_patch::jsonptr::PointerBuf::from_tokens(["metadata", "annotations", key]).to_string()
}

/// A delete whose object is already gone succeeded.
fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// A `PolicyChanged` Event when an opted-in Deployment comes under another policy (or another
/// generation of its policy), or under none. The first reconcile after a start only records.
async fn announce_policy_change(
    ctx: &Context,
    deployment: &DynamicObject,
    facts: &DeploymentFacts,
) {
    let key = ObjectRef::from_obj_with(deployment, deployment_resource());
    let opted_in = facts.spec.is_some() || facts.invalid.is_some();
    let now = facts.policy.as_ref().map(|p| (p.id.clone(), p.generation));
    let before = {
        let mut governed = lock(&ctx.remembered.governed);
        if opted_in {
            governed.insert(key, now.clone())
        } else {
            governed.remove(&key)
        }
    };
    let Some(before) = before.filter(|b| *b != now && opted_in) else {
        return;
    };
    let describe = |p: &Option<Governing>| match p {
        Some((id, generation)) => format!("{id} (generation {generation})"),
        None => "no policy".to_owned(),
    };
    let event = machine::Event {
        reason: "PolicyChanged",
        message: format!(
            "{} is governed by {}, was {}; a canary in flight keeps the policy it started with",
            facts.name,
            describe(&now),
            describe(&before)
        ),
        warning: false,
    };
    publish(ctx, deployment, facts, &event).await;
}

async fn publish(
    ctx: &Context,
    deployment: &DynamicObject,
    facts: &DeploymentFacts,
    event: &machine::Event,
) {
    record_all(
        ctx.client.clone(),
        announcements(ctx, deployment, facts, &[event]),
    )
    .await;
}

/// An Event to record, with its reason (for the log when it cannot be recorded).
type Announcement = (&'static str, k8s_openapi::api::events::v1::Event);

/// The Events announcing `events` for the Deployment.
fn announcements(
    ctx: &Context,
    deployment: &DynamicObject,
    facts: &DeploymentFacts,
    events: &[&machine::Event],
) -> Vec<Announcement> {
    events
        .iter()
        .map(|event| {
            let announcement = events::transition_event(
                deployment.object_ref(&deployment_resource()),
                deployment
                    .annotations()
                    .get(ANNOTATION_STATE)
                    .map(String::as_str),
                &facts.template_hash,
                event,
                &ctx.reporter,
                Timestamp::now(),
            );
            (event.reason, announcement)
        })
        .collect()
}

/// Records the Events, in order.
async fn record_all(client: Client, announcements: Vec<Announcement>) {
    for (reason, announcement) in announcements {
        if let Err(e) = events::record(&client, &announcement).await {
            tracing::warn!(error = %e, reason, "could not record an Event");
        }
    }
}

/// Waits for the Events being recorded, if they still are.
async fn joined(announcing: &mut Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = announcing.take() {
        // A task that did not finish is not an error to report: Events are best effort.
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    fn mk_deployment(namespace: &str, name: &str) -> DynamicObject {
        DynamicObject::new(name, &deployment_resource()).within(namespace)
    }

    fn remember(remembered: &Remembered, deployment: &DynamicObject) {
        let key = ObjectRef::from_obj_with(deployment, deployment_resource());
        lock(&remembered.failures).insert(key.clone(), 1);
        lock(&remembered.governed).insert(key, None);
        let by_name = (deployment.namespace().unwrap(), deployment.name_any());
        lock(&remembered.written).insert(by_name, ("uid-1".into(), 7));
    }

    /// Each map's Deployments, as `namespace/name`, sorted.
    fn held(remembered: &Remembered) -> [Vec<String>; 3] {
        let sorted = |mut names: Vec<String>| {
            names.sort();
            names
        };
        let by_ref = |key: &ObjectRef<DynamicObject>| {
            format!("{}/{}", key.namespace.as_deref().unwrap(), key.name)
        };
        [
            sorted(lock(&remembered.failures).keys().map(by_ref).collect()),
            sorted(lock(&remembered.governed).keys().map(by_ref).collect()),
            sorted(
                lock(&remembered.written)
                    .keys()
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .collect(),
            ),
        ]
    }

    #[test]
    fn a_deployment_deleted_or_missing_from_a_relist_is_forgotten() {
        let (web, api, blog) = (
            mk_deployment("shop", "web"),
            mk_deployment("shop", "api"),
            mk_deployment("blog", "web"),
        );
        let remembered = Remembered::default();
        let mut writer = Writer::new(deployment_resource());
        let store = writer.as_reader();
        for deployment in [&web, &api, &blog] {
            remember(&remembered, deployment);
            writer.apply_watcher_event(&watcher::Event::Apply(deployment.clone()));
        }
        let all = ["blog/web", "shop/api", "shop/web"]
            .map(String::from)
            .to_vec();
        remembered.follow(&watcher::Event::Apply(web.clone()), &store);
        assert_eq!(held(&remembered), [all.clone(), all.clone(), all]);

        let deleted = watcher::Event::Delete(web.clone());
        writer.apply_watcher_event(&deleted);
        remembered.follow(&deleted, &store);
        let left = ["blog/web", "shop/api"].map(String::from).to_vec();
        assert_eq!(held(&remembered), [left.clone(), left.clone(), left]);

        // shop/api was deleted while the watch was down: the relist no longer has it.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(blog.clone()),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
            remembered.follow(&event, &store);
        }
        let left = vec!["blog/web".to_owned()];
        assert_eq!(held(&remembered), [left.clone(), left.clone(), left]);
    }

    /// The Deployment as a cache may show it: its uid and generation.
    fn mk_seen(uid: &str, generation: i64) -> DynamicObject {
        let mut deployment = mk_deployment("shop", "web");
        deployment.metadata.uid = Some(uid.to_owned());
        deployment.metadata.generation = Some(generation);
        deployment
    }

    #[test]
    fn a_cache_is_behind_fledges_write_until_it_shows_the_written_generation() {
        let remembered = Remembered::default();
        let wrote = |generation| {
            lock(&remembered.written).insert(
                ("shop".to_owned(), "web".to_owned()),
                ("uid-1".to_owned(), generation),
            );
        };
        wrote(4);
        // A status write since fledge read it moved the resourceVersion, not the generation.
        assert!(remembered.behind_own_write(&mk_seen("uid-1", 3)));
        assert!(remembered.behind_own_write(&mk_seen("uid-1", 3)));
        // The write's own event, or a later change: caught up, and forgotten.
        assert!(!remembered.behind_own_write(&mk_seen("uid-1", 4)));
        assert!(lock(&remembered.written).is_empty());
        wrote(4);
        assert!(!remembered.behind_own_write(&mk_seen("uid-1", 6)));
        // Deleted and made again under the same name: a new object, whatever its generation.
        wrote(4);
        assert!(!remembered.behind_own_write(&mk_seen("uid-2", 1)));
        assert!(lock(&remembered.written).is_empty());
        // Never written.
        assert!(!remembered.behind_own_write(&mk_seen("uid-1", 1)));
    }
}
