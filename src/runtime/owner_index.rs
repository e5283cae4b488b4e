//! Objects by the uids of their owners, kept beside a reflector's store from the same watch
//! events, so that a reconcile finds its Deployment's ReplicaSets without scanning every
//! ReplicaSet in the cluster. That scan (a `Store::state()` copy and an owner comparison per
//! ReplicaSet, in every reconcile) was over a third of fledge's CPU at 10,000 Deployments.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

/// Owner uid → the objects that name it in their ownerReferences.
pub struct OwnerIndex<K: Resource<DynamicType = ()>> {
    inner: Arc<Mutex<Indexed<K>>>,
}

impl<K: Resource<DynamicType = ()>> Clone for OwnerIndex<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Resource<DynamicType = ()>> Default for OwnerIndex<K> {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
        }
    }
}

struct Indexed<K: Resource<DynamicType = ()>> {
    by_owner: HashMap<String, HashSet<ObjectRef<K>>>,
    owners_of: HashMap<ObjectRef<K>, Vec<String>>,
    /// While the watch (re)lists: the index being built, which replaces the current one when the
    /// listing is done, as the reflector's store is replaced.
    listing: Option<Box<Indexed<K>>>,
}

impl<K: Resource<DynamicType = ()>> Default for Indexed<K> {
    fn default() -> Self {
        Self {
            by_owner: HashMap::new(),
            owners_of: HashMap::new(),
            listing: None,
        }
    }
}

impl<K: Resource<DynamicType = ()>> Indexed<K> {
    fn insert(&mut self, object: &K) {
        let key = ObjectRef::from_obj(object);
        self.remove(&key);
        let owners: Vec<String> = object
            .meta()
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.uid.clone())
            .collect();
        for owner in &owners {
            self.by_owner
                .entry(owner.clone())
                .or_default()
                .insert(key.clone());
        }
        self.owners_of.insert(key, owners);
    }

    fn remove(&mut self, key: &ObjectRef<K>) {
        for owner in self.owners_of.remove(key).into_iter().flatten() {
            if let Some(owned) = self.by_owner.get_mut(&owner) {
                owned.remove(key);
                if owned.is_empty() {
                    self.by_owner.remove(&owner);
                }
            }
        }
    }
}

impl<K: Resource<DynamicType = ()>> OwnerIndex<K> {
    /// Follows one watch event (before the reflector applies it).
    pub fn apply(&self, event: &watcher::Event<K>) {
        let mut indexed = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(object) => indexed.insert(object),
            watcher::Event::Delete(object) => indexed.remove(&ObjectRef::from_obj(object)),
            watcher::Event::Init => indexed.listing = Some(Box::default()),
            watcher::Event::InitApply(object) => indexed
                .listing
                .get_or_insert_with(Box::default)
                .insert(object),
            watcher::Event::InitDone => {
                if let Some(listed) = indexed.listing.take() {
                    indexed.by_owner = listed.by_owner;
                    indexed.owners_of = listed.owners_of;
                }
            }
        }
    }

    /// The objects owned by `owner_uid`.
    pub fn owned_by(&self, owner_uid: &str) -> Vec<ObjectRef<K>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_owner
            .get(owner_uid)
            .map(|owned| owned.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn mk_replicaset(name: &str, owners: &[&str]) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                owner_references: Some(
                    owners
                        .iter()
                        .map(|uid| OwnerReference {
                            uid: (*uid).into(),
                            ..OwnerReference::default()
                        })
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..ReplicaSet::default()
        }
    }

    fn names(index: &OwnerIndex<ReplicaSet>, owner: &str) -> Vec<String> {
        let mut names: Vec<String> = index.owned_by(owner).into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn follows_applies_owner_changes_and_deletes() {
        let index = OwnerIndex::default();
        index.apply(&watcher::Event::Apply(mk_replicaset("web-1", &["u-web"])));
        index.apply(&watcher::Event::Apply(mk_replicaset("web-2", &["u-web"])));
        index.apply(&watcher::Event::Apply(mk_replicaset("api-1", &["u-api"])));
        assert_eq!(names(&index, "u-web"), ["web-1", "web-2"]);
        // Orphaned, then adopted by another owner: only the new owner has it.
        index.apply(&watcher::Event::Apply(mk_replicaset("web-2", &[])));
        assert_eq!(names(&index, "u-web"), ["web-1"]);
        index.apply(&watcher::Event::Apply(mk_replicaset("web-2", &["u-api"])));
        assert_eq!(names(&index, "u-api"), ["api-1", "web-2"]);
        index.apply(&watcher::Event::Delete(mk_replicaset("web-1", &["u-web"])));
        assert!(names(&index, "u-web").is_empty());
        assert!(!index.inner.lock().unwrap().by_owner.contains_key("u-web"));
    }

    #[test]
    fn a_relist_replaces_the_index_when_it_is_done() {
        let index = OwnerIndex::default();
        index.apply(&watcher::Event::Apply(mk_replicaset("web-1", &["u-web"])));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(mk_replicaset(
            "web-2",
            &["u-web"],
        )));
        // Until the listing is done, the old index answers (as the reflector's store does).
        assert_eq!(names(&index, "u-web"), ["web-1"]);
        index.apply(&watcher::Event::InitDone);
        assert_eq!(names(&index, "u-web"), ["web-2"]);
    }
}
