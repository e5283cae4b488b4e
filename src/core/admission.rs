//! The webhook's decision: a pure function from an AdmissionRequest to allow, allow with a JSONPatch,
//! or deny. The HTTPS server and `fledge plan` both call [`decide`].
//!
//! fledge never rewrites `spec.template`. A new pod template goes through exactly as the user
//! applied it, and the rollout is *held* with `spec.paused: true` (Kubernetes' own hold: no new
//! ReplicaSet, the stable pods keep running). Two annotations record the hold: `fledge.dev/hold`
//! (fledge, not the user, set `paused`) and `fledge.dev/stable-hash` (the template the stable pods
//! run). The controller runs the held template as the canary and unpauses at promotion; a template
//! equal to the stable one again is a revert.
//!
//! Objects are read lean ([`DeploymentView`]) and templates stay the raw JSON the API server sent:
//! typed deserialization would drop fields newer than fledge's Kubernetes version. The decision has
//! no side effects and depends only on the request, so dry-run requests, retries and reinvocation
//! (the API server calling again on the webhook's own output) all get the same answers.

use std::collections::BTreeMap;
use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation};
use kube::core::admission::Operation;
use serde_json::Value;

use crate::core::policy::{self, Policy, PolicySnapshot};
use crate::core::rollout::{self, Phase, RolloutState};
use crate::core::spec::{self, ANNOTATION_HOLD, ANNOTATION_STABLE_HASH, FLEDGE_ANNOTATIONS, OptIn};
use crate::core::template::Canonical;

pub mod review;
mod unread;
pub use review::{DeploymentView, ReviewRequest};

/// The field manager of fledge's own writes (the controller and the commands).
pub const FIELD_MANAGER: &str = "fledge";
/// The field manager `kubectl rollout resume` (and `pause`, `restart`, `undo`) writes with.
pub const KUBECTL_ROLLOUT: &str = "kubectl-rollout";

/// What the webhook answers, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub outcome: AdmissionOutcome,
    /// Shown by kubectl as `Warning: …`.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AdmissionOutcome {
    Allow(AllowReason),
    Patch(PatchReason, Patch),
    Deny(Denial),
}

/// Why a request is refused: each problem with its place (`fledge.dev/steps[2].setWeight: …`),
/// kept apart so that nothing downstream has to split a joined text again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub problems: Vec<String>,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&spec::summary(&self.problems))
    }
}

impl From<String> for Denial {
    fn from(problem: String) -> Denial {
        Denial {
            problems: vec![problem],
        }
    }
}

impl From<spec::SpecError> for Denial {
    fn from(e: spec::SpecError) -> Denial {
        Denial {
            problems: e.problems,
        }
    }
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
    /// Nothing new while a change is held: the hold is intact.
    HoldIntact,
    /// The template is the stable one again and the update already carries no hold.
    Reverted,
    /// fledge's controller unpauses a promoted canary.
    Promotion,
}

/// Why a request is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchReason {
    /// A new template goes through and is held as the pending canary.
    Hold,
    /// A different template replaces the pending one (the canary starts again at step 1).
    HoldReplaced,
    /// The update dropped or cleared the hold (`paused`, fledge's annotations): it is set again.
    HoldKept,
    /// A template change while the user keeps the Deployment paused: recorded, not started.
    PendingWhileUserPaused,
    /// The user resumed their own pause with a change pending: fledge takes the hold over.
    HoldTakenOver,
    /// The template is the stable one again: the hold is released and the canary rolled back.
    Revert,
    /// The Deployment left fledge (label or steps removed): the hold is released.
    Released,
    /// A created Deployment carried fledge's state from elsewhere (a copy or a backup).
    StaleStateRemoved,
}

impl AdmissionOutcome {
    /// `allow`, `patch` or `deny`: the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AdmissionOutcome::Allow(_) => "allow",
            AdmissionOutcome::Patch(..) => "patch",
            AdmissionOutcome::Deny(_) => "deny",
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
            AllowReason::HoldIntact => {
                "the held template is unchanged and the hold intact: the canary goes on"
            }
            AllowReason::Promotion => "fledge's own promotion: the Deployment is unpaused",
            AllowReason::Reverted => {
                "rollback: the pod template is the stable one again; the controller rolls the canary back"
            }
        })
    }
}

impl fmt::Display for PatchReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchReason::Hold => {
                "new pod template: it goes through as applied and is held (spec.paused) as the canary; the stable pods keep running"
            }
            PatchReason::HoldReplaced => {
                "another new pod template: it replaces the pending canary, which starts again at step 1"
            }
            PatchReason::HoldKept => "fledge holds this Deployment: the hold is set again",
            PatchReason::PendingWhileUserPaused => {
                "new pod template while you keep the Deployment paused: the canary starts when you resume"
            }
            PatchReason::HoldTakenOver => {
                "resumed with a new pod template pending: fledge holds it as the canary"
            }
            PatchReason::Revert => {
                "rollback: the pod template is the stable one again; traffic goes back to stable and the canary is removed, no pod restarts"
            }
            PatchReason::Released => {
                "the Deployment left fledge: the hold is released and it rolls out as a plain Deployment"
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
            outcome: AdmissionOutcome::Allow(reason),
            warnings: Vec::new(),
        }
    }

    fn deny(denial: impl Into<Denial>) -> Decision {
        Decision {
            outcome: AdmissionOutcome::Deny(denial.into()),
            warnings: Vec::new(),
        }
    }

    fn patch(reason: PatchReason, ops: Vec<PatchOperation>, warnings: Vec<String>) -> Decision {
        Decision {
            outcome: AdmissionOutcome::Patch(reason, Patch(ops)),
            warnings,
        }
    }
}

