//! Rollout policies: `RolloutPolicy` (namespaced) and `ClusterRolloutPolicy` (`fledge.dev/v1alpha1`),
//! which a platform team writes once for many Deployments: defaults (steps, checks, router, progress
//! deadline) that a Deployment's own annotations override, and guard-rails that they cannot break.
//!
//! The CRDs are generated from the types here (`fledge crds`); what the API server can check on its
//! own (types, enums, patterns, CEL rules) is in the schema, and the rest (the steps and checks
//! themselves, time zones) is checked by fledge with the same parser as the annotations.
//!
//! Pure: [`PolicySnapshot`] is the plain value the webhook and the controller fill from their watches.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use kube::core::{CustomResourceExt, Selector, SelectorExt};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod merge;
pub mod window;

pub use merge::resolve;
pub use window::{PromotionWindows, WindowError};

/// Names a policy for a Deployment: a `RolloutPolicy` in its namespace, else a `ClusterRolloutPolicy`.
pub const ANNOTATION_POLICY: &str = "fledge.dev/policy";
/// The API group and version of the policy CRDs.
pub const GROUP: &str = "fledge.dev";
pub const VERSION: &str = "v1alpha1";

/// What both kinds of policy hold; a `ClusterRolloutPolicy` also has a `namespaceSelector`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.httpRoutes) || (has(self.router) && self.router == 'gateway-api')")
        .message("httpRoutes names the HTTPRoutes of router gateway-api; set router: gateway-api or remove httpRoutes"),
    validation = Rule::new("!has(self.guardRails) || !has(self.guardRails.requiredChecks) || self.guardRails.requiredChecks.all(c, has(self.analysis) && self.analysis.exists(a, a.name == c))")
        .message("every name in guardRails.requiredChecks must be a check of spec.analysis"),
    validation = Rule::new("!has(self.guardRails) || !has(self.guardRails.allowedRouters) || !has(self.router) || self.router in self.guardRails.allowedRouters")
        .message("router must be one of guardRails.allowedRouters"),
)]
pub struct PolicyRules {
    /// The Deployments this policy governs, by label; an empty selector selects all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Of the matching policies, the one with the highest priority applies.
    #[serde(default)]
    pub priority: i32,
    /// The steps, as the items of `fledge.dev/steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "steps_schema")]
    pub steps: Option<Vec<Value>>,
    /// The checks, as the items of `fledge.dev/analysis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "analysis_schema")]
    pub analysis: Option<Vec<Value>>,
    /// As `fledge.dev/router`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "router_schema")]
    pub router: Option<RouterName>,
    /// As `fledge.dev/http-routes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub http_routes: Option<Vec<String>>,
    /// The canary's readiness deadline, for Deployments that keep Kubernetes' default (600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_rails: Option<GuardRails>,
    /// Promotions and weight increases wait for one of these windows; none: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub promotion_windows: Option<Vec<PromotionWindow>>,
}

// Equality of policies is total: no floating-point fields (steps and checks are JSON values,
// whose numbers compare as written), so `Eq` holds although `LabelSelector` only derives
// `PartialEq`. The rollout state keeps the policy it started with, and the state is `Eq`.
impl Eq for PolicyRules {}
impl Eq for Policy {}

/// The routers of `fledge.dev/router`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RouterName {
    #[serde(rename = "smi")]
    Smi,
    #[serde(rename = "gateway-api")]
    GatewayApi,
    #[serde(rename = "pod-ratio")]
    PodRatio,
}

impl RouterName {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterName::Smi => "smi",
            RouterName::GatewayApi => "gateway-api",
            RouterName::PodRatio => "pod-ratio",
        }
    }
}

/// Rules a Deployment's annotations cannot break.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardRails {
    /// The largest rise of the canary's weight from one `setWeight` step to the next (from 0 at
    /// the start), in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_step_weight: Option<i32>,
    /// The least time paused between two weight steps (`1m`, `30s`); an untimed pause counts as
    /// long enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"),
        length(min = 2, max = 16)
    )]
    pub min_pause: Option<String>,
    /// Checks of `spec.analysis` that every canary runs, whatever its annotations say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 32), inner(length(min = 1, max = 63)))]
    pub required_checks: Option<Vec<String>>,
    /// The routers a Deployment may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(min = 1, max = 3))]
    pub allowed_routers: Option<Vec<RouterName>>,
}

/// Days and local times in an IANA time zone when canaries may promote or gain weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.start < self.end").message("start must be before end (times are HH:MM, end may be 24:00)"))]
pub struct PromotionWindow {
    #[schemars(length(min = 1, max = 7))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub days: Vec<Weekday>,
    /// `HH:MM`, local time.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), length(max = 5))]
    pub start: String,
    /// `HH:MM`, local time, after `start`; `24:00` is the end of the day.
    #[schemars(
        regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"),
        length(max = 5)
    )]
    pub end: String,
    /// An IANA time zone such as `Europe/Berlin`; default `UTC`.
    #[serde(default = "utc")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A plain string enum: schemars would add `null` to the values of an `Option`'s enum.
