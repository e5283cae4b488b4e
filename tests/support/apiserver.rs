//! An in-process stand-in for the Kubernetes API server, for tests that drive the real
//! [`kube::Client`] over HTTP.
//!
//! ```ignore
//! let server = ApiServer::start(ApiServerConfig::default()).await;
//! let deployments: Api<Deployment> = Api::namespaced(server.client(), "default");
//! ```
//!
//! # What it serves
//! - Discovery: `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`,
//!   aggregated discovery (`Accept: ...;as=APIGroupDiscoveryList`, kube's `run_aggregated`),
//!   `/version`, and a minimal OpenAPI v3 (`/openapi/v3` and one document per group-version with
//!   only each resource's PATCH operation and its query parameters: enough for kubectl to use
//!   server-side field validation and build strategic merge patches from its compiled-in types;
//!   no schemas, no `/openapi/v2`). The real kubectl works against it: `apply` (client-side and
//!   `--server-side`), `diff` (server-side dry run), `rollout status|pause|resume`, `scale` are
//!   tested in `tests/apiserver.rs`.
//! - core/v1 Namespaces, Services, ConfigMaps, Pods, Events; events.k8s.io/v1 Events (the same
//!   stored objects as core/v1 Events, converted field by field like the real conversion);
//!   apps/v1 Deployments and ReplicaSets; batch/v1 Jobs (defaulted, selector generated and
//!   validated as upstream; no Job controller: no pods, and a Job ends only when the test says
//!   so with [`ApiServer::complete_job`] or [`ApiServer::fail_job`]); coordination.k8s.io/v1 Leases; split.smi-spec.io
//!   TrafficSplits at v1alpha1..v1alpha4 (configurable), all versions one stored resource with
//!   `conversion: None` semantics (reads through another version only change `apiVersion`), each
//!   version validated against its own CRD schema; further CRDs from YAML
//!   ([`ApiServerConfig::extra_crds`], e.g. Gateway API HTTPRoute) or created at runtime through
//!   `apiextensions.k8s.io/v1` `customresourcedefinitions`, served (discovery, schema) from
//!   shortly after the create, with `Established` in their status, until deleted (`crds.rs`).
//!   Custom resources are checked against their version's structural schema as kube-apiserver
//!   checks them (`schema.rs`): pruned and defaulted when decoded; then, as they will be stored
//!   (after admission, and after a `/status` write put back the rest): types, `enum`,
//!   `required`, `min`/`maxProperties`, `min`/`maxItems`, `min`/`maxLength`, `pattern`,
//!   `minimum`/`maximum` (also exclusive), `multipleOf`, duplicates in `x-kubernetes-list-type`
//!   `set` and `map` lists, and the CEL rules of `x-kubernetes-validations` (`cel.rs`: `self`,
//!   `oldSelf` in transition rules on updates, `message`, `messageExpression`, `reason`,
//!   `fieldPath`, `optionalOldSelf`; skipped after errors that block them upstream), with
//!   upstream's paths and messages; unchanged values are not checked again on updates
//!   (ratcheting). CRDs whose rules do not compile (or whose patterns do not) are refused with
//!   upstream's errors, extra CRDs too (a panic at start). The kinds the Helm chart
//!   installs (ServiceAccounts, Secrets, RBAC, MutatingWebhookConfigurations,
//!   PodDisruptionBudgets), stored without behaviour of their own (`kinds.rs`).
//! - Every resource request recorded with its user and RBAC verb ([`ApiServer::requests_by`],
//!   `audit.rs`), for least-privilege checks.
//! - Verbs: get, list (labelSelector with `=`, `==`, `!=`, `in`, `notin`, existence, `!key`,
//!   `>`/`<`; fieldSelector `metadata.name`/`metadata.namespace` and the per-kind fields
//!   kube-apiserver supports for Events, Pods, Namespaces, ReplicaSets, 400 `field label not
//!   supported` for others; `limit`/`continue` paging over one consistent snapshot, with
//!   `remainingItemCount`; `resourceVersion` with `resourceVersionMatch` Exact/NotOlderThan),
//!   watch (`watch=true` from a resourceVersion, `ADDED`/`MODIFIED`/`DELETED` — an object that
//!   stops matching a label selector is a DELETED, one that starts an ADDED — `BOOKMARK`s when
//!   `allowWatchBookmarks=true`, `sendInitialEvents=true` with the `k8s.io/initial-events-end`
//!   bookmark, `timeoutSeconds`, an `ERROR` event with a 410 `Expired` Status when the
//!   resourceVersion has been compacted away — after [`ApiServer::compact`] or once more than
//!   [`ApiServerConfig::history_limit`] changes happened), create (`generateName`, 409
//!   AlreadyExists), update (409 Conflict on a stale `metadata.resourceVersion`; unconditional
//!   without one; create-on-update for Leases and Events as upstream), patch (JSON merge, JSON
//!   patch, strategic merge, server-side apply), delete (`propagationPolicy` Background,
//!   Foreground, Orphan; `preconditions`; finalizers), deletecollection, the `status`
//!   subresource (Deployments, ReplicaSets, Jobs, Services, Pods, Namespaces, CRDs declaring it), the
//!   `scale` subresource of Deployments and ReplicaSets (`autoscaling/v1` Scale, as `kubectl
//!   scale` uses it), metadata-only answers (`Accept: ...;as=PartialObjectMetadata[List]`, which
//!   kube 5's `Api<PartialObjectMeta<K>>` sends), `dryRun=All` everywhere, `fieldValidation`
//!   Strict/Warn/Ignore, `Warning` headers (unknown fields, webhook warnings).
//! - Admission: mutating webhooks ([`WebhookConfig`]) called as kube-apiserver calls them (see
//!   `admission.rs`) for main-resource CREATE/UPDATE (a patch is an UPDATE, an apply that
//!   creates is a CREATE), never for `/status` or `/scale`.
//! - Background controllers: a garbage collector (ownerReferences cascade, orphaning, foreground
//!   deletion, dangling owners, namespace deletion) and a deployment+replicaset controller (see
//!   `controller.rs`), both writing through the same API paths as clients.
//!
//! # Faithful
//! - Status codes, reasons, messages and details of errors (`metav1.Status`), including
//!   webhook denials (`admission webhook "x" denied the request: ...`, the webhook's code, at
//!   least 400) and failures (500 InternalError, `failed calling webhook "x": ...`).
//! - The order of a write: decode and default, mutating admission, resourceVersion precondition,
//!   strategy, validation, storage; unconditional writes that race are retried (GuaranteedUpdate),
//!   conditional ones get 409. One global, monotonically increasing resourceVersion; writes that
//!   change nothing are not written (no new resourceVersion, no watch event).
//! - Decoding: built-in kinds are checked against the k8s-openapi structs (mistyped fields are a
//!   400; fields the structs lack are reported per `fieldValidation`: Strict 400, Warn a
//!   `Warning` header, Ignore nothing) but stored and returned as the client sent them, `null`s
//!   removed (Go decodes them to zero values it does not encode again). Fields unknown to
//!   k8s-openapi are kept, unlike a real API server of k8s-openapi's version would: a newer API
//!   server knows fields k8s-openapi does not yet, and fledge must carry them through (its
//!   template hashes are computed over the raw JSON). Webhooks get this stored form too. The
//!   encoding of an embedded ObjectMeta without creationTimestamp follows the server version:
//!   omitted (API servers with kubernetes/kubernetes#130989, 2025; the default), or
//!   `"creationTimestamp": null` as older ones wrote Go's zero time
//!   ([`ApiServerConfig::legacy_creation_timestamp`]) in every answer, list item, watch event
//!   and AdmissionReview. Not Go's: zero values Go would omit (`false`, `0`, `""` of `omitempty`
//!   fields, such as `paused: false`) are kept as sent, and keys come sorted, not in the Go
//!   structs' order. Defaulting like
//!   `SetDefaults_*` (Deployment spec and strategy, pod template spec, containers, probes,
//!   Services incl. a cluster IP, Namespaces) before admission and again after a webhook's
//!   patch; custom resources pruned and defaulted by their schema (non-nullable `null`s
//!   without a default dropped).
//! - Strategies: `status` reset on create; main-resource writes keep the old status; `/status`
//!   writes keep spec (and, for Deployments, labels; for custom resources, all but status) like
//!   upstream — so a Deployment `/status`
//!   write may change annotations, as the real deployment controller relies on; `generation` 1 on
//!   create and bumped on spec changes (Deployments: spec or annotations, as upstream, because
//!   annotations are copied to ReplicaSets; custom resources: anything but metadata); `uid`,
//!   `creationTimestamp` (second precision) kept on update; a terminating object whose last
//!   finalizer is removed is deleted; no new finalizers on terminating objects.
//! - Validation (422) of metadata (names per kind, labels, annotations, ownerReferences with a
//!   single controller, finalizers) and of the fields kube-apiserver checks for Deployments and
//!   ReplicaSets (selector required, non-empty, matching the template, immutable), pod templates
//!   (containers, names, images, ports, restartPolicy Always, ...), Services, Leases,
//!   events.k8s.io Events (the strict rules: reportingController, action, reason, note length),
//!   custom resources (see above).
//! - The deployment controller's rollout (`controller.rs`): paused Deployments hold (no new
//!   ReplicaSet, Progressing `Unknown`/DeploymentPaused, no deadline), are only scaled, in
//!   proportion; rolling updates go step by step within maxSurge/maxUnavailable as the pods
//!   become available; reverts reuse the old ReplicaSet with the next revision; `updatedReplicas`
//!   counts the current template's pods only, so `kubectl rollout status` waits while paused.
//! - Delete answers: a `Success` Status for most kinds, the object for Services, Pods,
//!   Namespaces and custom resources (`ReturnDeletedObject`), and the object (with
//!   `deletionTimestamp`) while finalizers remain.
//!
//! # Approximated
//! - No authentication or authorization: bearer tokens only pick the [`UserInfo`] sent to
//!   webhooks ([`ApiServer::client_as`]); everything is allowed.
//! - `metadata.managedFields` are returned in every answer, list item, watch event and webhook
//!   object (the object under admission carries this write's ownership, as upstream runs the
//!   field manager before mutating admission), built from the ownership tracked below: one entry
//!   per (manager, operation `Apply`/`Update`, subresource), sorted like upstream, `apiVersion`,
//!   `time` (when the manager last changed the object), `fieldsType: FieldsV1`. On input they are
//!   ignored, except that a main-resource write carrying `[]` or `[{}]` resets them (upstream's
//!   `isResetManagedFields`), after which the writer owns only what it changed; upstream would
//!   also take any other list a client sends as the new ownership. FieldsV1 has `.` for keyed
//!   list items only, and keys of one field (`k:{"containerPort":80}` where upstream also names
//!   the protocol). [`ApiServer::get`], [`ApiServer::list`] and [`ApiServer::history`] show the
//!   stored form (with managedFields, never with the legacy `null`s).
//!   Server-side apply keeps field ownership: leaf fields per
//!   (manager, operation, subresource); lists merged by the merge keys of the built-in types
//!   (containers/env/volumes by name, container ports by containerPort, Service ports by port,
//!   conditions by type, ownerReferences by uid, finalizers as a set) or by
//!   `x-kubernetes-list-type`/`-list-map-keys` in CRD schemas, other lists atomic; a 409
//!   Conflict (upstream message shape) when another manager owns a field the configuration sets
//!   to a different value, unless `force=true`; fields a manager stops applying are removed
//!   unless another manager owns them; every other write makes its manager (`fieldManager`, else
//!   the User-Agent's product, `unknown` for kube, which sends none) own what it changed
//!   (`/status` writes only once someone applies status, to keep controllers' status writes cheap). Not modelled: ownership of maps as such (`.`),
//!   `x-kubernetes-map-type: atomic`, list order, apply to `/scale` (415).
//! - Strategic merge patch: `$patch` (replace, delete, merge), `$retainKeys`,
//!   `$deleteFromPrimitiveList`, `$setElementOrder` (ignored); merge keys as above; other
//!   primitive lists replaced. Not for custom resources (415, like upstream).
//! - Schemas: not checked are `format`, `uniqueItems`, `allOf`/`anyOf`/`oneOf`/`not`, the
//!   metadata of embedded resources. CEL: types are checked at CRD writes only as far as the
//!   schema tells them (the rest when a rule runs); no cost estimates or budgets; no timestamps,
//!   duration accessors, quantities, URLs, IPs, CIDRs, semvers, images or two-variable
//!   comprehensions (such rules are refused, saying so), `set`/`map` lists compare in order;
//!   ratcheting matches old values by field, map key and map-list key only. Quantities are
//!   stored as written (upstream canonicalises `0.5` to `500m`).
//! - Admission: `namespaceSelector` (the namespace's labels), `objectSelector` (old or new
//!   object), `reinvocationPolicy: IfNeeded` (called again, once, when a later webhook changed
//!   the object after it; other in-tree mutating plugins do not exist here), `timeoutSeconds`
//!   with upstream's `context deadline exceeded` error and `failurePolicy`, `options`
//!   (`CreateOptions`/`UpdateOptions`; a PATCH is an `UpdateOptions` carrying the request's
//!   `fieldManager` and `dryRun`, none when the client sent none) are modelled; not modelled:
//!   `matchPolicy: Equivalent` (a webhook is called for the versions its rules name),
//!   `matchConditions`, `sideEffects` (dry runs call every matching webhook), a fresh HTTP/1.1
//!   connection per call.
//! - The watch cache: bookmarks every [`ApiServerConfig::bookmark_interval`] (upstream: about a
//!   minute); a watcher that falls 65 536 changes behind gets a 410 and is closed; a watch or
//!   paged list from a resourceVersion older than the last [`ApiServerConfig::history_limit`]
//!   changes gets a 410 (a kube-runtime watcher relists); reads at `resourceVersion=0` may be
//!   stale by [`ApiServerConfig::rv0_lag`] changes (a watch then replays the changes since),
//!   reads without a resourceVersion never are.
//! - Pod template hashes have the upstream shape (FNV-32a, safe-encoded) but not the upstream
//!   value, which hashes Go's in-memory representation; like it, they (and the "is this the
//!   ReplicaSet of the template" test) see the template semantically: without
//!   `pod-template-hash`, nulls, empty maps and lists, so the same in both encodings.
//! - Namespaces must exist for namespaced writes (404 like upstream); `default`, `kube-system`,
//!   `kube-public`, `kube-node-lease` and [`ApiServerConfig::namespaces`] exist from the start;
//!   deleting one deletes its content, then it.
//! - Pods are served but the controllers create none: ReplicaSets keep simulated pods (no
//!   terminating pods: a ReplicaSet scaled down loses its pods at once, unavailable ones first).

