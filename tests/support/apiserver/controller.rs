//! A small deployment + replicaset controller, writing through the API like
//! kube-controller-manager's:
//! - per Deployment, one ReplicaSet per distinct pod template, named `{deployment}-{hash}`, with
//!   label `pod-template-hash` on itself, its selector and its template, a controller
//!   ownerReference (`blockOwnerDeletion: true`) and the `deployment.kubernetes.io/revision`,
//!   `desired-replicas`, `max-replicas` annotations; the Deployment's revision annotation is
//!   written with its status (the real controller does this through `/status` too);
//! - scaling as `syncDeployment` does it (`sync.go`, `rolling.go`, `recreate.go`): a paused
//!   Deployment gets no new ReplicaSet and does not progress, and a paused one or one whose
//!   `spec.replicas` changed mid-rollout (`isScalingEvent`, by the `desired-replicas`
//!   annotations) is only resized (`scale`: the only active ReplicaSet to `spec.replicas`, else
//!   all active ones in proportion to their `max-replicas`, `GetProportion`); a RollingUpdate
//!   rolls step by step (`reconcileNewReplicaSet`: the new ReplicaSet up to at most `replicas +
//!   maxSurge` pods in all; `reconcileOldReplicaSets`: unhealthy old replicas first, then old
//!   ones down while at least `replicas - maxUnavailable` stay available, by the ReplicaSets'
//!   `availableReplicas`), one write per pass, the next pass when pods become available;
//!   Recreate scales the old ones to 0, waits for their pods to go, then creates the new one; a
//!   template equal (semantically, ignoring `pod-template-hash`) to an old ReplicaSet's reuses
//!   it and gives it the next revision (`revision-history` keeps the old one), paused or not;
//!   old ReplicaSets beyond `revisionHistoryLimit` deleted once complete or while paused. Each
//!   size written is recorded ([`ControllerHandle::rollout_steps`]);
//! - simulated pods per ReplicaSet (no Pod objects): ready after a delay, or never; available
//!   after `minReadySeconds` more;
//! - ReplicaSet status (`replicas`, `fullyLabeledReplicas`, `readyReplicas`,
//!   `availableReplicas`, `observedGeneration`; zeros omitted as Go's `omitempty` does) and
//!   Deployment status (`observedGeneration`, `replicas`, `updatedReplicas`, `readyReplicas`,
//!   `availableReplicas`, `unavailableReplicas`, `collisionCount`, conditions `Available`
//!   (MinimumReplicasAvailable/MinimumReplicasUnavailable, honouring maxUnavailable) and
//!   `Progressing` (NewReplicaSetCreated, ReplicaSetUpdated, NewReplicaSetAvailable,
//!   `Unknown` DeploymentPaused "Deployment is paused" while paused — no deadline then —
//!   and DeploymentResumed "Deployment is resumed", from which the deadline counts again,
//!   ProgressDeadlineExceeded after `progressDeadlineSeconds` without progress)).
//!
//! Pod readiness: the delay is, by precedence, the Deployment's entry in
//! [`ControllerHandle::set_ready_delay`]/[`ControllerConfig::ready_delays`], the pod template's
//! annotation `test.fledge.dev/ready-after-ms`, else [`ControllerConfig::ready_delay`]. Pods never
//! become ready when the Deployment is listed in `never_ready` ([`ControllerHandle::set_never_ready`])
//! or the template has `test.fledge.dev/never-ready: "true"`. Readiness is evaluated continuously,
//! so lifting `never_ready` makes the pods ready after their delay.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::ops::{Ctx, DeleteOpts, Sub, Write};
use super::resources::ResourceDef;
use super::{Inner, lock, now};

/// Pod template annotation: pods of this template never become ready.
pub const NEVER_READY_ANNOTATION: &str = "test.fledge.dev/never-ready";
/// Pod template annotation: pods of this template become ready after this many milliseconds.
pub const READY_DELAY_ANNOTATION: &str = "test.fledge.dev/ready-after-ms";

const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// How long the controller lets changes accumulate before a pass.
const BATCH_WINDOW: Duration = Duration::from_millis(1);
const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// The deployment controller's configuration.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Run the controller at all.
    pub enabled: bool,
    /// Default time from a pod's creation to its readiness.
    pub ready_delay: Duration,
    /// Start paused ([`ControllerHandle::resume`] starts it).
    pub start_paused: bool,
    /// Deployments whose pods never become ready: `name` (any namespace) or `namespace/name`.
    pub never_ready: Vec<String>,
    /// Per-Deployment readiness delays (`name` or `namespace/name`).
    pub ready_delays: HashMap<String, Duration>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            enabled: true,
            ready_delay: Duration::from_millis(50),
            start_paused: false,
            never_ready: Vec::new(),
            ready_delays: HashMap::new(),
        }
    }
}

#[derive(Clone, Debug)]
struct Pod {
    created: Instant,
}

struct State {
    enabled: bool,
    paused: bool,
    default_delay: Duration,
    never_ready: HashSet<String>,
    ready_delays: HashMap<String, Duration>,
    /// Simulated pods by ReplicaSet uid.
    pods: HashMap<String, Vec<Pod>>,
    /// Last progress of each Deployment (by uid), for the progress deadline.
    progress: HashMap<String, Instant>,
    /// Future state changes (a pod becoming ready or available, a progress deadline), by time
    /// and object uid, with the Deployment to look at then.
    timers: BTreeMap<(Instant, String), (String, String)>,
    /// The times registered in `timers` per uid.
    timer_index: HashMap<String, Vec<Instant>>,
    /// Deployments (ns, name) to look at in the next pass.
    dirty: BTreeSet<(String, String)>,
    full_pass: bool,
    /// The ReplicaSet sizes written, per Deployment (`namespace/name`).
    steps: HashMap<String, Vec<RolloutStep>>,
}

impl State {
    /// Replaces the timers of `uid`.
    fn set_timers(&mut self, uid: &str, key: (String, String), times: Vec<Instant>) {
        for t in self.timer_index.remove(uid).unwrap_or_default() {
            self.timers.remove(&(t, uid.to_string()));
        }
        for t in &times {
            self.timers.insert((*t, uid.to_string()), key.clone());
        }
        if !times.is_empty() {
            self.timer_index.insert(uid.to_string(), times);
        }
    }

    /// Forgets everything about a deleted object.
    fn forget(&mut self, uid: &str) {
        self.set_timers(uid, (String::new(), String::new()), Vec::new());
        self.pods.remove(uid);
        self.progress.remove(uid);
    }