/// Decides one admission request for a Deployment, under the policies and namespaces of `policies`.
pub fn decide(req: &ReviewRequest, policies: &PolicySnapshot) -> Decision {
    if req.kind.group != "apps" || req.kind.kind != "Deployment" {
        return Decision::allow(AllowReason::NotADeployment);
    }
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Decision::allow(AllowReason::OperationNotWatched);
    }
    let Some(object) = &req.object else {
        return Decision::deny("request.object is missing from the AdmissionReview".to_owned());
    };
    let old = match (&req.operation, &req.old_object) {
        (Operation::Update, Some(old)) => Some(old),
        (Operation::Update, None) => {
            return Decision::deny(
                "request.oldObject is missing from an UPDATE AdmissionReview".to_owned(),
            );
        }
        _ => None,
    };
    let meta = &object.metadata;
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let namespace = req.namespace.as_deref().unwrap_or_default();
    let namespace_opted_in = policies.namespace_opted_in(namespace);
    if !spec::opted_in(Some(labels), namespace_opted_in) {
        return release(old, object, AllowReason::NotOptedIn, Vec::new());
    }
    let name = meta.name.as_deref().unwrap_or(&req.name);
    if name.is_empty() {
        return Decision::deny(
            "metadata.name: fledge names the canary's objects after the Deployment; set metadata.name (generateName is not supported)"
                .to_owned(),
        );
    }
    let change = match old {
        Some(old) => match TemplateChange::between(old.template(), object.template()) {
            Ok(change) => Some(change),
            Err(e) => return Decision::deny(e),
        },
        None => None,
    };
    // The stored (old) state, read once: for the policy it keeps and for the update's decision.
    let stored = old.map(|old| rollout::read_state(old.metadata.annotations.as_ref()));
    // The canary in flight (or aborted) of an unchanged template keeps the policy it started
    // with, as the controller does: a policy edited or deleted since must not release it.
    let fixed = match (&change, &stored) {
        (Some(TemplateChange::Unchanged), Some(Ok(Some(state)))) if state.keeps_policy() => {
            state.policy.as_deref()
        }
        _ => None,
    };
    let policy = match fixed {
        Some(fixed) => Some(fixed),
        None => match policies.select(namespace, labels, annotations) {
            Ok(policy) => policy,
            Err(e) => return Decision::deny(e.to_string()),
        },
    };
    let has_policy_steps = policy.is_some_and(Policy::has_steps);
    if spec::opt_in(
        Some(labels),
        Some(annotations),
        namespace_opted_in,
        has_policy_steps,
    ) == OptIn::WithoutSteps
    {
        let warning = format!(
            "this Deployment takes part in fledge ({}) but has no steps: neither {} nor a policy with steps; fledge will not canary it",
            if labels.contains_key(spec::LABEL_ENABLED) {
                "label fledge.dev/enabled"
            } else {
                "its namespace is labelled fledge.dev/enabled"
            },
            spec::ANNOTATION_STEPS
        );
        return release(old, object, AllowReason::NoSteps, vec![warning]);
    }
    let (Some(old), Some(change)) = (old, change) else {
        return match policy::resolve(name, annotations, policy) {
            Ok(parsed) => with_unmet_steps(decide_create(annotations), &parsed, object),
            Err(e) => Decision::deny(e),
        };
    };
    // Ratcheting, as Kubernetes does for its own fields: an update that changes neither the
    // template nor fledge's settings is not refused for settings that were already there (nor for
    // a policy changed since).
    let ratcheted = matches!(change, TemplateChange::Unchanged)
        && spec::opt_in(
            old.metadata.labels.as_ref(),
            old.metadata.annotations.as_ref(),
            namespace_opted_in,
            has_policy_steps,
        ) == OptIn::Enabled
        && user_settings(old.metadata.annotations.as_ref()) == user_settings(Some(annotations));
    let parsed = if ratcheted {
        None
    } else {
        match policy::resolve(name, annotations, policy) {
            Ok(parsed) => Some(parsed),
            Err(e) => return Decision::deny(e),
        }
    };
    let field_manager = req.options.field_manager.as_deref().unwrap_or_default();
    // An update always has the stored state read (or its error).
    let stored = stored.unwrap_or(Ok(None));
    match Update::read(name, old, object, change, field_manager, stored) {
        Ok(update) => match &parsed {
            Some(parsed) => with_unmet_steps(update.decide(), parsed, object),
            None => update.decide(),
        },
        Err(e) => Decision::deny(e),
    }
}

/// On the pod-ratio router, the `setWeight` steps that the Deployment's replica count cannot meet
/// exactly, each with its place and the share it gets instead, as warnings: said at apply time,
/// not discovered mid-canary.
fn with_unmet_steps(
    mut decision: Decision,
    parsed: &spec::CanarySpec,
    object: &DeploymentView,
) -> Decision {
    if parsed.router != spec::Router::PodRatio
        || matches!(decision.outcome, AdmissionOutcome::Deny(_))
    {
        return decision;
    }
    let replicas = object.replicas();
    decision.warnings.extend(
        crate::core::podratio::unmet_steps(&parsed.steps, replicas)
            .into_iter()
            .map(|(i, share)| {
                format!(
                    "{}[{i}].setWeight: on the pod-ratio router {share}; scale the Deployment or pick a weight its pods can meet",
                    spec::ANNOTATION_STEPS
                )
            }),
    );
    decision
}

/// The `fledge.dev/*` annotations a user sets (anything but fledge's own bookkeeping).
fn user_settings(annotations: Option<&BTreeMap<String, String>>) -> Vec<(&String, &String)> {
    annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(spec::PREFIX) && !FLEDGE_ANNOTATIONS.contains(&k.as_str()))
        .collect()
}

/// How the pod template differs between the stored and the incoming Deployment.
enum TemplateChange {
    Unchanged,
    /// With both templates' canonical forms, which give their hashes.
    Changed {
        old: Canonical,
        new: Canonical,
    },
}

impl TemplateChange {
    fn between(old: Option<&str>, new: Option<&str>) -> Result<Self, String> {
        let (Some(old), Some(new)) = (old, new) else {
            return Err("spec.template is missing from the Deployment".to_owned());
        };
        // The API server encodes both objects the same way, so equal text is the common fast path;
        // otherwise compare canonical forms, where key order does not matter.
        if old == new {
            return Ok(TemplateChange::Unchanged);
        }
        let old = canonical(old, "oldObject")?;
        let new = canonical(new, "object")?;
        Ok(if old == new {
            TemplateChange::Unchanged
        } else {
            TemplateChange::Changed { old, new }
        })
    }
}

/// The canonical form of a raw template: hashed from exactly the JSON sent, as the controller
/// hashes the same JSON.
fn canonical(raw: &str, which: &str) -> Result<Canonical, String> {
    Canonical::of_raw(raw).map_err(|e| format!("{which}.spec.template cannot be read: {e}"))
}

/// fledge's record of a hold, as stored (read from `oldObject`: a client may drop annotations).
struct HoldRecord<'a> {
    /// `fledge.dev/stable-hash`: a change is pending against this stable template.
    stable_hash: Option<&'a str>,
    /// `fledge.dev/hold`: fledge (not the user) set `spec.paused`.
    held: bool,
}

impl<'a> HoldRecord<'a> {
    fn of(view: &'a DeploymentView) -> HoldRecord<'a> {
        let annotation = |key: &str| {
            view.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str)
        };
        HoldRecord {
            stable_hash: annotation(ANNOTATION_STABLE_HASH),
            held: annotation(ANNOTATION_HOLD) == Some("true"),
        }
    }
}

