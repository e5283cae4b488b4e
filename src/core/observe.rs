//! What the controller reads off cluster objects, as plain values for the rollout state machine.
//!
//! Pure: JSON objects in (the user's Deployment, its canary Deployment, its ReplicaSets), facts out.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use serde_json::Value;

use crate::core::objects::POD_TEMPLATE_HASH;
use crate::core::policy::{self, Policy, PolicySnapshot};
use crate::core::rollout::machine::{CanaryStatus, Observation};
use crate::core::rollout::{self, RolloutState, StateError};
use crate::core::spec::{
    self, ANNOTATION_CANARY_HASH, ANNOTATION_HOLD, ANNOTATION_STABLE_HASH, CanarySpec,
    FLEDGE_ANNOTATIONS, OptIn, Router,
};
use crate::core::template;

/// Kubernetes' default for `spec.progressDeadlineSeconds`.
const DEFAULT_PROGRESS_DEADLINE: u64 = 600;
/// The revision a Deployment and its ReplicaSets carry.
const REVISION: &str = "deployment.kubernetes.io/revision";
/// `kubectl apply`'s copy of the whole object: nothing fledge reads.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The status fields [`rolled_out`] reads: all a Deployment's cache keeps of its status.
const ROLLOUT_COUNTS: [&str; 4] = [
    "observedGeneration",
    "replicas",
    "updatedReplicas",
    "availableReplicas",
];
/// What [`DeploymentFacts::read`] reads of the spec, besides the template.
const AT_REST_SPEC: [&str; 3] = ["replicas", "paused", "progressDeadlineSeconds"];
/// Where [`trim_for_cache`] keeps the hash of the template it drops. The API server prunes unknown
/// fields of a Deployment's spec, so no Deployment it returns has this one.
const TRIMMED_TEMPLATE_HASH: &str = "fledgeTemplateHash";

/// Facts about the user's Deployment.
#[derive(Debug)]
pub struct DeploymentFacts {
    pub name: String,
    /// The settings, when opted in and valid.
    pub spec: Option<CanarySpec>,
    /// Why the settings are not used, when the Deployment is labelled but they are invalid.
    pub invalid: Option<String>,
    /// The router the annotations name (the default when they name none or an unknown one), also
    /// when the settings are invalid or gone: what to clean up.
    pub router: Router,
    /// Hash of `spec.template`, from the JSON as the API server returned it: the same identity the
    /// webhook computes from the same JSON.
    pub template_hash: String,
    /// `fledge.dev/stable-hash`.
    pub stable_hash: Option<String>,
    /// `fledge.dev/hold` is `"true"`: fledge holds `spec.paused`.
    pub held: bool,
    /// `spec.paused`.
    pub paused: bool,
    pub stable_replicas: u64,
    pub progress_deadline: Duration,
    pub rolled_out: bool,
    pub state: Result<Option<RolloutState>, StateError>,
    /// The policy the settings were merged with: the one fixed in the state of the canary in
    /// flight, else the one that governs the Deployment now.
    pub policy: Option<Policy>,
    /// The canary's fixed policy is no longer in the cluster.
    pub policy_missing: bool,
}