    /// Marks the Deployments of due timers dirty; returns the next timer's time.
    fn fire_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(((t, uid), key)) = self.timers.first_key_value() {
            if *t > now {
                return Some(*t);
            }
            let (t, uid, key) = (*t, uid.clone(), key.clone());
            self.timers.remove(&(t, uid.clone()));
            if let Some(list) = self.timer_index.get_mut(&uid) {
                list.retain(|x| *x != t);
            }
            self.dirty.insert(key);
        }
        None
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    notify: tokio::sync::Notify,
    pass_lock: tokio::sync::Mutex<()>,
    settled: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn new(config: &ControllerConfig) -> Self {
        Shared {
            state: Mutex::new(State {
                enabled: config.enabled,
                paused: config.start_paused,
                default_delay: config.ready_delay,
                never_ready: config.never_ready.iter().cloned().collect(),
                ready_delays: config.ready_delays.clone(),
                pods: HashMap::new(),
                progress: HashMap::new(),
                timers: BTreeMap::new(),
                timer_index: HashMap::new(),
                dirty: BTreeSet::new(),
                full_pass: true,
                steps: HashMap::new(),
            }),
            notify: tokio::sync::Notify::new(),
            pass_lock: tokio::sync::Mutex::new(()),
            settled: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Controls for the deployment controller.
pub struct ControllerHandle {
    inner: Arc<Inner>,
}

impl ControllerHandle {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        ControllerHandle { inner }
    }

    fn shared(&self) -> &Shared {
        &self.inner.controller
    }

    /// Stops reconciling (pods keep their timers; nothing is written).
    pub fn pause(&self) {
        lock(&self.shared().state).paused = true;
    }

    /// Resumes reconciling.
    pub fn resume(&self) {
        let mut s = lock(&self.shared().state);
        s.paused = false;
        s.full_pass = true;
        drop(s);
        self.shared().notify.notify_one();
    }

    /// Runs one full reconcile pass now (also when paused); returns whether it wrote anything.
    pub async fn step(&self) -> bool {
        lock(&self.shared().state).full_pass = true;
        pass(&self.inner).await
    }

    /// Waits until the running, unpaused controller has caught up with every change (a pass that
    /// wrote nothing at the current resourceVersion). Pods that become ready later are not
    /// waited for. Returns at once when the controller is paused or disabled.
    pub async fn settle(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut settled = self.shared().settled.subscribe();
        loop {
            {
                let s = lock(&self.shared().state);
                if s.paused || !s.enabled {
                    return Ok(());
                }
            }
            let rv = self.inner.store().rv;
            if *settled.borrow_and_update() >= rv {
                return Ok(());
            }
            self.shared().notify.notify_one();
            match tokio::time::timeout_at(deadline, settled.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the controller stopped".into()),
                Err(_) => {
                    return Err(format!(
                        "the deployment controller did not settle within {timeout:?} (resourceVersion {rv})"
                    ));
                }
            }
        }
    }

    /// Makes the pods of Deployment `name` (`name` or `namespace/name`) never ready, or lifts it.
    pub fn set_never_ready(&self, name: &str, never: bool) {
        let mut s = lock(&self.shared().state);
        if never {
            s.never_ready.insert(name.to_string());
        } else {
            s.never_ready.remove(name);
        }
        s.full_pass = true;
        drop(s);
        self.shared().notify.notify_one();
    }

    /// Every ReplicaSet size the controller wrote for Deployment `namespace/name` (a creation or a
    /// scaling of one of its ReplicaSets), oldest first, with the pods available after each:
    /// enough to check that a rollout never had more than `replicas + maxSurge` pods and never
    /// fewer than `replicas - maxUnavailable` available.
    pub fn rollout_steps(&self, deployment: &str) -> Vec<RolloutStep> {
        lock(&self.shared().state)
            .steps
            .get(deployment)
            .cloned()
            .unwrap_or_default()
    }

    /// Sets the readiness delay of Deployment `name`'s pods.
    pub fn set_ready_delay(&self, name: &str, delay: Duration) {
        let mut s = lock(&self.shared().state);
        s.ready_delays.insert(name.to_string(), delay);
        s.full_pass = true;
        drop(s);
        self.shared().notify.notify_one();
    }
}

fn ctx() -> Ctx {
    let mut ctx = Ctx::system("system:serviceaccount:kube-system:deployment-controller");
    ctx.user = super::UserInfo::service_account("kube-system", "deployment-controller");
    ctx.field_manager = Some("kube-controller-manager".into());
    ctx
}

pub async fn run(inner: Arc<Inner>) {
    let mut rx = inner.store().tx.subscribe();
    loop {
        // Timers that came due meanwhile (also while changes kept the loop busy).
        lock(&inner.controller.state).fire_due(Instant::now());
        let paused = lock(&inner.controller.state).paused;
        if !paused {
            let start_rv = inner.store().rv;
            let wrote = pass(&inner).await;
            if !wrote && inner.store().rv == start_rv {
                inner.controller.settled.send_replace(start_rv);
            }
        }
        let (next_wake, due) = {
            let mut st = lock(&inner.controller.state);
            let next_wake = st.fire_due(Instant::now());
            (next_wake, !st.dirty.is_empty())
        };
        if due && !paused {
            // Timers came due during the pass (a pod became ready meanwhile): waiting for the
            // next change or timer would leave them unseen.
            continue;
        }
        let sleep = async {
            match next_wake {
                Some(at) if !paused => tokio::time::sleep_until(at.into()).await,
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => {
                let mut changes = Vec::new();
                match msg {
                    Ok(c) => changes.push(c),
                    Err(RecvError::Lagged(_)) => lock(&inner.controller.state).full_pass = true,
                    Err(RecvError::Closed) => return,
                }
                // Like a work queue: let a burst of changes arrive before reconciling them.
                tokio::time::sleep(BATCH_WINDOW).await;
                loop {
                    match rx.try_recv() {
                        Ok(c) => changes.push(c),
                        Err(TryRecvError::Lagged(_)) => lock(&inner.controller.state).full_pass = true,
                        Err(_) => break,
                    }
                }
                let mut st = lock(&inner.controller.state);
                for c in changes {
                    let (ns, name) = (c.key.1.clone(), c.key.2.clone());
                    let owner = match c.key.0.as_str() {
                        "deployments.apps" => name,
                        // The owning Deployment ("" for orphans: their status is kept too).
                        "replicasets.apps" => {
                            controller_owner(&c.object).unwrap_or_default().to_owned()
                        }
                        _ => continue,
                    };
                    if c.kind == super::store::ChangeKind::Deleted {
                        st.forget(s(&c.object["metadata"]["uid"]));
                    }
                    st.dirty.insert((ns, owner));
                }
            }
            () = sleep => {}
            () = inner.controller.notify.notified() => {}
        }
    }
}

fn controller_owner(obj: &Value) -> Option<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"].as_bool() == Some(true) && r["kind"] == "Deployment")
        .and_then(|r| r["name"].as_str())
}

fn controller_owner_uid(obj: &Value) -> Option<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"].as_bool() == Some(true))
        .and_then(|r| r["uid"].as_str())
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn int(v: &Value, default: i64) -> i64 {
    v.as_i64().unwrap_or(default)
}

/// The readiness delay of a ReplicaSet's pods, or `None` when they never become ready.
fn pod_timing(state: &State, rs: &Value) -> Option<Duration> {
    let ns = s(&rs["metadata"]["namespace"]);
    let owner = controller_owner(rs).unwrap_or_else(|| s(&rs["metadata"]["name"]));
    let names = [owner.to_owned(), format!("{ns}/{owner}")];
    let annotations = &rs["spec"]["template"]["metadata"]["annotations"];
    if names.iter().any(|n| state.never_ready.contains(n))
        || s(&annotations[NEVER_READY_ANNOTATION]) == "true"
    {
        return None;
    }
    if let Some(d) = names.iter().find_map(|n| state.ready_delays.get(n)) {
        return Some(*d);
    }
    if let Ok(ms) = s(&annotations[READY_DELAY_ANNOTATION]).parse::<u64>() {
        return Some(Duration::from_millis(ms));
    }
    Some(state.default_delay)
}

/// FNV-32a of the template's canonical JSON ([`semantic_template`]) and the collision count,
/// safe-encoded like `rand.SafeEncodeString(fmt.Sprint(hash))`.
fn template_hash(template: &Value, collision_count: Option<i64>) -> String {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(semantic_template(template).to_string().as_bytes());
    if let Some(c) = collision_count {
        feed(&(c as u32).to_le_bytes());
    }
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// A pod template as upstream's `EqualIgnoreHash` and `ComputeHash` see it: the Go struct, so
/// without the `pod-template-hash` label, and with `null`s, empty maps and empty lists (Go's nil
/// and empty are semantically equal) left out. The same whatever the encoding the template came
/// in (`"creationTimestamp": null` or not).
fn semantic_template(template: &Value) -> Value {
    fn normalize(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Object(m) => {
                let out: Map<String, Value> = m
                    .iter()
                    .filter_map(|(k, x)| normalize(x).map(|x| (k.clone(), x)))
                    .collect();
                (!out.is_empty()).then_some(Value::Object(out))
            }
            Value::Array(a) if a.is_empty() => None,
            Value::Array(a) => Some(Value::Array(
                a.iter()
                    .map(|x| normalize(x).unwrap_or(json!({})))
                    .collect(),
            )),
            other => Some(other.clone()),
        }
    }
    let mut t = template.clone();
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove(POD_TEMPLATE_HASH);
    }
    normalize(&t).unwrap_or(json!({}))
}

fn revision(rs: &Value) -> i64 {
    s(&rs["metadata"]["annotations"][REVISION])
        .parse()
        .unwrap_or(0)
}

/// maxUnavailable/maxSurge resolved against `replicas` (percent rounded down/up like upstream).
fn resolve(v: &Value, replicas: i64, round_up: bool) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(p) => {
            let pct: i64 = p.trim_end_matches('%').parse().unwrap_or(0);
            if round_up {
                (pct * replicas + 99) / 100
            } else {
                pct * replicas / 100
            }
        }
        _ => 0,
    }
}

