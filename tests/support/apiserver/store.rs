//! The object store: one global resourceVersion counter like etcd's revision, a change log that
//! serves watches from a resourceVersion and consistent paged lists, compaction, and a broadcast
//! of every change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::patch::Managers;

/// (storage key, namespace, name). Cluster-scoped objects have an empty namespace.
pub type Key = (String, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn watch_type(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One committed write.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub key: Key,
    pub kind: ChangeKind,
    /// The object after the change (for a deletion: the last state, with the deletion's
    /// resourceVersion, as etcd watches report it).
    pub object: Arc<Value>,
    /// The object before the change.
    pub prev: Option<Arc<Value>>,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub object: Arc<Value>,
    pub managers: Arc<Managers>,
}

pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<Key, Entry>,
    /// Every change after `compacted`, oldest first.
    pub log: VecDeque<Arc<Change>>,
    /// resourceVersions at or below this one are gone from the log.
    pub compacted: u64,
    pub history_limit: usize,
    /// Everything ever committed (for tests' inspection); not compacted.
    pub audit: Vec<Arc<Change>>,
    pub record_audit: bool,
    pub tx: broadcast::Sender<Arc<Change>>,
    pub next_cluster_ip: u32,
}

impl Store {
    pub fn new(history_limit: usize, record_audit: bool) -> Self {
        let (tx, _) = broadcast::channel(1 << 16);
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            compacted: 0,
            history_limit: history_limit.max(1),
            audit: Vec::new(),
            record_audit,
            tx,
            next_cluster_ip: 10,
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.objects.get(key)
    }

    fn record(&mut self, change: Change) -> Arc<Change> {
        let change = Arc::new(change);
        self.log.push_back(change.clone());
        while self.log.len() > self.history_limit {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rv;
            }
        }
        if self.record_audit {
            self.audit.push(change.clone());
        }
        // Nobody listening is fine.
        let _ = self.tx.send(change.clone());
        change
    }

    /// Stores `object` under `key` with the next resourceVersion; returns the change.
    pub fn put(&mut self, key: Key, mut object: Value, managers: Arc<Managers>) -> Arc<Change> {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = Arc::new(object);
        let prev = self
            .objects
            .insert(
                key.clone(),
                Entry {
                    object: object.clone(),
                    managers,
                },
            )
            .map(|e| e.object);
        let kind = if prev.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(Change {
            rv,
            key,
            kind,
            object,
            prev,
        })
    }

    pub fn delete(&mut self, key: &Key) -> Option<Arc<Change>> {
        let entry = self.objects.remove(key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut last = (*entry.object).clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        Some(self.record(Change {
            rv,
            key: key.clone(),
            kind: ChangeKind::Deleted,
            object: Arc::new(last),
            prev: Some(entry.object),
        }))
    }

    /// Forgets all history: any older resourceVersion is now too old to watch or list from.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    /// The objects of `storage` as they were at `rv` (by undoing later changes), or `None` when
    /// that is before the compacted history.
    pub fn snapshot(
        &self,
        storage: &str,
        rv: u64,
    ) -> Option<BTreeMap<(String, String), Arc<Value>>> {
        if rv < self.compacted {
            return None;
        }
        let mut out: BTreeMap<(String, String), Arc<Value>> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == storage)
            .map(|(k, e)| ((k.1.clone(), k.2.clone()), e.object.clone()))
            .collect();
        for change in self.log.iter().rev() {
            if change.rv <= rv {
                break;
            }
            if change.key.0 != storage {
                continue;
            }
            let k = (change.key.1.clone(), change.key.2.clone());
            match &change.prev {
                Some(p) => {
                    out.insert(k, p.clone());
                }
                None => {
                    out.remove(&k);
                }
            }
        }
        Some(out)
    }

    /// The changes after `rv`, or `None` when some of them have been compacted away.
    pub fn since(&self, rv: u64) -> Option<Vec<Arc<Change>>> {
        if rv < self.compacted {
            return None;
        }
        Some(self.log.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// A cluster IP from 10.96.0.0/12.
    pub fn allocate_cluster_ip(&mut self) -> String {
        let n = self.next_cluster_ip;
        self.next_cluster_ip += 1;
        format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff)
    }
}
