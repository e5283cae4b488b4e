//! `fledge policies`: each policy, whether fledge can use it, and the Deployments it governs.

use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, ListParams};
use serde::Serialize;
use serde_json::Value;

use super::CommandError;
use crate::core::observe::DeploymentFacts;
use crate::core::policy::{PolicySnapshot, merge};
use crate::runtime::policies as policy_watch;

/// One policy as `fledge policies` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRow {
    /// `RolloutPolicy shop/defaults`, `ClusterRolloutPolicy strict`.
    pub policy: String,
    pub priority: i32,
    /// Why fledge cannot use it; empty when it can.
    pub problems: Vec<String>,
    /// `namespace/name` of each Deployment it governs.
    pub deployments: Vec<String>,
}

/// The rows for `deployments` (JSON as the API server sends them) under `policies`, and one row
/// per Deployment whose policy cannot be chosen (two at the same priority, a missing name).
pub fn rows(policies: &PolicySnapshot, deployments: &[Value]) -> Vec<PolicyRow> {
    let mut rows: Vec<PolicyRow> = policies
        .policies
        .iter()
        .map(|p| PolicyRow {
            policy: p.id.to_string(),
            priority: p.rules.priority,
            problems: merge::policy_problems(p),
            deployments: Vec::new(),
        })
        .collect();
    for d in deployments {
        let facts = DeploymentFacts::read(d, policies);
        let Some(policy) = &facts.policy else {
            continue;
        };
        let key = format!(
            "{}/{}",
            d["metadata"]["namespace"].as_str().unwrap_or_default(),
            facts.name
        );
        let id = policy.id.to_string();
        match rows.iter_mut().find(|r| r.policy == id) {
            Some(row) => row.deployments.push(key),
            // A canary in flight keeps a policy deleted since.
            None => rows.push(PolicyRow {
                policy: id,
                priority: policy.rules.priority,
                problems: vec!["deleted; canaries that started under it hold".to_owned()],
                deployments: vec![key],
            }),
        }
    }
    rows.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.policy.cmp(&b.policy))
    });
    rows
}

/// Lists policies and Deployments in `namespace` (all namespaces when `None`).
pub async fn list(client: Client, namespace: Option<&str>) -> Result<Vec<PolicyRow>, CommandError> {
    let policies = policy_watch::list(&client, namespace).await?;
    let api: Api<Deployment> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let deployments = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows(&policies, &deployments))
}

/// The table `fledge policies` prints.
pub fn text(rows: &[PolicyRow]) -> String {
    if rows.is_empty() {
        return "no RolloutPolicy or ClusterRolloutPolicy\n".to_owned();
    }
    let width = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = format!("{:<width$}  PRIORITY  DEPLOYMENTS\n", "POLICY");
    for r in rows {
        let governed = if r.deployments.is_empty() {
            "-".to_owned()
        } else {
            r.deployments.join(", ")
        };
        out += &format!("{:<width$}  {:>8}  {governed}\n", r.policy, r.priority);
        for p in &r.problems {
            out += &format!("  ! {p}\n");
        }
    }
    out
}