mod admission;
mod audit;
mod cel;
mod controller;
mod crds;
mod gc;
mod http;
mod kinds;
mod ops;
mod patch;
mod resources;
mod schema;
mod selectors;
mod status;
mod store;
mod typed;
mod validation;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

pub use admission::{FailurePolicy, ReinvocationPolicy, WebhookCall, WebhookConfig, WebhookRule};
pub use audit::ApiRequest;
pub use controller::{
    ControllerConfig, ControllerHandle, NEVER_READY_ANNOTATION, READY_DELAY_ANNOTATION, RolloutStep,
};
pub use ops::{Ctx, FieldValidation, PatchKind, Sub};
pub use status::{ApiError, FieldError};
pub use store::{Change, ChangeKind};

use resources::{Registry, ResourceDef};
use store::Store;

/// Who makes a request, as authentication would have told the API server (`authentication.k8s.io`
/// UserInfo), and as webhooks see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// A user in `system:authenticated`.
    pub fn user(name: &str) -> Self {
        UserInfo {
            username: name.into(),
            uid: String::new(),
            groups: vec!["system:authenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    /// A service account as the API server names it.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        UserInfo {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: String::new(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra: BTreeMap::new(),
        }
    }
}

/// How to start the stand-in.
#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    pub webhooks: Vec<WebhookConfig>,
    pub controller: ControllerConfig,
    /// Namespaces to create at start, besides `default`, `kube-system`, `kube-public` and
    /// `kube-node-lease`.
    pub namespaces: Vec<String>,
    /// TrafficSplit versions served (`v1alpha1`..`v1alpha4`). A real cluster serves whichever set
    /// its one installed CRD serves (linkerd-smi: v1alpha1, v1alpha2; SMI SDK: v1alpha4).
    pub trafficsplit_versions: Vec<String>,
    /// More CustomResourceDefinitions to install (YAML text, multi-document allowed).
    pub extra_crds: Vec<String>,
    /// Changes kept for watches and paged lists; older resourceVersions get 410 Expired (a
    /// kube-runtime watcher then relists).
    pub history_limit: usize,
    /// How many changes the watch cache lags behind: a list or watch at `resourceVersion=0`
    /// ("any", kube-runtime's default `ListSemantic::Any`) is served from the state that many
    /// changes ago (a watch then replays the changes since), as a real watch cache may be stale.
    /// Lists without a resourceVersion (consistent reads) are never stale. 0: not stale.
    pub rv0_lag: usize,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// How long the garbage collector waits after a change before it acts.
    pub gc_delay: Duration,
    /// The user of requests without a bearer token.
    pub default_user: UserInfo,
    /// `gitVersion` at `/version`.
    pub version: String,
    /// Keep every change for [`ApiServer::history`].
    pub record_history: bool,
    /// Encode objects as API servers before Kubernetes 1.35 did: an embedded ObjectMeta without
    /// a creationTimestamp (`spec.template.metadata` of Deployments and ReplicaSets) carries
    /// `"creationTimestamp": null` in every answer, list item, watch event and AdmissionReview.
    pub legacy_creation_timestamp: bool,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            webhooks: Vec::new(),
            controller: ControllerConfig::default(),
            namespaces: Vec::new(),
            trafficsplit_versions: ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"]
                .map(String::from)
                .to_vec(),
            extra_crds: Vec::new(),
            history_limit: 100_000,
            rv0_lag: 0,
            bookmark_interval: Duration::from_secs(1),
            gc_delay: Duration::from_millis(5),
            default_user: UserInfo {
                username: "kubernetes-admin".into(),
                uid: String::new(),
                groups: vec![
                    "kubeadm:cluster-admins".into(),
                    "system:authenticated".into(),
                ],
                extra: BTreeMap::new(),
            },
            version: "v1.37.0".into(),
            record_history: true,
            legacy_creation_timestamp: false,
        }
    }
}

