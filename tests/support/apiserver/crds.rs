//! CustomResourceDefinitions created at runtime (kube-apiserver's apiextensions controllers,
//! reduced): a CRD created or changed through the API (`apiextensions.k8s.io/v1`
//! `customresourcedefinitions`) makes its resource served with the versions it marks `served`,
//! in discovery (plain and aggregated) and with each version's schema enforced; its status gets
//! `acceptedNames` and the `NamesAccepted` and `Established` conditions, as upstream, shortly
//! after the create. A CRD whose `metadata.name` is not `{plural}.{group}`, or without a group or
//! plural, is not served and says so in `Established=False`. Deleting the CRD stops serving the
//! resource (upstream also deletes its objects first; here they stay stored, unreachable).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::Inner;
use super::ops::{Ctx, Sub};
use super::resources::{self, ResourceDef};
use super::store::ChangeKind;

const GROUP: &str = "apiextensions.k8s.io";
const PLURAL: &str = "customresourcedefinitions";
/// The storage key of CRDs.
const STORAGE: &str = "customresourcedefinitions.apiextensions.k8s.io";

pub async fn run(inner: Arc<Inner>) {
    let mut rx = inner.store().tx.subscribe();
    loop {
        let change = match rx.recv().await {
            Ok(c) => c,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        if change.key.0 != STORAGE {
            continue;
        }
        let crd = &change.object;
        let spec = &crd["spec"];
        let (group, plural) = (
            spec["group"].as_str().unwrap_or_default(),
            spec["names"]["plural"].as_str().unwrap_or_default(),
        );
        if change.kind == ChangeKind::Deleted {
            inner.update_registry(|r| r.remove(group, plural));
            continue;
        }
        // What the CRD served before, if it changed its group or plural.
        if let Some(prev) = &change.prev {
            let (g, p) = (
                prev["spec"]["group"].as_str().unwrap_or_default(),
                prev["spec"]["names"]["plural"].as_str().unwrap_or_default(),
            );
            if (g, p) != (group, plural) {
                inner.update_registry(|r| r.remove(g, p));
            }
        }
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        let served = served_def(crd, name, group, plural);
        if let Ok(def) = &served {
            let def = def.clone();
            inner.update_registry(|r| r.add(def));
        }
        set_status(&inner, name, spec, served.err()).await;
    }
}

fn served_def(crd: &Value, name: &str, group: &str, plural: &str) -> Result<ResourceDef, String> {
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name must be spec.names.plural+\".\"+spec.group: {plural}.{group}"
        ));
    }
    resources::def_from_crd(crd, None)
}

/// `acceptedNames`, `NamesAccepted`, `Established` (`problem`: not established, and why).
async fn set_status(inner: &Arc<Inner>, name: &str, spec: &Value, problem: Option<String>) {
    let Some(def) = inner.registry().find(GROUP, "v1", PLURAL) else {
        return;
    };
    let time = super::now();
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastTransitionTime": time,
            "reason": reason,
            "message": message,
        })
    };
    let conditions = match &problem {
        None => vec![
            condition("NamesAccepted", true, "NoConflicts", "no conflicts found"),
            condition(
                "Established",
                true,
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        ],
        Some(why) => vec![
            condition("NamesAccepted", false, "InvalidNames", why),
            condition(
                "Established",
                false,
                "NotAccepted",
                "not all names are accepted",
            ),
        ],
    };
    let stored: Vec<Value> = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].clone())
        .collect();
    let mut ctx = Ctx::system("system:serviceaccount:kube-system:apiextensions-controller");
    let _ = inner
        .modify(&def, "", name, Sub::Status, &mut ctx, |crd| {
            let same = |a: &Value, b: &Value| {
                let strip = |c: &Value| {
                    c.as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| (c["type"].clone(), c["status"].clone(), c["message"].clone()))
                        .collect::<Vec<_>>()
                };
                strip(a) == strip(b)
            };
            if crd["status"]["acceptedNames"] == spec["names"]
                && same(&crd["status"]["conditions"], &json!(conditions))
            {
                return false;
            }
            crd["status"] = json!({
                "acceptedNames": spec["names"],
                "conditions": conditions,
                "storedVersions": stored,
            });
            true
        })
        .await;
}
