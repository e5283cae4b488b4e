//! The webhook's decision: a pure function from an AdmissionRequest to allow, allow with a JSONPatch,
//! or deny. The HTTPS server and `fledge plan` both call [`decide`].
//!
//! Objects are `DynamicObject`s, not typed `Deployment`s, on purpose: typed deserialization drops
//! fields its Kubernetes version does not know, and a patch built from such a value would silently
//! strip them from the user's template. Templates are moved around as the raw JSON the API server sent.
//!
//! The decision has no side effects and depends only on the request, so dry-run requests, retries and
//! reinvocation (the API server calling again on the webhook's own output) all get consistent answers.

use std::collections::BTreeMap;
use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use kube::core::admission::{AdmissionRequest, Operation};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::core::rollout::{self, Phase};
use crate::core::spec::{self, ANNOTATION_CANARY_HASH, ANNOTATION_CANARY_TEMPLATE, OptIn};
use crate::core::template;

pub mod review;
pub use review::DeploymentView;

/// The API server rejects objects whose annotations add up to more than this (keys plus values).
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// What the webhook answers, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// Shown by kubectl as `Warning: …`.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Allow(AllowReason),
    Patch(PatchReason, Patch),
    Deny(String),
}

/// Why a request passes unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowReason {
    NotADeployment,
    OperationNotWatched,
    NotOptedIn,
    NoSteps,
    FirstDeploy,
    TemplateUnchanged,
    Promotion,
}

/// Why a request is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchReason {
    /// A new template becomes the pending canary; the stable template stays.
    NewCanary,
    /// The template of the pending canary was applied again.
    SameCanary,
    /// The template of an aborted canary was applied again: it stays aborted.
    AbortedKept,
    /// A created Deployment carried fledge's state from elsewhere (a copy or a backup).
    StaleStateRemoved,
}

impl Outcome {
    /// `allow`, `patch` or `deny`: the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Allow(_) => "allow",
            Outcome::Patch(..) => "patch",
            Outcome::Deny(_) => "deny",
        }
    }
}

impl fmt::Display for AllowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllowReason::NotADeployment => "not an apps/v1 Deployment: fledge leaves it alone",
            AllowReason::OperationNotWatched => "only CREATE and UPDATE concern fledge",
            AllowReason::NotOptedIn => {
                "no fledge.dev/enabled=\"true\" label: fledge leaves it alone"
            }
            AllowReason::NoSteps => {
                "no fledge.dev/steps: changes roll out as a plain Deployment update"
            }
            AllowReason::FirstDeploy => {
                "first deploy: there is no stable version to canary against"
            }
            AllowReason::TemplateUnchanged => "the pod template did not change",
            AllowReason::Promotion => "fledge's own promotion of the canary template",
        })
    }
}

impl fmt::Display for PatchReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchReason::NewCanary => {
                "new pod template: it becomes the pending canary; the stable template keeps running"
            }
            PatchReason::SameCanary => {
                "the pending canary's template again: nothing new, the stable template stays"
            }
            PatchReason::AbortedKept => {
                "this template's canary was aborted: it stays aborted, the stable template stays"
            }
            PatchReason::StaleStateRemoved => {
                "fledge state copied from another Deployment is removed"
            }
        })
    }
}

impl Decision {
    fn allow(reason: AllowReason) -> Decision {
        Decision {
            outcome: Outcome::Allow(reason),
            warnings: Vec::new(),
        }
    }

    fn deny(message: impl Into<String>) -> Decision {
        Decision {
            outcome: Outcome::Deny(message.into()),
            warnings: Vec::new(),
        }
    }

    fn patch(reason: PatchReason, ops: Vec<PatchOperation>, warning: Option<String>) -> Decision {
        Decision {
            outcome: Outcome::Patch(reason, Patch(ops)),
            warnings: warning.into_iter().collect(),
        }
    }
}

