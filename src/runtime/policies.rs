//! The policies and namespace labels that the webhook and the controller decide with, kept by
//! watches: `RolloutPolicy`, `ClusterRolloutPolicy` and the labels of Namespaces (metadata only).
//!
//! Every replica runs these watches, leader or not, because every replica answers the webhook.
//! fledge runs without its CRDs: a policy watch whose list is answered 404 counts as synced with no
//! policies and tries again every [`RETRY`], so CRDs installed later are picked up within about
//! that long. `/readyz` fails until every watch has synced once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::Store;

use crate::core::policy::{
    ClusterRolloutPolicy, Policy, PolicyId, PolicyKind, PolicySnapshot, PolicyStatus,
    RolloutPolicy, merge,
};

/// How soon a failed watch (CRDs absent, API server away) is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// The current snapshot, shared and lock-free to read: the webhook reads it on every review.
#[derive(Clone)]
pub struct PolicyWatch {
    snapshot: Arc<ArcSwap<PolicySnapshot>>,
    /// Whether every source has synced once; changes with every new snapshot too (`changed`).
    synced: watch::Receiver<Version>,
}

/// Counts snapshots; `synced` once every source has listed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Version {
    synced: bool,
    count: u64,
}

impl std::fmt::Debug for PolicyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("PolicyWatch")
            .field("synced", &self.is_synced())
            .field("policies", &snapshot.policies.len())
            .field("namespaces", &snapshot.namespaces.len())
            .finish()
    }
}

impl Default for PolicyWatch {
    /// No policies and no opted-in namespaces, synced: `fledge serve --webhook-only` and tests
    /// without an API server.
    fn default() -> Self {
        PolicyWatch::fixed(PolicySnapshot::default())
    }
}

impl PolicyWatch {
    /// A snapshot that never changes.
    pub fn fixed(snapshot: PolicySnapshot) -> PolicyWatch {
        let (_, synced) = watch::channel(Version {
            synced: true,
            count: 0,
        });
        PolicyWatch {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            synced,
        }
    }

    /// Starts the watches on the current runtime. `namespace`: watch `RolloutPolicy` objects of
    /// this namespace only (the controller's scope); cluster policies and Namespaces are cluster-wide.
    pub fn spawn(client: Client, namespace: Option<String>) -> PolicyWatch {
        let snapshot = Arc::new(ArcSwap::from_pointee(PolicySnapshot::default()));
        let (tx, synced) = watch::channel(Version::default());
        let sources = Sources::default();
        let shared = Arc::new(Shared {
            snapshot: snapshot.clone(),
            tx,
            sources: std::sync::Mutex::new(sources),
        });
        let namespaced = match &namespace {
            Some(ns) => Api::<RolloutPolicy>::namespaced(client.clone(), ns),
            None => Api::<RolloutPolicy>::all(client.clone()),
        };
        tokio::spawn(follow(
            shared.clone(),
            Source::Namespaced,
            watcher(namespaced, watcher::Config::default()),
            |p: &RolloutPolicy| ItemValue::Policy(Box::new(Policy::namespaced(p))),
        ));
        tokio::spawn(follow(
            shared.clone(),
            Source::Cluster,
            watcher(
                Api::<ClusterRolloutPolicy>::all(client.clone()),
                watcher::Config::default(),
            ),
            |p: &ClusterRolloutPolicy| ItemValue::Policy(Box::new(Policy::cluster(p))),
        ));
        tokio::spawn(follow(
            shared,
            Source::Namespaces,
            // Labels are all fledge reads of a Namespace.
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client),
                watcher::Config::default(),
            ),
            |n: &PartialObjectMeta<Namespace>| ItemValue::Labels(n.labels().clone()),
        ));
        PolicyWatch { snapshot, synced }
    }

    pub fn snapshot(&self) -> Arc<PolicySnapshot> {
        self.snapshot.load_full()
    }

    /// The current snapshot for one short read (a review): unlike [`PolicyWatch::snapshot`] it
    /// does not touch the count that every webhook thread shares.
    pub fn current(&self) -> arc_swap::Guard<Arc<PolicySnapshot>> {
        self.snapshot.load()
    }

    /// Every watch has listed once (the webhook's `/readyz`).
    pub fn is_synced(&self) -> bool {
        self.synced.borrow().synced
    }

    /// Waits until every watch has listed once (the controller starts after that: a namespace's
    /// opt-in unknown would look like an opt-out).
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|v| v.synced).await;
    }

    /// A stream that yields once per new snapshot after the first sync.
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.synced.clone();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                rx.changed().await.ok()?;
                if rx.borrow_and_update().synced {
                    return Some(((), rx));
                }
            }
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Namespaced,
    Cluster,
    Namespaces,
}

/// What each source holds, by object key; `None` until it has listed once.
#[derive(Default)]
struct Sources {
    held: BTreeMap<Source, Option<BTreeMap<String, ItemValue>>>,
    count: u64,
}

#[derive(Clone, PartialEq)]
enum ItemValue {
    Policy(Box<Policy>),
    Labels(BTreeMap<String, String>),
}

