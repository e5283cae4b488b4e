//! The resource types served, their versions and schemas, and the discovery documents.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::Deserialize as _;
use serde_json::{Map, Value, json};

/// Built-in kinds that have typed handling (decoding, defaulting, validation, controllers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Namespace,
    Service,
    ConfigMap,
    Pod,
    /// core/v1 Event (the storage form of both Event APIs).
    Event,
    /// events.k8s.io/v1 Event: the same stored objects as core/v1 Events, converted.
    EventsV1,
    Deployment,
    ReplicaSet,
    Lease,
    /// batch/v1 Job: selector generated on create, validated like upstream; its status is
    /// written by the test ([`super::super::ApiServer::complete_job`]), not by a controller.
    Job,
    /// Kinds the chart installs, served without behaviour of their own (`kinds.rs`).
    Other(super::kinds::Kind),
}

/// When `metadata.generation` moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// Not maintained (Services, Leases, Events, ...).
    None,
    /// Bumped when `spec` changes (ReplicaSets).
    Spec,
    /// Bumped when `spec` or `metadata.annotations` change (Deployments: annotations are copied
    /// to ReplicaSets, so the strategy counts them).
    SpecAndAnnotations,
    /// Bumped on any change outside `metadata` (and `status` when it is a subresource): custom
    /// resources.
    AllButMetadata,
}

#[derive(Clone, Debug)]
pub struct VersionDef {
    pub name: String,
    /// `openAPIV3Schema` of a custom resource version.
    pub schema: Option<Value>,
}

/// One served resource: a group, its served versions, and where its objects are stored.
#[derive(Clone, Debug)]
pub struct ResourceDef {
    pub group: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub versions: Vec<VersionDef>,
    /// Storage key shared by every API that serves the same objects (`events` for both Event
    /// APIs).
    pub storage: String,
    pub builtin: Option<Builtin>,
    pub status_subresource: bool,
    pub allow_create_on_update: bool,
    pub generation: Generation,
}

impl ResourceDef {
    pub(super) fn builtin(
        b: Builtin,
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
    ) -> Self {
        ResourceDef {
            group: group.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced,
            versions: vec![VersionDef {
                name: version.into(),
                schema: None,
            }],
            storage: super::status::qualified_resource(group, plural),
            builtin: Some(b),
            status_subresource: false,
            allow_create_on_update: false,
            generation: Generation::None,
        }
    }

    pub fn is_crd(&self) -> bool {
        self.builtin.is_none()
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v.name == version)
    }

    pub fn schema(&self, version: &str) -> Option<&Value> {
        self.versions
            .iter()
            .find(|v| v.name == version)
            .and_then(|v| v.schema.as_ref())
    }

    /// The version that discovery prefers (kube-aware version order).
    pub fn preferred_version(&self) -> &str {
        let mut names: Vec<&str> = self.versions.iter().map(|v| v.name.as_str()).collect();
        names.sort_by(|a, b| compare_kube_versions(b, a));
        names.first().copied().unwrap_or("v1")
    }
}

/// Kubernetes' version priority: GA > beta > alpha, then by major, then by minor.
pub fn compare_kube_versions(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<(u32, u64, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((3, major, 0));
        }
        let (stage, n) = if let Some(n) = tail.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((stage, major, n.parse().ok()?))
    }
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => b.cmp(a),
    }
}

/// All resources served.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub defs: Vec<Arc<ResourceDef>>,
}

/// The TrafficSplit CRD as the linkerd-smi extension ships it (v1alpha1, v1alpha2).
pub const TRAFFICSPLIT_LINKERD_CRD: &str = include_str!("../crds/trafficsplit-linkerd-smi.yaml");
/// The SMI SDK's TrafficSplit CRD (v1alpha4 served; v1alpha3 and v1alpha2 schemas, not served).
pub const TRAFFICSPLIT_SDK_CRD: &str = include_str!("../crds/trafficsplit-smi-sdk-v1alpha4.yaml");

/// Reads the CustomResourceDefinitions in a (multi-document) YAML text.
pub fn parse_crds(yaml: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if value.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition") {
            out.push(value);
        }
    }
    Ok(out)
}