fn router_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "As `fledge.dev/router`.",
        "type": "string",
        "enum": ["smi", "gateway-api", "pod-ratio"]
    })
}

/// The steps: each item one step kind, as in `fledge.dev/steps`; fledge checks the rest.
fn steps_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let open = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 64,
        "items": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "description": "One step: setWeight, pause, analysis, setHeaderRoute or setMirrorRoute.",
            "properties": {
                "setWeight": {"type": "number", "minimum": 0, "maximum": 100},
                "pause": {"type": "object", "properties": {"duration": {"type": "string", "maxLength": 32}}},
                "analysis": {"type": "object", "required": ["checks"], "properties": {
                    "checks": {"type": "array", "minItems": 1, "items": {"type": "string", "maxLength": 63}}
                }},
                "setHeaderRoute": open,
                "setMirrorRoute": open,
            }
        }
    })
}

/// The checks, as in `fledge.dev/analysis`: named; the provider's fields (a Job's whole spec among
/// them) are kept as written and checked by fledge, which keeps the CRD small.
fn analysis_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 32,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 63}},
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// What fledge reports on a policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: whether fledge can use the policy, and if not, why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How many Deployments the policy governs.
    #[serde(default)]
    pub deployments: i32,
}

/// A namespaced policy: governs Deployments in its own namespace.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fledge.dev",
    version = "v1alpha1",
    kind = "RolloutPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "rp",
    category = "fledge",
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Deployments","type":"integer","jsonPath":".status.deployments"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct RolloutPolicySpec {
    #[serde(flatten)]
    pub rules: PolicyRules,
}

/// A cluster-wide policy: governs Deployments in the namespaces its `namespaceSelector` selects.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fledge.dev",
    version = "v1alpha1",
    kind = "ClusterRolloutPolicy",
    status = "PolicyStatus",
    shortname = "crp",
    category = "fledge",
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Deployments","type":"integer","jsonPath":".status.deployments"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRolloutPolicySpec {
    /// The namespaces whose Deployments this policy governs; none: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(flatten)]
    pub rules: PolicyRules,
}

/// Both CRDs as one YAML stream, as `fledge crds` prints it and `charts/fledge/crds/` keeps it.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::from("# Generated by `fledge crds`; do not edit.\n");
    for crd in [RolloutPolicy::crd(), ClusterRolloutPolicy::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

/// Which kind of policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    RolloutPolicy,
    ClusterRolloutPolicy,
}

/// A policy's identity: `RolloutPolicy shop/defaults` or `ClusterRolloutPolicy strict`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for PolicyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{:?} {ns}/{}", self.kind, self.name),
            None => write!(f, "{:?} {}", self.kind, self.name),
        }
    }
}

/// One policy as fledge uses it: who it is, and what it says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub id: PolicyId,
    #[serde(default)]
    pub generation: i64,
    /// The cluster policy's namespace selector (`None` for namespaced policies: their own namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    pub rules: PolicyRules,
}

impl Policy {
    pub fn namespaced(policy: &RolloutPolicy) -> Policy {
        Policy::of(
            PolicyKind::RolloutPolicy,
            &policy.metadata,
            None,
            &policy.spec.rules,
        )
    }

    pub fn cluster(policy: &ClusterRolloutPolicy) -> Policy {
        Policy::of(
            PolicyKind::ClusterRolloutPolicy,
            &policy.metadata,
            policy.spec.namespace_selector.clone(),
            &policy.spec.rules,
        )
    }

    fn of(
        kind: PolicyKind,
        meta: &ObjectMeta,
        namespace_selector: Option<LabelSelector>,
        rules: &PolicyRules,
    ) -> Policy {
        Policy {
            id: PolicyId {
                kind,
                // A cluster policy has none; the API server never gives it one.
                namespace: meta
                    .namespace
                    .clone()
                    .filter(|_| kind == PolicyKind::RolloutPolicy),
                name: meta.name.clone().unwrap_or_default(),
            },
            generation: meta.generation.unwrap_or_default(),
            namespace_selector,
            rules: rules.clone(),
        }
    }

    /// Whether it governs a Deployment with `labels` in namespace `namespace` (labelled `ns_labels`).
    pub fn selects(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        ns_labels: &BTreeMap<String, String>,
    ) -> bool {
        let in_scope = match (&self.id.namespace, &self.namespace_selector) {
            (Some(own), _) => own == namespace,
            (None, None) => true,
            (None, Some(sel)) => selector_matches(sel, ns_labels),
        };
        in_scope
            && self
                .rules
                .selector
                .as_ref()
                .is_none_or(|sel| selector_matches(sel, labels))
    }