struct View {
    deployments: Vec<Arc<Value>>,
    replicasets: Vec<Arc<Value>>,
}

/// What a pass looks at: everything, or the dirty Deployments and the ReplicaSets of their
/// namespaces (a ReplicaSet's owner is always in its own namespace). Read by key and by
/// namespace range, as kube-controller-manager's work queue reads its informers' indexes: a
/// pass over a few Deployments does not scan all 10,000 and everything else stored.
enum Scope<'a> {
    All,
    Dirty(&'a BTreeSet<(String, String)>),
}

fn view(inner: &Inner, scope: &Scope<'_>) -> View {
    const DEPLOYMENTS: &str = "deployments.apps";
    const REPLICASETS: &str = "replicasets.apps";
    let store = inner.store();
    let mut deployments = Vec::new();
    let mut replicasets = Vec::new();
    match scope {
        Scope::All => {
            for (k, e) in &store.objects {
                match k.0.as_str() {
                    DEPLOYMENTS => deployments.push(e.object.clone()),
                    REPLICASETS => replicasets.push(e.object.clone()),
                    _ => {}
                }
            }
        }
        Scope::Dirty(dirty) => {
            for (ns, name) in dirty.iter() {
                let key = (DEPLOYMENTS.to_owned(), ns.clone(), name.clone());
                if let Some(e) = store.objects.get(&key) {
                    deployments.push(e.object.clone());
                }
            }
            let namespaces: BTreeSet<&String> = dirty.iter().map(|(ns, _)| ns).collect();
            for ns in namespaces {
                let from = (REPLICASETS.to_owned(), ns.clone(), String::new());
                replicasets.extend(
                    store
                        .objects
                        .range(from..)
                        .take_while(|(k, _)| k.0 == REPLICASETS && &k.1 == ns)
                        .map(|(_, e)| e.object.clone()),
                );
            }
        }
    }
    View {
        deployments,
        replicasets,
    }
}

/// ReplicaSets by the uid of their controlling owner.
fn by_owner(replicasets: &[Arc<Value>]) -> HashMap<&str, Vec<&Value>> {
    let mut out: HashMap<&str, Vec<&Value>> = HashMap::new();
    for rs in replicasets {
        if let Some(uid) = controller_owner_uid(rs) {
            out.entry(uid).or_default().push(rs.as_ref());
        }
    }
    out
}

fn owned_by<'a>(index: &HashMap<&str, Vec<&'a Value>>, d: &Value) -> Vec<&'a Value> {
    let ns = s(&d["metadata"]["namespace"]);
    index
        .get(s(&d["metadata"]["uid"]))
        .into_iter()
        .flatten()
        .copied()
        .filter(|rs| s(&rs["metadata"]["namespace"]) == ns)
        .collect()
}