/// A resource definition from a CRD, serving the versions that `serve` picks (all served ones
/// when `None`).
pub fn def_from_crd(crd: &Value, serve: Option<&[String]>) -> Result<ResourceDef, String> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let group = str_of(&spec["group"]);
    let plural = str_of(&names["plural"]);
    if group.is_empty() || plural.is_empty() {
        return Err("CRD without spec.group or spec.names.plural".into());
    }
    let mut versions = Vec::new();
    let mut status = false;
    for v in spec["versions"].as_array().into_iter().flatten() {
        let name = str_of(&v["name"]);
        let served = v["served"].as_bool().unwrap_or(false);
        let wanted = match serve {
            Some(list) => list.contains(&name),
            None => served,
        };
        if !wanted {
            continue;
        }
        if v["subresources"].get("status").is_some() {
            status = true;
        }
        versions.push(VersionDef {
            name,
            schema: v["schema"].get("openAPIV3Schema").cloned(),
        });
    }
    Ok(ResourceDef {
        group: group.clone(),
        plural: plural.clone(),
        singular: names["singular"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| str_of(&names["kind"]).to_lowercase()),
        kind: str_of(&names["kind"]),
        short_names: names["shortNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        categories: names["categories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        namespaced: spec["scope"].as_str() != Some("Cluster"),
        versions,
        storage: format!("{plural}.{group}"),
        builtin: None,
        status_subresource: status,
        allow_create_on_update: false,
        generation: Generation::AllButMetadata,
    })
}

/// The TrafficSplit resource serving `versions`, with each version's schema from the CRD that
/// defines it (linkerd-smi for v1alpha1/v1alpha2, the SMI SDK for v1alpha3/v1alpha4).
pub fn trafficsplit_def(versions: &[String]) -> ResourceDef {
    let linkerd = parse_crds(TRAFFICSPLIT_LINKERD_CRD).expect("embedded CRD parses");
    let sdk = parse_crds(TRAFFICSPLIT_SDK_CRD).expect("embedded CRD parses");
    let mut def = def_from_crd(&linkerd[0], Some(&[])).expect("embedded CRD is valid");
    for wanted in versions {
        let from = |crd: &Value| {
            crd["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"].as_str() == Some(wanted))
                .map(|v| v["schema"]["openAPIV3Schema"].clone())
        };
        let schema = if wanted == "v1alpha1" || wanted == "v1alpha2" {
            from(&linkerd[0]).or_else(|| from(&sdk[0]))
        } else {
            from(&sdk[0]).or_else(|| from(&linkerd[0]))
        };
        def.versions.push(VersionDef {
            name: wanted.clone(),
            schema,
        });
    }
    def
}

impl Registry {
    pub fn with_builtins() -> Self {
        use Builtin::*;
        let mut defs = Vec::new();
        let mut ns = ResourceDef::builtin(Namespace, "", "v1", "namespaces", "Namespace", false);
        ns.short_names = vec!["ns".into()];
        ns.status_subresource = true;
        defs.push(ns);
        let mut svc = ResourceDef::builtin(Service, "", "v1", "services", "Service", true);
        svc.short_names = vec!["svc".into()];
        svc.categories = vec!["all".into()];
        svc.status_subresource = true;
        defs.push(svc);
        let mut cm = ResourceDef::builtin(ConfigMap, "", "v1", "configmaps", "ConfigMap", true);
        cm.short_names = vec!["cm".into()];
        defs.push(cm);
        let mut pod = ResourceDef::builtin(Pod, "", "v1", "pods", "Pod", true);
        pod.short_names = vec!["po".into()];
        pod.categories = vec!["all".into()];
        pod.status_subresource = true;
        defs.push(pod);
        let mut ev = ResourceDef::builtin(Event, "", "v1", "events", "Event", true);
        ev.short_names = vec!["ev".into()];
        ev.allow_create_on_update = true;
        defs.push(ev);
        let mut ev1 =
            ResourceDef::builtin(EventsV1, "events.k8s.io", "v1", "events", "Event", true);
        ev1.short_names = vec!["ev".into()];
        ev1.allow_create_on_update = true;
        ev1.storage = "events".into();
        defs.push(ev1);
        let mut deploy =
            ResourceDef::builtin(Deployment, "apps", "v1", "deployments", "Deployment", true);
        deploy.short_names = vec!["deploy".into()];
        deploy.categories = vec!["all".into()];
        deploy.status_subresource = true;
        deploy.generation = Generation::SpecAndAnnotations;
        defs.push(deploy);
        let mut rs =
            ResourceDef::builtin(ReplicaSet, "apps", "v1", "replicasets", "ReplicaSet", true);
        rs.short_names = vec!["rs".into()];
        rs.categories = vec!["all".into()];
        rs.status_subresource = true;
        rs.generation = Generation::Spec;
        defs.push(rs);
        let mut lease =
            ResourceDef::builtin(Lease, "coordination.k8s.io", "v1", "leases", "Lease", true);
        lease.allow_create_on_update = true;
        defs.push(lease);
        let mut job = ResourceDef::builtin(Job, "batch", "v1", "jobs", "Job", true);
        job.categories = vec!["all".into()];
        job.status_subresource = true;
        job.generation = Generation::Spec;
        defs.push(job);
        defs.extend(super::kinds::defs());
        Registry {
            defs: defs.into_iter().map(Arc::new).collect(),
        }
    }