struct Shared {
    snapshot: Arc<ArcSwap<PolicySnapshot>>,
    tx: watch::Sender<Version>,
    sources: std::sync::Mutex<Sources>,
}

impl Shared {
    /// Changes what a source holds and publishes the new snapshot, if that changed anything: a
    /// new snapshot has the controller look at every Deployment again, and the watches report
    /// much that fledge does not keep (a policy's status, a Namespace's annotations, the retries
    /// of a CRD that is not installed).
    fn update(&self, source: Source, change: impl FnOnce(&mut BTreeMap<String, ItemValue>)) {
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = sources.held.entry(source).or_insert(None);
        let before = held.clone();
        change(held.get_or_insert_with(BTreeMap::new));
        if *held == before {
            return;
        }
        sources.count += 1;
        let mut snapshot = PolicySnapshot::default();
        for items in sources.held.values().flatten() {
            for item in items.values() {
                match item {
                    ItemValue::Policy(p) => snapshot.policies.push((**p).clone()),
                    ItemValue::Labels(_) => {}
                }
            }
        }
        if let Some(Some(namespaces)) = sources.held.get(&Source::Namespaces) {
            for (name, item) in namespaces {
                if let ItemValue::Labels(labels) = item {
                    snapshot.namespaces.insert(name.clone(), labels.clone());
                }
            }
        }
        let synced = [Source::Namespaced, Source::Cluster, Source::Namespaces]
            .iter()
            .all(|s| matches!(sources.held.get(s), Some(Some(_))));
        self.snapshot.store(Arc::new(snapshot));
        let count = sources.count;
        self.tx.send_replace(Version { synced, count });
    }
}

/// `namespace/name`, or the name of a cluster-scoped object (a Namespace's name is its key).
fn key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

/// Keeps one source up to date from its watch. A failed list is retried after [`RETRY`]; one
/// answered 404 (the CRD is not installed) means "no such objects", which counts as synced.
async fn follow<K>(
    shared: Arc<Shared>,
    source: Source,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send,
    value: fn(&K) -> ItemValue,
) where
    K: Resource + Clone + DeserializeOwned + Send + 'static,
{
    let mut listing: Option<BTreeMap<String, ItemValue>> = None;
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing = Some(BTreeMap::new()),
            Ok(Event::InitApply(k)) => {
                listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&k), value(&k));
            }
            Ok(Event::InitDone) => {
                let items = listing.take().unwrap_or_default();
                shared.update(source, |held| *held = items);
            }
            Ok(Event::Apply(k)) => shared.update(source, |held| {
                held.insert(key(&k), value(&k));
            }),
            Ok(Event::Delete(k)) => shared.update(source, |held| {
                held.remove(&key(&k));
            }),
            Err(e) => {
                if is_not_found(&e) {
                    // The CRD is gone or not installed yet: no policies of this kind.
                    shared.update(source, BTreeMap::clear);
                } else {
                    tracing::warn!(error = %e, source = ?source, "policy watch failed; retrying");
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s,
        _ => return false,
    };
    api.code == 404
}

/// The policies and namespace labels for one-off commands (`fledge status`, `fledge policies`):
/// listed once. Absent CRDs mean no policies.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<PolicySnapshot, kube::Error> {
    let mut snapshot = PolicySnapshot::default();
    let namespaced = match namespace {
        Some(ns) => Api::<RolloutPolicy>::namespaced(client.clone(), ns),
        None => Api::<RolloutPolicy>::all(client.clone()),
    };
    for p in absent_is_empty(namespaced.list(&ListParams::default()).await)? {
        snapshot.policies.push(Policy::namespaced(&p));
    }
    let cluster = Api::<ClusterRolloutPolicy>::all(client.clone());
    for p in absent_is_empty(cluster.list(&ListParams::default()).await)? {
        snapshot.policies.push(Policy::cluster(&p));
    }
    let namespaces = Api::<Namespace>::all(client.clone());
    match namespace {
        // One namespace: a GET, which a user may be allowed where listing all is not.
        Some(ns) => {
            if let Some(n) = namespaces.get_metadata_opt(ns).await? {
                snapshot
                    .namespaces
                    .insert(ns.to_owned(), n.labels().clone());
            }
        }
        None => {
            for n in namespaces.list_metadata(&ListParams::default()).await? {
                snapshot.namespaces.insert(n.name_any(), n.labels().clone());
            }
        }
    }
    Ok(snapshot)
}

