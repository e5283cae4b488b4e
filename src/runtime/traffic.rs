//! All traffic to the stable pods, per router: the write an abort, a rollback and the end of a
//! canary make before anything else. The controller and `fledge abort` share it, so that a user's
//! abort moves traffic before it writes the state, whatever the router.

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::core::admission::FIELD_MANAGER;
use crate::core::objects::{self, LABEL_MANAGED_BY, SplitApi};
use crate::core::routes;
use crate::core::spec::{ANNOTATION_ROOT_SERVICE, CANARY_SUFFIX, Router, STABLE_SUFFIX};

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Objects(#[from] objects::ObjectError),
}

/// Where the traffic objects of one Deployment live.
pub struct TrafficObjects<'a> {
    pub client: &'a Client,
    pub namespace: &'a str,
    /// The user's Deployment, as JSON.
    pub deployment: &'a Value,
    /// The TrafficSplit version the cluster is written in.
    pub split_api: SplitApi,
}

impl TrafficObjects<'_> {
    fn name(&self) -> &str {
        self.deployment["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
    }

    fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), self.namespace, resource)
    }

    /// Sends all traffic to stable through `router`'s object, where it exists; a router whose API
    /// is not served has no object to turn. `saved` are the user's routes' rules as fledge found
    /// them (gateway mode), written back.
    pub async fn to_stable(
        &self,
        router: &Router,
        saved: &routes::SavedRules,
    ) -> Result<(), TrafficError> {
        let name = self.name();
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        match router {
            Router::Smi => {
                let splits = self.api(&split_resource(self.split_api));
                let Some(split) = not_served(splits.get_opt(name).await)? else {
                    return Ok(());
                };
                if rolled_out_to_stable(&split) {
                    return Ok(());
                }
                let apex = split.data["spec"]["service"].as_str().unwrap_or_default();
                let body = objects::split_to_stable(self.deployment, apex, self.split_api)?;
                splits.patch(name, &apply, &Patch::Apply(&body)).await?;
            }
            Router::GatewayApi { .. } => {
                let gamma = self.api(&route_resource());
                if let Some(route) = not_served(gamma.get_opt(name).await)?
                    && is_fledges(&route, name)
                {
                    let rules = rules_of(&route);
                    let root = route.data["spec"]["parentRefs"][0]["name"]
                        .as_str()
                        .unwrap_or_default();
                    let port = rules
                        .first()
                        .and_then(|r| r["backendRefs"][0].get("port"))
                        .cloned();
                    let body = objects::mesh_route_to_stable(self.deployment, root, port.as_ref())?;
                    if body["spec"]["rules"].as_array() != Some(&rules) {
                        gamma.patch(name, &apply, &Patch::Apply(&body)).await?;
                    }
                }
                self.restore_routes(saved).await?;
            }
            Router::PodRatio => {
                let scale = json!({"spec": {"replicas": 0}});
                let deployments =
                    self.api(&ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()));
                not_served(
                    deployments
                        .patch(
                            &format!("{name}{CANARY_SUFFIX}"),
                            &writer(),
                            &Patch::Merge(&scale),
                        )
                        .await
                        .map(Some),
                )?;
            }
        }
        Ok(())
    }

    /// Abort, rollback, promotion's end and opt-out: the user's routes get their rules back: the
    /// rules as they are now without fledge's fields, so that edits the user made since fledge
    /// saved them stay (`saved` gives back the exact weights).
    pub async fn restore_routes(&self, saved: &routes::SavedRules) -> Result<(), TrafficError> {
        let api = self.api(&route_resource());
        let name = self.name();
        let root = self.deployment["metadata"]["annotations"][ANNOTATION_ROOT_SERVICE]
            .as_str()
            .unwrap_or(name);
        let (stable, canary) = (
            format!("{name}{STABLE_SUFFIX}"),
            format!("{name}{CANARY_SUFFIX}"),
        );
        let backends = routes::Backends {
            namespace: self.namespace,
            root,
            stable: &stable,
            canary: &canary,
        };
        for (route_name, rules) in saved {
            // Gone, or the Gateway API with it: nothing to restore.
            let Some(route) = not_served(api.get_opt(route_name).await)? else {
                continue;
            };
            let current = rules_of(&route);
            let restored = routes::user_rules(&current, rules, &backends);
            if restored != current {
                self.write_rules(route_name, &route, restored).await?;
            }
        }
        Ok(())
    }

    /// Replaces `spec.rules` of a user's route (an atomic list: the whole list goes), on
    /// condition that the route is still the one read.
    pub async fn write_rules(
        &self,
        name: &str,
        route: &DynamicObject,
        rules: Vec<Value>,
    ) -> Result<(), TrafficError> {
        let patch = json!({
            "metadata": {"resourceVersion": route.resource_version()},
            "spec": {"rules": rules},
        });
        self.api(&route_resource())
            .patch(name, &writer(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// Parameters of fledge's own non-apply writes: its field manager, which the webhook recognises.
pub fn writer() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// A read or write of a resource that is not there (404), or whose API is not served: `None`.
pub fn not_served<T>(result: Result<Option<T>, kube::Error>) -> Result<Option<T>, kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        other => other,
    }
}

/// An HTTPRoute's `spec.rules`.
pub fn rules_of(route: &DynamicObject) -> Vec<Value> {
    route.data["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Whether `route` is the GAMMA route fledge made for Deployment `deployment` (a user's route of
/// the same name is never fledge's to change or delete).
pub fn is_fledges(route: &DynamicObject, deployment: &str) -> bool {
    let labels = route.labels();
    labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(FIELD_MANAGER)
        && labels.get(objects::LABEL_DEPLOYMENT).map(String::as_str) == Some(deployment)
}

/// Gateway API HTTPRoutes (v1).
pub fn route_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: routes::ROUTE_API_VERSION.into(),
        kind: routes::ROUTE_KIND.into(),
        plural: "httproutes".into(),
    }
}

/// Whether a TrafficSplit already sends nothing to the canary.
fn rolled_out_to_stable(split: &DynamicObject) -> bool {
    split.data["spec"]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["service"]
                .as_str()
                .is_some_and(|s| s.ends_with(CANARY_SUFFIX))
        })
        .all(|b| b["weight"].as_u64() == Some(0) || b["weight"].as_str() == Some("0"))
}

pub fn split_resource(api: SplitApi) -> ApiResource {
    let (group, version) = api
        .api_version()
        .split_once('/')
        .unwrap_or(("split.smi-spec.io", "v1alpha2"));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api.api_version().into(),
        kind: "TrafficSplit".into(),
        plural: "trafficsplits".into(),
    }
}