fn defs(inner: &Inner) -> (Arc<ResourceDef>, Arc<ResourceDef>) {
    (
        inner
            .registry()
            .find("apps", "v1", "deployments")
            .expect("deployments are served"),
        inner
            .registry()
            .find("apps", "v1", "replicasets")
            .expect("replicasets are served"),
    )
}

/// One reconcile pass over the dirty Deployments (all of them after a full-pass request).
/// Returns whether anything was written.
async fn pass(inner: &Arc<Inner>) -> bool {
    let _guard = inner.controller.pass_lock.lock().await;
    let (full, dirty) = {
        let mut st = lock(&inner.controller.state);
        (
            std::mem::take(&mut st.full_pass),
            std::mem::take(&mut st.dirty),
        )
    };
    let (ddef, rsdef) = defs(inner);
    let mut wrote = false;
    let scope = if full {
        Scope::All
    } else {
        Scope::Dirty(&dirty)
    };
    let v = view(inner, &scope);
    let index = by_owner(&v.replicasets);

    // 1. ReplicaSets per Deployment.
    let mut created: HashMap<String, String> = HashMap::new();
    for d in &v.deployments {
        if d["metadata"].get("deletionTimestamp").is_some() {
            continue;
        }
        match sync_replicasets(inner, &rsdef, &ddef, d, &index).await {
            Ok((w, new_rs)) => {
                wrote |= w;
                if let Some(name) = new_rs {
                    created.insert(s(&d["metadata"]["uid"]).to_string(), name);
                }
            }
            Err(e) => tracing::debug!("deployment controller: {e}"),
        }
    }

    // 2. Simulated pods and ReplicaSet status.
    let v = view(inner, &scope);
    let dirty_keys: HashSet<(&str, &str)> = dirty
        .iter()
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
        .collect();
    for rs in &v.replicasets {
        let key = (
            s(&rs["metadata"]["namespace"]),
            controller_owner(rs).unwrap_or_default(),
        );
        if !full && !dirty_keys.contains(&key) {
            continue;
        }
        wrote |= sync_replicaset_status(inner, &rsdef, rs).await;
    }

    // 3. Deployment status.
    let v = view(inner, &scope);
    let index = by_owner(&v.replicasets);
    for d in &v.deployments {
        let new_rs = created.get(s(&d["metadata"]["uid"])).cloned();
        wrote |= sync_deployment_status(inner, &ddef, d, &index, new_rs).await;
    }
    wrote
}

/// The fenceposts of a rolling update, as `ResolveFenceposts`, `MaxSurge` and `MaxUnavailable`
/// resolve them: both 0 for Recreate; maxUnavailable 1 when both round to 0, at most `replicas`.
fn fenceposts(spec: &Value, desired: i64) -> (i64, i64) {
    if s(&spec["strategy"]["type"]) == "Recreate" {
        return (0, 0);
    }
    let ru = &spec["strategy"]["rollingUpdate"];
    let surge = resolve(&ru["maxSurge"], desired, true);
    let mut unavailable = resolve(&ru["maxUnavailable"], desired, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (
        surge,
        if desired == 0 {
            0
        } else {
            unavailable.min(desired)
        },
    )
}

fn annotation_int(rs: &Value, name: &str) -> Option<i64> {
    s(&rs["metadata"]["annotations"][name]).parse().ok()
}

/// One step of a rollout as the deployment controller wrote it ([`ControllerHandle::rollout_steps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutStep {
    /// `spec.replicas` of the ReplicaSet of the Deployment's current template (0 when none).
    pub new_replicas: i64,
    /// `spec.replicas` of the Deployment's other ReplicaSets, summed.
    pub old_replicas: i64,
    /// Pods available once the write took effect (a ReplicaSet scaled down loses its
    /// unavailable pods first).
    pub available: i64,
}

/// One Deployment's ReplicaSets during a reconcile, with the sizes this pass has written.
struct Rollout<'a> {
    inner: &'a Arc<Inner>,
    rsdef: &'a Arc<ResourceDef>,
    /// `namespace/name` of the Deployment.
    key: String,
    ns: String,
    desired: i64,
    surge: i64,
    unavailable: i64,
    /// Owned ReplicaSets, oldest first (creationTimestamp, name), and their `spec.replicas`.
    sets: Vec<(&'a Value, i64)>,
    /// The ReplicaSet of the current template, in `sets`.
    new: Option<usize>,
    wrote: bool,
}