    /// Serves `group`'s `plural` no more.
    pub fn remove(&mut self, group: &str, plural: &str) {
        self.defs
            .retain(|d| !(d.group == group && d.plural == plural));
    }

    pub fn add(&mut self, def: ResourceDef) {
        self.defs
            .retain(|d| !(d.group == def.group && d.plural == def.plural));
        self.defs.push(Arc::new(def));
    }

    /// The resource at `/{group}/{version}/{plural}`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.plural == plural && d.serves(version))
            .cloned()
    }

    /// The resource of `apiVersion` + `kind` (for owner references).
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceDef>> {
        let (group, version) = split_api_version(api_version);
        self.defs
            .iter()
            .find(|d| d.group == group && d.kind == kind && d.serves(version))
            .cloned()
    }

    pub fn by_storage(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        // The storage form is the definition whose own key is the storage key.
        self.defs
            .iter()
            .find(|d| {
                d.storage == storage
                    && super::status::qualified_resource(&d.group, &d.plural) == storage
            })
            .cloned()
    }

    fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for d in &self.defs {
            if !d.group.is_empty() && !groups.contains(&d.group) {
                groups.push(d.group.clone());
            }
        }
        groups
    }

    /// `GET /api`.
    pub fn core_versions(&self, server: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
        })
    }

    fn group_versions(&self, group: &str) -> Vec<String> {
        let mut versions: Vec<String> = Vec::new();
        for d in self.defs.iter().filter(|d| d.group == group) {
            for v in &d.versions {
                if !versions.contains(&v.name) {
                    versions.push(v.name.clone());
                }
            }
        }
        versions.sort_by(|a, b| compare_kube_versions(b, a));
        versions
    }

    fn group_doc(&self, group: &str) -> Value {
        let versions = self.group_versions(group);
        let entry = |v: &String| json!({"groupVersion": format!("{group}/{v}"), "version": v});
        json!({
            "name": group,
            "versions": versions.iter().map(entry).collect::<Vec<_>>(),
            "preferredVersion": versions.first().map(entry).unwrap_or(Value::Null),
        })
    }

    /// The served (group-version path, def, version) triples: `api/v1`, `apis/apps/v1`, ...
    fn served(&self) -> impl Iterator<Item = (String, &Arc<ResourceDef>, &str)> {
        self.defs.iter().flat_map(|def| {
            def.versions
                .iter()
                .filter(|v| def.serves(&v.name))
                .map(move |v| {
                    let gv = if def.group.is_empty() {
                        format!("api/{}", v.name)
                    } else {
                        format!("apis/{}/{}", def.group, v.name)
                    };
                    (gv, def, v.name.as_str())
                })
        })
    }

    /// `GET /openapi/v3`: where the document of each group-version is.
    pub fn openapi_v3_index(&self) -> Value {
        let paths: Map<String, Value> = self
            .served()
            .map(|(gv, _, _)| {
                let url = format!("/openapi/v3/{gv}?hash=0");
                (gv, json!({"serverRelativeURL": url}))
            })
            .collect();
        json!({"paths": paths})
    }

    /// `GET /openapi/v3/{gv}`: only what kubectl reads there — each resource's PATCH operation
    /// with its `x-kubernetes-group-version-kind` and query parameters, so that kubectl sees
    /// server-side field validation (`fieldValidation`) supported. There are no schemas and no
    /// request bodies, so `kubectl apply` builds strategic merge patches from its compiled-in
    /// types (custom resources: merge patches), as it does for a server without them.
    pub fn openapi_v3(&self, gv: &str) -> Option<Value> {
        let mut paths = Map::new();
        for (_, def, version) in self.served().filter(|(g, _, _)| g == gv) {
            let scope = if def.namespaced {
                "namespaces/{namespace}/"
            } else {
                ""
            };
            let parameters: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
                .iter()
                .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string"}}))
                .collect();
            paths.insert(
                format!("/{gv}/{scope}{}/{{name}}", def.plural),
                json!({"patch": {
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {
                        "group": def.group, "version": version, "kind": def.kind,
                    },
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                }}),
            );
        }
        (!paths.is_empty()).then(|| {
            json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": "unversioned"},
                "paths": paths,
            })
        })
    }

    /// `GET /apis`.
    pub fn group_list(&self) -> Value {
        json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": self.groups().iter().map(|g| self.group_doc(g)).collect::<Vec<_>>(),
        })
    }

    /// `GET /apis/{group}`.
    pub fn group(&self, group: &str) -> Option<Value> {
        if !self.groups().iter().any(|g| g == group) {
            return None;
        }
        let mut doc = self.group_doc(group);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        Some(doc)
    }

    /// `GET /api/v1` or `GET /apis/{group}/{version}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let defs: Vec<&Arc<ResourceDef>> = self
            .defs
            .iter()
            .filter(|d| d.group == group && d.serves(version))
            .collect();
        if defs.is_empty() {
            return None;
        }
        let mut resources = Vec::new();
        for d in defs {
            let mut verbs = vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ];
            if d.builtin == Some(Builtin::Namespace) {
                verbs.retain(|v| *v != "deletecollection");
            }
            let mut r = json!({
                "name": d.plural,
                "singularName": d.singular,
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": verbs,
            });
            if !d.short_names.is_empty() {
                r["shortNames"] = json!(d.short_names);
            }
            if !d.categories.is_empty() {
                r["categories"] = json!(d.categories);
            }
            resources.push(r);
            if d.status_subresource {
                resources.push(json!({
                    "name": format!("{}/status", d.plural),
                    "singularName": "",
                    "namespaced": d.namespaced,
                    "kind": d.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            if matches!(d.builtin, Some(Builtin::Deployment | Builtin::ReplicaSet)) {
                resources.push(json!({
                    "name": format!("{}/scale", d.plural),
                    "singularName": "",
                    "namespaced": d.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": ["get", "patch", "update"],
                }));
            }
        }
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") },
            "resources": resources,
        }))
    }
}

