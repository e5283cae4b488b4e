//! Built-in kinds that the Helm chart installs and nothing in the stand-in acts on: decoded through
//! their k8s-openapi structs (so `fieldValidation=Strict` refuses unknown or misspelled fields, as
//! kube-apiserver does), stored, listed and watched like any other; no defaulting, no validation
//! beyond metadata.

use serde_json::Value;

use super::resources::{Builtin, ResourceDef};
use super::typed::round_trip;

/// The kinds served here, each a [`Builtin::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ServiceAccount,
    Secret,
    Role,
    RoleBinding,
    ClusterRole,
    ClusterRoleBinding,
    MutatingWebhookConfiguration,
    PodDisruptionBudget,
    /// Served and acted on: `crds.rs` serves the resources they define.
    CustomResourceDefinition,
}

/// Decodes `v` as the typed struct of `kind` and encodes it back.
pub fn decode(kind: Kind, v: &Value) -> Result<Value, String> {
    use k8s_openapi::api::{admissionregistration, core, policy, rbac};
    match kind {
        Kind::ServiceAccount => round_trip::<core::v1::ServiceAccount>(v),
        Kind::Secret => round_trip::<core::v1::Secret>(v),
        Kind::Role => round_trip::<rbac::v1::Role>(v),
        Kind::RoleBinding => round_trip::<rbac::v1::RoleBinding>(v),
        Kind::ClusterRole => round_trip::<rbac::v1::ClusterRole>(v),
        Kind::ClusterRoleBinding => round_trip::<rbac::v1::ClusterRoleBinding>(v),
        Kind::MutatingWebhookConfiguration => {
            round_trip::<admissionregistration::v1::MutatingWebhookConfiguration>(v)
        }
        Kind::PodDisruptionBudget => round_trip::<policy::v1::PodDisruptionBudget>(v),
        Kind::CustomResourceDefinition => round_trip::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(v),
    }
}

/// Their resource definitions, for the registry.
pub fn defs() -> Vec<ResourceDef> {
    let rbac = "rbac.authorization.k8s.io";
    let admission = "admissionregistration.k8s.io";
    [
        (
            Kind::ServiceAccount,
            "",
            "serviceaccounts",
            "ServiceAccount",
            true,
            "sa",
        ),
        (Kind::Secret, "", "secrets", "Secret", true, ""),
        (Kind::Role, rbac, "roles", "Role", true, ""),
        (
            Kind::RoleBinding,
            rbac,
            "rolebindings",
            "RoleBinding",
            true,
            "",
        ),
        (
            Kind::ClusterRole,
            rbac,
            "clusterroles",
            "ClusterRole",
            false,
            "",
        ),
        (
            Kind::ClusterRoleBinding,
            rbac,
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            "",
        ),
        (
            Kind::MutatingWebhookConfiguration,
            admission,
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            false,
            "",
        ),
        (
            Kind::PodDisruptionBudget,
            "policy",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            "pdb",
        ),
        (
            Kind::CustomResourceDefinition,
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            "crd",
        ),
    ]
    .into_iter()
    .map(|(kind, group, plural, name, namespaced, short)| {
        let mut def =
            ResourceDef::builtin(Builtin::Other(kind), group, "v1", plural, name, namespaced);
        def.short_names = Some(short)
            .filter(|s| !s.is_empty())
            .into_iter()
            .map(String::from)
            .collect();
        def.status_subresource = matches!(
            kind,
            Kind::PodDisruptionBudget | Kind::CustomResourceDefinition
        );
        def
    })
    .collect()
}