impl DeploymentFacts {
    /// Reads a Deployment under the policies and namespaces of `policies`.
    pub fn read(deployment: &Value, policies: &PolicySnapshot) -> DeploymentFacts {
        let meta = &deployment["metadata"];
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        let namespace = meta["namespace"].as_str().unwrap_or_default();
        let labels = string_map(&meta["labels"]);
        let annotations = string_map(&meta["annotations"]);
        let template_hash = template_hash(deployment);
        let stable_hash = annotations.get(ANNOTATION_STABLE_HASH).cloned();
        let state = rollout::read_state(Some(&annotations));
        // The canary of this template keeps the policy it started with, in flight and aborted
        // (`fledge abort`, `fledge retry`); anything else takes today's.
        let fixed = state
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .filter(|s| s.keeps_policy() && s.hash == template_hash);
        let (policy, selection) = match fixed {
            Some(s) => (s.policy.as_deref().cloned(), Ok(())),
            None => match policies.select(namespace, &labels, &annotations) {
                Ok(p) => (p.cloned(), Ok(())),
                Err(e) => (None, Err(e.to_string())),
            },
        };
        let opt_in = spec::opt_in(
            Some(&labels),
            Some(&annotations),
            policies.namespace_opted_in(namespace),
            policy.as_ref().is_some_and(Policy::has_steps),
        );
        // Only a Deployment that takes part is governed (fledge's own canary, opted out, is not).
        let policy = policy.filter(|_| opt_in != OptIn::Disabled);
        let policy_missing = fixed.is_some()
            && policy
                .as_ref()
                .is_some_and(|p| !policies.policies.iter().any(|live| live.id == p.id));
        let (spec, invalid) = match (opt_in, selection) {
            (OptIn::Enabled, Err(why)) => (None, Some(why)),
            (OptIn::Enabled, Ok(())) => match policy::resolve(&name, &annotations, policy.as_ref())
            {
                Ok(spec) => (Some(spec), None),
                Err(e) => (None, Some(e.to_string())),
            },
            (OptIn::Disabled | OptIn::WithoutSteps, _) => (None, None),
        };
        let own_deadline = deployment["spec"]["progressDeadlineSeconds"].as_u64();
        // Kubernetes defaults every Deployment's deadline to 600 s, so a policy's deadline applies
        // to those that keep the default, and one the user chose wins.
        let progress_deadline = match (
            own_deadline,
            spec.as_ref().and_then(|s| s.progress_deadline),
        ) {
            (None | Some(DEFAULT_PROGRESS_DEADLINE), Some(policy)) => policy,
            (own, _) => Duration::from_secs(own.unwrap_or(DEFAULT_PROGRESS_DEADLINE)),
        };
        DeploymentFacts {
            router: spec
                .as_ref()
                .map_or_else(|| Router::of(&annotations), |s| s.router.clone()),
            spec,
            invalid,
            template_hash,
            stable_hash,
            held: annotations
                .get(ANNOTATION_HOLD)
                .is_some_and(|v| v == "true"),
            paused: deployment["spec"]["paused"].as_bool() == Some(true),
            stable_replicas: deployment["spec"]["replicas"].as_u64().unwrap_or(1),
            progress_deadline,
            rolled_out: rolled_out(deployment),
            state,
            policy,
            policy_missing,
            name,
        }
    }

    /// The template waiting to be canaried, if any.
    pub fn pending(&self) -> Option<&str> {
        self.stable_hash
            .as_deref()
            .filter(|stable| *stable != self.template_hash)
            .map(|_| self.template_hash.as_str())
    }

    /// fledge's hold record is on the Deployment although nothing is pending for fledge (it left
    /// fledge, or the template was reverted while the webhook was not called): it must be released.
    pub fn needs_release(&self) -> bool {
        (self.held || self.stable_hash.is_some())
            && (self.spec.is_none() || self.pending().is_none())
    }

    /// The observation for the state machine, given the canary Deployment (if it exists) and the
    /// canary's ReplicaSets.
    pub fn observation<'a>(
        &'a self,
        canary: Option<&Value>,
        replicasets: &[Value],
    ) -> Observation<'a> {
        Observation {
            name: &self.name,
            spec: self.spec.as_ref(),
            template_hash: &self.template_hash,
            stable_hash: self.stable_hash.as_deref(),
            held: self.held,
            stable_replicas: self.stable_replicas,
            progress_deadline: self.progress_deadline,
            // The canary always runs `spec.template`: held, or being rolled out by the promotion.
            canary: canary_status(canary, Some(&self.template_hash), replicasets),
            stable_rolled_out: self.rolled_out,
            policy: self.policy.as_ref(),
            policy_missing: self.policy_missing,
        }
    }
}

/// The identity of the Deployment's `spec.template`, also when [`trim_for_cache`] kept only that.
fn template_hash(deployment: &Value) -> String {
    match deployment["spec"][TRIMMED_TEMPLATE_HASH].as_str() {
        Some(hash) => hash.to_owned(),
        None => template::of_deployment(deployment)
            .map(template::hash)
            .unwrap_or_default(),
    }
}

