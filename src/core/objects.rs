//! The objects fledge wants to exist for a canary, computed from plain values.
//!
//! For Deployment `web` with root Service `web`: Deployment `web-canary`, Services `web-canary` and
//! `web-stable`, and TrafficSplit `web`. All are owned by the user's Deployment, so they go when it
//! goes; the root Service itself is never modified. Objects are JSON values so that the canary's pod
//! template travels exactly as the user wrote it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value, json};

use crate::core::podratio::PodShare;
use crate::core::routes::{self, Backends, RouteError, RouteExtras};
use crate::core::spec::{
    ANNOTATION_CANARY_HASH, CANARY_SUFFIX, LABEL_ENABLED, LABEL_TRACK, Router, STABLE_SUFFIX,
    Weight,
};

/// Label on every object fledge creates.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the Deployment an object belongs to.
pub const LABEL_DEPLOYMENT: &str = "fledge.dev/deployment";
/// Value of [`LABEL_TRACK`] on canary pods.
pub const TRACK_CANARY: &str = "canary";
/// The label Deployments put on each ReplicaSet's pods.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("Deployment {0}: {1} is missing")]
    DeploymentField(String, &'static str),
    #[error("Service {0}: {1}")]
    RootService(String, String),
    #[error("{0}")]
    Route(#[from] RouteError),
}

/// The SMI API group of TrafficSplits, and their kind.
pub const SPLIT_GROUP: &str = "split.smi-spec.io";
pub const SPLIT_KIND: &str = "TrafficSplit";

/// The TrafficSplit API version to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SplitApi {
    V1Alpha1,
    #[default]
    V1Alpha2,
    V1Alpha3,
    V1Alpha4,
}

impl SplitApi {
    pub fn api_version(self) -> &'static str {
        match self {
            SplitApi::V1Alpha1 => "split.smi-spec.io/v1alpha1",
            SplitApi::V1Alpha2 => "split.smi-spec.io/v1alpha2",
            SplitApi::V1Alpha3 => "split.smi-spec.io/v1alpha3",
            SplitApi::V1Alpha4 => "split.smi-spec.io/v1alpha4",
        }
    }
}

impl fmt::Display for SplitApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_version().trim_start_matches("split.smi-spec.io/"))
    }
}

impl FromStr for SplitApi {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim_start_matches("split.smi-spec.io/") {
            "v1alpha1" => Ok(SplitApi::V1Alpha1),
            "v1alpha2" => Ok(SplitApi::V1Alpha2),
            "v1alpha3" => Ok(SplitApi::V1Alpha3),
            "v1alpha4" => Ok(SplitApi::V1Alpha4),
            other => Err(format!(
                "{other:?} is not a TrafficSplit version; use v1alpha1, v1alpha2, v1alpha3 or v1alpha4"
            )),
        }
    }
}

/// What the desired objects are computed from.
pub struct Inputs<'a> {
    /// The user's Deployment as JSON, held: its `spec.template` is the canary's, the stable pods
    /// run from the ReplicaSet of `stable_pod_template_hash`.
    pub deployment: &'a Value,
    /// The hash of `spec.template`, recorded on the canary Deployment (`fledge.dev/canary-hash`) so
    /// that its status can be told apart from that of an earlier canary.
    pub canary_hash: &'a str,
    /// The root Service clients address.
    pub root_service: &'a Value,
    /// `pod-template-hash` of the stable ReplicaSet's pods.
    pub stable_pod_template_hash: &'a str,
    /// The traffic share the canary is sized for (it can run ahead of `weight`: capacity first,
    /// traffic after).
    pub size: Weight,
    /// Canary traffic share now.
    pub weight: Weight,
    pub router: &'a Router,
    /// The header routes and mirrors in effect (Gateway API only).
    pub extras: &'a RouteExtras,
    pub split_api: SplitApi,
}

/// The objects fledge owns for one canary.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub canary_deployment: Value,
    pub canary_service: Value,
    pub stable_service: Value,
    /// The TrafficSplit (`smi`) or the GAMMA HTTPRoute (`gateway-api` without routes of the
    /// user's); none for pod ratio and for the user's own routes, which fledge edits instead.
    pub traffic: Option<Value>,
}

