//! The garbage collector (kube-controller-manager's `garbagecollector` and the namespace
//! controller, reduced): after a batch of changes (and `gc_delay`), it
//! - deletes objects all of whose owners are gone (an owner is present when an object of the
//!   reference's kind, name and uid exists), and drops references to missing owners from objects
//!   that still have a live owner;
//! - for owners deleted with `propagationPolicy: Orphan` (finalizer `orphan`): removes the
//!   references to them from their dependents, then the finalizer;
//! - for owners deleted with `Foreground` (finalizer `foregroundDeletion`): deletes the dependents
//!   (in the foreground too), and removes the finalizer once no dependent with
//!   `blockOwnerDeletion: true` is left;
//! - for terminating namespaces: deletes everything in them, then the namespace.
//!
//! It looks only at what the batch touched (objects with new owner references, dependents of
//! deleted objects, objects being deleted and the owners and namespaces of deleted objects), and
//! decides from one look at the store without copying it.
//! Its writes go through the normal write path (admission included), as the real GC's do.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::Inner;
use super::ops::{Ctx, DeleteOpts, Sub};
use super::resources::{Builtin, ResourceDef};
use super::store::{Change, ChangeKind, Key};

/// What a batch of changes asks the collector to look at.
#[derive(Default)]
struct Work {
    full: bool,
    /// Objects whose owners to check.
    owned: BTreeSet<Key>,
    /// Deleted uids, whose dependents to check.
    deleted: BTreeSet<String>,
    /// Objects being deleted (finalizers to process), by key.
    terminating: BTreeSet<Key>,
    /// Owners (by uid) of deleted objects: a foreground deletion may be complete.
    owners: BTreeSet<String>,
}

impl Work {
    fn is_empty(&self) -> bool {
        !self.full
            && self.owned.is_empty()
            && self.deleted.is_empty()
            && self.terminating.is_empty()
            && self.owners.is_empty()
    }

    fn add(&mut self, c: &Change) {
        let meta = &c.object["metadata"];
        if c.kind == ChangeKind::Deleted {
            if let Some(uid) = meta["uid"].as_str() {
                self.deleted.insert(uid.to_string());
            }
            for r in owner_refs(&c.object) {
                if let Some(uid) = r["uid"].as_str() {
                    self.owners.insert(uid.to_string());
                }
            }
            if !c.key.1.is_empty() {
                self.terminating
                    .insert(("namespaces".into(), String::new(), c.key.1.clone()));
            }
            return;
        }
        if meta.get("deletionTimestamp").is_some() {
            self.terminating.insert(c.key.clone());
        }
        let refs_changed = meta.get("ownerReferences").is_some()
            && c.prev.as_ref().is_none_or(|p| {
                p["metadata"].get("ownerReferences") != meta.get("ownerReferences")
            });
        if refs_changed {
            self.owned.insert(c.key.clone());
        }
    }
}

pub async fn run(inner: Arc<Inner>) {
    let mut rx = inner.store().tx.subscribe();
    loop {
        let mut work = Work::default();
        match rx.recv().await {
            Ok(c) => work.add(&c),
            Err(RecvError::Lagged(_)) => work.full = true,
            Err(RecvError::Closed) => return,
        }
        if work.is_empty() {
            continue;
        }
        tokio::time::sleep(inner.gc_delay).await;
        loop {
            match rx.try_recv() {
                Ok(c) => work.add(&c),
                Err(TryRecvError::Lagged(_)) => work.full = true,
                Err(_) => break,
            }
        }
        sweep(&inner, &work).await;
    }
}

fn ctx() -> Ctx {
    let mut ctx = Ctx::system("system:serviceaccount:kube-system:generic-garbage-collector");
    ctx.user = super::UserInfo::service_account("kube-system", "generic-garbage-collector");
    ctx
}

/// Deletes `key` as the garbage collector; a failure is left for the next pass.
async fn collect(inner: &Inner, def: &Arc<ResourceDef>, key: &Key, opts: DeleteOpts) {
    let _ = inner
        .delete(
            def,
            &def.versions[0].name,
            &key.1,
            &key.2,
            &opts,
            &mut ctx(),
        )
        .await;
}