impl Rollout<'_> {
    fn new_size(&self) -> i64 {
        self.new.map_or(0, |i| self.sets[i].1)
    }

    fn total(&self) -> i64 {
        self.sets.iter().map(|(_, n)| n).sum()
    }

    /// Old ReplicaSets, oldest first.
    fn old(&self) -> Vec<usize> {
        (0..self.sets.len())
            .filter(|i| Some(*i) != self.new)
            .collect()
    }

    fn available(&self, i: usize) -> i64 {
        int(&self.sets[i].0["status"]["availableReplicas"], 0)
    }

    /// Records a step; `new_replicas` overrides the new ReplicaSet's size (one just created).
    fn record(&self, new_replicas: Option<i64>) {
        let now = Instant::now();
        let mut st = lock(&self.inner.controller.state);
        let available = self
            .sets
            .iter()
            .map(|(rs, n)| {
                let (_, available) = pod_counts(&st, rs, now);
                (available as i64).min(*n)
            })
            .sum();
        let step = RolloutStep {
            new_replicas: new_replicas.unwrap_or(self.new_size()),
            old_replicas: self.total() - self.new_size(),
            available,
        };
        st.steps.entry(self.key.clone()).or_default().push(step);
    }

    /// `scaleReplicaSet`: `spec.replicas` and the desired-/max-replicas annotations in one
    /// write, when either differs.
    async fn scale(&mut self, i: usize, to: i64) -> Result<(), String> {
        let (rs, from) = self.sets[i];
        let desired = self.desired;
        let max = self.desired + self.surge;
        if from == to
            && annotation_int(rs, DESIRED_REPLICAS) == Some(desired)
            && annotation_int(rs, MAX_REPLICAS) == Some(max)
        {
            return Ok(());
        }
        let name = s(&rs["metadata"]["name"]).to_string();
        let mut c = ctx();
        self.inner
            .modify(self.rsdef, &self.ns, &name, Sub::Main, &mut c, |o| {
                o["spec"]["replicas"] = json!(to);
                let a = &mut o["metadata"]["annotations"];
                a[DESIRED_REPLICAS] = json!(desired.to_string());
                a[MAX_REPLICAS] = json!(max.to_string());
                true
            })
            .await
            .map_err(|e| e.to_string())?;
        self.sets[i].1 = to;
        self.wrote = true;
        if from != to {
            self.record(None);
        }
        Ok(())
    }

    /// `scaleReplicaSetAndRecordEvent`: only a change of size is written.
    async fn resize(&mut self, i: usize, to: i64) -> Result<(), String> {
        if self.sets[i].1 != to {
            self.scale(i, to).await?;
        }
        Ok(())
    }

    /// `isScalingEvent`: an active ReplicaSet was sized for another `spec.replicas`.
    fn scaling_event(&self) -> bool {
        self.sets.iter().any(|(rs, n)| {
            *n > 0 && annotation_int(rs, DESIRED_REPLICAS).is_some_and(|d| d != self.desired)
        })
    }

    /// `scale`: a paused Deployment, or one whose `spec.replicas` changed, resizes its
    /// ReplicaSets without progressing: the only active one (or the newest) to `spec.replicas`,
    /// old ones to 0 beside a saturated new one, else all active ones in proportion to the
    /// `max-replicas` they were sized for (`GetProportion`), leftovers to the largest.
    async fn scale_proportionally(
        &mut self,
        rolling: bool,
        status_replicas: i64,
    ) -> Result<(), String> {
        let active: Vec<usize> = (0..self.sets.len())
            .filter(|i| self.sets[*i].1 > 0)
            .collect();
        let only = match active.as_slice() {
            [] => self.new.or_else(|| self.old().last().copied()),
            [one] => Some(*one),
            _ => None,
        };
        if let Some(i) = only {
            return self.resize(i, self.desired).await;
        }
        if let Some(n) = self.new {
            let rs = self.sets[n].0;
            if self.sets[n].1 == self.desired
                && annotation_int(rs, DESIRED_REPLICAS) == Some(self.desired)
                && self.available(n) == self.desired
            {
                for i in self.old() {
                    if self.sets[i].1 > 0 {
                        self.scale(i, 0).await?;
                    }
                }
                return Ok(());
            }
        }
        if !rolling {
            return Ok(());
        }
        let allowed = if self.desired > 0 {
            self.desired + self.surge
        } else {
            0
        };
        let to_add = allowed - active.iter().map(|i| self.sets[*i].1).sum::<i64>();
        let mut order = active;
        let created = |i: usize| {
            let rs = self.sets[i].0;
            (
                s(&rs["metadata"]["creationTimestamp"]),
                s(&rs["metadata"]["name"]),
            )
        };
        // Larger first; among equals, newer first when scaling up, older first when down.
        order.sort_by(|&a, &b| {
            let by_size = self.sets[b].1.cmp(&self.sets[a].1);
            let by_age = if to_add > 0 {
                created(b).cmp(&created(a))
            } else {
                created(a).cmp(&created(b))
            };
            by_size.then(by_age)
        });
        let mut added = 0;
        let mut sizes = Vec::new();
        for &i in &order {
            let (rs, size) = self.sets[i];
            let p = proportion(
                rs,
                size,
                (self.desired, self.surge, status_replicas),
                to_add,
                added,
            );
            added += p;
            sizes.push(size + p);
        }
        if let Some(first) = sizes.first_mut()
            && to_add != 0
        {
            *first = (*first + to_add - added).max(0);
        }
        for (i, size) in order.into_iter().zip(sizes) {
            self.scale(i, size).await?;
        }
        Ok(())
    }

    /// `reconcileNewReplicaSet`, then, when that scaled nothing, `reconcileOldReplicaSets`
    /// (unhealthy old replicas first, then old ones down to `replicas - maxUnavailable`
    /// available).
    async fn roll(&mut self) -> Result<(), String> {
        let Some(n) = self.new else {
            return Ok(());
        };
        let size = self.sets[n].1;
        if size > self.desired {
            return self.resize(n, self.desired).await;
        }
        if size < self.desired {
            let current = self.total();
            let max_total = self.desired + self.surge;
            if current < max_total {
                let up = (max_total - current).min(self.desired - size);
                return self.resize(n, size + up).await;
            }
        }
        let old = self.old();
        if old.iter().all(|i| self.sets[*i].1 == 0) {
            return Ok(());
        }
        let min_available = self.desired - self.unavailable;
        let new_unavailable = size - self.available(n);
        let max_scaled_down = self.total() - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(());
        }
        let mut cleaned = 0;
        for &i in &old {
            if cleaned >= max_scaled_down {
                break;
            }
            let (have, available) = (self.sets[i].1, self.available(i));
            if have == 0 || have == available {
                continue;
            }
            let down = (max_scaled_down - cleaned).min(have - available);
            self.resize(i, have - down).await?;
            cleaned += down;
        }
        let available: i64 = (0..self.sets.len()).map(|i| self.available(i)).sum();
        if available <= min_available {
            return Ok(());
        }
        let to_scale_down = available - min_available;
        let mut scaled_down = 0;
        for &i in &old {
            if scaled_down >= to_scale_down {
                break;
            }
            let have = self.sets[i].1;
            if have == 0 {
                continue;
            }
            let down = have.min(to_scale_down - scaled_down);
            self.resize(i, have - down).await?;
            scaled_down += down;
        }
        Ok(())
    }
}

