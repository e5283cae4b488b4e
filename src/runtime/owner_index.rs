//! Objects by the uids of their owners, kept beside a reflector's store from the same watch
//! events, so that a reconcile finds its Deployment's ReplicaSets without scanning every
//! ReplicaSet in the cluster. That scan (a `Store::state()` copy and an owner comparison per
//! ReplicaSet, in every reconcile) was over a third of fledge's CPU at 10,000 Deployments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

/// Owner uid → the names of the objects that name it in their ownerReferences (an owned object is
/// in its owner's namespace). Fed each watch event before the store applies it, so that the store
/// still holds an object's previous version, and with it the owners it had.
pub struct OwnerIndex<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    inner: Arc<Mutex<Indexed>>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for OwnerIndex<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            inner: Arc::clone(&self.inner),
        }
    }
}

type ByOwner = HashMap<String, Vec<String>>;

#[derive(Default)]
struct Indexed {
    by_owner: ByOwner,
    /// While the watch (re)lists: the index being built, which replaces the current one when the
    /// listing is done, as the reflector's store is replaced.
    listing: Option<ByOwner>,
}

fn owners<K: Resource>(object: &K) -> impl Iterator<Item = &str> {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.as_str())
}

fn insert<K: Resource>(by_owner: &mut ByOwner, object: &K) {
    let Some(name) = &object.meta().name else {
        return;
    };
    for owner in owners(object) {
        let names = by_owner.entry(owner.to_owned()).or_default();
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
}

fn remove<K: Resource>(by_owner: &mut ByOwner, object: &K) {
    let Some(name) = &object.meta().name else {
        return;
    };
    for owner in owners(object) {
        if let Some(names) = by_owner.get_mut(owner) {
            names.retain(|n| n != name);
            if names.is_empty() {
                by_owner.remove(owner);
            }
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> OwnerIndex<K> {
    /// An empty index beside `store`, the reader of the reflector that the same events feed.
    pub fn new(store: Store<K>) -> Self {
        Self {
            store,
            inner: Arc::default(),
        }
    }

    /// Follows one watch event, before the reflector applies it.
    pub fn apply(&self, event: &watcher::Event<K>) {
        let mut indexed = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(object) => {
                if let Some(previous) = self.store.get(&ObjectRef::from_obj(object)) {
                    remove(&mut indexed.by_owner, &*previous);
                }
                insert(&mut indexed.by_owner, object);
            }
            watcher::Event::Delete(object) => {
                if let Some(previous) = self.store.get(&ObjectRef::from_obj(object)) {
                    remove(&mut indexed.by_owner, &*previous);
                }
                remove(&mut indexed.by_owner, object);
            }
            watcher::Event::Init => indexed.listing = Some(ByOwner::new()),
            watcher::Event::InitApply(object) => {
                insert(indexed.listing.get_or_insert_with(ByOwner::new), object);
            }
            watcher::Event::InitDone => {
                if let Some(listed) = indexed.listing.take() {
                    indexed.by_owner = listed;
                }
            }
        }
    }

    /// The cached objects in `namespace` owned by `owner_uid`.
    pub fn owned_by(&self, namespace: &str, owner_uid: &str) -> Vec<Arc<K>> {
        let names = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_owner
            .get(owner_uid)
            .cloned()
            .unwrap_or_default();
        names
            .iter()
            .filter_map(|name| self.store.get(&ObjectRef::new(name).within(namespace)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::runtime::reflector::{self, store::Writer};

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

    /// An index and the store it sits beside, fed as the controller feeds them.
    struct Fed {
        index: OwnerIndex<ReplicaSet>,
        writer: Writer<ReplicaSet>,
    }

    impl Fed {
        fn new() -> Self {
            let (reader, writer) = reflector::store();
            Self {
                index: OwnerIndex::new(reader),
                writer,
            }
        }

        fn feed(&mut self, event: watcher::Event<ReplicaSet>) {
            self.index.apply(&event);
            self.writer.apply_watcher_event(&event);
        }

        fn names(&self, owner: &str) -> Vec<String> {
            let mut names: Vec<String> = self
                .index
                .owned_by("shop", owner)
                .iter()
                .map(|rs| rs.metadata.name.clone().unwrap_or_default())
                .collect();
            names.sort();
            names
        }
    }

    #[test]
    fn follows_applies_owner_changes_and_deletes() {
        let mut fed = Fed::new();
        fed.feed(watcher::Event::Apply(mk_replicaset("web-1", &["u-web"])));
        fed.feed(watcher::Event::Apply(mk_replicaset("web-2", &["u-web"])));
        fed.feed(watcher::Event::Apply(mk_replicaset("api-1", &["u-api"])));
        assert_eq!(fed.names("u-web"), ["web-1", "web-2"]);
        // Orphaned, then adopted by another owner: only the new owner has it.
        fed.feed(watcher::Event::Apply(mk_replicaset("web-2", &[])));
        assert_eq!(fed.names("u-web"), ["web-1"]);
        fed.feed(watcher::Event::Apply(mk_replicaset("web-2", &["u-api"])));
        assert_eq!(fed.names("u-api"), ["api-1", "web-2"]);
        // Applied again unchanged: listed once.
        fed.feed(watcher::Event::Apply(mk_replicaset("web-2", &["u-api"])));
        assert_eq!(fed.names("u-api"), ["api-1", "web-2"]);
        fed.feed(watcher::Event::Delete(mk_replicaset("web-1", &["u-web"])));
        assert!(fed.names("u-web").is_empty());
        let indexed = fed.index.inner.lock().unwrap();
        assert!(!indexed.by_owner.contains_key("u-web"));
    }

    #[test]
    fn another_namespace_is_not_looked_in() {
        let mut fed = Fed::new();
        fed.feed(watcher::Event::Apply(mk_replicaset("web-1", &["u-web"])));
        assert!(fed.index.owned_by("other", "u-web").is_empty());
    }

    #[test]
    fn a_relist_replaces_the_index_when_it_is_done() {
        let mut fed = Fed::new();
        fed.feed(watcher::Event::Apply(mk_replicaset("web-1", &["u-web"])));
        fed.feed(watcher::Event::Init);
        fed.feed(watcher::Event::InitApply(mk_replicaset(
            "web-2",
            &["u-web"],
        )));
        // Until the listing is done, the old index and store answer.
        assert_eq!(fed.names("u-web"), ["web-1"]);
        fed.feed(watcher::Event::InitDone);
        assert_eq!(fed.names("u-web"), ["web-2"]);
    }
}