impl Registry {
    /// Aggregated discovery (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`): `/api` when
    /// `core`, else `/apis`.
    pub fn aggregated(&self, core: bool) -> Value {
        let groups: Vec<String> = if core {
            vec![String::new()]
        } else {
            self.groups()
        };
        let mut items = Vec::new();
        for group in groups {
            let versions: Vec<String> = if group.is_empty() {
                vec!["v1".into()]
            } else {
                self.group_versions(&group)
            };
            let mut vdocs = Vec::new();
            for version in versions {
                let mut resources = Vec::new();
                for d in self
                    .defs
                    .iter()
                    .filter(|d| d.group == group && d.serves(&version))
                {
                    let gvk = json!({"group": d.group, "version": version, "kind": d.kind});
                    let mut r = json!({
                        "resource": d.plural,
                        "responseKind": gvk,
                        "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": d.singular,
                        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                    });
                    if !d.short_names.is_empty() {
                        r["shortNames"] = json!(d.short_names);
                    }
                    if !d.categories.is_empty() {
                        r["categories"] = json!(d.categories);
                    }
                    let mut subresources = Vec::new();
                    if d.status_subresource {
                        subresources.push(json!({
                            "subresource": "status",
                            "responseKind": gvk,
                            "verbs": ["get", "patch", "update"],
                        }));
                    }
                    if matches!(d.builtin, Some(Builtin::Deployment | Builtin::ReplicaSet)) {
                        subresources.push(json!({
                            "subresource": "scale",
                            "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                            "verbs": ["get", "patch", "update"],
                        }));
                    }
                    if !subresources.is_empty() {
                        r["subresources"] = json!(subresources);
                    }
                    resources.push(r);
                }
                vdocs.push(
                    json!({"version": version, "resources": resources, "freshness": "Current"}),
                );
            }
            items.push(json!({"metadata": {"name": group}, "versions": vdocs}));
        }
        json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": items,
        })
    }
}

/// `apps/v1` → (`apps`, `v1`); `v1` → (``, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}