/// Drops from a Deployment what the controller never reads, before its cache keeps it: with
/// 10,000 Deployments the cache is most of the controller's memory.
/// - `metadata.managedFields` and `kubectl apply`'s last-applied copy;
/// - of the status, all but the counts [`rolled_out`] reads;
/// - the pod template and the rest of the spec but for what [`DeploymentFacts::read`] reads, when
///   fledge has nothing recorded on the Deployment (no hold record, no rollout state): only the
///   template's hash is kept. A template change reaches fledge through the webhook,
///   which records the hold in the same write, so the cache keeps the template of every
///   Deployment with a canary to make. Without that record nothing is pending
///   ([`DeploymentFacts::pending`]), whatever the template.
///
/// [`DeploymentFacts::read`] gives the same facts for the trimmed Deployment as for the whole one.
pub fn trim_for_cache(deployment: &mut DynamicObject) {
    let meta = &mut deployment.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    if let Some(status) = deployment
        .data
        .get_mut("status")
        .and_then(Value::as_object_mut)
    {
        status.retain(|key, _| ROLLOUT_COUNTS.contains(&key.as_str()));
    }
    let recorded = meta
        .annotations
        .as_ref()
        .is_some_and(|a| FLEDGE_ANNOTATIONS.iter().any(|key| a.contains_key(*key)));
    if recorded {
        return;
    }
    if let Some(spec) = deployment
        .data
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        && let Some(template) = spec.remove("template")
    {
        // The rest of the spec (selector, strategy …) only matters for a canary to make.
        spec.retain(|key, _| AT_REST_SPEC.contains(&key.as_str()));
        spec.insert(
            TRIMMED_TEMPLATE_HASH.to_owned(),
            Value::String(template::hash(&template)),
        );
    }
}

/// Drops from a ReplicaSet's metadata what the controller never reads before its cache keeps it:
/// of its labels and annotations only `pod-template-hash` and the revision stay
/// ([`stable_pod_template_hash`] reads them, with the ownerReferences).
pub fn trim_replicaset_for_cache(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|key, _| key == POD_TEMPLATE_HASH);
    }
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == REVISION);
    }
}

fn string_map(value: &Value) -> std::collections::BTreeMap<String, String> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

fn count(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or(0)
}

/// The Deployment controller has seen the latest spec and every replica is updated and available,
/// with no old ones left: what `kubectl rollout status` waits for.
pub fn rolled_out(deployment: &Value) -> bool {
    let status = &deployment["status"];
    let wanted = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    let generation = deployment["metadata"]["generation"].as_u64().unwrap_or(0);
    status["observedGeneration"].as_u64().unwrap_or(0) >= generation
        && count(status, "updatedReplicas") == wanted
        && count(status, "replicas") == wanted
        && count(status, "availableReplicas") == wanted
}

/// The canary Deployment's status for the pending template. Available pods are counted on the
/// canary's ReplicaSets whose pod template carries the pending hash: a Deployment's own status lags
/// behind every change of its spec (even a scale-up), which would read as "no ready pod".
pub fn canary_status(
    canary: Option<&Value>,
    pending_hash: Option<&str>,
    replicasets: &[Value],
) -> CanaryStatus {
    let (Some(canary), Some(pending)) = (canary, pending_hash) else {
        return CanaryStatus::default();
    };
    let uid = canary["metadata"]["uid"].as_str();
    let ready_replicas = replicasets
        .iter()
        .filter(|rs| uid.is_some() && owned_by(rs, uid))
        .filter(|rs| {
            rs["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CANARY_HASH] == pending
        })
        .map(|rs| count(&rs["status"], "availableReplicas"))
        .sum();
    let current = canary["metadata"]["annotations"][ANNOTATION_CANARY_HASH] == pending;
    CanaryStatus {
        available: current && rolled_out(canary),
        ready_replicas,
    }
}

fn owned_by(object: &Value, uid: Option<&str>) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["uid"].as_str() == uid && o["controller"] == true)
}

