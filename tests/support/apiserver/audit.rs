//! A record of every resource request the stand-in serves, as RBAC would authorize it: the verb
//! (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`), the API
//! group, the resource and subresource, and the namespace (none for cluster-scoped resources and
//! for requests across all namespaces), with the user who made it.
//!
//! Requests are told apart by user, as RBAC tells them apart: a client made with
//! [`ApiServer::client_as`] or a process given [`ApiServer::kubeconfig_yaml_as`] carries a bearer
//! token that names its [`UserInfo`]; the test code's own clients are the default user. The
//! stand-in's background controllers (garbage collector, deployment controller) write through the
//! storage directly and never appear. Discovery requests are not recorded (every authenticated
//! user may make them, through `system:discovery`). A request is recorded once routed to a
//! resource, before it is carried out, so a request that fails (404, 409, 422) counts too: RBAC is
//! checked before those answers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use axum::http::Method;

use super::ops::Sub;
use super::resources::ResourceDef;
use super::{ApiServer, UserInfo, lock};

/// One request, as an RBAC rule would have to grant it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiRequest {
    pub user: String,
    pub verb: &'static str,
    /// `""` for the core group.
    pub group: String,
    pub resource: String,
    /// `""`, `status` or `scale`.
    pub subresource: String,
    /// `None`: a cluster-scoped resource, or a list/watch/deletecollection across namespaces.
    pub namespace: Option<String>,
    /// `None` for list, watch, create and deletecollection.
    pub name: Option<String>,
    /// When the request reached the handler (after TLS and HTTP parsing).
    pub at: SystemTime,
}

/// The requests so far, oldest first.
#[derive(Default)]
pub(super) struct Requests(Mutex<Vec<ApiRequest>>);

/// What the request asks for, in the words of an RBAC rule.
pub(super) struct Routed<'a> {
    pub def: &'a ResourceDef,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub sub: Sub,
}

impl Requests {
    pub(super) fn record(
        &self,
        user: &UserInfo,
        method: &Method,
        query: &BTreeMap<String, String>,
        routed: Routed<'_>,
    ) {
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (method.as_str(), routed.name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return,
        };
        let subresource = match routed.sub {
            Sub::Main => "",
            Sub::Status => "status",
            Sub::Scale => "scale",
        };
        lock(&self.0).push(ApiRequest {
            user: user.username.clone(),
            verb,
            group: routed.def.group.clone(),
            resource: routed.def.plural.clone(),
            subresource: subresource.into(),
            namespace: routed.namespace.map(str::to_owned),
            name: routed.name.map(str::to_owned),
            at: SystemTime::now(),
        });
    }
}

impl ApiServer {
    /// Every resource request so far, oldest first (see the module doc for what counts).
    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.inner.requests.0).clone()
    }

    /// The requests `user` made so far, oldest first.
    pub fn requests_by(&self, user: &UserInfo) -> Vec<ApiRequest> {
        let mut all = self.requests();
        all.retain(|r| r.user == user.username);
        all
    }

    /// [`ApiServer::kubeconfig_yaml`] with a bearer token that makes the server attribute the
    /// requests to `user`: for processes such as `fledge serve`, as [`ApiServer::client_as`] is
    /// for in-process clients.
    pub fn kubeconfig_yaml_as(&self, user: UserInfo, namespace: &str) -> String {
        let token = format!("token-{:016x}", self.inner.random());
        lock(&self.inner.tokens).insert(token.clone(), user);
        self.kubeconfig_yaml(namespace)
            .replace("user: {}", &format!("user: {{token: {token}}}"))
    }
}