/// Decides one admission request for a Deployment.
pub fn decide(req: &AdmissionRequest<DeploymentView>) -> Decision {
    if req.kind.group != "apps" || req.kind.kind != "Deployment" {
        return Decision::allow(AllowReason::NotADeployment);
    }
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Decision::allow(AllowReason::OperationNotWatched);
    }
    let Some(object) = &req.object else {
        return Decision::deny("request.object is missing from the AdmissionReview");
    };
    let meta = &object.metadata;
    let opt_in = spec::opt_in(meta.labels.as_ref(), meta.annotations.as_ref());
    match opt_in {
        OptIn::Disabled => return Decision::allow(AllowReason::NotOptedIn),
        OptIn::WithoutSteps => {
            return Decision {
                outcome: Outcome::Allow(AllowReason::NoSteps),
                warnings: vec![format!(
                    "{} is set but {} is missing: fledge will not canary this Deployment",
                    spec::LABEL_ENABLED,
                    spec::ANNOTATION_STEPS
                )],
            };
        }
        OptIn::Enabled => {}
    }
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let name = meta.name.as_deref().unwrap_or(&req.name);
    if name.is_empty() {
        return Decision::deny(
            "metadata.name: fledge names the canary's objects after the Deployment; set metadata.name (generateName is not supported)",
        );
    }
    let templates = match &req.old_object {
        Some(old) if req.operation == Operation::Update => {
            match TemplateChange::between(old.template(), object.template()) {
                Ok(change) => Some((old, change)),
                Err(e) => return Decision::deny(e),
            }
        }
        _ => None,
    };
    // Ratcheting, as Kubernetes does for its own fields: an update that changes neither the
    // template nor fledge's settings is not refused for settings that were already there.
    if let Some((old, TemplateChange::Unchanged)) = &templates
        && spec::opt_in(
            old.metadata.labels.as_ref(),
            old.metadata.annotations.as_ref(),
        ) == OptIn::Enabled
        && user_settings(old.metadata.annotations.as_ref()) == user_settings(Some(annotations))
    {
        return Decision::allow(AllowReason::TemplateUnchanged);
    }
    if let Err(e) = spec::parse(name, annotations) {
        return Decision::deny(e.to_string());
    }
    match (&req.operation, templates) {
        (Operation::Create, _) => decide_create(annotations),
        (_, Some((_, TemplateChange::Unchanged))) => {
            Decision::allow(AllowReason::TemplateUnchanged)
        }
        (
            _,
            Some((
                old,
                TemplateChange::Changed {
                    old_template,
                    new_template,
                    new_raw,
                },
            )),
        ) => decide_template_change(name, old, annotations, old_template, &new_template, new_raw),
        (_, None) => Decision::deny("request.oldObject is missing from an UPDATE AdmissionReview"),
    }
}

/// The `fledge.dev/*` annotations a user sets (anything but fledge's own bookkeeping).
fn user_settings(annotations: Option<&BTreeMap<String, String>>) -> Vec<(&String, &String)> {
    annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            k.starts_with(spec::PREFIX) && !spec::FLEDGE_ANNOTATIONS.contains(&k.as_str())
        })
        .collect()
}

/// How the pod template differs between the stored and the incoming Deployment.
enum TemplateChange<'r> {
    Unchanged,
    Changed {
        old_template: Value,
        new_template: Value,
        new_raw: &'r RawValue,
    },
}

impl<'r> TemplateChange<'r> {
    fn between(old: Option<&RawValue>, new: Option<&'r RawValue>) -> Result<Self, String> {
        let (Some(old), Some(new)) = (old, new) else {
            return Err("spec.template is missing from the Deployment".to_owned());
        };
        // The API server encodes both objects the same way, so equal text is the common fast path;
        // otherwise compare as JSON, where key order does not matter.
        if old.get() == new.get() {
            return Ok(TemplateChange::Unchanged);
        }
        let parse = |raw: &RawValue, which: &str| {
            serde_json::from_str::<Value>(raw.get())
                .map_err(|e| format!("{which}.spec.template cannot be read: {e}"))
        };
        let old_template = parse(old, "oldObject")?;
        let new_template = parse(new, "object")?;
        Ok(if old_template == new_template {
            TemplateChange::Unchanged
        } else {
            TemplateChange::Changed {
                old_template,
                new_template,
                new_raw: new,
            }
        })
    }
}