/// One committed change, as [`ApiServer::history`] reports it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub resource_version: u64,
    /// `deployments.apps`, `services`, `trafficsplits.split.smi-spec.io`, ...
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub kind: ChangeKind,
    pub object: Value,
}

/// State shared by the HTTP handlers and the background tasks.
pub(crate) struct Inner {
    /// What is served: a snapshot, replaced whole when a CRD is created, changed or deleted.
    registry: Mutex<Arc<Registry>>,
    store: Mutex<Store>,
    tokens: Mutex<HashMap<String, UserInfo>>,
    default_user: UserInfo,
    webhooks: Mutex<Vec<WebhookConfig>>,
    webhook_calls: Mutex<Vec<WebhookCall>>,
    requests: audit::Requests,
    bookmark_interval: Duration,
    gc_delay: Duration,
    rv0_lag: usize,
    version: String,
    legacy_creation_timestamp: bool,
    url: OnceLock<String>,
    rng: Mutex<u64>,
    controller: controller::Shared,
    /// Set when the [`ApiServer`] is dropped: watches end, the HTTP server drains.
    shutdown: tokio::sync::watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// What is served now.
    fn registry(&self) -> Arc<Registry> {
        lock(&self.registry).clone()
    }

    /// Serves something else from now on (`crds.rs`).
    fn update_registry(&self, f: impl FnOnce(&mut Registry)) {
        let mut guard = lock(&self.registry);
        let mut next = Registry::clone(&guard);
        f(&mut next);
        *guard = Arc::new(next);
    }