impl Desired {
    pub fn all(&self) -> Vec<&Value> {
        [
            Some(&self.canary_deployment),
            Some(&self.canary_service),
            Some(&self.stable_service),
            self.traffic.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

pub fn desired(inputs: &Inputs) -> Result<Desired, ObjectError> {
    let owner = Owner::of(inputs.deployment)?;
    let root_name = str_at(inputs.root_service, &["metadata", "name"]).unwrap_or_default();
    let (ports, root_selector) = root_service_parts(root_name, inputs.root_service)?;
    let canary_name = format!("{}{CANARY_SUFFIX}", owner.name);
    let stable_name = format!("{}{STABLE_SUFFIX}", owner.name);

    let mut canary_selector = root_selector.clone();
    canary_selector.insert(LABEL_TRACK.into(), TRACK_CANARY.into());
    let mut stable_selector = root_selector;
    stable_selector.insert(
        POD_TEMPLATE_HASH.into(),
        inputs.stable_pod_template_hash.into(),
    );

    let traffic = match inputs.router {
        Router::Smi => Some(traffic_split(
            &owner,
            inputs.split_api,
            root_name,
            &stable_name,
            &canary_name,
            inputs.weight,
        )),
        Router::GatewayApi { http_routes } if http_routes.is_empty() => Some(mesh_route(
            &owner,
            root_name,
            routes::mesh_port(&ports),
            inputs.weight,
            inputs.extras,
        )?),
        Router::GatewayApi { .. } | Router::PodRatio => None,
    };
    Ok(Desired {
        canary_deployment: canary_deployment(
            &owner,
            inputs.deployment,
            inputs.canary_hash,
            canary_deployment_replicas(
                inputs.router,
                inputs.deployment,
                inputs.size,
                inputs.weight,
            ),
        )?,
        canary_service: service(&owner, &canary_name, &ports, canary_selector),
        stable_service: service(&owner, &stable_name, &ports, stable_selector),
        traffic,
    })
}

/// The TrafficSplit of Deployment `deployment` with all traffic on its stable pods: what an abort,
/// a rollback and the end of a canary write before anything is removed.
pub fn split_to_stable(
    deployment: &Value,
    root_service: &str,
    split_api: SplitApi,
) -> Result<Value, ObjectError> {
    let owner = Owner::of(deployment)?;
    Ok(traffic_split(
        &owner,
        split_api,
        root_service,
        &format!("{}{STABLE_SUFFIX}", owner.name),
        &format!("{}{CANARY_SUFFIX}", owner.name),
        Weight::ZERO,
    ))
}

/// fledge's GAMMA HTTPRoute of Deployment `deployment` with all traffic on its stable pods and no
/// header route or mirror; `port` as the route had it.
pub fn mesh_route_to_stable(
    deployment: &Value,
    root_service: &str,
    port: Option<&Value>,
) -> Result<Value, ObjectError> {
    let owner = Owner::of(deployment)?;
    mesh_route(
        &owner,
        root_service,
        port,
        Weight::ZERO,
        &RouteExtras::default(),
    )
}

/// The canary Deployment's replicas, sized for `size` and carrying `weight`.
pub fn canary_deployment_replicas(
    router: &Router,
    deployment: &Value,
    size: Weight,
    weight: Weight,
) -> u64 {
    let stable_replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
    canary_pods(router, stable_replicas, size.max(weight))
}

/// The canary's replicas for `weight` on `router`: its share of the pods with pod ratio, else the
/// capacity for that share of traffic.
pub fn canary_pods(router: &Router, stable_replicas: u64, weight: Weight) -> u64 {
    match router {
        Router::PodRatio => PodShare::nearest(stable_replicas, weight).canary_pods,
        Router::Smi | Router::GatewayApi { .. } => canary_replicas(stable_replicas, weight),
    }
}

/// Canary pods for capacity: `ceil(stable × weight)`, at least one so the canary can become available.
pub fn canary_replicas(stable_replicas: u64, weight: Weight) -> u64 {
    let bp = u64::from(weight.basis_points());
    stable_replicas
        .saturating_mul(bp)
        .div_ceil(u64::from(Weight::FULL.basis_points()))
        .max(1)
}

/// The Deployment that owns everything fledge creates for it.
struct Owner {
    name: String,
    namespace: Option<String>,
    uid: Option<String>,
}

impl Owner {
    fn of(deployment: &Value) -> Result<Owner, ObjectError> {
        let name = str_at(deployment, &["metadata", "name"])
            .ok_or_else(|| ObjectError::DeploymentField("?".into(), "metadata.name"))?;
        Ok(Owner {
            name: name.to_owned(),
            namespace: str_at(deployment, &["metadata", "namespace"]).map(str::to_owned),
            uid: str_at(deployment, &["metadata", "uid"]).map(str::to_owned),
        })
    }

    /// Metadata for an owned object: labels, namespace, and the ownerReference (when the Deployment
    /// exists in a cluster and so has a uid).
    fn metadata(&self, name: &str, extra_labels: &BTreeMap<String, String>) -> Value {
        let mut labels = extra_labels.clone();
        labels.insert(LABEL_MANAGED_BY.into(), "fledge".into());
        labels.insert(LABEL_DEPLOYMENT.into(), self.name.clone());
        let mut meta = json!({"name": name, "labels": labels});
        if let Some(ns) = &self.namespace {
            meta["namespace"] = json!(ns);
        }
        if let Some(uid) = &self.uid {
            meta["ownerReferences"] = json!([{
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": self.name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }]);
        }
        meta
    }
}

fn canary_deployment(
    owner: &Owner,
    deployment: &Value,
    canary_hash: &str,
    replicas: u64,
) -> Result<Value, ObjectError> {
    let field = |f| ObjectError::DeploymentField(owner.name.clone(), f);
    let mut spec = deployment["spec"]
        .as_object()
        .cloned()
        .ok_or_else(|| field("spec"))?;
    let mut template = spec
        .get("template")
        .cloned()
        .ok_or_else(|| field("spec.template"))?;
    set_label(&mut template, LABEL_TRACK, TRACK_CANARY).ok_or_else(|| field("spec.template"))?;
    // On the pods too, so that the canary's ReplicaSets say which template they run.
    set_metadata(
        &mut template,
        "annotations",
        ANNOTATION_CANARY_HASH,
        canary_hash,
    )
    .ok_or_else(|| field("spec.template"))?;
    let mut selector = spec
        .get("selector")
        .cloned()
        .ok_or_else(|| field("spec.selector"))?;
    selector
        .as_object_mut()
        .ok_or_else(|| field("spec.selector"))?
        .entry("matchLabels")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| field("spec.selector.matchLabels"))?
        .insert(LABEL_TRACK.into(), json!(TRACK_CANARY));
    spec.insert("selector".into(), selector);
    spec.insert("template".into(), template);
    spec.insert("replicas".into(), json!(replicas));
    // A paused stable must not leave the canary paused: the canary has to become available.
    spec.remove("paused");

    // The canary carries the Deployment's labels but opts out: it is fledge's, not a canary target,
    // also in a namespace that opts every Deployment in (the webhook's namespace entry only calls
    // for Deployments without the label).
    let mut labels: BTreeMap<String, String> = deployment["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != LABEL_ENABLED)
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    labels.insert(LABEL_TRACK.into(), TRACK_CANARY.into());
    labels.insert(LABEL_ENABLED.into(), "false".into());
    let mut metadata = owner.metadata(&format!("{}{CANARY_SUFFIX}", owner.name), &labels);
    metadata["annotations"] = json!({ ANNOTATION_CANARY_HASH: canary_hash });
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": spec,
    }))
}

fn set_label(template: &mut Value, key: &str, value: &str) -> Option<()> {
    set_metadata(template, "labels", key, value)
}

/// Sets `metadata.<map>.<key>` of a pod template (`labels` or `annotations`).
fn set_metadata(template: &mut Value, map: &str, key: &str, value: &str) -> Option<()> {
    let object = template.as_object_mut()?;
    let metadata = object.entry("metadata").or_insert_with(|| json!({}));
    let entries = metadata
        .as_object_mut()?
        .entry(map)
        .or_insert_with(|| json!({}));
    entries.as_object_mut()?.insert(key.into(), json!(value));
    Some(())
}

/// The root Service's ports (as a ClusterIP Service takes them) and its selector.
fn root_service_parts(
    name: &str,
    service: &Value,
) -> Result<(Vec<Value>, BTreeMap<String, String>), ObjectError> {
    let err = |why: &str| ObjectError::RootService(name.to_owned(), why.to_owned());
    let ports = service["spec"]["ports"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            err("has no spec.ports; fledge copies them to the canary and stable Services")
        })?;
    let selector: BTreeMap<String, String> = service["spec"]["selector"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    if selector.is_empty() {
        return Err(err(
            "has no spec.selector; fledge needs it to tell canary and stable pods apart",
        ));
    }
    let ports = ports
        .iter()
        .map(|port| {
            // nodePort belongs to the root Service alone; a second Service may not claim it.
            let kept: Map<String, Value> = port
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "name" | "port" | "targetPort" | "protocol" | "appProtocol"
                    )
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Value::Object(kept)
        })
        .collect();
    Ok((ports, selector))
}

fn service(
    owner: &Owner,
    name: &str,
    ports: &[Value],
    selector: BTreeMap<String, String>,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(name, &BTreeMap::new()),
        "spec": {"type": "ClusterIP", "ports": ports, "selector": selector},
    })
}