fn decide_create(annotations: &BTreeMap<String, String>) -> Decision {
    let ops: Vec<PatchOperation> = spec::FLEDGE_ANNOTATIONS
        .iter()
        .filter(|key| annotations.contains_key(**key))
        .map(|key| {
            PatchOperation::Remove(RemoveOperation {
                path: annotation_path(key),
            })
        })
        .collect();
    if ops.is_empty() {
        Decision::allow(AllowReason::FirstDeploy)
    } else {
        Decision::patch(PatchReason::StaleStateRemoved, ops, None)
    }
}

fn decide_template_change(
    name: &str,
    old: &DeploymentView,
    annotations: &BTreeMap<String, String>,
    old_template: Value,
    new_template: &Value,
    new_raw: &RawValue,
) -> Decision {
    let hash = template::hash(new_template);
    // The stored (old) state is authoritative: the incoming object may have dropped fledge's
    // annotations (`kubectl replace`), and only the controller writes them.
    let state = match rollout::read_state(old.metadata.annotations.as_ref()) {
        Ok(state) => state,
        Err(e) => return Decision::deny(e.to_string()),
    };
    let state_is = |phase: Phase| {
        state
            .as_ref()
            .is_some_and(|s| s.phase == phase && s.hash == hash)
    };
    if state_is(Phase::Promoting) {
        return Decision::allow(AllowReason::Promotion);
    }
    let keep_stable = PatchOperation::Replace(ReplaceOperation {
        path: PointerBuf::from_tokens(["spec", "template"]),
        value: old_template,
    });
    if state_is(Phase::Aborted) {
        let warning = format!(
            "fledge: the canary of this pod template ({hash}) was aborted; the stable template keeps running. \
             Change the template, or run `fledge retry {name}` to try it again"
        );
        return Decision::patch(PatchReason::AbortedKept, vec![keep_stable], Some(warning));
    }
    let warning = format!(
        "fledge: the new pod template ({hash}) is the pending canary; the stable template keeps running until promotion"
    );
    let recorded = annotations.get(ANNOTATION_CANARY_HASH) == Some(&hash)
        && annotations.contains_key(ANNOTATION_CANARY_TEMPLATE);
    if recorded {
        return Decision::patch(PatchReason::SameCanary, vec![keep_stable], Some(warning));
    }
    // The template is recorded as the API server sent it: nothing in it is lost or reordered.
    let template_json = new_raw.get().to_owned();
    let size_after: usize = annotations
        .iter()
        .filter(|(k, _)| *k != ANNOTATION_CANARY_TEMPLATE && *k != ANNOTATION_CANARY_HASH)
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + ANNOTATION_CANARY_TEMPLATE.len()
        + template_json.len()
        + ANNOTATION_CANARY_HASH.len()
        + hash.len();
    if size_after > MAX_ANNOTATIONS_BYTES {
        return Decision::deny(format!(
            "spec.template: fledge records the pending canary template ({} bytes) in annotation {ANNOTATION_CANARY_TEMPLATE}, \
             and the annotations would then total {size_after} bytes, over Kubernetes' limit of {MAX_ANNOTATIONS_BYTES}; \
             make the pod template smaller (e.g. move large values into a ConfigMap)",
            template_json.len()
        ));
    }
    let ops = vec![
        keep_stable,
        set_annotation(ANNOTATION_CANARY_TEMPLATE, template_json),
        set_annotation(ANNOTATION_CANARY_HASH, hash),
    ];
    Decision::patch(PatchReason::NewCanary, ops, Some(warning))
}

/// `/metadata/annotations/<key>`, with `/` and `~` in the key escaped per RFC 6901.
fn annotation_path(key: &str) -> PointerBuf {
    PointerBuf::from_tokens(["metadata", "annotations", key])
}