    /// A pseudo-random 64-bit number (xorshift, seeded from the clock and the process).
    fn random(&self) -> u64 {
        let mut s = lock(&self.rng);
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        x
    }

    fn new_uid(&self) -> String {
        let a = self.random();
        let b = self.random();
        let hex = format!("{a:016x}{b:016x}");
        format!(
            "{}-{}-4{}-{}{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            ["8", "9", "a", "b"][(b & 3) as usize],
            &hex[17..20],
            &hex[20..32]
        )
    }

    /// Five characters of `[bcdfghjklmnpqrstvwxz2456789]`, as `generateName` appends.
    fn name_suffix(&self) -> String {
        const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut x = self.random();
        (0..5)
            .map(|_| {
                let c = ALPHANUMS[(x % ALPHANUMS.len() as u64) as usize] as char;
                x /= ALPHANUMS.len() as u64;
                c
            })
            .collect()
    }

    /// The resourceVersion a read at `resourceVersion=0` is served at
    /// ([`ApiServerConfig::rv0_lag`] changes ago, never before the compacted history).
    fn rv0(&self, store: &Store) -> u64 {
        store
            .rv
            .saturating_sub(self.rv0_lag as u64)
            .max(store.compacted)
    }

    fn find(&self, gvr: &str) -> Option<(Arc<ResourceDef>, String)> {
        let (gv, plural) = gvr.rsplit_once('/')?;
        let (group, version) = resources::split_api_version(gv);
        self.registry()
            .find(group, version, plural)
            .map(|d| (d, version.to_string()))
    }
}