/// SMI weights are relative; fledge writes basis points (stable + canary = 10000), so a 0.01 % step
/// is exact. v1alpha1 weights are quantities: whole numbers are valid quantities and also what
/// Linkerd's v1alpha2 view (served from v1alpha1 storage without conversion) reads as numbers, so
/// fledge never writes milli-quantities such as `500m` there.
fn traffic_split(
    owner: &Owner,
    api: SplitApi,
    apex: &str,
    stable: &str,
    canary: &str,
    weight: Weight,
) -> Value {
    let canary_weight = weight.basis_points();
    let stable_weight = Weight::FULL.basis_points() - canary_weight;
    json!({
        "apiVersion": api.api_version(),
        "kind": "TrafficSplit",
        "metadata": owner.metadata(&owner.name, &BTreeMap::new()),
        "spec": {
            "service": apex,
            "backends": [
                {"service": stable, "weight": stable_weight},
                {"service": canary, "weight": canary_weight},
            ],
        },
    })
}

/// The HTTPRoute fledge owns for a mesh (GAMMA): its parent is the root Service on `port`, its one
/// rule split between the stable and canary Services on that port, named after the Deployment
/// like the TrafficSplit.
fn mesh_route(
    owner: &Owner,
    root: &str,
    port: Option<&Value>,
    weight: Weight,
    extras: &RouteExtras,
) -> Result<Value, ObjectError> {
    let stable = format!("{}{STABLE_SUFFIX}", owner.name);
    let canary = format!("{}{CANARY_SUFFIX}", owner.name);
    let backends = Backends {
        namespace: owner.namespace.as_deref().unwrap_or_default(),
        root,
        stable: &stable,
        canary: &canary,
    };
    let rules = routes::split_rules(
        &owner.name,
        &[routes::mesh_rule(root, port)],
        &backends,
        weight,
        extras,
    )?;
    Ok(json!({
        "apiVersion": routes::ROUTE_API_VERSION,
        "kind": routes::ROUTE_KIND,
        "metadata": owner.metadata(&owner.name, &BTreeMap::new()),
        "spec": {"parentRefs": routes::mesh_parent(root, port), "rules": rules},
    }))
}