/// `pod-template-hash` of the ReplicaSet that runs the Deployment's current template: the one owned
/// by it with the Deployment's own revision.
pub fn stable_pod_template_hash(deployment: &Value, replicasets: &[Value]) -> Option<String> {
    let uid = deployment["metadata"]["uid"].as_str()?;
    let revision = deployment["metadata"]["annotations"][REVISION].as_str()?;
    replicasets
        .iter()
        .filter(|rs| owned_by(rs, Some(uid)))
        .find(|rs| rs["metadata"]["annotations"][REVISION] == revision)
        .and_then(|rs| rs["metadata"]["labels"][POD_TEMPLATE_HASH].as_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({
            "metadata": {
                "name": "web", "uid": "u1", "generation": 4,
                "labels": {"fledge.dev/enabled": "true"},
                "annotations": {
                    "fledge.dev/steps": "- setWeight: 5",
                    ANNOTATION_STABLE_HASH: "c1",
                    ANNOTATION_HOLD: "true",
                    REVISION: "3",
                },
            },
            "spec": {"replicas": 4, "paused": true, "progressDeadlineSeconds": 120, "template": {"spec": {"containers": []}}},
            "status": {"observedGeneration": 4, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 4},
        })
    }

    fn canary(hash: &str, generation: u64, observed: u64, updated: u64, available: u64) -> Value {
        json!({
            "metadata": {"name": "web-canary", "uid": "c-uid", "generation": generation, "annotations": {ANNOTATION_CANARY_HASH: hash}},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": observed, "replicas": 2, "updatedReplicas": updated, "availableReplicas": available},
        })
    }

    fn canary_rs(owner: &str, hash: &str, available: u64) -> Value {
        json!({
            "metadata": {"ownerReferences": [{"uid": owner, "controller": true}]},
            "spec": {"template": {"metadata": {"annotations": {ANNOTATION_CANARY_HASH: hash}}}},
            "status": {"availableReplicas": available},
        })
    }

    #[test]
    fn facts_of_an_opted_in_deployment() {
        let facts = crate::core::builders::mk_facts(&deployment());
        assert_eq!(facts.spec.as_ref().unwrap().steps.len(), 1);
        let template_hash = template::hash(&json!({"spec": {"containers": []}}));
        assert_eq!(facts.template_hash, template_hash);
        assert_eq!(facts.stable_hash.as_deref(), Some("c1"));
        assert_eq!(facts.pending(), Some(template_hash.as_str()));
        assert!(facts.held && facts.paused && !facts.needs_release());
        assert_eq!(
            (facts.stable_replicas, facts.progress_deadline),
            (4, Duration::from_secs(120))
        );
        assert!(facts.rolled_out);
        assert!(matches!(facts.state, Ok(None)));
        let o = facts.observation(
            Some(&canary(&template_hash, 1, 1, 2, 2)),
            &[canary_rs("c-uid", &template_hash, 2)],
        );
        assert_eq!(
            o.canary,
            CanaryStatus {
                available: true,
                ready_replicas: 2
            }
        );
    }

    #[test]
    fn invalid_or_absent_settings_are_not_used() {
        let mut d = deployment();
        d["metadata"]["annotations"]["fledge.dev/steps"] = json!("- setWeight: 150");
        let facts = crate::core::builders::mk_facts(&d);
        assert!(facts.spec.is_none());
        assert!(
            facts
                .invalid
                .unwrap()
                .contains("150 is not between 0 and 100")
        );
        d["metadata"]["labels"] = json!({});
        let facts = crate::core::builders::mk_facts(&d);
        assert!(facts.spec.is_none() && facts.invalid.is_none());
        // Out of fledge with the hold record still there: it must be released.
        assert!(facts.needs_release());
    }

    #[test]
    fn defaults_follow_kubernetes() {
        let mut d = deployment();
        d["spec"]
            .as_object_mut()
            .unwrap()
            .remove("progressDeadlineSeconds");
        d["spec"].as_object_mut().unwrap().remove("replicas");
        let facts = crate::core::builders::mk_facts(&d);
        assert_eq!(
            (facts.stable_replicas, facts.progress_deadline),
            (1, Duration::from_secs(600))
        );
    }

    #[test]
    fn rollout_is_complete_only_when_everything_caught_up() {
        let mut d = deployment();
        assert!(rolled_out(&d));
        d["status"]["observedGeneration"] = json!(3);
        assert!(!rolled_out(&d));
        let mut d = deployment();
        d["status"]["replicas"] = json!(5); // an old pod still terminating
        assert!(!rolled_out(&d));
        let mut d = deployment();
        d["status"]["availableReplicas"] = json!(3);
        assert!(!rolled_out(&d));
    }

    #[test]
    fn canary_pods_are_counted_per_template_on_its_replicasets() {
        let sets = [
            canary_rs("c-uid", "c2", 2),
            canary_rs("c-uid", "c1", 3),
            canary_rs("other", "c2", 5),
        ];
        assert_eq!(
            canary_status(None, Some("c2"), &sets),
            CanaryStatus::default()
        );
        assert_eq!(
            canary_status(Some(&canary("c2", 1, 1, 2, 2)), None, &sets),
            CanaryStatus::default()
        );
        // Pods of an earlier canary template, or of another owner, are not the canary's.
        assert_eq!(
            canary_status(Some(&canary("c2", 1, 1, 2, 2)), Some("c2"), &sets),
            CanaryStatus {
                available: true,
                ready_replicas: 2
            }
        );
        // A scale-up: the Deployment's status lags, its pods keep serving.
        assert_eq!(
            canary_status(Some(&canary("c2", 2, 1, 2, 2)), Some("c2"), &sets),
            CanaryStatus {
                available: false,
                ready_replicas: 2
            }
        );
        // The canary Deployment still runs an earlier template.
        assert_eq!(
            canary_status(Some(&canary("c1", 1, 1, 2, 2)), Some("c2"), &sets[1..2]),
            CanaryStatus {
                available: false,
                ready_replicas: 0
            }
        );
    }

    #[test]
    fn the_stable_replicaset_is_the_one_of_the_current_revision() {
        let rs = |hash: &str, revision: &str, owner: &str| {
            json!({"metadata": {
                "labels": {"pod-template-hash": hash},
                "annotations": {REVISION: revision},
                "ownerReferences": [{"uid": owner, "controller": true}],
            }})
        };
        let sets = vec![
            rs("old", "2", "u1"),
            rs("cur", "3", "u1"),
            rs("other", "3", "u9"),
        ];
        assert_eq!(
            stable_pod_template_hash(&deployment(), &sets).as_deref(),
            Some("cur")
        );
        assert_eq!(stable_pod_template_hash(&deployment(), &sets[..1]), None);
    }

    /// Every shape the controller meets: settled, held, in flight, aborted, opted out, without
    /// settings, applied by kubectl, with the Deployment controller's conditions.
    fn shapes() -> Vec<Value> {
        use crate::core::builders::{mk_deployment, mk_held, mk_state, with_annotation};
        use crate::core::rollout::Phase;
        use crate::core::spec::{ANNOTATION_STATE, LABEL_ENABLED, Weight};
        let state = |phase| {
            serde_json::to_string(&mk_state(
                phase,
                &crate::core::builders::mk_hash("web:2"),
                2,
                Weight::from_basis_points(500).unwrap_or_default(),
            ))
            .unwrap_or_default()
        };
        let mut shapes = vec![
            mk_deployment("web:1"),
            mk_held("web:1", "web:2"),
            with_annotation(
                mk_held("web:1", "web:2"),
                ANNOTATION_STATE,
                &state(Phase::Progressing),
            ),
            with_annotation(
                mk_held("web:1", "web:2"),
                ANNOTATION_STATE,
                &state(Phase::Aborted),
            ),
            with_annotation(
                mk_deployment("web:2"),
                ANNOTATION_STATE,
                &state(Phase::Promoting),
            ),
            with_annotation(mk_deployment("web:1"), ANNOTATION_STATE, "{not json"),
        ];
        let mut opted_out = mk_deployment("web:1");
        opted_out["metadata"]["labels"][LABEL_ENABLED] = json!("false");
        shapes.push(opted_out);
        let mut bare = mk_deployment("web:1");
        bare["metadata"]["annotations"] = json!({});
        bare["metadata"]["labels"] = json!({"app": "web"});
        shapes.push(bare);
        for mut d in shapes.clone() {
            d["metadata"]["managedFields"] = json!([{"manager": "kubectl", "operation": "Update"}]);
            d["metadata"]["annotations"][LAST_APPLIED] = json!(d.to_string());
            d["metadata"]["annotations"][REVISION] = json!("3");
            d["status"] = json!({
                "observedGeneration": 3, "replicas": 4, "updatedReplicas": 4,
                "readyReplicas": 4, "availableReplicas": 4,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
            });
            shapes.push(d);
        }
        shapes
    }

    fn trimmed(deployment: &Value) -> Value {
        let mut cached: DynamicObject = serde_json::from_value(deployment.clone()).unwrap();
        trim_for_cache(&mut cached);
        serde_json::to_value(cached).unwrap()
    }

    #[test]
    fn a_trimmed_deployment_reads_as_the_whole_one() {
        let policies = PolicySnapshot::default();
        for whole in shapes() {
            let trimmed = trimmed(&whole);
            let (a, b) = (
                DeploymentFacts::read(&whole, &policies),
                DeploymentFacts::read(&trimmed, &policies),
            );
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{whole}");
            assert_eq!(
                format!("{:?}", a.observation(None, &[])),
                format!("{:?}", b.observation(None, &[]))
            );
            assert_eq!(
                stable_pod_template_hash(&whole, &[]),
                stable_pod_template_hash(&trimmed, &[])
            );
            assert_eq!(
                self::trimmed(&trimmed),
                trimmed,
                "trimming twice changes nothing"
            );
            assert!(trimmed["metadata"].get("managedFields").is_none());
            assert!(
                trimmed["metadata"]["annotations"]
                    .get(LAST_APPLIED)
                    .is_none()
            );
            assert!(trimmed["status"].get("conditions").is_none());
            assert!(trimmed["status"].get("readyReplicas").is_none());
        }
    }

    #[test]
    fn only_a_deployment_without_fledges_record_loses_its_template() {
        for whole in shapes() {
            let trimmed = trimmed(&whole);
            let recorded = FLEDGE_ANNOTATIONS
                .iter()
                .any(|k| whole["metadata"]["annotations"].get(k).is_some());
            assert_eq!(
                trimmed["spec"].get("template") == whole["spec"].get("template"),
                recorded,
                "{whole}"
            );
            assert_eq!(
                trimmed["spec"].get(TRIMMED_TEMPLATE_HASH).is_some(),
                !recorded
            );
        }
    }

    #[test]
    fn a_trimmed_replicaset_still_names_the_stable_pod_template_hash() {
        let mut deployment = deployment();
        deployment["metadata"]["annotations"][REVISION] = json!("3");
        let mut rs = json!({
            "metadata": {
                "name": "web-abc", "namespace": "shop", "uid": "r1",
                "labels": {"app": "web", POD_TEMPLATE_HASH: "abc"},
                "annotations": {REVISION: "3", "deployment.kubernetes.io/desired-replicas": "4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u1", "controller": true}],
                "managedFields": [{"manager": "kube-controller-manager"}],
            }
        });
        let mut meta: ObjectMeta = serde_json::from_value(rs["metadata"].clone()).unwrap();
        trim_replicaset_for_cache(&mut meta);
        rs["metadata"] = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            stable_pod_template_hash(&deployment, &[rs.clone()]).as_deref(),
            Some("abc")
        );
        assert_eq!(rs["metadata"]["labels"], json!({POD_TEMPLATE_HASH: "abc"}));
        assert_eq!(rs["metadata"]["annotations"], json!({REVISION: "3"}));
        assert!(rs["metadata"].get("managedFields").is_none());
    }
}