fn decide_create(annotations: &BTreeMap<String, String>) -> Decision {
    let ops = remove_annotations(annotations, &FLEDGE_ANNOTATIONS);
    if ops.is_empty() {
        Decision::allow(AllowReason::FirstDeploy)
    } else {
        Decision::patch(PatchReason::StaleStateRemoved, ops, Vec::new())
    }
}

/// A Deployment that leaves fledge while fledge holds it is released: unpaused, its hold record
/// removed. It then rolls out as a plain Deployment; the controller removes the canary.
fn release(
    old: Option<&DeploymentView>,
    object: &DeploymentView,
    reason: AllowReason,
    mut warnings: Vec<String>,
) -> Decision {
    let Some(old) = old else {
        return Decision {
            outcome: AdmissionOutcome::Allow(reason),
            warnings,
        };
    };
    let record = HoldRecord::of(old);
    if record.stable_hash.is_none() && !record.held {
        return Decision {
            outcome: AdmissionOutcome::Allow(reason),
            warnings,
        };
    }
    let mut ops = remove_annotations(
        object
            .metadata
            .annotations
            .as_ref()
            .unwrap_or(&BTreeMap::new()),
        &[ANNOTATION_STABLE_HASH, ANNOTATION_HOLD],
    );
    if record.held && object.paused() {
        ops.push(set_paused(false));
    }
    warnings.push(
        "fledge: this Deployment left fledge; its hold is released and the current template rolls out as a plain Deployment update"
            .to_owned(),
    );
    Decision::patch(PatchReason::Released, ops, warnings)
}

/// An UPDATE of an opted-in Deployment with valid settings.
struct Update<'r> {
    name: &'r str,
    new: &'r DeploymentView,
    record: HoldRecord<'r>,
    state: Option<RolloutState>,
    /// Hash of the old template and of the new one (equal when the template did not change).
    old_hash: String,
    new_hash: String,
    changed: bool,
    old_paused: bool,
    field_manager: &'r str,
}

impl<'r> Update<'r> {
    fn read(
        name: &'r str,
        old: &'r DeploymentView,
        new: &'r DeploymentView,
        change: TemplateChange,
        field_manager: &'r str,
        stored: Result<Option<RolloutState>, rollout::StateError>,
    ) -> Result<Update<'r>, String> {
        let record = HoldRecord::of(old);
        let changed = matches!(change, TemplateChange::Changed { .. });
        // Hashing reads the template: only when the answer depends on it.
        let (old_hash, new_hash) = match change {
            TemplateChange::Changed { old, new } => (old.hash(), new.hash()),
            TemplateChange::Unchanged if record.stable_hash.is_some() => {
                let raw = new
                    .template()
                    .ok_or("spec.template is missing from the Deployment")?;
                let new_hash = canonical(raw, "object")?.hash();
                (new_hash.clone(), new_hash)
            }
            TemplateChange::Unchanged => (String::new(), String::new()),
        };
        // The stored (old) state is authoritative: only fledge writes it.
        let state = stored.map_err(|e| e.to_string())?;
        Ok(Update {
            name,
            new,
            record,
            state,
            old_hash,
            new_hash,
            changed,
            old_paused: old.paused(),
            field_manager,
        })
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.new
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    fn decide(self) -> Decision {
        let without_annotations = self.new.metadata.annotations.is_none();
        let decision = match self.record.stable_hash {
            None if !self.changed => self.nothing_pending(),
            None => self.start_hold(),
            Some(stable) if self.new_hash == stable => self.revert(),
            Some(stable) => self.keep_hold(stable),
        };
        // A Deployment opted in by its namespace and policy may have no annotations at all, and
        // JSON Patch cannot add a member to a map that is not there.
        match decision.outcome {
            AdmissionOutcome::Patch(reason, Patch(mut ops)) if without_annotations => {
                if ops.iter().any(|op| matches!(op, PatchOperation::Add(a) if a.path.starts_with(&annotations_path()))) {
                    ops.insert(
                        0,
                        PatchOperation::Add(AddOperation {
                            path: annotations_path(),
                            value: Value::Object(serde_json::Map::new()),
                        }),
                    );
                }
                Decision {
                    outcome: AdmissionOutcome::Patch(reason, Patch(ops)),
                    ..decision
                }
            }
            _ => decision,
        }
    }

    /// No change pending and none made. fledge's hold annotations only come from fledge: copied
    /// ones (an exported manifest applied again) are removed.
    fn nothing_pending(&self) -> Decision {
        let ops = remove_annotations(
            self.new
                .metadata
                .annotations
                .as_ref()
                .unwrap_or(&BTreeMap::new()),
            &[ANNOTATION_STABLE_HASH, ANNOTATION_HOLD],
        );
        if ops.is_empty() {
            Decision::allow(AllowReason::TemplateUnchanged)
        } else {
            Decision::patch(PatchReason::StaleStateRemoved, ops, Vec::new())
        }
    }

    /// A first template change: it goes through and is held, against the template before it.
    fn start_hold(&self) -> Decision {
        let mut ops = Vec::new();
        if self.annotation(ANNOTATION_STABLE_HASH) != Some(self.old_hash.as_str()) {
            ops.push(set_annotation(ANNOTATION_STABLE_HASH, &self.old_hash));
        }
        // The user's own pause keeps Kubernetes' meaning: nothing rolls out, and no canary starts
        // until they resume. (An update that already carries fledge's hold is this decision's own
        // output coming back: reinvocation.)
        let (reason, warning) = if self.old_paused
            && self.new.paused()
            && self.annotation(ANNOTATION_HOLD) != Some("true")
        {
            ops.extend(self.unset_annotation(ANNOTATION_HOLD));
            (
                PatchReason::PendingWhileUserPaused,
                format!(
                    "fledge: {} is paused by you; the new pod template ({}) is recorded and its canary starts when you run `kubectl rollout resume deployment/{}`",
                    self.name, self.new_hash, self.name
                ),
            )
        } else {
            ops.extend(self.hold_ops());
            (
                PatchReason::Hold,
                format!(
                    "fledge: the new pod template ({}) is held as a canary (spec.paused); the stable pods keep running until promotion. Follow it with `kubectl fledge status {} -w`",
                    self.new_hash, self.name
                ),
            )
        };
        if ops.is_empty() {
            // This decision's own output again (reinvocation): nothing to add.
            return Decision::allow(AllowReason::HoldIntact);
        }
        Decision::patch(reason, ops, vec![warning])
    }