fn set_annotation(key: &str, value: String) -> PatchOperation {
    // `add` on an existing member replaces it (RFC 6902 §4.1), so this works either way.
    PatchOperation::Add(AddOperation {
        path: annotation_path(key),
        value: Value::String(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rollout::RolloutState;
    use crate::core::spec::{ANNOTATION_STATE, ANNOTATION_STEPS, LABEL_ENABLED, Weight};
    use serde_json::json;

    const STEPS: &str = "- setWeight: 5\n- pause: {duration: 2m}\n- setWeight: 50\n- pause: {}\n";

    /// A Deployment `web` as the API server sends it, with `image` in its one container.
    fn deployment(image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "6b1c7a0e-0d6c-4d59-9b0e-2b0c7f8a4e11",
                "resourceVersion": "1200",
                "generation": 3,
                "labels": {"app": "web", LABEL_ENABLED: "true"},
                "annotations": {ANNOTATION_STEPS: STEPS},
            },
            "spec": {
                "replicas": 4,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}]}]}
                }
            }
        })
    }

    fn with_annotation(mut object: Value, key: &str, value: &str) -> Value {
        object["metadata"]["annotations"][key] = json!(value);
        object
    }

    fn with_state(object: Value, phase: Phase, hash: &str) -> Value {
        let state = RolloutState {
            phase,
            hash: hash.into(),
            step: 1,
            weight: Weight::from_basis_points(500).unwrap(),
            message: String::new(),
            step_started: None,
            unavailable_since: None,
        };
        with_annotation(
            object,
            ANNOTATION_STATE,
            &serde_json::to_string(&state).unwrap(),
        )
    }

    fn without_label(mut object: Value) -> Value {
        object["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove(LABEL_ENABLED);
        object
    }

    fn template_hash(object: &Value) -> String {
        template::hash(&object["spec"]["template"])
    }

    fn request(
        operation: &str,
        object: Value,
        old: Option<Value>,
    ) -> AdmissionRequest<DeploymentView> {
        let mut review = review::deployment_review(
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            "alice",
            &object,
            old.as_ref(),
        );
        review["request"]["operation"] = json!(operation);
        review::parse(&serde_json::to_vec(&review).unwrap()).unwrap()
    }

    fn update(old: Value, new: Value) -> AdmissionRequest<DeploymentView> {
        request("UPDATE", new, Some(old))
    }

    /// The object the API server stores after applying the decision's patch.
    fn apply(req: &AdmissionRequest<DeploymentView>, decision: &Decision) -> Value {
        let mut object = serde_json::to_value(req.object.as_ref().unwrap()).unwrap();
        if let Outcome::Patch(_, patch) = &decision.outcome {
            json_patch::patch(&mut object, patch).unwrap();
        }
        object
    }

    fn reason(d: &Decision) -> String {
        match &d.outcome {
            Outcome::Allow(r) => format!("allow: {r:?}"),
            Outcome::Patch(r, _) => format!("patch: {r:?}"),
            Outcome::Deny(m) => format!("deny: {m}"),
        }
    }

    /// Applies the decision, then asks again about the result (as reinvocation does): nothing more changes.
    fn assert_reinvocation_is_a_no_op(req: &AdmissionRequest<DeploymentView>) -> Value {
        let decision = decide(req);
        let once = apply(req, &decision);
        let again = request(
            "UPDATE",
            once.clone(),
            req.old_object
                .as_ref()
                .map(|o| serde_json::to_value(o).unwrap()),
        );
        let second = decide(&again);
        let twice = apply(&again, &second);
        assert_eq!(
            once,
            twice,
            "second pass changed the object: {}",
            reason(&second)
        );
        once
    }

    #[test]
    fn create_of_a_valid_opted_in_deployment_passes_unchanged() {
        let d = decide(&request("CREATE", deployment("web:1"), None));
        assert_eq!(d.outcome, Outcome::Allow(AllowReason::FirstDeploy));
    }

    #[test]
    fn create_with_invalid_steps_is_denied_with_the_place() {
        let object = with_annotation(
            deployment("web:1"),
            ANNOTATION_STEPS,
            "- setWeight: 5\n- pause: {}\n- setWeight: 150",
        );
        let d = decide(&request("CREATE", object, None));
        assert_eq!(
            d.outcome,
            Outcome::Deny("fledge.dev/steps[2].setWeight: 150 is not between 0 and 100".into())
        );
    }

    #[test]
    fn create_drops_fledge_state_copied_from_elsewhere() {
        let object = with_state(
            with_annotation(deployment("web:1"), ANNOTATION_CANARY_HASH, "x"),
            Phase::Paused,
            "x",
        );
        let req = request("CREATE", object, None);
        let d = decide(&req);
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::StaleStateRemoved, _)),
            "{}",
            reason(&d)
        );
        let result = apply(&req, &d);
        let annotations = result["metadata"]["annotations"].as_object().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            vec![ANNOTATION_STEPS]
        );
    }

    #[test]
    fn template_change_keeps_stable_and_records_the_canary() {
        let old = deployment("web:1");
        let new = deployment("web:2");
        let req = update(old.clone(), new.clone());
        let d = decide(&req);
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::NewCanary, _)),
            "{}",
            reason(&d)
        );
        assert_eq!(d.warnings.len(), 1);
        let result = apply(&req, &d);
        assert_eq!(result["spec"]["template"], old["spec"]["template"]);
        let annotations = &result["metadata"]["annotations"];
        assert_eq!(
            annotations[ANNOTATION_CANARY_HASH],
            json!(template_hash(&new))
        );
        let recorded: Value =
            serde_json::from_str(annotations[ANNOTATION_CANARY_TEMPLATE].as_str().unwrap())
                .unwrap();
        assert_eq!(recorded, new["spec"]["template"]);
        assert_eq!(annotations[ANNOTATION_STEPS], json!(STEPS));
    }

    #[test]
    fn patch_paths_escape_annotation_keys_per_rfc6901() {
        let d = decide(&update(deployment("web:1"), deployment("web:2")));
        let Outcome::Patch(_, patch) = d.outcome else {
            panic!("{}", reason(&d))
        };
        let text = serde_json::to_value(&patch).unwrap();
        let paths: Vec<&str> = text
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            vec![
                "/spec/template",
                "/metadata/annotations/fledge.dev~1canary-template",
                "/metadata/annotations/fledge.dev~1canary-hash"
            ]
        );
        assert_eq!(
            annotation_path("a~b/c").to_string(),
            "/metadata/annotations/a~0b~1c"
        );
    }

    #[test]
    fn reinvocation_on_its_own_output_changes_nothing() {
        let req = update(deployment("web:1"), deployment("web:2"));
        let once = assert_reinvocation_is_a_no_op(&req);
        let again = update(deployment("web:1"), once);
        assert_eq!(
            decide(&again).outcome,
            Outcome::Allow(AllowReason::TemplateUnchanged)
        );
    }

    #[test]
    fn reapplying_the_pending_template_changes_nothing_further() {
        let first = update(deployment("web:1"), deployment("web:2"));
        let stored = apply(&first, &decide(&first));
        // The user applies v2 again: the merged object carries fledge's annotations and template v2.
        let mut reapplied = stored.clone();
        reapplied["spec"]["template"] = deployment("web:2")["spec"]["template"].clone();
        let req = update(stored.clone(), reapplied);
        let d = decide(&req);
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::SameCanary, _)),
            "{}",
            reason(&d)
        );
        assert_eq!(apply(&req, &d), stored);
        assert_reinvocation_is_a_no_op(&req);
    }

    #[test]
    fn a_different_template_during_a_canary_replaces_the_pending_one() {
        let first = update(deployment("web:1"), deployment("web:2"));
        let stored = with_state(
            apply(&first, &decide(&first)),
            Phase::Paused,
            &template_hash(&deployment("web:2")),
        );
        let mut v3 = stored.clone();
        v3["spec"]["template"] = deployment("web:3")["spec"]["template"].clone();
        let req = update(stored.clone(), v3);
        let d = decide(&req);
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::NewCanary, _)),
            "{}",
            reason(&d)
        );
        let result = apply(&req, &d);
        assert_eq!(
            result["spec"]["template"],
            deployment("web:1")["spec"]["template"]
        );
        assert_eq!(
            result["metadata"]["annotations"][ANNOTATION_CANARY_HASH],
            json!(template_hash(&deployment("web:3")))
        );
        // The controller sees canary-hash differ from state.hash and restarts at step 0.
        assert_ne!(
            result["metadata"]["annotations"][ANNOTATION_CANARY_HASH],
            json!(template_hash(&deployment("web:2")))
        );
        assert_reinvocation_is_a_no_op(&req);
    }

    #[test]
    fn reapplying_an_aborted_template_keeps_it_aborted() {
        let v2_hash = template_hash(&deployment("web:2"));
        let first = update(deployment("web:1"), deployment("web:2"));
        let stored = with_state(apply(&first, &decide(&first)), Phase::Aborted, &v2_hash);
        let mut reapplied = stored.clone();
        reapplied["spec"]["template"] = deployment("web:2")["spec"]["template"].clone();
        let req = update(stored.clone(), reapplied);
        let d = decide(&req);
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::AbortedKept, _)),
            "{}",
            reason(&d)
        );
        assert!(
            d.warnings[0].contains("fledge retry web"),
            "{:?}",
            d.warnings
        );
        assert_eq!(apply(&req, &d), stored);
        assert_reinvocation_is_a_no_op(&req);
        // A GitOps tool that also drops fledge's annotations (replace) cannot restart it either.
        let mut replaced = deployment("web:2");
        replaced["metadata"]["annotations"] = json!({ANNOTATION_STEPS: STEPS});
        let d = decide(&update(stored.clone(), replaced));
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::AbortedKept, _)),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn a_changed_template_after_an_abort_starts_a_new_canary() {
        let stored = with_state(
            deployment("web:1"),
            Phase::Aborted,
            &template_hash(&deployment("web:2")),
        );
        let mut v3 = stored.clone();
        v3["spec"]["template"] = deployment("web:3")["spec"]["template"].clone();
        let d = decide(&update(stored, v3));
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::NewCanary, _)),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn promotion_by_the_controller_passes() {
        let v2_hash = template_hash(&deployment("web:2"));
        let stored = with_state(deployment("web:1"), Phase::Promoting, &v2_hash);
        let mut promoted = stored.clone();
        promoted["spec"]["template"] = deployment("web:2")["spec"]["template"].clone();
        let d = decide(&update(stored.clone(), promoted));
        assert_eq!(d.outcome, Outcome::Allow(AllowReason::Promotion));
        // Promoting another template than the one in the state is not a promotion.
        let mut other = stored.clone();
        other["spec"]["template"] = deployment("web:3")["spec"]["template"].clone();
        let d = decide(&update(stored, other));
        assert!(
            matches!(d.outcome, Outcome::Patch(PatchReason::NewCanary, _)),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn other_changes_pass_untouched() {
        let old = deployment("web:1");
        let mut scaled = old.clone();
        scaled["spec"]["replicas"] = json!(10);
        scaled["metadata"]["labels"]["team"] = json!("shop");
        let scaled = with_annotation(scaled, "example.com/note", "hi");
        assert_eq!(
            decide(&update(old.clone(), scaled)).outcome,
            Outcome::Allow(AllowReason::TemplateUnchanged)
        );
        let plain = update(
            without_label(old.clone()),
            without_label(deployment("web:2")),
        );
        assert_eq!(
            decide(&plain).outcome,
            Outcome::Allow(AllowReason::NotOptedIn)
        );
    }

    #[test]
    fn opting_out_in_the_same_update_lets_the_template_through() {
        let d = decide(&update(
            deployment("web:1"),
            without_label(deployment("web:2")),
        ));
        assert_eq!(d.outcome, Outcome::Allow(AllowReason::NotOptedIn));
        let mut no_steps = deployment("web:2");
        no_steps["metadata"]["annotations"] = json!({});
        let d = decide(&update(deployment("web:1"), no_steps));
        assert_eq!(d.outcome, Outcome::Allow(AllowReason::NoSteps));
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn invalid_annotations_deny_updates_too() {
        let new = with_annotation(deployment("web:2"), "fledge.dev/stepz", "x");
        let d = decide(&update(deployment("web:1"), new));
        assert!(
            matches!(&d.outcome, Outcome::Deny(m) if m.starts_with("fledge.dev/stepz: unknown fledge annotation")),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn a_corrupt_state_annotation_is_named() {
        let stored = with_annotation(deployment("web:1"), ANNOTATION_STATE, "not json");
        let d = decide(&update(stored, deployment("web:2")));
        assert!(
            matches!(&d.outcome, Outcome::Deny(m) if m.starts_with("fledge.dev/state: cannot read")),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn dry_run_gets_the_same_decision() {
        let mut req = update(deployment("web:1"), deployment("web:2"));
        let wet = decide(&req);
        req.dry_run = true;
        assert_eq!(decide(&req), wet);
    }

    #[test]
    fn other_kinds_and_operations_pass() {
        let mut req = request("DELETE", deployment("web:1"), Some(deployment("web:1")));
        assert_eq!(
            decide(&req).outcome,
            Outcome::Allow(AllowReason::OperationNotWatched)
        );
        req.kind.kind = "StatefulSet".into();
        assert_eq!(
            decide(&req).outcome,
            Outcome::Allow(AllowReason::NotADeployment)
        );
    }

    #[test]
    fn missing_parts_are_denied_not_panicked_on() {
        let mut req = update(deployment("web:1"), deployment("web:2"));
        req.old_object = None;
        assert!(matches!(decide(&req).outcome, Outcome::Deny(m) if m.contains("oldObject")));
        let mut broken = deployment("web:2");
        broken["spec"].as_object_mut().unwrap().remove("template");
        assert!(
            matches!(decide(&update(deployment("web:1"), broken)).outcome, Outcome::Deny(m) if m.contains("spec.template"))
        );
        let mut req = update(deployment("web:1"), deployment("web:2"));
        req.object = None;
        assert!(matches!(decide(&req).outcome, Outcome::Deny(m) if m.contains("request.object")));
    }

    #[test]
    fn fields_unknown_to_fledge_survive_in_both_templates() {
        let mut old = deployment("web:1");
        old["spec"]["template"]["spec"]["futureField"] = json!({"keep": "stable"});
        let mut new = deployment("web:2");
        new["spec"]["template"]["spec"]["futureField"] = json!({"keep": "canary"});
        let req = update(old.clone(), new.clone());
        let result = apply(&req, &decide(&req));
        assert_eq!(result["spec"]["template"], old["spec"]["template"]);
        let recorded: Value = serde_json::from_str(
            result["metadata"]["annotations"][ANNOTATION_CANARY_TEMPLATE]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(recorded["spec"]["futureField"], json!({"keep": "canary"}));
    }

    #[test]
    fn templates_too_big_for_annotations_are_denied_clearly() {
        let mut new = deployment("web:2");
        new["spec"]["template"]["metadata"]["annotations"] =
            json!({"blob": "x".repeat(MAX_ANNOTATIONS_BYTES)});
        let d = decide(&update(deployment("web:1"), new));
        assert!(
            matches!(&d.outcome, Outcome::Deny(m) if m.starts_with("spec.template: fledge records the pending canary template")),
            "{}",
            reason(&d)
        );
    }

    #[test]
    fn settings_already_stored_are_not_revalidated_on_unrelated_updates() {
        // Ratcheting: a Deployment stored with bad steps (before the webhook was installed) can
        // still be scaled; any change to fledge's settings or the template is validated.
        let bad = with_annotation(deployment("web:1"), ANNOTATION_STEPS, "- setWeight: 150");
        let mut scaled = bad.clone();
        scaled["spec"]["replicas"] = json!(9);
        assert_eq!(
            decide(&update(bad.clone(), scaled)).outcome,
            Outcome::Allow(AllowReason::TemplateUnchanged)
        );
        let still_bad = with_annotation(bad.clone(), ANNOTATION_STEPS, "- setWeight: 151");
        assert!(matches!(
            decide(&update(bad.clone(), still_bad)).outcome,
            Outcome::Deny(_)
        ));
        let typo = with_annotation(bad.clone(), "fledge.dev/rootservice", "web");
        assert!(matches!(
            decide(&update(bad.clone(), typo)).outcome,
            Outcome::Deny(_)
        ));
        let newly_opted_in = update(without_label(bad.clone()), bad.clone());
        assert!(matches!(decide(&newly_opted_in).outcome, Outcome::Deny(_)));
        // fledge's own bookkeeping changes are not settings.
        let state_written = with_state(bad.clone(), Phase::Idle, "h");
        assert_eq!(
            decide(&update(bad, state_written)).outcome,
            Outcome::Allow(AllowReason::TemplateUnchanged)
        );
    }

    #[test]
    fn key_order_alone_is_not_a_template_change() {
        let old = deployment("web:1");
        let template = serde_json::to_string(&old["spec"]["template"]).unwrap();
        let spec_first = format!(
            r#"{{"spec":{},"metadata":{}}}"#,
            old["spec"]["template"]["spec"], old["spec"]["template"]["metadata"]
        );
        assert_ne!(template, spec_first);
        // The same template, its keys in another order.
        let body = serde_json::to_string(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
                "name": "web", "operation": "UPDATE", "userInfo": {},
                "object": {"metadata": old["metadata"], "spec": {"template": "NEW"}},
                "oldObject": old,
            }
        }))
        .unwrap()
        .replace(
            r#""template":"NEW""#,
            &format!(r#""template":{spec_first}"#),
        );
        let req = review::parse(body.as_bytes()).unwrap();
        assert_ne!(
            req.object.as_ref().unwrap().template().unwrap().get(),
            template
        );
        assert_eq!(
            decide(&req).outcome,
            Outcome::Allow(AllowReason::TemplateUnchanged)
        );
    }

    #[test]
    fn responses_carry_uid_patch_and_warnings() {
        let req = update(deployment("web:1"), deployment("web:2"));
        let d = decide(&req);
        let answer = |req: &AdmissionRequest<DeploymentView>, d: &Decision| -> Value {
            serde_json::from_slice(&review::answer(&req.types.api_version, &req.uid, d).unwrap())
                .unwrap()
        };
        let response = answer(&req, &d);
        let r = &response["response"];
        assert_eq!(r["uid"], json!("705ab4f5-6393-11e8-b7cc-42010a800002"));
        assert_eq!(r["allowed"], json!(true));
        assert_eq!(r["patchType"], json!("JSONPatch"));
        use base64::Engine as _;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let Outcome::Patch(_, expected) = &d.outcome else {
            panic!("{}", reason(&d))
        };
        assert_eq!(serde_json::from_slice::<Patch>(&patch).unwrap(), *expected);
        assert_eq!(r["warnings"].as_array().unwrap().len(), 1);
        assert_eq!(response["apiVersion"], json!("admission.k8s.io/v1"));
        assert_eq!(response["kind"], json!("AdmissionReview"));
        let denied = request(
            "CREATE",
            with_annotation(deployment("web:1"), ANNOTATION_STEPS, "nope"),
            None,
        );
        let response = answer(&denied, &decide(&denied));
        assert_eq!(response["response"]["allowed"], json!(false));
        assert_eq!(response["response"]["status"]["code"], json!(400));
        assert!(
            response["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with("fledge.dev/steps:")
        );
    }
}