/// `GetProportion`: what one ReplicaSet of `size` gets of `to_add` (negative when scaling
/// down), given the Deployment's (replicas, maxSurge, status.replicas).
fn proportion(
    rs: &Value,
    size: i64,
    (desired, surge, status_replicas): (i64, i64, i64),
    to_add: i64,
    added: i64,
) -> i64 {
    if size == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = if desired == 0 {
        -size
    } else {
        // Without the annotation upstream falls back to the Deployment's status.replicas.
        let before = annotation_int(rs, MAX_REPLICAS).unwrap_or(status_replicas);
        if before <= 0 {
            return 0;
        }
        ((size * (desired + surge)) as f64 / before as f64).round() as i64 - size
    };
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

/// Creates the ReplicaSet for the current template if needed and scales them as the
/// kube-controller-manager's `syncDeployment` does: a paused Deployment or a scaling event is
/// only resized (`sync`), otherwise it rolls (RollingUpdate) or recreates. Returns whether it
/// wrote, and the name of a ReplicaSet it created.
async fn sync_replicasets(
    inner: &Arc<Inner>,
    rsdef: &Arc<ResourceDef>,
    ddef: &Arc<ResourceDef>,
    d: &Value,
    all: &HashMap<&str, Vec<&Value>>,
) -> Result<(bool, Option<String>), String> {
    let ns = s(&d["metadata"]["namespace"]).to_string();
    let name = s(&d["metadata"]["name"]).to_string();
    let spec = &d["spec"];
    let desired = int(&spec["replicas"], 1);
    let template = &spec["template"];
    let mut owned = owned_by(all, d);
    owned.sort_by_key(|rs| {
        (
            s(&rs["metadata"]["creationTimestamp"]),
            s(&rs["metadata"]["name"]),
        )
    });
    let recreate = s(&spec["strategy"]["type"]) == "Recreate";
    let paused = spec["paused"].as_bool() == Some(true);
    let (surge, unavailable) = fenceposts(spec, desired);
    let new = owned
        .iter()
        .position(|rs| semantic_template(&rs["spec"]["template"]) == semantic_template(template));
    let max_old_revision = owned
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != new)
        .map(|(_, rs)| revision(rs))
        .max()
        .unwrap_or(0);
    let mut r = Rollout {
        inner,
        rsdef,
        key: format!("{ns}/{name}"),
        ns: ns.clone(),
        desired,
        surge,
        unavailable,
        sets: owned
            .iter()
            .map(|rs| (*rs, int(&rs["spec"]["replicas"], 0)))
            .collect(),
        new,
        wrote: false,
    };

    // The ReplicaSet of the current template takes the next revision (a revert reuses the old
    // ReplicaSet: no new pods) and the Deployment's annotations, paused or not.
    if let Some(n) = new {
        let rs = owned[n];
        let annotations = new_rs_annotations(d, rs, max_old_revision + 1);
        if annotations
            .iter()
            .any(|(k, v)| rs["metadata"]["annotations"].get(k) != Some(v))
        {
            let mut c = ctx();
            let rs_name = s(&rs["metadata"]["name"]).to_string();
            inner
                .modify(rsdef, &ns, &rs_name, Sub::Main, &mut c, |o| {
                    for (k, v) in &annotations {
                        o["metadata"]["annotations"][k] = v.clone();
                    }
                    true
                })
                .await
                .map_err(|e| e.to_string())?;
            r.wrote = true;
        }
    }

    let status_replicas = int(&d["status"]["replicas"], 0);
    if paused || r.scaling_event() {
        r.scale_proportionally(!recreate, status_replicas).await?;
        if paused {
            r.wrote |= cleanup(inner, rsdef, d, &r).await;
        }
        return Ok((r.wrote, None));
    }

    let mut created = None;
    if recreate {
        let mut scaled = false;
        for i in r.old() {
            if r.sets[i].1 > 0 {
                r.scale(i, 0).await?;
                scaled = true;
            }
        }
        let old_pods_running = r
            .old()
            .iter()
            .any(|i| int(&r.sets[*i].0["status"]["replicas"], 0) > 0);
        if scaled || old_pods_running {
            return Ok((r.wrote, None));
        }
        match r.new {
            Some(n) => r.resize(n, desired).await?,
            None => created = create_new_rs(&r, ddef, d, desired, max_old_revision + 1).await?,
        }
    } else {
        match r.new {
            Some(_) => r.roll().await?,
            None => {
                // `NewRSNewReplicas` for a ReplicaSet at 0.
                let replicas = (desired + surge - r.total()).max(0).min(desired);
                created = create_new_rs(&r, ddef, d, replicas, max_old_revision + 1).await?;
            }
        }
    }
    let status = &d["status"];
    let complete = int(&status["updatedReplicas"], 0) == desired
        && int(&status["replicas"], 0) == desired
        && int(&status["availableReplicas"], 0) == desired
        && int(&status["observedGeneration"], 0) >= int(&d["metadata"]["generation"], 0);
    if complete {
        r.wrote |= cleanup(inner, rsdef, d, &r).await;
    }
    Ok((r.wrote || created.is_some(), created))
}