fn owner_refs(obj: &Value) -> Vec<Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect()
}

/// What a sweep does. It is decided in one look at the store, as the real collector decides from
/// its graph, and carried out afterwards through the normal write path.
enum Step {
    /// Delete an object, with these options.
    Collect(Arc<ResourceDef>, Key, DeleteOpts),
    /// Drop the references to these owner uids (the field too, when none is left).
    DropOwners(Arc<ResourceDef>, Key, Vec<Value>),
    /// Remove a finalizer.
    Finalize(Arc<ResourceDef>, Key, &'static str),
    /// A terminating namespace with nothing left in it goes.
    Forget(Key),
}

async fn sweep(inner: &Arc<Inner>, work: &Work) {
    let steps = decide(inner, work);
    for step in steps {
        match step {
            Step::Collect(def, key, opts) => collect(inner, &def, &key, opts).await,
            Step::DropOwners(def, key, gone) => {
                let _ = inner
                    .modify(&def, &key.1, &key.2, Sub::Main, &mut ctx(), |o| {
                        let before = owner_refs(o);
                        let after: Vec<Value> = before
                            .iter()
                            .filter(|r| !gone.contains(&r["uid"]))
                            .cloned()
                            .collect();
                        if after.len() == before.len() {
                            return false;
                        }
                        if after.is_empty() {
                            if let Some(m) = o["metadata"].as_object_mut() {
                                m.remove("ownerReferences");
                            }
                        } else {
                            o["metadata"]["ownerReferences"] = json!(after);
                        }
                        true
                    })
                    .await;
            }
            Step::Finalize(def, key, finalizer) => {
                remove_finalizer(inner, &def, &key, finalizer).await
            }
            Step::Forget(key) => {
                inner.store().delete(&key);
            }
        }
    }
}

/// The sweep's steps, from the store as it is now. Only what the batch touched is looked at; the
/// whole store is scanned only to find the dependents or the keys of given uids, and only when
/// the batch deleted something (or lagged), as kube-controller-manager's graph answers those from
/// its index.
fn decide(inner: &Inner, work: &Work) -> Vec<Step> {
    let registry = inner.registry();
    let store = inner.store();
    let objects = &store.objects;
    let def_of = |key: &Key| -> Option<Arc<ResourceDef>> { registry.by_storage(&key.0) };
    let present = |r: &Value, dependent_ns: &str| -> bool {
        let Some(def) = registry.find_kind(
            r["apiVersion"].as_str().unwrap_or_default(),
            r["kind"].as_str().unwrap_or_default(),
        ) else {
            // An owner of a kind the server does not know cannot be resolved; leave it be.
            return true;
        };
        let key = (
            def.storage.clone(),
            if def.namespaced {
                dependent_ns.to_string()
            } else {
                String::new()
            },
            r["name"].as_str().unwrap_or_default().to_string(),
        );
        objects
            .get(&key)
            .is_some_and(|e| e.object["metadata"]["uid"] == r["uid"])
    };
    let mut steps = Vec::new();

    // Objects being deleted: the ones the batch saw, and the owners of deleted objects.
    let mut terminating: BTreeSet<Key> = work.terminating.clone();
    if work.full {
        terminating.extend(objects.keys().cloned());
    } else if !work.owners.is_empty() {
        terminating.extend(
            objects
                .iter()
                .filter(|(_, e)| {
                    e.object["metadata"]["uid"]
                        .as_str()
                        .is_some_and(|uid| work.owners.contains(uid))
                })
                .map(|(k, _)| k.clone()),
        );
    }
    let terminating: Vec<(&Key, &Value)> = terminating
        .iter()
        .filter_map(|k| objects.get_key_value(k))
        .map(|(k, e)| (k, e.object.as_ref()))
        .filter(|(_, o)| o["metadata"].get("deletionTimestamp").is_some())
        .collect();

    // Dependents of deleted and of terminating objects, by owner uid.
    let mut wanted: BTreeSet<&str> = work.deleted.iter().map(String::as_str).collect();
    wanted.extend(
        terminating
            .iter()
            .filter_map(|(_, o)| o["metadata"]["uid"].as_str()),
    );
    let mut dependents: HashMap<&str, Vec<(&Key, bool)>> = HashMap::new();
    if work.full || !wanted.is_empty() {
        for (key, e) in objects {
            for r in e.object["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(uid) = r["uid"].as_str()
                    && (work.full || wanted.contains(uid))
                {
                    dependents
                        .entry(uid)
                        .or_default()
                        .push((key, r["blockOwnerDeletion"].as_bool() == Some(true)));
                }
            }
        }
    }

    // Objects whose owners may be gone.
    let mut owned: BTreeSet<&Key> = work.owned.iter().collect();
    for uid in &work.deleted {
        owned.extend(
            dependents
                .get(uid.as_str())
                .into_iter()
                .flatten()
                .map(|(k, _)| *k),
        );
    }
    if work.full {
        owned.extend(objects.keys());
    }
    for key in owned {
        let Some(entry) = objects.get(key) else {
            continue;
        };
        let obj = &entry.object;
        let Some(def) = def_of(key) else { continue };
        let refs = owner_refs(obj);
        if refs.is_empty() {
            continue;
        }
        let (live, dangling): (Vec<Value>, Vec<Value>) =
            refs.into_iter().partition(|r| present(r, &key.1));
        if dangling.is_empty() {
            continue;
        }
        if live.is_empty() {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                steps.push(Step::Collect(def, key.clone(), DeleteOpts::default()));
            }
        } else {
            let gone = dangling.iter().map(|r| r["uid"].clone()).collect();
            steps.push(Step::DropOwners(def, key.clone(), gone));
        }
    }