fn absent_is_empty<K: Clone>(
    listed: Result<kube::core::ObjectList<K>, kube::Error>,
) -> Result<Vec<K>, kube::Error> {
    match listed {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// How often the policies' `status.deployments` counts are brought up to date at the latest.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Keeps each policy's status true (leader only): `observedGeneration`, a `Ready` condition with
/// the policy's own problems, and how many Deployments it governs (takes part and is selected by it
/// now), counted from the controller's cache of Deployments on every policy change and every
/// [`STATUS_EVERY`]. Written only when it changes.
pub async fn report_status(client: Client, deployments: Store<DynamicObject>, watch: PolicyWatch) {
    let mut written: BTreeMap<PolicyId, PolicyStatus> = BTreeMap::new();
    let mut changes = std::pin::pin!(watch.changes());
    // Counted from an empty cache, every policy would govern nothing until the next count. The
    // store is looked at, not awaited: awaiting `wait_until_ready` from this task was seen never to
    // wake although the store became ready.
    loop {
        use futures::FutureExt as _;
        match deployments.wait_until_ready().boxed().now_or_never() {
            Some(Ok(())) => break,
            Some(Err(_)) => return,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    loop {
        let snapshot = watch.snapshot();
        // By labels and annotations alone, straight from the cache: cheap enough for 10,000
        // Deployments every few seconds.
        let mut counts: BTreeMap<&PolicyId, i32> = BTreeMap::new();
        for d in deployments.state() {
            let namespace = d.namespace().unwrap_or_default();
            if !crate::core::spec::opted_in(
                Some(d.labels()),
                snapshot.namespace_opted_in(&namespace),
            ) {
                continue;
            }
            if let Ok(Some(p)) = snapshot.select(&namespace, d.labels(), d.annotations()) {
                *counts.entry(&p.id).or_default() += 1;
            }
        }
        for policy in &snapshot.policies {
            let previous = written.get(&policy.id);
            let status = policy_status(policy, counts.get(&policy.id).copied(), previous);
            if previous == Some(&status) {
                continue;
            }
            match write_status(&client, &policy.id, &status).await {
                Ok(()) => {
                    written.insert(policy.id.clone(), status);
                }
                Err(e) => {
                    tracing::warn!(policy = %policy.id, error = %e, "writing the policy's status")
                }
            }
        }
        written.retain(|id, _| snapshot.policies.iter().any(|p| &p.id == id));
        let _ = tokio::time::timeout(STATUS_EVERY, changes.next()).await;
    }
}

/// The status a policy should have; the condition keeps its transition time while it holds.
fn policy_status(
    policy: &Policy,
    governed: Option<i32>,
    previous: Option<&PolicyStatus>,
) -> PolicyStatus {
    let problems = merge::policy_problems(policy);
    let (status, reason, message) = if problems.is_empty() {
        ("True", "Valid", "fledge uses this policy".to_owned())
    } else {
        ("False", "Invalid", crate::core::spec::summary(&problems))
    };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone());
    PolicyStatus {
        observed_generation: Some(policy.generation),
        conditions: vec![Condition {
            type_: "Ready".to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: Some(policy.generation),
            last_transition_time: since
                .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now())),
        }],
        deployments: governed.unwrap_or(0),
    }
}

async fn write_status(
    client: &Client,
    id: &PolicyId,
    status: &PolicyStatus,
) -> Result<(), kube::Error> {
    let patch = Patch::Merge(serde_json::json!({"status": status}));
    let params = PatchParams::default();
    match (&id.kind, &id.namespace) {
        (PolicyKind::RolloutPolicy, Some(ns)) => {
            Api::<RolloutPolicy>::namespaced(client.clone(), ns)
                .patch_status(&id.name, &params, &patch)
                .await?;
        }
        _ => {
            Api::<ClusterRolloutPolicy>::all(client.clone())
                .patch_status(&id.name, &params, &patch)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> (Shared, watch::Receiver<Version>) {
        let (tx, rx) = watch::channel(Version::default());
        let shared = Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(PolicySnapshot::default())),
            tx,
            sources: std::sync::Mutex::default(),
        };
        (shared, rx)
    }

    fn labels(opted_in: bool) -> ItemValue {
        ItemValue::Labels(BTreeMap::from([(
            "fledge.dev/enabled".to_owned(),
            opted_in.to_string(),
        )]))
    }

    #[test]
    fn only_a_change_of_what_fledge_keeps_makes_a_new_snapshot() {
        let (shared, rx) = shared();
        let count = || rx.borrow().count;
        for source in [Source::Namespaced, Source::Cluster] {
            shared.update(source, BTreeMap::clear);
        }
        shared.update(Source::Namespaces, |held| {
            held.insert("shop".into(), labels(true));
        });
        assert!(rx.borrow().synced);
        let synced = count();
        // A CRD still not installed is retried; a Namespace's annotations change: same labels.
        shared.update(Source::Cluster, BTreeMap::clear);
        shared.update(Source::Namespaces, |held| {
            held.insert("shop".into(), labels(true));
        });
        assert_eq!(count(), synced);
        shared.update(Source::Namespaces, |held| {
            held.insert("shop".into(), labels(false));
        });
        assert_eq!(count(), synced + 1);
        assert!(!shared.snapshot.load().namespace_opted_in("shop"));
    }

    #[test]
    fn a_first_empty_listing_is_a_change() {
        let (shared, rx) = shared();
        shared.update(Source::Cluster, BTreeMap::clear);
        assert_eq!(rx.borrow().count, 1);
    }
}