    /// `paused: true` and `fledge.dev/hold`, where the update lacks them.
    fn hold_ops(&self) -> Vec<PatchOperation> {
        let mut ops = Vec::new();
        if !self.new.paused() {
            ops.push(set_paused(true));
        }
        if self.annotation(ANNOTATION_HOLD) != Some("true") {
            ops.push(set_annotation(ANNOTATION_HOLD, "true"));
        }
        ops
    }

    fn unset_annotation(&self, key: &str) -> Option<PatchOperation> {
        self.annotation(key).is_some().then(|| {
            PatchOperation::Remove(RemoveOperation {
                path: annotation_path(key),
            })
        })
    }

    /// The template is the stable one again: release the hold (no new ReplicaSet can follow, the
    /// stable one runs this template); the controller rolls the canary back.
    fn revert(&self) -> Decision {
        let mut ops: Vec<PatchOperation> = [ANNOTATION_STABLE_HASH, ANNOTATION_HOLD]
            .iter()
            .filter_map(|key| self.unset_annotation(key))
            .collect();
        if self.record.held && self.new.paused() {
            ops.push(set_paused(false));
        }
        let in_flight = self
            .state
            .as_ref()
            .is_some_and(|s| s.phase != Phase::Succeeded);
        let warning = if in_flight {
            format!(
                "fledge: the pod template is the stable one ({}) again: rollback. All traffic goes back to the stable pods, the canary is removed, and no pod restarts",
                self.new_hash
            )
        } else {
            format!(
                "fledge: the pod template is the stable one ({}) again: the pending change is dropped",
                self.new_hash
            )
        };
        if ops.is_empty() {
            return Decision {
                outcome: AdmissionOutcome::Allow(AllowReason::Reverted),
                warnings: vec![warning],
            };
        }
        Decision::patch(PatchReason::Revert, ops, vec![warning])
    }

    /// A change is pending against `stable`, and this update does not revert it.
    fn keep_hold(&self, stable: &str) -> Decision {
        let state_is = |phase: Phase| {
            self.state
                .as_ref()
                .is_some_and(|s| s.phase == phase && s.hash == self.new_hash)
        };
        // fledge's controller unpauses a promoted canary (and removes the hold record itself).
        if self.field_manager == FIELD_MANAGER
            && self.record.held
            && !self.changed
            && !self.new.paused()
            && state_is(Phase::Promoting)
        {
            return Decision::allow(AllowReason::Promotion);
        }
        let mut ops = Vec::new();
        let mut warnings = Vec::new();
        if self.annotation(ANNOTATION_STABLE_HASH) != Some(stable) {
            ops.push(set_annotation(ANNOTATION_STABLE_HASH, stable));
        }
        let resumed = self.old_paused && !self.new.paused();
        let mut reason = PatchReason::HoldKept;
        if self.record.held {
            if resumed && self.field_manager == KUBECTL_ROLLOUT {
                return Decision::deny(self.resume_denied());
            }
            if !self.new.paused() || self.annotation(ANNOTATION_HOLD) != Some("true") {
                warnings.push(format!(
                    "fledge: {} holds {} paused for its canary; spec.paused is set again. To go on run `kubectl fledge promote {}`, to roll back `kubectl fledge abort {}` or apply the previous pod template",
                    FIELD_MANAGER, self.name, self.name, self.name
                ));
            }
            ops.extend(self.hold_ops());
        } else if !self.new.paused() {
            // The user resumed their own pause with a change pending: now fledge holds it.
            reason = PatchReason::HoldTakenOver;
            ops.extend(self.hold_ops());
            warnings.push(format!(
                "fledge: resumed with a new pod template ({}) pending; fledge holds it (spec.paused) as a canary",
                self.new_hash
            ));
        }
        if self.changed {
            if self.record.held || !self.new.paused() {
                reason = PatchReason::HoldReplaced;
            } else {
                reason = PatchReason::PendingWhileUserPaused;
            }
            warnings.push(format!(
                "fledge: the new pod template ({}) replaces the pending one; its canary starts at step 1",
                self.new_hash
            ));
        } else if ops.is_empty() {
            return Decision {
                outcome: AdmissionOutcome::Allow(AllowReason::HoldIntact),
                warnings: self.aborted_hint().into_iter().collect(),
            };
        }
        warnings.extend(self.aborted_hint());
        if ops.is_empty() {
            // A new template while the user keeps their pause: nothing to write, only to say.
            return Decision {
                outcome: AdmissionOutcome::Allow(AllowReason::HoldIntact),
                warnings,
            };
        }
        Decision::patch(reason, ops, warnings)
    }

    /// Re-applying an aborted template changes nothing; say how to go on.
    fn aborted_hint(&self) -> Option<String> {
        let aborted = self
            .state
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Aborted && s.hash == self.new_hash);
        aborted.then(|| {
            format!(
                "fledge: the canary of this pod template ({}) was aborted and stays aborted; change the template, apply the previous one to roll back, or run `kubectl fledge retry {}`",
                self.new_hash, self.name
            )
        })
    }

    fn resume_denied(&self) -> String {
        format!(
            "fledge holds {name} paused while its canary runs (pod template {hash}); `kubectl rollout resume` would skip the canary. \
             Run `kubectl fledge promote {name}` to go on, or `kubectl fledge abort {name}` to send traffic back to stable. \
             To roll back, apply the previous pod template (kubectl refuses `kubectl rollout undo` on a paused Deployment)",
            name = self.name,
            hash = self.new_hash,
        )
    }
}

/// `/metadata/annotations`.
fn annotations_path() -> PointerBuf {
    PointerBuf::from_tokens(["metadata", "annotations"])
}

/// `/metadata/annotations/<key>`, with `/` and `~` in the key escaped per RFC 6901.
fn annotation_path(key: &str) -> PointerBuf {
    PointerBuf::from_tokens(["metadata", "annotations", key])
}

fn set_annotation(key: &str, value: &str) -> PatchOperation {
    // `add` on an existing member replaces it (RFC 6902 §4.1), so this works either way. Where
    // the annotations map is missing, `Update::decide` adds it first.
    PatchOperation::Add(AddOperation {
        path: annotation_path(key),
        value: Value::String(value.to_owned()),
    })
}

fn remove_annotations(
    annotations: &BTreeMap<String, String>,
    keys: &[&str],
) -> Vec<PatchOperation> {
    keys.iter()
        .filter(|key| annotations.contains_key(**key))
        .map(|key| {
            PatchOperation::Remove(RemoveOperation {
                path: annotation_path(key),
            })
        })
        .collect()
}