    // Finalizers the collector owns, and namespaces.
    for (key, obj) in terminating {
        let Some(def) = def_of(key) else { continue };
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        let fins = finalizers(obj);
        let deps = dependents.get(uid).map(Vec::as_slice).unwrap_or_default();
        if def.builtin == Some(Builtin::Namespace) {
            let ns = &key.2;
            let mut empty = true;
            for (k, e) in objects.iter().filter(|(k, _)| &k.1 == ns) {
                empty = false;
                if e.object["metadata"].get("deletionTimestamp").is_some() {
                    continue;
                }
                if let Some(d) = def_of(k) {
                    steps.push(Step::Collect(d, k.clone(), DeleteOpts::default()));
                }
            }
            if empty {
                steps.push(Step::Forget(key.clone()));
            }
            continue;
        }
        if fins.iter().any(|f| f == "orphan") {
            for (dep_key, _) in deps {
                if let Some(dep_def) = def_of(dep_key) {
                    steps.push(Step::DropOwners(
                        dep_def,
                        (*dep_key).clone(),
                        vec![Value::from(uid)],
                    ));
                }
            }
            steps.push(Step::Finalize(def, key.clone(), "orphan"));
            continue;
        }
        if fins.iter().any(|f| f == "foregroundDeletion") {
            for (dep_key, _) in deps {
                let dep_obj = objects.get(*dep_key);
                if dep_obj.is_some_and(|e| e.object["metadata"].get("deletionTimestamp").is_some())
                {
                    continue;
                }
                if let Some(dep_def) = def_of(dep_key) {
                    let opts = DeleteOpts {
                        propagation: Some("Foreground".into()),
                        ..DeleteOpts::default()
                    };
                    steps.push(Step::Collect(dep_def, (*dep_key).clone(), opts));
                }
            }
            if !deps.iter().any(|(_, block)| *block) {
                steps.push(Step::Finalize(def, key.clone(), "foregroundDeletion"));
            }
        }
    }
    steps
}

async fn remove_finalizer(inner: &Arc<Inner>, def: &Arc<ResourceDef>, key: &Key, finalizer: &str) {
    let _ = inner
        .modify(def, &key.1, &key.2, Sub::Main, &mut ctx(), |o| {
            let before = finalizers(o);
            let after: Vec<String> = before.iter().filter(|f| *f != finalizer).cloned().collect();
            if after.len() == before.len() {
                return false;
            }
            o["metadata"]["finalizers"] = json!(after);
            true
        })
        .await;
}