    /// Whether the policy brings steps of its own.
    pub fn has_steps(&self) -> bool {
        self.rules.steps.as_ref().is_some_and(|s| !s.is_empty())
    }
}

/// A label selector that cannot be read (an unknown operator) selects nothing: a broken policy
/// must not take Deployments over. The API server refuses such selectors in Deployments, but a
/// policy's selector is only as good as its schema.
fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// What the webhook and the controller know of policies and namespaces, from their watches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySnapshot {
    pub policies: Vec<Policy>,
    /// The labels of each namespace, by name: namespace opt-in and cluster policies' selectors.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// Why no policy can be chosen for a Deployment.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error(
        "{ANNOTATION_POLICY}: no RolloutPolicy {name:?} in namespace {namespace:?} and no ClusterRolloutPolicy {name:?}; create it or remove the annotation"
    )]
    Missing { namespace: String, name: String },
    #[error(
        "{first} and {second} both select this Deployment with priority {priority}; give one a higher priority, or name one in {ANNOTATION_POLICY}"
    )]
    Tie {
        first: PolicyId,
        second: PolicyId,
        priority: i32,
    },
    #[error(
        "{ANNOTATION_POLICY}: {id} does not select this Deployment (its selector or namespaceSelector does not match)"
    )]
    NotSelected { id: PolicyId },
}

impl PolicySnapshot {
    /// The policies and Namespaces among `objects` (manifests, for `fledge plan`); other kinds are
    /// skipped. A policy that does not read as its kind is an error naming it.
    pub fn from_objects<'o>(
        objects: impl IntoIterator<Item = &'o Value>,
    ) -> Result<PolicySnapshot, String> {
        let mut snapshot = PolicySnapshot::default();
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let read = |e: serde_json::Error| format!("{kind} {name}: {e}");
            match kind {
                "RolloutPolicy" => {
                    let mut p: RolloutPolicy =
                        serde_json::from_value(object.clone()).map_err(read)?;
                    p.metadata
                        .namespace
                        .get_or_insert_with(|| "default".to_owned());
                    snapshot.policies.push(Policy::namespaced(&p));
                }
                "ClusterRolloutPolicy" => {
                    let p: ClusterRolloutPolicy =
                        serde_json::from_value(object.clone()).map_err(read)?;
                    snapshot.policies.push(Policy::cluster(&p));
                }
                "Namespace" => {
                    let labels = object["metadata"]["labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect();
                    snapshot.namespaces.insert(name.to_owned(), labels);
                }
                _ => {}
            }
        }
        Ok(snapshot)
    }

    /// The labels of a namespace (empty when unknown).
    pub fn namespace_labels(&self, namespace: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.get(namespace).unwrap_or(&EMPTY)
    }

    /// Whether the namespace carries `fledge.dev/enabled: "true"`.
    pub fn namespace_opted_in(&self, namespace: &str) -> bool {
        self.namespace_labels(namespace)
            .get(crate::core::spec::LABEL_ENABLED)
            .is_some_and(|v| v == "true")
    }

    /// The policy that governs a Deployment: the one `fledge.dev/policy` names (namespaced first,
    /// then cluster), else the selecting one with the highest priority; two at the top are an error.
    pub fn select(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<&Policy>, SelectionError> {
        let ns_labels = self.namespace_labels(namespace);
        if let Some(name) = annotations.get(ANNOTATION_POLICY) {
            let named = |kind: PolicyKind| {
                self.policies.iter().find(|p| {
                    p.id.kind == kind
                        && p.id.name == *name
                        && (kind == PolicyKind::ClusterRolloutPolicy
                            || p.id.namespace.as_deref() == Some(namespace))
                })
            };
            let policy = named(PolicyKind::RolloutPolicy)
                .or_else(|| named(PolicyKind::ClusterRolloutPolicy))
                .ok_or_else(|| SelectionError::Missing {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                })?;
            // A named policy still has to be in scope: a team cannot pick another namespace's
            // policy, nor a cluster policy its platform team aimed elsewhere.
            if !policy.selects(namespace, labels, ns_labels) {
                return Err(SelectionError::NotSelected {
                    id: policy.id.clone(),
                });
            }
            return Ok(Some(policy));
        }
        let mut matching: Vec<&Policy> = self
            .policies
            .iter()
            .filter(|p| p.selects(namespace, labels, ns_labels))
            .collect();
        matching.sort_by(|a, b| {
            b.rules
                .priority
                .cmp(&a.rules.priority)
                .then_with(|| a.id.cmp(&b.id))
        });
        match matching.as_slice() {
            [first, second, ..] if first.rules.priority == second.rules.priority => {
                Err(SelectionError::Tie {
                    first: first.id.clone(),
                    second: second.id.clone(),
                    priority: first.rules.priority,
                })
            }
            [first, ..] => Ok(Some(first)),
            [] => Ok(None),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