fn set_paused(paused: bool) -> PatchOperation {
    // `spec` exists: the template is in it.
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(["spec", "paused"]),
        value: Value::Bool(paused),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec::{ANNOTATION_STATE, ANNOTATION_STEPS, LABEL_ENABLED, Weight};
    use serde_json::json;

    use crate::core::builders::{
        STEPS, mk_deployment as deployment, mk_held as held, mk_state, with_annotation,
    };

    /// Decides without policies or opted-in namespaces.
    fn decide(req: &ReviewRequest) -> Decision {
        super::decide(req, &PolicySnapshot::default())
    }

    fn with_state(object: Value, phase: Phase, hash: &str) -> Value {
        crate::core::builders::with_state(
            object,
            &mk_state(phase, hash, 1, Weight::from_basis_points(500).unwrap()),
        )
    }

    fn without_label(mut object: Value) -> Value {
        object["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove(LABEL_ENABLED);
        object
    }

    fn paused(mut object: Value, paused: Option<bool>) -> Value {
        match paused {
            Some(p) => object["spec"]["paused"] = json!(p),
            None => {
                object["spec"].as_object_mut().unwrap().remove("paused");
            }
        }
        object
    }

    use crate::core::builders::mk_hash as hash_of;

    fn request(
        operation: &str,
        object: Value,
        old: Option<Value>,
        field_manager: Option<&str>,
    ) -> ReviewRequest {
        let mut review = review::deployment_review(
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            "alice",
            &object,
            old.as_ref(),
        );
        review["request"]["operation"] = json!(operation);
        if let Some(manager) = field_manager {
            review["request"]["options"]["fieldManager"] = json!(manager);
        }
        review::parse(&serde_json::to_vec(&review).unwrap()).unwrap()
    }

    fn update(old: Value, new: Value) -> ReviewRequest {
        request("UPDATE", new, Some(old), Some("kubectl-client-side-apply"))
    }

    fn update_by(manager: &str, old: Value, new: Value) -> ReviewRequest {
        request("UPDATE", new, Some(old), Some(manager))
    }

    /// The object the API server stores after applying the decision's patch.
    fn apply(req: &ReviewRequest, decision: &Decision) -> Value {
        let mut object: Value =
            serde_json::from_str(&serde_json::to_string(req.object.as_ref().unwrap()).unwrap())
                .unwrap();
        if let AdmissionOutcome::Patch(_, patch) = &decision.outcome {
            json_patch::patch(&mut object, patch).unwrap();
        }
        object
    }

    /// What the API server stores for `old` → `new`: `new` with the decision's patch, whose
    /// template is the user's exactly.
    fn stored(req: &ReviewRequest) -> (Decision, Value) {
        let d = decide(req);
        let object = apply(req, &d);
        (d, object)
    }

    fn reason(d: &Decision) -> String {
        match &d.outcome {
            AdmissionOutcome::Allow(r) => format!("allow: {r:?}"),
            AdmissionOutcome::Patch(r, _) => format!("patch: {r:?}"),
            AdmissionOutcome::Deny(m) => format!("deny: {m}"),
        }
    }

    fn is_patch(d: &Decision, wanted: PatchReason) -> bool {
        matches!(d.outcome, AdmissionOutcome::Patch(r, _) if r == wanted)
    }

    fn denial(d: &Decision) -> String {
        match &d.outcome {
            AdmissionOutcome::Deny(m) => m.to_string(),
            _ => panic!("not denied: {}", reason(d)),
        }
    }

    /// Applies the decision, then asks again about the result (as reinvocation does): nothing more
    /// changes.
    fn assert_reinvocation_is_a_no_op(req: &ReviewRequest) -> Value {
        let (_, once) = stored(req);
        let old = req
            .old_object
            .as_ref()
            .map(|o| serde_json::from_str(&serde_json::to_string(o).unwrap()).unwrap());
        let manager = req.options.field_manager.as_deref();
        let again = request("UPDATE", once.clone(), old, manager);
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

    /// What the decision may touch: labels, annotations, `paused` and the template.
    /// What a decision may touch. The request's view keeps only fledge's labels and annotations
    /// (the patch touches no others), so only those are compared.
    fn essentials(object: &Value) -> Value {
        let fledge_entries = |map: &Value| -> Value {
            map.as_object()
                .into_iter()
                .flatten()
                .filter(|(key, _)| key.starts_with(spec::PREFIX))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({
            "labels": fledge_entries(&object["metadata"]["labels"]),
            "annotations": fledge_entries(&object["metadata"]["annotations"]),
            "paused": object["spec"]["paused"],
            "template": object["spec"]["template"],
        })
    }

    fn annotations(object: &Value) -> &serde_json::Map<String, Value> {
        object["metadata"]["annotations"].as_object().unwrap()
    }

    #[test]
    fn create_of_a_valid_opted_in_deployment_passes_unchanged() {
        let d = decide(&request("CREATE", deployment("web:1"), None, None));
        assert_eq!(d.outcome, AdmissionOutcome::Allow(AllowReason::FirstDeploy));
    }

    #[test]
    fn create_with_invalid_steps_is_denied_with_the_place() {
        let object = with_annotation(
            deployment("web:1"),
            ANNOTATION_STEPS,
            "- setWeight: 5\n- pause: {}\n- setWeight: 150",
        );
        let d = decide(&request("CREATE", object, None, None));
        assert_eq!(
            denial(&d),
            "fledge.dev/steps[2].setWeight: 150 is not between 0 and 100"
        );
    }

    #[test]
    fn create_drops_fledge_state_copied_from_elsewhere() {
        let object = with_state(held("web:0", "web:1"), Phase::Paused, "x");
        let req = request("CREATE", object, None, None);
        let (d, result) = stored(&req);
        assert!(
            is_patch(&d, PatchReason::StaleStateRemoved),
            "{}",
            reason(&d)
        );
        assert_eq!(
            annotations(&result).keys().collect::<Vec<_>>(),
            vec![ANNOTATION_STEPS]
        );
        // A user's own pause is theirs: kept.
        assert_eq!(result["spec"]["paused"], json!(true));
    }

    #[test]
    fn a_template_change_goes_through_as_applied_and_is_held() {
        let new = deployment("web:2");
        let req = update(deployment("web:1"), new.clone());
        let (d, result) = stored(&req);
        assert!(is_patch(&d, PatchReason::Hold), "{}", reason(&d));
        assert_eq!(d.warnings.len(), 1);
        // The user's template, to the byte: no drift for GitOps.
        assert_eq!(result["spec"]["template"], new["spec"]["template"]);
        assert_eq!(result["spec"]["paused"], json!(true));
        assert_eq!(annotations(&result)[ANNOTATION_HOLD], json!("true"));
        assert_eq!(
            annotations(&result)[ANNOTATION_STABLE_HASH],
            json!(hash_of("web:1"))
        );
        assert_eq!(annotations(&result)[ANNOTATION_STEPS], json!(STEPS));
    }

    #[test]
    fn patch_paths_escape_annotation_keys_per_rfc6901() {
        let d = decide(&update(deployment("web:1"), deployment("web:2")));
        let AdmissionOutcome::Patch(_, patch) = d.outcome else {
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
                "/metadata/annotations/fledge.dev~1stable-hash",
                "/spec/paused",
                "/metadata/annotations/fledge.dev~1hold",
            ]
        );
        assert_eq!(
            annotation_path("a~b/c").to_string(),
            "/metadata/annotations/a~0b~1c"
        );
    }

    #[test]
    fn reinvocation_on_its_own_output_changes_nothing() {
        for req in [
            update(deployment("web:1"), deployment("web:2")),
            update(held("web:1", "web:2"), deployment("web:3")),
            update(held("web:1", "web:2"), deployment("web:1")),
            update(held("web:1", "web:2"), paused(deployment("web:2"), None)),
            update(
                paused(deployment("web:1"), Some(true)),
                paused(deployment("web:2"), Some(true)),
            ),
        ] {
            assert_reinvocation_is_a_no_op(&req);
        }
    }

    #[test]
    fn reapplying_the_held_template_changes_nothing() {
        let stored_v2 = held("web:1", "web:2");
        // The user applies v2 again: the merged object keeps fledge's annotations and paused.
        let d = decide(&update(stored_v2.clone(), stored_v2.clone()));
        assert_eq!(d.outcome, AdmissionOutcome::Allow(AllowReason::HoldIntact));
        // A GitOps tool that drops fledge's fields (replace, or server-side apply under a manager
        // that owns them): they are set again, never refused.
        let req = update(stored_v2.clone(), paused(deployment("web:2"), None));
        let (d, result) = stored(&req);
        assert!(is_patch(&d, PatchReason::HoldKept), "{}", reason(&d));
        assert_eq!(essentials(&result), essentials(&stored_v2));
        assert!(
            d.warnings[0].contains("fledge promote web")
                && d.warnings[0].contains("fledge abort web"),
            "{:?}",
            d.warnings
        );
        let cleared = paused(stored_v2.clone(), Some(false));
        let (d, result) = stored(&update(stored_v2.clone(), cleared));
        assert!(is_patch(&d, PatchReason::HoldKept), "{}", reason(&d));
        assert_eq!(essentials(&result), essentials(&stored_v2));
    }

    #[test]
    fn an_explicit_resume_is_denied_with_the_way_forward() {
        let stored_v2 = held("web:1", "web:2");
        let resumed = paused(stored_v2.clone(), Some(false));
        let d = decide(&update_by(KUBECTL_ROLLOUT, stored_v2, resumed));
        let message = denial(&d);
        for needed in [
            "kubectl fledge promote web",
            "kubectl fledge abort web",
            "apply the previous pod template",
            "rollout undo",
        ] {
            assert!(message.contains(needed), "{needed}: {message}");
        }
    }

    #[test]
    fn a_different_template_replaces_the_pending_one_against_the_same_stable() {
        let stored_v2 = with_state(held("web:1", "web:2"), Phase::Paused, &hash_of("web:2"));
        let v3 = with_state(held("web:1", "web:3"), Phase::Paused, &hash_of("web:2"));
        let req = update(stored_v2, v3.clone());
        let (d, result) = stored(&req);
        assert!(
            matches!(d.outcome, AdmissionOutcome::Allow(AllowReason::HoldIntact))
                || is_patch(&d, PatchReason::HoldReplaced),
            "{}",
            reason(&d)
        );
        assert_eq!(essentials(&result), essentials(&v3));
        assert_eq!(
            annotations(&result)[ANNOTATION_STABLE_HASH],
            json!(hash_of("web:1"))
        );
        // The same as a plain apply of v3, which drops fledge's fields.
        let (d, result) = stored(&update(held("web:1", "web:2"), deployment("web:3")));
        assert!(is_patch(&d, PatchReason::HoldReplaced), "{}", reason(&d));
        assert_eq!(essentials(&result), essentials(&held("web:1", "web:3")));
    }

    #[test]
    fn reverting_to_the_stable_template_releases_the_hold() {
        for stored_v2 in [
            with_state(held("web:1", "web:2"), Phase::Paused, &hash_of("web:2")),
            with_state(held("web:1", "web:2"), Phase::Aborted, &hash_of("web:2")),
            held("web:1", "web:2"),
        ] {
            // kubectl apply of the old manifest: no fledge fields, paused untouched by it.
            for v1 in [deployment("web:1"), paused(deployment("web:1"), Some(true))] {
                let req = update(stored_v2.clone(), v1);
                let (d, result) = stored(&req);
                assert!(
                    is_patch(&d, PatchReason::Revert)
                        || d.outcome == AdmissionOutcome::Allow(AllowReason::Reverted),
                    "{}",
                    reason(&d)
                );
                assert_ne!(result["spec"]["paused"], json!(true));
                assert!(!annotations(&result).contains_key(ANNOTATION_HOLD));
                assert!(!annotations(&result).contains_key(ANNOTATION_STABLE_HASH));
                assert_eq!(
                    result["spec"]["template"],
                    deployment("web:1")["spec"]["template"]
                );
                assert_reinvocation_is_a_no_op(&req);
            }
        }
        let aborted = with_state(held("web:1", "web:2"), Phase::Aborted, &hash_of("web:2"));
        let d = decide(&update(aborted, deployment("web:1")));
        assert!(d.warnings[0].contains("rollback"), "{:?}", d.warnings);
    }

    #[test]
    fn reapplying_an_aborted_template_keeps_it_aborted_and_says_how_to_go_on() {
        let aborted = with_state(held("web:1", "web:2"), Phase::Aborted, &hash_of("web:2"));
        let d = decide(&update(aborted.clone(), aborted.clone()));
        assert_eq!(d.outcome, AdmissionOutcome::Allow(AllowReason::HoldIntact));
        assert!(
            d.warnings[0].contains("fledge retry web"),
            "{:?}",
            d.warnings
        );
        // Even through a client that drops fledge's fields: the same object is stored.
        let (_, result) = stored(&update(aborted.clone(), deployment("web:2")));
        assert_eq!(essentials(&result), essentials(&without_state(aborted)));
    }

    fn without_state(mut object: Value) -> Value {
        object["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(ANNOTATION_STATE);
        object
    }

    #[test]
    fn the_controllers_unpause_of_a_promoted_canary_passes_and_nothing_else_does() {
        let promoting = with_state(held("web:1", "web:2"), Phase::Promoting, &hash_of("web:2"));
        let mut unpaused = paused(promoting.clone(), Some(false));
        for key in [ANNOTATION_HOLD, ANNOTATION_STABLE_HASH] {
            unpaused["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove(key);
        }
        let d = decide(&update_by(
            FIELD_MANAGER,
            promoting.clone(),
            unpaused.clone(),
        ));
        assert_eq!(d.outcome, AdmissionOutcome::Allow(AllowReason::Promotion));
        // Anyone else's unpause is undone; a Paused state is no promotion either.
        let d = decide(&update_by(
            "argocd-controller",
            promoting.clone(),
            unpaused.clone(),
        ));
        assert!(is_patch(&d, PatchReason::HoldKept), "{}", reason(&d));
        let paused_state = with_state(held("web:1", "web:2"), Phase::Paused, &hash_of("web:2"));
        let d = decide(&update_by(FIELD_MANAGER, paused_state, unpaused));
        assert!(is_patch(&d, PatchReason::HoldKept), "{}", reason(&d));
    }

    #[test]
    fn the_users_own_pause_keeps_its_meaning() {
        // Paused by the user: a change is recorded, not held by fledge, nothing starts.
        let user_paused = paused(deployment("web:1"), Some(true));
        let req = update(user_paused.clone(), paused(deployment("web:2"), Some(true)));
        let (d, pending) = stored(&req);
        assert!(
            is_patch(&d, PatchReason::PendingWhileUserPaused),
            "{}",
            reason(&d)
        );
        assert!(!annotations(&pending).contains_key(ANNOTATION_HOLD));
        assert_eq!(
            annotations(&pending)[ANNOTATION_STABLE_HASH],
            json!(hash_of("web:1"))
        );
        // Another change while still paused: still theirs.
        let (d, _) = stored(&update(
            pending.clone(),
            with_annotation(
                paused(deployment("web:3"), Some(true)),
                ANNOTATION_STABLE_HASH,
                &hash_of("web:1"),
            ),
        ));
        assert!(
            matches!(d.outcome, AdmissionOutcome::Allow(AllowReason::HoldIntact)),
            "{}",
            reason(&d)
        );
        // `kubectl rollout resume`: fledge takes the hold over and the canary starts.
        let resumed = paused(pending.clone(), Some(false));
        let (d, result) = stored(&update_by(KUBECTL_ROLLOUT, pending, resumed));
        assert!(is_patch(&d, PatchReason::HoldTakenOver), "{}", reason(&d));
        assert_eq!(essentials(&result), essentials(&held("web:1", "web:2")));
    }

    #[test]
    fn leaving_fledge_releases_the_hold() {
        let stored_v2 = held("web:1", "web:2");
        for left in [
            without_label(stored_v2.clone()),
            with_annotation(stored_v2.clone(), ANNOTATION_STEPS, "").pipe_remove_steps(),
        ] {
            let (d, result) = stored(&update(stored_v2.clone(), left));
            assert!(is_patch(&d, PatchReason::Released), "{}", reason(&d));
            assert_eq!(result["spec"]["paused"], json!(false));
            assert!(!annotations(&result).contains_key(ANNOTATION_HOLD));
        }
        let d = decide(&update(
            without_label(deployment("web:1")),
            without_label(deployment("web:2")),
        ));
        assert_eq!(d.outcome, AdmissionOutcome::Allow(AllowReason::NotOptedIn));
    }

    trait RemoveSteps {
        fn pipe_remove_steps(self) -> Value;
    }

    impl RemoveSteps for Value {
        fn pipe_remove_steps(mut self) -> Value {
            self["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove(ANNOTATION_STEPS);
            self
        }
    }

    #[test]
    fn copied_hold_records_are_removed_when_nothing_is_pending() {
        let exported = held("web:0", "web:1");
        let (d, result) = stored(&update(deployment("web:1"), exported));
        assert!(
            is_patch(&d, PatchReason::StaleStateRemoved),
            "{}",
            reason(&d)
        );
        assert!(!annotations(&result).contains_key(ANNOTATION_HOLD));
        assert!(!annotations(&result).contains_key(ANNOTATION_STABLE_HASH));
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
            AdmissionOutcome::Allow(AllowReason::TemplateUnchanged)
        );
        // Scaling while held keeps the hold.
        let mut held_scaled = held("web:1", "web:2");
        held_scaled["spec"]["replicas"] = json!(9);
        assert_eq!(
            decide(&update(held("web:1", "web:2"), held_scaled)).outcome,
            AdmissionOutcome::Allow(AllowReason::HoldIntact)
        );
    }

    #[test]
    fn invalid_annotations_deny_updates_too() {
        let new = with_annotation(deployment("web:2"), "fledge.dev/stepz", "x");
        let d = decide(&update(deployment("web:1"), new));
        assert!(denial(&d).starts_with("fledge.dev/stepz: unknown fledge annotation"));
    }

    #[test]
    fn a_corrupt_state_annotation_is_named() {
        let stored_v2 = with_annotation(held("web:1", "web:2"), ANNOTATION_STATE, "not json");
        let d = decide(&update(stored_v2, deployment("web:3")));
        assert!(denial(&d).starts_with("fledge.dev/state: cannot read"));
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
        let mut req = request(
            "DELETE",
            deployment("web:1"),
            Some(deployment("web:1")),
            None,
        );
        assert_eq!(
            decide(&req).outcome,
            AdmissionOutcome::Allow(AllowReason::OperationNotWatched)
        );
        req.kind.kind = "StatefulSet".into();
        assert_eq!(
            decide(&req).outcome,
            AdmissionOutcome::Allow(AllowReason::NotADeployment)
        );
    }

    #[test]
    fn missing_parts_are_denied_not_panicked_on() {
        let mut req = update(deployment("web:1"), deployment("web:2"));
        req.old_object = None;
        assert!(denial(&decide(&req)).contains("oldObject"));
        let mut broken = deployment("web:2");
        broken["spec"].as_object_mut().unwrap().remove("template");
        assert!(denial(&decide(&update(deployment("web:1"), broken))).contains("spec.template"));
        let mut req = update(deployment("web:1"), deployment("web:2"));
        req.object = None;
        assert!(denial(&decide(&req)).contains("request.object"));
    }

    #[test]
    fn fields_unknown_to_fledge_and_null_timestamps_survive() {
        let mut new = deployment("web:2");
        new["spec"]["template"]["spec"]["futureField"] = json!({"keep": "canary"});
        let req = update(deployment("web:1"), new.clone());
        let (_, result) = stored(&req);
        assert_eq!(result["spec"]["template"], new["spec"]["template"]);
        assert_eq!(
            result["spec"]["template"]["metadata"]["creationTimestamp"],
            Value::Null
        );
        assert!(
            result["spec"]["template"]["metadata"]
                .as_object()
                .unwrap()
                .contains_key("creationTimestamp")
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
            AdmissionOutcome::Allow(AllowReason::TemplateUnchanged)
        );
        let still_bad = with_annotation(bad.clone(), ANNOTATION_STEPS, "- setWeight: 151");
        assert!(matches!(
            decide(&update(bad.clone(), still_bad)).outcome,
            AdmissionOutcome::Deny(_)
        ));
        let typo = with_annotation(bad.clone(), "fledge.dev/rootservice", "web");
        assert!(matches!(
            decide(&update(bad.clone(), typo)).outcome,
            AdmissionOutcome::Deny(_)
        ));
        let newly_opted_in = update(without_label(bad.clone()), bad.clone());
        assert!(matches!(
            decide(&newly_opted_in).outcome,
            AdmissionOutcome::Deny(_)
        ));
        // fledge's own bookkeeping changes are not settings.
        let state_written = with_state(bad.clone(), Phase::Idle, "h");
        assert_eq!(
            decide(&update(bad, state_written)).outcome,
            AdmissionOutcome::Allow(AllowReason::TemplateUnchanged)
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
        assert_ne!(req.object.as_ref().unwrap().template().unwrap(), template);
        assert_eq!(
            decide(&req).outcome,
            AdmissionOutcome::Allow(AllowReason::TemplateUnchanged)
        );
    }

    #[test]
    fn responses_carry_uid_patch_and_warnings() {
        let req = update(deployment("web:1"), deployment("web:2"));
        let d = decide(&req);
        let answer = |req: &ReviewRequest, d: &Decision| -> Value {
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
        let AdmissionOutcome::Patch(_, expected) = &d.outcome else {
            panic!("{}", reason(&d))
        };
        assert_eq!(serde_json::from_slice::<Patch>(&patch).unwrap(), *expected);
        assert_eq!(r["warnings"].as_array().unwrap().len(), 1);
        let denied = request(
            "CREATE",
            with_annotation(deployment("web:1"), ANNOTATION_STEPS, "nope"),
            None,
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

    #[test]
    fn the_pod_ratio_router_warns_of_weights_its_pods_cannot_meet() {
        let pod_ratio = |image: &str, replicas: u64| {
            let mut d = with_annotation(deployment(image), "fledge.dev/router", "pod-ratio");
            d["spec"]["replicas"] = json!(replicas);
            d
        };
        // STEPS ask 5 % and 50 %: with 3 stable pods the nearest are 25 % and 50 %.
        let d = decide(&update(pod_ratio("web:1", 3), pod_ratio("web:2", 3)));
        assert!(is_patch(&d, PatchReason::Hold), "{}", reason(&d));
        let unmet: Vec<&String> = d
            .warnings
            .iter()
            .filter(|w| w.contains("pod-ratio"))
            .collect();
        assert_eq!(unmet.len(), 1, "{:?}", d.warnings);
        assert!(
            unmet[0].starts_with("fledge.dev/steps[0].setWeight: on the pod-ratio router asked 5"),
            "{}",
            unmet[0]
        );
        // At CREATE too; and none on the other routers.
        let d = decide(&request("CREATE", pod_ratio("web:1", 3), None, None));
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        let d = decide(&update(deployment("web:1"), deployment("web:2")));
        assert!(
            d.warnings.iter().all(|w| !w.contains("pod-ratio")),
            "{:?}",
            d.warnings
        );
    }

    /// `web` held with v2 under `RolloutPolicy shop/defaults` (no steps of its own), the policy
    /// fixed in the canary's state.
    fn under_policy(phase: Phase) -> (Value, crate::core::policy::Policy) {
        let policy = crate::core::policy::tests::mk_policy("shop", "defaults", 0, "web");
        let mut state = mk_state(
            phase,
            &crate::core::builders::mk_hash("web:2"),
            1,
            Weight::ZERO,
        );
        state.policy = Some(Box::new(policy.clone()));
        let mut d = crate::core::builders::with_state(held("web:1", "web:2"), &state);
        d["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(ANNOTATION_STEPS);
        (d, policy)
    }

    #[test]
    fn a_canary_keeps_its_policy_in_the_webhook_too() {
        let (d, policy) = under_policy(Phase::Paused);
        let live = PolicySnapshot {
            policies: vec![policy],
            namespaces: Default::default(),
        };
        // A write that leaves the template alone (the controller's state, a scale) keeps the hold
        // whether the policy is there, edited or gone.
        for snapshot in [live, PolicySnapshot::default()] {
            let mut scaled = d.clone();
            scaled["spec"]["replicas"] = json!(6);
            let decision =
                super::decide(&request("UPDATE", scaled, Some(d.clone()), None), &snapshot);
            assert_eq!(
                decision.outcome,
                AdmissionOutcome::Allow(AllowReason::HoldIntact)
            );
        }
        // A new template is a new canary: the live policy decides, and without one it is released.
        let mut v3 = d.clone();
        v3["spec"]["template"] = crate::core::builders::mk_template("web:3");
        let decision = super::decide(
            &request("UPDATE", v3, Some(d.clone()), None),
            &PolicySnapshot::default(),
        );
        assert!(matches!(
            decision.outcome,
            AdmissionOutcome::Patch(PatchReason::Released, _)
        ));
    }

    #[test]
    fn a_namespace_opted_in_deployment_without_annotations_gets_the_map_first() {
        let policy = crate::core::policy::tests::mk_policy("shop", "defaults", 0, "web");
        let snapshot = PolicySnapshot {
            policies: vec![policy],
            namespaces: [(
                "shop".to_owned(),
                [(LABEL_ENABLED.to_owned(), "true".to_owned())].into(),
            )]
            .into(),
        };
        let bare = |image: &str| {
            let mut d = deployment(image);
            let meta = d["metadata"].as_object_mut().unwrap();
            meta.remove("annotations");
            meta["labels"] = json!({"app": "web"});
            d
        };
        let (old, new) = (bare("web:1"), bare("web:2"));
        let d = super::decide(&request("UPDATE", new.clone(), Some(old), None), &snapshot);
        let AdmissionOutcome::Patch(PatchReason::Hold, patch) = d.outcome else {
            panic!("{d:?}")
        };
        let mut stored = new;
        json_patch::patch(&mut stored, &patch).unwrap();
        assert_eq!(stored["metadata"]["annotations"][ANNOTATION_HOLD], "true");
        assert_eq!(stored["spec"]["paused"], true);
    }
}