/// A running stand-in. Dropping it stops the server and its controllers.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    controller: ControllerHandle,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Now, as `metav1.Time` serializes (RFC 3339, seconds).
pub(crate) fn now() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl ApiServer {
    /// Starts the server on 127.0.0.1 (ephemeral port) with its background controllers.
    pub async fn start(config: ApiServerConfig) -> ApiServer {
        let mut registry = Registry::with_builtins();
        if !config.trafficsplit_versions.is_empty() {
            registry.add(resources::trafficsplit_def(&config.trafficsplit_versions));
        }
        for yaml in &config.extra_crds {
            for crd in resources::parse_crds(yaml).expect("extra_crds must be CRD YAML") {
                // kube-apiserver would refuse the CRD (rules that do not compile, bad patterns).
                let errs = schema::crd(&crd);
                assert!(
                    errs.is_empty(),
                    "extra_crds: {} is invalid: {}",
                    crd["metadata"]["name"],
                    errs.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                registry.add(resources::def_from_crd(&crd, None).expect("a valid CRD"));
            }
        }
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default(),
            );
            h.finish() | 1
        };
        let inner = Arc::new(Inner {
            registry: Mutex::new(Arc::new(registry)),
            store: Mutex::new(Store::new(config.history_limit, config.record_history)),
            tokens: Mutex::new(HashMap::new()),
            default_user: config.default_user.clone(),
            webhooks: Mutex::new(config.webhooks.clone()),
            webhook_calls: Mutex::new(Vec::new()),
            requests: audit::Requests::default(),
            bookmark_interval: config.bookmark_interval,
            gc_delay: config.gc_delay,
            rv0_lag: config.rv0_lag,
            version: config.version.clone(),
            legacy_creation_timestamp: config.legacy_creation_timestamp,
            url: OnceLock::new(),
            rng: Mutex::new(seed),
            controller: controller::Shared::new(&config.controller),
            shutdown: tokio::sync::watch::channel(false).0,
        });
        // The namespaces every cluster has.
        let mut namespaces: Vec<String> =
            ["default", "kube-system", "kube-public", "kube-node-lease"]
                .map(String::from)
                .to_vec();
        namespaces.extend(config.namespaces.iter().cloned());
        for ns in namespaces {
            let mut ctx = Ctx::system("system:apiserver");
            let _ = inner
                .create_object(
                    "v1/namespaces",
                    "",
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                    &mut ctx,
                )
                .await;
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let _ = inner.url.set(format!("http://{addr}"));
        let app = http::router(inner.clone());
        let mut stop = inner.shutdown.subscribe();
        // Not in `tasks`: on drop it drains (watches end on the shutdown signal) instead of
        // being aborted, which would leave its connections running.
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                })
                .await;
        });
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(gc::run(inner.clone())));
        tasks.push(tokio::spawn(crds::run(inner.clone())));
        let controller = ControllerHandle::new(inner.clone());
        if config.controller.enabled {
            tasks.push(tokio::spawn(controller::run(inner.clone())));
        }
        ApiServer {
            inner,
            addr,
            tasks,
            controller,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Config` for this server (default namespace `default`).
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("a valid URL"))
    }

    /// A kubeconfig file's text for this server, as the default user, in `namespace`: what a
    /// process (`fledge`, `kubectl`) reads from `KUBECONFIG`.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: stand-in, cluster: {{server: '{}'}}}}]\n\
             users: [{{name: user, user: {{}}}}]\n\
             contexts: [{{name: here, context: {{cluster: stand-in, user: user, namespace: {namespace}}}}}]\n\
             current-context: here\n",
            self.url()
        )
    }

    /// A client as the default user.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("a client for the stand-in")
    }

    /// A client whose requests the server attributes to `user` (webhooks see it in `userInfo`).
    pub fn client_as(&self, user: UserInfo) -> kube::Client {
        let token = format!("token-{:016x}", self.inner.random());
        lock(&self.inner.tokens).insert(token.clone(), user);
        let mut config = self.kube_config();
        config.auth_info.token = Some(token.into());
        kube::Client::try_from(config).expect("a client for the stand-in")
    }

    /// The deployment controller's controls.
    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    /// Replaces the webhook configurations.
    pub fn set_webhooks(&self, webhooks: Vec<WebhookConfig>) {
        *lock(&self.inner.webhooks) = webhooks;
    }

    /// Every webhook call so far: the AdmissionReview sent and the answer.
    pub fn webhook_calls(&self) -> Vec<WebhookCall> {
        lock(&self.inner.webhook_calls).clone()
    }

    /// The object `ns/name` of `gvr` (`apps/v1/deployments`, `v1/services`,
    /// `split.smi-spec.io/v1alpha2/trafficsplits`), as that version shows it.
    pub fn get(&self, gvr: &str, ns: &str, name: &str) -> Option<Value> {
        let (def, version) = self.inner.find(gvr)?;
        let key = (def.storage.clone(), ns.to_string(), name.to_string());
        let store = self.inner.store();
        let entry = store.get(&key)?;
        Some(ops::to_version(&def, &version, &entry.object))
    }

    /// All objects of `gvr` in `ns` (all namespaces when `None`), by namespace and name.
    pub fn list(&self, gvr: &str, ns: Option<&str>) -> Vec<Value> {
        let Some((def, version)) = self.inner.find(gvr) else {
            return Vec::new();
        };
        let store = self.inner.store();
        store
            .objects
            .iter()
            .filter(|(k, _)| k.0 == def.storage && ns.is_none_or(|ns| k.1 == ns))
            .map(|(_, e)| ops::to_version(&def, &version, &e.object))
            .collect()
    }

    /// Creates an object through the whole pipeline (admission included) as the default user.
    pub async fn create(&self, gvr: &str, ns: &str, object: Value) -> Result<Value, ApiError> {
        let mut ctx = Ctx::for_user(self.inner.default_user.clone());
        self.inner.create_object(gvr, ns, object, &mut ctx).await
    }

    /// `kubectl apply` (client-side) of `object` as `user`: creates it with the
    /// `kubectl.kubernetes.io/last-applied-configuration` annotation, or updates it with a
    /// three-way merge (fields removed from the configuration since the last apply are removed,
    /// fields others set are kept), field manager `kubectl-client-side-apply`, retried on
    /// conflicts. Admission sees CREATE or UPDATE like from kubectl.
    pub async fn apply_as_user(&self, user: &UserInfo, object: Value) -> Result<Value, ApiError> {
        self.inner.kubectl_apply(user, object).await
    }

    /// Deletes an object (background propagation) as the default user.
    pub async fn delete(&self, gvr: &str, ns: &str, name: &str) -> Result<(), ApiError> {
        let (def, version) = self
            .inner
            .find(gvr)
            .ok_or_else(|| ApiError::bad_request(format!("unknown resource {gvr}")))?;
        let mut ctx = Ctx::for_user(self.inner.default_user.clone());
        self.inner
            .delete(
                &def,
                &version,
                ns,
                name,
                &ops::DeleteOpts::default(),
                &mut ctx,
            )
            .await
            .map(|_| ())
    }

    /// Ends Job `ns/name` successfully, as the Job controller records it once its pods
    /// succeeded: `startTime` (kept when set), `completionTime`, `succeeded` = `completions`,
    /// no `active`, and the conditions `SuccessCriteriaMet` then `Complete` (status `True`,
    /// reason `CompletionsReached`), written to `/status` as the job-controller. The Job, or 404.
    pub async fn complete_job(&self, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.finish_job(ns, name, None).await
    }

    /// Ends Job `ns/name` as failed, as the Job controller does when its pods failed (e.g.
    /// `reason` `BackoffLimitExceeded`, message `Job has reached the specified backoff limit`;
    /// `DeadlineExceeded`, `Job was active longer than specified deadline`): `startTime` (kept
    /// when set), `failed` = `backoffLimit + 1`, no `active`, no `completionTime`, and the
    /// conditions `FailureTarget` then `Failed` (status `True`) with that reason and message.
    pub async fn fail_job(
        &self,
        ns: &str,
        name: &str,
        reason: &str,
        message: &str,
    ) -> Result<Value, ApiError> {
        self.finish_job(ns, name, Some((reason, message))).await
    }

    async fn finish_job(
        &self,
        ns: &str,
        name: &str,
        failure: Option<(&str, &str)>,
    ) -> Result<Value, ApiError> {
        let (def, _) = self
            .inner
            .find("batch/v1/jobs")
            .ok_or_else(|| ApiError::bad_request("jobs are not served"))?;
        let mut ctx = Ctx::system("system:serviceaccount:kube-system:job-controller");
        ctx.user = UserInfo::service_account("kube-system", "job-controller");
        ctx.field_manager = Some("kube-controller-manager".into());
        let time = now();
        let condition = |kind: &str, reason: &str, message: &str| {
            json!({
                "type": kind,
                "status": "True",
                "lastProbeTime": time,
                "lastTransitionTime": time,
                "reason": reason,
                "message": message,
            })
        };
        let written = self
            .inner
            .modify(&def, ns, name, Sub::Status, &mut ctx, |job| {
                let start = job["status"]
                    .get("startTime")
                    .cloned()
                    .unwrap_or_else(|| json!(time));
                let mut status = json!({
                    "startTime": start,
                    "ready": 0,
                    "terminating": 0,
                    "uncountedTerminatedPods": {},
                });
                match failure {
                    None => {
                        let completions = job["spec"]["completions"].as_i64().unwrap_or(1);
                        let (reason, message) = (
                            "CompletionsReached",
                            "Reached expected number of succeeded pods",
                        );
                        status["succeeded"] = json!(completions);
                        status["completionTime"] = json!(time);
                        status["conditions"] = json!([
                            condition("SuccessCriteriaMet", reason, message),
                            condition("Complete", reason, message),
                        ]);
                    }
                    Some((reason, message)) => {
                        let backoff = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
                        status["failed"] = json!(backoff + 1);
                        status["conditions"] = json!([
                            condition("FailureTarget", reason, message),
                            condition("Failed", reason, message),
                        ]);
                    }
                }
                job["status"] = status;
                true
            })
            .await?;
        written.ok_or_else(|| ApiError::not_found("batch", "jobs", name))
    }

    /// Kubernetes Events (core/v1 form), oldest first.
    pub fn events(&self) -> Vec<Value> {
        let mut events = self.list("v1/events", None);
        events.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse::<u64>().ok())
                .unwrap_or_default()
        });
        events
    }

    /// Every change committed so far, oldest first (empty unless `record_history`).
    pub fn history(&self) -> Vec<Recorded> {
        let store = self.inner.store();
        store
            .audit
            .iter()
            .map(|c| Recorded {
                resource_version: c.rv,
                resource: c.key.0.clone(),
                namespace: c.key.1.clone(),
                name: c.key.2.clone(),
                kind: c.kind,
                object: (*c.object).clone(),
            })
            .collect()
    }

    /// The changes to one object, oldest first.
    pub fn history_of(&self, resource: &str, ns: &str, name: &str) -> Vec<Recorded> {
        self.history()
            .into_iter()
            .filter(|r| r.resource == resource && r.namespace == ns && r.name == name)
            .collect()
    }

    /// Every change committed from now on, as it commits (a lagging receiver misses the oldest).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<std::sync::Arc<Change>> {
        self.inner.store().tx.subscribe()
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store().rv
    }

    /// Compacts the history: watches and lists from an older resourceVersion get 410 Expired.
    pub fn compact(&self) {
        self.inner.store().compact();
    }

    /// Waits until `check` holds for the object (or its absence), polling on every change.
    pub async fn wait_for(
        &self,
        gvr: &str,
        ns: &str,
        name: &str,
        timeout: Duration,
        mut check: impl FnMut(Option<&Value>) -> bool,
    ) -> Result<Option<Value>, String> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.store().tx.subscribe();
        loop {
            let current = self.get(gvr, ns, name);
            if check(current.as_ref()) {
                return Ok(current);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {gvr} {ns}/{name}; last seen: {}",
                    current
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "absent".into())
                ));
            }
            // Any change (or a lag) re-checks; a short cap keeps missed wake-ups harmless.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.recv()).await;
        }
    }
}
