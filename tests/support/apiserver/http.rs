//! The HTTP surface: discovery, and get/list/watch/create/update/patch/delete on resource paths.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::ops::{self, Ctx, DeleteOpts, FieldValidation, PatchKind, Sub, Write};
use super::resources::{Builtin, ResourceDef};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Change, ChangeKind};
use super::{Inner, lock};

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(handle).with_state(inner)
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response();
    for w in warnings {
        let text = format!("299 - {:?}", w.replace('"', "'"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status(), &[])
}

type Query = BTreeMap<String, String>;

fn query_of(req: &Request) -> Query {
    let mut out = Query::new();
    let Some(q) = req.uri().query() else {
        return out;
    };
    if let Ok(axum::extract::Query(pairs)) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri())
    {
        for (k, v) in pairs {
            out.insert(k, v);
        }
    } else {
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// The parsed resource path.
struct Target {
    def: Arc<ResourceDef>,
    version: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Sub,
}

impl Target {
    fn routed(&self) -> super::audit::Routed<'_> {
        super::audit::Routed {
            def: &self.def,
            namespace: self.ns.as_deref(),
            name: self.name.as_deref(),
            sub: self.sub,
        }
    }
}

enum Route {
    Discovery(Value),
    Resource(Target),
}

fn route(inner: &Inner, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let reg = &inner.registry();
    let server = inner.url.get().cloned().unwrap_or_default();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => {
            return Ok(Route::Discovery(json!({
                "major": "1",
                "minor": inner.version.trim_start_matches('v').split('.').nth(1).unwrap_or("0"),
                "gitVersion": inner.version,
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.25.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            })));
        }
        ["api"] => {
            return Ok(Route::Discovery(
                reg.core_versions(server.trim_start_matches("http://")),
            ));
        }
        ["apis"] => return Ok(Route::Discovery(reg.group_list())),
        ["openapi", "v3"] => return Ok(Route::Discovery(reg.openapi_v3_index())),
        ["openapi", "v3", gv @ ..] => {
            return reg
                .openapi_v3(&gv.join("/"))
                .map(Route::Discovery)
                .ok_or_else(ApiError::no_route);
        }
        ["api", "v1"] => {
            return reg
                .resource_list("", "v1")
                .map(Route::Discovery)
                .ok_or_else(ApiError::no_route);
        }
        ["apis", g] => {
            return reg
                .group(g)
                .map(Route::Discovery)
                .ok_or_else(ApiError::no_route);
        }
        ["apis", g, v] => {
            return reg
                .resource_list(g, v)
                .map(Route::Discovery)
                .ok_or_else(ApiError::no_route);
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (ns, rest): (Option<&str>, &[&str]) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() && r[0] != "status" && r[0] != "finalize" => {
            (Some(*ns), r)
        }
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(ApiError::no_route()),
    };
    let def = reg
        .find(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    if def.namespaced != ns.is_some() && (name.is_some() || (!def.namespaced && ns.is_some())) {
        return Err(ApiError::no_route());
    }
    let sub = match sub {
        None => Sub::Main,
        Some("status") if def.status_subresource => Sub::Status,
        Some("scale") if matches!(def.builtin, Some(Builtin::Deployment | Builtin::ReplicaSet)) => {
            Sub::Scale
        }
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Route::Resource(Target {
        def,
        version: version.to_string(),
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub,
    }))
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    match handle_inner(inner, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

/// Whether the client asked for `PartialObjectMetadata(List)`.
fn metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

fn as_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj["metadata"],
    })
}

async fn handle_inner(inner: Arc<Inner>, req: Request) -> Result<Response, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
        return Ok("ok".into_response());
    }
    let query = query_of(&req);
    let headers = req.headers().clone();
    let user = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        None => inner.default_user.clone(),
        Some(token) => match lock(&inner.tokens).get(token) {
            Some(u) => u.clone(),
            None => return Err(ApiError::new(401, "Unauthorized", "Unauthorized")),
        },
    };
    let aggregated = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=APIGroupDiscoveryList"));
    if aggregated && (path == "/api" || path == "/apis") {
        let doc = inner.registry().aggregated(path == "/api");
        let mut resp = json_response(200, &doc, &[]);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            ),
        );
        return Ok(resp);
    }
    let target = match route(&inner, &path)? {
        Route::Discovery(doc) => {
            if method != Method::GET {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            return Ok(json_response(200, &doc, &[]));
        }
        Route::Resource(t) => t,
    };
    inner
        .requests
        .record(&user, &method, &query, target.routed());
    let body = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;

    let mut ctx = Ctx::for_user(user);
    ctx.dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    if let Some(v) = query.get("dryRun")
        && v != "All"
        && !v.is_empty()
    {
        return Err(ApiError::bad_request(format!(
            "dryRun: Unsupported value: {v:?}: supported values: \"All\""
        )));
    }
    ctx.field_manager = query.get("fieldManager").cloned();
    ctx.field_validation_param = query.get("fieldValidation").cloned().unwrap_or_default();
    ctx.field_validation = match ctx.field_validation_param.as_str() {
        "" | "Warn" => FieldValidation::Warn,
        "Strict" => FieldValidation::Strict,
        "Ignore" => FieldValidation::Ignore,
        other => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    ctx.user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let ns = target.ns.clone().unwrap_or_default();
    let def = target.def.clone();
    let version = target.version.clone();
    let meta_only = metadata_only(&headers);
    let legacy = inner.legacy_creation_timestamp;
    let view = |obj: &Value| {
        if meta_only {
            as_metadata(obj)
        } else {
            let mut obj = obj.clone();
            ops::encode(&def, &mut obj, legacy);
            obj
        }
    };

    match (method, &target.name) {
        (Method::GET, Some(name)) => {
            let key = (
                def.storage.clone(),
                if def.namespaced {
                    ns.clone()
                } else {
                    String::new()
                },
                name.clone(),
            );
            let obj = inner
                .store()
                .get(&key)
                .map(|e| match target.sub {
                    Sub::Scale => ops::scale_view(&e.object),
                    _ => ops::to_version(&def, &version, &e.object),
                })
                .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
            Ok(json_response(200, &view(&obj), &[]))
        }
        (Method::GET, None) => {
            if target.sub != Sub::Main {
                return Err(ApiError::no_route());
            }
            let label =
                LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
                    .map_err(ApiError::bad_request)?;
            let field = FieldSelector::parse(
                query.get("fieldSelector").map(String::as_str).unwrap_or(""),
                def.builtin,
            )
            .map_err(ApiError::bad_request)?;
            let filter = Filter {
                def: def.clone(),
                version: version.clone(),
                ns: target.ns.clone(),
                label,
                field,
                meta_only,
                legacy,
            };
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return Ok(watch(inner, filter, &query));
            }
            list(&inner, &filter, &query)
        }
        (Method::POST, None) => {
            if def.namespaced && target.ns.is_none() {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            let obj = parse_body(&headers, &body)?;
            let (obj, _) = inner
                .write(
                    &def,
                    &version,
                    &ns,
                    "",
                    Sub::Main,
                    &Write::Create(obj),
                    &mut ctx,
                )
                .await?;
            Ok(json_response(201, &view(&obj), &ctx.warnings))
        }
        (method @ (Method::PUT | Method::PATCH), Some(name)) => {
            let write = if method == Method::PUT {
                Write::Update(parse_body(&headers, &body)?)
            } else {
                Write::Patch(patch_kind(&headers, &query)?, body.to_vec())
            };
            let (obj, created) = inner
                .write(&def, &version, &ns, name, target.sub, &write, &mut ctx)
                .await?;
            Ok(json_response(
                if created { 201 } else { 200 },
                &view(&obj),
                &ctx.warnings,
            ))
        }
        (Method::DELETE, Some(name)) => {
            if target.sub != Sub::Main {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            let opts = delete_opts(&query, &body, &mut ctx)?;
            let (resp, code) = inner
                .delete(&def, &version, &ns, name, &opts, &mut ctx)
                .await?;
            Ok(json_response(code, &view(&resp), &ctx.warnings))
        }
        (Method::DELETE, None) => {
            let opts = delete_opts(&query, &body, &mut ctx)?;
            let label =
                LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
                    .map_err(ApiError::bad_request)?;
            let field = FieldSelector::parse(
                query.get("fieldSelector").map(String::as_str).unwrap_or(""),
                def.builtin,
            )
            .map_err(ApiError::bad_request)?;
            let names: Vec<(String, String, Value)> = {
                let store = inner.store();
                store
                    .objects
                    .iter()
                    .filter(|(k, e)| {
                        k.0 == def.storage
                            && (target.ns.is_none() || k.1 == ns)
                            && label.matches_object(&e.object)
                            && field.matches(&e.object)
                    })
                    .map(|(k, e)| {
                        (
                            k.1.clone(),
                            k.2.clone(),
                            ops::to_version(&def, &version, &e.object),
                        )
                    })
                    .collect()
            };
            let mut items = Vec::new();
            for (item_ns, name, before) in names {
                match inner
                    .delete(&def, &version, &item_ns, &name, &opts, &mut ctx)
                    .await
                {
                    Ok((resp, _)) => {
                        if resp["kind"] != "Status" {
                            items.push(view(&resp));
                        } else {
                            items.push(view(&before));
                        }
                    }
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let rv = inner.store().rv;
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", def.kind),
                    "apiVersion": def.api_version(&version),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
                &ctx.warnings,
            ))
        }
        _ => Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// The patch type a PATCH request's Content-Type names; `force` only for server-side apply.
fn patch_kind(headers: &HeaderMap, query: &Query) -> Result<PatchKind, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    let force = query.get("force").is_some_and(|f| f == "true");
    let kind = match mime {
        "application/merge-patch+json" => PatchKind::Merge,
        "application/strategic-merge-patch+json" => PatchKind::Strategic,
        "application/json-patch+json" => PatchKind::Json,
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
            PatchKind::Apply { force }
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if force && !matches!(kind, PatchKind::Apply { .. }) {
        return Err(ApiError::bad_request(
            "force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    Ok(kind)
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    match mime {
        "application/json" | "" | "*/*" => serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the body of the request was not valid JSON: {e}"))
        }),
        "application/yaml" => serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {other:?})"
            ),
        )),
    }
}

fn delete_opts(query: &Query, body: &Bytes, ctx: &mut Ctx) -> Result<DeleteOpts, ApiError> {
    let mut opts = DeleteOpts {
        propagation: query.get("propagationPolicy").cloned(),
        ..DeleteOpts::default()
    };
    if query.get("orphanDependents").is_some_and(|v| v == "true") {
        opts.propagation = Some("Orphan".into());
    }
    if !body.is_empty() {
        let b: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions: {e}")))?;
        if let Some(p) = b["propagationPolicy"].as_str() {
            opts.propagation = Some(p.into());
        }
        if b["orphanDependents"].as_bool() == Some(true) && opts.propagation.is_none() {
            opts.propagation = Some("Orphan".into());
        }
        if b["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "All"))
        {
            ctx.dry_run = true;
        }
        if let Some(uid) = b["preconditions"]["uid"].as_str() {
            opts.uid = Some(uid.into());
        }
        if let Some(rv) = b["preconditions"]["resourceVersion"].as_str() {
            opts.resource_version = Some(rv.into());
        }
    }
    Ok(opts)
}

/// What a list or watch selects.
#[derive(Clone)]
struct Filter {
    def: Arc<ResourceDef>,
    version: String,
    ns: Option<String>,
    label: LabelSelector,
    field: FieldSelector,
    meta_only: bool,
    /// [`super::ApiServerConfig::legacy_creation_timestamp`].
    legacy: bool,
}

impl Filter {
    fn in_scope(&self, key: &(String, String, String)) -> bool {
        key.0 == self.def.storage && self.ns.as_ref().is_none_or(|ns| *ns == key.1)
    }
    fn selects(&self, obj: &Value) -> bool {
        self.label.matches_object(obj) && self.field.matches(obj)
    }
    fn render(&self, obj: &Value) -> Value {
        let mut v = ops::to_version(&self.def, &self.version, obj);
        if self.meta_only {
            return as_metadata(&v);
        }
        ops::encode(&self.def, &mut v, self.legacy);
        v
    }
}

fn continue_token(rv: u64, last: &(String, String)) -> String {
    let raw =
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{}/{}\u{0}", last.0, last.1)});
    base64::engine::general_purpose::URL_SAFE.encode(raw.to_string())
}

fn list(inner: &Inner, filter: &Filter, query: &Query) -> Result<Response, ApiError> {
    let store = inner.store();
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let rv_match = query
        .get("resourceVersionMatch")
        .cloned()
        .unwrap_or_default();
    let mut start_after: Option<(String, String)> = None;
    let snapshot_rv: u64;
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .ok_or_else(|| ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))?;
        snapshot_rv = raw["rv"].as_u64().unwrap_or(0);
        let start = raw["start"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('\u{0}');
        let (ns, name) = start.split_once('/').unwrap_or(("", start));
        start_after = Some((ns.to_string(), name.to_string()));
    } else if rv_param.is_empty() {
        snapshot_rv = store.rv;
    } else if rv_param == "0" {
        snapshot_rv = inner.rv0(&store);
    } else {
        let n: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param}")))?;
        if rv_match == "Exact" || (rv_match.is_empty() && limit != usize::MAX) {
            snapshot_rv = n;
        } else {
            if n > store.rv {
                return Err(ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {}", store.rv),
                ));
            }
            snapshot_rv = store.rv;
        }
    }
    let objects = store.snapshot(&filter.def.storage, snapshot_rv).ok_or_else(|| {
        if start_after.is_some() {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.")
        } else {
            ApiError::expired(format!("too old resource version: {snapshot_rv} ({})", store.compacted + 1))
        }
    })?;
    drop(store);
    let mut items = Vec::new();
    let mut last: Option<(String, String)> = None;
    let mut more = false;
    let mut remaining = 0usize;
    for ((ns, name), obj) in &objects {
        if filter.ns.as_ref().is_some_and(|f| f != ns) {
            continue;
        }
        if let Some(after) = &start_after
            && (ns.clone(), name.clone()) <= *after
        {
            continue;
        }
        if !filter.selects(obj) {
            continue;
        }
        if items.len() >= limit {
            more = true;
            remaining += 1;
            continue;
        }
        let mut item = filter.render(obj);
        if !filter.def.is_crd()
            && !filter.meta_only
            && let Some(m) = item.as_object_mut()
        {
            // Typed lists do not repeat apiVersion/kind in their items.
            m.remove("apiVersion");
            m.remove("kind");
        }
        items.push(item);
        last = Some((ns.clone(), name.clone()));
    }
    let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
    if more && let Some(last) = &last {
        metadata["continue"] = json!(continue_token(snapshot_rv, last));
        if query.get("labelSelector").is_none_or(String::is_empty)
            && query.get("fieldSelector").is_none_or(String::is_empty)
        {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let (kind, api_version) = if filter.meta_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (
            format!("{}List", filter.def.kind),
            filter.def.api_version(&filter.version),
        )
    };
    Ok(json_response(
        200,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}),
        &[],
    ))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(filter: &Filter, rv: u64, initial_end: bool) -> Bytes {
    let (kind, api_version) = if filter.meta_only {
        (
            "PartialObjectMetadata".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (
            filter.def.kind.clone(),
            filter.def.api_version(&filter.version),
        )
    };
    let mut obj = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
    if initial_end {
        obj["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &obj)
}

fn expired_line(message: String) -> Bytes {
    event_line("ERROR", &ApiError::expired(message).to_status())
}

/// The watch event (if any) one change produces for this watch, with upstream's
/// selector semantics: leaving the selection is a DELETED, entering it an ADDED.
fn watch_event(filter: &Filter, change: &Change) -> Option<Bytes> {
    if !filter.in_scope(&change.key) {
        return None;
    }
    let now = change.kind != ChangeKind::Deleted && filter.selects(&change.object);
    let before = change.prev.as_ref().is_some_and(|p| filter.selects(p));
    let kind = match change.kind {
        ChangeKind::Added if now => "ADDED",
        ChangeKind::Modified if now && before => "MODIFIED",
        ChangeKind::Modified if now => "ADDED",
        ChangeKind::Modified if before => "DELETED",
        ChangeKind::Deleted if before || filter.selects(&change.object) => "DELETED",
        _ => return None,
    };
    Some(event_line(kind, &filter.render(&change.object)))
}

fn watch(inner: Arc<Inner>, filter: Filter, query: &Query) -> Response {
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut closed = false;
    let (mut changes, start_rv) = {
        let store = inner.store();
        let changes = store.tx.subscribe();
        let start_rv = store.rv;
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            // At "0" the watch cache may serve a state that lags; the changes since follow.
            let from = if rv_param == "0" {
                inner.rv0(&store)
            } else {
                start_rv
            };
            let state = store
                .snapshot(&filter.def.storage, from)
                .unwrap_or_default();
            for ((ns, _), object) in &state {
                if filter.ns.as_ref().is_none_or(|f| f == ns) && filter.selects(object) {
                    initial.push(event_line("ADDED", &filter.render(object)));
                }
            }
            if send_initial {
                initial.push(bookmark(&filter, from, true));
            }
            let replay = store.since(from).unwrap_or_default();
            initial.extend(replay.iter().filter_map(|c| watch_event(&filter, c)));
        } else {
            match rv_param.parse::<u64>().ok() {
                None => {
                    initial.push(event_line(
                        "ERROR",
                        &ApiError::bad_request(format!("invalid resource version: {rv_param}"))
                            .to_status(),
                    ));
                    closed = true;
                }
                Some(n) => match store.since(n) {
                    None => {
                        initial.push(expired_line(format!(
                            "too old resource version: {n} ({})",
                            store.compacted + 1
                        )));
                        closed = true;
                    }
                    Some(replay) => {
                        initial.extend(replay.iter().filter_map(|c| watch_event(&filter, c)));
                    }
                },
            }
        }
        (changes, start_rv)
    };
    let bookmark_every = inner.bookmark_interval;
    let mut stop = inner.shutdown.subscribe();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if closed {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_rv = start_rv;
        let mut ticker = tokio::time::interval(bookmark_every.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                msg = changes.recv() => match msg {
                    Ok(change) => {
                        last_rv = change.rv;
                        if change.rv <= start_rv {
                            continue;
                        }
                        if let Some(line) = watch_event(&filter, &change)
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let _ = tx.send(expired_line(format!("too old resource version: {last_rv}"))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(&filter, last_rv, false)).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(bookmark(&filter, last_rv, false)).await;
                    }
                    return;
                }
                () = tx.closed() => return,
                _ = stop.changed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<Bytes, Infallible>(line), rx))
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