fn str_at<'v>(value: &'v Value, path: &[&str]) -> Option<&'v str> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `web`, held with the canary's template (`web:2`) in `spec.template`.
    fn deployment(replicas: u64) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "uid-1",
                "labels": {"app": "web", LABEL_ENABLED: "true"},
                "annotations": {"fledge.dev/steps": "- setWeight: 5"},
            },
            "spec": {
                "replicas": replicas,
                "progressDeadlineSeconds": 600,
                "selector": {"matchLabels": {"app": "web"}},
                "paused": true,
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:2"}], "futureField": 1}},
            },
        })
    }

    fn root_service() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
            },
        })
    }

    fn build(weight_bp: u16, api: SplitApi) -> Desired {
        desired(&Inputs {
            deployment: &deployment(4),
            canary_hash: "c2",
            root_service: &root_service(),
            stable_pod_template_hash: "7d9c6b5f4",
            size: Weight::from_basis_points(weight_bp).unwrap(),
            weight: Weight::from_basis_points(weight_bp).unwrap(),
            router: &Router::Smi,
            extras: &RouteExtras::default(),
            split_api: api,
        })
        .unwrap()
    }

    #[test]
    fn the_gamma_route_of_a_root_service_with_several_ports_splits_its_http_port_alone() {
        let mut root = root_service();
        root["spec"]["ports"] = json!([
            {"name": "grpc", "port": 9090, "targetPort": 9090},
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "metrics", "port": 9100},
        ]);
        let d = desired(&Inputs {
            deployment: &deployment(4),
            canary_hash: "c2",
            root_service: &root,
            stable_pod_template_hash: "7d9c6b5f4",
            size: Weight::from_basis_points(500).unwrap(),
            weight: Weight::from_basis_points(500).unwrap(),
            router: &Router::GatewayApi {
                http_routes: vec![],
            },
            extras: &RouteExtras::default(),
            split_api: SplitApi::V1Alpha2,
        })
        .unwrap();
        let route = d.traffic.unwrap();
        assert_eq!(
            route["spec"]["parentRefs"],
            json!([{"group": "", "kind": "Service", "name": "web", "port": 80}]),
            "attached to the HTTP port only: requests on 9090 never go to port 80"
        );
        assert_eq!(
            route["spec"]["rules"][0]["backendRefs"],
            json!([
                {"name": "web-stable", "port": 80, "weight": 9500},
                {"name": "web-canary", "port": 80, "weight": 500},
            ])
        );
        assert_eq!(
            d.canary_service["spec"]["ports"].as_array().unwrap().len(),
            3,
            "the canary and stable Services keep every port"
        );
        let to_stable = mesh_route_to_stable(&deployment(4), "web", Some(&json!(80))).unwrap();
        assert_eq!(to_stable["spec"]["parentRefs"], route["spec"]["parentRefs"]);
    }

    #[test]
    fn canary_deployment_runs_the_pending_template_on_its_own_track() {
        let d = build(500, SplitApi::V1Alpha2).canary_deployment;
        assert_eq!(d["metadata"]["name"], "web-canary");
        assert_eq!(d["metadata"]["namespace"], "shop");
        assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(d["metadata"]["labels"][LABEL_TRACK], "canary");
        assert_eq!(
            d["metadata"]["labels"][LABEL_ENABLED], "false",
            "the canary must be opted out, also of an opted-in namespace"
        );
        assert_eq!(
            d["metadata"]["annotations"],
            json!({ANNOTATION_CANARY_HASH: "c2"})
        );
        assert_eq!(
            d["spec"]["selector"]["matchLabels"],
            json!({"app": "web", LABEL_TRACK: "canary"})
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"],
            json!({"app": "web", LABEL_TRACK: "canary"})
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"],
            json!({ ANNOTATION_CANARY_HASH: "c2" })
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "web:2"
        );
        assert_eq!(d["spec"]["template"]["spec"]["futureField"], 1);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        assert_eq!(d["spec"]["replicas"], 1);
        assert!(
            d["spec"].get("paused").is_none(),
            "the canary itself is never paused"
        );
    }

    #[test]
    fn the_canary_is_sized_ahead_of_its_traffic() {
        let ahead = desired(&Inputs {
            deployment: &deployment(4),
            canary_hash: "c2",
            root_service: &root_service(),
            stable_pod_template_hash: "h",
            size: Weight::from_basis_points(5000).unwrap(),
            weight: Weight::from_basis_points(500).unwrap(),
            router: &Router::Smi,
            extras: &RouteExtras::default(),
            split_api: SplitApi::V1Alpha2,
        })
        .unwrap();
        assert_eq!(ahead.canary_deployment["spec"]["replicas"], 2);
        assert_eq!(ahead.traffic.unwrap()["spec"]["backends"][1]["weight"], 500);
    }

    #[test]
    fn canary_replicas_follow_the_weight_rounding_up() {
        assert_eq!(
            canary_replicas(4, Weight::from_basis_points(500).unwrap()),
            1
        );
        assert_eq!(
            canary_replicas(4, Weight::from_basis_points(2600).unwrap()),
            2
        );
        assert_eq!(canary_replicas(4, Weight::FULL), 4);
        assert_eq!(
            canary_replicas(10, Weight::from_basis_points(1).unwrap()),
            1
        );
        assert_eq!(canary_replicas(0, Weight::FULL), 1);
        assert_eq!(canary_replicas(3, Weight::ZERO), 1);
        assert_eq!(
            canary_replicas(1_000_000, Weight::from_basis_points(1).unwrap()),
            100
        );
    }

    #[test]
    fn services_copy_ports_and_split_the_selector() {
        let d = build(500, SplitApi::V1Alpha2);
        let ports = json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]);
        assert_eq!(d.canary_service["metadata"]["name"], "web-canary");
        assert_eq!(d.canary_service["spec"]["ports"], ports);
        assert_eq!(d.canary_service["spec"]["type"], "ClusterIP");
        assert_eq!(
            d.canary_service["spec"]["selector"],
            json!({"app": "web", LABEL_TRACK: "canary"})
        );
        assert_eq!(d.stable_service["metadata"]["name"], "web-stable");
        assert_eq!(d.stable_service["spec"]["ports"], ports);
        assert_eq!(
            d.stable_service["spec"]["selector"],
            json!({"app": "web", POD_TEMPLATE_HASH: "7d9c6b5f4"})
        );
        for object in d.all() {
            assert_eq!(object["metadata"]["labels"][LABEL_MANAGED_BY], "fledge");
            assert_eq!(object["metadata"]["labels"][LABEL_DEPLOYMENT], "web");
            assert_eq!(object["metadata"]["ownerReferences"][0]["name"], "web");
        }
    }

    #[test]
    fn split_weights_are_exact_basis_points_in_every_version() {
        for api in [
            SplitApi::V1Alpha1,
            SplitApi::V1Alpha2,
            SplitApi::V1Alpha3,
            SplitApi::V1Alpha4,
        ] {
            let split = build(1, api).traffic.unwrap();
            assert_eq!(split["apiVersion"], api.api_version());
            assert_eq!(split["metadata"]["name"], "web");
            assert_eq!(
                split["spec"],
                json!({"service": "web", "backends": [
                    {"service": "web-stable", "weight": 9999},
                    {"service": "web-canary", "weight": 1},
                ]})
            );
            assert_eq!(api.to_string().parse::<SplitApi>(), Ok(api));
        }
        assert!("v2".parse::<SplitApi>().is_err());
    }

    #[test]
    fn root_service_problems_are_named() {
        let mut no_selector = root_service();
        no_selector["spec"]
            .as_object_mut()
            .unwrap()
            .remove("selector");
        let err = desired(&Inputs {
            deployment: &deployment(1),
            canary_hash: "c2",
            root_service: &no_selector,
            stable_pod_template_hash: "h",
            size: Weight::ZERO,
            weight: Weight::ZERO,
            router: &Router::Smi,
            extras: &RouteExtras::default(),
            split_api: SplitApi::V1Alpha2,
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Service web: has no spec.selector"),
            "{err}"
        );
    }

    #[test]
    fn without_a_uid_there_is_no_owner_reference() {
        let mut d = deployment(2);
        d["metadata"].as_object_mut().unwrap().remove("uid");
        let desired = desired(&Inputs {
            deployment: &d,
            canary_hash: "c2",
            root_service: &root_service(),
            stable_pod_template_hash: "h",
            size: Weight::ZERO,
            weight: Weight::ZERO,
            router: &Router::Smi,
            extras: &RouteExtras::default(),
            split_api: SplitApi::V1Alpha2,
        })
        .unwrap();
        assert!(
            desired
                .all()
                .iter()
                .all(|o| o["metadata"].get("ownerReferences").is_none())
        );
    }
}