/// Creates the ReplicaSet of the Deployment's template with `replicas`; `None` when its name was
/// taken by a ReplicaSet of another template (`collisionCount` is bumped for the next pass).
async fn create_new_rs(
    r: &Rollout<'_>,
    ddef: &Arc<ResourceDef>,
    d: &Value,
    replicas: i64,
    revision: i64,
) -> Result<Option<String>, String> {
    let spec = &d["spec"];
    let name = s(&d["metadata"]["name"]);
    let template = &spec["template"];
    let hash = template_hash(template, d["status"]["collisionCount"].as_i64());
    let rs_name = format!("{name}-{hash}");
    let mut rs_template = template.clone();
    rs_template["metadata"]["labels"][POD_TEMPLATE_HASH] = json!(hash);
    let mut selector = spec["selector"].clone();
    selector["matchLabels"][POD_TEMPLATE_HASH] = json!(hash);
    let mut labels = template["metadata"]["labels"].clone();
    labels[POD_TEMPLATE_HASH] = json!(hash);
    let mut annotations = copied_annotations(d);
    annotations.insert(REVISION.into(), json!(revision.to_string()));
    annotations.insert(DESIRED_REPLICAS.into(), json!(r.desired.to_string()));
    annotations.insert(
        MAX_REPLICAS.into(),
        json!((r.desired + r.surge).to_string()),
    );
    let rs = json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": rs_name,
            "namespace": r.ns,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": name,
                "uid": d["metadata"]["uid"],
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "replicas": replicas,
            "minReadySeconds": int(&spec["minReadySeconds"], 0),
            "selector": selector,
            "template": rs_template,
        },
    });
    let mut c = ctx();
    match r
        .inner
        .write(
            r.rsdef,
            "v1",
            &r.ns,
            "",
            Sub::Main,
            &Write::Create(rs),
            &mut c,
        )
        .await
    {
        Ok(_) => {
            r.record(Some(replicas));
            Ok(Some(rs_name))
        }
        Err(e) if e.code == 409 => {
            // A ReplicaSet of that name with another template: bump collisionCount.
            let mut c = ctx();
            let _ = r
                .inner
                .modify(ddef, &r.ns, name, Sub::Status, &mut c, |o| {
                    let n = int(&o["status"]["collisionCount"], 0) + 1;
                    o["status"]["collisionCount"] = json!(n);
                    true
                })
                .await;
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `cleanupDeployment`: old ReplicaSets without replicas beyond `revisionHistoryLimit` go, the
/// lowest revisions first. Returns whether it deleted any.
async fn cleanup(inner: &Arc<Inner>, rsdef: &Arc<ResourceDef>, d: &Value, r: &Rollout<'_>) -> bool {
    let limit = int(&d["spec"]["revisionHistoryLimit"], 10).max(0) as usize;
    let mut empty: Vec<&Value> = r
        .old()
        .into_iter()
        .map(|i| r.sets[i].0)
        .filter(|rs| {
            int(&rs["spec"]["replicas"], 0) == 0
                && int(&rs["status"]["replicas"], 0) == 0
                && rs["metadata"].get("deletionTimestamp").is_none()
        })
        .collect();
    if empty.len() <= limit {
        return false;
    }
    empty.sort_by_key(|rs| revision(rs));
    for rs in empty.iter().take(empty.len() - limit) {
        let mut c = ctx();
        let _ = inner
            .delete(
                rsdef,
                "v1",
                s(&rs["metadata"]["namespace"]),
                s(&rs["metadata"]["name"]),
                &DeleteOpts::default(),
                &mut c,
            )
            .await;
    }
    true
}

/// The Deployment's annotations a ReplicaSet carries: all but kubectl's and the controller's own.
fn copied_annotations(d: &Value) -> Map<String, Value> {
    d["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            *k != "kubectl.kubernetes.io/last-applied-configuration"
                && !k.starts_with("deployment.kubernetes.io/")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `SetNewReplicaSetAnnotations` for an existing ReplicaSet of the current template: the copied
/// annotations, and `next` as its revision when its own is lower (the old one joins
/// `revision-history`).
fn new_rs_annotations(d: &Value, rs: &Value, next: i64) -> Map<String, Value> {
    let mut a = copied_annotations(d);
    let old = revision(rs);
    if old < next {
        a.insert(REVISION.into(), json!(next.to_string()));
        if old > 0 {
            let history = s(&rs["metadata"]["annotations"][REVISION_HISTORY]);
            let history = if history.is_empty() {
                old.to_string()
            } else {
                format!("{history},{old}")
            };
            a.insert(REVISION_HISTORY.into(), json!(history));
        }
    }
    a
}

/// Ready and available simulated pods of a ReplicaSet at `now`.
fn pod_counts(st: &State, rs: &Value, now: Instant) -> (usize, usize) {
    let Some(delay) = pod_timing(st, rs) else {
        return (0, 0);
    };
    let min_ready = Duration::from_secs(int(&rs["spec"]["minReadySeconds"], 0).max(0) as u64);
    let pods = st
        .pods
        .get(s(&rs["metadata"]["uid"]))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ready = pods.iter().filter(|p| p.created + delay <= now).count();
    let available = pods
        .iter()
        .filter(|p| p.created + delay + min_ready <= now)
        .count();
    (ready, available)
}

/// Adjusts the simulated pods of one ReplicaSet and writes its status.
async fn sync_replicaset_status(inner: &Arc<Inner>, rsdef: &Arc<ResourceDef>, rs: &Value) -> bool {
    let uid = s(&rs["metadata"]["uid"]).to_string();
    let desired = int(&rs["spec"]["replicas"], 1).max(0) as usize;
    let min_ready = Duration::from_secs(int(&rs["spec"]["minReadySeconds"], 0).max(0) as u64);
    let now_i = Instant::now();
    let (n, ready, available) = {
        let mut st = lock(&inner.controller.state);
        let timing = pod_timing(&st, rs);
        let pods = st.pods.entry(uid.clone()).or_default();
        while pods.len() < desired {
            pods.push(Pod { created: now_i });
        }
        if pods.len() > desired {
            // Unready (newest) pods go first.
            pods.sort_by_key(|p| p.created);
            pods.truncate(desired);
        }
        let n = pods.len();
        let future: Vec<Instant> = match timing {
            Some(d) => pods
                .iter()
                .flat_map(|p| [p.created + d, p.created + d + min_ready])
                .filter(|t| *t > now_i)
                .collect(),
            None => Vec::new(),
        };
        let key = (
            s(&rs["metadata"]["namespace"]).to_string(),
            controller_owner(rs).unwrap_or_default().to_owned(),
        );
        st.set_timers(&uid, key, future);
        let (ready, available) = pod_counts(&st, rs, now_i);
        (n, ready, available)
    };
    let mut status = json!({"replicas": n});
    if n > 0 {
        status["fullyLabeledReplicas"] = json!(n);
    }
    if ready > 0 {
        status["readyReplicas"] = json!(ready);
    }
    if available > 0 {
        status["availableReplicas"] = json!(available);
    }
    if let Some(g) = rs["metadata"]["generation"].as_i64() {
        status["observedGeneration"] = json!(g);
    }
    if rs["status"] == status {
        return false;
    }
    let ns = s(&rs["metadata"]["namespace"]).to_string();
    let name = s(&rs["metadata"]["name"]).to_string();
    let mut c = ctx();
    let res = inner
        .modify(rsdef, &ns, &name, Sub::Status, &mut c, |o| {
            if o["status"] == status {
                return false;
            }
            o["status"] = status.clone();
            true
        })
        .await;
    res.is_ok()
}

fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    last_update: &str,
    last_transition: &str,
) -> Value {
    json!({
        "type": kind,
        "status": status,
        "lastUpdateTime": last_update,
        "lastTransitionTime": last_transition,
        "reason": reason,
        "message": message,
    })
}

/// `SetDeploymentCondition`: keeps the old condition when status and reason are unchanged
/// (unless `refresh`), keeps lastTransitionTime when only the reason changes.
fn set_condition(conditions: &mut Vec<Value>, new: Value, refresh: bool) {
    let kind = new["type"].clone();
    let now = now();
    match conditions.iter().position(|c| c["type"] == kind) {
        Some(i) => {
            let old = &conditions[i];
            if old["status"] == new["status"] && old["reason"] == new["reason"] && !refresh {
                return;
            }
            let mut new = new;
            if old["status"] == new["status"] {
                new["lastTransitionTime"] = old["lastTransitionTime"].clone();
            }
            new["lastUpdateTime"] = json!(now);
            conditions.remove(i);
            conditions.push(new);
        }
        None => conditions.push(new),
    }
}

async fn sync_deployment_status(
    inner: &Arc<Inner>,
    ddef: &Arc<ResourceDef>,
    d: &Value,
    all: &HashMap<&str, Vec<&Value>>,
    created: Option<String>,
) -> bool {
    let spec = &d["spec"];
    let uid = s(&d["metadata"]["uid"]).to_string();
    let desired = int(&spec["replicas"], 1);
    let owned = owned_by(all, d);
    let template = &spec["template"];
    let new_rs = owned
        .iter()
        .find(|rs| semantic_template(&rs["spec"]["template"]) == semantic_template(template))
        .copied();
    let sum = |f: &str| owned.iter().map(|rs| int(&rs["status"][f], 0)).sum::<i64>();
    let replicas = sum("replicas");
    let ready = sum("readyReplicas");
    let available = sum("availableReplicas");
    let total_spec: i64 = owned.iter().map(|rs| int(&rs["spec"]["replicas"], 0)).sum();
    let updated = new_rs.map_or(0, |rs| int(&rs["status"]["replicas"], 0));
    let generation = d["metadata"]["generation"].as_i64().unwrap_or(0);
    let old = &d["status"];

    let mut status = Map::new();
    status.insert("observedGeneration".into(), json!(generation));
    for (k, v) in [
        ("replicas", replicas),
        ("updatedReplicas", updated),
        ("readyReplicas", ready),
        ("availableReplicas", available),
        ("unavailableReplicas", (total_spec - available).max(0)),
    ] {
        if v != 0 {
            status.insert(k.into(), json!(v));
        }
    }
    if let Some(c) = old.get("collisionCount") {
        status.insert("collisionCount".into(), c.clone());
    }
    let now_s = now();
    let mut conditions: Vec<Value> = old["conditions"].as_array().cloned().unwrap_or_default();
    let max_unavailable = fenceposts(spec, desired).1;
    if available >= desired - max_unavailable {
        set_condition(
            &mut conditions,
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                &now_s,
                &now_s,
            ),
            false,
        );
    } else {
        set_condition(
            &mut conditions,
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                &now_s,
                &now_s,
            ),
            false,
        );
    }
    if let Some(deadline) = spec["progressDeadlineSeconds"].as_i64() {
        let rs_name = new_rs
            .map(|rs| s(&rs["metadata"]["name"]).to_string())
            .unwrap_or_default();
        let complete = updated == desired && replicas == desired && available == desired;
        let progressed = updated > int(&old["updatedReplicas"], 0)
            || (replicas - updated) < (int(&old["replicas"], 0) - int(&old["updatedReplicas"], 0))
            || ready > int(&old["readyReplicas"], 0)
            || available > int(&old["availableReplicas"], 0);
        let mut st = lock(&inner.controller.state);
        // `checkPausedConditions`: a paused Deployment is neither progressing nor timed out;
        // its deadline counts again from the resume (unless it had already timed out).
        let paused = spec["paused"].as_bool() == Some(true);
        let reason = conditions
            .iter()
            .find(|c| c["type"] == "Progressing")
            .map(|c| s(&c["reason"]).to_string())
            .unwrap_or_default();
        if reason != "ProgressDeadlineExceeded" {
            if paused && reason != "DeploymentPaused" {
                set_condition(
                    &mut conditions,
                    condition(
                        "Progressing",
                        "Unknown",
                        "DeploymentPaused",
                        "Deployment is paused",
                        &now_s,
                        &now_s,
                    ),
                    false,
                );
            } else if !paused && reason == "DeploymentPaused" {
                st.progress.insert(uid.clone(), Instant::now());
                set_condition(
                    &mut conditions,
                    condition(
                        "Progressing",
                        "Unknown",
                        "DeploymentResumed",
                        "Deployment is resumed",
                        &now_s,
                        &now_s,
                    ),
                    false,
                );
            }
        }
        let last_progress = *st.progress.entry(uid.clone()).or_insert_with(Instant::now);
        if paused {
            // No progress is estimated while paused.
        } else if let Some(created) = &created {
            st.progress.insert(uid.clone(), Instant::now());
            set_condition(
                &mut conditions,
                condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetCreated",
                    &format!("Created new replica set {created:?}"),
                    &now_s,
                    &now_s,
                ),
                true,
            );
        } else if complete && new_rs.is_some() {
            set_condition(
                &mut conditions,
                condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    &format!("ReplicaSet {rs_name:?} has successfully progressed."),
                    &now_s,
                    &now_s,
                ),
                false,
            );
        } else if progressed && new_rs.is_some() {
            st.progress.insert(uid.clone(), Instant::now());
            set_condition(
                &mut conditions,
                condition(
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    &format!("ReplicaSet {rs_name:?} is progressing."),
                    &now_s,
                    &now_s,
                ),
                true,
            );
        } else if new_rs.is_some()
            && last_progress.elapsed() > Duration::from_secs(deadline.max(0) as u64)
            && conditions
                .iter()
                .any(|c| c["type"] == "Progressing" && c["reason"] != "NewReplicaSetAvailable")
        {
            set_condition(
                &mut conditions,
                condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet {rs_name:?} has timed out progressing."),
                    &now_s,
                    &now_s,
                ),
                false,
            );
        }
        // Wake up when the deadline passes, unless the rollout is done.
        let key = (
            s(&d["metadata"]["namespace"]).to_string(),
            s(&d["metadata"]["name"]).to_string(),
        );
        let at = st.progress.get(&uid).copied().unwrap_or_else(Instant::now)
            + Duration::from_secs(deadline.max(0) as u64)
            + Duration::from_millis(1);
        let times = if paused || complete || at <= Instant::now() {
            Vec::new()
        } else {
            vec![at]
        };
        st.set_timers(&uid, key, times);
    }
    if !conditions.is_empty() {
        status.insert("conditions".into(), json!(conditions));
    }
    let status = Value::Object(status);
    let revision_annotation =
        new_rs.map(|rs| s(&rs["metadata"]["annotations"][REVISION]).to_string());
    let annotation_ok = revision_annotation
        .as_ref()
        .is_none_or(|r| r.is_empty() || s(&d["metadata"]["annotations"][REVISION]) == r);
    if *old == status && annotation_ok {
        return false;
    }
    let ns = s(&d["metadata"]["namespace"]).to_string();
    let name = s(&d["metadata"]["name"]).to_string();
    let seen_rv = d["metadata"]["resourceVersion"].clone();
    let mut c = ctx();
    let mut applied = false;
    let res = inner
        .modify(ddef, &ns, &name, Sub::Status, &mut c, |o| {
            if o["metadata"]["resourceVersion"] != seen_rv {
                // Changed since this pass looked: the next pass recomputes.
                applied = false;
                return false;
            }
            o["status"] = status.clone();
            if let Some(r) = &revision_annotation
                && !r.is_empty()
            {
                o["metadata"]["annotations"][REVISION] = json!(r);
            }
            applied = true;
            true
        })
        .await;
    if !applied {
        lock(&inner.controller.state).dirty.insert((ns, name));
        inner.controller.notify.notify_one();
        return false;
    }
    res.is_ok()
}
