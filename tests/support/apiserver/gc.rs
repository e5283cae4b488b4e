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
//! deleted objects, objects being deleted and the owners and namespaces of deleted objects).
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

async fn sweep(inner: &Arc<Inner>, work: &Work) {
    let objects: HashMap<Key, Arc<Value>> = {
        let store = inner.store();
        store
            .objects
            .iter()
            .map(|(k, e)| (k.clone(), e.object.clone()))
            .collect()
    };
    let by_uid: HashMap<&str, &Key> = objects
        .iter()
        .filter_map(|(k, o)| o["metadata"]["uid"].as_str().map(|u| (u, k)))
        .collect();
    let present = |r: &Value, dependent_ns: &str| -> bool {
        let Some(def) = inner.registry().find_kind(
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
            .is_some_and(|o| o["metadata"]["uid"] == r["uid"])
    };
    let def_of = |key: &Key| -> Option<Arc<ResourceDef>> { inner.registry().by_storage(&key.0) };
    // Dependents by owner uid (one scan, only when something needs it).
    let needs_index = work.full || !work.deleted.is_empty() || !work.terminating.is_empty();
    let mut dependents: HashMap<String, Vec<(Key, bool)>> = HashMap::new();
    if needs_index {
        for (key, obj) in &objects {
            for r in owner_refs(obj) {
                if let Some(uid) = r["uid"].as_str() {
                    dependents
                        .entry(uid.to_string())
                        .or_default()
                        .push((key.clone(), r["blockOwnerDeletion"].as_bool() == Some(true)));
                }
            }
        }
    }

    // Objects whose owners may be gone.
    let mut owned: BTreeSet<Key> = work.owned.clone();
    for uid in &work.deleted {
        for (k, _) in dependents.get(uid).into_iter().flatten() {
            owned.insert(k.clone());
        }
    }
    if work.full {
        owned.extend(objects.keys().cloned());
    }
    for key in &owned {
        let Some(obj) = objects.get(key) else {
            continue;
        };
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
                collect(inner, &def, key, DeleteOpts::default()).await;
            }
        } else {
            let gone: Vec<Value> = dangling.iter().map(|r| r["uid"].clone()).collect();
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
                    o["metadata"]["ownerReferences"] = json!(after);
                    true
                })
                .await;
        }
    }

    // Objects being deleted: finalizers the collector owns, namespaces.
    let mut terminating: BTreeSet<Key> = work.terminating.clone();
    for uid in &work.owners {
        if let Some(k) = by_uid.get(uid.as_str()) {
            terminating.insert((*k).clone());
        }
    }
    if work.full {
        terminating.extend(objects.keys().cloned());
    }
    for key in &terminating {
        let Some(obj) = objects.get(key) else {
            continue;
        };
        if obj["metadata"].get("deletionTimestamp").is_none() {
            continue;
        }
        let Some(def) = def_of(key) else { continue };
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let fins = finalizers(obj);
        let deps = dependents.get(&uid).cloned().unwrap_or_default();
        if def.builtin == Some(Builtin::Namespace) {
            let ns = key.2.clone();
            let content: Vec<(&Key, &Arc<Value>)> =
                objects.iter().filter(|(k, _)| k.1 == ns).collect();
            for (k, o) in &content {
                if o["metadata"].get("deletionTimestamp").is_some() {
                    continue;
                }
                if let Some(d) = def_of(k) {
                    collect(inner, &d, k, DeleteOpts::default()).await;
                }
            }
            if content.is_empty() {
                inner.store().delete(key);
            }
            continue;
        }
        if fins.iter().any(|f| f == "orphan") {
            for (dep_key, _) in &deps {
                if let Some(dep_def) = def_of(dep_key) {
                    let owner = uid.clone();
                    let _ = inner
                        .modify(
                            &dep_def,
                            &dep_key.1,
                            &dep_key.2,
                            Sub::Main,
                            &mut ctx(),
                            |o| {
                                let before = owner_refs(o);
                                let after: Vec<Value> = before
                                    .iter()
                                    .filter(|r| r["uid"] != owner.as_str())
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
                            },
                        )
                        .await;
                }
            }
            remove_finalizer(inner, &def, key, "orphan").await;
            continue;
        }
        if fins.iter().any(|f| f == "foregroundDeletion") {
            for (dep_key, _) in &deps {
                let dep_obj = objects.get(dep_key);
                if dep_obj.is_some_and(|o| o["metadata"].get("deletionTimestamp").is_some()) {
                    continue;
                }
                if let Some(dep_def) = def_of(dep_key) {
                    let opts = DeleteOpts {
                        propagation: Some("Foreground".into()),
                        ..DeleteOpts::default()
                    };
                    collect(inner, &dep_def, dep_key, opts).await;
                }
            }
            if !deps.iter().any(|(_, block)| *block) {
                remove_finalizer(inner, &def, key, "foregroundDeletion").await;
            }
        }
    }
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
